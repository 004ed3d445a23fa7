"""The bundle repository: verified uploads stored by sha256, releases (the bundles of one name and version),
the choice of a release's bundle per device (by the kernel's rule, sdk.compat), the deploy command, and the
artifact server devices download from.

Wiring (fleet.app): ``app.state.releases = ReleaseSettings(...)``; ``app.include_router(routes.router,
prefix="/api/v1")``; ``app.include_router(artifacts.artifacts_router)`` at the root; call
``ArtifactStore(settings.store_dir).clean_incoming()`` once at start.
"""

from fleet.releases.service import (
    PRECISION_ORDER,
    Candidate,
    Choice,
    ReleaseSettings,
    ReleaseSummary,
    UploadResult,
    artifact_url,
    choose,
    choose_bundle,
    get_bundle,
    ingest,
    list_bundles,
    list_releases,
    release_bundles,
    retire,
    upload,
)
from fleet.releases.store import ArtifactStore
from fleet.releases.tables import Bundle

__all__ = [
    "PRECISION_ORDER",
    "ArtifactStore",
    "Bundle",
    "Candidate",
    "Choice",
    "ReleaseSettings",
    "ReleaseSummary",
    "UploadResult",
    "artifact_url",
    "choose",
    "choose_bundle",
    "get_bundle",
    "ingest",
    "list_bundles",
    "list_releases",
    "release_bundles",
    "retire",
    "upload",
]
