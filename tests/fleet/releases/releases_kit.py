"""Helpers of the bundle-repository tests: the fleet's keys, a small ONNX MLP for real signed bundles, and
the app wired as the integrator wires it (imported by conftest.py and the tests)."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fleet.app import API_PREFIX, create_app
from fleet.db import Database
from fleet.releases import ReleaseSettings
from fleet.releases.artifacts import artifacts_router
from fleet.releases.routes import router
from sdk.signing import TrustedKeys

__all__ = ["CPU_RUNTIME", "Api", "BundleMaker", "FleetKeys", "mlp_onnx", "npy_bytes", "releases_app"]

BundleMaker = Callable[..., Path]
CPU_RUNTIME = {"package": "onnxruntime", "providers": ["CPUExecutionProvider"]}


@dataclass(frozen=True)
class FleetKeys:
    signer: Ed25519PrivateKey  # the key the fleet (and its devices) trust
    stranger: Ed25519PrivateKey  # a key nobody trusts

    @property
    def trust(self) -> TrustedKeys:
        return TrustedKeys((self.signer.public_key(),))


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def mlp_onnx(hidden: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """``relu(x @ w1) @ w2`` (64 -> hidden -> 10) as ONNX, with a golden input and output."""
    from onnx import TensorProto, checker, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((64, hidden)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((hidden, 10)) / 8).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    checker.check_model(model)
    x = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)
    return model.SerializeToString(), x, (np.maximum(x @ w1, 0) @ w2).astype(np.float32)


def releases_app(db: Database, settings: ReleaseSettings) -> FastAPI:
    """The app as the integrator wires it: the API under /api/v1, the artifacts at the root."""
    app = create_app(db)
    app.state.releases = settings
    app.include_router(router, prefix=API_PREFIX)
    app.include_router(artifacts_router)
    return app


@dataclass
class Api:
    client: TestClient
    write: dict[str, str]  # headers with a write token
    read: dict[str, str]  # headers with a read token
