"""The target registry, capabilities, and refusals that happen before any work."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packager_checks import open_bundle

import packagers
from packagers import (
    Capabilities,
    PackageOptions,
    Precision,
    Target,
    Tolerances,
    available_targets,
    capabilities,
    get_packager,
    package,
    registry,
)
from sdk.bundle import read_bundle
from sdk.errors import KeyFileError, PackagingError
from sdk.signing import TrustedKeys, generate_keypair, load_private_key, load_public_key


class Exploding(torch.nn.Module):
    """Fails the test if packaging ever runs it: refusals must come before any work."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the model was run although the request should have been refused")


def test_import_is_cheap() -> None:
    code = (
        "import sys, packagers; heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'transformers') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path.cwd())
    assert out.stdout.strip() == "[]"


def _valid(target: str) -> str:
    return ", ".join(p.value for p in capabilities(target).precisions)


def test_registry_and_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Target.ONNXRUNTIME in available_targets()
    for target in available_targets():
        caps = capabilities(target)
        assert isinstance(caps, Capabilities) and caps.precisions and caps.input_kinds
        assert get_packager(target).target is target
    caps = capabilities("onnxruntime")
    assert {Precision.FP32, Precision.INT8_DYNAMIC} <= set(caps.precisions)
    assert {"torch", "transformers", "onnx"} <= set(caps.input_kinds) and caps.dynamic_shapes
    assert {t.value for t in Target} == {"onnxruntime", "openvino", "tflite", "coreml"}
    # A target whose module is not in this build is refused with the ones that are.
    builtin = dict(registry._BUILTIN)
    builtin[Target.COREML] = None
    monkeypatch.setattr(registry, "_BUILTIN", MappingProxyType(builtin))
    available = ", ".join(t.value for t in available_targets())
    with pytest.raises(PackagingError, match=f"not implemented yet; available targets: {available}$"):
        get_packager("coreml")
    with pytest.raises(PackagingError, match="known targets: onnxruntime, openvino, tflite, coreml"):
        Target.parse("tensorrt")
    assert set(packagers.__all__) >= {"package", "PackageResult", "PackageOptions", "Tolerances", "Target",
                                      "Precision", "Capabilities", "available_targets", "get_packager"}  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "int4-palette"}, "does not support precision int4-palette; valid precisions: {onnxruntime}"),
        ({"precision": ["fp32", "int8-weights"]}, "precision int8-weights; valid precisions: {onnxruntime}"),
        ({"precision": "int3"}, "unknown precision 'int3'; known precisions: " + ", ".join(p.value for p in Precision)),
        ({"target": "tflite", "precision": "int4"}, "does not support precision int4; valid precisions: {tflite}"),
        ({"target": "tensorrt"}, "unknown target 'tensorrt'"),
        ({"name": "no spaces allowed"}, "name 'no spaces allowed'"),
        ({"version": -1}, "version must be an integer"),
        ({"expires": datetime(2030, 1, 1)}, "timezone-aware"),
        ({"expires": datetime.now(timezone.utc) - timedelta(days=1)}, "in the past"),
        ({"labels": np.zeros(3, np.int64)}, "give calibration data"),
    ],
)
def test_refused_before_any_work(kwargs: dict[str, object], message: str, tmp_path: Path) -> None:
    args: dict[str, object] = {"name": "m", "version": 1, "key": tmp_path / "no-such.key", "out_dir": tmp_path / "out",
                               "example_inputs": (torch.zeros(2, 3),)}  # fmt: skip
    args.update(kwargs)
    message = message.format(**{t.value: _valid(t.value) for t in available_targets()})
    with pytest.raises(PackagingError) as err:
        package(Exploding(), **args)  # type: ignore[arg-type]
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_key_is_refused_before_work(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        package(Exploding(), name="m", version=1, key=tmp_path / "no-such.key", out_dir=tmp_path,
                example_inputs=(torch.zeros(2, 3),))  # fmt: skip


def test_options_are_validated() -> None:
    with pytest.raises(PackagingError, match="exporter"):
        PackageOptions(exporter="onnxmltools")
    with pytest.raises(PackagingError, match="golden_samples"):
        PackageOptions(golden_samples=0)
    with pytest.raises(PackagingError, match="min_cosine"):
        Tolerances(min_cosine=1.5)
    with pytest.raises(PackagingError, match="finite"):
        Tolerances(max_rel_diff=float("nan"))
    custom = Tolerances(min_cosine=0.5)
    assert PackageOptions(tolerances=custom).tolerances_for(Precision.INT8_DYNAMIC) is custom
    per = PackageOptions(tolerances={"int8-dynamic": custom})
    assert per.tolerances_for(Precision.INT8_DYNAMIC) is custom
    assert per.tolerances_for(Precision.FP32).min_cosine == 0.9999


def test_two_keys_label_and_expiry(mlp: torch.nn.Module, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    second_priv, second_pub = generate_keypair(tmp_path / "k2", name="second")
    expires = datetime.now(timezone.utc) + timedelta(days=30)
    (result,) = package(
        mlp, name="signed-twice", version=9, key=[key, second_priv], out_dir=tmp_path / "out", label="v9",
        expires=expires, example_inputs=(torch.rand(2, 64),),
    )  # fmt: skip
    assert result.bundle_path.name == "signed-twice-9-onnxruntime-fp32.edgebundle"
    assert result.manifest.expires is not None and result.manifest.expires_at() is not None
    assert result.manifest.label == "v9"
    both = TrustedKeys((key.public_key(), load_public_key(second_pub)), threshold=2)
    bundle = read_bundle(result.bundle_path, both, tmp_path / "read")
    assert len(bundle.keyids) == 2
    only_second = TrustedKeys((load_private_key(second_priv).public_key(),))
    assert open_bundle(result, only_second, tmp_path / "again").manifest.version == 9


@pytest.mark.parametrize("target", ["onnxruntime", "openvino", "coreml"])
def test_keras_input_refused_where_no_converter_takes_it(target: str, tmp_path: Path) -> None:
    model = tmp_path / "model.keras"
    model.write_bytes(b"never opened: the refusal comes first")
    with pytest.raises(PackagingError, match=f"target {target} cannot build from a keras model; valid input kinds"):
        package(model, name="m", version=1, key=tmp_path / "no-such.key", out_dir=tmp_path / "out", target=target)
    assert not (tmp_path / "out").exists()
