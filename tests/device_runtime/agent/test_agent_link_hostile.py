"""Issue 14: hostile commands, events the broker refuses, and messages for other devices, against real brokers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from agent_parts import Broker, LinkMaker, free_port, wait_for

from device_runtime.agent.mqtt import Topics
from device_runtime.agent.outbox import Outbox
from fleet.broker import start_broker_thread
from sdk.mqtt_contract import MAX_EVENT_BYTES, parse_event

pytestmark = pytest.mark.timeout(60)

HOSTILE = [
    b'{"id": "h1", "type": "ping", "n": 1' + b"0" * 5000 + b"}",  # an int over Python's 4300-digit limit
    b'{"id": "h2", "type": "ping", "n": ' + b"[" * 20000 + b"]" * 20000 + b"}",  # deep nesting
    b'{"id": "h3", "type": "ping", "n": ' + b'{"a":' * 900 + b"1" + b"}" * 900 + b"}",
    b'{"id": "h4", "type": "deploy", "n": 1e400}',  # infinity: no journal can store it
    b'{"id": "\\ud800", "type": "ping"}',  # a lone surrogate: no UTF-8 for it
]


def _events(sub: Any, topics: Topics) -> list[dict[str, Any]]:
    return [m.json() for m in sub.on(topics.events)]


def test_hostile_command_payloads_are_acknowledged_and_the_link_stays_up(
    broker: Broker, make_link: LinkMaker, subscribe: Any
) -> None:
    topics = Topics("default", "dev-hostile")
    fleet = subscribe(broker, topics.events, client_id="fleet-hostile")
    handled: list[str] = []
    link = make_link(broker, "dev-hostile", on_command=lambda c: handled.append(c["id"]))
    assert link.wait_connected(10)
    for bad in HOSTILE:
        fleet.publish(topics.cmd, bad)
    fleet.publish(topics.cmd, b'{"id": "after", "type": "ping"}')
    wait_for(lambda: handled == ["after"], 10, "the command after the hostile ones")
    counters = link.counters
    assert counters.malformed_cmds == len(HOSTILE)
    assert link.connected and counters.connects == 1
    link.stop()
    # Every one was acknowledged: the same session gets none of them again.
    again: list[dict[str, Any]] = []
    second = make_link(broker, "dev-hostile", on_command=again.append)
    assert second.wait_connected(10)
    time.sleep(0.5)
    assert again == [] and second.counters.malformed_cmds == 0


def test_a_handler_that_raises_still_answers_with_one_bounded_failed_event(
    broker: Broker, make_link: LinkMaker, subscribe: Any
) -> None:
    topics = Topics("default", "dev-raise")
    fleet = subscribe(broker, topics.events, client_id="fleet-raise")
    handled: list[str] = []

    def handler(cmd: dict[str, Any]) -> None:
        if cmd["type"] == "explode":
            raise RecursionError("x" * 20_000)
        handled.append(cmd["id"])

    link = make_link(broker, "dev-raise", on_command=handler)
    assert link.wait_connected(10)
    fleet.publish(topics.cmd, json.dumps({"id": "boom", "type": "explode"}).encode())
    fleet.publish(topics.cmd, json.dumps({"id": "y" * 100_000, "type": "explode"}).encode())
    fleet.publish(topics.cmd, b'{"id": "after", "type": "ping"}')
    wait_for(lambda: handled == ["after"] and len(_events(fleet, topics)) == 2, 10, "two failed events, then a ping")
    raw = [m.payload for m in fleet.on(topics.events)]
    assert all(len(data) <= MAX_EVENT_BYTES for data in raw)
    events = [parse_event(json.loads(data)) for data in raw]
    assert [(e["cmd_id"], e["phase"], e["detail"]["error"]) for e in events] == [
        ("boom", "failed", "RecursionError"),
        (None, "failed", "RecursionError"),  # an invalid id is not echoed
    ]
    assert link.counters.command_errors == 2 and link.counters.connects == 1


def test_an_event_the_broker_refuses_is_set_aside_and_the_rest_flows(
    broker_factory: Any, make_link: LinkMaker, subscribe: Any, tmp_path: Path
) -> None:
    """Mosquitto closes the connection on a packet over ``max_packet_size``, on every try: the head of
    the outbox must not block everything behind it, across restarts too."""
    port = free_port()
    config = "\n".join([f"listener {port} 127.0.0.1", "allow_anonymous true", "max_packet_size 4096"])
    small = broker_factory(port=port, config=config)
    topics = Topics("default", "dev-big")
    fleet = subscribe(small, topics.events, client_id="fleet-big")
    telemetry = subscribe(small, topics.telemetry, client_id="fleet-big-telemetry")
    outbox = Outbox(tmp_path / "big.db")
    try:
        link = make_link(small, "dev-big", outbox=outbox)
        assert link.wait_connected(10)
        link.publish_event({"cmd_id": "a", "phase": "pong", "detail": {"message": "before"}})
        assert link.wait_drained(10)
        link.publish_event({"cmd_id": "big", "phase": "failed", "detail": {"message": "x" * 10_000}})
        for i in range(5):
            link.publish_event({"cmd_id": f"after-{i}", "phase": "pong", "detail": {"message": "after"}})
        wait_for(lambda: len(_events(fleet, topics)) >= 6, 30, "the events behind the refused one")
        assert link.wait_drained(10)
        assert [e["cmd_id"] for e in _events(fleet, topics)] == ["a"] + [f"after-{i}" for i in range(5)]
        assert link.counters.dead_letters == 1 and outbox.dead_letters == 1
        assert link.connected
        link.publish_telemetry({"count": 0})  # the count is reported to the fleet
        wait_for(lambda: len(telemetry.on(topics.telemetry)) == 1, 10, "telemetry")
        assert telemetry.on(topics.telemetry)[0].json()["dead_letters"] == 1
        link.stop()
    finally:
        outbox.close()


def test_messages_on_other_topics_are_not_handled(broker: Broker, make_link: LinkMaker, subscribe: Any) -> None:
    """A broker that hands a device another device's messages (amqtt did, retained ones) must not make it act."""
    own, other = Topics("default", "pi-19"), Topics("default", "pi-17")
    fleet = subscribe(broker, own.events, client_id="fleet-topic")
    fleet.publish(other.cmd, b'{"id": "not-mine", "type": "ping"}', retain=True)
    fleet.publish(other.status, b'{"schema": 1, "state": "online", "ts": 1.0}', retain=True)
    handled: list[str] = []
    link = make_link(broker, "pi-19", on_command=lambda c: handled.append(c["id"]))
    assert link.wait_connected(10)
    link._client.subscribe(f"{other.root}/#", qos=1)  # stand-in for a broker that gets it wrong
    wait_for(lambda: link.counters.foreign_msgs == 2, 10, "the two retained messages of pi-17")
    fleet.publish(own.cmd, b'{"id": "mine", "type": "ping"}')
    wait_for(lambda: handled == ["mine"], 10, "the device's own command")
    assert link.counters.commands == 1 and link.counters.malformed_cmds == 0
    assert _events(fleet, own) == []  # no spurious failed event per foreign message


def test_the_embedded_broker_sends_retained_messages_only_to_their_subscribers(
    make_link: LinkMaker, subscribe: Any
) -> None:
    embedded = start_broker_thread("127.0.0.1", free_port())
    try:
        own, other = Topics("default", "pi-19"), Topics("default", "pi-17")
        fleet = subscribe(embedded, "edgeship/v1/default/+/status", client_id="fleet-amqtt")  # every status
        pi17 = subscribe(embedded, other.cmd, client_id="edgeship-pi-17-stand-in")
        fleet.publish(other.cmd, b'{"id": "retained-ping", "type": "ping"}', retain=True)
        fleet.publish(other.status, b'{"schema": 1, "state": "online", "ts": 1.0}', retain=True)
        wait_for(lambda: len(pi17.on(other.cmd)) == 1, 5, "pi-17's command")
        handled: list[str] = []
        link = make_link(embedded, "pi-19", on_command=lambda c: handled.append(c["id"]))  # type: ignore[arg-type]
        assert link.wait_connected(10)
        watcher = subscribe(embedded, own.cmd, client_id="watcher-amqtt")
        time.sleep(0.5)
        assert handled == [] and link.counters.foreign_msgs == 0 and link.counters.malformed_cmds == 0
        assert watcher.messages == []
        late = subscribe(embedded, other.cmd, client_id="late-amqtt")  # a retained message still reaches its own
        wait_for(lambda: [m.retain for m in late.on(other.cmd)] == [True], 5, "the retained command on subscribe")
    finally:
        embedded.stop()
