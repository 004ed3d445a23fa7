"""The API's shapes for bundles and releases (pydantic), built from the stored rows."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from fleet.releases.service import ReleaseSummary, artifact_url
from fleet.releases.tables import Bundle
from sdk.manifest import Manifest

__all__ = ["BundleDetail", "BundleOut", "ReleaseDetail", "ReleaseOut"]


class BundleOut(BaseModel):
    """One bundle in a list."""

    sha256: str
    name: str
    version: int
    label: str | None
    target: str
    precision: str
    size: int
    keyids: list[str]
    uploaded_at: float
    expires_at: float | None  # unix seconds; devices refuse the bundle from then on
    retired_at: float | None
    url: str  # where devices download it

    @classmethod
    def of(cls, row: Bundle, base_url: str) -> BundleOut:
        return cls(
            sha256=row.sha256, name=row.name, version=row.version, label=row.label, target=row.target,
            precision=row.precision, size=row.size, keyids=list(row.keyids), uploaded_at=row.uploaded_at,
            expires_at=row.expires_at, retired_at=row.retired_at, url=artifact_url(base_url, row.sha256),
        )  # fmt: skip


class BundleDetail(BundleOut):
    """One bundle with a summary of its manifest and what a device needs to run it."""

    task: str | None
    created: str
    expires: str | None
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    files: int
    runtime: dict[str, Any]  # the manifest's runtime section
    runtime_facts: dict[str, Any]  # what the fleet matches against a device's capabilities (sdk.compat)
    validation: dict[str, Any]

    @classmethod
    def detail(cls, row: Bundle, base_url: str) -> BundleDetail:
        manifest = Manifest.from_bytes(row.manifest.encode("utf-8"))
        return cls(
            **BundleOut.of(row, base_url).model_dump(),
            task=manifest.task, created=manifest.created, expires=manifest.expires,
            inputs=[t.to_dict() for t in manifest.inputs], outputs=[t.to_dict() for t in manifest.outputs],
            files=len(manifest.files), runtime=manifest.runtime.to_dict(), runtime_facts=dict(row.runtime_facts),
            validation=manifest.validation.to_dict(),
        )  # fmt: skip


class ReleaseOut(BaseModel):
    """A release: the bundles of one name and version."""

    name: str
    version: int
    bundles: int
    active: int
    first_uploaded_at: float

    @classmethod
    def of(cls, summary: ReleaseSummary) -> ReleaseOut:
        return cls(**vars(summary))


class ReleaseDetail(BaseModel):
    """A release's bundles, and per target the precisions it is offered in (retired ones left out)."""

    name: str
    version: int
    targets: dict[str, list[str]]
    bundles: list[BundleOut]
