"""Helpers shared by the packager tests: open a written bundle the way a device would and run it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sklearn.datasets import load_digits

from packagers import PackageResult
from packagers.validation import cosine_per_sample
from sdk.bundle import VerifiedBundle, read_bundle
from sdk.golden import check_golden
from sdk.signing import TrustedKeys


def open_bundle(result: PackageResult, trust: TrustedKeys, dest: Path) -> VerifiedBundle:
    """Verify and extract a bundle; its manifest must be the one package() returned."""
    assert result.bundle_path.is_file()
    assert result.size_bytes == result.bundle_path.stat().st_size
    bundle = read_bundle(result.bundle_path, trust, dest)
    assert bundle.manifest == result.manifest
    assert dict(result.validation) == dict(bundle.manifest.validation)
    return bundle


def session(bundle: VerifiedBundle) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(bundle.path(bundle.manifest.model)), opts, providers=["CPUExecutionProvider"])


def run(bundle: VerifiedBundle, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = session(bundle)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(inputs)), strict=True))


def golden(bundle: VerifiedBundle) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    g = bundle.manifest.golden
    inputs = {k: np.load(bundle.path(p), allow_pickle=False) for k, p in g["inputs"].items()}
    outputs = {k: np.load(bundle.path(p), allow_pickle=False) for k, p in g["outputs"].items()}
    return inputs, outputs


def assert_golden_healthy(bundle: VerifiedBundle) -> None:
    """The on-device health check: a fresh session reproduces the golden outputs within tolerance."""
    m = bundle.manifest
    assert set(m.golden["inputs"]) == {t.name for t in m.inputs}
    assert set(m.golden["outputs"]) == {t.name for t in m.outputs}
    assert set(m.golden["tolerance"]) >= {"atol", "rtol", "min_cosine"}
    inputs, outputs = golden(bundle)
    assert check_golden(run(bundle, inputs), outputs, m.golden["tolerance"]) == []


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(cosine_per_sample(a, b).min())


class Digits:
    """The 8x8 digits, scaled to [0, 1]: a train split and a held-out validation split."""

    def __init__(self) -> None:
        x, y = load_digits(return_X_y=True)
        self.x = (x / 16.0).astype(np.float32)
        self.y = y.astype(np.int64)
        self.x_train, self.y_train = self.x[:1400], self.y[:1400]
        self.x_val, self.y_val = self.x[1400:1600], self.y[1400:1600]
