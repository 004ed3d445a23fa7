"""Real parts for the end-to-end rollout tests: fleet server processes, agents, bundles, a command recorder.

Everything here is a real process or a real socket: ``edgeship fleet serve`` (``python -m sdk.cli fleet
serve``) as a subprocess that can be killed with SIGKILL, ``edgeship-device run`` agents
(``ota_parts.AgentProcess``), Mosquitto (``agent_parts.Broker``), signed bundles built with the kernel, a
paho client that records every command the fleet publishes, and a thread posting predicts to an
agent's local HTTP API. The device tests' helpers are reused from their folders, as the fleet tests do.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

TESTS = Path(__file__).resolve().parents[1]
for _folder in ("device_runtime", "device_runtime/agent", "device_runtime/ota"):
    if str(TESTS / _folder) not in sys.path:
        sys.path.insert(0, str(TESTS / _folder))

from agent_parts import Broker, BrokerPool, free_port, wait_for  # noqa: E402
from ota_parts import FLEET, ROOT, AgentProcess, X, slow_linear_onnx  # noqa: E402
from runtime_bundles import CREATED, GOLDEN_X, LINEAR_SPECS, linear_onnx, linear_reference, npy_bytes  # noqa: E402

from fleet.auth import create_token  # noqa: E402
from fleet.db import Database  # noqa: E402
from sdk.bundle import write_bundle  # noqa: E402
from sdk.manifest import Manifest, format_time  # noqa: E402
from sdk.signing import generate_keypair, load_private_key  # noqa: E402

__all__ = [
    "Broker",
    "BrokerPool",
    "FLEET",
    "Bundles",
    "CommandRecorder",
    "FleetProcess",
    "Loader",
    "StaticFiles",
    "X",
    "Owned",
    "api_token",
    "free_port",
    "make_bundles",
    "wait_for",
]


# -- bundles ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundles:
    """The signing key's public half and the bundles of the model ``linear``."""

    public_key: Path
    v1: Path
    v2: Path  # the same model, version 2
    v2_unhealthy: Path  # version 2 whose golden outputs do not match its model: fails the health check
    v2_slow: Path  # version 2, right answers, each predict ~tens of ms (p95 far above v1's)


def _bundle(folder: Path, key: Any, name: str, version: int, model: bytes, golden_y: np.ndarray) -> Path:
    members = {
        "model.onnx": model,
        "golden/inputs/x.npy": npy_bytes(GOLDEN_X),
        "golden/outputs/y.npy": npy_bytes(golden_y),
    }
    manifest = Manifest(
        name="linear",
        version=version,
        target="onnxruntime",
        precision="fp32",
        model="model.onnx",
        inputs=tuple(LINEAR_SPECS["inputs"]),
        outputs=tuple(LINEAR_SPECS["outputs"]),
        created=format_time(CREATED),
        runtime={"package": "onnxruntime", "providers": ["CPUExecutionProvider"]},
        golden={
            "inputs": {"x": "golden/inputs/x.npy"},
            "outputs": {"y": "golden/outputs/y.npy"},
            "tolerance": {"atol": 1e-4, "rtol": 1e-3},
        },
    )
    out = folder / f"{name}.edgebundle"
    write_bundle(out, manifest, members, [key])
    return out


def make_bundles(folder: Path, slow_iterations: int = 20) -> Bundles:
    """A key pair and the four signed bundles in ``folder``."""
    private, public = generate_keypair(folder, "release")
    key = load_private_key(private)
    good = linear_reference(GOLDEN_X)
    return Bundles(
        public_key=public,
        v1=_bundle(folder, key, "v1", 1, linear_onnx(), good),
        v2=_bundle(folder, key, "v2", 2, linear_onnx(), good),
        v2_unhealthy=_bundle(folder, key, "v2-unhealthy", 2, linear_onnx(), good + 100.0),
        v2_slow=_bundle(folder, key, "v2-slow", 2, slow_linear_onnx(slow_iterations), good),
    )


# -- the fleet server as a process ------------------------------------------------------------------


def api_token(db_url: str) -> str:
    """A write token, created in the server's database (as ``edgeship fleet token create`` does)."""
    db = Database(db_url)
    try:
        with db.session() as session:
            return create_token(session, f"e2e-{uuid.uuid4().hex[:6]}", "write")
    finally:
        db.close()


class FleetProcess:
    """``edgeship fleet serve`` as a subprocess on a fixed port (a restart keeps its URL), logging to a file.

    ``env`` adds ``EDGESHIP_FLEET_*`` settings (lease, holder id, client id, database, artifacts).
    """

    def __init__(
        self,
        state_dir: Path,
        broker_port: int,
        trust: Path,
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable, "-m", "sdk.cli", "fleet", "serve", "--state-dir", str(state_dir),
            "--broker", f"mqtt://127.0.0.1:{broker_port}", "--trust", str(trust), "--port", str(self.port),
            "--fleet", FLEET, "--log-level", "info",
        ]  # fmt: skip
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_FLEET_")
        }  # the test's settings only
        self.env.update(env or {})
        self.log = state_dir.parent / f"{state_dir.name}-fleet.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout_s: float = 60.0) -> None:
        """Start and wait for its ``edgeship fleet serving`` line."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        marker = f"--- start {self.starts}\n"
        with open(self.log, "a") as log:
            log.write(marker)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, env=self.env, cwd=ROOT)

        def serving() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"fleet serve exited {self.proc.returncode}:\n{self.tail()}")
            return "edgeship fleet serving" in self.tail(100_000).rpartition(marker)[2]

        wait_for(serving, timeout_s, f"fleet serve on port {self.port} (log:\n{self.tail()})", interval_s=0.1)

    def kill9(self) -> None:
        """SIGKILL: no shutdown code runs (leases stay held, nothing is flushed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=f"{self.url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=30)


# -- a plain static file server (standing in for a CDN / load balancer in front of the artifacts) ------


class StaticFiles:
    """``http.server`` serving ``root`` (``/artifacts/<sha>.edgebundle`` when root is a state folder)."""

    def __init__(self, root: Path) -> None:
        handler = partial(_QuietHandler, directory=str(root))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


# -- every command the fleet publishes --------------------------------------------------------------


@dataclass
class CommandRecorder:
    """A paho client subscribed to ``edgeship/v1/<fleet>/+/cmd``: every command, with its device, in order."""

    client: paho.Client
    commands: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # the devices' events, likewise
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def connect(cls, port: int, *, persistent: bool = False) -> CommandRecorder:
        """``persistent``: a session the broker keeps (and saves across its own restart), so a command
        published while the recorder is reconnecting waits for it instead of going unrecorded."""
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"e2e-cmd-{uuid.uuid4().hex[:8]}", clean_session=not persistent
        )
        client.reconnect_delay_set(1, 2)  # back soon after a broker restart
        recorder = cls(client)
        subscribed = threading.Event()

        def on_connect(c: paho.Client, u: object, flags: Any, reason: Any, props: Any) -> None:
            c.subscribe([(f"edgeship/v1/{FLEET}/+/cmd", 1), (f"edgeship/v1/{FLEET}/+/events", 1)])

        def on_message(c: paho.Client, u: object, msg: paho.MQTTMessage) -> None:
            device = msg.topic.split("/")[3]
            with recorder.lock:
                kept = recorder.events if msg.topic.endswith("/events") else recorder.commands
                kept.append((device, json.loads(msg.payload)))

        client.on_connect = on_connect
        client.on_subscribe = lambda *a: subscribed.set()
        client.on_message = on_message
        client.connect("127.0.0.1", port, keepalive=10)
        client.loop_start()
        assert subscribed.wait(5), "command recorder got no SUBACK"
        return recorder

    def of(self, device_id: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [
                c
                for d, c in self.commands
                if (device_id is None or d == device_id) and (kind is None or c.get("type") == kind)
            ]

    def runs(self, device_id: str, cmd_id: str, phase: str) -> int:
        """How many times the device reported ``phase`` for ``cmd_id``, not counting the broker's
        redeliveries of one event (QoS 1: same ``ts``) nor the ``received`` of a duplicate command."""
        with self.lock:
            return len(
                {
                    e["ts"]
                    for d, e in self.events
                    if d == device_id and e.get("cmd_id") == cmd_id and e.get("phase") == phase
                    and not e.get("detail", {}).get("duplicate")
                }
            )  # fmt: skip

    def devices(self, kind: str) -> set[str]:
        with self.lock:
            return {d for d, c in self.commands if c.get("type") == kind}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- load on an agent's local HTTP API --------------------------------------------------------------


class Loader:
    """Posts ``X`` to an agent's ``/v1/predict`` about ``rate_per_s`` times a second, so its telemetry has
    request counts and latencies (an idle device reports none, and a latency gate then has no data)."""

    def __init__(self, port: int, rate_per_s: float = 20.0) -> None:
        self.port, self.pause_s = port, 1.0 / rate_per_s
        self.answers = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = json.dumps({"inputs": {"x": X.tolist()}}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.wait(self.pause_s):
            try:
                conn.request("POST", "/v1/predict", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    self.answers += 1
                else:
                    self.errors.append(f"HTTP {response.status}")
            except (OSError, http.client.HTTPException) as e:  # the agent still starting: try again
                self.errors.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()

    def start(self) -> Loader:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


# -- agents -----------------------------------------------------------------------------------------


def start_agents(
    root: Path, broker_port: int, trust: Path, v1: Path, ids: list[str], *, serve: bool = False
) -> tuple[list[AgentProcess], dict[str, int]]:
    """One ``edgeship-device run`` per id, each in its own state folder, serving v1; HTTP ports if ``serve``."""
    agents, ports = [], {}
    for device_id in ids:
        agent = AgentProcess(root / f"agent-{device_id}", broker_port, device_id, trust, v1)
        if serve:
            ports[device_id] = free_port()
            agent.args += ["--serve", "--serve-port", str(ports[device_id])]
        agent.start()
        agents.append(agent)
    return agents, ports


def wait_registered(api: httpx.Client, ids: list[str], version: int, timeout_s: float = 60.0) -> None:
    """Every device is in the registry, online, with its capabilities and the model ``version``."""

    def ready() -> bool:
        found = {d["device_id"]: d for d in api.get("/devices").json()["devices"]}
        return all(
            i in found
            and found[i]["online"]
            and found[i]["capabilities"]
            and (found[i]["model"] or {}).get("version") == version
            for i in ids
        )

    wait_for(ready, timeout_s, f"devices {ids} online with v{version}", interval_s=0.2)


def wait_rollout(
    api: httpx.Client,
    rollout_id: int,
    states: tuple[str, ...],
    timeout_s: float,
    check: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Poll the rollout until its state is one of ``states``; ``check`` runs each poll (e.g. processes alive)."""
    last: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal last
        check()
        try:
            last = api.get(f"/rollouts/{rollout_id}").json()
        except httpx.TransportError:
            return False
        return last.get("state") in states

    try:
        wait_for(reached, timeout_s, f"rollout {rollout_id} to reach {states}", interval_s=0.25)
    except AssertionError as e:
        raise AssertionError(f"{e}; last view: {json.dumps(last)[:3000]}") from None
    return last


def audit(api: httpx.Client, rollout_id: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = api.get(f"/rollouts/{rollout_id}/audit").json()
    return rows


def device_version(api: httpx.Client, device_id: str) -> int | None:
    model = api.get(f"/devices/{device_id}").json().get("model")
    return None if model is None else int(model["version"])


class Owned:
    """Everything a test started (fleets, agents, loaders, recorders, file servers), ended in reverse order:
    agents and fleets with SIGKILL (what they leave is not what is tested then), the rest closed."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def add(self, item: Any) -> Any:
        self.items.append(item)
        return item

    def close_all(self) -> None:
        for item in reversed(self.items):
            end = getattr(item, "kill9", None) or getattr(item, "kill", None)
            end = end or getattr(item, "stop", None) or getattr(item, "close", None)
            try:
                if end is not None:
                    end()
            except Exception:  # end the others anyway
                pass
        self.items.clear()
