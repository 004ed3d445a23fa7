"""OTA swap under load: deploy a small bundle to a running agent while threads call ``predict``.

    .venv/bin/python benchmarks/ota_swap.py [--threads 1] [--rate 0] [--deploys 10] [--hidden 512]
                                            [--thread-staging] [--thread-link] [--broker auto|mosquitto|embedded]

Everything runs on this machine: an MQTT broker (Mosquitto in its own process when installed, as in
production; ``--broker embedded`` runs the amqtt broker inside this process, where it competes with the
agent for the GIL), an HTTP server on loopback and the fleet's MQTT client, each in its own process,
and the agent and its local callers in this process. Prints one table: the bundle's cold load (the first
load in a new process, the runtime starting with it) and its reload in a running process (the runtime
warm), the download, the deployment's time (median of ``--deploys``) against the target
``2 x cold load + download`` and, stricter, against ``2 x reload + download`` idle and under the predict
load, failed requests during the swaps (target 0), p99 during each swap against the steady p99 just
before it (target <= 2x), telemetry throughput, outbox drain rate, and the deployment's phases (device
timestamps). The predict load is a closed loop by default (each thread calls again at once: on a
2-CPU machine one thread keeps a core busy); ``--rate`` makes it an open loop at that many calls per
second, as from a sensor. Ratios matter, not the absolute numbers; check ``uptime`` first.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _machine import cpu_line  # benchmarks/, on sys.path as the script's folder
from _mlp import mlp_onnx, mlp_weights

import device_runtime
from device_runtime.agent import Agent, AgentConfig
from device_runtime.agent.download import HttpDownloader
from device_runtime.agent.mqtt import MqttSettings
from fleet.broker import start_broker_thread
from sdk.bundle import write_bundle
from sdk.manifest import Manifest, TensorSpec
from sdk.signing import TrustedKeys, generate_keypair, load_private_key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _bundle(folder: Path, key: Any, version: int, hidden: int) -> Path:
    w1, w2 = mlp_weights(hidden, seed=version)
    onnx_bytes = mlp_onnx(w1, w2)
    x = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)
    manifest = Manifest(
        name="mlp",
        version=version,
        target="onnxruntime",
        precision="fp32",
        model="model.onnx",
        inputs=(TensorSpec("x", "float32", ("batch", 64)),),
        outputs=(TensorSpec("y", "float32", ("batch", 10)),),
        created="2026-01-01T00:00:00Z",
        runtime={"package": "onnxruntime", "providers": ["CPUExecutionProvider"]},
        golden={
            "inputs": {"x": "golden/x.npy"},
            "outputs": {"y": "golden/y.npy"},
            "tolerance": {"atol": 1e-3, "rtol": 1e-3},
        },
    )
    reference = np.maximum(x @ w1, 0) @ w2
    members = {"model.onnx": onnx_bytes, "golden/x.npy": _npy(x), "golden/y.npy": _npy(reference.astype(np.float32))}
    out = folder / f"mlp-{version}.edgebundle"
    write_bundle(out, manifest, members, [key])
    return out


class _Mosquitto:
    """A Mosquitto process on 127.0.0.1:port (anonymous, no persistence)."""

    def __init__(self, binary: str, folder: Path, port: int) -> None:
        config = folder / "mosquitto.conf"
        user = f"user {getpass.getuser()}\n"  # as root it would drop to "mosquitto" otherwise
        # set_tcp_nodelay: small MQTT packets go out at once, not after the peer's delayed ACK (~40 ms)
        settings = {
            "listener": f"{port} 127.0.0.1",
            "allow_anonymous": "true",
            "set_tcp_nodelay": "true",
            "max_queued_messages": "100000",
        }
        config.write_text("".join(f"{k} {v}\n" for k, v in settings.items()) + user)
        self.args = [binary, "-c", str(config)]
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> _Mosquitto:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def _wait_port(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def _mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)


_FLEET_SCRIPT = r"""
import json, socket, sys, threading, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

out_lock = threading.Lock()

def emit(message):
    with out_lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

def on_message(client, userdata, message):
    emit({"event": json.loads(message.payload), "recv": time.time()})

client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-fleet")
client.on_message = on_message
client.connect("127.0.0.1", int(sys.argv[1]))
sock = client.socket()
if isinstance(sock, socket.socket):  # no Nagle, as the agent's link
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
client.loop_start()
client.subscribe(sys.argv[2] + "/events", qos=1)
emit({"ready": True})
for line in sys.stdin:
    sent = time.time()
    client.publish(sys.argv[2] + "/cmd", line.strip(), qos=1)
    emit({"sent": sent})
client.loop_stop()
"""


class _Fleet:
    """The fleet's MQTT client in its own process, as in production: it must not take the GIL of the
    process whose callers' latency is measured. Commands go in on its stdin; each event comes back on its
    stdout with the wall-clock time it arrived (``recv``)."""

    def __init__(self, port: int) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _FLEET_SCRIPT, str(port), "edgeship/v1/default/bench"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._events: list[dict[str, Any]] = []
        self._sent: list[float] = []
        self._changed = threading.Condition()
        assert self._proc.stdout is not None
        if json.loads(self._proc.stdout.readline()).get("ready") is not True:
            raise RuntimeError("the fleet client did not start")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            message = json.loads(line)
            with self._changed:
                if "sent" in message:
                    self._sent.append(message["sent"])
                else:
                    self._events.append({**message["event"], "recv": message["recv"]})
                self._changed.notify_all()

    def send(self, cmd: dict[str, Any]) -> float:
        """Publish ``cmd``; return the wall-clock time the fleet process published it."""
        assert self._proc.stdin is not None
        with self._changed:
            count = len(self._sent)
            self._proc.stdin.write(json.dumps(cmd) + "\n")
            self._proc.stdin.flush()
            self._changed.wait_for(lambda: len(self._sent) > count, timeout=10)
            return self._sent[-1]

    def events_of(self, cmd_id: str) -> list[dict[str, Any]]:
        with self._changed:
            return [e for e in self._events if e.get("cmd_id") == cmd_id]

    def wait_final(self, cmd_id: str, timeout_s: float) -> dict[str, Any] | None:
        """The command's ``active`` or ``failed`` event (with ``recv``), or None after ``timeout_s``."""

        def final() -> dict[str, Any] | None:
            done = ("active", "failed")
            return next((e for e in self._events if e.get("cmd_id") == cmd_id and e["phase"] in done), None)

        with self._changed:
            self._changed.wait_for(lambda: final() is not None, timeout=timeout_s)
            return final()

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(10)


_FIRST_LOAD_SCRIPT = r"""
import sys, time
import device_runtime
from sdk.signing import TrustedKeys
trust = TrustedKeys.from_files([sys.argv[2]])
start = time.perf_counter()
with device_runtime.load(sys.argv[1], trust, intra_op_threads=1) as model:
    model.health_check()
print(time.perf_counter() - start)
"""


def _first_load(bundle: Path, public_key: Path, rounds: int = 3) -> float:
    """The bundle's cold load: the first load in a fresh process (after ``import device_runtime``; the
    runtime starts with the first model, as when a device boots), verify + extract + session + health
    check; the median of ``rounds`` processes."""
    times = []
    for _ in range(rounds):
        done = subprocess.run(
            [sys.executable, "-c", _FIRST_LOAD_SCRIPT, str(bundle), str(public_key)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        times.append(float(done.stdout))
    return _median(times)


def _warm_load(bundle: Path, trust: TrustedKeys, rounds: int = 3) -> float:
    """A reload in a running process (the runtime warm, as for a deployment): verify + extract + session
    + health check, in a fresh temp folder each time; the fastest round."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        with device_runtime.load(bundle, trust, intra_op_threads=1) as model:
            model.health_check()
        times.append(time.perf_counter() - start)
    return min(times)


def _download(url: str, folder: Path, rounds: int = 3) -> float:
    """The download alone, as the agent does it: one long-lived downloader (building one loads the CA store)."""
    downloader = HttpDownloader()
    times = []
    for i in range(rounds):
        start = time.perf_counter()
        downloader.download_file(url, folder / f"dl-{i}", max_length=2**30)
        times.append(time.perf_counter() - start)
        (folder / f"dl-{i}").unlink()
    return min(times)


def _p99(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values) * 1000, 99)) if values else float("nan")


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="predict threads (default 1)")
    parser.add_argument(
        "--rate", type=float, default=0, help="open loop: predict calls per second in all (default 0: closed loop)"
    )
    parser.add_argument("--deploys", type=int, default=10, help="deployments in a row (default 10)")
    parser.add_argument("--hidden", type=int, default=512, help="MLP hidden width (default 512)")
    parser.add_argument(
        "--thread-staging", action="store_true", help="stage on the agent's thread, not in the helper process"
    )
    parser.add_argument(
        "--thread-link", action="store_true", help="run the MQTT link on the agent's threads, not in its process"
    )
    parser.add_argument(
        "--broker",
        choices=("auto", "mosquitto", "embedded"),
        default="auto",
        help="MQTT broker: Mosquitto in its own process (auto: when installed) or amqtt in this process",
    )
    args = parser.parse_args()
    mosquitto = _mosquitto_binary() if args.broker != "embedded" else None
    if args.broker == "mosquitto" and mosquitto is None:
        parser.error("mosquitto is not installed")

    work = Path(tempfile.mkdtemp(prefix="edgeship-bench-"))
    private, public = generate_keypair(work, "bench")
    key = load_private_key(private)
    bundles = [_bundle(work, key, version, args.hidden) for version in range(1, args.deploys + 2)]
    trust = TrustedKeys.from_files([public])

    first_s = _first_load(bundles[1], public)
    warm_s = _warm_load(bundles[1], trust)

    # The artifact server is another process, as in a fleet (and not competing for this one's GIL).
    http_port = _free_port()
    http = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1", "--directory", str(work)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_port(http_port)
    download_s = _download(f"http://127.0.0.1:{http_port}/{bundles[1].name}", work)

    port = _free_port()

    def start_broker() -> Any:
        if mosquitto is not None:
            return _Mosquitto(mosquitto, work, port).start()
        return start_broker_thread("127.0.0.1", port)

    broker = start_broker()
    settings = MqttSettings("127.0.0.1", port, "bench", backoff_base_s=0.05, backoff_cap_s=0.5)
    agent = Agent(
        AgentConfig(
            state_dir=work / "state", mqtt=settings, trust=trust, initial_bundle=bundles[0],
            telemetry_interval_s=3600, intra_op_threads=1,
            staging_process=not args.thread_staging, link_process=not args.thread_link,
        )
    )  # fmt: skip
    agent.start()
    assert agent.link.wait_connected(10)

    fleet = _Fleet(port)
    time.sleep(0.3)

    samples: list[tuple[float, float]] = []  # (end time, latency)
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()
    x = np.ones((1, 64), np.float32)

    interval = args.threads / args.rate if args.rate > 0 else 0.0

    def load() -> None:
        due = time.perf_counter()
        while not stop.is_set():
            if interval:  # open loop: a call every `interval` s per thread, as from a sensor
                due += interval
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                elif wait < -0.1:  # fell behind (a stall): do not catch up in a burst
                    due = time.perf_counter()
            t0 = time.perf_counter()
            try:
                agent.predict({"x": x})
            except Exception as e:
                with lock:
                    failures.append(repr(e))
                continue
            t1 = time.perf_counter()
            with lock:
                samples.append((t1, t1 - t0))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(args.threads)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    warm_loaded_s = _warm_load(bundles[1], trust)  # the same work under the predict load
    download_loaded_s = _download(f"http://127.0.0.1:{http_port}/{bundles[1].name}", work)

    def window(start: float, end: float) -> list[float]:
        with lock:
            return [lat for t, lat in samples if start <= t <= end]

    deploys: list[dict[str, Any]] = []
    for bundle in bundles[1:]:
        steady_start = time.perf_counter()
        time.sleep(0.5)
        steady_end = time.perf_counter()
        data = bundle.read_bytes()
        cmd_id = f"bench-{len(deploys) + 1}"
        cmd = {
            "schema": 1, "id": cmd_id, "type": "deploy", "url": f"http://127.0.0.1:{http_port}/{bundle.name}",
            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "version": len(deploys) + 2,
        }  # fmt: skip
        failed_before = len(failures)
        sent_wall = fleet.send(cmd)
        outcome = fleet.wait_final(cmd_id, timeout_s=60)
        arrived_wall = outcome["recv"] if outcome else time.time()
        deploy_s = arrived_wall - sent_wall
        sent = time.perf_counter() - (time.time() - sent_wall)  # the same instant on this clock
        swap_end = sent + deploy_s + 0.2
        time.sleep(max(0.0, swap_end + 0.05 - time.perf_counter()))
        mine = fleet.events_of(cmd_id)
        check = next((e["ts"] for e in mine if e["phase"] == "health_check"), None)
        check_start = sent + (check - sent_wall) if check is not None else sent
        phases = [("command sent", sent_wall)]
        phases += [(e["phase"], e["ts"]) for e in mine]
        phases += [("fleet has active", arrived_wall)]
        deploys.append({
            "deploy_s": deploy_s,
            "outcome": outcome["phase"] if outcome else "timeout",
            "p99_steady": _p99(window(steady_start, steady_end)),
            "p99_swap": _p99(window(sent, swap_end)),
            "during": len(window(sent, swap_end)),
            "p99_switch": _p99(window(check_start, swap_end)),
            "failed": len(failures) - failed_before,
            "phases": [(f"{a} -> {b}", (tb - ta) * 1000) for (a, ta), (b, tb) in itertools.pairwise(phases)],
        })  # fmt: skip
    stop.set()
    for t in threads:
        t.join()

    # telemetry: how fast the agent can queue durable telemetry, and how fast a backlog drains
    n = 500
    start = time.perf_counter()
    for _ in range(n):
        agent.publish_telemetry()
    queue_rate = n / (time.perf_counter() - start)
    agent.link.wait_drained(60)
    broker.stop()
    time.sleep(0.5)
    for _ in range(n):
        agent.publish_telemetry()
    broker = start_broker()
    agent.link.wait_connected(20)
    start = time.perf_counter()
    agent.link.wait_drained(120)
    drain_rate = n / (time.perf_counter() - start)
    agent.stop()
    fleet.close()
    broker.stop()
    http.terminate()

    target = 2 * first_s + download_s
    target_warm = 2 * warm_s + download_s
    target_loaded = 2 * warm_loaded_s + download_loaded_s
    times = [d["deploy_s"] for d in deploys]
    p99_ratios = [d["p99_swap"] / d["p99_steady"] for d in deploys]
    outcomes = sorted({d["outcome"] for d in deploys})
    median_s = _median(times)
    rows = [
        ("broker", "mosquitto (own process)" if mosquitto else "amqtt (in process)", ""),
        ("load average (1 min)", f"{os.getloadavg()[0]:.2f}", f"{os.cpu_count()} CPUs"),
        ("bundle size", f"{len(bundles[1].read_bytes()) / 1024:.0f} KiB", ""),
        ("predict threads", str(args.threads),
         f"continuous load, open loop at {args.rate:g} calls/s" if args.rate > 0 else "continuous load, closed loop"),
        ("staging", "agent thread" if args.thread_staging else "helper process", ""),
        ("MQTT link", "agent threads" if args.thread_link else "link process", ""),
        ("cold load (first in a new process)", f"{first_s * 1000:.1f} ms", "idle; verify+load+health, runtime start"),
        ("reload in a running process", f"{warm_s * 1000:.1f} ms", "idle; verify+load+health, runtime warm"),
        ("download (loopback)", f"{download_s * 1000:.1f} ms", "idle"),
        ("reload under predict load", f"{warm_loaded_s * 1000:.1f} ms", ""),
        ("download under predict load", f"{download_loaded_s * 1000:.1f} ms", ""),
        (f"deploy cmd -> active, median of {len(times)}", f"{median_s * 1000:.1f} ms",
         f"min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}"),
        ("  vs 2 x cold load + download", f"{median_s / target:.2f}", f"target <= 1 ({target * 1000:.1f} ms)"),
        ("  vs 2 x reload + download (idle)", f"{median_s / target_warm:.2f}",
         f"stricter: the runtime warm ({target_warm * 1000:.1f} ms)"),
        ("  vs the same under predict load", f"{median_s / target_loaded:.2f}",
         f"stricter, loaded ({target_loaded * 1000:.1f} ms)"),
        ("deploy outcomes", ", ".join(outcomes), ""),
        ("failed requests during swaps", str(sum(d["failed"] for d in deploys)), "target 0"),
        ("p99 swap / steady, median", f"{_median(p99_ratios):.2f}",
         f"target <= 2; min {min(p99_ratios):.2f}, max {max(p99_ratios):.2f}"),
        ("  p99 steady / during swap, median", f"{_median([d['p99_steady'] for d in deploys]):.3f} ms",
         f"{_median([d['p99_swap'] for d in deploys]):.3f} ms ({_median([d['during'] for d in deploys]):.0f} "
         "requests per swap window: command to active + 0.2 s)"),
        ("p99 load+check+switch / steady, median",
         f"{_median([d['p99_switch'] / d['p99_steady'] for d in deploys]):.2f}",
         "information: the window from health_check to active + 0.2 s"),
        ("telemetry queued (durable)", f"{queue_rate:.0f} msg/s", "per device process"),
        ("outbox drain after outage", f"{drain_rate:.0f} msg/s", f"{n} messages, QoS 1"),
    ]  # fmt: skip
    for i, (name, _) in enumerate(deploys[0]["phases"]):
        values = [d["phases"][i][1] for d in deploys if len(d["phases"]) == len(deploys[0]["phases"])]
        rows.append((f"  {name}", f"{_median(values):.1f} ms", "median, device timestamps"))
    width = max(len(r[0]) for r in rows)
    print(cpu_line())
    print(f"{'metric'.ljust(width)}  {'value':>16}  note")
    print(f"{'-' * width}  {'-' * 16}  ----")
    for name, value, note in rows:
        print(f"{name.ljust(width)}  {value:>16}  {note}")


if __name__ == "__main__":
    main()
