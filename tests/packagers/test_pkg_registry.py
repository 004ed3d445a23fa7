"""The target registry, capabilities, and refusals that happen before any work."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

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


def test_registry_and_capabilities() -> None:
    assert available_targets() == [Target.ONNXRUNTIME]
    caps = capabilities("onnxruntime")
    assert isinstance(caps, Capabilities)
    assert caps.precisions == (Precision.FP32, Precision.INT8_DYNAMIC)
    assert set(caps.input_kinds) == {"torch", "transformers", "onnx"} and caps.dynamic_shapes
    assert get_packager(Target.ONNXRUNTIME).target is Target.ONNXRUNTIME
    assert {t.value for t in Target} == {"onnxruntime", "openvino", "tflite", "coreml"}
    for name in ("openvino", "tflite", "coreml"):
        with pytest.raises(PackagingError, match="not implemented yet; available targets: onnxruntime"):
            get_packager(name)
    with pytest.raises(PackagingError, match="known targets: onnxruntime, openvino, tflite, coreml"):
        Target.parse("tensorrt")
    assert set(packagers.__all__) >= {"package", "PackageResult", "PackageOptions", "Tolerances", "Target",
                                      "Precision", "Capabilities", "available_targets", "get_packager"}  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "int4"}, "does not support precision int4; valid precisions: fp32, int8-dynamic"),
        ({"precision": "fp16"}, "does not support precision fp16; valid precisions: fp32, int8-dynamic"),
        ({"precision": ["fp32", "int8"]}, "does not support precision int8; valid precisions: fp32, int8-dynamic"),
        ({"precision": "int3"}, "unknown precision 'int3'; known precisions: fp32, fp16, int8-dynamic, int8, int8-weights, int4, int4-palette"),
        ({"target": "openvino"}, "target openvino is not implemented yet; available targets: onnxruntime"),
        ({"target": ["onnxruntime", "coreml"]}, "target coreml is not implemented yet"),
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
