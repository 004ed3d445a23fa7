"""ONNX Runtime static int8 on exported CNNs: per-channel QDQ that loads, weights held by Constant nodes.

Two faults seen on PaddleOCR's PP-OCRv4 text detector (paddle2onnx, opset 12, every weight a Constant
node), reproduced here on tiny Conv-BatchNorm-ReLU networks built in the test:

- below opset 13 the per-channel QDQ graph was written but refused at load (``DequantizeLinear`` has no
  ``axis`` there): the graph is now raised to opset 13 before quantization;
- weights held by ``Constant`` nodes were calibrated as activations (one scale per tensor, per-channel or
  not) when pre-processing did not fold them: they are now initializers, quantized per output channel.
"""

from __future__ import annotations

import json
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

import packagers.targets.onnxruntime as ort_target
from packagers import PackageOptions, package
from packagers.targets._ort_quant import prepare_for_qdq


def _inputs(n: int = 24) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, 3, 16, 16)).astype(np.float32)}


@pytest.fixture(scope="module")
def conv_bn_opset12(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conv2d + BatchNorm2d + ReLU (twice) with trained-looking BN statistics, exported at eval at opset 12."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
    )  # fmt: skip
    for m in model:
        if isinstance(m, torch.nn.BatchNorm2d):  # channels of different scales: per-channel weights matter
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.05, 4.0)
            m.weight.data.uniform_(0.2, 3.0)
    path = tmp_path_factory.mktemp("cnn12") / "conv_bn.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model.eval(), (torch.zeros(1, 3, 16, 16),), str(path), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=12,
                          dynamo=False)  # fmt: skip
    assert onnx.load(str(path)).opset_import[0].version == 12
    return path


@pytest.fixture(scope="module")
def constant_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conv (weights and bias in Constant nodes, as paddle2onnx writes them) + ReLU, opset 13."""
    rng = np.random.default_rng(1)
    w = (rng.normal(size=(8, 3, 3, 3)) * np.geomspace(0.01, 2.0, 8)[:, None, None, None]).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(b, "b")),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 16, 16])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("const") / "const.onnx"
    onnx.save_model(model, str(path))
    return path


def _bundle(result: Any) -> tuple[Any, dict[str, Any]]:
    with tarfile.open(result.bundle_path) as tar:
        graph, report = tar.extractfile("model.onnx"), tar.extractfile("report.json")
        assert graph is not None and report is not None
        return onnx.load_model_from_string(graph.read()), json.loads(report.read())


def _weight_scales(model: Any) -> dict[str, int]:
    """Elements of each DequantizeLinear scale feeding a Conv weight input (1 = per tensor)."""
    inits = {i.name: i for i in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {
        n.name: int(np.prod(inits[dq[n.input[1]].input[1]].dims))
        for n in model.graph.node
        if n.op_type == "Conv" and n.input[1] in dq
    }


def test_per_channel_loads_on_an_opset12_conv_bn_cnn(conv_bn_opset12: Path, key: Ed25519PrivateKey,
                                                     tmp_path: Path) -> None:  # fmt: skip
    # only the per-channel candidate: it used to be refused at load (INVALID_GRAPH), so the build failed
    result = package(str(conv_bn_opset12), name="c", version=1, key=key, out_dir=tmp_path, target="onnxruntime",
                     precision="int8", calibration=_inputs(), options=PackageOptions(per_channel=True))[0]  # fmt: skip
    model, report = _bundle(result)
    assert result.validation["passed"]
    assert model.opset_import[0].version >= 13
    scales = _weight_scales(model)
    assert len(scales) == 2 and set(scales.values()) == {8}  # per output channel, both convs
    quant = report["build"]["quantization"]
    assert quant["per_channel"] is True
    assert quant["pre_process"]["opset"] == {"from": 12, "to": 13}


def test_constant_node_weights_are_quantized_per_channel(
    constant_weights: Path, key: Ed25519PrivateKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pre-processing may fail or be skipped (incomplete shape inference); the weights are still weights
    skipped = {"applied": False, "note": "skipped by the test"}
    monkeypatch.setattr(ort_target, "_pre_process", lambda src, dst: skipped)
    result = package(str(constant_weights), name="k", version=1, key=key, out_dir=tmp_path, target="onnxruntime",
                     precision="int8", calibration=_inputs(), options=PackageOptions(per_channel=True))[0]  # fmt: skip
    model, report = _bundle(result)
    assert result.validation["passed"]
    assert _weight_scales(model) == {"conv": 8}  # was 1: a Constant weight was calibrated as an activation
    assert not any(n.op_type == "Constant" for n in model.graph.node)
    assert report["build"]["quantization"]["pre_process"]["constants_to_initializers"] == 2


def test_prepare_for_qdq_leaves_a_ready_graph_alone(constant_weights: Path, tmp_path: Path) -> None:
    ready, info = prepare_for_qdq(constant_weights, tmp_path / "a.onnx")
    assert ready == tmp_path / "a.onnx" and info == {"constants_to_initializers": 2}
    again, info = prepare_for_qdq(ready, tmp_path / "b.onnx")
    assert again == ready and info == {} and not (tmp_path / "b.onnx").exists()


def test_conv_recipe_quantizes_only_the_convolutions(conv_bn_opset12: Path, key: Ed25519PrivateKey,
                                                     tmp_path: Path) -> None:  # fmt: skip
    options = PackageOptions(extra={"int8_recipe": "conv"})
    result = package(str(conv_bn_opset12), name="c", version=1, key=key, out_dir=tmp_path, target="onnxruntime",
                     precision="int8", calibration=_inputs(), options=options)[0]  # fmt: skip
    model, report = _bundle(result)
    assert result.validation["passed"]
    assert [c["candidate"] for c in report["candidates"]] == ["per-channel-conv", "per-channel-conv-percentile"]
    quant = report["build"]["quantization"]
    assert quant["op_types"] == ["Conv", "ConvTranspose"]
    assert quant["quantized_layers"]
    ops = {n.name: n.op_type for n in model.graph.node}
    assert {ops[n] for n in quant["quantized_layers"]} == {"Conv"}
    assert set(_weight_scales(model).values()) == {8}
    assert result.manifest.runtime.to_dict()["quantization"]["recipe"] == "conv"


def test_auto_recipe_adds_the_conv_candidate(conv_bn_opset12: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    result = package(str(conv_bn_opset12), name="c", version=1, key=key, out_dir=tmp_path, target="onnxruntime",
                     precision="int8", calibration=_inputs())[0]  # fmt: skip
    _, report = _bundle(result)
    labels = [c["candidate"] for c in report["candidates"]]
    assert labels == ["per-tensor", "per-tensor-percentile", "per-channel", "per-channel-percentile",
                      "per-channel-conv", "per-channel-conv-percentile"]  # fmt: skip
    assert all(c["passed"] for c in report["candidates"])


def test_conv_recipe_refused_without_convolutions(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    from mixed_models import sensitive_inputs, write_sensitive_mlp

    from sdk.errors import PackagingError

    mlp = write_sensitive_mlp(tmp_path / "mlp.onnx")
    with pytest.raises(PackagingError, match="int8_recipe conv quantizes convolutions and this graph has none"):
        package(str(mlp), name="m", version=1, key=key, out_dir=tmp_path / "out", target="onnxruntime",
                precision="int8", calibration=sensitive_inputs(),
                options=PackageOptions(extra={"int8_recipe": "conv"}))  # fmt: skip


def test_the_search_rebuilds_only_the_chosen_variant(
    conv_bn_opset12: Path, key: Ed25519PrivateKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from packagers.targets import _ort_quant

    real, calls = _ort_quant.quantize_static_qdq, []

    def quantize(src: Path, dst: Path, feeds: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append((kwargs["per_channel"], kwargs.get("op_types"), kwargs["method"]))
        return real(src, dst, feeds, **kwargs)

    monkeypatch.setattr(_ort_quant, "quantize_static_qdq", quantize)
    options = PackageOptions(target_cosine=0.9999999, max_float_layers=2)  # unreachable: the search runs
    result = package(str(conv_bn_opset12), name="c", version=1, key=key, out_dir=tmp_path, target="onnxruntime",
                     precision="int8", calibration=_inputs(), options=options, accept_drift=True)[0]  # fmt: skip
    _, report = _bundle(result)
    mixed = report["build"]["mixed_precision"]
    plain = mixed["plain"]["candidate"]
    assert len(calls) > 6 and mixed["steps"]
    variant = (not plain.startswith("per-tensor"), ("Conv", "ConvTranspose") if "-conv" in plain else None,
               "percentile" if plain.endswith("-percentile") else "minmax")  # fmt: skip
    siblings = len(mixed.get("siblings", []))  # faster recipes rebuilt with the float layers found, after the search
    assert set(calls[6 : len(calls) - siblings]) == {variant}  # one build per probe and step, of the plain recipe
    assert {s["candidate"] for s in mixed["steps"] if "candidate" in s} == {plain}


def test_prepare_for_qdq_says_what_to_do_when_the_opset_cannot_be_raised(tmp_path: Path) -> None:
    from sdk.errors import PackagingError

    node = helper.make_node("NoSuchOp", ["x"], ["y"], name="odd")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])  # fmt: skip
    path = tmp_path / "odd.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), str(path))
    with pytest.raises(PackagingError, match=r"opset 12 -> 13 .* export the model at opset >= 13"):
        prepare_for_qdq(path, tmp_path / "out.onnx")


def test_a_bad_calibration_pin_is_refused(conv_bn_opset12: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    from sdk.errors import PackagingError

    options = PackageOptions(extra={"int8_calibration": "kl"})
    with pytest.raises(PackagingError, match="extra int8_calibration must be one of minmax, entropy, percentile"):
        package(str(conv_bn_opset12), name="c", version=1, key=key, out_dir=tmp_path, target="onnxruntime",
                precision="int8", calibration=_inputs(), options=options)  # fmt: skip
    assert list(tmp_path.iterdir()) == []
