"""A tiny ONNX MLP whose first layer int8 ruins: the mixed-precision search must find it.

Input feature 0 is 300x smaller than the others and ``fc1``'s weights on it 300x larger, so its
contribution is ordinary; but int8 of ``fc1`` (per-tensor activations, weights per channel or not)
rounds feature 0 and every other weight of a row to a few levels. The other layers quantize well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SENSITIVE = "fc1"
LAYERS = ("fc1", "fc2", "fc3", "fc4")


def write_sensitive_mlp(path: Path, tokens: int | None = None) -> Path:
    """``x [batch, 16] -> y [batch, 8]`` (``[batch, tokens, ...]`` with ``tokens``): MatMul+Add layers fc1..fc4.

    On 2-D inputs onnxruntime's pre-processing fuses each MatMul+Add into a Gemm named ``fcN/MatMulAddFusion``;
    on 3-D inputs the MatMuls stay (what SmoothQuant smooths).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    sizes = [16, 32, 32, 32, 8]
    nodes, inits = [], []
    prev = "x"
    for i, name in enumerate(LAYERS):
        last = i == len(LAYERS) - 1
        w = (rng.standard_normal((sizes[i], sizes[i + 1])) / np.sqrt(sizes[i])).astype(np.float32)
        if name == SENSITIVE:
            w[0, :] *= 300.0  # feature 0 is 300x smaller
        b = ((0.3 if last else 0.1) * rng.standard_normal(sizes[i + 1])).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")]
        out = "y" if last else f"{name}.out"
        nodes.append(helper.make_node("MatMul", [prev, f"{name}.w"], [f"{name}.mm"], name=name))
        nodes.append(helper.make_node("Add", [f"{name}.mm", f"{name}.b"], [out if last else f"{name}.pre"],
                                      name=f"{name}_bias"))  # fmt: skip
        if not last:
            nodes.append(helper.make_node("Relu", [f"{name}.pre"], [out], name=f"{name}_relu"))
        prev = out
    lead = ["batch"] if tokens is None else ["batch", tokens]
    graph = helper.make_graph(
        nodes, "sensitive_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead, 8])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(path))
    return path


def sensitive_inputs(n: int = 48, tokens: int | None = None) -> dict[str, np.ndarray]:
    """Calibration and validation samples: feature 0 at 1/300 of the others' scale."""
    shape = (n, 16) if tokens is None else (n, tokens, 16)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    x[..., 0] /= 300.0
    return {"x": x}
