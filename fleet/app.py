"""The fleet server's ASGI app: one router per domain, wired here, with the OpenAPI document at /openapi.json.

``create_app(db)`` is the bare foundation (auth, error bodies, health) a domain's tests add their own
router to; ``create_fleet_app(db, settings)`` is what ``edgeship fleet serve`` runs: every domain's
routes under ``/api/v1``, the artifact server at ``/artifacts``, the dashboard at ``/dashboard/`` (``/``
redirects there), and the rollout routes wired to the
devices and releases domains (``fleet.wiring``); ``fleet.server`` hands the rollout driver's wake-up over
once the driver runs.
"""

from __future__ import annotations

from fastapi import FastAPI

from fleet.api import install_error_handlers
from fleet.db import Database
from fleet.settings import FleetSettings

__all__ = ["API_PREFIX", "create_app", "create_fleet_app"]

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


def create_fleet_app(db: Database, settings: FleetSettings) -> FastAPI:
    """The whole fleet API over ``db`` with ``settings`` (rollouts answer 503 until ``wire_rollouts`` ran)."""
    from fleet.dashboard import router as dashboard_router
    from fleet.devices.routes import router as devices_router
    from fleet.releases import ReleaseSettings
    from fleet.releases.artifacts import artifacts_router
    from fleet.releases.routes import router as releases_router
    from fleet.rollouts.routes import router as rollouts_router
    from sdk.trustfiles import load_trust

    app = create_app(db)
    app.state.settings = settings
    app.state.releases = ReleaseSettings(
        store_dir=settings.artifacts_path,
        trusted_keys=load_trust(settings.trusted_keys) if settings.trusted_keys else None,  # keys, or a root
        max_upload_bytes=settings.max_upload_bytes,
        artifact_base_url=settings.artifact_base_url,
    )
    for router in (devices_router, releases_router, rollouts_router):
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(artifacts_router)
    app.include_router(dashboard_router)
    return app
