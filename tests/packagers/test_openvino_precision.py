"""OpenVINO bundles packaged on, and run on, every kind of CPU: the CI guard for issue 10's precision bug.

The build machine's CPU cannot be swapped, so OpenVINO's plugin is told to behave as another one: a
``SimulatedCore`` (a real ``openvino.Core``) reports that CPU's ``OPTIMIZATION_CAPABILITIES`` and says it
resolved each ``INFERENCE_PRECISION_HINT`` the way that CPU's plugin does, while the model really runs
(at f32). The packager and the device runtime run unchanged, the precision rule included.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packager_checks import Digits, open_bundle

import device_runtime
from packagers import PackageOptions, PackageResult, package
from sdk.errors import BackendError, PackagingError
from sdk.signing import TrustedKeys

REAL_CORE = ov.Core
ORDER = ("bf16", "f16", "f32")  # least to most precise
# Each kind of CPU: its capabilities, and hint -> the precision its plugin computes in (measured on an
# AMD EPYC with AVX512_BF16; the others from the CPU plugin's precision_support.cpp).
CPUS: dict[str, tuple[list[str], dict[str | None, str]]] = {
    "avx2": (["FP32", "INT8", "BIN"], {None: "f32", "bf16": "f32", "f16": "f32", "f32": "f32"}),
    "avx512-bf16": (["BF16", "FP32", "INT8", "BIN"], {None: "bf16", "bf16": "bf16", "f16": "bf16", "f32": "f32"}),
    "amx-fp16": (["BF16", "FP16", "FP32", "INT8"], {None: "bf16", "bf16": "bf16", "f16": "f16", "f32": "f32"}),
    "arm-fp16": (["FP16", "FP32", "INT8"], {None: "f16", "bf16": "f32", "f16": "f16", "f32": "f32"}),
    "half-only": (["FP16", "INT8"], {None: "f16", "bf16": "f16", "f16": "f16", "f32": "f16"}),
    # A plugin whose capabilities do not tell the whole story: the runtime must believe the compiled model.
    "bf16-unreported": (["FP16", "FP32", "INT8"], {None: "bf16", "bf16": "bf16", "f16": "bf16", "f32": "f32"}),
}  # fmt: skip
HOSTS = ("avx2", "avx512-bf16", "amx-fp16", "arm-fp16")
# fp16 bundles are validated at f16 only where the host computes f16; never at the bf16 a bf16 CPU offers.
VALIDATED = {"avx2": "f32", "avx512-bf16": "f32", "amx-fp16": "f16", "arm-fp16": "f16"}


class SimulatedCompiled:
    """A real compiled model that reports the precision the simulated CPU would have resolved."""

    def __init__(self, compiled: Any, resolved: str) -> None:
        self._compiled, self._resolved = compiled, resolved

    def get_property(self, name: str) -> Any:
        if name == "INFERENCE_PRECISION_HINT":
            return {"bf16": ov.Type.bf16, "f16": ov.Type.f16, "f32": ov.Type.f32}[self._resolved]
        return self._compiled.get_property(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._compiled, name)


class SimulatedCore:
    """``openvino.Core`` whose CPU has the capabilities and precision resolution of ``CPUS[cpu]``."""

    hints: list[str | None]  # every hint compiled with, across instances of one simulation

    def __init__(self, cpu: str, hints: list[str | None]) -> None:
        self._core = REAL_CORE()
        self._caps, self._table = CPUS[cpu]
        self.hints = hints

    @property
    def available_devices(self) -> list[str]:
        return ["CPU"]

    def get_property(self, device: str, name: str) -> Any:
        if name == "OPTIMIZATION_CAPABILITIES":
            return list(self._caps)
        return self._core.get_property(device, name)

    def compile_model(self, model: Any, device: str, config: dict[str, Any] | None = None) -> SimulatedCompiled:
        config = dict(config or {})
        hint = config.pop("INFERENCE_PRECISION_HINT", None)
        self.hints.append(hint)
        compiled = self._core.compile_model(model, device, {**config, "INFERENCE_PRECISION_HINT": "f32"})
        return SimulatedCompiled(compiled, self._table[hint])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)


@pytest.fixture
def simulate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``simulate(cpu) -> hints``: from now on OpenVINO behaves as that CPU; ``hints`` records each compile."""

    def start(cpu: str) -> list[str | None]:
        hints: list[str | None] = []
        monkeypatch.setattr(ov, "Core", lambda: SimulatedCore(cpu, hints))
        return hints

    yield start


@pytest.fixture(scope="module")
def packaged(
    mlp: torch.nn.Module, digits: Digits, key: Ed25519PrivateKey, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[PackageResult]]:
    """fp32 and fp16 bundles of the digits MLP packaged on each simulated host."""
    found: dict[str, list[PackageResult]] = {}
    with pytest.MonkeyPatch.context() as patch:
        for host in HOSTS:
            patch.setattr(ov, "Core", lambda host=host: SimulatedCore(host, []))
            found[host] = package(
                mlp, name=f"mlp-{host}", version=1, key=key, out_dir=tmp_path_factory.mktemp(host), target="openvino",
                precision=["fp32", "fp16"], example_inputs=(torch.from_numpy(digits.x_train[:2]),),
                calibration={"input": digits.x_val[:64]}, options=PackageOptions(benchmark_runs=5),
            )  # fmt: skip
    return found


@pytest.mark.parametrize("host", HOSTS)
def test_packager_validates_at_the_hosts_precision_never_below_the_hint(
    host: str, packaged: dict[str, list[PackageResult]], trust: TrustedKeys, tmp_path: Path
) -> None:
    for result in packaged[host]:
        rt = result.manifest.runtime
        validated = VALIDATED[host] if result.precision == "fp16" else "f32"
        assert rt["inference_precision_hint"] == ("f16" if result.precision == "fp16" else "f32")
        assert rt["validated_inference_precision"] == validated
        report = json.loads(open_bundle(result, trust, tmp_path / result.precision).path("report.json").read_bytes())
        recorded = report["build"]["validation_precision"]
        assert recorded["hint"] == rt["inference_precision_hint"] and recorded["validated"] == validated
        assert (recorded["forced"] is not None) == (CPUS[host][1][recorded["hint"]] not in (validated, "f32"))


@pytest.mark.parametrize("device", list(CPUS))
def test_every_bundle_on_every_device_runs_at_or_above_its_validated_precision(
    device: str, packaged: dict[str, list[PackageResult]], trust: TrustedKeys, simulate: Any, digits: Digits
) -> None:
    x = np.ascontiguousarray(digits.x_val[:3])
    table = CPUS[device][1]
    for host, results in packaged.items():
        for result in results:
            hints = simulate(device)
            validated = result.manifest.runtime["validated_inference_precision"]
            if ORDER.index(table["f32"]) < ORDER.index(validated):  # nothing this device can do is enough
                with pytest.raises(BackendError, match=f"cannot run on OpenVINO CPU: .* below the {validated} the "
                                                       "bundle was validated at"):  # fmt: skip
                    device_runtime.load(result.bundle_path, trust)
                continue
            with device_runtime.load(result.bundle_path, trust) as model:
                info = model.backend_info
                resolved = info["inference_precision_hint"]
                assert resolved == table[hints[-1]], (host, result.precision, hints)
                assert ORDER.index(resolved) >= ORDER.index(validated), (host, result.precision, device)
                assert info["validated_inference_precision"] == validated
                # The bundle's own hint is kept where it is safe (not below its validation, and not resolved
                # below it); else f32, and forcing says why.
                requested = result.manifest.runtime["inference_precision_hint"]
                safe = min(ORDER.index(requested), ORDER.index(table[requested])) >= ORDER.index(validated)
                assert hints[-1] == (requested if safe else "f32") and (info["precision_forced"] is None) == safe
                assert model.health_check()["passed"] is True
                assert model.predict({"input": x})["output"].shape == (3, 10)


def test_a_plugin_resolving_below_its_capabilities_is_caught_on_both_sides(
    packaged: dict[str, list[PackageResult]], trust: TrustedKeys, simulate: Any, mlp: torch.nn.Module,
    digits: Digits, key: Ed25519PrivateKey, tmp_path: Path,
) -> None:  # fmt: skip
    # The device: capabilities promise f16, the compiled model says bf16: compiled again at f32.
    (fp16,) = [r for r in packaged["amx-fp16"] if r.precision == "fp16"]
    hints = simulate("bf16-unreported")
    with device_runtime.load(fp16.bundle_path, trust) as model:
        assert hints == ["f16", "f32"] and model.backend_info["inference_precision_hint"] == "f32"
        assert model.backend_info["precision_forced"] == (
            "OpenVINO resolved f16 to bf16 on CPU, below the f16 the bundle was validated at: forced f32"
        )
        assert model.health_check()["passed"] is True
    # The packager: it would validate at f16 and claim it; it refuses instead.
    with pytest.raises(PackagingError, match="resolved INFERENCE_PRECISION_HINT=f16 to bf16 on this host"):
        package(mlp, name="mlp", version=1, key=key, out_dir=tmp_path, target="openvino", precision="fp16",
                example_inputs=(torch.from_numpy(digits.x_train[:2]),),
                calibration={"input": digits.x_val[:64]})  # fmt: skip
