"""The core of the contract against the embedded amqtt broker (``edgeship broker``) instead of Mosquitto."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from agent_parts import HttpServer, free_port, wait_for
from ota_parts import Fleet, deploy_cmd, unique_seqs

from device_runtime.agent import Agent
from fleet.broker import EmbeddedBroker, start_broker_thread

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def embedded() -> Iterator[EmbeddedBroker]:
    broker = start_broker_thread("127.0.0.1", free_port())
    yield broker
    broker.stop()


def test_status_telemetry_deploy_and_redelivery_on_amqtt(
    embedded: EmbeddedBroker,
    agent_factory: Callable[..., Agent],
    fleet_factory: Callable[..., Fleet],
    http_server: HttpServer,
    v1: Path,
    v2: Path,
) -> None:
    fleet = fleet_factory(embedded.port)
    agent = agent_factory(embedded.port, v1, telemetry_interval_s=0.1)
    fleet.wait_status(lambda s: s["state"] == "online" and s["model"]["version"] == 1, what="online v1")
    wait_for(lambda: len(unique_seqs(fleet.telemetry())) >= 3, 10, "telemetry")
    seqs = unique_seqs(fleet.telemetry())
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

    http_server.state.body = v2.read_bytes()
    cmd = deploy_cmd(http_server.url, v2, "e1")
    fleet.send(cmd)
    fleet.wait_phase("e1", "active", 30)
    assert agent.active_model is not None and agent.active_model["version"] == 2
    assert agent.predict({"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 3)
    fleet.wait_status(lambda s: s["model"]["version"] == 2, what="v2 in status")
    requests = len(http_server.state.requests)
    fleet.send(cmd)  # redelivered
    wait_for(lambda: any(e["detail"].get("duplicate") for e in fleet.events("e1")), 10, "the duplicate acknowledged")
    time.sleep(0.3)
    assert len(http_server.state.requests) == requests
    assert fleet.phases("e1").count("active") == 1

    agent.stop()  # a clean stop publishes the retained offline status itself
    fleet.wait_status(lambda s: s["state"] == "offline", what="offline")
