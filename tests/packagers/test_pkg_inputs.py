"""ONNX files as real exporters write them: -1 / 0 / missing dims, no shape, odd names, opsets 11-21,
external data; and what an input error says when generated data cannot fit a model's dynamic dims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx_graphs import image_onnx, linear_onnx
from packager_checks import open_bundle, run

from packagers import PackageOptions, package
from sdk.errors import PackagingError
from sdk.signing import TrustedKeys

FAST = {"benchmark_runs": 2, "benchmark_warmup": 1, "validation_samples": 8}


def _package(model: Path, key: Ed25519PrivateKey, out: Path, **kwargs):  # type: ignore[no-untyped-def]
    options = PackageOptions(**{**FAST, **kwargs.pop("options", {})})
    return package(model, name="m", version=1, key=key, out_dir=out, options=options, **kwargs)


@pytest.mark.parametrize(
    ("x_dims", "expected"),
    [
        ((-1, 4), ("x_dim0", 4)),  # dim_value -1, as several exporters write a dynamic dim
        ((0, 4), ("x_dim0", 4)),  # dim_value 0
        ((None, 4), ("x_dim0", 4)),  # neither value nor name
        (("batch size", 4), ("batch_size", 4)),  # a name that is not an identifier
    ],
)
def test_dynamic_dims_as_exporters_write_them_get_names(
    x_dims: tuple, expected: tuple, key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path
) -> None:
    model = linear_onnx(tmp_path / "m.onnx", x_dims=x_dims, y_dims=(-1, 3))
    (result,) = _package(model, key, tmp_path / "out")
    assert result.manifest.inputs[0].shape == expected
    assert result.manifest.outputs[0].shape == ("y_dim0", 3)
    assert result.validation["passed"] and result.validation["samples"] == 8


def test_odd_names_no_shape_and_external_data(key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path) -> None:
    """TF-style names with ':' and '/', an input and output with no shape at all, weights in a .data file."""
    model = linear_onnx(tmp_path / "src" / "m.onnx", x="serving/input:0", y="model/dense:0", x_dims=None,
                        y_dims=None, external_data=True)  # fmt: skip
    assert (tmp_path / "src" / "m.onnx.data").is_file()
    with pytest.raises(PackagingError, match=r"'serving/input:0' has no shape.*--input-shape serving/input:0="):
        _package(model, key, tmp_path / "refused")
    (result,) = _package(model, key, tmp_path / "out", options={"input_shapes": {"serving/input:0": (1, 4)}})
    m = result.manifest
    assert m.inputs[0].name == "serving/input:0" and m.inputs[0].shape == (
        "serving_input_0_dim0",
        "serving_input_0_dim1",
    )
    # the output's shape comes from ONNX shape inference: its batch is the input's, its width fixed
    assert m.outputs[0].name == "model/dense:0" and m.outputs[0].shape == ("serving_input_0_dim0", 3)
    bundle = open_bundle(result, trust, tmp_path / "b")
    assert {f.path for f in m.files} >= {"model.onnx"} and not any(f.path.endswith(".data") for f in m.files)
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    original = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = original.run(None, {"serving/input:0": x})[0]
    np.testing.assert_allclose(run(bundle, {"serving/input:0": x})["model/dense:0"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opset", [11, 21])
def test_opsets_11_to_21(opset: int, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    model = linear_onnx(tmp_path / "m.onnx", opset=opset)
    (result,) = _package(model, key, tmp_path / "out")
    assert result.manifest.runtime["opset"] == opset and result.validation["passed"]
    assert onnx.load(str(model)).opset_import[0].version == opset


def test_guessed_dynamic_dims_are_named_with_the_flags_to_pass(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    """A detector whose H and W the graph leaves dynamic: generated inputs at a guessed size cannot run."""
    model = image_onnx(tmp_path / "det.onnx")
    lines: list[str] = []
    with pytest.raises(PackagingError) as err:
        _package(model, key, tmp_path / "refused", progress=lines.append)
    text = str(err.value)
    assert "images: dim 2 'H', dim 3 'W'" in text and "--calibration" in text, text
    assert "--input-shape images=1,3,N,N" in text, text
    assert any("guessed dynamic dims" in line for line in lines), lines
    (result,) = _package(model, key, tmp_path / "out", options={"input_shapes": {"images": (1, 3, 8, 8)}})
    assert result.manifest.inputs[0].shape == ("N", 3, "H", "W") and result.validation["passed"]


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"pixels": (1, 3, 8, 8)}, "names 'pixels', which is not an input"),
        ({"images": (1, 3, 8)}, "3 dims, the model's input has 4"),
        ({"images": (1, 4, 8, 8)}, "dim 1 is fixed at 3 in the model, got 4"),
    ],
)
def test_bad_input_shapes_are_refused(shapes: dict, message: str, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    with pytest.raises(PackagingError, match=message):
        _package(image_onnx(tmp_path / "det.onnx"), key, tmp_path / "out", options={"input_shapes": shapes})


def test_input_shapes_option_is_checked() -> None:
    with pytest.raises(PackagingError, match="integers >= 1"):
        PackageOptions(input_shapes={"x": (1, 0, 4)})


def test_openvino_takes_the_same_names(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    """OpenVINO keeps a named dim dynamic: the -1 batch and the shapeless output must agree with its IR."""
    model = linear_onnx(tmp_path / "m.onnx", x="in:0", x_dims=(-1, 4), y_dims=None, external_data=True)
    (result,) = _package(model, key, tmp_path / "out", target="openvino")
    assert result.manifest.inputs[0].shape == ("in_0_dim0", 4) and result.manifest.outputs[0].shape == ("in_0_dim0", 3)
    assert result.validation["passed"]
