"""Fixtures for the bundle repository: a migrated SQLite database, the fleet's keys, real signed bundles
(a small ONNX MLP, built with the kernel's writer), and the app with the releases routers wired.

Local to this folder until the shared tests/fleet/conftest.py (with PostgreSQL) takes over ``db``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fleet.app import API_PREFIX, create_app
from fleet.auth import create_token
from fleet.db import Database, migrate
from fleet.releases import ArtifactStore, ReleaseSettings
from fleet.releases.artifacts import artifacts_router
from fleet.releases.routes import router
from sdk.bundle import write_bundle
from sdk.manifest import Manifest, TensorSpec
from sdk.signing import TrustedKeys

BundleMaker = Callable[..., Path]
CPU_RUNTIME = {"package": "onnxruntime", "providers": ["CPUExecutionProvider"]}


@dataclass(frozen=True)
class FleetKeys:
    signer: Ed25519PrivateKey  # the key the fleet (and its devices) trust
    stranger: Ed25519PrivateKey  # a key nobody trusts

    @property
    def trust(self) -> TrustedKeys:
        return TrustedKeys((self.signer.public_key(),))


@pytest.fixture(scope="session")
def fleet_keys() -> FleetKeys:
    return FleetKeys(Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate())


def _npy(a: np.ndarray) -> bytes:
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


@pytest.fixture(scope="session")
def make_bundle(tmp_path_factory: pytest.TempPathFactory, fleet_keys: FleetKeys) -> BundleMaker:
    """``make_bundle(version=1, precision="fp32", target="onnxruntime", runtime={...}, key=..., **manifest)``:
    a signed bundle file (a fresh path per call)."""
    folder = tmp_path_factory.mktemp("bundles")
    counter = iter(range(10**6))

    def make(
        *,
        name: str = "mlp",
        version: int = 1,
        target: str = "onnxruntime",
        precision: str = "fp32",
        runtime: dict[str, Any] | None = None,
        key: Ed25519PrivateKey | None = None,
        hidden: int = 16,
        **fields: Any,
    ) -> Path:
        onnx_bytes, x, y = mlp_onnx(hidden, seed=version)
        manifest = Manifest(
            name=name,
            version=version,
            target=target,
            precision=precision,
            model="model.onnx",
            inputs=(TensorSpec("x", "float32", ("batch", 64)),),
            outputs=(TensorSpec("y", "float32", ("batch", 10)),),
            created="2026-01-01T00:00:00Z",
            runtime=runtime if runtime is not None else CPU_RUNTIME,
            golden={"inputs": {"x": "golden/x.npy"}, "outputs": {"y": "golden/y.npy"},
                    "tolerance": {"atol": 1e-3, "rtol": 1e-3}},
            **fields,
        )  # fmt: skip
        out = folder / f"{name}-{version}-{target}-{precision}-{next(counter)}.edgebundle"
        members = {"model.onnx": onnx_bytes, "golden/x.npy": _npy(x), "golden/y.npy": _npy(y)}
        write_bundle(out, manifest, members, [key or fleet_keys.signer])
        return out

    return make


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    migrate(database)
    yield database
    database.close()


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def settings(store: ArtifactStore, fleet_keys: FleetKeys) -> ReleaseSettings:
    return ReleaseSettings(store_dir=store.root, trusted_keys=fleet_keys.trust, max_upload_bytes=1_000_000)


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


@pytest.fixture
def api(db: Database, settings: ReleaseSettings) -> Iterator[Api]:
    with db.session() as session:
        write = create_token(session, "ci", "write")
        read = create_token(session, "viewer", "read")
    with TestClient(releases_app(db, settings)) as client:
        yield Api(client, {"Authorization": f"Bearer {write}"}, {"Authorization": f"Bearer {read}"})
