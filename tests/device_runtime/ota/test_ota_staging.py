"""The staging helper process (``device_runtime.agent.staging``): its failures, ``stop()`` during a job, the
in-thread mode, and the helper ending with the agent. Real Mosquitto, real HTTP server, real bundles."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_parts import Broker, HttpServer, wait_for
from ota_parts import Fleet, assert_serves_v, deploy_cmd, serve
from runtime_bundles import BundleMaker

from device_runtime.agent import Agent
from device_runtime.agent.mqtt import DeviceLink

pytestmark = pytest.mark.timeout(120)


def helper_pid(agent: Agent) -> int:
    stager = agent._deployer._stager
    assert stager is not None
    wait_for(lambda: stager.pid is not None, 20, "the staging helper to start")
    pid = stager.pid
    assert pid is not None
    return pid


def test_helper_killed_mid_download_fails_only_that_deployment(
    online: Callable[..., tuple[Agent, Fleet]], http_server: HttpServer, v2: Path
) -> None:
    agent, fleet = online()
    first = helper_pid(agent)
    serve(http_server, v2, "trickle")
    fleet.send(deploy_cmd(http_server.url, v2, "d1"))
    fleet.wait_phase("d1", "downloading", 20)
    wait_for(lambda: len(http_server.state.requests) > 0, 10, "the download to start")
    os.kill(first, signal.SIGKILL)
    failed = fleet.wait_phase("d1", "failed", 20)
    assert failed["detail"]["error"] == "StagingDied" and failed["detail"]["bad"] is False, failed
    assert "rolled_back" not in fleet.phases("d1")
    assert_serves_v(agent, 1)
    # the next deployment gets a new helper and goes through
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "d2"))
    fleet.wait_phase("d2", "active", 30)
    assert_serves_v(agent, 2)
    assert helper_pid(agent) != first


def test_stop_during_a_download_is_prompt_and_the_next_start_resumes(
    broker: Broker,
    online: Callable[..., tuple[Agent, Fleet]],
    agent_factory: Callable[..., Agent],
    http_server: HttpServer,
    v1: Path,
    v2: Path,
) -> None:
    agent, fleet = online()
    pid = helper_pid(agent)
    serve(http_server, v2, "trickle")  # minutes at this pace
    fleet.send(deploy_cmd(http_server.url, v2, "d1"))
    fleet.wait_phase("d1", "downloading", 20)
    started = time.monotonic()
    agent.stop()
    assert time.monotonic() - started < 5
    wait_for(lambda: not _alive(pid), 5, "the helper to end")
    assert (agent.state_dir / "deploy.json").exists(), "the deployment is kept for the next start"

    serve(http_server, v2)
    again = agent_factory(broker.port, v1, state_dir=agent.state_dir)
    active = fleet.wait_phase("d1", "active", 30)
    assert active["detail"]["model"]["version"] == 2
    assert any(e["detail"].get("restarted") for e in fleet.events("d1"))
    assert_serves_v(again, 2)


def test_staging_on_the_agent_thread(
    online: Callable[..., tuple[Agent, Fleet]], http_server: HttpServer, v2: Path, make_bundle: BundleMaker
) -> None:
    agent, fleet = online(staging_process=False)
    assert agent._deployer._stager is None
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "d1"))
    fleet.wait_phase("d1", "active", 30)
    assert fleet.phases("d1") == ["received", "downloading", "verifying", "staged", "health_check", "active"]
    assert_serves_v(agent, 2)
    older = make_bundle(version=0)
    serve(http_server, older)
    fleet.send(deploy_cmd(http_server.url, older, "d2"))
    assert fleet.wait_phase("d2", "failed", 30)["detail"]["error"] == "RollbackError"
    assert_serves_v(agent, 2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill 0: its status in /proc says so
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except FileNotFoundError:
        return False


def test_helper_processes_that_cannot_start_fall_back_to_the_agent_threads(
    online: Callable[..., tuple[Agent, Fleet]], http_server: HttpServer, v2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")  # what the helpers would be started with
    agent, fleet = online()
    assert isinstance(agent.link, DeviceLink)  # the MQTT link on the agent's threads, and it works
    wait_for(lambda: agent._deployer._stager is None, 20, "the agent to give up on the staging helper")
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "d1"))
    fleet.wait_phase("d1", "active", 30)
    assert_serves_v(agent, 2)
