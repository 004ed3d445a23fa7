"""The /rollouts routes through FastAPI's TestClient on a real SQLite database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from rollout_parts import bundles, resolver

from fleet.app import API_PREFIX, create_app
from fleet.auth import create_token
from fleet.db import Database
from fleet.rollouts.routes import RolloutWiring, configure, router

DEVICES = ["a1", "a2", "a3", "a4"]


@pytest.fixture
def client(db: Database) -> Iterator[tuple[TestClient, dict[str, str], dict[str, str], list[int]]]:
    app = create_app(db)
    app.include_router(router, prefix=API_PREFIX)
    wakes: list[int] = []
    configure(
        app,
        RolloutWiring(resolver(DEVICES), bundles({"a4": "no bundle runs on arch riscv64"}), lambda: wakes.append(1)),
    )
    with db.session() as s:
        write = {"Authorization": f"Bearer {create_token(s, 'ops', 'write')}"}
        read = {"Authorization": f"Bearer {create_token(s, 'viewer', 'read')}"}
    with TestClient(app) as c:
        yield c, write, read, wakes


BODY = {"release": "digits:5", "devices": "id=a1,a2,a3", "waves": "1,100%", "soak": "30s", "gates": ["error_rate<=1%"]}


def test_create_show_list_audit_and_commands(
    client: tuple[TestClient, dict[str, str], dict[str, str], list[int]],
) -> None:
    c, write, read, wakes = client
    r = c.post(f"{API_PREFIX}/rollouts", json=BODY, headers=write)
    assert r.status_code == 201, r.text
    rollout = r.json()
    assert (rollout["release"], rollout["state"], rollout["waves"]) == ("digits:5", "pending", 2)
    assert [(w["text"], w["devices"], w["pending"]) for w in rollout["waves_detail"]] == [("1", 1, 1), ("100%", 2, 2)]
    assert rollout["gates"] == [
        {"gate": "health_failures=0", "metric": "health_failures", "threshold": 0.0, "value": None, "ok": None},
        {"gate": "error_rate<=1%", "metric": "error_rate", "threshold": 0.01, "value": None, "ok": None},
    ]
    assert wakes == [1]
    rid = rollout["id"]
    assert [x["id"] for x in c.get(f"{API_PREFIX}/rollouts", headers=read).json()] == [rid]
    assert c.get(f"{API_PREFIX}/rollouts/{rid}", headers=read).json()["selector"] == "id=a1,a2,a3"
    assert (
        c.post(f"{API_PREFIX}/rollouts/{rid}/pause", json={"reason": "freeze"}, headers=write).json()["state"]
        == "paused"
    )
    r = c.post(f"{API_PREFIX}/rollouts/{rid}/pause", headers=write)
    assert (r.status_code, r.json()["error"]) == (409, "conflict")
    assert c.post(f"{API_PREFIX}/rollouts/{rid}/resume", headers=write).json()["state"] == "running"
    assert c.post(f"{API_PREFIX}/rollouts/{rid}/abort", headers=write).json()["state"] == "aborted"
    audit = c.get(f"{API_PREFIX}/rollouts/{rid}/audit", headers=read).json()
    assert [e["action"] for e in audit] == ["Create", "Pause", "Resume", "Abort"]
    assert audit[1]["reason"] == "freeze"
    assert (
        c.get(f"{API_PREFIX}/rollouts/{rid}/audit?after_id={audit[1]['id']}", headers=read).json()[0]["action"]
        == "Resume"
    )


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({"gates": ["latency<=5ms"]}, 422, "unknown metric 'latency'"),
        ({"gates": ["error_rate>=1%"]}, 422, "error_rate takes <= or <"),
        ({"waves": "1,,100%"}, 422, "wave 2 of '1,,100%' is empty"),
        ({"waves": "1,50%"}, 422, "the last wave must reach 100%"),
        ({"devices": "id=a1,ghost"}, 422, "unknown devices: ghost"),
        ({"devices": "all"}, 422, "a4: no bundle runs on arch riscv64"),
        ({"release": "digits"}, 422, "NAME:VERSION"),
        ({"soak": "later"}, 422, "not a duration"),
        ({"rate_per_s": "fast"}, 422, "rate_per_s"),
        ({"baseline": "0s"}, 422, "the baseline must be above 0 s and at most 7d"),
        ({"baseline": "30d"}, 422, "the baseline must be above 0 s and at most 7d"),
        ({"baseline": "a while"}, 422, "baseline 'a while' is not a duration"),
    ],
)
def test_bad_requests_get_422_with_the_reason(
    client: tuple[TestClient, dict[str, str], dict[str, str], list[int]],
    change: dict[str, object],
    status: int,
    words: str,
) -> None:
    c, write, _read, _ = client
    r = c.post(f"{API_PREFIX}/rollouts", json={**BODY, **change}, headers=write)
    assert r.status_code == status
    assert words in r.json()["detail"]
    assert c.get(f"{API_PREFIX}/rollouts", headers=write).json() == []


def test_overlap_auth_and_missing(client: tuple[TestClient, dict[str, str], dict[str, str], list[int]]) -> None:
    c, write, read, _ = client
    assert c.post(f"{API_PREFIX}/rollouts", json=BODY, headers=write).status_code == 201
    r = c.post(f"{API_PREFIX}/rollouts", json={**BODY, "devices": "id=a3", "waves": "100%"}, headers=write)
    assert (r.status_code, r.json()["error"]) == (409, "conflict")
    assert "a3 (rollout 1)" in r.json()["detail"]
    assert c.post(f"{API_PREFIX}/rollouts", json=BODY).status_code == 401
    assert c.post(f"{API_PREFIX}/rollouts", json=BODY, headers=read).status_code == 403
    assert c.post(f"{API_PREFIX}/rollouts/1/abort", headers=read).status_code == 403
    assert c.get(f"{API_PREFIX}/rollouts/99", headers=read).status_code == 404
    assert c.get(f"{API_PREFIX}/rollouts/99/audit", headers=read).status_code == 404
    assert c.post(f"{API_PREFIX}/rollouts/99/pause", headers=write).status_code == 404


def test_an_unwired_server_answers_503(db: Database) -> None:
    app = create_app(db)
    app.include_router(router, prefix=API_PREFIX)
    with db.session() as s:
        token = create_token(s, "ops", "write")
    with TestClient(app) as c:
        r = c.post(f"{API_PREFIX}/rollouts", json=BODY, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 503


def test_the_resend_defaults_to_the_servers_command_resend_s_and_the_baseline_is_settable(db: Database) -> None:
    app = create_app(db)
    app.include_router(router, prefix=API_PREFIX)
    configure(app, RolloutWiring(resolver(DEVICES), bundles(), resend_s=240.0))  # command_resend_s=240
    with db.session() as s:
        write = {"Authorization": f"Bearer {create_token(s, 'ops', 'write')}"}
    with TestClient(app) as c:
        r = c.post(f"{API_PREFIX}/rollouts", json={**BODY, "devices": "id=a1,a2"}, headers=write)
        assert r.status_code == 201, r.text
        assert (r.json()["spec"]["resend_s"], r.json()["spec"]["baseline_s"]) == (240.0, 3600.0)
        body = {**BODY, "devices": "id=a3,a4", "resend": "15s", "baseline": "2h"}
        r = c.post(f"{API_PREFIX}/rollouts", json=body, headers=write)
        assert r.status_code == 201, r.text
        assert (r.json()["spec"]["resend_s"], r.json()["spec"]["baseline_s"]) == (15.0, 7200.0)
