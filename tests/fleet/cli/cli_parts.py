"""Real servers for the CLI tests: a migrated SQLite database, and uvicorn serving an app on a free port.

``stub_router`` stands in for the domains' routes that are not on this branch: it speaks the API's paths
and error bodies with the real auth dependencies, so the client's rendering and error paths are tested
over real HTTP. Its response fields are the ones the CLI's views read first.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from fleet.api import Conflict, DbDep, NotFound, ReadAccess, WriteAccess
from fleet.app import API_PREFIX, create_app
from fleet.auth import create_token
from fleet.db import Database, migrate
from sdk.errors import InputError


def migrated_db(path: Any) -> Database:
    db = Database(f"sqlite:///{path}")
    migrate(db)
    return db


def token(db: Database, scope: str, name: str = "t") -> str:
    with db.session() as session:
        return create_token(session, name, scope)


@contextmanager
def serve_app(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on 127.0.0.1:<free port>; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class Tags(BaseModel):
    tags: dict[str, str]


class RolloutIn(BaseModel):
    release: str
    devices: str
    waves: str = "1,100%"
    soak: str = "5m"
    gates: list[str] = []
    rate_per_s: float | None = None


def rollout_at(step: int, final: str = "completed") -> dict[str, Any]:
    """A rollout of 3 waves as GET /rollouts/7 shows it after ``step`` polls."""
    wave = min(step, 2)
    state = "running" if step < 3 else final
    waves = [
        {"index": i, "target": t, "state": "done" if i < wave else "running" if i == wave else "waiting",
         "counts": {"active": n if i <= wave else 0, "pending": 0 if i <= wave else n}}
        for i, (t, n) in enumerate([("1", 1), ("50%", 4), ("100%", 5)])
    ]  # fmt: skip
    gates = [{"gate": "error_rate<=1%", "value": 0.002, "threshold": 0.01, "ok": state != "paused"}]
    reason = "error_rate 3% > 1%" if state == "paused" else None
    return {"id": 7, "release": "digits:2", "selector": "tag=site=a", "state": state, "current_wave": wave,
            "waves": waves, "gates": gates, "paused_reason": reason}  # fmt: skip


def stub_router() -> APIRouter:
    router = APIRouter()
    devices: dict[str, dict[str, Any]] = {
        "cam-1": {"device_id": "cam-1", "online": True, "last_seen": time.time() - 5, "slot": "a", "state": "idle",
                  "model": {"name": "digits", "version": 1}, "tags": {"site": "a", "old": "x"}},
        "cam-2": {"device_id": "cam-2", "online": False, "last_seen": time.time() - 7200, "tags": {}},
    }  # fmt: skip
    polls = {"n": 0}

    def device(device_id: str) -> dict[str, Any]:
        if device_id not in devices:
            raise NotFound(f"no device {device_id!r}")
        return devices[device_id]

    @router.get("/devices")
    def list_devices(_db: DbDep, _c: ReadAccess, online: bool | None = None) -> list[dict[str, Any]]:
        return [d for d in devices.values() if online is None or d["online"] == online]

    @router.get("/devices/{device_id}")
    def get_device(device_id: str, _db: DbDep, _c: ReadAccess) -> dict[str, Any]:
        return device(device_id)

    @router.put("/devices/{device_id}/tags")
    def put_tags(device_id: str, body: Tags, _db: DbDep, _c: WriteAccess) -> dict[str, Any]:
        device(device_id)["tags"] = dict(body.tags)
        return device(device_id)

    @router.delete("/devices/{device_id}/tags/{key}")
    def delete_tag(device_id: str, key: str, _db: DbDep, _c: WriteAccess) -> dict[str, Any]:
        device(device_id)["tags"].pop(key, None)
        return device(device_id)

    @router.post("/bundles", status_code=201)
    async def upload(request: Request, _db: DbDep, _c: WriteAccess) -> dict[str, Any]:
        data = await request.body()
        if len(data) > 1000:
            raise HTTPException(413, f"bundle of {len(data)} bytes is over the 1000-byte limit")
        if not data.startswith(b"BUNDLE"):
            raise InputError("not an edgeship bundle: bad magic")
        sha = hashlib.sha256(data).hexdigest()
        return {"sha256": sha, "name": "digits", "version": 2, "label": None, "target": "onnxruntime",
                "precision": "fp32", "size": len(data), "keyids": ["ab" * 32], "url": f"http://x/a/{sha}"}  # fmt: skip

    @router.get("/releases")
    def releases(_db: DbDep, _c: ReadAccess) -> list[dict[str, Any]]:
        return [{"name": "digits", "version": 2, "bundles": 2, "active": 1, "first_uploaded_at": time.time() - 90}]

    @router.get("/releases/{name}/{version}")
    def release(name: str, version: int, _db: DbDep, _c: ReadAccess) -> dict[str, Any]:
        bundles = [{"target": "onnxruntime", "precision": "fp32"}, {"target": "openvino", "precision": "int8"}]
        targets = {"onnxruntime": ["fp32"], "openvino": ["int8"]}
        return {"name": name, "version": version, "targets": targets, "bundles": bundles}

    @router.post("/rollouts", status_code=201)
    def create(body: RolloutIn, _db: DbDep, _c: WriteAccess) -> dict[str, Any]:
        if any(g.startswith("bogus") for g in body.gates):
            raise InputError("unknown gate metric 'bogus'; valid: health_failures, error_rate, p95_latency, silence")
        if body.devices == "tag=busy=1":
            raise Conflict("device cam-1 is already in running rollout 3")
        polls["n"] = 0
        return rollout_at(0)

    @router.get("/rollouts")
    def rollouts(_db: DbDep, _c: ReadAccess) -> list[dict[str, Any]]:
        return [rollout_at(1)]

    @router.get("/rollouts/{rollout_id}")
    def rollout(rollout_id: int, _db: DbDep, _c: ReadAccess) -> dict[str, Any]:
        if rollout_id not in (7, 8):
            raise NotFound(f"no rollout {rollout_id}")
        polls["n"] += 1
        return rollout_at(polls["n"], "completed" if rollout_id == 7 else "paused")

    @router.post("/rollouts/{rollout_id}/{action}")
    def act(rollout_id: int, action: str, _db: DbDep, _c: WriteAccess) -> dict[str, Any]:
        if rollout_id != 7:
            raise NotFound(f"no rollout {rollout_id}")
        return {**rollout_at(1), "state": {"pause": "paused", "resume": "running", "abort": "aborted"}[action]}

    @router.get("/broken")
    def broken() -> PlainTextResponse:
        return PlainTextResponse("<html>Bad Gateway from a proxy</html>", 502)

    return router


def stub_app(db: Database) -> FastAPI:
    app = create_app(db)
    app.include_router(stub_router(), prefix=API_PREFIX)
    return app
