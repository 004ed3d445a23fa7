"""The database unreachable for a while (PostgreSQL behind a proxy the test stops): the API answers 503
``unavailable`` (not a 500 with a traceback) and health keeps answering; reads come back with the database.
The ingest's side is ``tests/fleet/ingest/test_ingest_mqtt.py::test_database_outage_is_retried_without_loss``,
the rollout driver's ``tests/fleet/rollouts/test_rollout_driver.py``."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fleet_parts import incoming, status
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

from fleet.app import API_PREFIX, create_app
from fleet.auth import create_token
from fleet.db import Database, is_transient, migrate
from fleet.devices import record_messages
from fleet.devices.routes import router


def _client(db: Database) -> tuple[TestClient, dict[str, str]]:
    app = create_app(db)
    app.include_router(router, prefix=API_PREFIX)
    with db.session() as s:
        token = create_token(s, "reader", "read")
        record_messages(s, [incoming("dev1", "status", status(), time.time())])
    return TestClient(app, raise_server_exceptions=False), {"Authorization": f"Bearer {token}"}


@pytest.fixture
def proxied_db(pg_proxied: object) -> Iterator[Database]:
    db = Database(pg_proxied.url)  # type: ignore[attr-defined]
    yield db
    db.close()


def test_the_api_answers_503_while_the_database_is_unreachable_and_reads_come_back(
    proxied_db: Database, pg_proxied: object, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = pg_proxied.proxy  # type: ignore[attr-defined]
    client, auth = _client(proxied_db)
    with client:
        assert client.get(f"{API_PREFIX}/devices/dev1", headers=auth).status_code == 200
        proxy.stop()
        with caplog.at_level(logging.WARNING, logger="fleet.api"):
            for path in ("/devices/dev1", "/devices", "/devices/dev1/events"):
                response = client.get(f"{API_PREFIX}{path}", headers=auth)
                assert response.status_code == 503, (path, response.text)
                body = response.json()
                assert body["error"] == "unavailable" and "database" in body["detail"], body
                assert str(proxy.port) not in body["detail"]  # nothing of the URL or the driver's text
                assert response.headers["retry-after"] == "5"
        assert "database unavailable" in caplog.text and "Traceback" not in caplog.text
        assert client.get("/healthz").json() == {"status": "ok"}  # needs no database: keeps answering
        proxy.start()
        response = client.get(f"{API_PREFIX}/devices/dev1", headers=auth)  # the engine reconnects at once
        assert response.status_code == 200, response.text
        assert response.json()["device_id"] == "dev1"


def test_a_broken_query_stays_a_500_and_a_locked_sqlite_database_counts_as_away(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    migrate(db)
    client, _ = _client(db)

    @client.app.get("/broken")  # type: ignore[attr-defined]
    def broken() -> None:  # a query the database will always refuse (sqlite3 calls it an OperationalError)
        with db.session() as session:
            session.execute(text("SELECT * FROM no_such_table"))

    locker = sqlite3.connect(tmp_path / "fleet.db", timeout=0)
    other = sqlite3.connect(tmp_path / "fleet.db", timeout=0)
    try:
        with client:
            assert client.get("/broken").status_code == 500  # a bug: not answered as an outage
        locker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(sqlite3.OperationalError) as locked:
            other.execute("BEGIN EXCLUSIVE")
        assert is_transient(OperationalError("BEGIN", {}, locked.value))
    finally:
        locker.close()
        other.close()
        db.close()


def test_is_transient_is_the_one_rule_the_ingest_and_the_api_share() -> None:
    from fleet.ingest import service as ingest

    assert ingest.is_transient is is_transient
    assert is_transient(OperationalError("SELECT 1", {}, Exception("connection refused")))
    assert not is_transient(IntegrityError("INSERT", {}, Exception("duplicate key")))
