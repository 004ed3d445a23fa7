"""The bundle repository's API (under ``/api/v1``): upload, list, inspect, retire; releases.

``POST /bundles`` takes the raw bundle as the body (``application/octet-stream``), streamed to the
artifact folder's incoming area under ``max_upload_bytes`` (413 beyond it, by ``Content-Length`` before a
byte is read, or while reading), then verified off the event loop. A bundle the kernel refuses is a 422
whose detail names the kernel's error (``SignatureError: ...``); nothing is stored. Re-uploading a stored
bundle answers 200 with it (201 when it is new).
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from fleet.api import DbDep, NotFound, ReadAccess, WriteAccess
from fleet.releases import service
from fleet.releases.schemas import BundleDetail, BundleOut, ReleaseDetail, ReleaseOut
from fleet.releases.service import ReleaseSettings
from fleet.releases.store import TooLarge
from sdk.errors import BundleError

__all__ = ["router"]

router = APIRouter(tags=["bundles"])


def _settings(request: Request) -> ReleaseSettings:
    settings: ReleaseSettings = request.app.state.releases
    return settings


def _base_url(request: Request) -> str:
    """Where devices download from: the setting, or this server as the client reached it."""
    return _settings(request).artifact_base_url or str(request.base_url)


def _missing(sha256: str) -> NotFound:
    return NotFound(f"no bundle {sha256[:64]!r}")


@router.post("/bundles", status_code=201, responses={200: {"description": "the bundle was stored already"}})
async def upload_bundle(request: Request, response: Response, db: DbDep, caller: WriteAccess) -> BundleOut:
    """Upload a signed bundle (raw body); it is verified with the fleet's trusted keys before it is stored."""
    settings = _settings(request)
    trusted = settings.trusted_keys
    if trusted is None:
        raise HTTPException(422, "this fleet server trusts no signing key: start it with --trust KEY.pub")
    cap = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise HTTPException(413, f"the bundle is {declared} bytes, over the {cap}-byte upload limit")
    store = settings.store()
    try:
        temp = await store.receive_async(request.stream(), cap)
    except TooLarge as e:
        raise HTTPException(413, str(e)) from e
    try:
        result = await run_in_threadpool(service.ingest, db, temp, trusted, store, now=time.time())
    except BundleError as e:
        raise HTTPException(422, f"bundle refused: {type(e).__name__}: {e}") from e
    if not result.created:
        response.status_code = 200
    return BundleOut.of(result.bundle, _base_url(request))


@router.get("/bundles")
def list_bundles(
    request: Request,
    db: DbDep,
    caller: ReadAccess,
    name: str | None = None,
    version: Annotated[int | None, Query(ge=0)] = None,
    target: str | None = None,
    retired: bool | None = None,
) -> list[BundleOut]:
    """Bundles matching every filter given (``retired=false``: only those that may still be chosen)."""
    with db.session() as session:
        rows = service.list_bundles(session, name=name, version=version, target=target, retired=retired)
    base = _base_url(request)
    return [BundleOut.of(row, base) for row in rows]


@router.get("/bundles/{sha256}")
def get_bundle(sha256: str, request: Request, db: DbDep, caller: ReadAccess) -> BundleDetail:
    """One bundle with its manifest summary."""
    with db.session() as session:
        row = service.get_bundle(session, sha256)
    if row is None:
        raise _missing(sha256)
    return BundleDetail.detail(row, _base_url(request))


@router.post("/bundles/{sha256}/retire")
def retire_bundle(sha256: str, request: Request, db: DbDep, caller: WriteAccess) -> BundleOut:
    """Never choose this bundle for a new rollout; it stays downloadable for devices mid-deployment."""
    with db.session() as session:
        row = service.retire(session, sha256, now=time.time())
    if row is None:
        raise _missing(sha256)
    return BundleOut.of(row, _base_url(request))


@router.get("/releases")
def list_releases(db: DbDep, caller: ReadAccess, name: str | None = None) -> list[ReleaseOut]:
    """Every release: the bundles of one name and version, counted."""
    with db.session() as session:
        return [ReleaseOut.of(s) for s in service.list_releases(session, name=name)]


@router.get("/releases/{name}/{version}")
def get_release(name: str, version: int, request: Request, db: DbDep, caller: ReadAccess) -> ReleaseDetail:
    """A release's bundles by target and precision."""
    with db.session() as session:
        rows = service.release_bundles(session, name, version)
    if not rows:
        raise NotFound(f"no release {name[:128]!r} version {version}")
    targets: dict[str, list[str]] = {}
    for row in rows:
        if row.retired_at is None:
            targets.setdefault(row.target, []).append(row.precision)
    base = _base_url(request)
    return ReleaseDetail(name=name, version=version, targets=targets, bundles=[BundleOut.of(r, base) for r in rows])
