"""End-to-end rollouts with real processes: ``edgeship fleet serve``, ``edgeship-device run`` agents, Mosquitto.

Each test starts its own fleet server (SQLite in its tmp folder, or the session's PostgreSQL) and its own
agents (one state folder and device id each, serving v1 of the ``linear`` model), uploads a signed v2
through ``POST /bundles`` and rolls it out through ``POST /rollouts``. What the fleet decided is read back
through the API (the rollout, its audit log, the registry); what it sent is recorded by a paho client on
``edgeship/v1/<fleet>/+/cmd``. Every process is killed at the end of its test, whatever happened.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleet_e2e_parts import (
    Broker,
    BrokerPool,
    Bundles,
    CommandRecorder,
    FleetProcess,
    Loader,
    Owned,
    StaticFiles,
    api_token,
    audit,
    device_version,
    make_bundles,
    start_agents,
    wait_for,
    wait_registered,
    wait_rollout,
)

pytestmark = pytest.mark.timeout(240)

# The fleet tests' PostgreSQL fixture, reused as it is (loaded under its own name: "conftest" is taken).
_spec = importlib.util.spec_from_file_location(
    "fleet_tests_conftest", Path(__file__).resolve().parents[1] / "fleet" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
_fleet_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fleet_conftest)
pg = _fleet_conftest.pg

ENDED = ("completed", "paused", "aborted", "failed")


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    return make_bundles(tmp_path_factory.mktemp("e2e-bundles"))


@pytest.fixture(scope="session")
def e2e_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    pool = BrokerPool(tmp_path_factory.mktemp("e2e-broker"))
    try:
        yield pool.make()
    finally:
        pool.stop_all()


@pytest.fixture
def owned() -> Iterator[Owned]:
    things = Owned()
    try:
        yield things
    finally:
        things.close_all()


def _upload(api: httpx.Client, bundle: Path) -> dict[str, Any]:
    response = api.post("/bundles", content=bundle.read_bytes(), headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _create(api: httpx.Client, ids: list[str], **spec: Any) -> int:
    body = {"release": "linear:2", "devices": "id=" + ",".join(ids), "rate_per_s": 100, **spec}
    response = api.post("/rollouts", json=body)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def _actions(rows: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["action"] == action]


def _one_deploy_id_each(recorder: CommandRecorder, rollout_id: int, ids: list[str]) -> None:
    """Every device got deploys of exactly one command id (resends reuse it), the rollout's own, and ran it
    at most once: one ``received`` that queued it, one ``active`` (a resend is answered as a duplicate)."""
    for device_id in ids:
        deploy_ids = {c["id"] for c in recorder.of(device_id, "deploy")}
        cmd_id = f"ro{rollout_id}-{device_id}-deploy"
        assert deploy_ids == {cmd_id}, (device_id, deploy_ids)
        runs = {phase: recorder.runs(device_id, cmd_id, phase) for phase in ("received", "active")}
        assert runs["received"] <= 1 and runs["active"] <= 1, (device_id, runs, len(recorder.of(device_id)))


class _Stopper:
    """Something ``Owned`` can end that has no ``stop`` of its own."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self.stop = stop


def _own_sessions(tmp_path: Path) -> dict[str, str]:
    """A share group and ingest session of this test's own: the broker is shared by the tests, and Mosquitto
    keeps routing a share of a group's messages to the persistent session of a fleet process that is gone
    (queued for its return, for ``session_expiry_s``), so an earlier test's dead fleet would take this
    test's events."""
    tag = tmp_path.name[-40:].replace(".", "-")
    return {"EDGESHIP_FLEET_SHARE_GROUP": f"e2e-{tag}", "EDGESHIP_FLEET_MQTT_CLIENT_ID": f"e2e-{tag}"}


def _fleet_on_sqlite(tmp_path: Path, broker: Broker, bundles: Bundles, owned: Owned, **env: str) -> tuple[
    FleetProcess, httpx.Client
]:  # fmt: skip
    env = {**_own_sessions(tmp_path), **env}
    fleet = owned.add(FleetProcess(tmp_path / "fleet", broker.port, bundles.public_key, env=env))
    fleet.start()
    api = owned.add(fleet.client(api_token(f"sqlite:///{tmp_path / 'fleet' / 'fleet.db'}")))
    return fleet, api


def test_a_clean_rollout_reaches_every_agent_wave_by_wave(
    tmp_path: Path, e2e_broker: Broker, bundles: Bundles, owned: Owned
) -> None:
    ids = ["clean-a", "clean-b", "clean-c"]
    recorder = owned.add(CommandRecorder.connect(e2e_broker.port))
    fleet, api = _fleet_on_sqlite(tmp_path, e2e_broker, bundles, owned)
    agents, _ = start_agents(tmp_path, e2e_broker.port, bundles.public_key, bundles.v1, ids)
    for agent in agents:
        owned.add(agent)
    uploaded = _upload(api, bundles.v2)
    assert uploaded["version"] == 2 and uploaded["url"].startswith(fleet.url)
    wait_registered(api, ids, 1)

    rollout_id = _create(
        api, ids, waves="1,2,100%", soak="1s", gates=["health_failures=0", "error_rate<=1%"], resend="20s"
    )
    view = wait_rollout(api, rollout_id, ENDED, 120)
    assert view["state"] == "completed", view

    wait_for(lambda: all(device_version(api, d) == 2 for d in ids), 20, "every device reporting v2")
    rows = audit(api, rollout_id)
    # waves 1, 2 and 3 started (0-based in the log), each after the previous one soaked
    assert [r["evidence"]["wave"] for r in _actions(rows, "AdvanceWave")] == [0, 1, 2], rows
    assert [r["evidence"].get("soaked_wave") for r in _actions(rows, "AdvanceWave")] == [None, 0, 1], rows
    assert len(_actions(rows, "Complete")) == 1
    assert {r["device_id"] for r in _actions(rows, "DeviceDone")} == set(ids)
    assert all(r["evidence"].get("status", "active") == "active" for r in _actions(rows, "DeviceDone"))
    assert not _actions(rows, "Pause") and not recorder.of(kind="rollback")
    _one_deploy_id_each(recorder, rollout_id, ids)
    # each wave was sent only after the previous one soaked: the deploys went out in three groups
    sends = _actions(rows, "SendDeploy")
    advances = _actions(rows, "AdvanceWave")
    per_wave = [
        sum(1 for s in sends if a["id"] < s["id"] < b["id"])
        for a, b in zip(advances, [*advances[1:], rows[-1]], strict=True)
    ]
    assert per_wave == [1, 1, 1], per_wave
    assert all(agent.alive for agent in agents)


def test_a_canary_that_fails_its_health_check_pauses_the_rollout(
    tmp_path: Path, e2e_broker: Broker, bundles: Bundles, owned: Owned
) -> None:
    ids = ["sick-a", "sick-b", "sick-c"]
    recorder = owned.add(CommandRecorder.connect(e2e_broker.port))
    _fleet, api = _fleet_on_sqlite(tmp_path, e2e_broker, bundles, owned)
    agents, _ = start_agents(tmp_path, e2e_broker.port, bundles.public_key, bundles.v1, ids)
    for agent in agents:
        owned.add(agent)
    _upload(api, bundles.v2_unhealthy)  # signed and well-formed: only the device's golden check can tell
    wait_registered(api, ids, 1)

    rollout_id = _create(api, ids, waves="1,100%", soak="1s", gates=["health_failures=0"], resend="20s")
    view = wait_rollout(api, rollout_id, ENDED, 90)
    assert view["state"] == "paused", view

    deployed = recorder.devices("deploy")
    assert len(deployed) == 1, recorder.of()  # the canary only
    (canary,) = deployed
    rows = audit(api, rollout_id)
    done = _actions(rows, "DeviceDone")
    assert [(r["device_id"], r["evidence"]["status"]) for r in done] == [(canary, "failed")]
    assert "failed" in done[0]["evidence"]["phases"], done  # what the agent reported
    (pause,) = _actions(rows, "Pause")
    assert "health_failures=0" in pause["reason"], pause
    gate = pause["evidence"]["gates"]["health_failures=0"]
    assert gate["ok"] is False and gate["value"] == 1 and gate["failed"] == [canary], gate
    # the canary kept v1 (the failed trial was rolled back on the device), the others never heard of v2
    time.sleep(1.5)  # a late status or command would show now
    assert device_version(api, canary) == 1
    assert all(device_version(api, d) == 1 for d in ids)
    assert recorder.devices("deploy") == {canary}
    assert api.get(f"/rollouts/{rollout_id}").json()["state"] == "paused"
    events = api.get(f"/devices/{canary}/events").json()
    assert "failed" in str(events) and f"ro{rollout_id}-{canary}-deploy" in str(events), str(events)[:2000]


def test_a_latency_breach_pauses_and_rolls_the_wave_back(
    tmp_path: Path, e2e_broker: Broker, bundles: Bundles, owned: Owned
) -> None:
    ids = ["slow-a", "slow-b"]
    recorder = owned.add(CommandRecorder.connect(e2e_broker.port))
    _fleet, api = _fleet_on_sqlite(tmp_path, e2e_broker, bundles, owned)
    agents, ports = start_agents(tmp_path, e2e_broker.port, bundles.public_key, bundles.v1, ids, serve=True)
    for agent in agents:
        owned.add(agent)
    loaders = [owned.add(Loader(ports[d], rate_per_s=15).start()) for d in ids]
    _upload(api, bundles.v2_slow)
    wait_registered(api, ids, 1)

    def baseline() -> bool:  # v1's latency on both devices is in the fleet: the gate's reference
        models = api.get("/telemetry/models", params={"name": "linear", "version": 1}).json()["models"]
        return bool(models) and models[0]["devices"] == 2 and models[0]["count"] >= 20

    wait_for(baseline, 60, "v1 telemetry with requests from both devices", interval_s=0.3)
    rollout_id = _create(api, ids, waves="1,100%", soak="60s", gates=["p95_latency<=1.5x"], resend="20s")
    view = wait_rollout(api, rollout_id, ENDED, 90)
    assert view["state"] == "paused", view

    (canary,) = recorder.devices("deploy")
    rows = audit(api, rollout_id)
    (pause,) = _actions(rows, "Pause")
    gate = pause["evidence"]["gates"]["p95_latency<=1.5x"]
    assert gate["ok"] is False and gate["value"] > 1.5, gate
    assert gate["new_p95_ms"] > gate["previous_p95_ms"], gate
    assert pause["evidence"]["rollback"] == [canary], pause
    # the rollback went to the wave's device, which went back to v1; the other device was never touched
    wait_for(lambda: bool(recorder.of(canary, "rollback")), 10, "the rollback command")
    assert [c["id"] for c in recorder.of(canary, "rollback")][:1] == [f"ro{rollout_id}-{canary}-rollback"]
    wait_for(lambda: device_version(api, canary) == 1, 30, "the canary back on v1")
    wait_for(lambda: bool(_actions(audit(api, rollout_id), "RollbackDone")), 20, "the rollback acknowledged")
    (rolled,) = _actions(audit(api, rollout_id), "RollbackDone")
    assert rolled["device_id"] == canary and rolled["evidence"]["ok"] is True, rolled
    assert recorder.devices("deploy") == {canary} and recorder.devices("rollback") == {canary}
    for loader in loaders:
        loader.stop()
        assert loader.answers > 0


def test_the_fleet_server_killed_mid_rollout_resumes_it(
    tmp_path: Path, e2e_broker: Broker, bundles: Bundles, owned: Owned
) -> None:
    ids = ["kill-a", "kill-b", "kill-c"]
    recorder = owned.add(CommandRecorder.connect(e2e_broker.port))
    fleet, api = _fleet_on_sqlite(tmp_path, e2e_broker, bundles, owned, EDGESHIP_FLEET_LEASE_S="3")
    agents, _ = start_agents(tmp_path, e2e_broker.port, bundles.public_key, bundles.v1, ids)
    for agent in agents:
        owned.add(agent)
    _upload(api, bundles.v2)
    wait_registered(api, ids, 1)

    rollout_id = _create(api, ids, waves="1,2,100%", soak="2s", gates=["health_failures=0"], resend="4s")
    # kill -9 as the second wave starts: its deploy may be committed and not yet published
    wait_for(lambda: len(_actions(audit(api, rollout_id), "AdvanceWave")) >= 2, 90, "the second wave", interval_s=0.05)
    fleet.kill9()
    fleet.start()  # same state folder, same port, a new holder id (hostname-pid)
    view = wait_rollout(api, rollout_id, ENDED, 120)
    assert view["state"] == "completed", view

    wait_for(lambda: all(device_version(api, d) == 2 for d in ids), 20, "every device reporting v2")
    rows = audit(api, rollout_id)
    holders = [r["holder"] for r in rows if r["holder"] is not None]  # the API's Create row has none
    assert len(set(holders)) == 2, set(holders)  # the first process, then the restarted one
    first = holders[0]
    switch = next(i for i, h in enumerate(holders) if h != first)
    assert all(h != first for h in holders[switch:]), holders  # the dead one never came back
    assert len(_actions(rows, "AdvanceWave")) == 3 and len(_actions(rows, "Complete")) == 1
    assert not _actions(rows, "Pause")
    _one_deploy_id_each(recorder, rollout_id, ids)
    # the recorder was connected throughout: each device reported its one run
    assert all(recorder.runs(d, f"ro{rollout_id}-{d}-deploy", "active") == 1 for d in ids)
    assert not recorder.of(kind="rollback")


def test_two_fleet_processes_on_postgresql_hand_the_rollout_over(
    tmp_path: Path, e2e_broker: Broker, bundles: Bundles, owned: Owned, pg: Any
) -> None:
    ids = ["pg-a", "pg-b", "pg-c"]
    url = pg.new_database()
    shared = tmp_path / "shared"
    (shared / "artifacts").mkdir(parents=True)
    files = owned.add(StaticFiles(shared))  # the bundles' HTTP front, as a CDN would be: not a fleet process
    recorder = owned.add(CommandRecorder.connect(e2e_broker.port))
    fleets = {}
    for name in ("a", "b"):
        env = {
            "EDGESHIP_FLEET_DB_URL": url, "EDGESHIP_FLEET_ARTIFACTS_DIR": str(shared / "artifacts"),
            "EDGESHIP_FLEET_ARTIFACT_BASE_URL": files.url, "EDGESHIP_FLEET_LEASE_S": "3",
            "EDGESHIP_FLEET_HOLDER_ID": f"fleet-{name}", "EDGESHIP_FLEET_MQTT_CLIENT_ID": f"e2e-pg-{name}",
            "EDGESHIP_FLEET_SHARE_GROUP": _own_sessions(tmp_path)["EDGESHIP_FLEET_SHARE_GROUP"],
        }  # fmt: skip
        fleets[f"fleet-{name}"] = owned.add(FleetProcess(tmp_path / f"fleet-{name}", e2e_broker.port,
                                                         bundles.public_key, env=env))  # fmt: skip
    for fleet in fleets.values():
        fleet.start()
    token = api_token(url)
    apis = {name: owned.add(fleet.client(token)) for name, fleet in fleets.items()}
    agents, _ = start_agents(tmp_path, e2e_broker.port, bundles.public_key, bundles.v1, ids)
    for agent in agents:
        owned.add(agent)
    uploaded = _upload(apis["fleet-a"], bundles.v2)
    assert uploaded["url"].startswith(files.url)
    wait_registered(apis["fleet-b"], ids, 1)  # the registry is one, whichever process stored what

    rollout_id = _create(apis["fleet-a"], ids, waves="1,2,100%", soak="2s", gates=["health_failures=0"], resend="4s")
    wait_for(
        lambda: len(_actions(audit(apis["fleet-a"], rollout_id), "AdvanceWave")) >= 2, 90, "the second wave",
        interval_s=0.05,
    )  # fmt: skip
    rows = audit(apis["fleet-a"], rollout_id)
    driven = [r for r in rows if r["holder"] is not None]  # the API's Create row has none
    holder = driven[0]["holder"]
    assert {r["holder"] for r in driven} == {holder}, rows  # one process drives it; the other only serves
    other = next(name for name in fleets if name != holder)
    fleets[holder].kill9()
    killed_at, killed_at_row = time.time(), rows[-1]["id"]

    view = wait_rollout(apis[other], rollout_id, ENDED, 60)
    assert view["state"] == "completed", view
    wait_for(lambda: all(device_version(apis[other], d) == 2 for d in ids), 20, "every device reporting v2")
    rows = audit(apis[other], rollout_id)
    later = [r for r in rows if r["id"] > killed_at_row]
    late_holders = {r["holder"] for r in later}
    assert other in late_holders and late_holders <= {holder, other}, late_holders
    # the survivor took over once the dead holder's lease (3 s) ran out, not before
    took_over = min(r["ts"] for r in later if r["holder"] == other)
    assert took_over - killed_at >= 3 - 0.5, (took_over - killed_at, later[:3])
    assert len(_actions(rows, "AdvanceWave")) == 3 and len(_actions(rows, "Complete")) == 1
    assert _actions(rows, "Complete")[0]["holder"] == other
    _one_deploy_id_each(recorder, rollout_id, ids)
    assert fleets[other].alive


def test_the_broker_restarted_mid_rollout_the_rollout_completes(tmp_path: Path, bundles: Bundles, owned: Owned) -> None:
    """Mosquitto stops as the first wave starts and comes back 3 s later on the same port, with its sessions
    (persistence): the ingest and the command publisher reconnect, a deploy lost meanwhile is resent with
    its id, and the rollout completes."""
    (tmp_path / "brokers").mkdir()
    pool = BrokerPool(tmp_path / "brokers")
    broker = pool.make()
    owned.add(_Stopper(pool.stop_all))  # last to end (Owned ends things in reverse)
    ids = ["mqtt-a", "mqtt-b", "mqtt-c"]
    recorder = owned.add(CommandRecorder.connect(broker.port, persistent=True))
    fleet, api = _fleet_on_sqlite(tmp_path, broker, bundles, owned)
    agents, _ = start_agents(tmp_path, broker.port, bundles.public_key, bundles.v1, ids)
    for agent in agents:
        owned.add(agent)
    _upload(api, bundles.v2)
    wait_registered(api, ids, 1)

    rollout_id = _create(api, ids, waves="1,2,100%", soak="1s", gates=["health_failures=0"], resend="4s")
    wait_for(lambda: bool(_actions(audit(api, rollout_id), "AdvanceWave")), 30, "the first wave", interval_s=0.05)
    broker.stop()
    time.sleep(3)
    assert api.get(f"/rollouts/{rollout_id}").status_code == 200  # the API does not need the broker
    broker.start()
    view = wait_rollout(api, rollout_id, ENDED, 90, check=lambda: None if fleet.alive else pytest.fail("fleet died"))
    assert view["state"] == "completed", (view, fleet.tail())

    wait_for(lambda: all(device_version(api, d) == 2 for d in ids), 30, "every device reporting v2")
    rows = audit(api, rollout_id)
    assert [r["evidence"]["wave"] for r in _actions(rows, "AdvanceWave")] == [0, 1, 2], rows
    assert len(_actions(rows, "Complete")) == 1 and not _actions(rows, "Pause")
    assert {r["device_id"] for r in _actions(rows, "DeviceDone")} == set(ids)
    _one_deploy_id_each(recorder, rollout_id, ids)
    assert not recorder.of(kind="rollback")
    assert fleet.alive and all(agent.alive for agent in agents)
