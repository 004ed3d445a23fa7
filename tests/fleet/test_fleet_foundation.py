"""The fleet's foundation: migrations, API tokens and the access rules every route shares."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from sqlalchemy import inspect

from fleet.api import Conflict, NotFound, ReadAccess, WriteAccess
from fleet.app import API_PREFIX, create_app
from fleet.auth import create_token, list_tokens, revoke_token, verify_token
from fleet.db import Database, migrate, normalise_url
from sdk.errors import InputError


@pytest.fixture
def local_db(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    migrate(db)
    yield db
    db.close()


def test_migrate_twice_and_wal(local_db: Database) -> None:
    migrate(local_db)  # a second start finds the schema at head and changes nothing
    assert "api_tokens" in inspect(local_db.engine).get_table_names()
    with local_db.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_postgres_urls_mean_psycopg3() -> None:
    assert normalise_url("postgresql://u@h:5/db") == "postgresql+psycopg://u@h:5/db"
    assert normalise_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"


def test_tokens_are_stored_hashed_and_revocable(local_db: Database) -> None:
    with local_db.session() as s:
        secret = create_token(s, "ci", "read")
    with local_db.session() as s:
        rows = list_tokens(s)
        assert [r.name for r in rows] == ["ci"] and secret not in rows[0].token_sha256
        assert verify_token(s, secret).scope == "read"  # type: ignore[union-attr]
        assert verify_token(s, secret[:-1]) is None
        assert verify_token(s, "not-a-token") is None
        assert revoke_token(s, rows[0].id) and not revoke_token(s, 999)
    with local_db.session() as s:
        assert verify_token(s, secret) is None
    with local_db.session() as s, pytest.raises(InputError, match="scope"):
        create_token(s, "x", "admin")


@pytest.fixture
def client(local_db: Database) -> TestClient:
    app = create_app(local_db)
    router = APIRouter()

    @router.get("/things/{name}")
    def get_thing(name: str, caller: ReadAccess) -> dict[str, str]:
        if name == "missing":
            raise NotFound(f"no thing {name!r}")
        return {"name": name, "caller": caller.name}

    @router.post("/things/{name}")
    def make_thing(name: str, count: int, caller: WriteAccess) -> dict[str, str]:
        if name == "taken":
            raise Conflict("thing 'taken' exists")
        if name == "bad":
            raise InputError("bad name")
        return {"made": name}

    app.include_router(router, prefix=API_PREFIX)
    return TestClient(app)


def _token(db: Database, scope: str) -> dict[str, str]:
    with db.session() as s:
        return {"Authorization": f"Bearer {create_token(s, scope + '-token', scope)}"}


def test_access_rules_and_error_bodies(client: TestClient, local_db: Database) -> None:
    reader, writer = _token(local_db, "read"), _token(local_db, "write")
    url = f"{API_PREFIX}/things"
    r = client.get(f"{url}/a")
    assert r.status_code == 401 and r.json()["error"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
    assert client.get(f"{url}/a", headers={"Authorization": "Bearer esf_wrong"}).status_code == 401
    assert client.get(f"{url}/a", headers=reader).json() == {"name": "a", "caller": "read-token"}
    r = client.post(f"{url}/a?count=1", headers=reader)
    assert r.status_code == 403 and r.json() == {"error": "forbidden", "detail": r.json()["detail"]}
    assert client.post(f"{url}/a?count=1", headers=writer).json() == {"made": "a"}
    assert client.get(f"{url}/missing", headers=reader).json() == {"error": "not_found", "detail": "no thing 'missing'"}
    assert client.post(f"{url}/taken?count=1", headers=writer).status_code == 409
    r = client.post(f"{url}/bad?count=1", headers=writer)
    assert r.status_code == 422 and r.json()["detail"] == "bad name"
    r = client.post(f"{url}/a?count=many", headers=writer)
    assert r.status_code == 422 and r.json()["error"] == "invalid" and "count" in r.json()["detail"]


def test_unrouted_paths_get_the_same_error_body(client: TestClient) -> None:
    r = client.get("/no/such/path")
    assert r.status_code == 404 and r.json() == {"error": "not_found", "detail": "Not Found"}
    r = client.delete(f"{API_PREFIX}/things/a")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


def test_openapi_document_is_served(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["info"]["title"] == "edgeship fleet" and f"{API_PREFIX}/things/{{name}}" in doc["paths"]
    assert client.get("/healthz").json() == {"status": "ok"}


def test_the_whole_fleet_api_is_in_one_openapi_document(local_db: Database, tmp_path: Path) -> None:
    import warnings

    from fleet.app import create_fleet_app
    from fleet.settings import FleetSettings

    app = create_fleet_app(local_db, FleetSettings(state_dir=tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. FastAPI's "Duplicate Operation ID"
        paths = TestClient(app).get("/openapi.json").json()["paths"]
    for path in ("/devices", "/devices/{device_id}/tags", "/bundles", "/releases/{name}/{version}", "/rollouts",
                 "/rollouts/{rollout_id}/pause", "/telemetry/models"):  # fmt: skip
        assert any(p == API_PREFIX + path or p.startswith(API_PREFIX + path.split("{")[0]) for p in paths), path
    assert set(paths["/artifacts/{filename}"]) == {"get", "head"}
