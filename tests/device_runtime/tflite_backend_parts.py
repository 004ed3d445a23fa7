"""Tiny .tflite models built with the TensorFlow converter, and signed tflite bundles of them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sdk.bundle import write_bundle
from sdk.manifest import Manifest, TensorSpec, format_time

W = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(4, 3)
EMBED = np.arange(10, dtype=np.float32)


def reference(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """What the float model computes: x @ W + sum of a 10-entry embedding of the ids."""
    return x @ W + EMBED[ids].sum(axis=1, keepdims=True)


def float_model() -> bytes:
    """Inputs x float32 [-1, 4] and ids int32 [-1, 3] (signature names), output [-1, 3]; dynamic batch."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x"),
                                      tf.TensorSpec([None, 3], tf.int32, name="ids")])  # fmt: skip
        def serve(self, x: Any, ids: Any) -> Any:
            return {"output_0": tf.matmul(x, W) + tf.reduce_sum(tf.gather(EMBED, ids), axis=1, keepdims=True)}

    m = M()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([m.serve.get_concrete_function()], m)
    return bytes(conv.convert())


def int8_model() -> bytes:
    """x float [-1, 4] -> x @ W, fully int8 with int8 input and output tensors."""
    import tensorflow as tf

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x: Any) -> Any:
            return {"output_0": tf.matmul(x, W)}

    m = M()
    rng = np.random.default_rng(0)
    conv = tf.lite.TFLiteConverter.from_concrete_functions([m.serve.get_concrete_function()], m)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([rng.uniform(-1, 1, (1, 4)).astype(np.float32)] for _ in range(64))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    return bytes(conv.convert())


def io_quantization(model: bytes) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=model).get_signature_runner()
    (x,) = runner.get_input_details().values()
    (y,) = runner.get_output_details().values()
    return {
        "inputs": {
            "x": {"dtype": "int8", "scale": float(x["quantization"][0]), "zero_point": int(x["quantization"][1])}
        },
        "outputs": {
            "y": {"dtype": "int8", "scale": float(y["quantization"][0]), "zero_point": int(y["quantization"][1])}
        },
    }


def write_tflite_bundle(path: Path, private: Any, model: bytes, inputs: tuple[TensorSpec, ...],
                        outputs: tuple[TensorSpec, ...], runtime: Mapping[str, Any]) -> Path:  # fmt: skip
    from datetime import datetime, timezone

    manifest = Manifest(
        name=path.stem, version=1, target="tflite", precision="fp32", model="model.tflite", inputs=inputs,
        outputs=outputs, created=format_time(datetime(2025, 1, 1, tzinfo=timezone.utc)),
        runtime={"package": "ai-edge-litert", "signature": "serving_default", **runtime},
    )  # fmt: skip
    write_bundle(path, manifest, {"model.tflite": model}, [private])
    return path
