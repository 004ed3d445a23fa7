"""Packaging .onnx files for onnxruntime; the reference is onnxruntime fp32 on the original file."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packager_checks import Digits, assert_golden_healthy, min_cosine, open_bundle, run

from packagers import package
from sdk.errors import PackagingError
from sdk.manifest import TensorSpec
from sdk.signing import TrustedKeys


@pytest.fixture(scope="module")
def cnn_onnx(cnn: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits CNN exported elsewhere with an odd dim name that needs cleaning up."""
    path = tmp_path_factory.mktemp("onnx") / "cnn.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            cnn, (torch.zeros(2, 1, 8, 8),), str(path), input_names=["pixels"], output_names=["class_scores"],
            dynamic_axes={"pixels": {0: "N images"}, "class_scores": {0: "N images"}}, opset_version=17, dynamo=False,
        )  # fmt: skip
    return path


def _original(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]


def test_onnx_fp32_and_int8(cnn_onnx: Path, digits: Digits, key: Ed25519PrivateKey, trust: TrustedKeys,
                            tmp_path: Path) -> None:  # fmt: skip
    images = digits.x_val.reshape(-1, 1, 8, 8)
    results = package(
        cnn_onnx, name="cnn-onnx", version=7, key=key, out_dir=tmp_path, precision=["fp32", "int8-dynamic"],
        calibration={"pixels": images}, labels=digits.y_val,
    )  # fmt: skip
    for result in results:
        bundle = open_bundle(result, trust, tmp_path / result.precision)
        m = bundle.manifest
        assert m.inputs == (TensorSpec("pixels", "float32", ("N_images", 1, 8, 8)),)
        assert m.outputs == (TensorSpec("class_scores", "float32", ("N_images", 10)),)
        v = m.validation
        assert v["reference"] == f"onnxruntime {ort.__version__} fp32 (original .onnx)"
        assert v["passed"] and v["samples"] == len(images) and "accuracy" in v
        assert m.runtime["opset"] == 17 and m.runtime["exporter"] == "given"
        assert_golden_healthy(bundle)
        out = run(bundle, {"pixels": images[:50]})["class_scores"]
        assert min_cosine(_original(cnn_onnx, images[:50]), out) > (0.99999 if result.precision == "fp32" else 0.98)
    int8_ops = {n.op_type for n in onnx.load(str(tmp_path / "int8-dynamic" / "model.onnx")).graph.node}
    assert "ConvInteger" in int8_ops


def test_onnx_random_data(cnn_onnx: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    (result,) = package(cnn_onnx, name="cnn-onnx", version=1, key=key, out_dir=tmp_path)
    assert result.validation["passed"] and result.validation["data"].startswith("random")
    assert result.validation["samples"] == 32


def test_junk_and_wrong_files(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage that is not protobuf \xff\xfe" * 8)
    with pytest.raises(PackagingError, match="not a valid ONNX model"):
        package(junk, name="x", version=1, key=key, out_dir=tmp_path / "out")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(PackagingError, match="not a valid ONNX model"):
        package(empty, name="x", version=1, key=key, out_dir=tmp_path / "out")
    with pytest.raises(PackagingError, match="does not exist"):
        package(tmp_path / "missing.onnx", name="x", version=1, key=key, out_dir=tmp_path / "out")
    text = tmp_path / "model.txt"
    text.write_text("hello")
    with pytest.raises(PackagingError, match=r"not a model edgeship reads; give an \.onnx file, .*SavedModel"):
        package(text, name="x", version=1, key=key, out_dir=tmp_path / "out")
    with pytest.raises(PackagingError, match="cannot package a list"):
        package([1, 2], name="x", version=1, key=key, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
