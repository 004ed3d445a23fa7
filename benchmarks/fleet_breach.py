"""A canary breach over 1,000 simulated devices: from the breaching telemetry at the broker to the rollback commands.

Used by ``fleet_scale.py`` (its ``rollout breach`` row); everything is the real server's parts, wired as
``edgeship fleet serve`` wires them (``fleet.server``): the ``fleet.ingest.Ingest`` storing status, events
and telemetry with ``on_stored`` waking the ``RolloutDriver`` built by ``fleet.wiring.rollout_driver``
(its ``PahoPublisher`` on the same broker). What it does:

1. ``fleet_sim.py`` processes start the devices (``--duration 0``: until SIGTERM) at ``rate`` telemetry
   messages/s each; the canary devices ``sim-00001..`` are ``--slow`` (their deployed model reports a p95
   of 12 ms against 3 ms for the one they run);
2. a real signed bundle of model ``sim`` version 2 (the kernel's ``write_bundle``, an ONNX MLP) is
   uploaded through ``fleet.releases.service.upload`` with the key the fleet trusts;
3. once every device is registered with its capabilities and has a baseline of telemetry, a rollout of
   ``sim:2`` to ``all`` with waves ``<canary>,100%`` and ``--gate p95_latency<=1.2x`` is created through
   ``fleet.rollouts.service.create_rollout`` (what ``POST /api/v1/rollouts`` calls), and the driver woken;
4. the canaries deploy, report slow telemetry, the ingest stores it and wakes the driver, whose tick
   finds the gate breached, pauses the rollout and publishes ``rollback`` to the canaries.

``BreachWatch`` (a plain subscriber to telemetry and cmd) stamps the first breaching telemetry and the
first rollback command on one clock; the figure is the difference. Target (issue 11): <= 1 s.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIM = HERE / "fleet_sim.py"
RELEASE = ("sim", 2)  # fleet_sim's model name; its devices run version 1
BASE_P95_MS, SLOW_P95_MS = 3.0, 12.0  # fleet_sim's defaults: the gate's previous and new p95


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def signed_bundle(folder: Path, key: Any) -> Path:
    """Model ``sim`` v2 for onnxruntime/fp32 (what fleet_sim's devices report they can run), signed with ``key``."""
    from _mlp import mlp_onnx, mlp_weights  # benchmarks/, on sys.path as the script's folder

    from sdk.bundle import write_bundle
    from sdk.manifest import Manifest, TensorSpec

    w1, w2 = mlp_weights(16, seed=RELEASE[1])
    runtime: Any = {"package": "onnxruntime", "providers": ["CPUExecutionProvider"]}  # the manifest's TypedDicts
    golden: Any = {"inputs": {"x": "golden/x.npy"}, "outputs": {"y": "golden/y.npy"},
                   "tolerance": {"atol": 1e-3, "rtol": 1e-3}}  # fmt: skip
    x = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)
    manifest = Manifest(
        name=RELEASE[0], version=RELEASE[1], target="onnxruntime", precision="fp32", model="model.onnx",
        inputs=(TensorSpec("x", "float32", ("batch", 64)),), outputs=(TensorSpec("y", "float32", ("batch", 10)),),
        created="2026-01-01T00:00:00Z", runtime=runtime, golden=golden,
    )  # fmt: skip
    y = (np.maximum(x @ w1, 0) @ w2).astype(np.float32)
    out = folder / "sim-2.edgebundle"
    write_bundle(out, manifest, {"model.onnx": mlp_onnx(w1, w2), "golden/x.npy": _npy(x), "golden/y.npy": _npy(y)},
                 [key])  # fmt: skip
    return out


def _start_sims(port: int, fleet: str, devices: int, processes: int, rate: float, slow: str) -> list[Any]:
    """The simulator processes, each past its ``ready`` line (every device connected and online)."""
    share, extra = divmod(devices, processes)
    procs, first = [], 1
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for index in range(processes):
        count = share + (1 if index < extra else 0)
        args = ["--port", str(port), "--devices", str(count), "--first", str(first), "--rate", str(rate),
                "--duration", "0", "--fleet", fleet, "--slow", slow, "--latency-ms", str(BASE_P95_MS),
                "--slow-latency-ms", str(SLOW_P95_MS)]  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(SIM), *args], stdout=subprocess.PIPE, text=True, env=env))
        first += count
    for proc in procs:
        line = proc.stdout.readline() if proc.stdout is not None else ""
        if not line or "ready" not in json.loads(line):
            _stop_sims(procs)
            raise RuntimeError(f"a simulator process did not start: {line!r}")
    return procs


def _stop_sims(procs: list[Any]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(what: str, ready: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


def run_breach(
    port: int, db_url: str, *, devices: int = 1000, processes: int = 2, rate: float = 1.0, canary: int = 10,
    baseline_s: float = 3.0, timeout_s: float = 60.0, fleet: str = "bench-breach", share_group: str = "bench",
) -> dict[str, Any]:  # fmt: skip
    """Run the breach once on a fresh database at ``db_url``; return the figures (seconds, counts).

    Raises:
        RuntimeError: a part did not start, or the rollout did not pause within ``timeout_s``.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from fleet_scale import BreachWatch
    from fleet_sim import device_id
    from sqlalchemy import func, select

    from fleet.db import Database, migrate
    from fleet.devices import service as devices_service
    from fleet.devices.tables import Device, Telemetry
    from fleet.ingest import Ingest, IngestSettings
    from fleet.releases.service import upload
    from fleet.releases.store import ArtifactStore
    from fleet.rollouts import service as rollouts
    from fleet.rollouts.spec import parse_spec
    from fleet.settings import FleetSettings
    from fleet.wiring import bundle_chooser, rollout_driver
    from sdk.signing import TrustedKeys

    db = Database(db_url)
    migrate(db)
    folder = Path(tempfile.mkdtemp(prefix="fleet-breach-"))
    key = Ed25519PrivateKey.generate()
    store = ArtifactStore(folder / "artifacts")
    upload(db, signed_bundle(folder, key), TrustedKeys((key.public_key(),)), store, now=time.time())
    settings = FleetSettings(
        state_dir=folder, db_url=db_url, broker_port=port, fleet=fleet, share_group=share_group,
        mqtt_client_id=f"bench-breach-{os.getpid()}", artifact_base_url="http://127.0.0.1:9",
        holder_id=f"bench-{os.getpid()}",
    )  # fmt: skip
    driver = rollout_driver(db, settings)
    ingest = Ingest(
        db, IngestSettings(host="127.0.0.1", port=port, fleet=fleet, share_group=share_group,
                           client_id=settings.mqtt_client_id), on_stored=driver.wake,
    )  # fmt: skip
    canaries = frozenset(device_id(i) for i in range(1, canary + 1))
    watch = procs = None
    ingest.start()
    try:
        if not ingest.wait_connected(20):
            raise RuntimeError("the ingest did not connect to the broker")
        driver.start()
        watch = BreachWatch(port, fleet, canaries, threshold_ms=1.2 * BASE_P95_MS)
        procs = _start_sims(port, fleet, devices, processes, rate, f"1-{canary}")

        def count(query: Any) -> int:
            with db.session() as session:
                return int(session.execute(query).scalar_one())

        registered = select(func.count()).select_from(Device).where(Device.model_version == 1)
        _wait(f"{devices} devices registered", lambda: count(registered) >= devices, 60)
        rows = select(func.count()).select_from(Telemetry)
        _wait("a baseline of telemetry", lambda: count(rows) >= devices * max(1.0, rate * baseline_s), 60)
        spec = parse_spec(f"{RELEASE[0]}:{RELEASE[1]}", "all", f"{canary},100%", soak="10m",
                          gates=["p95_latency<=1.2x"], rate_per_s=1000.0)  # fmt: skip
        created = time.time()
        with db.session() as session:
            rollout_id = rollouts.create_rollout(
                session, spec, devices_service.select_devices, bundle_chooser(settings), created
            )
        driver.wake()
        _wait("the rollback commands", lambda: watch.rollbacks >= canary, timeout_s)
        with db.session() as session:
            view = rollouts.rollout_view(session, rollout_id)
        latency = watch.latency_s
        if latency is None:
            raise RuntimeError("no breaching telemetry seen before the rollback")
        return {
            "latency_s": latency,
            "all_rollbacks_s": (watch.last_rollback or 0.0) - (watch.first_breach or 0.0),
            "create_to_breach_s": (watch.first_breach or 0.0) - created,
            "state": view["state"],
            "rollbacks": watch.rollbacks,
            "devices": devices,
            "canary": canary,
            "rate": rate,
            "ingest": ingest.counters,
        }
    finally:
        if procs is not None:
            _stop_sims(procs)
        if watch is not None:
            watch.close()
        driver.stop()
        close = getattr(driver.publisher, "close", None)
        if close is not None:
            close()
        ingest.stop()
        db.engine.dispose()
