"""DeviceLink against a real Mosquitto: status and Last Will, durable telemetry, commands, reconnects."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from agent_parts import STATUS, Broker, LinkMaker, Subscriber, wait_for

from device_runtime.agent.mqtt import DeviceLink, MqttSettings, Topics
from device_runtime.agent.outbox import Outbox

pytestmark = pytest.mark.timeout(60)


def seqs(sub: Subscriber, topic: str) -> set[int]:
    return {m.json()["seq"] for m in sub.on(topic)}


def test_topics_and_settings() -> None:
    topics = Topics("plant-7", "pi-01")
    assert topics.status == "edgeship/v1/plant-7/pi-01/status"
    assert topics.telemetry.endswith("/telemetry") and topics.cmd.endswith("/cmd") and topics.events.endswith("/events")
    assert MqttSettings("h", 1883, "pi-01").effective_client_id == "edgeship-pi-01"
    for bad in ("", "a/b", "a+", "#", "a\x00"):
        with pytest.raises(ValueError, match="topic segment"):
            MqttSettings("h", 1883, bad)
    with pytest.raises(ValueError):
        MqttSettings("h", 0, "d")


def test_online_status_is_retained_for_a_late_subscriber(broker: Broker, make_link: LinkMaker, subscribe: Any) -> None:
    link = make_link(broker, "dev-status")
    assert link.wait_connected(10)
    wait_for(lambda: link.counters.connects == 1, 5, "the first connection")
    time.sleep(0.2)  # the status PUBACK
    late = subscribe(broker, link.topics.status)
    wait_for(lambda: late.on(link.topics.status), 5, "the retained status")
    message = late.on(link.topics.status)[0]
    assert message.retain
    status = message.json()
    assert status["state"] == "online" and status["schema"] == 1 and isinstance(status["ts"], float)
    assert status["model"] == STATUS["model"] and status["capabilities"] == STATUS["capabilities"]
    assert status["runtime"] == STATUS["runtime"]


def test_last_will_says_offline_when_the_device_process_is_killed(
    broker: Broker, subscribe: Any, tmp_path: Path
) -> None:
    topics = Topics("default", "dev-will")
    watcher = subscribe(broker, topics.status)
    script = Path(__file__).with_name("agent_device_process.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(broker.port), "dev-will", str(tmp_path / "will.db")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: any(m.json()["state"] == "online" for m in watcher.on(topics.status)), 20, "online status")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        wait_for(lambda: watcher.on(topics.status)[-1].json()["state"] == "offline", 10, "the Last Will")
        will = watcher.on(topics.status)[-1].json()
        assert will["schema"] == 1 and isinstance(will["ts"], float)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    late = subscribe(broker, topics.status)
    wait_for(lambda: late.on(topics.status), 5, "the retained will")
    assert late.on(topics.status)[0].retain and late.on(topics.status)[0].json()["state"] == "offline"


def test_stop_publishes_offline_status_and_nothing_else(broker: Broker, make_link: LinkMaker, subscribe: Any) -> None:
    topics = Topics("default", "dev-stop")
    everything = subscribe(broker, f"{topics.root}/#")
    link = make_link(broker, "dev-stop")
    assert link.wait_connected(10)
    for i in range(3):
        link.publish_telemetry({"count": i})
    link.publish_event({"cmd_id": "c1", "phase": "received", "detail": ""})
    assert link.wait_drained(10)
    started = time.monotonic()
    link.stop()
    assert time.monotonic() - started < 3
    assert not link.connected
    assert not [t for t in threading.enumerate() if t.name.startswith("edgeship-")]
    wait_for(lambda: len(everything.on(topics.status)) == 2, 5, "the offline status")
    time.sleep(0.3)  # anything extra would arrive now
    kinds = [(m.topic.rsplit("/", 1)[1], m.json().get("state")) for m in everything.messages]
    assert kinds.count(("telemetry", None)) == 3 and kinds.count(("events", None)) == 1
    assert [k for k in kinds if k[0] == "status"] == [("status", "online"), ("status", "offline")]
    assert len(kinds) == 6
    telemetry = [m.json() for m in everything.on(topics.telemetry)]
    assert [t["seq"] for t in telemetry] == [1, 2, 3]
    assert all(t["schema"] == 1 and t["dropped"] == 0 and "ts" in t for t in telemetry)
    event = everything.on(topics.events)[0].json()
    assert event["cmd_id"] == "c1" and event["phase"] == "received" and event["schema"] == 1
    counters = link.counters
    assert counters.published == 4 and counters.acked == 4 and counters.connects == 1


def test_telemetry_stream_survives_a_broker_restart(broker: Broker, make_link: LinkMaker, subscribe: Any) -> None:
    n = 300
    topics = Topics("default", "dev-stream")
    fleet = subscribe(broker, topics.telemetry, client_id="fleet-stream")
    link = make_link(broker, "dev-stream")
    assert link.wait_connected(10)
    for i in range(n):
        link.publish_telemetry({"count": i})
        if i == n // 3:
            broker.restart()  # mid-stream; the device keeps appending while the broker is away
        time.sleep(0.002)
    wait_for(lambda: seqs(fleet, topics.telemetry) == set(range(1, n + 1)), 45, f"all {n} seqs at the fleet")
    assert link.wait_drained(10)
    counters = link.counters
    assert counters.reconnects >= 1
    assert counters.acked >= n
    print(f"\nstream: {n} messages, {len(fleet.on(topics.telemetry))} received (duplicates allowed), {counters}")


def test_broker_down_at_start_then_queued_messages_drain(broker: Broker, make_link: LinkMaker, subscribe: Any) -> None:
    topics = Topics("default", "dev-late")
    fleet = subscribe(broker, f"{topics.root}/+", client_id="fleet-late")  # persistent session, then...
    broker.stop()  # ...the broker goes away before the device starts
    link = make_link(broker, "dev-late")
    for i in range(10):
        link.publish_telemetry({"count": i})
    link.publish_event({"cmd_id": "c9", "phase": "failed", "detail": "offline test"})
    wait_for(lambda: link.counters.connect_failures >= 2, 5, "failed connection attempts")
    assert not link.connected
    broker.start()
    wait_for(lambda: seqs(fleet, topics.telemetry) == set(range(1, 11)), 20, "the queued telemetry")
    wait_for(lambda: fleet.on(topics.events), 5, "the queued event")
    assert link.wait_drained(10)
    assert link.counters.connects == 1


def test_cmd_sent_while_the_device_is_offline_arrives_on_reconnect(
    broker: Broker, make_link: LinkMaker, subscribe: Any
) -> None:
    topics = Topics("default", "dev-cmd")
    fleet = subscribe(broker, f"{topics.root}/status", client_id="fleet-cmd")
    received: list[dict[str, Any]] = []
    first = make_link(broker, "dev-cmd", on_command=received.append)
    assert first.wait_connected(10)
    fleet.publish(topics.cmd, json.dumps({"schema": 1, "id": "ping-1", "type": "ping"}).encode())
    wait_for(lambda: bool(received), 5, "the first command")  # the subscription exists in the session
    first.stop()
    deploy = {
        "schema": 1,
        "id": "dep-1",
        "type": "deploy",
        "url": "http://x/b",
        "sha256": "00",
        "size": 1,
        "version": 2,
    }
    fleet.publish(topics.cmd, json.dumps(deploy).encode(), qos=1)
    broker.restart()  # the queued command survives the broker restart too (persistence)
    received_later: list[dict[str, Any]] = []
    second = make_link(broker, "dev-cmd", on_command=received_later.append)
    wait_for(lambda: bool(received_later), 10, "the command queued while offline")
    assert received_later == [deploy]
    assert second.counters.commands == 1


def test_malformed_commands_are_counted_and_the_loop_survives(
    broker: Broker, make_link: LinkMaker, subscribe: Any
) -> None:
    topics = Topics("default", "dev-bad")
    fleet = subscribe(broker, f"{topics.root}/status", client_id="fleet-bad")
    handled: list[str] = []

    def handler(cmd: dict[str, Any]) -> None:
        if cmd["type"] == "explode":
            raise RuntimeError("handler bug")
        handled.append(cmd["id"])

    link = make_link(broker, "dev-bad", on_command=handler)
    assert link.wait_connected(10)
    fleet.publish(topics.cmd, b'{"id": "warm-up", "type": "ping"}')
    wait_for(lambda: handled == ["warm-up"], 5, "the warm-up command")
    for bad in (b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'"just a string"', b""):
        fleet.publish(topics.cmd, bad)
    fleet.publish(topics.cmd, b'{"id": "boom", "type": "explode"}')
    fleet.publish(topics.cmd, b'{"id": "after", "type": "ping"}')
    wait_for(lambda: handled == ["warm-up", "after"], 5, "the command after the bad ones")
    counters = link.counters
    assert counters.malformed_cmds == 5
    assert counters.command_errors == 1
    assert counters.commands == 3
    assert link.connected and counters.connects == 1


def test_outbox_cap_while_offline_drops_oldest_and_reports_it(
    broker: Broker, make_link: LinkMaker, subscribe: Any
) -> None:
    topics = Topics("default", "dev-cap")
    fleet = subscribe(broker, topics.telemetry, client_id="fleet-cap")
    broker.stop()
    link = make_link(broker, "dev-cap", max_messages=5)
    for i in range(12):
        link.publish_telemetry({"count": i})
    broker.start()
    wait_for(lambda: seqs(fleet, topics.telemetry) == set(range(8, 13)), 20, "the 5 newest messages")
    assert link.wait_drained(10)
    assert link.publish_telemetry({"count": 12}) == 13
    wait_for(lambda: 13 in seqs(fleet, topics.telemetry), 10, "the report after the outage")
    last = next(m.json() for m in fleet.on(topics.telemetry) if m.json()["seq"] == 13)
    assert last["dropped"] == 7
    time.sleep(0.2)
    assert seqs(fleet, topics.telemetry) == set(range(8, 14))  # 1..7 were dropped, oldest first


def test_outbox_drain_rate_on_loopback(broker: Broker, make_link: LinkMaker, subscribe: Any, tmp_path: Path) -> None:
    """Not a benchmark gate: prints the rate, asserts only a floor a Raspberry Pi would also meet."""
    n = 1000
    topics = Topics("default", "dev-rate")
    fleet = subscribe(broker, topics.telemetry, client_id="fleet-rate")
    outbox = Outbox(tmp_path / "rate.db")
    broker.stop()
    link = make_link(broker, "dev-rate", outbox=outbox)
    started = time.monotonic()
    for i in range(n):
        link.publish_telemetry({"count": i})
    append_s = time.monotonic() - started
    broker.start()
    assert link.wait_connected(10)
    started = time.monotonic()
    assert link.wait_drained(30)
    drain_s = time.monotonic() - started
    wait_for(lambda: len(seqs(fleet, topics.telemetry)) == n, 20, "every message at the fleet")
    link.stop()
    outbox.close()
    print(f"\nappend: {n / append_s:.0f} msg/s (fsync each); drain after reconnect: {n / drain_s:.0f} msg/s")
    assert n / drain_s > 50


def test_a_failing_status_builder_still_gives_a_minimal_online_status(
    broker: Broker, subscribe: Any, tmp_path: Path
) -> None:
    topics = Topics("default", "dev-builder")
    watcher = subscribe(broker, topics.status)

    def broken() -> dict[str, Any]:
        raise RuntimeError("model not loaded yet")

    settings = MqttSettings("127.0.0.1", broker.port, "dev-builder", backoff_base_s=0.05)
    with Outbox(tmp_path / "b.db") as outbox, DeviceLink(settings, outbox, status=broken) as link:
        assert link.wait_connected(10)
        wait_for(lambda: watcher.on(topics.status), 5, "the minimal status")
        assert set(watcher.on(topics.status)[0].json()) == {"schema", "state", "ts"}


def test_bad_telemetry_is_refused_without_using_a_seq(tmp_path: Path) -> None:
    settings = MqttSettings("127.0.0.1", 1, "dev-nan")
    with Outbox(tmp_path / "n.db") as outbox:
        link = DeviceLink(settings, outbox, status=dict)  # never started: publishing only queues
        with pytest.raises(ValueError):
            link.publish_telemetry({"latency_ms": {"p50": float("nan")}})
        assert link.publish_telemetry({"count": 0}) == 1
        assert len(outbox) == 1
        link.stop()


def test_command_killed_before_its_handler_returned_is_redelivered(
    broker: Broker, make_link: LinkMaker, subscribe: Any, tmp_path: Path
) -> None:
    """The PUBACK waits for ``on_command``: a device killed before recording a command gets it again."""
    topics = Topics("default", "dev-ack")
    fleet = subscribe(broker, f"{topics.root}/status", client_id="fleet-ack")
    script = Path(__file__).with_name("agent_device_process.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(broker.port), "dev-ack", str(tmp_path / "ack.db"), "die-on-command"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"connected"
        fleet.publish(topics.cmd, json.dumps({"schema": 1, "id": "d-1", "type": "ping"}).encode(), qos=1)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    received: list[dict[str, Any]] = []
    make_link(broker, "dev-ack", on_command=received.append)  # the same client id: the broker's session
    wait_for(lambda: [c["id"] for c in received] == ["d-1"], 10, "the unacknowledged command, redelivered")
    time.sleep(0.5)
    assert len(received) == 1
