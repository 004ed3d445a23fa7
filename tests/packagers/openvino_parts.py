"""Helpers for the OpenVINO packager tests: run a written bundle on the device runtime and judge it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from packager_checks import open_bundle

import device_runtime
from packagers import PackageResult
from packagers.targets.openvino import weight_precisions
from packagers.validation import cosine_per_sample
from sdk.signing import TrustedKeys


def host_validated_precision(bundle_precision: str) -> str:
    """The precision this host validates an OpenVINO bundle at, from its CPU's features (not a constant).

    The rule written out for the tests: an fp16 bundle asks for f16 and is validated at f16 where the
    CPU plugin has half-precision units (``FP16`` in ``OPTIMIZATION_CAPABILITIES``), else at f32 (never at
    the bf16 a bf16 CPU would resolve f16 to); every other precision at f32.
    """
    capabilities = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return "f16" if bundle_precision == "fp16" and "FP16" in capabilities else "f32"


def check_bundle(result: PackageResult, trust: TrustedKeys, dest: Path) -> dict[str, int]:
    """The bundle's structure and manifest runtime as the OpenVINO target writes them; its IR's weight types."""
    bundle = open_bundle(result, trust, dest)
    m = bundle.manifest
    assert (m.target, m.model) == ("openvino", "model.xml")
    assert {f.path for f in m.files} >= {"model.xml", "model.bin", "report.json", *m.golden_paths()}
    rt = m.runtime
    assert rt["package"] == "openvino" and rt["min_version"].count(".") == 2
    assert rt["arch"] == ["x86_64", "aarch64"] and rt["devices"] == ["CPU"] and rt["performance_hint"] == "LATENCY"
    assert rt["weights"] == "model.bin" and rt["validated_inference_precision"] == host_validated_precision(m.precision)
    assert rt["inference_precision_hint"] == ("f16" if m.precision == "fp16" else "f32")
    v = m.validation
    assert v["passed"] is True and v["failures"] == [] and v["benchmark"]["batch"] == 1
    model = ov.Core().read_model(str(bundle.path("model.xml")))
    # The IR keeps the manifest's names, dtypes and named (dynamic) dims.
    for ports, specs in ((model.inputs, m.inputs), (model.outputs, m.outputs)):
        assert [p.get_any_name() for p in ports] == [s.name for s in specs]
        for port, spec in zip(ports, specs, strict=True):
            assert np.dtype(port.get_element_type().to_dtype()) == np.dtype(spec.dtype)
            shape = port.get_partial_shape()
            assert [isinstance(d, str) for d in spec.shape] == [shape[i].is_dynamic for i in range(len(spec.shape))]
    return weight_precisions(model)


def run_on_device(
    result: PackageResult, trust: TrustedKeys, inputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """Load the bundle with ``device_runtime.load``, health-check it, and compare fresh outputs with the reference.

    The outputs must be within the bundle's own tolerances (cosine, relative error, top-1); returns the numbers.
    """
    tol = result.manifest.validation["tolerances"]
    numbers: dict[str, Any] = {}
    with device_runtime.load(result.bundle_path, trust) as model:
        assert model.backend_info["backend"] == "openvino"
        # This host is the device: it computes at the precision it validated at, whatever its CPU.
        info, validated = model.backend_info, host_validated_precision(result.precision)
        assert info["validated_inference_precision"] == validated and info["inference_precision_hint"] == validated
        assert (info["precision_forced"] is not None) == (info["requested_inference_precision"] != validated)
        assert model.health_check()["passed"] is True
        outputs = model.predict(dict(inputs))
    for name, ref in reference.items():
        out = outputs[name]
        assert out.shape == ref.shape and out.dtype == ref.dtype
        cos = cosine_per_sample(ref, out)
        rel = float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())
        assert cos.min() >= tol["min_cosine"] and cos.mean() >= tol["min_cosine_mean"], (name, cos.min())
        if tol["max_rel_diff"] is not None:
            assert rel <= tol["max_rel_diff"], (name, rel)
        numbers[name] = {"cosine_min": float(cos.min()), "max_rel_diff": rel}
        if ref.ndim == 2 and ref.shape[1] > 1:
            top1 = float((ref.argmax(-1) == out.argmax(-1)).mean())
            assert tol["min_top1_agreement"] is None or top1 >= tol["min_top1_agreement"]
            numbers[name]["top1_agreement"] = top1
    # Shown with ``pytest -s``: the numbers behind the report's metrics table.
    print(f"{result.manifest.name} {result.precision}: validation {json.dumps(result.validation['metrics'])}; "
          f"device {json.dumps(numbers)}; host p50 {result.latency_ms['p50']} ms")  # fmt: skip
    return numbers
