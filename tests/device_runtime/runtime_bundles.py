"""Building real signed bundles for the device runtime tests, without the packagers.

Two tiny ONNX models made with ``onnx.helper``:

- ``linear``: ``y = x @ W + b``, input ``x`` float32 ``["batch", 4]``, output ``y`` float32 ``["batch", 3]``;
- ``masked_sum``: ``total = sum(input_ids * attention_mask, axis=1)`` with ``input_ids`` int64 and
  ``attention_mask`` int32, both ``["batch", "sequence"]``, output ``total`` float32 ``["batch"]``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from sdk.manifest import TensorSpec

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10.0
B = np.array([0.5, -1.0, 2.0], dtype=np.float32)
GOLDEN_X = np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(2, 4)
CREATED = datetime(2026, 1, 1, tzinfo=timezone.utc)


def linear_reference(x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, dtype=np.float32) @ W + B).astype(np.float32)


def _to_bytes(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeship-tests")
    model.ir_version = 8  # readable by every onnxruntime this project supports
    onnx.checker.check_model(model)
    return model.SerializeToString()


def linear_onnx() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "b")],
    )
    return _to_bytes(graph)


def masked_sum_onnx() -> bytes:
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ids_f", "mask_f"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axes"], ["total"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "masked_sum",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT32, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch"])],
        initializer=[numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    return _to_bytes(graph)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


LINEAR_SPECS = {
    "inputs": [TensorSpec("x", "float32", ("batch", 4))],
    "outputs": [TensorSpec("y", "float32", ("batch", 3))],
}
MASKED_SPECS = {
    "inputs": [
        TensorSpec("input_ids", "int64", ("batch", "sequence")),
        TensorSpec("attention_mask", "int32", ("batch", "sequence")),
    ],
    "outputs": [TensorSpec("total", "float32", ("batch",))],
}


@dataclass(frozen=True)
class Keys:
    private: Ed25519PrivateKey
    public: Path  # the trusted key file
    other_public: Path  # a valid key file nobody signed with


BundleMaker = Callable[..., Path]
