"""The small MLP the device-side benchmarks deploy and time (64 -> hidden -> 10, ReLU), as ONNX."""

from __future__ import annotations

import numpy as np


def mlp_weights(hidden: int, seed: int, inputs: int = 64, outputs: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 weights of the two layers (``seed`` makes versions of a model differ)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((inputs, hidden)).astype(np.float32) / 8
    w2 = rng.standard_normal((hidden, outputs)).astype(np.float32) / 8
    return w1, w2


def mlp_onnx(w1: np.ndarray, w2: np.ndarray, output: str = "y") -> bytes:
    """``relu(x @ w1) @ w2`` as a checked ONNX model with input ``x`` and a dynamic batch (needs ``onnx``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], [output]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w1.shape[0]])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", w2.shape[1]])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnxruntime builds of the last few years read it
    onnx.checker.check_model(model)
    return model.SerializeToString()
