"""The OpenVINO backend on real signed bundles: device choice, hints, compiled-model cache, bad bundles.

The IRs are converted here from the tiny ONNX models of runtime_bundles.py with ``openvino.convert_model``
(no packagers involved), and signed with the session's release key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_bundles import (
    CREATED,
    GOLDEN_X,
    LINEAR_SPECS,
    MASKED_SPECS,
    Keys,
    linear_onnx,
    linear_reference,
    masked_sum_onnx,
    npy_bytes,
)

import device_runtime
from sdk.bundle import write_bundle
from sdk.errors import BackendError
from sdk.manifest import Manifest, format_time

ov = pytest.importorskip("openvino")

OvBundle = Callable[..., Path]


def _ir(onnx_bytes: bytes, folder: Path) -> tuple[bytes, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "m.onnx").write_bytes(onnx_bytes)
    ov.save_model(ov.convert_model(str(folder / "m.onnx")), str(folder / "model.xml"), compress_to_fp16=False)
    return (folder / "model.xml").read_bytes(), (folder / "model.bin").read_bytes()


@pytest.fixture(scope="module")
def ov_bundle(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> OvBundle:
    """``ov_bundle(model="linear"|"masked", xml=None, runtime=None, name=...) -> Path`` of a signed bundle."""
    folder = tmp_path_factory.mktemp("ov-bundles")
    irs = {"linear": _ir(linear_onnx(), folder / "linear"), "masked": _ir(masked_sum_onnx(), folder / "masked")}
    count = iter(range(1000))

    def make(*, model: str = "linear", xml: bytes | None = None, runtime: dict[str, Any] | None = None,
             name: str = "ov-linear") -> Path:  # fmt: skip
        ir_xml, ir_bin = irs[model]
        specs = LINEAR_SPECS if model == "linear" else MASKED_SPECS
        golden_in: dict[str, np.ndarray]
        golden_out: dict[str, np.ndarray]
        if model == "linear":
            golden_in, golden_out = {"x": GOLDEN_X}, {"y": linear_reference(GOLDEN_X)}
        else:
            ids = np.array([[3, 4, 5], [6, 7, 8]], dtype=np.int64)
            mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.int32)
            golden_in = {"input_ids": ids, "attention_mask": mask}
            golden_out = {"total": (ids * mask).sum(axis=1).astype(np.float32)}
        members: dict[str, bytes] = {"model.xml": xml if xml is not None else ir_xml, "model.bin": ir_bin}
        golden: dict[str, Any] = {"inputs": {}, "outputs": {}, "tolerance": {"atol": 1e-5, "rtol": 1e-4}}
        for side, arrays in (("inputs", golden_in), ("outputs", golden_out)):
            for key, array in arrays.items():
                members[f"golden/{side}/{key}.npy"] = npy_bytes(array)
                golden[side][key] = f"golden/{side}/{key}.npy"
        base_runtime = {"package": "openvino", "devices": ["CPU"], "performance_hint": "LATENCY",
                        "inference_precision_hint": "f32", "weights": "model.bin"}  # fmt: skip
        manifest = Manifest(
            name=name, version=1, target="openvino", precision="fp32", model="model.xml",
            inputs=tuple(specs["inputs"]), outputs=tuple(specs["outputs"]), created=format_time(CREATED),
            runtime={**base_runtime, **(runtime or {})}, golden=golden,
        )  # fmt: skip
        out = folder / f"{name}-{next(count)}.edgebundle"
        write_bundle(out, manifest, members, [keys.private])
        return out

    return make


def test_predict_matches_and_reports_settings(ov_bundle: OvBundle, keys: Keys) -> None:
    with device_runtime.load(ov_bundle(), keys.public) as model:
        x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
        y = model.predict({"x": x})["y"]
        assert y.dtype == np.float32 and np.allclose(y, linear_reference(x), atol=1e-5)
        assert model.health_check()["passed"] is True
        info = model.backend_info
        assert info["backend"] == "openvino" and info["device"] == "CPU" and info["execution_devices"] == ["CPU"]
        assert info["performance_hint"] == "LATENCY" and info["inference_precision_hint"] == "f32"
        assert info["loaded_from_cache"] is False and info["cache_dir"] is None
        assert info["runtime_version"] == ov.__version__.split("-")[0]


ORDER = ("bf16", "f16", "f32")  # least to most precise


def _cpu_computes(hint: str | None) -> str:
    """What this machine's CPU plugin computes in for ``hint``, from its features (not a constant).

    Half precision needs f16 units (``FP16`` capability); else f16 goes to bf16 where the CPU has it
    (AVX512_BF16, AMX), else f32. Without a hint the plugin picks bf16, else f16, else f32.
    """
    capabilities = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    if hint is None:
        return "bf16" if "BF16" in capabilities else "f16" if "FP16" in capabilities else "f32"
    if hint == "f16" and "FP16" not in capabilities:
        return "bf16" if "BF16" in capabilities else "f32"
    return hint


@pytest.mark.parametrize(
    ("requested", "validated"), [("f32", "f32"), ("f16", "f16"), ("f16", "f32"), (None, None), ("f32", None)]
)
def test_the_device_computes_at_or_above_the_validated_precision(
    ov_bundle: OvBundle, keys: Keys, requested: str | None, validated: str | None
) -> None:
    runtime = {"inference_precision_hint": requested, "validated_inference_precision": validated}
    floor = validated or requested or "f32"
    # The bundle's hint where neither it nor what this CPU computes for it is below the floor, else f32.
    ranks = [ORDER.index(_cpu_computes(requested))] + ([] if requested is None else [ORDER.index(requested)])
    kept = min(ranks) >= ORDER.index(floor)
    with device_runtime.load(ov_bundle(runtime=runtime, name="ov-precision"), keys.public) as model:
        info = model.backend_info
        assert info["inference_precision_hint"] == (_cpu_computes(requested) if kept else "f32")
        assert info["validated_inference_precision"] == floor and info["requested_inference_precision"] == requested
        assert (info["precision_forced"] is None) == kept
        assert model.health_check()["passed"] is True


def test_virtual_devices_report_the_predicted_precision(ov_bundle: OvBundle, keys: Keys) -> None:
    # AUTO neither reports capabilities for its own name nor the resolved precision: each device it may
    # pick is asked, and the precision reported is the prediction for the least precise of them.
    path = ov_bundle(runtime={"inference_precision_hint": "f16", "validated_inference_precision": "f32"})
    with device_runtime.load(path, keys.public, device="AUTO:CPU") as model:
        info = model.backend_info
        assert info["inference_precision_hint"] == "f32" and info["precision_forced"] is not None
        assert set(info["optimization_capabilities"]) == {"CPU"} and "FP32" in info["optimization_capabilities"]["CPU"]


def test_int_inputs_of_two_dtypes_and_dynamic_sequence(ov_bundle: OvBundle, keys: Keys) -> None:
    with device_runtime.load(ov_bundle(model="masked", name="ov-masked"), keys.public) as model:
        for length in (2, 7):
            ids = np.arange(3 * length, dtype=np.int64).reshape(3, length)
            mask = np.ones((3, length), dtype=np.int32)
            mask[0, 1:] = 0
            out = model.predict({"input_ids": ids, "attention_mask": mask})["total"]
            assert np.array_equal(out, (ids * mask).sum(axis=1).astype(np.float32))
        assert model.health_check()["passed"] is True


def test_results_are_the_callers_and_read_only_inputs_work(ov_bundle: OvBundle, keys: Keys) -> None:
    with device_runtime.load(ov_bundle(), keys.public) as model:
        x = GOLDEN_X.copy()
        x.flags.writeable = False  # cannot be shared with the request: copied instead
        first = model.predict({"x": x})["y"]
        kept = first.copy()
        second = model.predict({"x": np.asfortranarray(GOLDEN_X * 3)})["y"]  # made contiguous first
        np.testing.assert_array_equal(first, kept)
        np.testing.assert_allclose(first, linear_reference(GOLDEN_X), atol=1e-5)
        np.testing.assert_allclose(second, linear_reference(GOLDEN_X * 3), atol=1e-4)


def test_device_hint_and_threads_options(ov_bundle: OvBundle, keys: Keys) -> None:
    path = ov_bundle()
    with device_runtime.load(path, keys.public, device="AUTO", performance_hint="throughput",
                             intra_op_threads=1) as model:  # fmt: skip
        assert model.backend_info["device"] == "AUTO"
        assert model.backend_info["performance_hint"] == "THROUGHPUT"
        assert np.allclose(model.predict({"x": GOLDEN_X})["y"], linear_reference(GOLDEN_X), atol=1e-5)
    with device_runtime.load(path, keys.public, device="cpu", intra_op_threads=1) as model:
        assert model.backend_info["device"] == "CPU" and model.backend_info["inference_num_threads"] == 1


@pytest.mark.parametrize("device", ["TPU", "AUTO:TPU,CPU", "NPU.3"])
def test_unknown_device_is_a_backend_error(ov_bundle: OvBundle, keys: Keys, device: str) -> None:
    with pytest.raises(BackendError, match=r"device .* is not available here; this OpenVINO has: .*CPU"):
        device_runtime.load(ov_bundle(), keys.public, device=device)


def test_bad_performance_hint_is_a_backend_error(ov_bundle: OvBundle, keys: Keys) -> None:
    with pytest.raises(BackendError, match="performance hint 'FASTEST' is not one of LATENCY"):
        device_runtime.load(ov_bundle(), keys.public, performance_hint="fastest")
    with pytest.raises(BackendError, match="inference_precision_hint 'f8'"):
        device_runtime.load(ov_bundle(runtime={"inference_precision_hint": "f8"}), keys.public)
    with pytest.raises(BackendError, match="validated_inference_precision 'fp16' is not one of"):
        device_runtime.load(ov_bundle(runtime={"validated_inference_precision": "fp16"}), keys.public)


def test_compiled_model_cache_is_populated_and_reused(ov_bundle: OvBundle, keys: Keys, tmp_path: Path) -> None:
    cache = tmp_path / "ov-cache"
    path = ov_bundle(name="ov-cached")
    with device_runtime.load(path, keys.public, cache_dir=cache) as first:
        assert first.backend_info["loaded_from_cache"] is False and first.backend_info["cache_dir"] == str(cache)
        blobs = sorted(p.name for p in cache.iterdir() if p.suffix == ".blob")
        assert blobs, "the compiled model was not cached"
    # A restart: a new load imports the blob instead of compiling.
    with device_runtime.load(path, keys.public, cache_dir=cache) as second:
        assert second.backend_info["loaded_from_cache"] is True
        assert sorted(p.name for p in cache.iterdir() if p.suffix == ".blob") == blobs
        assert np.allclose(second.predict({"x": GOLDEN_X})["y"], linear_reference(GOLDEN_X), atol=1e-5)


def test_concurrent_predicts_get_their_own_results(ov_bundle: OvBundle, keys: Keys) -> None:
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((int(rng.integers(1, 6)), 4)).astype(np.float32) for _ in range(64)]
    wrong: list[int] = []
    with device_runtime.load(ov_bundle(), keys.public, performance_hint="THROUGHPUT") as model:

        def work(start: int) -> None:
            for i in range(start, len(batches), 4):
                if not np.allclose(model.predict({"x": batches[i]})["y"], linear_reference(batches[i]), atol=1e-5):
                    wrong.append(i)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert wrong == []


def test_corrupt_signed_model_xml_is_a_backend_error(ov_bundle: OvBundle, keys: Keys) -> None:
    path = ov_bundle(xml=b"<?xml version='1.0'?><net name='broken' version='11'><layers><layer", name="ov-corrupt")
    with pytest.raises(BackendError, match=r"openvino cannot load model\.xml"):
        device_runtime.load(path, keys.public)


def test_weights_outside_the_bundle_are_refused(ov_bundle: OvBundle, keys: Keys) -> None:
    # A signed bundle whose manifest names weights it does not carry.
    with pytest.raises(BackendError, match=r"runtime\.weights 'other\.bin' is not a file of the bundle"):
        device_runtime.load(ov_bundle(runtime={"weights": "other.bin"}), keys.public)


def test_missing_openvino_names_the_extra(ov_bundle: OvBundle, keys: Keys, hide_runtime: Callable[[str], None]) -> None:
    path = ov_bundle()
    hide_runtime("openvino")
    with pytest.raises(BackendError, match=r"pip install 'edgeship\[openvino\]'"):
        device_runtime.load(path, keys.public)
