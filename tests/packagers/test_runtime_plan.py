"""`--for` / `--device`: the runtime plan refuses before any work, picks the opset, stamps min_version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from packagers import PackageOptions, package
from packagers.options import Precision, Target
from packagers.runtime_plan import RuntimePlan, apply_plans, plan_runtimes
from sdk.compat import RuntimeFacts, why_incompatible
from sdk.errors import PackagingError
from sdk.runtime_versions import ort_limits


def _plan(targets: list[str], precisions: list[str], **options: object) -> dict[Target, RuntimePlan]:
    return plan_runtimes(
        PackageOptions(**options),  # type: ignore[arg-type]
        [Target.parse(t) for t in targets],
        [Precision.parse(p) for p in precisions],
    )


def test_ort_limits_follow_the_compatibility_table() -> None:
    assert ort_limits("1.17.3") == (20, 9)
    assert ort_limits("1.20.0") == (21, 10)
    assert ort_limits("1.32.0") == (21, 10)  # newer than the table: held to its top row
    assert ort_limits("1.11") == (16, 8)
    assert ort_limits("1.5") == (12, 6)
    assert ort_limits("0.5") is None


def test_no_request_no_plan() -> None:
    assert _plan(["onnxruntime"], ["fp32"]) == {}


@pytest.mark.parametrize(
    ("targets", "precisions", "options", "reason"),
    [
        (["onnxruntime"], ["int4"], {"for_runtime": "onnxruntime==1.16"}, "it needs onnxruntime >= 1.17"),
        (["onnxruntime"], ["fp32"], {"for_runtime": "onnxruntime==1.17", "opset": 21}, "runs ONNX opsets up to 20"),
        (["onnxruntime"], ["fp32"], {"for_runtime": "onnxruntime==0.5"}, "releases before 1.0.0 are not supported"),
        (["onnxruntime"], ["fp32"], {"for_runtime": "onnxruntime==1.17", "extra": {"ort_format": True}},
         "drop extra ort_format"),
        (["openvino"], ["fp32"], {"for_runtime": "onnxruntime==1.17"}, "builds onnxruntime bundles, not openvino"),
        (["onnxruntime"], ["fp32"], {"device": "iphone-ios17"}, "has no onnxruntime runtime; it runs: coreml"),
        (["coreml"], ["int8-weights"], {"for_runtime": "coreml==iOS15"}, "cannot run int8-weights: it needs iOS16"),
        (["coreml"], ["fp32"], {"for_runtime": "coreml==iOS14"}, "ML programs need iOS15 or later"),
        (["coreml"], ["fp16"], {"device": "iphone-ios17", "extra": {"minimum_deployment_target": "iOS18"}},
         "minimum_deployment_target iOS18 does not load on iOS17"),
        (["onnxruntime"], ["fp32"], {"device": "no-such-board"}, "known devices: raspberry-pi-5"),
        (["onnxruntime"], ["fp32"], {"for_runtime": "tensorrt==10"}, "unknown runtime 'tensorrt'"),
        (["onnxruntime"], ["fp32"], {"for_runtime": "onnxruntime==1.17", "device": "raspberry-pi-5"}, "not both"),
    ],
)  # fmt: skip
def test_refused_before_any_work_naming_why(
    targets: list[str], precisions: list[str], options: dict[str, object], reason: str
) -> None:
    with pytest.raises(PackagingError, match=None) as err:
        _plan(targets, precisions, **options)
    assert reason in str(err.value)


def test_tflite_int4_on_a_pi_is_refused_by_the_target_before_the_plan(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(PackagingError, match="target tflite does not support precision int4"):
        package(torch.nn.Linear(4, 2), name="m", version=1, key=key, out_dir=tmp_path, target="tflite",
                precision="int4", example_inputs=(np.zeros((1, 4), np.float32),),
                options=PackageOptions(device="raspberry-pi-5"))  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_a_device_profile_plans_each_of_its_runtimes() -> None:
    plans = _plan(["onnxruntime", "openvino", "tflite"], ["fp32"], device="raspberry-pi-5")
    assert {t.value: (p.package, p.version) for t, p in plans.items()} == {
        "onnxruntime": ("onnxruntime", "1.32.0"), "openvino": ("openvino", "2026.4.1"),
        "tflite": ("ai-edge-litert", "2.3.0"),
    }  # fmt: skip
    jetson = _plan(["onnxruntime"], ["int4"], device="jetson-orin-jetpack6")[Target.ONNXRUNTIME]
    assert (jetson.package, jetson.version) == ("onnxruntime-gpu", "1.20.0")


def test_the_opset_is_the_default_or_the_oldest_release_limit() -> None:
    def opset(spec: str, **options: object) -> int | None:
        opts = PackageOptions(for_runtime=spec, **options)  # type: ignore[arg-type]
        return apply_plans(opts, plan_runtimes(opts, [Target.ONNXRUNTIME], [Precision.FP32])).opset

    assert opset("onnxruntime==1.17") == 17
    assert opset("onnxruntime==1.11") == 16
    assert opset("onnxruntime==1.9") == 15
    assert opset("onnxruntime==1.17", opset=19) == 19  # asked for and supported: kept


def test_core_ml_deployment_target_comes_from_the_device() -> None:
    opts = PackageOptions(device="iphone-ios17")
    applied = apply_plans(opts, plan_runtimes(opts, [Target.COREML], [Precision.INT4_PALETTE]))
    assert applied.extra["minimum_deployment_target"] == "iOS17"
    mac = PackageOptions(device="mac-apple-silicon", extra={"minimum_deployment_target": "macOS13"})
    kept = apply_plans(mac, plan_runtimes(mac, [Target.COREML], [Precision.FP16]))
    assert kept.extra["minimum_deployment_target"] == "macOS13"  # older than the device: runs there, kept


def test_for_onnxruntime_1_17_builds_a_bundle_a_1_17_3_device_takes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    lines: list[str] = []
    [result] = package(
        model, name="m", version=1, key=Ed25519PrivateKey.generate(), out_dir=tmp_path, target="onnxruntime",
        precision="int8-dynamic", example_inputs=(np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32),),
        options=PackageOptions(for_runtime="onnxruntime==1.17", benchmark_runs=2, validation_samples=8),
        progress=lines.append,
    )  # fmt: skip
    runtime = result.manifest.runtime
    assert runtime.min_version == "1.12.0" and runtime.opset == 17  # what the model needs, not the release asked
    assert any("building for onnxruntime 1.17 (ONNX opset 17)" in line for line in lines)
    device = {"arch": "aarch64", "os": "linux", "runtimes": {"onnxruntime": "1.17.3"}}
    assert why_incompatible(result.manifest, device) is None
    assert why_incompatible(result.manifest, {**device, "runtimes": {"onnxruntime": "1.16.3"}}) is None
    older = {**device, "runtimes": {"onnxruntime": "1.11.1"}}
    assert why_incompatible(RuntimeFacts.from_manifest(result.manifest), older) == (
        "the bundle needs onnxruntime >= 1.12.0; this device has {'onnxruntime': '1.11.1'}"
    )
