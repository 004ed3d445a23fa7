"""The MQTT link process (``device_runtime.agent.linkproc``): killed alone it is replaced without losing an
event or a command; an unusable outbox fails ``start()``; the in-process link still works. Real
Mosquitto, real HTTP server, real bundles. (That it dies with the agent: ``test_ota_crash.py``.)"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_parts import Broker, HttpServer, wait_for
from ota_parts import Fleet, assert_serves_v, deploy_cmd, serve

from device_runtime.agent import Agent
from device_runtime.agent.linkproc import LinkProcess
from device_runtime.agent.mqtt import DeviceLink
from device_runtime.errors import StateError

pytestmark = pytest.mark.timeout(120)


def test_a_link_process_killed_alone_is_replaced_and_loses_no_event_or_command(
    online: Callable[..., tuple[Agent, Fleet]], http_server: HttpServer, v2: Path
) -> None:
    agent, fleet = online()
    link = agent.link
    assert isinstance(link, LinkProcess)
    old = link.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(StateError, match="link process"):  # no durable seq without one: said at once
        agent.publish_telemetry()
    assert time.monotonic() - started < 5
    # reported while no link process runs: kept by the agent and handed to the next one
    agent._event("probe-1", "received", "reported while the link process was down")  # a contract phase
    fleet.send({"schema": 1, "id": "ping-1", "type": "ping"})  # queued by the broker for the session
    wait_for(lambda: link.pid not in (None, old), 20, "a new link process")
    assert link.wait_connected(20)
    wait_for(lambda: fleet.events("probe-1"), 20, "the event reported meanwhile")
    fleet.wait_phase("ping-1", "pong", 20)
    states = [s["state"] for s in fleet.statuses()]
    assert "offline" in states[states.index("online") :], states  # the killed one's Last Will
    fleet.wait_status(lambda s: s["state"] == "online" and s["model"]["version"] == 1, what="online again")
    # and a deployment goes through the new one
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "d1"))
    fleet.wait_phase("d1", "active", 30)
    assert_serves_v(agent, 2)
    fleet.wait_status(lambda s: s["model"]["version"] == 2, what="v2 in the status")
    assert agent.publish_telemetry() > 0


def test_an_unusable_outbox_does_not_stop_the_agent_from_serving(
    broker: Broker, agent_factory: Callable[..., Agent], v1: Path, tmp_path: Path
) -> None:
    # A state dir that cannot hold the outbox (a read-only or broken disk) no longer stops the agent: it
    # serves the model it has with an outbox in memory and reports the failure (issue 14, item 8).
    state = tmp_path / "state"
    (state / "outbox.sqlite").mkdir(parents=True)  # a folder where the database file should be
    agent = agent_factory(broker.port, v1, state_dir=state, start=False)
    agent.start()
    assert_serves_v(agent, 1)


def test_the_link_on_the_agent_threads_still_works(
    online: Callable[..., tuple[Agent, Fleet]], http_server: HttpServer, v2: Path
) -> None:
    agent, fleet = online(link_process=False)
    assert isinstance(agent.link, DeviceLink)
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "d1"))
    fleet.wait_phase("d1", "active", 30)
    assert fleet.phases("d1") == ["received", "downloading", "verifying", "staged", "health_check", "active"]
    assert_serves_v(agent, 2)


def test_a_burst_of_events_flows_through_both_pipes(online: Callable[..., tuple[Agent, Fleet]]) -> None:
    """Thousands of events at once, faster than the outbox takes them: the pipe to the link process and
    the confirmations coming back fill up; every event is confirmed (``flush`` returns), drained and
    delivered once."""
    agent, fleet = online()
    link = agent.link
    assert isinstance(link, LinkProcess)
    started = time.monotonic()
    for i in range(5000):
        agent._event("burst", "received", "x" * 100, i=i)
    link.flush(60)  # raises StateError if the link process never confirms them
    assert link.unconfirmed_events() == []
    assert link.wait_drained(60)
    assert time.monotonic() - started < 60
    wait_for(lambda: len(fleet.events("burst")) >= 5000, 30, "the burst at the fleet")
    assert {e["detail"]["i"] for e in fleet.events("burst")} == set(range(5000))
