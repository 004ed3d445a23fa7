"""Issue 14: what a deploy may reach and write (item 5), bounded state and replay (item 6), a full or
read-only disk (item 8); the agent in-process against a real Mosquitto and a real HTTP server."""

from __future__ import annotations

import errno
import io
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest
from agent_parts import Broker, HttpServer, wait_for
from ota_parts import Fleet, assert_serves_v, deploy_cmd, serve

import device_runtime.agent._records as records_module
from device_runtime.agent import Agent
from device_runtime.agent.download import Downloader

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def running(online: Callable[..., tuple[Agent, Fleet]]) -> tuple[Agent, Fleet]:
    return online()


# -- item 5 ----------------------------------------------------------------------------------------------


def test_deploy_url_on_a_host_not_allowed_fails_without_a_connection(
    running: tuple[Agent, Fleet], http_server: HttpServer, v2: Path
) -> None:
    agent, fleet = running
    serve(http_server, v2)
    # 127.0.0.2 is loopback but not the broker's host (127.0.0.1): refused before connecting.
    fleet.send(deploy_cmd(http_server.url.replace("127.0.0.1", "127.0.0.2"), v2, "elsewhere"))
    failed = fleet.wait_phase("elsewhere", "failed", 30)
    assert failed["detail"]["error"] == "TransportError" and failed["detail"]["bad"] is False
    assert "not allowed" in failed["detail"]["message"]
    assert http_server.state.requests == []
    assert_serves_v(agent, 1)


def test_the_brokers_host_is_allowed_also_with_only_allowed_hosts(
    online: Callable[..., tuple[Agent, Fleet]], http_server: HttpServer, v2: Path
) -> None:
    agent, fleet = online(allow_hosts=("10.0.0.0/8",), public_hosts=False)  # the fleet beside its broker
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "lan"))
    fleet.wait_phase("lan", "active", 30)
    assert_serves_v(agent, 2)


# -- item 8 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("staging_process", [False])
def test_a_full_disk_during_the_download_fails_the_deployment_and_keeps_serving(
    online: Callable[..., tuple[Agent, Fleet]],
    http_server: HttpServer,
    v2: Path,
    monkeypatch: pytest.MonkeyPatch,
    staging_process: bool,
) -> None:
    class FullDisk(io.BytesIO):
        def write(self, data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_part(self: Downloader, path: Path, mode: str) -> BinaryIO:
        open(path, mode).close()
        return FullDisk()

    monkeypatch.setattr(Downloader, "_open_part", open_part)  # the OTA thread downloads (no helper)
    agent, fleet = online(staging_process=staging_process)
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "full"))
    failed = fleet.wait_phase("full", "failed", 30)
    assert failed["detail"]["error"] == "StateError" and failed["detail"]["bad"] is False
    assert "No space left" in failed["detail"]["message"]
    assert agent.wait_idle(10)
    fleet.wait_status(lambda s: s["deployment"] is None, what="no deployment in progress")
    assert list((agent.state_dir / "downloads").iterdir()) == []
    assert_serves_v(agent, 1)


def test_a_read_only_state_dir_still_serves_and_reports(
    broker: Broker,
    agent_factory: Callable[..., Agent],
    fleet_factory: Callable[..., Fleet],
    http_server: HttpServer,
    v1: Path,
    v2: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = agent_factory(broker.port, v1)
    assert_serves_v(first, 1)
    state = first.state_dir
    first.stop()
    # Nothing can be written there any more: every JSON record write fails as on a read-only mount, and
    # the outbox and downloads folder cannot be opened or created (a file system without root tricks).
    for leftover in state.glob("outbox.sqlite*"):
        leftover.unlink()
    (state / "outbox.sqlite").mkdir()
    shutil.rmtree(state / "downloads")
    (state / "downloads").write_bytes(b"")
    (state / "commands.jsonl").unlink(missing_ok=True)
    (state / "commands.jsonl").mkdir()  # the journal cannot be appended to

    def read_only(path: object, data: bytes, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(records_module, "atomic_write_bytes", read_only)
    fleet = fleet_factory(broker.port)
    agent = agent_factory(broker.port, v1)
    assert_serves_v(agent, 1)
    fleet.wait_status(lambda s: s["state"] == "online" and s["model"] is not None, what="online with v1")
    # the event is published once the link is up, which can come after the first status (a loaded machine)
    wait_for(lambda: any(e["phase"] == "failed" for e in fleet.events(None)), 15, "the state directory event")
    problem = next(e for e in fleet.events(None) if e["phase"] == "failed")
    assert problem["detail"]["error"] == "StateError"
    # A command that cannot be journaled is not run (it could not be de-duplicated) and says why.
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "ro"))
    failed = fleet.wait_phase("ro", "failed", 20)
    assert failed["detail"]["error"] == "StateError" and "could not be recorded" in failed["detail"]["message"]
    assert http_server.state.requests == []
    assert_serves_v(agent, 1)


# -- item 6 ----------------------------------------------------------------------------------------------


def test_a_queued_deploy_can_be_cancelled_and_the_queue_is_bounded(
    online: Callable[..., tuple[Agent, Fleet]], http_server: HttpServer, v2: Path
) -> None:
    agent, fleet = online(max_queued_commands=1)
    serve(http_server, v2, "trickle")  # the first deployment downloads for a long time
    fleet.send(deploy_cmd(http_server.url, v2, "slow"))
    fleet.wait_phase("slow", "downloading", 20)
    fleet.send(deploy_cmd(http_server.url, v2, "waiting"))
    fleet.wait_phase("waiting", "received")
    fleet.send(deploy_cmd(http_server.url, v2, "one-too-many"))
    assert fleet.wait_phase("one-too-many", "failed")["detail"]["error"] == "QueueFull"
    fleet.send({"schema": 1, "id": "cancel-1", "type": "cancel", "target": "waiting"})
    assert fleet.wait_phase("waiting", "failed")["detail"]["error"] == "Cancelled"
    assert fleet.wait_phase("cancel-1", "applied")["detail"]["cancelled"] == "waiting"
    fleet.send({"schema": 1, "id": "cancel-2", "type": "cancel", "target": "slow"})  # running: too late
    assert fleet.wait_phase("cancel-2", "failed")["detail"]["error"] == "NotCancellable"
    fleet.send(deploy_cmd(http_server.url, v2, "waiting"))  # the cancelled id is done, not run again
    wait_for(lambda: any(e["detail"].get("duplicate") for e in fleet.events("waiting")), 10, "a duplicate")
    assert_serves_v(agent, 1)


def test_old_and_expired_commands_are_refused(running: tuple[Agent, Fleet], http_server: HttpServer, v2: Path) -> None:
    import time

    agent, fleet = running
    now = time.time()
    fleet.send({"schema": 1, "id": "old-ping", "type": "ping", "issued_at": now - 8 * 86400})
    assert fleet.wait_phase("old-ping", "failed")["detail"]["error"] == "Replay"
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "late", issued_at=now - 60, expires_at=now - 1))
    assert fleet.wait_phase("late", "failed")["detail"]["error"] == "Expired"
    fleet.send(deploy_cmd(http_server.url, v2, "fresh", issued_at=now, expires_at=now + 600))
    fleet.wait_phase("fresh", "active", 30)
    assert http_server.state.requests and len(http_server.state.requests) == 1
    assert_serves_v(agent, 2)
