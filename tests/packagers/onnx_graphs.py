"""Tiny ONNX graphs written the way third-party exporters write them, for the input-robustness tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Dim = int | str | None  # None: a dim with neither value nor name


def _value_info(name: str, dims: Sequence[Dim] | None) -> Any:
    """A float tensor value; ``dims`` None: no shape at all; a dim of -1 / 0 is stored as ``dim_value``."""
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
    if dims is None:
        return value
    shape = value.type.tensor_type.shape
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        elif isinstance(d, str):
            dim.dim_param = d
    return value


def linear_onnx(
    path: Path, *, x: str = "x", y: str = "y", x_dims: Sequence[Dim] | None = ("batch", 4),
    y_dims: Sequence[Dim] | None = ("batch", 3), opset: int = 17, external_data: bool = False, op: str = "MatMul",
) -> Path:  # fmt: skip
    """y = x @ W + B (4 -> 3), with the input/output names and dims given; W and B external if asked."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "B")
    if op == "Gemm":  # no MatMul in the graph
        nodes = [helper.make_node("Gemm", [x, "W", "B"], [y])]
    else:
        nodes = [helper.make_node("MatMul", [x, "W"], ["h"]), helper.make_node("Add", ["h", "B"], [y])]
    graph = helper.make_graph(nodes, "linear", [_value_info(x, x_dims)], [_value_info(y, y_dims)],
                              initializer=[w, b])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 18 else 10
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)  # fmt: skip
    else:
        onnx.save(model, str(path))
    return path


def image_onnx(path: Path) -> Path:
    """images [N, 3, H, W] + a constant [1, 3, 8, 8]: runs only at H = W = 8, which the graph does not say."""
    import onnx
    from onnx import helper, numpy_helper

    bias = numpy_helper.from_array(np.ones((1, 3, 8, 8), np.float32), "bias")
    graph = helper.make_graph(
        [helper.make_node("Add", ["images", "bias"], ["h"]), helper.make_node("Relu", ["h"], ["probs"])],
        "detector",
        [_value_info("images", ("N", 3, "H", "W"))],
        [_value_info("probs", ("N", 3, "H", "W"))],
        initializer=[bias],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
