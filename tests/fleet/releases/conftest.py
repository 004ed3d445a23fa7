"""Fixtures for the bundle repository: a migrated SQLite database, the fleet's keys, real signed bundles
(a small ONNX MLP, built with the kernel's writer), and the app with the releases routers wired.

The database is the shared ``db`` of tests/fleet/conftest.py: SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from releases_kit import CPU_RUNTIME, Api, BundleMaker, FleetKeys, mlp_onnx, npy_bytes, releases_app

from fleet.auth import create_token
from fleet.db import Database
from fleet.releases import ArtifactStore, ReleaseSettings
from sdk.bundle import write_bundle
from sdk.manifest import Manifest, TensorSpec


@pytest.fixture(scope="session")
def fleet_keys() -> FleetKeys:
    return FleetKeys(Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate())


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
        members = {"model.onnx": onnx_bytes, "golden/x.npy": npy_bytes(x), "golden/y.npy": npy_bytes(y)}
        write_bundle(out, manifest, members, [key or fleet_keys.signer])
        return out

    return make


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def settings(store: ArtifactStore, fleet_keys: FleetKeys) -> ReleaseSettings:
    return ReleaseSettings(store_dir=store.root, trusted_keys=fleet_keys.trust, max_upload_bytes=1_000_000)


@pytest.fixture
def api(db: Database, settings: ReleaseSettings) -> Iterator[Api]:
    with db.session() as session:
        write = create_token(session, "ci", "write")
        read = create_token(session, "viewer", "read")
    with TestClient(releases_app(db, settings)) as client:
        yield Api(client, {"Authorization": f"Bearer {write}"}, {"Authorization": f"Bearer {read}"})
