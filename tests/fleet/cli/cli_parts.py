"""Real servers for the CLI tests: the whole fleet app (``create_fleet_app`` with the rollout routes wired)
served by uvicorn on a free port over a migrated SQLite file, real signed bundles, and devices.

The devices are registered the way the ingest registers them (``record_messages`` with the contract's
``status`` payloads). ``Devices`` stands at the far end of the broker for the rollout driver: each command
the driver publishes is answered with the events and telemetry a device's agent sends back, stored through
the same devices service the ingest uses, so a rollout moves wave by wave as it does in production.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import count
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "releases"))

from fleet_parts import event, incoming, model, status, telemetry
from releases_kit import CPU_RUNTIME, mlp_onnx, npy_bytes

from fleet.app import create_fleet_app
from fleet.auth import create_token
from fleet.db import Database, migrate
from fleet.devices.service import record_messages
from fleet.rollouts.driver import RolloutDriver
from fleet.settings import FleetSettings
from fleet.wiring import DevicesObserver, wire_rollouts
from sdk.bundle import write_bundle
from sdk.manifest import Manifest, TensorSpec
from sdk.signing import generate_keypair, load_private_key

__all__ = [
    "Devices",
    "driving",
    "fleet_settings",
    "keypair",
    "make_bundle",
    "migrated_db",
    "register",
    "serve_app",
    "serve_fleet",
    "token",
]


def migrated_db(path: Any) -> Database:
    db = Database(f"sqlite:///{path}")
    migrate(db)
    return db


def token(db: Database, scope: str, name: str = "t") -> str:
    with db.session() as session:
        return create_token(session, name, scope)


@contextmanager
def serve_app(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on 127.0.0.1:<free port>; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def fleet_settings(state_dir: Path, trusted: Sequence[Path], max_upload_bytes: int = 1_000_000) -> FleetSettings:
    return FleetSettings(
        state_dir=state_dir, trusted_keys=tuple(trusted), max_upload_bytes=max_upload_bytes, fleet="testfleet",
        artifact_base_url="http://artifacts.test",
    )  # fmt: skip


@contextmanager
def serve_fleet(db: Database, settings: FleetSettings, driver: RolloutDriver | None) -> Iterator[str]:
    """The app ``edgeship fleet serve`` runs (every domain's routes, rollouts wired to ``driver``)."""
    app = create_fleet_app(db, settings)
    wire_rollouts(app, settings, driver)
    with serve_app(app) as url:
        yield url


def keypair(folder: Path) -> tuple[Path, Path]:
    """(private, public) key files, as ``edgeship keygen`` writes them."""
    return generate_keypair(folder, "release")


def make_bundle(out: Path, key_file: Path, *, name: str = "digits", version: int = 2) -> Path:
    """A real signed bundle (a small ONNX MLP) for the CPU onnxruntime the test devices report."""
    onnx_bytes, x, y = mlp_onnx(16, seed=version)
    manifest = Manifest(
        name=name, version=version, target="onnxruntime", precision="fp32", model="model.onnx",
        inputs=(TensorSpec("x", "float32", ("batch", 64)),), outputs=(TensorSpec("y", "float32", ("batch", 10)),),
        created="2026-01-01T00:00:00Z", runtime=CPU_RUNTIME,
        golden={"inputs": {"x": "golden/x.npy"}, "outputs": {"y": "golden/y.npy"},
                "tolerance": {"atol": 1e-3, "rtol": 1e-3}},
    )  # fmt: skip
    members = {"model.onnx": onnx_bytes, "golden/x.npy": npy_bytes(x), "golden/y.npy": npy_bytes(y)}
    write_bundle(out, manifest, members, [load_private_key(key_file)])
    return out


def register(db: Database, device_id: str, *, version: int = 1, at: float | None = None, **extra: Any) -> None:
    """A device as the ingest records its first ``status`` (running digits v``version``)."""
    now = time.time() if at is None else at
    with db.session() as s:
        record_messages(s, [incoming(device_id, "status", status(now, version=version, **extra), now)])


class Devices:
    """The devices at the far end of the broker (the driver's ``Publisher``): a deploy is answered with the
    agent's events (``received`` ... ``active``, or ``failed`` for a device in ``failing``), then a status
    on the new version and a telemetry window; a rollback with ``rolled_back``."""

    def __init__(self, db: Database, failing: Sequence[str] = ()) -> None:
        self.db, self.failing = db, set(failing)
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self._seq = count(1)

    def publish(self, device_id: str, payload: Mapping[str, Any]) -> None:
        self.sent.append((device_id, dict(payload)))
        now = time.time()
        cmd_id = str(payload["id"])
        if payload["type"] == "rollback":
            phases = ["received", "rolled_back"]
        elif device_id in self.failing:
            phases = ["received", "downloading", "verifying", "failed"]
        else:
            phases = ["received", "downloading", "verifying", "staged", "active"]
        version = int(payload.get("version") or 0)
        detail = {"model": model(version=version)} if phases[-1] == "active" else {}
        messages = [
            incoming(device_id, "events", event(cmd_id, p, now + i * 1e-3, **(detail if p == phases[-1] else {})),
                     now + i * 1e-3)
            for i, p in enumerate(phases)
        ]  # fmt: skip
        if phases[-1] == "active":
            messages.append(incoming(device_id, "status", status(now + 0.01, version=version), now))
            seq = next(self._seq)
            messages.append(incoming(device_id, "telemetry", telemetry(seq, ts=now + 0.02, version=version), now))
        with self.db.session() as s:
            record_messages(s, messages)


@contextmanager
def driving(db: Database, devices: Devices) -> Iterator[RolloutDriver]:
    """A rollout driver as ``fleet.wiring.rollout_driver`` builds it, with ``devices`` as its publisher, running."""
    driver = RolloutDriver(db, devices, DevicesObserver(), "cli-test", lease_s=5.0, tick_s=0.05)
    driver.start()
    try:
        yield driver
    finally:
        driver.stop()
