"""The exact CPU rewrites of ``packagers.targets._onnx_rewrite`` on small graphs written as exporters write them.

Each graph is run by onnxruntime before and after: the outputs must agree to float rounding, and only
the patterns the module names may change (a scalar affine before a padded convolution must stay, a
convolution whose output another node also reads must keep its own output).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper
from packager_checks import open_bundle

from packagers import package
from packagers.targets._onnx_rewrite import simplify_for_cpu
from sdk.signing import TrustedKeys

RNG = np.random.default_rng(0)


def _const(name: str, value: Any) -> Any:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _constant_node(name: str, value: Any) -> Any:  # paddle2onnx holds scalars in Constant nodes
    return helper.make_node("Constant", [], [name], value=_const(name, value))


def _hard_swish(x: str, out: str, tag: str, div_first: bool, opset: int) -> list[Any]:
    three, six = f"{tag}_three", f"{tag}_six"
    nodes = [_constant_node(three, 3.0), _constant_node(six, 6.0), helper.make_node("Add", [x, three], [f"{tag}_a"])]
    if opset >= 11:
        nodes += [_constant_node(f"{tag}_lo", 0.0),
                  helper.make_node("Clip", [f"{tag}_a", f"{tag}_lo", six], [f"{tag}_c"])]  # fmt: skip
    else:
        nodes += [helper.make_node("Clip", [f"{tag}_a"], [f"{tag}_c"], min=0.0, max=6.0)]
    if div_first:  # clip(x + 3) / 6 * x
        nodes += [
            helper.make_node("Div", [f"{tag}_c", six], [f"{tag}_d"]),
            helper.make_node("Mul", [f"{tag}_d", x], [out]),
        ]
    else:  # x * clip(x + 3) / 6, paddle2onnx's order
        nodes += [
            helper.make_node("Mul", [x, f"{tag}_c"], [f"{tag}_m"]),
            helper.make_node("Div", [f"{tag}_m", six], [out]),
        ]
    return nodes


def _cnn(path: Path, opset: int = 13) -> Path:
    """conv -> *s +b(per channel) -> hard-swish -> *s +b -> 1x1 conv -> hard-swish -> *s +b -> padded 3x3 conv."""
    inits = [
        _const("w1", RNG.normal(size=(8, 3, 3, 3))), _const("b1", RNG.normal(size=8)),
        _const("s1", [1.7]), _const("t1", RNG.normal(size=(1, 8, 1, 1))),
        _const("w2", RNG.normal(size=(6, 8, 1, 1))), _const("b2", RNG.normal(size=6)),
        _const("w3", RNG.normal(size=(4, 6, 3, 3))),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["s1", "c1"], ["m1"], name="scale1"),
        helper.make_node("Add", ["m1", "t1"], ["a1"], name="shift1"),
        *_hard_swish("a1", "h1", "hs1", div_first=False, opset=opset),
        _constant_node("s2", 0.8),
        _constant_node("t2", -0.3),
        helper.make_node("Mul", ["h1", "s2"], ["m2"], name="lab_scale"),
        helper.make_node("Add", ["m2", "t2"], ["a2"], name="lab_shift"),
        helper.make_node("Conv", ["a2", "w2", "b2"], ["c2"], name="pointwise"),
        *_hard_swish("c2", "h2", "hs2", div_first=True, opset=opset),
        _constant_node("s3", 1.3),
        _constant_node("t3", 0.4),
        helper.make_node("Mul", ["h2", "s3"], ["m3"], name="padded_scale"),
        helper.make_node("Add", ["m3", "t3"], ["a3"], name="padded_shift"),
        helper.make_node("Conv", ["a3", "w3"], ["y"], name="padded", pads=[1, 1, 1, 1]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])
    graph = helper.make_graph(nodes, "cnn", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # compare the graphs, not ORT's fusions
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node if n.op_type != "Constant"]


@pytest.mark.parametrize("opset", [10, 13])
def test_rewrites_keep_the_outputs_and_drop_the_element_wise_ops(opset: int, tmp_path: Path) -> None:
    src = _cnn(tmp_path / "cnn.onnx", opset)
    dst, counts = simplify_for_cpu(src, tmp_path / "simplified.onnx")
    assert dst != src
    assert counts == {"conv_affine": 2, "hard_swish": 2, "affine_into_pointwise": 1}
    assert _ops(dst) == ["Conv", "HardSigmoid", "Mul", "Conv", "HardSigmoid", "Mul", "Mul", "Add", "Conv"]
    nodes = {n.name: n for n in onnx.load(str(dst)).graph.node}
    assert "padded_scale" in nodes and "padded_shift" in nodes  # a padded conv would see the shift at its borders
    assert nodes["pointwise"].input[0] == "h1"  # the hard-swish output, the affine folded into the 1x1 conv
    x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32) * 3
    before, after = _run(src, x), _run(dst, x)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * float(np.abs(before).max()))


def test_a_graph_without_the_patterns_is_returned_as_is(tmp_path: Path) -> None:
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              [_const("w", np.ones((4, 2)))])  # fmt: skip
    src = tmp_path / "mm.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(src))
    assert simplify_for_cpu(src, tmp_path / "out.onnx") == (src, {})
    assert not (tmp_path / "out.onnx").exists()


def test_a_conv_output_read_twice_or_returned_is_not_folded(tmp_path: Path) -> None:
    inits = [_const("w", RNG.normal(size=(4, 3, 1, 1))), _const("s", [2.0])]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Mul", ["c", "s"], ["y"], name="scale"),  # c is also a graph output
        helper.make_node("Conv", ["x", "w"], ["d"], name="conv2"),
        helper.make_node("Mul", ["d", "s"], ["z"], name="scale2"),
        helper.make_node("Relu", ["d"], ["r"], name="relu"),  # d read twice
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("c", "y", "z", "r")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              outputs, inits)  # fmt: skip
    src = tmp_path / "g.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(src))
    assert simplify_for_cpu(src, tmp_path / "out.onnx") == (src, {})


def test_the_packaged_graph_is_the_rewritten_one_and_says_so(key: Ed25519PrivateKey, trust: TrustedKeys,
                                                             tmp_path: Path) -> None:  # fmt: skip
    src = _cnn(tmp_path / "cnn.onnx")
    x = RNG.normal(size=(8, 3, 8, 8)).astype(np.float32)
    result = package(str(src), name="cnn", version=1, key=key, out_dir=tmp_path / "out", target="onnxruntime",
                     precision="fp32", calibration={"x": x})[0]  # fmt: skip
    assert result.validation["passed"]
    bundle = open_bundle(result, trust, tmp_path / "open")
    report = json.loads(bundle.path("report.json").read_bytes())
    assert report["build"]["export"]["cpu_rewrites"] == {"conv_affine": 2, "hard_swish": 2,
                                                         "affine_into_pointwise": 1}  # fmt: skip
    model = onnx.load_model_from_string(bundle.path("model.onnx").read_bytes())
    assert "HardSigmoid" in {n.op_type for n in model.graph.node}


def test_batch_norm_is_folded_so_float16_keeps_large_variances(tmp_path: Path) -> None:
    from packagers.targets._ort_quant import convert_fp16

    # outputs in the thousands before the batch norm, variances past float16's 65504 (as in PP-OCRv4's head)
    inits = [
        _const("w", RNG.normal(size=(4, 3, 3, 3)) * 300), _const("g", [1.0, 0.5, 2.0, 1.0]),
        _const("b", [0.1, -0.2, 0.0, 0.3]), _const("m", [300.0, -200.0, 0.0, 0.5]),
        _const("v", [1e8, 4e7, 2e6, 1e5]),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn", epsilon=1e-5),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])
    src = tmp_path / "bn.onnx"
    graph = helper.make_graph(nodes, "bn", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, str(src))
    dst, counts = simplify_for_cpu(src, tmp_path / "folded.onnx")
    assert counts == {"conv_affine": 1} and _ops(dst) == ["Conv"]
    feed = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)
    before = _run(src, feed)
    np.testing.assert_allclose(_run(dst, feed), before, rtol=1e-4, atol=1e-4 * float(np.abs(before).max()))

    def fp16_error(path: Path) -> float:
        half = tmp_path / f"half-{path.name}"
        convert_fp16(path, half)
        return float(np.abs(_run(half, feed) - before).max() / np.abs(before).max())

    assert fp16_error(src) > 0.05  # the variances become inf in float16
    assert fp16_error(dst) < 0.01


def test_the_rewrite_runs_once_per_export(
    key: Ed25519PrivateKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import packagers.targets.onnxruntime as ort_target

    calls: list[Path] = []

    def counted(src: Path, dst: Path) -> tuple[Path, dict[str, Any]]:
        calls.append(src)
        return simplify_for_cpu(src, dst)

    monkeypatch.setattr(ort_target, "simplify_for_cpu", counted)
    src = _cnn(tmp_path / "cnn.onnx")
    x = RNG.normal(size=(16, 3, 8, 8)).astype(np.float32)
    results = package(str(src), name="cnn", version=1, key=key, out_dir=tmp_path / "out", target="onnxruntime",
                      precision=["fp32", "int8"], calibration={"x": x}, accept_drift=True)  # fmt: skip
    assert [r.precision for r in results] == ["fp32", "int8"]
    assert len(calls) == 1  # six int8 candidates and the fp32 build share one rewritten graph
