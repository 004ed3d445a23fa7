"""The fleet server at scale: simulated devices through Mosquitto into a bare subscriber and the fleet ingest.

    .venv/bin/python benchmarks/fleet_scale.py [--devices 1000] [--rate 10] [--duration 10] [--sim-processes 2]
                                               [--skip-postgres]

Everything runs on this machine, on loopback: a Mosquitto of its own (no persistence, no connection cap,
a large queue per client), ``--sim-processes`` processes of ``fleet_sim.py`` sharing ``--devices`` simulated
devices, and the consumer under test in this process. Each measurement drives the same load (devices x
rate for ``--duration`` seconds, QoS 1) into one consumer with a shared subscription
(``$share/<group>/edgeship/v1/<fleet>/+/telemetry``, what the ingest uses) and a persistent session:

- **bare pipe**: a paho subscriber that only counts messages; the ceiling the ingest is compared with;
- **ingest, SQLite / PostgreSQL**: ``fleet.ingest`` storing telemetry rows (imported lazily; a row says
  "not built" while it does not exist). PostgreSQL is a throwaway cluster (``initdb``/``pg_ctl`` as the
  ``postgres`` user in a temporary folder, 127.0.0.1 on a free port), removed at the end;
- **rollout breach**: ``measure_rollout_breach``, a hook the rollout engine fills in.

Every measurement sends the same messages: each device publishes ``rate x duration`` telemetry messages
at up to ``rate`` per second (slower when the machine is saturated; the run is capped at 3x ``duration`` +
30 s). Rate = messages delivered (counted, or rows in the telemetry table) / seconds from the first
telemetry publish to the last delivery, so a consumer that falls behind and catches up from the broker's
queue is charged for it; the devices' own send rate is shown beside it (when it is the lower one, the
simulators, not the consumer, were the limit). Lost = telemetry the broker acknowledged to the devices
minus what was delivered (a consumer gets ``--settle`` seconds without progress after the devices stop).
Targets: no loss at QoS 1, ingest >= 0.8x the bare pipe of the same run. Exit 1 when a target is missed
or the bare pipe did not run.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
SIM = Path(__file__).with_name("fleet_sim.py")
PG_BIN = Path("/usr/lib/postgresql/15/bin")
SHARE_GROUP = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_header() -> str:
    """CPU model, cores and the vector flags that matter for inference (the house style of the benchmarks)."""
    model, flags = "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16")
    shown = ",".join(f for f in wanted if f in flags) or "none of avx2/avx512/vnni/bf16"
    return f"{model}, {os.cpu_count()} CPUs, flags {shown}"


def _wait_port(port: int, proc: subprocess.Popen[Any], what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s} s")


@contextlib.contextmanager
def mosquitto(folder: Path) -> Iterator[int]:
    """A Mosquitto for the run; yields its port. ``max_inflight_messages 0`` lifts the 20-message window
    per MQTT 3.1.1 client, which an ingest that acknowledges after its batch commits would otherwise stall on."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    settings = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        "max_connections -1",
        "max_queued_messages 2000000",
        "max_inflight_messages 0",
        "set_tcp_nodelay true",
        f"user {getpass.getuser()}",  # as root it would drop to "mosquitto" otherwise
    ]
    (folder / "mosquitto.conf").write_text("\n".join(settings) + "\n")
    proc = subprocess.Popen([binary, "-c", str(folder / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_port(port, proc, "mosquitto")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def postgres() -> Iterator[Callable[[str], str]]:
    """A throwaway PostgreSQL 15 cluster in a temporary folder of its own (the ``postgres`` user must be
    able to enter it); yields ``make_db(name) -> URL`` (a new database each call). ``initdb`` and
    ``postgres`` refuse to run as root, so as root they run as the ``postgres`` user."""
    if not (PG_BIN / "initdb").exists():
        raise RuntimeError(f"PostgreSQL 15 is not installed ({PG_BIN}); apt-get install postgresql")
    folder = Path(tempfile.mkdtemp(prefix="fleet-scale-pg-"))
    data, port = folder / "pgdata", free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def pg(*args: str) -> None:
        done = subprocess.run([*as_user, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {done.stderr.decode(errors='replace').strip()}")

    started = False
    try:
        pg(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
        pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "pg.log"), "-w", "start")
        started = True

        def make_db(name: str) -> str:
            pg(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name)
            return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"

        yield make_db
    finally:
        if started:
            pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Load:
    """The simulated load of one measurement."""

    port: int
    devices: int
    rate: float
    duration: float
    processes: int
    settle_s: float = 5.0


def run_sims(load: Load, fleet: str, on_ready: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the simulator processes to the end; return their reports summed (``telemetry_acked``, ``connected``)
    with the earliest ``first_telemetry`` and the latest ``last_telemetry_ack``."""
    share, extra = divmod(load.devices, load.processes)
    procs, first = [], 1
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for index in range(load.processes):
        count = share + (1 if index < extra else 0)
        per_device = max(1, round(load.rate * load.duration))  # the same messages in every measurement
        cap_s = 3 * load.duration + 30  # a slowed-down run still ends
        args = ["--port", str(load.port), "--devices", str(count), "--first", str(first), "--rate", str(load.rate),
                "--count", str(per_device), "--duration", str(cap_s), "--fleet", fleet]  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(SIM), *args], stdout=subprocess.PIPE, text=True, env=env))
        first += count
    reports = []
    try:
        for proc in procs:  # every process connected its devices
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line or "ready" not in json.loads(line):
                raise RuntimeError(f"a simulator process did not start: {line!r}")
        if on_ready is not None:
            on_ready()
        for proc in procs:
            out, _ = proc.communicate(timeout=3 * load.duration + 180)
            reports.append(json.loads(out.strip().splitlines()[-1])["report"])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    firsts = [r["first_telemetry"] for r in reports if r["first_telemetry"]]
    lasts = [r["last_telemetry_ack"] for r in reports if r["last_telemetry_ack"]]
    return {
        "connected": sum(r["connected"] for r in reports),
        "acked": sum(r["telemetry_acked"] for r in reports),
        "failed": sum(r["telemetry_failed"] for r in reports),
        "errors": [e for r in reports for e in r["errors"]][:5],
        "first": min(firsts) if firsts else None,
        "last_ack": max(lasts) if lasts else None,
    }


def settle(delivered: Callable[[], int], target: int, settle_s: float, timeout_s: float = 120) -> tuple[int, float]:
    """Wait until ``delivered()`` reaches ``target`` or stops growing for ``settle_s``; return the final
    count and the wall time it was last seen to grow."""
    count, grew_at = delivered(), time.time()
    deadline = time.monotonic() + timeout_s
    while count < target and time.monotonic() < deadline and time.time() - grew_at < settle_s:
        time.sleep(0.05)
        now = delivered()
        if now != count:
            count, grew_at = now, time.time()
    return count, grew_at


def _result(name: str, sim: dict[str, Any], delivered: int, last: float) -> dict[str, Any]:
    seconds = max(1e-9, last - sim["first"]) if sim["first"] else float("nan")
    return {
        "name": name,
        "acked": sim["acked"],
        "delivered": delivered,
        "lost": sim["acked"] - delivered,
        "rate": delivered / seconds,
        "seconds": seconds,
        "offered": sim["acked"] / (sim["last_ack"] - sim["first"]) if sim["first"] and sim["last_ack"] else None,
        "connected": sim["connected"],
        "errors": sim["errors"],
    }


def measure_bare(load: Load, fleet: str = "bench-bare") -> dict[str, Any]:
    """The bare pipe: one paho client, persistent session, the shared telemetry subscription, a counter."""
    count = [0]
    last = [0.0]
    subscribed = threading.Event()

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        count[0] += 1
        last[0] = time.time()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-bare-{os.getpid()}", clean_session=False)
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", load.port)
    client.loop_start()
    try:
        client.subscribe(f"$share/{SHARE_GROUP}/edgeship/v1/{fleet}/+/telemetry", qos=1)
        if not subscribed.wait(10):
            raise RuntimeError("the bare subscriber got no SUBACK")
        sim = run_sims(load, fleet)
        delivered, _ = settle(lambda: count[0], sim["acked"], load.settle_s)
        return _result("bare pipe (paho, counts only)", sim, delivered, last[0] or time.time())
    finally:
        client.disconnect()
        client.loop_stop()


def _telemetry_table(metadata: Any) -> Any:
    """The ORM table holding one row per telemetry message: the one with ``device_id`` and ``seq`` columns."""
    for table in metadata.sorted_tables:
        if {"device_id", "seq"} <= set(table.columns.keys()):
            return table
    raise RuntimeError("no table with device_id and seq columns: where does the ingest store telemetry?")


def _start_ingest(db: Any, port: int, fleet: str) -> Any:
    """Start ``fleet.ingest.Ingest`` on the bench broker as ``edgeship fleet serve`` does (MQTT 5, a
    persistent session, the shared subscription of group ``bench``); return it once subscribed."""
    from fleet.ingest import Ingest, IngestSettings  # lazily: a build without the ingest still runs the bare pipe

    settings = IngestSettings(host="127.0.0.1", port=port, fleet=fleet, share_group=SHARE_GROUP,
                              client_id=f"bench-ingest-{os.getpid()}-{fleet}")  # fmt: skip
    ingest = Ingest(db, settings)
    ingest.start()
    if not ingest.wait_connected(20):
        ingest.stop()
        raise RuntimeError("the ingest did not connect and subscribe within 20 s")
    return ingest


def measure_ingest(db_url: str, load: Load, fleet: str, label: str) -> dict[str, Any] | str:
    """The fleet ingest on ``db_url`` (migrated here), under the same load as the bare pipe: rows stored
    per second and lost. Returns the result, or a short reason (``"not built"``) when it could not run."""
    try:
        importlib.import_module("fleet.ingest")
    except ImportError:
        return "not built"
    from sqlalchemy import func, select, text

    from fleet.db import Base, Database, migrate

    db = Database(db_url)
    migrate(db)
    table = _telemetry_table(Base.metadata)

    def stored() -> int:
        with db.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())

    ingest = _start_ingest(db, load.port, fleet)
    try:
        sim = run_sims(load, fleet)
        count, last = settle(stored, sim["acked"], load.settle_s)
        result = _result(f"ingest, {label} (rows stored)", sim, count, last)
        if db.engine.dialect.name == "postgresql" and count:  # heap + TOAST + every index, for the projection
            with db.engine.connect() as conn:
                size = conn.execute(text(f"select pg_total_relation_size('{table.name}')")).scalar_one()
            result["bytes_per_row"] = int(size) / count
        return result
    finally:
        ingest.stop()
        db.engine.dispose()


class BreachWatch:
    """Arrival times, on a plain subscriber, of the first telemetry from ``devices`` whose p95 exceeds
    ``threshold_ms`` and of the first ``rollback`` command sent to any device: the two ends of the
    breach-to-rollback latency. Subscribes without a shared group, so it sees what the ingest sees."""

    def __init__(self, port: int, fleet: str, devices: frozenset[str], threshold_ms: float) -> None:
        self.first_breach: float | None = None
        self.first_rollback: float | None = None
        self.last_rollback: float | None = None
        self.rollbacks = 0  # rollback commands seen
        self.devices, self.threshold_ms = devices, threshold_ms
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-watch-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(f"edgeship/v1/{fleet}/+/telemetry", 1), (f"edgeship/v1/{fleet}/+/cmd", 1)])
        if not subscribed.wait(10):
            raise RuntimeError("the breach watcher got no SUBACK")

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        now = time.time()
        device, leaf = message.topic.split("/")[3:5]
        if leaf == "cmd" and b'"rollback"' in message.payload:
            self.rollbacks += 1
            self.last_rollback = now
            if self.first_rollback is None:
                self.first_rollback = now
        elif leaf == "telemetry" and self.first_breach is None and device in self.devices:
            p95 = (json.loads(message.payload).get("latency_ms") or {}).get("p95")
            if isinstance(p95, (int, float)) and p95 > self.threshold_ms:
                self.first_breach = now

    @property
    def latency_s(self) -> float | None:
        """Seconds from the breaching message to the first rollback command, once both arrived."""
        if self.first_breach is None or self.first_rollback is None:
            return None
        return self.first_rollback - self.first_breach

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def measure_rollout_breach(port: int, db_url: str, load: Load, rate: float = 1.0) -> dict[str, Any] | str:
    """A canary breach over ``load.devices`` devices sending ``rate`` telemetry messages/s each (issue 11:
    paused, and rollback commands published, within 1 s of the breaching message arriving): see
    ``fleet_breach.py``. Returns its figures, or a short reason when a part is not built."""
    for module in ("fleet.ingest", "fleet.rollouts.driver", "fleet.wiring"):
        try:
            importlib.import_module(module)
        except ImportError:
            return f"not built ({module})"
    from fleet_breach import run_breach  # benchmarks/, on sys.path as the script's folder

    return run_breach(port, db_url, devices=load.devices, processes=load.processes, rate=rate,
                      share_group=SHARE_GROUP)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--rate", type=float, default=10.0, help="telemetry messages/s per device")
    p.add_argument("--duration", type=float, default=10.0, help="rate x duration messages per device and measurement")
    p.add_argument("--sim-processes", type=int, default=2, help="simulator processes (one saturates a core)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds without progress that end a drain")
    p.add_argument("--skip-postgres", action="store_true")
    p.add_argument("--breach-rate", type=float, default=1.0,
                   help="telemetry messages/s per device during the rollout breach (0: skip it)")  # fmt: skip
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    rows: list[tuple[str, str, str, str, bool | None]] = []  # measure, value, against, target, ok (None: info)
    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as tmp, mosquitto(Path(tmp)) as port:
        load = Load(port, args.devices, args.rate, args.duration, args.sim_processes, args.settle)
        bare = measure_bare(load)
        rows.append(_rows_of(bare, None))
        targets: list[tuple[str, Callable[[], str], str]] = [
            ("SQLite", lambda: f"sqlite:///{tmp}/fleet.sqlite", "bench-sqlite")
        ]
        with contextlib.ExitStack() as stack:
            if not args.skip_postgres:
                try:
                    make_db = stack.enter_context(postgres())
                    targets.append(("PostgreSQL", lambda: make_db("fleet"), "bench-pg"))
                except RuntimeError as e:
                    rows.append(("ingest, PostgreSQL", f"no PostgreSQL: {e}", "", ">= 0.8x bare, 0 lost", False))
            for label, url, fleet in targets:
                got = measure_ingest(url(), load, fleet, label)
                rows.append(_rows_of(got, bare) if isinstance(got, dict) else
                            (f"ingest, {label}", got, "", ">= 0.8x bare, 0 lost", None))  # fmt: skip
        if args.breach_rate > 0:
            breach = measure_rollout_breach(port, f"sqlite:///{tmp}/rollout.sqlite", load, args.breach_rate)
            rows.append(_breach_row(breach))
    print(f"fleet scale: {cpu_header()}")
    print(
        f"python {sys.version.split()[0]}, {args.devices} devices x {args.rate:g} msg/s for {args.duration:g} s, "
        f"{args.sim_processes} simulator processes, QoS 1, load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    headers = ("measure", "value", "against", "target", "ok")
    table = [headers, *((m, v, a, t, "-" if ok is None else "yes" if ok else "NO") for m, v, a, t, ok in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    for index, row in enumerate(table):
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("-+-".join("-" * width for width in widths))
    return 0 if bare["connected"] == args.devices and all(ok is not False for *_, ok in rows) else 1


def _breach_row(got: dict[str, Any] | str) -> tuple[str, str, str, str, bool | None]:
    name = "rollout breach -> paused + rollback sent (SQLite)"
    if isinstance(got, str):
        return (name, got, "", "<= 1 s", None)
    detail = (f"{got['rollbacks']} of {got['canary']} canaries rolled back {got['all_rollbacks_s']:.3f} s after the "
              f"breach; rollout {got['state']}; {got['devices']} devices x {got['rate']:g} msg/s")  # fmt: skip
    ok = got["latency_s"] <= 1.0 and got["state"] == "paused"
    return (name, f"{got['latency_s']:.3f} s", detail, "<= 1 s", ok)


def _rows_of(result: dict[str, Any], bare: dict[str, Any] | None) -> tuple[str, str, str, str, bool | None]:
    value = f"{result['rate']:,.0f} msg/s"
    detail = f"{result['delivered']:,} of {result['acked']:,} in {result['seconds']:.1f} s, {result['lost']} lost"
    if result["offered"]:
        detail += f"; devices sent {result['offered']:,.0f} msg/s"
    if result.get("bytes_per_row"):
        detail += f"; {result['bytes_per_row']:,.0f} bytes/row with indexes"
    if result["errors"]:
        detail += f"; {result['connected']} devices connected, errors: {result['errors']}"
    if bare is None:
        return (result["name"], value, detail, "0 lost", result["lost"] == 0)
    ratio = result["rate"] / bare["rate"] if bare["rate"] else 0.0
    return (result["name"], f"{value} ({ratio:.2f}x bare)", detail, ">= 0.8x bare, 0 lost",
            ratio >= 0.8 and result["lost"] == 0)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
