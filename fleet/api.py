"""What every route shares: the database of the app, the caller's token, and JSON error bodies.

A route declares who may call it with one of the two dependencies::

    @router.get("/devices")
    def list_devices(db: DbDep, caller: ReadAccess) -> ...

    @router.post("/devices/{device_id}/tags")
    def tag(db: DbDep, caller: WriteAccess, ...) -> ...

No token (or an unknown or revoked one): 401. A read token on a write route: 403. Errors of the
domains map to statuses once, here: ``InputError`` 422, ``NotFound`` 404, ``Conflict`` 409; every
error body is ``{"error": "<kind>", "detail": "<one line>"}``.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleet.auth import Principal, verify_token
from fleet.db import Database, is_transient
from sdk.errors import EdgeshipError, InputError

__all__ = ["Conflict", "DbDep", "NotFound", "ReadAccess", "WriteAccess", "install_error_handlers"]

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5  # what a 503 asks the caller to wait before trying again


class NotFound(EdgeshipError):
    """The named device, bundle, release or rollout does not exist (HTTP 404)."""


class Conflict(EdgeshipError):
    """The request clashes with the current state, e.g. an overlapping rollout (HTTP 409)."""


def _database(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


DbDep = Annotated[Database, Depends(_database)]


def _principal(request: Request, db: DbDep) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    with db.session() as session:
        principal = verify_token(session, token.strip())
    if principal is None:
        raise HTTPException(401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
    return principal


def _reader(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    return principal


def _writer(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    if not principal.allows("write"):
        raise HTTPException(403, f"token {principal.name!r} has read scope; this needs write")
    return principal


ReadAccess = Annotated[Principal, Depends(_reader)]
WriteAccess = Annotated[Principal, Depends(_writer)]

_KINDS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "too_large", 422: "invalid", 503: "unavailable"}  # fmt: skip


def _body(status: int, detail: Any) -> dict[str, Any]:
    return {"error": _KINDS.get(status, "error"), "detail": detail}


def install_error_handlers(app: FastAPI) -> None:
    """Map HTTP errors, validation errors and the domains' errors to JSON bodies of one shape."""

    @app.exception_handler(StarletteHTTPException)  # also routing's own 404/405, not only the routes' errors
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(_body(exc.status_code, exc.detail), exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse(_body(422, "; ".join(problems)), 422)

    @app.exception_handler(NotFound)
    async def _missing(_request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse(_body(404, str(exc)), 404)

    @app.exception_handler(Conflict)
    async def _conflict(_request: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse(_body(409, str(exc)), 409)

    @app.exception_handler(InputError)
    async def _input(_request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse(_body(422, str(exc)), 422)

    @app.exception_handler(SQLAlchemyError)
    async def _database_away(_request: Request, exc: SQLAlchemyError) -> JSONResponse:
        if not is_transient(exc):
            raise exc  # a bug, not an outage: Starlette's 500, with the traceback in the log
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("database unavailable, answering 503: %s", first[:300])
        detail = "the database is unreachable for now; try again shortly"  # no URL or driver text to the caller
        return JSONResponse(_body(503, detail), 503, headers={"Retry-After": str(RETRY_AFTER_S)})
