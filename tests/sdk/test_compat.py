"""sdk.compat: the one rule, shared by the device's check before installing and the fleet's choice."""

from __future__ import annotations

from typing import Any

import pytest

from sdk.compat import (
    RuntimeFacts,
    arch_compatible,
    missing_accelerators,
    normalise_arch,
    target_runs_on,
    version_at_least,
    why_incompatible,
)
from sdk.manifest import Manifest, TensorSpec

LINUX = {"arch": "x86_64", "runtimes": {"onnxruntime": "1.20.1"}, "accelerators": [], "os": "linux"}


def _manifest(target: str = "onnxruntime", **runtime: Any) -> Manifest:
    return Manifest(
        name="m", version=1, target=target, precision="fp32", model="model.onnx",
        inputs=(TensorSpec("x", "float32", (1,)),), outputs=(TensorSpec("y", "float32", (1,)),),
        created="2026-01-01T00:00:00Z", runtime=runtime,
    )  # fmt: skip


def test_helpers() -> None:
    assert normalise_arch("AMD64") == "x86_64" and normalise_arch("arm64") == "aarch64"
    assert arch_compatible(None, "x86_64") and arch_compatible(("any",), "riscv64")
    assert arch_compatible(["amd64"], "x86_64") and arch_compatible(["x86_64"], "AMD64")
    assert not arch_compatible(["aarch64"], "x86_64") and not arch_compatible("x86_64", "x86_64")
    assert version_at_least("1.20.1", "1.17") and not version_at_least("1.16.3", "1.17")
    assert version_at_least("1.17.0rc1", "1.17") and version_at_least("2", "1.99.9")
    assert target_runs_on("coreml", "darwin") and not target_runs_on("coreml", "linux")
    assert target_runs_on("openvino", "win32")


@pytest.mark.parametrize(
    ("manifest", "capabilities", "reason"),
    [
        (_manifest(package="onnxruntime", min_version="1.17", arch=["x86_64"]), LINUX, None),
        (_manifest(), {**LINUX, "runtimes": {"onnxruntime-gpu": "1.19.0"}}, None),  # any distribution of the target
        (_manifest(min_version="1.21"), LINUX, "needs onnxruntime >= 1.21"),
        (_manifest(arch=["aarch64"]), LINUX, "built for ['aarch64'], this device is x86_64"),
        (
            _manifest("openvino", package="openvino"),
            LINUX,
            "no openvino runtime is installed (the bundle needs openvino)",
        ),
        (_manifest("coreml"), {**LINUX, "runtimes": {"coremltools": "8.0"}}, "coreml bundles do not run on linux"),
        (_manifest("coreml"), {"arch": "aarch64", "runtimes": {"coremltools": "8.0"}, "os": "darwin"}, None),
        (_manifest("coreml"), {"arch": "aarch64", "runtimes": {"coremltools": "8.0"}}, "an unreported OS"),
        (_manifest(), {"arch": "x86_64"}, "reported no runtimes"),
        (_manifest(), {**LINUX, "runtimes": {"onnxruntime": 1.2}}, "reported no runtimes"),
        (_manifest(), {**LINUX, "arch": 64}, "no CPU architecture"),
        (_manifest(), "x86_64", "reported no capabilities"),
    ],
)
def test_why_incompatible(manifest: Manifest, capabilities: Any, reason: str | None) -> None:
    why = why_incompatible(manifest, capabilities)
    assert (why is None) if reason is None else (why is not None and reason in why), why
    # the stored facts decide the same as the manifest they came from
    facts = RuntimeFacts.from_dict(RuntimeFacts.from_manifest(manifest).to_dict())
    assert why_incompatible(facts, capabilities) == why


def test_accelerators() -> None:
    cuda = RuntimeFacts.from_manifest(_manifest(providers=["CUDAExecutionProvider", "CPUExecutionProvider"]))
    assert cuda.accelerators == ("cuda",) and cuda.required_accelerators == ()  # ORT falls back to the CPU
    gpu = RuntimeFacts.from_manifest(_manifest("openvino", devices=["GPU.0", "CPU"]))
    assert gpu.required_accelerators == ("gpu-dri",)
    auto = RuntimeFacts.from_manifest(_manifest("openvino", devices=["AUTO", "NPU"]))
    assert auto.required_accelerators == () and auto.accelerators == ("npu",)
    tpu = RuntimeFacts.from_manifest(_manifest("tflite", delegates=["edgetpu"]))
    assert missing_accelerators(tpu, LINUX) == ("edgetpu",)
    assert missing_accelerators(tpu, {**LINUX, "accelerators": ["edgetpu"]}) == ()
    assert missing_accelerators(tpu, {**LINUX, "accelerators": "edgetpu"}) == ("edgetpu",)  # malformed: none
