"""Quantization options reach the quantizers (onnxruntime and NNCF), bad values are refused, dense maps get IoU.

Each option is checked in what the quantizer wrote (the built graph, the IR, the recipe), not only in
the options object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mixed_models import SENSITIVE, sensitive_inputs, write_sensitive_mlp

from packagers import PackageOptions, Precision, Tolerances, package
from packagers.validation import compare_outputs
from sdk.cli.main import build_parser
from sdk.cli.quant_flags import quantization_options
from sdk.errors import PackagingError
from sdk.manifest import TensorSpec


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sensitive_mlp(tmp_path_factory.mktemp("opts") / "mlp.onnx")


@pytest.fixture(scope="module")
def seq_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sensitive_mlp(tmp_path_factory.mktemp("opts") / "seq.onnx", tokens=4)


def _build(model: Path, key: Ed25519PrivateKey, out: Path, target: str, precision: str,
           calibration: dict[str, np.ndarray] | None = None, lines: list[str] | None = None,
           **options: Any) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    result = package(str(model), name="m", version=1, key=key, out_dir=out, target=target, precision=precision,
                     calibration=calibration or sensitive_inputs(), options=PackageOptions(**options),
                     progress=None if lines is None else lines.append)[0]  # fmt: skip
    import tarfile

    with tarfile.open(result.bundle_path) as tar:
        member = tar.extractfile("report.json")
        assert member is not None
        report = json.loads(member.read())
    return result, report


def _model(result: Any, name: str = "model.onnx") -> Any:
    import tarfile

    import onnx

    with tarfile.open(result.bundle_path) as tar:
        member = tar.extractfile(name)
        assert member is not None
        return onnx.load_model_from_string(member.read())


def test_onnxruntime_static_exclusion_calibration_size_and_symmetry(
    mlp: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    from onnx import numpy_helper

    result, report = _build(mlp, key, tmp_path, "onnxruntime", "int8", exclude=(r"fc1/.*",), calibration_size=16,
                            activation_symmetric=True, weight_symmetric=False, per_channel=False)  # fmt: skip
    quant = report["build"]["quantization"]
    assert quant["excluded"] == [f"{SENSITIVE}/MatMulAddFusion"] and quant["calibration_samples"] == 16
    assert quant["extra_options"]["ActivationSymmetric"] is True and quant["extra_options"]["WeightSymmetric"] is False
    assert "mixed_precision" not in report["build"]  # the excluded layer alone makes it pass: no search
    graph = _model(result).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    fc1 = next(n for n in graph.node if n.name == f"{SENSITIVE}/MatMulAddFusion")
    assert not any(i in dequantized for i in fc1.input)  # the regex kept it float
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    zero_points = {n.input[2]: n for n in graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 2}
    activation = [inits[z] for z, n in zero_points.items() if n.input[0] not in inits and z in inits]
    weights = [inits[z] for z, n in zero_points.items() if n.input[0] in inits and inits[z].dtype == np.int8]
    assert activation and all((z == 128).all() for z in activation)  # symmetric uint8 activations
    assert weights and any((z != 0).any() for z in weights)  # asymmetric weights


def test_onnxruntime_dynamic_op_type_exclusion_and_unmatched_rules(
    mlp: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    lines: list[str] = []
    result, report = _build(mlp, key, tmp_path, "onnxruntime", "int8-dynamic", lines=lines,
                            exclude_op_types=("MatMul",), exclude=("no_such_layer",))  # fmt: skip
    quant = report["build"]["quantization"]
    assert quant["quantized_layers"] == [] and len(quant["excluded"]) == 4  # MatMul covers the fused Gemms
    assert not any(n.op_type == "MatMulInteger" for n in _model(result).graph.node)
    assert any("no layer matched exclude no_such_layer" in line for line in lines)
    assert quant["unmatched"] == ["exclude no_such_layer"]


def test_onnxruntime_smoothquant_alpha_and_pinned_per_channel(
    seq_mlp: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    calibration = sensitive_inputs(tokens=4)
    _, report = _build(seq_mlp, key, tmp_path, "onnxruntime", "int8-dynamic", calibration, exclude=("fc1",),
                            smoothquant_alpha=0.5, per_channel=True)  # fmt: skip
    assert [c["candidate"] for c in report["candidates"]] == ["per-channel", "per-channel-smoothed"]
    static, static_report = _build(seq_mlp, key, tmp_path / "s", "onnxruntime", "int8", calibration,
                                   exclude=("fc1",), smoothquant_alpha=0.5)  # fmt: skip
    smoothing = static_report["build"]["quantization"]["smoothing"]
    assert smoothing["alphas_tried"] == [0.5] and smoothing["smoothed"] >= 1
    assert any(n.op_type == "Mul" and n.name.endswith("_SmoothMul") for n in _model(static).graph.node)


def test_openvino_ignored_scope_calibration_size_and_modes(mlp: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    import tarfile

    import openvino as ov

    from packagers.targets._openvino_layers import quantized_layers

    tol = Tolerances(
        min_cosine=0.8,
        min_cosine_mean=0.98,
        max_rel_diff=None,
        min_top1_agreement=None,
        golden_atol_rel=0.05,
        golden_rtol=0.05,
        golden_min_cosine=0.98,
    )  # NNCF on this random MLP
    result, report = _build(mlp, key, tmp_path, "openvino", "int8", exclude=("fc[12]",), calibration_size=8,
                            activation_symmetric=False, weight_symmetric=True, tolerances=tol,
                            max_float_layers=0)  # fmt: skip
    quant = report["build"]["quantization"]
    assert quant["kept_float"] == ["fc1", "fc2"] and quant["calibration_samples"] == 8
    assert quant["activations_mode"] == "asymmetric" and quant["weights_mode"] == "symmetric"
    with tarfile.open(result.bundle_path) as tar:
        tar.extractall(tmp_path / "b", filter="data")
    assert quantized_layers(ov.Core().read_model(str(tmp_path / "b" / "model.xml"))) == ["fc3", "fc4"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_float_layers": -1}, "max_float_layers"),
        ({"max_float_layers": 2.5}, "whole"),
        ({"calibration_size": 0}, "calibration_size"),
        ({"smoothquant_alpha": 1.5}, "smoothquant_alpha"),
        ({"target_cosine": 2.0}, "target_cosine"),
        ({"exclude": ("fc[",)}, "not a valid regular expression"),
        ({"exclude": "fc1"}, "sequence of non-empty strings"),
        ({"float_layers": ("",)}, "sequence of non-empty strings"),
        ({"activation_symmetric": "yes"}, "activation_symmetric"),
    ],
)
def test_bad_quantization_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(PackagingError, match=message):
        PackageOptions(**options)


def test_target_cosine_tightens_int8_tolerances_only_and_the_cap_counts_layers() -> None:
    opts = PackageOptions(target_cosine=0.995)
    assert opts.tolerances_for(Precision.INT8).min_cosine_mean == 0.995
    assert opts.tolerances_for(Precision.INT8_DYNAMIC).min_cosine_mean == 0.995
    assert opts.tolerances_for(Precision.FP32).min_cosine_mean == 0.9999  # never loosens
    assert PackageOptions(target_cosine=0.5).tolerances_for(Precision.INT8).min_cosine_mean == 0.98
    assert PackageOptions(max_float_layers=0.1).float_layer_cap(62) == 6
    assert PackageOptions(max_float_layers=0.1).float_layer_cap(4) == 1  # a share > 0 allows one layer
    assert PackageOptions(max_float_layers=3).float_layer_cap(2) == 2
    assert PackageOptions(max_float_layers=0).float_layer_cap(50) == 0
    with pytest.raises(PackagingError, match="min_iou"):
        Tolerances(min_iou=1.5)


def test_dense_maps_are_scored_by_iou_of_thresholded_maps() -> None:
    rng = np.random.default_rng(0)
    ref = np.zeros((3, 1, 16, 16), np.float32)
    ref[:, :, 4:12, 4:12] = 0.9
    ref += rng.uniform(0, 0.05, ref.shape).astype(np.float32)
    shifted = np.roll(ref, 4, axis=-1)  # half of each region moved: IoU 1/3
    spec = TensorSpec("maps", "float32", ("batch", 1, "h", "w"))
    tol = Tolerances(min_cosine=0.0, min_cosine_mean=0.0, max_rel_diff=None, min_iou=0.9)
    same = compare_outputs([spec], {"maps": ref}, {"maps": ref.copy()}, tol)
    assert same["passed"] and same["metrics"]["maps"]["iou_mean"] == 1.0
    assert same["metrics"]["maps"]["iou_threshold"] == 0.5 and same["metrics"]["maps"]["cosine_samples"] == 3
    empty = ref.copy()
    empty[0] = 0.01  # nothing above the threshold: its cosine with noise is not scored, its IoU (1) is
    noisy = empty.copy()
    noisy[0] = rng.uniform(0, 0.02, noisy[0].shape)
    background = compare_outputs([spec], {"maps": empty}, {"maps": noisy}, Tolerances(max_rel_diff=None, min_iou=0.9))
    assert background["metrics"]["maps"]["cosine_samples"] == 2 and background["metrics"]["maps"]["iou_min"] == 1.0
    assert not any("cosine" in f for f in background["failures"])
    moved = compare_outputs([spec], {"maps": ref}, {"maps": shifted}, tol)
    assert not moved["passed"] and abs(moved["metrics"]["maps"]["iou_mean"] - 1 / 3) < 1e-6
    assert "mean IoU of the maps thresholded at 0.5 is 0.3333 < 0.9" in moved["failures"][0]
    logits = TensorSpec("logits", "float32", ("batch", 10))
    plain = compare_outputs([logits], {"logits": ref[:, 0, 0, :10]}, {"logits": ref[:, 0, 0, :10]}, tol)
    assert "iou_mean" not in plain["metrics"]["logits"]  # not a map: cosine and top-1 only
    embeddings = rng.standard_normal((3, 1, 16, 16)).astype(np.float32)  # values outside [0, 1]: not a map
    assert "iou_mean" not in compare_outputs([spec], {"maps": embeddings}, {"maps": embeddings}, tol)["metrics"]["maps"]


def test_cli_flags_build_the_options() -> None:
    args = build_parser().parse_args([
        "package", "m.onnx", "--key", "k", "--name", "n", "--version", "1", "--out", "o",
        "--calibration-size", "64", "--activations", "symmetric", "--weights", "asymmetric", "--no-per-channel",
        "--smoothquant-alpha", "0.6", "--exclude", "fc1", "--exclude", "head.*", "--exclude-op-type", "Gemm",
        "--max-float-layers", "3", "--target-cosine", "0.995",
    ])  # fmt: skip
    options = quantization_options(args)
    assert options == {
        "calibration_size": 64, "activation_symmetric": True, "weight_symmetric": False, "per_channel": False,
        "smoothquant_alpha": 0.6, "exclude": ("fc1", "head.*"), "exclude_op_types": ("Gemm",),
        "max_float_layers": 3.0, "target_cosine": 0.995,
    }  # fmt: skip
    PackageOptions(**options)  # every value is one the options accept
    with pytest.raises(SystemExit):
        build_parser().parse_args(["package", "m.onnx", "--key", "k", "--name", "n", "--version", "1", "--out", "o",
                                   "--activations", "sometimes"])  # fmt: skip
