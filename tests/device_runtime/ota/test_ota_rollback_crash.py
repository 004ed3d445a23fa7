"""kill -9 during rollbacks: the ``rollback`` command and the automatic rollback after a failed health check.

``edgeship-device run`` as a real process, Mosquitto, the HTTP server, as in ``test_ota_crash.py``. After
every kill and restart there must be exactly one good active model (the pointer's slot hashes right and
passes its health check), the command journal and ``deploy.json`` must settle (nothing left queued or
running), and the fleet must hear the outcome.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_parts import Broker, HttpServer, wait_for
from ota_parts import AgentProcess, Fleet, check_one_good_model, deploy_cmd, journal_entries, settled
from runtime_bundles import GOLDEN_X, BundleMaker, Keys, linear_reference

from device_runtime.agent.crash import FAILURE_CRASH_POINTS, ROLLBACK_CRASH_POINTS

pytestmark = pytest.mark.timeout(120)
POLL_S = 0.05  # seconds between looks at the fleet and the state folder
ENDS = ("active", "failed", "rolled_back")


@pytest.fixture
def agent_process(tmp_path: Path, broker: Broker, keys: Keys, v1: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(tmp_path / "state-dev1", broker.port, "dev1", keys.public, v1)
    yield proc
    proc.kill()


def _start(agent: AgentProcess, fleet: Fleet, crash_at: str | None = None) -> None:
    """Start the agent and wait for its new ``online`` status (not one from before a kill)."""
    seen = len(fleet.statuses())
    agent.start(crash_at=crash_at)
    wait_for(lambda: any(s["state"] == "online" for s in fleet.statuses()[seen:]), 30, "the agent online", POLL_S)


def _settled_on(agent: AgentProcess, fleet: Fleet, version: int) -> None:
    """Journal and record settled; one good model, ``version``; the fleet's status says the same."""
    wait_for(lambda: settled(agent.state_dir), 20, "the journal and deploy.json to settle", POLL_S)
    assert check_one_good_model(agent.state_dir)["version"] == version
    fleet.wait_status(lambda s: s["state"] == "online" and s["model"]["version"] == version, 20, f"v{version}")


def _wrong_bundle(make_bundle: BundleMaker, version: int) -> Path:
    """Signed and valid, but its golden outputs are wrong: it fails the health check on the device."""
    return make_bundle(version=version, golden_outputs={"y": linear_reference(GOLDEN_X) + 1.0})


@pytest.mark.parametrize("point", ROLLBACK_CRASH_POINTS)
def test_kill_at_each_step_of_a_rollback_then_restart(
    point: str,
    agent_process: AgentProcess,
    broker: Broker,
    fleet_factory: Callable[..., Fleet],
    http_server: HttpServer,
    v2: Path,
) -> None:
    fleet = fleet_factory(broker.port)
    agent = agent_process
    _start(agent, fleet)
    http_server.state.body = v2.read_bytes()
    fleet.send(deploy_cmd(http_server.url, v2, "d1"))
    fleet.wait_phase("d1", "active", 30)
    _settled_on(agent, fleet, 2)
    agent.kill()
    _start(agent, fleet, crash_at=point)  # the hook armed only now: the deploy above ran without it

    fleet.send({"schema": 1, "id": "r1", "type": "rollback"})
    assert agent.wait_exit(30) == -9, agent.tail()
    _start(agent, fleet)
    committed = point == "pointer_written"  # killed after the pointer named v1's slot
    end = fleet.wait_phase("r1", "rolled_back" if committed else "failed", 30)
    assert end["detail"].get("restarted") is True, end
    _settled_on(agent, fleet, 1 if committed else 2)
    assert "active" not in fleet.phases("r1")
    assert journal_entries(agent.state_dir)["r1"]["state"] == "done"  # type: ignore[index]
    if not committed:  # nothing changed: the rollback target is intact, a new rollback reaches it
        fleet.send({"schema": 1, "id": "r2", "type": "rollback"})
        assert fleet.wait_phase("r2", "rolled_back", 30)["detail"]["model"]["version"] == 1
        _settled_on(agent, fleet, 1)


@pytest.mark.parametrize("point", ("load", "health_check", *FAILURE_CRASH_POINTS))
def test_kill_during_the_automatic_rollback_of_a_failed_health_check(
    point: str,
    agent_process: AgentProcess,
    broker: Broker,
    fleet_factory: Callable[..., Fleet],
    http_server: HttpServer,
    make_bundle: BundleMaker,
) -> None:
    fleet = fleet_factory(broker.port)
    agent = agent_process
    _start(agent, fleet, crash_at=point)  # start-up ignores the hook: v1 serves
    wrong = _wrong_bundle(make_bundle, 5)
    http_server.state.body = wrong.read_bytes()
    fleet.send(deploy_cmd(http_server.url, wrong, "h1"))
    assert agent.wait_exit(30) == -9, agent.tail()
    _start(agent, fleet)

    # load / health_check: the trial is retried (one attempt counted) and fails its check;
    # failure_recorded: the terminal record is on disk, the restart reports it again.
    fleet.wait_phase("h1", "rolled_back", 30)
    assert "active" not in fleet.phases("h1"), fleet.phases("h1")
    _settled_on(agent, fleet, 1)
    bad = json.loads((agent.state_dir / "bad.json").read_text())
    assert hashlib.sha256(wrong.read_bytes()).hexdigest() in bad, bad
    # the bundle is remembered as bad: a second deployment of it is refused before any download
    fleet.send(deploy_cmd(http_server.url, wrong, "h2"))
    assert fleet.wait_phase("h2", "failed", 20)["detail"]["error"] == "BadBundle"
    _settled_on(agent, fleet, 1)


def test_random_kills_during_rollbacks(
    agent_process: AgentProcess,
    broker: Broker,
    fleet_factory: Callable[..., Fleet],
    http_server: HttpServer,
    make_bundle: BundleMaker,
    v2: Path,
) -> None:
    """Alternately a ``rollback`` command and a deploy that fails its health check (the automatic
    rollback), each killed at a random moment (before, during or after it); seeded."""
    rng = random.Random(20260114)
    fleet = fleet_factory(broker.port)
    agent = agent_process
    _start(agent, fleet)
    http_server.state.body = v2.read_bytes()
    fleet.send(deploy_cmd(http_server.url, v2, "d0"))
    fleet.wait_phase("d0", "active", 30)
    _settled_on(agent, fleet, 2)
    version, outcomes = 2, {}
    for i in range(16):
        if i % 2 == 0:
            cmd = {"schema": 1, "id": f"r{i}", "type": "rollback"}
            ended = {"rolled_back": 3 - version, "failed": version}  # outcome -> the version then served
        else:
            wrong = _wrong_bundle(make_bundle, 10 + i)
            http_server.state.body = wrong.read_bytes()
            cmd = deploy_cmd(http_server.url, wrong, f"h{i}")
            ended = {"rolled_back": version, "failed": version}
        fleet.send(cmd)
        # a rollback takes a few ms to ~50 ms here after the broker has it, a failing deploy ~0.1 s (its
        # download and trial): kills land before, in and after them
        time.sleep(rng.uniform(0.0, 0.06 if i % 2 == 0 else 0.2))
        agent.kill()
        _start(agent, fleet)
        restarted = time.monotonic()
        cmd_id = str(cmd["id"])

        def finished(cmd_id: str = cmd_id, restarted: float = restarted) -> bool:
            if any(p in ("failed", "rolled_back") for p in fleet.phases(cmd_id)):
                return True
            # killed before its record: not run, and not redelivered either (unacknowledged, the broker
            # sends it again at once on the new session: give it time to arrive)
            entries = journal_entries(agent.state_dir)
            quiet = time.monotonic() - restarted > 2.0
            return quiet and settled(agent.state_dir) and entries is not None and cmd_id not in entries

        wait_for(finished, 30, f"the outcome of {cmd_id}", POLL_S)
        wait_for(lambda: settled(agent.state_dir), 20, f"iteration {i} to settle", POLL_S)
        model = check_one_good_model(agent.state_dir)
        phases = fleet.phases(cmd_id)
        outcome = next((p for p in reversed(phases) if p in ENDS), "lost")
        assert outcome != "active", phases  # a bundle that fails its check is never committed
        if outcome in ended:
            assert model["version"] == ended[outcome], (cmd_id, phases, model)
        else:
            assert model["version"] == version, (cmd_id, phases, model)
        version = model["version"]
        outcomes[cmd_id] = outcome + (
            "/restarted" if any(e["detail"].get("restarted") for e in fleet.events(cmd_id)) else ""
        )
        fleet.wait_status(lambda s, v=version: s["state"] == "online" and s["model"]["version"] == v, 20, f"v{version}")
    # "lost": killed before the command was journaled (no PUBACK; the broker redelivers it, de-duplicated
    # by id if it was recorded after all). A kill is not the bundle's fault, and a rollback is never lost
    # half-way: each one either switched the slot or changed nothing.
    assert {o.split("/")[0] for o in outcomes.values()} <= {"failed", "rolled_back", "lost"}, outcomes
