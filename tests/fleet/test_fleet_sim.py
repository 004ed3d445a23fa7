"""The scale benchmark's device simulator (benchmarks/fleet_sim.py) against a real Mosquitto.

The simulator stands in for 1,000 agents when the fleet is measured, so what it sends must be what an agent
sends: every status, telemetry and event message a real subscriber receives is checked with the contract's
validators, and a deploy, a failing deploy, a rollback, a duplicate, a ping and bad commands get the event
sequences docs/mqtt.md and docs/ota.md describe.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "device_runtime" / "agent"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from agent_parts import Broker, BrokerPool, Received, wait_for  # noqa: E402
from fleet_scale import BreachWatch  # noqa: E402
from fleet_sim import SimConfig, Simulator, device_id, parse_devices  # noqa: E402

from sdk.mqtt_contract import (  # noqa: E402
    DeployCommand,
    decode_payload,
    encode_payload,
    parse_event,
    parse_status,
    parse_telemetry,
    parse_topic,
)

FLEET = "simtest"
SHA = "ab" * 32


def test_device_lists_parse_ids_numbers_and_ranges() -> None:
    assert parse_devices("sim-00003, 7,10-12") == {"sim-00003", "sim-00007", "sim-00010", "sim-00011", "sim-00012"}
    assert parse_devices("") == frozenset()
    assert device_id(1) == "sim-00001"
    with pytest.raises(ValueError, match="backwards"):
        parse_devices("9-3")
    with pytest.raises(ValueError):
        parse_devices("seven")


class _Fleet:
    """A paho client standing in for the fleet: records everything under the fleet's topics."""

    def __init__(self, port: int) -> None:
        self.messages: list[Received] = []
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="sim-test-fleet", clean_session=False)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(f"edgeship/v1/{FLEET}/+/+", qos=1)
        assert subscribed.wait(5), "no SUBACK"

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def leaf(self, dev: str, leaf: str) -> list[Any]:
        with self.lock:
            return [m.json() for m in self.messages if m.topic == f"edgeship/v1/{FLEET}/{dev}/{leaf}"]

    def phases(self, dev: str, cmd_id: str) -> list[str]:
        return [e["phase"] for e in self.leaf(dev, "events") if e["cmd_id"] == cmd_id]

    def send(self, dev: str, payload: dict[str, Any] | bytes) -> None:
        data = payload if isinstance(payload, bytes) else encode_payload(payload)
        self.client.publish(f"edgeship/v1/{FLEET}/{dev}/cmd", data, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """The device tests' real Mosquitto (agent_parts.Broker), anonymous on a free loopback port."""
    pool = BrokerPool(tmp_path)
    yield pool.make()
    pool.stop_all()


def _deploy(cmd_id: str, version: int = 2) -> dict[str, Any]:
    return DeployCommand(cmd_id, "http://127.0.0.1:9/b.edgebundle", SHA, size=1000, version=version).to_payload()


@pytest.mark.timeout(60)
def test_simulated_devices_speak_the_contract_and_answer_commands(mosquitto: Broker) -> None:
    fleet = _Fleet(mosquitto.port)
    watch = BreachWatch(mosquitto.port, FLEET, frozenset({"sim-00001"}), threshold_ms=5.0)
    config = SimConfig(port=mosquitto.port, devices=20, rate=5.0, duration=3.0, fleet=FLEET, step_s=0.01,
                       failing=frozenset({"sim-00002"}), slow=frozenset({"sim-00001"}), record=True)  # fmt: skip
    sim = Simulator(config)
    ready = threading.Event()
    result: dict[str, Any] = {}

    def run() -> None:
        result["report"] = asyncio.run(sim.run(lambda report: ready.set()))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert ready.wait(20), "the simulated devices did not connect"
        fleet.send("sim-00001", _deploy("d-1"))
        fleet.send("sim-00002", _deploy("d-2"))
        fleet.send("sim-00003", {"schema": 1, "id": "p-1", "type": "ping"})
        fleet.send("sim-00004", {"schema": 1, "id": "x-1", "type": "reboot"})  # unknown type
        fleet.send("sim-00004", b"{not json")  # dropped and counted
        fleet.send("sim-00005", {"schema": 1, "id": "c-1", "type": "config", "telemetry_interval_s": 0.5})
        wait_for(lambda: "active" in fleet.phases("sim-00001", "d-1"), 10, "the deploy to become active")
        new_version = lambda: any(t["model"]["version"] == 2 for t in fleet.leaf("sim-00001", "telemetry"))  # noqa: E731
        wait_for(new_version, 5, "telemetry of the deployed model")
        fleet.send("sim-00001", {"schema": 1, "id": "rb-1", "type": "rollback"})
        fleet.send("sim-00001", _deploy("d-1"))  # the same id again
        wait_for(lambda: "rolled_back" in fleet.phases("sim-00001", "rb-1"), 10, "the rollback")
        thread.join(30)
        assert not thread.is_alive(), "the simulator did not stop after its duration"
        report = result["report"]
        offline = lambda: sum(s["state"] == "offline" for i in range(1, 21) for s in fleet.leaf(device_id(i), "status"))  # noqa: E731
        arrived = lambda: sum(len(fleet.leaf(device_id(i), "telemetry")) for i in range(1, 21))  # noqa: E731
        wait_for(lambda: offline() == 20 and arrived() >= report.telemetry_acked, 10, "the last messages")
    finally:
        fleet.close()
        watch.close()
    assert report.connected == 20 and not report.errors
    assert report.malformed_commands == 1

    # everything it published is contract-valid, and everything it had acknowledged arrived
    parsers = {"status": parse_status, "telemetry": parse_telemetry, "events": parse_event}
    for topic, data in report.sent:
        _, leaf = parse_topic(topic)
        parsers[leaf](decode_payload(data))
    received = defaultdict(list)
    for m in fleet.messages:
        topics, leaf = parse_topic(m.topic)
        if leaf != "cmd":
            received[leaf].append((topics.device_id, parsers[leaf](decode_payload(m.payload))))
    assert len(received["telemetry"]) == report.telemetry_acked > 20 * 5
    for index in range(1, 21):
        dev = device_id(index)
        seqs = [t["seq"] for d, t in received["telemetry"] if d == dev]
        assert seqs == list(range(1, len(seqs) + 1)) and seqs[-1] == report.last_seq[dev]
        statuses = [s for d, s in received["status"] if d == dev]
        assert statuses[0]["state"] == "online" and statuses[0]["capabilities"]["runtimes"]
        assert statuses[-1]["state"] == "offline"

    # the deployments' events, as the OTA agent reports them
    ota = ["received", "downloading", "verifying", "staged", "health_check"]
    assert fleet.phases("sim-00001", "d-1")[:6] == [*ota, "active"]
    assert fleet.phases("sim-00002", "d-2") == [*ota, "failed", "rolled_back"]
    assert fleet.phases("sim-00001", "rb-1") == ["received", "health_check", "rolled_back"]
    duplicate = [e for e in fleet.leaf("sim-00001", "events") if e["cmd_id"] == "d-1"][6:]
    assert [(e["phase"], e["detail"]["duplicate"]) for e in duplicate] == [("received", True)]
    assert fleet.phases("sim-00003", "p-1") == ["pong"]
    bad = [e for e in fleet.leaf("sim-00004", "events") if e["cmd_id"] == "x-1"]
    assert [(e["phase"], e["detail"]["error"]) for e in bad] == [("failed", "CommandError")]
    assert fleet.phases("sim-00005", "c-1") == ["applied"]

    # the deployed model shows in the status and, slow on sim-00001, in the telemetry; the failed one does not
    t1 = fleet.leaf("sim-00001", "telemetry")
    assert any(t["model"]["version"] == 2 and t["latency_ms"]["p95"] == config.slow_latency_ms for t in t1)
    assert t1[-1]["model"]["version"] == 1  # rolled back
    # what the rollout benchmark measures: the slow telemetry, then the rollback command
    assert watch.latency_s is not None and 0 < watch.latency_s < 10
    assert all(t["model"]["version"] == 1 for t in fleet.leaf("sim-00002", "telemetry"))
    assert any(s.get("model", {}) and s["model"]["version"] == 2 for s in fleet.leaf("sim-00001", "status"))


@pytest.mark.timeout(60)
def test_a_message_count_ends_the_run_before_its_duration(mosquitto: Broker) -> None:
    """fleet_scale sends the same messages to every consumer it compares: ``count`` per device."""
    sim = Simulator(SimConfig(port=mosquitto.port, devices=5, rate=20.0, count=3, duration=30.0, fleet=FLEET))
    started = time.monotonic()
    report = asyncio.run(sim.run())
    assert time.monotonic() - started < 15
    assert report.telemetry_acked == 15 and set(report.last_seq.values()) == {3}
