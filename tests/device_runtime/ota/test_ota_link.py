"""The agent's telemetry and commands across broker outages (real Mosquitto, agent in-process)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_parts import Broker, wait_for
from ota_parts import Fleet, unique_seqs

from device_runtime.agent import Agent
from device_runtime.agent.outbox import Outbox

pytestmark = pytest.mark.timeout(120)


def test_broker_restarted_during_telemetry_loses_no_seq(
    broker: Broker, agent_factory: Callable[..., Agent], fleet_factory: Callable[..., Fleet], v1: Path
) -> None:
    fleet = fleet_factory(broker.port)
    agent = agent_factory(broker.port, v1, telemetry_interval_s=0.05)
    wait_for(lambda: len(fleet.telemetry()) >= 5, 10, "telemetry before the restart")
    for _ in range(2):
        broker.restart()
        time.sleep(0.5)  # telemetry keeps being produced while the link reconnects
    assert agent.link.wait_connected(10)
    last = agent.publish_telemetry()
    wait_for(lambda: last in unique_seqs(fleet.telemetry()), 15, f"seq {last} at the fleet")
    seqs = unique_seqs(fleet.telemetry())
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "a seq was lost"
    assert seqs[0] == 1
    assert agent.link.counters.reconnects >= 2


def test_broker_down_at_agent_start(
    broker: Broker,
    agent_factory: Callable[..., Agent],
    fleet_factory: Callable[..., Fleet],
    v1: Path,
) -> None:
    # The fleet's persistent session exists before the outage, so the broker queues for it whatever the
    # agent sends after the restart, whichever of the two reconnects first.
    fleet = fleet_factory(broker.port)
    broker.stop()
    agent = agent_factory(broker.port, v1, telemetry_interval_s=0.1)
    time.sleep(1.0)
    assert not agent.link.connected
    np_ok = agent.predict({"x": [[1.0, 2.0, 3.0, 4.0]]})  # serving does not wait for the broker
    assert np_ok["y"].shape == (1, 3)
    broker.start()
    assert agent.link.wait_connected(10)
    fleet.wait_status(lambda s: s["state"] == "online" and s["model"]["version"] == 1, what="online")
    wait_for(lambda: len(unique_seqs(fleet.telemetry())) >= 8, 10, "queued and new telemetry")
    seqs = unique_seqs(fleet.telemetry())
    assert seqs[:8] == list(range(1, 9))  # what was produced while the broker was down arrives
    assert fleet.events() and fleet.events()[0]["phase"] == "active"  # the boot event, queued before connect


def test_agent_offline_then_back_drains_a_bounded_outbox(
    broker: Broker, agent_factory: Callable[..., Agent], fleet_factory: Callable[..., Fleet], v1: Path
) -> None:
    fleet = fleet_factory(broker.port)
    # telemetry is produced by hand below, so nothing new pushes the backlog out before the reconnect
    agent = agent_factory(broker.port, v1, telemetry_interval_s=3600, outbox_max_messages=20)
    fleet.wait_status(lambda s: s["state"] == "online", what="online")
    before = agent.publish_telemetry()
    wait_for(lambda: before in unique_seqs(fleet.telemetry()), 10, "telemetry before the outage")
    assert agent.link.wait_drained(10)  # its PUBACK is in: the outbox starts the outage empty
    broker.stop()
    wait_for(lambda: not agent.link.connected, 10, "the link to notice")
    produced = [agent.publish_telemetry() for _ in range(75)]  # 75 messages into a 20-message outbox
    with Outbox(agent.state_dir / "outbox.sqlite") as outbox:  # the link process's, read from here
        assert len(outbox) == 20
        dropped = outbox.dropped
    assert dropped == 55
    broker.start()
    assert agent.link.wait_connected(10)
    # the newest 20 reach the fleet; the oldest 55 were dropped, counted, and reported
    wait_for(lambda: produced[-1] in unique_seqs(fleet.telemetry()), 10, f"the backlog up to seq {produced[-1]}")
    after_outage = [s for s in unique_seqs(fleet.telemetry()) if s > before]
    assert after_outage == produced[-20:]
    last = next(t for t in fleet.telemetry() if t["seq"] == produced[-1])
    assert last["dropped"] == dropped - 1  # drops so far when it was queued; queuing it dropped one more
    assert agent.link.wait_drained(10)
