"""Fixtures for the OTA agent tests: Mosquitto, the HTTP server, the fleet stand-in, agents and bundles.

The broker and HTTP server are the transport tests' real parts (``../agent/agent_parts.py``), reused.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))

from agent_parts import Broker, broker, broker_factory, http_server  # noqa: F401  (shared fixtures)
from ota_parts import FLEET, Fleet, connect_fleet
from runtime_bundles import BundleMaker, Keys

from device_runtime.agent import Agent, AgentConfig
from device_runtime.agent.mqtt import MqttSettings
from device_runtime.agent.ota import Limits
from sdk.signing import TrustedKeys


@pytest.fixture
def fleet_factory() -> Iterator[Callable[[int, str], Fleet]]:
    made: list[Fleet] = []

    def make(port: int, device_id: str = "dev1") -> Fleet:
        fleet = connect_fleet(port, device_id)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.close()
    violations = [v for fleet in made for v in fleet.violations]
    assert not violations, f"messages that break the MQTT contract: {violations}"


@pytest.fixture
def v1(make_bundle: BundleMaker) -> Path:
    return make_bundle(version=1)


@pytest.fixture
def v2(make_bundle: BundleMaker) -> Path:
    return make_bundle(version=2)


@pytest.fixture
def agent_factory(tmp_path: Path, keys: Keys) -> Iterator[Callable[..., Agent]]:
    """``agent_factory(port, bundle=None, device_id="dev1", start=True, wall_clock=time.time, **config) -> Agent``
    (stopped after)."""
    agents: list[Agent] = []

    def make(
        port: int,
        bundle: Path | None = None,
        *,
        device_id: str = "dev1",
        start: bool = True,
        wall_clock: Callable[[], float] = time.time,
        **overrides: Any,
    ) -> Agent:
        settings = MqttSettings(
            "127.0.0.1", port, device_id, fleet=FLEET, keepalive_s=5, backoff_base_s=0.05, backoff_cap_s=0.5,
            stop_timeout_s=2.0,
        )  # fmt: skip
        config = AgentConfig(
            state_dir=overrides.pop("state_dir", tmp_path / f"state-{device_id}"),
            mqtt=settings,
            trust=overrides.pop("trust", TrustedKeys.from_files([keys.public])),
            initial_bundle=bundle,
            telemetry_interval_s=overrides.pop("telemetry_interval_s", 60.0),
            download_read_timeout_s=overrides.pop("download_read_timeout_s", 5.0),
            download_deadline_s=overrides.pop("download_deadline_s", 30.0),
            health_timeout_s=overrides.pop("health_timeout_s", 10.0),
            intra_op_threads=1,
            limits=overrides.pop("limits", Limits()),
            **overrides,
        )
        agent = Agent(config, wall_clock=wall_clock)
        agents.append(agent)
        if start:
            agent.start()
        return agent

    yield make
    for agent in agents:
        agent.stop()


@pytest.fixture
def online(
    broker: Broker,  # noqa: F811  (the fixture imported above)
    agent_factory: Callable[..., Agent],
    fleet_factory: Callable[..., Fleet],
    v1: Path,
) -> Callable[..., tuple[Agent, Fleet]]:
    """``online(**config) -> (agent, fleet)``: an agent serving v1, its online status seen by the fleet."""

    def make(**config: object) -> tuple[Agent, Fleet]:
        fleet = fleet_factory(broker.port)
        agent = agent_factory(broker.port, v1, **config)
        fleet.wait_status(lambda s: s["state"] == "online" and s["model"] is not None, what="online with v1")
        return agent, fleet

    return make
