"""One rollout driver tick during a wave's soak, on SQLite, with many devices and an hour of telemetry.

What a tick costs while a wave soaks (the longest phase: every 0.2 s for ``--soak``, 5 minutes by default):
the driver reads the wave's telemetry of the new version and, for the relative latency gate, the baseline
(the previous version on the same devices in the hour before the wave). The script fills a fresh SQLite
database with ``--devices`` devices, each with ``--windows`` telemetry windows of model ``m`` version 1 in
the hour before the wave and a few of version 2 after it, creates a rollout of ``m:2`` to all of them in one
wave with ``--gate p95_latency<=1.2x``, drives it (the real ``RolloutDriver`` and the real devices domain
behind ``fleet.wiring.DevicesObserver``; only the command events are made up: every deploy is answered
``active`` at once) until the wave soaks, then times ``--ticks`` ticks.

    python benchmarks/fleet_tick.py [--devices 1000] [--windows 360] [--ticks 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from fleet.db import Database, migrate  # noqa: E402
from fleet.devices.tables import Telemetry  # noqa: E402
from fleet.rollouts import service  # noqa: E402
from fleet.rollouts.driver import RolloutDriver  # noqa: E402
from fleet.rollouts.service import BundleRef  # noqa: E402
from fleet.rollouts.spec import parse_spec  # noqa: E402
from fleet.wiring import DevicesObserver  # noqa: E402

SHA = "ab" * 32


class Answering(DevicesObserver):
    """The real devices domain, except that every command was answered ``active`` and every device ran m:1."""

    def phases(self, session: Session, cmd_ids: Sequence[str]) -> Mapping[str, frozenset[str]]:
        return dict.fromkeys(cmd_ids, frozenset({"received", "active"}))

    def active_models(self, session: Session, device_ids: Sequence[str]) -> Mapping[str, tuple[str, int]]:
        return dict.fromkeys(device_ids, ("m", 1))


class NoPublisher:
    def publish(self, device_id: str, payload: Mapping[str, Any]) -> None:
        pass


def fill(db: Database, devices: list[str], windows: int, start: float) -> None:
    rows: list[dict[str, Any]] = []
    with db.session() as session:
        for i, device in enumerate(devices):
            for w in range(windows):  # version 1 across the hour before the wave
                at = start - 3600 + (w + 0.5) * 3600 / windows
                rows.append(_row(device, w, at, 1, 3.0 + (i % 7) * 0.1))
            for w in range(5):  # version 2 after it
                rows.append(_row(device, windows + w, start + 5 + w, 2, 3.2))
            if len(rows) >= 50_000:
                session.execute(insert(Telemetry), rows)
                rows = []
        if rows:
            session.execute(insert(Telemetry), rows)


def _row(device: str, seq: int, at: float, version: int, p95: float) -> dict[str, Any]:
    return {
        "device_id": device, "seq": seq, "ts": at, "window_s": 10.0, "count": 100, "errors": 0, "p50_ms": p95 / 2,
        "p95_ms": p95, "p99_ms": p95 * 1.5, "model_name": "m", "model_version": version, "model_sha256": None,
        "rss_mb": None, "cpu_pct": None, "temperature_c": None, "dropped": 0, "received_at": at,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--windows", type=int, default=360, help="telemetry windows per device in the hour")
    parser.add_argument("--ticks", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        db = Database(f"sqlite:///{Path(folder) / 'fleet.db'}")
        migrate(db)
        devices = [f"d{i:05d}" for i in range(args.devices)]
        start = 1_700_000_000.0
        t0 = time.perf_counter()
        fill(db, devices, args.windows, start)
        print(f"filled {args.devices * (args.windows + 5):,} telemetry rows in {time.perf_counter() - t0:.1f} s")
        spec = parse_spec("m:2", "all", "100%", soak="1h", gates=["p95_latency<=1.2x"], rate_per_s=10_000)
        with db.session() as session:
            service.create_rollout(
                session, spec, lambda _s, _sel: devices,
                lambda _s, _n, _v, _d: BundleRef(SHA, "http://fleet.test/a.edgebundle", 1), start - 1,
            )  # fmt: skip
        driver = RolloutDriver(db, NoPublisher(), Answering(), "bench", lease_s=60)
        now = start
        for _ in range(4):  # start the wave, send every deploy, see them active, start the soak
            driver.tick(now)
            now += 1
        with db.session() as session:
            state = service.load_state(session, 1)
        assert state.soak_since is not None, "the wave did not reach its soak"
        now += 30  # well into the soak
        times = []
        for _ in range(args.ticks):
            now += 0.2
            t = time.perf_counter()
            driver.tick(now)
            times.append((time.perf_counter() - t) * 1000)
        times.sort()
        print(
            f"{args.devices} devices, {args.ticks} ticks in the soak: median {statistics.median(times):.1f} ms, "
            f"min {times[0]:.1f} ms, max {times[-1]:.1f} ms"
        )
        db.close()


if __name__ == "__main__":
    main()
