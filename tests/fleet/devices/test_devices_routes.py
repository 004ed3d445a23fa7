"""The registry's API through FastAPI's TestClient, on a real database with real tokens."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from fleet_parts import event, incoming, status, telemetry

from fleet.app import API_PREFIX, create_app
from fleet.auth import create_token
from fleet.db import Database
from fleet.devices import record_messages
from fleet.devices.routes import router


@dataclass
class Api:
    client: TestClient
    read: dict[str, str]
    write: dict[str, str]


@pytest.fixture
def api(db: Database) -> Iterator[Api]:
    app = create_app(db)
    app.include_router(router, prefix=API_PREFIX)
    with db.session() as s:
        read, write = create_token(s, "reader", "read"), create_token(s, "writer", "write")
        now = time.time()
        record_messages(s, [incoming("cam-1", "status", status(), at=now - 100)])
        record_messages(s, [incoming("cam-2", "telemetry", telemetry(1), at=now - 100)])
        batch = [incoming("cam-1", "telemetry", telemetry(i, count=10, errors=1), at=now - 50 + i) for i in range(5)]
        batch += [incoming("cam-1", "events", event("r1", p), at=now - 10) for p in ("received", "active")]
        record_messages(s, batch)
    with TestClient(app) as client:
        yield Api(client, {"Authorization": f"Bearer {read}"}, {"Authorization": f"Bearer {write}"})


def test_reads(api: Api) -> None:
    c = api.client
    body = c.get("/api/v1/devices", headers=api.read).json()
    assert [d["device_id"] for d in body["devices"]] == ["cam-1", "cam-2"]
    assert body["devices"][0]["model"]["version"] == 5 and body["devices"][1]["state"] == "unknown"
    assert [d["device_id"] for d in c.get("/api/v1/devices?online=true", headers=api.read).json()["devices"]] == [
        "cam-1"
    ]
    one = c.get("/api/v1/devices/cam-1", headers=api.read).json()
    assert one["online"] is True and one["capabilities"]["arch"] == "x86_64"
    events = c.get("/api/v1/devices/cam-1/events", headers=api.read).json()
    assert [e["phase"] for e in events["events"]] == ["active", "received"]
    assert events["deployments"][0]["outcome"] == "active"
    t = c.get("/api/v1/devices/cam-1/telemetry?window_s=600&bucket_s=60", headers=api.read).json()
    assert (t["total"]["messages"], t["total"]["count"], t["total"]["errors"]) == (5, 50, 5)
    assert t["total"]["error_rate"] == pytest.approx(0.1) and len(t["series"]) == 10
    assert sum(b["messages"] for b in t["series"]) == 5
    models = c.get("/api/v1/telemetry/models?name=digits&version=5&window_s=600", headers=api.read).json()
    assert [(m["name"], m["version"], m["messages"]) for m in models["models"]] == [("digits", 5, 6)]


def test_tags_and_selectors(api: Api) -> None:
    c = api.client
    r = c.put("/api/v1/devices/cam-1/tags", json={"tags": {"group": "canary", "site": "lab"}}, headers=api.write)
    assert r.status_code == 200 and r.json()["tags"] == {"group": "canary", "site": "lab"}
    listed = c.get("/api/v1/devices", params={"selector": "group=canary"}, headers=api.read).json()["devices"]
    assert [d["device_id"] for d in listed] == ["cam-1"] and listed[0]["tags"]["site"] == "lab"
    assert c.delete("/api/v1/devices/cam-1/tags/site", headers=api.write).json()["tags"] == {"group": "canary"}
    assert c.delete("/api/v1/devices/cam-1/tags/site", headers=api.write).status_code == 404
    bad = c.get("/api/v1/devices", params={"selector": "id=cam-1,ghost"}, headers=api.read)
    assert bad.status_code == 422 and "ghost" in bad.json()["detail"]
    assert c.get("/api/v1/devices", params={"selector": "nonsense"}, headers=api.read).status_code == 422


def test_errors(api: Api) -> None:
    c = api.client
    assert c.get("/api/v1/devices").status_code == 401
    assert c.get("/api/v1/devices", headers={"Authorization": "Bearer esf_wrong"}).status_code == 401
    r = c.put("/api/v1/devices/cam-1/tags", json={"tags": {"a": "b"}}, headers=api.read)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert c.delete("/api/v1/devices/cam-1/tags/a", headers=api.read).status_code == 403
    for path in ("/api/v1/devices/ghost", "/api/v1/devices/ghost/events", "/api/v1/devices/ghost/telemetry"):
        r = c.get(path, headers=api.read)
        assert r.status_code == 404 and r.json() == {"error": "not_found", "detail": "no device 'ghost'"}
    assert c.put("/api/v1/devices/ghost/tags", json={"tags": {}}, headers=api.write).status_code == 404
    for body in ({"tags": {"a": 1}}, {"tags": ["a"]}, {}, {"tags": {}, "extra": 1}, {"tags": {"": "x"}},
                 {"tags": {"k=v": "x"}}):  # fmt: skip
        r = c.put("/api/v1/devices/cam-1/tags", json=body, headers=api.write)
        assert r.status_code == 422 and r.json()["error"] == "invalid", body
    for query in ("window_s=0", "window_s=-5", "window_s=1e12", "bucket_s=0", "window_s=100000&bucket_s=1"):
        assert c.get(f"/api/v1/devices/cam-1/telemetry?{query}", headers=api.read).status_code == 422, query
    assert c.get("/api/v1/telemetry/models?version=-1", headers=api.read).status_code == 422


def test_series_per_model_version(api: Api) -> None:
    c = api.client
    until = time.time() + 1
    body = c.get(f"/api/v1/telemetry/series?window_s=600&bucket_s=60&until={until}", headers=api.read).json()
    assert body["until"] == until and body["since"] == until - 600 and body["bucket_s"] == 60
    assert [(m["name"], m["version"]) for m in body["models"]] == [("digits", 5)]
    (digits,) = body["models"]
    assert len(digits["series"]) == 10 and digits["series"][0]["start"] == body["since"]
    assert sum(b["messages"] for b in digits["series"]) == digits["total"]["messages"] == 6
    busy = [b for b in digits["series"] if b["count"]]
    assert sum(b["count"] for b in busy) == 150 and all(b["p50_ms"] is not None for b in busy)
    assert all(b["p50_ms"] is None and b["error_rate"] is None for b in digits["series"] if not b["count"])
    none = c.get("/api/v1/telemetry/series?name=ghost", headers=api.read).json()
    assert none["models"] == [] and none["bucket_s"] == 60
    for query in ("window_s=0", "bucket_s=0", "window_s=100000&bucket_s=1", "until=-1", "version=-1"):
        assert c.get(f"/api/v1/telemetry/series?{query}", headers=api.read).status_code == 422, query
    assert c.get("/api/v1/telemetry/series").status_code == 401
