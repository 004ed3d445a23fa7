"""Session fixtures and helpers for the TFLite packager tests: a small Keras model, bundle checks."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import device_runtime
from packagers import PackageResult
from packagers.validation import cosine_per_sample
from sdk.signing import TrustedKeys


def keras_cnn(x: np.ndarray, y: np.ndarray) -> Any:
    """A small Keras CNN on [N, 8, 8, 1] digit images, trained for a moment (input ``pixels``, output ``logits``)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="pixels")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(10, name="logits")(h)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
    model.fit(x, y, epochs=5, batch_size=64, verbose=0)
    return model


def check_bundle(result: PackageResult, trust: TrustedKeys, inputs: Mapping[str, np.ndarray],
                 expected: Mapping[str, np.ndarray], min_cosine: float) -> dict[str, float]:  # fmt: skip
    """Load the bundle in the real runtime, pass its health check, and match ``expected`` per sample.

    The inputs run one fixed batch at a time; returns the worst cosine per output.
    """
    assert result.validation["passed"], result.validation["failures"]
    assert result.manifest.target == "tflite" and result.manifest.model == "model.tflite"
    with device_runtime.load(result.bundle_path, trust) as model:
        assert model.backend_info["backend"] == "tflite"
        assert model.backend_info["runtime"] == "ai-edge-litert"
        model.health_check()
        batch = result.manifest.inputs[0].shape[0]
        step = batch if isinstance(batch, int) else len(next(iter(inputs.values())))
        n = len(next(iter(inputs.values())))
        outs: dict[str, list[np.ndarray]] = {}
        for start in range(0, n - n % step, step):
            for k, v in model.predict({k: v[start : start + step] for k, v in inputs.items()}).items():
                outs.setdefault(k, []).append(v)
    worst = {}
    for k, parts in outs.items():
        got = np.concatenate(parts)
        cos = float(cosine_per_sample(got, expected[k][: len(got)]).min())
        assert cos >= min_cosine, (result.precision, k, cos)
        worst[k] = cos
    return worst


def bundle_member(result: PackageResult, trust: TrustedKeys, dest: Path, member: str) -> bytes:
    from sdk.bundle import read_bundle

    bundle = read_bundle(result.bundle_path, trust, dest)
    return bundle.path(member).read_bytes()
