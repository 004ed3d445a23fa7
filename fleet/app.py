"""The fleet server's ASGI app: one router per domain, wired here, with the OpenAPI document at /openapi.json."""

from __future__ import annotations

from fastapi import FastAPI

from fleet.api import install_error_handlers
from fleet.db import Database

__all__ = ["create_app"]

API_PREFIX = "/api/v1"


def create_app(db: Database) -> FastAPI:
    """The app serving ``db``; the caller owns the database (and runs ``fleet.db.migrate`` first)."""
    app = FastAPI(title="edgeship fleet", version="1", docs_url="/api/docs", openapi_url="/openapi.json")
    app.state.db = db
    install_error_handlers(app)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
