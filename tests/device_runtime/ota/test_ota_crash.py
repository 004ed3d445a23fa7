"""kill -9 during deployments: ``edgeship-device run`` as a real process, Mosquitto, the HTTP server.

After every kill and restart there must be exactly one good active model (the pointer's slot hashes
right and passes its health check), the deployment must be resumed or cleanly abandoned, and the
fleet must hear what happened.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_parts import Broker, HttpServer, wait_for
from ota_parts import AgentProcess, Fleet, check_one_good_model, deploy_cmd, helper_processes, journal_entries, settled
from runtime_bundles import BundleMaker, Keys

from device_runtime.agent.crash import DEPLOY_CRASH_POINTS

pytestmark = pytest.mark.timeout(180)
POLL_S = 0.05  # seconds between looks at the fleet and the state folder
HELPERS = ("device_runtime.agent.staging", "device_runtime.agent.linkproc")  # the agent's child processes


@pytest.fixture
def agent_process(tmp_path: Path, broker: Broker, keys: Keys, v1: Path) -> Iterator[Callable[..., AgentProcess]]:
    processes: list[AgentProcess] = []

    def make(device_id: str = "dev1") -> AgentProcess:
        proc = AgentProcess(tmp_path / f"state-{device_id}", broker.port, device_id, keys.public, v1)
        processes.append(proc)
        return proc

    yield make
    for proc in processes:
        proc.kill()


def _online(fleet: Fleet, version: int) -> Callable[[dict[str, object]], bool]:
    return lambda s: s["state"] == "online" and isinstance(s.get("model"), dict) and s["model"]["version"] == version  # type: ignore[index]


@pytest.mark.parametrize("point", DEPLOY_CRASH_POINTS)
def test_kill_at_each_step_then_restart(
    point: str,
    agent_process: Callable[..., AgentProcess],
    broker: Broker,
    fleet_factory: Callable[..., Fleet],
    http_server: HttpServer,
    v2: Path,
) -> None:
    fleet = fleet_factory(broker.port)
    agent = agent_process()
    agent.start(crash_at=point)
    fleet.wait_status(_online(fleet, 1), 20, "v1 online")
    assert agent.proc is not None
    pid = agent.proc.pid
    for module in HELPERS:
        wait_for(lambda m=module: helper_processes(pid, m), 20, f"the {module} process", POLL_S)
    http_server.state.body = v2.read_bytes()
    fleet.send(deploy_cmd(http_server.url, v2, "d1"))
    assert agent.wait_exit(30) == -9, agent.tail()
    for module in HELPERS:
        wait_for(lambda m=module: not helper_processes(pid, m), 5, f"the {module} process to die with it", POLL_S)
    fleet.wait_status(lambda s: s["state"] == "offline", 20, "the Last Will")

    agent.start()  # no crash hook this time
    active = fleet.wait_phase("d1", "active", 40)
    assert active["detail"].get("restarted") or any(e["detail"].get("restarted") for e in fleet.events("d1")), (
        "the restart must be reported"
    )
    fleet.wait_status(_online(fleet, 2), 20, "v2 online")
    wait_for(lambda: settled(agent.state_dir), 10, "the deployment to settle", POLL_S)
    assert check_one_good_model(agent.state_dir)["version"] == 2
    phases = fleet.phases("d1")
    assert "failed" not in phases, phases


def test_load_that_kills_the_process_is_not_retried_forever(
    agent_process: Callable[..., AgentProcess],
    broker: Broker,
    fleet_factory: Callable[..., Fleet],
    http_server: HttpServer,
    v2: Path,
) -> None:
    fleet = fleet_factory(broker.port)
    agent = agent_process()
    agent.start(crash_at="load")  # every start: this bundle "crashes the runtime" while loading
    fleet.wait_status(_online(fleet, 1), 20, "v1 online")
    http_server.state.body = v2.read_bytes()
    cmd = deploy_cmd(http_server.url, v2, "boom")
    fleet.send(cmd)
    crashes = 0
    while not any(p == "rolled_back" for p in fleet.phases("boom")):
        assert agent.wait_exit(30) == -9, agent.tail()
        crashes += 1
        assert crashes <= 3, f"retried {crashes} times: {fleet.phases('boom')}"
        agent.start(crash_at="load")
        deadline = time.monotonic() + 30
        while agent.alive and "rolled_back" not in fleet.phases("boom") and time.monotonic() < deadline:
            time.sleep(0.05)
    assert crashes == 2  # Limits.max_trial_attempts
    failed = next(e for e in fleet.events("boom") if e["phase"] == "failed")
    assert failed["detail"]["bad"] is True and "abandoned" in failed["detail"]["message"]
    fleet.wait_status(_online(fleet, 1), 20, "v1 still online")
    wait_for(lambda: settled(agent.state_dir), 10, "settled", POLL_S)
    assert check_one_good_model(agent.state_dir)["version"] == 1
    assert agent.alive
    # the same bundle is not tried again by a new deployment
    fleet.send(deploy_cmd(http_server.url, v2, "boom2"))
    assert fleet.wait_phase("boom2", "failed", 20)["detail"]["error"] == "BadBundle"
    assert agent.alive


def test_random_kills_during_a_deploy_loop(
    agent_process: Callable[..., AgentProcess],
    broker: Broker,
    fleet_factory: Callable[..., Fleet],
    http_server: HttpServer,
    make_bundle: BundleMaker,
) -> None:
    rng = random.Random(20260105)
    iterations = 15
    bundles = [make_bundle(version=10 + i) for i in range(iterations)]
    fleet = fleet_factory(broker.port)
    agent = agent_process()

    def start_and_wait_online() -> None:
        seen = len(fleet.statuses())
        agent.start()
        wait_for(
            lambda: any(s["state"] == "online" for s in fleet.statuses()[seen:]),
            20,
            "the restarted agent online",
            POLL_S,
        )

    start_and_wait_online()
    outcomes: dict[str, str] = {}
    for i, bundle in enumerate(bundles):
        http_server.state.body = bundle.read_bytes()
        cmd_id = f"loop-{i}"
        fleet.send(deploy_cmd(http_server.url, bundle, cmd_id))
        time.sleep(rng.uniform(0.0, 0.3))  # a deploy takes about 0.2 s here: kills land before, in and after it
        agent.kill()
        start_and_wait_online()

        def finished(cmd_id: str = cmd_id) -> bool:
            return any(p in ("active", "failed", "rolled_back") for p in fleet.phases(cmd_id)) or (
                settled(agent.state_dir) and not _in_journal(agent.state_dir, cmd_id)
            )

        wait_for(finished, 30, f"the outcome of {cmd_id}", POLL_S)
        wait_for(lambda: settled(agent.state_dir), 30, f"iteration {i} to settle", POLL_S)
        model = check_one_good_model(agent.state_dir)
        assert model["version"] in (1, *(10 + j for j in range(i + 1)))
        phases = fleet.phases(cmd_id)
        outcomes[cmd_id] = next((p for p in reversed(phases) if p in ("active", "failed", "rolled_back")), "lost")
    # the fleet's view and the device agree at the end
    final = check_one_good_model(agent.state_dir)
    fleet.wait_status(lambda s: s["state"] == "online" and s["model"] == final, 20, f"status showing {final}")
    assert "failed" not in outcomes.values(), outcomes  # a kill is not the bundle's fault: all resumed
    assert list(outcomes.values()).count("active") >= iterations - 2, outcomes


def _in_journal(state_dir: Path, cmd_id: str) -> bool:
    return cmd_id in (journal_entries(state_dir) or {})
