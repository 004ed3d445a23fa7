"""Real parts for the OTA agent tests: a fleet stand-in on MQTT, agent processes, extra test models.

Brokers and the HTTP server come from ``tests/device_runtime/agent/agent_parts.py`` (Mosquitto on a free
loopback port, an ``http.server`` with drop/trickle/ignore-range/wrong-body/oversize modes).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import paho.mqtt.client as paho
import pytest
from agent_parts import HttpServer, wait_for
from onnx import TensorProto, helper, numpy_helper
from paho.mqtt.enums import CallbackAPIVersion
from runtime_bundles import B, W, linear_reference

from device_runtime.agent import Agent
from device_runtime.agent.slots import SlotStore
from device_runtime.model import load_verified
from sdk.mqtt_contract import (
    ContractError,
    Topics,
    decode_payload,
    parse_event,
    parse_status,
    parse_telemetry,
    parse_topic,
)

FLEET = "test"
ROOT = Path(__file__).resolve().parents[3]
X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)  # an input of the linear test model


def serve(http_server: HttpServer, bundle: Path, mode: str = "normal") -> None:
    """Let the test HTTP server answer with ``bundle`` in ``mode`` (see ``agent_parts.HttpState``)."""
    http_server.state.body = bundle.read_bytes()
    http_server.state.mode = mode


def assert_serves_v(agent: Agent, version: int) -> None:
    """The agent serves the linear model at ``version`` and it answers right."""
    assert agent.active_model is not None and agent.active_model["version"] == version
    np.testing.assert_allclose(agent.predict({"x": X})["y"], linear_reference(X), rtol=1e-5)


def deploy_cmd(url: str, bundle: Path, cmd_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """A ``deploy`` command for ``bundle`` served at ``url``."""
    data = bundle.read_bytes()
    return {
        "schema": 1,
        "id": cmd_id or f"deploy-{uuid.uuid4().hex[:8]}",
        "type": "deploy",
        "url": url,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "version": extra.pop("version", None),
        "allow_downgrade": extra.pop("allow_downgrade", False),
        **extra,
    }


@dataclass
class Fleet:
    """The fleet's side of one device's topics: records what arrives and sends commands (QoS 1).

    Every message is checked against the MQTT contract as the fleet server will check it; what fails is
    kept in ``violations`` (the ``fleet_factory`` fixture fails the test on any).
    """

    client: paho.Client
    device_id: str
    messages: list[tuple[str, dict[str, Any], bool]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def root(self) -> str:
        return Topics(FLEET, self.device_id).root

    def _on(self, leaf: str) -> list[dict[str, Any]]:
        with self.lock:
            return [m for t, m, _ in self.messages if t == f"{self.root}/{leaf}"]

    def events(self, cmd_id: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self._on("events") if cmd_id is None or e.get("cmd_id") == cmd_id]

    def phases(self, cmd_id: str) -> list[str]:
        return [e["phase"] for e in self.events(cmd_id)]

    def telemetry(self) -> list[dict[str, Any]]:
        return self._on("telemetry")

    def statuses(self) -> list[dict[str, Any]]:
        return self._on("status")

    def status(self) -> dict[str, Any] | None:
        found = self.statuses()
        return found[-1] if found else None

    def send(self, cmd: dict[str, Any]) -> None:
        info = self.client.publish(f"{self.root}/cmd", json.dumps(cmd).encode(), qos=1)
        info.wait_for_publish(timeout=5)
        assert info.is_published(), "command not acknowledged by the broker"

    def wait_phase(self, cmd_id: str, phase: str, timeout_s: float = 20.0) -> dict[str, Any]:
        wait_for(
            lambda: phase in self.phases(cmd_id), timeout_s, f"{phase} event of {cmd_id} (got {self.phases(cmd_id)})"
        )
        return next(e for e in self.events(cmd_id) if e["phase"] == phase)

    def wait_status(self, check: Callable[[dict[str, Any]], bool], timeout_s: float = 15.0, what: str = "") -> None:
        wait_for(
            lambda: (s := self.status()) is not None and check(s), timeout_s, f"status {what} (last {self.status()})"
        )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


_VALIDATORS = {"status": parse_status, "telemetry": parse_telemetry, "events": parse_event}


def connect_fleet(port: int, device_id: str) -> Fleet:
    """A persistent-session subscriber to ``edgeship/v1/test/<device_id>/#``."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"fleet-{device_id}-{uuid.uuid4().hex[:6]}", clean_session=False
    )
    client.reconnect_delay_set(0.05, 0.3)  # type: ignore[arg-type]  # floats work; paho types int
    fleet = Fleet(client, device_id)
    subscribed = threading.Event()

    def on_connect(c: paho.Client, u: object, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            c.subscribe(f"{fleet.root}/#", qos=1)

    def on_message(c: paho.Client, u: object, msg: paho.MQTTMessage) -> None:
        if msg.topic.endswith("/cmd"):
            return
        try:
            _, leaf = parse_topic(msg.topic)
            _VALIDATORS[leaf](decode_payload(msg.payload))
        except (ContractError, KeyError) as e:
            with fleet.lock:
                fleet.violations.append(f"{msg.topic}: {e!r}: {msg.payload[:300]!r}")
        with fleet.lock:
            fleet.messages.append((msg.topic, json.loads(msg.payload), bool(msg.retain)))

    client.on_connect = on_connect
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    assert subscribed.wait(5), "fleet subscriber got no SUBACK"
    return fleet


def unique_seqs(telemetry: list[dict[str, Any]]) -> list[int]:
    """The fleet's de-duplication: one message per ``seq``."""
    return sorted({int(t["seq"]) for t in telemetry})


# -- agent processes ------------------------------------------------------------------------------------


class AgentProcess:
    """``edgeship-device run`` as a real subprocess (``python -m device_runtime.cli run ...``)."""

    def __init__(self, state_dir: Path, port: int, device_id: str, trust: Path, bundle: Path | None) -> None:
        self.state_dir = state_dir
        self.args = [
            sys.executable, "-m", "device_runtime.cli", "run", "--state-dir", str(state_dir),
            "--broker", f"mqtt://127.0.0.1:{port}", "--device-id", device_id, "--fleet", FLEET,
            "--trust", str(trust), "--telemetry-interval", "1", "--threads", "1", "--log-level", "INFO",
        ]  # fmt: skip
        if bundle is not None:
            self.args += ["--bundle", str(bundle)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir.parent / f"{state_dir.name}-agent.log"

    def start(self, crash_at: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != "EDGESHIP_AGENT_CRASH_AT"}
        if crash_at:
            env["EDGESHIP_AGENT_CRASH_AT"] = crash_at
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, env=env, cwd=ROOT)

    def wait_exit(self, timeout_s: float = 20.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"agent did not exit within {timeout_s} s; log:\n{self.tail()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.wait_exit()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def journal_entries(state_dir: Path) -> dict[str, dict[str, Any]] | None:
    """The agent's command journal (``commands.jsonl``: one JSON line per change of an entry) folded into
    its entries by id; None while it cannot be read whole; {} when there is none."""
    try:
        data = (state_dir / "commands.jsonl").read_bytes()
    except FileNotFoundError:
        return {}
    entries: dict[str, dict[str, Any]] = {}
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            return None  # a line being written
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            entries.setdefault(record["id"], {}).update(record)
    return entries


def settled(state_dir: Path) -> bool:
    """No deployment in progress and no OTA command waiting, according to the agent's durable files."""
    if (state_dir / "deploy.json").exists():
        return False
    entries = journal_entries(state_dir)
    return entries is not None and not any(e.get("state") in ("queued", "running") for e in entries.values())


def check_one_good_model(state_dir: Path) -> dict[str, Any]:
    """The pointer names exactly one active slot whose files hash right and whose model passes its check."""
    store = SlotStore(state_dir)
    pointer = store.read_pointer()
    assert pointer.active is not None, "no active slot"
    info = pointer.active_info
    assert info is not None
    verified = store.open_slot(pointer.active, info)
    with load_verified(verified, intra_op_threads=1) as model:
        assert model.health_check()["passed"]
    return info.model()


# -- extra models -------------------------------------------------------------------------------------


def slow_linear_onnx(iterations: int, n: int = 256) -> bytes:
    """The linear model (same W, b, outputs) after ``iterations`` rounds of an n x n MatMul: a slow check."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("MatMul", ["acc", "M"], ["acc_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc", TensorProto.FLOAT, [n, n]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [n, n]),
        ],
    )
    nodes = [
        helper.make_node("Loop", ["trips", "true", "acc0"], ["acc_final"], body=body),
        helper.make_node("ReduceSum", ["acc_final"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y0"]),
        helper.make_node("Add", ["y0", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            numpy_helper.from_array(W, "W"),
            numpy_helper.from_array(B, "b"),
            numpy_helper.from_array(np.array(iterations, dtype=np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "true"),
            numpy_helper.from_array(np.ones((n, n), np.float32) / n, "acc0"),
            numpy_helper.from_array(np.eye(n, dtype=np.float32), "M"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeship-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def helper_processes(agent_pid: int, module: str) -> list[int]:
    """Live ``python -m <module> AGENT_PID`` processes of that agent (Linux /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if module.encode() in args and str(agent_pid).encode() in args and state != "Z":
            found.append(int(proc.name))
    return found
