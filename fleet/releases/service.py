"""The bundle repository: upload (verified with the fleet's keys), list, inspect, retire, and the choice of
a release's bundle for one device.

Upload verifies a bundle completely with the kernel (``sdk.bundle.read_bundle``: signatures against the
fleet's trusted keys, manifest, expiry, every member's hash) before anything is stored: a bundle signed by
an unknown key, tampered or truncated is refused with the kernel's own error (``SignatureError``,
``IntegrityError``, ``UnsafeArchiveError``, ...) and leaves neither a file nor a row. The fleet checks
what devices will check anyway, so an operator learns at upload, not mid-rollout, that a bundle would be
refused by every device.

A device's bundle is chosen by ``choose``: among the release's bundles that are not retired and that the
device can run by the kernel's rule (``sdk.compat.why_incompatible``, the very check the device makes
before installing, plus the accelerators a bundle cannot load without), it prefers

1. bundles that use more of the accelerators the device reports (a CUDA build on a GPU device before a
   CPU build),
2. then the precision that comes first in ``precision_order`` (``PRECISION_ORDER`` by default: int8
   builds first, as they are smaller and faster on edge CPUs and passed their validation against the
   original model when they were packaged, then fp16, then fp32; int4 last, being the lossiest),
3. then the smallest sha256, so that every fleet process makes the same choice.

When none fits, the ``Choice`` carries one reason per bundle, so a rollout can be refused with a message
that says why before anything is sent.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.exc import IntegrityError as DuplicateRow
from sqlalchemy.orm import Session

from fleet.db import Database
from fleet.releases.store import ArtifactStore
from fleet.releases.tables import Bundle
from sdk.bundle import BUNDLE_SUFFIX, read_bundle
from sdk.compat import RuntimeFacts, missing_accelerators, why_incompatible
from sdk.signing import TrustedKeys

__all__ = [
    "PRECISION_ORDER",
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

PRECISION_ORDER: tuple[str, ...] = ("int8", "int8-dynamic", "int8-weights", "fp16", "fp32", "int4", "int4-palette")


@dataclass(frozen=True)
class ReleaseSettings:
    """What the bundle repository needs; the app keeps one as ``app.state.releases``.

    Attributes:
        store_dir: the artifact folder (bundles by sha256).
        trusted_keys: the keys a bundle must be signed with (the same the devices trust).
        max_upload_bytes: the largest bundle ``POST /bundles`` accepts (413 over it).
        artifact_base_url: where devices download bundles from: ``<base>/artifacts/<sha256>.edgebundle``;
            None: this server (its own URL). Set it when the artifact folder is published on another
            HTTP server or an object store: devices verify every bundle's signatures themselves, so the
            place it comes from need not be trusted.
        precision_order: precisions in order of preference when several bundles fit a device.
    """

    store_dir: Path
    trusted_keys: TrustedKeys | None  # None: a server started without --trust refuses every upload
    max_upload_bytes: int = 2 * 2**30
    artifact_base_url: str | None = None
    precision_order: tuple[str, ...] = PRECISION_ORDER

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.store_dir)


# ---- upload ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadResult:
    """The stored bundle, and whether this upload added it (False: it was there already)."""

    bundle: Bundle
    created: bool


def upload(
    db: Database, source: bytes | str | Path, trusted_keys: TrustedKeys, store: ArtifactStore, *, now: float
) -> UploadResult:
    """Verify a bundle (bytes, or a file path) and store it; idempotent by sha256 (a re-upload returns the
    stored row unchanged: a retired bundle stays retired, retiring being a decision, not an accident).

    The bytes are copied into the store's incoming folder first and those very bytes are verified and
    stored, so a file changing under us cannot slip through.

    Raises:
        BundleError: its kernel subclass (``SignatureError`` for an unknown key, ``IntegrityError`` for a
            tampered member, ``UnsafeArchiveError``, ``ManifestError``, ``ExpiredError``); nothing stored.
        OSError: the source cannot be read or the store written.
    """
    if isinstance(source, bytes):
        temp = store.receive([source], max_bytes=len(source))
    else:
        temp = store.new_temp()
        try:
            shutil.copyfile(source, temp)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    return ingest(db, temp, trusted_keys, store, now=now)


def ingest(db: Database, temp: Path, trusted_keys: TrustedKeys, store: ArtifactStore, *, now: float) -> UploadResult:
    """``upload`` for a file already in the store's incoming folder (an HTTP upload): it is consumed.

    Raises:
        BundleError: as ``upload``.
    """
    scratch = store.temp_dir()
    try:
        verified = read_bundle(temp, trusted_keys, scratch / "bundle", now=datetime.fromtimestamp(now, timezone.utc))
        size = temp.stat().st_size
        with db.session() as session:
            existing = session.get(Bundle, verified.sha256)
            if existing is not None:
                if not store.has(verified.sha256):  # the file was lost: the verified bytes restore it
                    store.put(temp, verified.sha256)
                return UploadResult(existing, created=False)
        store.put(temp, verified.sha256)  # the file first: a row never names a missing file
        manifest = verified.manifest
        expires = manifest.expires_at()
        row = Bundle(
            sha256=verified.sha256,
            name=manifest.name,
            version=manifest.version,
            label=manifest.label,
            target=manifest.target,
            precision=manifest.precision,
            size=size,
            keyids=list(verified.keyids),
            manifest=manifest.to_bytes().decode("utf-8"),
            runtime_facts=RuntimeFacts.from_manifest(manifest).to_dict(),
            storage_path=ArtifactStore.filename(verified.sha256),
            expires_at=None if expires is None else expires.timestamp(),
            uploaded_at=now,
        )
        try:
            with db.session() as session:
                session.add(row)
        except DuplicateRow:  # the same bundle uploaded concurrently: theirs won, the file is identical
            with db.session() as session:
                winner = session.get(Bundle, verified.sha256)
            if winner is None:
                raise
            return UploadResult(winner, created=False)
        return UploadResult(row, created=True)
    finally:
        temp.unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)


# ---- reading and retiring ----------------------------------------------------------------------


def list_bundles(
    session: Session,
    *,
    name: str | None = None,
    version: int | None = None,
    target: str | None = None,
    retired: bool | None = None,
) -> list[Bundle]:
    """Bundles matching every filter given, newest release first (``retired``: only retired or only not)."""
    query = select(Bundle)
    if name is not None:
        query = query.where(Bundle.name == name)
    if version is not None:
        query = query.where(Bundle.version == version)
    if target is not None:
        query = query.where(Bundle.target == target)
    if retired is not None:
        query = query.where(Bundle.retired_at.is_not(None) if retired else Bundle.retired_at.is_(None))
    order = (Bundle.name, Bundle.version.desc(), Bundle.target, Bundle.precision, Bundle.sha256)
    return list(session.scalars(query.order_by(*order)))


def get_bundle(session: Session, sha256: str) -> Bundle | None:
    return session.get(Bundle, sha256.lower())


def retire(session: Session, sha256: str, *, now: float) -> Bundle | None:
    """Retire a bundle: never chosen for a new rollout again, still downloadable (a device mid-deployment
    may be fetching or resuming it). Retiring twice keeps the first time. None: no such bundle."""
    row = session.get(Bundle, sha256.lower())
    if row is not None and row.retired_at is None:
        row.retired_at = now
    return row


@dataclass(frozen=True)
class ReleaseSummary:
    """One release: the bundles of ``name`` at ``version``."""

    name: str
    version: int
    bundles: int
    active: int  # not retired
    first_uploaded_at: float


def list_releases(session: Session, *, name: str | None = None) -> list[ReleaseSummary]:
    """Every release (or every release of ``name``), by name, newest version first."""
    active = func.sum(case((Bundle.retired_at.is_(None), 1), else_=0))
    query = select(Bundle.name, Bundle.version, func.count(), active, func.min(Bundle.uploaded_at))
    if name is not None:
        query = query.where(Bundle.name == name)
    query = query.group_by(Bundle.name, Bundle.version).order_by(Bundle.name, Bundle.version.desc())
    return [ReleaseSummary(n, int(v), int(c), int(a or 0), float(t)) for n, v, c, a, t in session.execute(query)]


def release_bundles(session: Session, name: str, version: int) -> list[Bundle]:
    """The bundles of one release, retired ones included, by target and precision (empty: no such release)."""
    return list_bundles(session, name=name, version=version)


# ---- choosing a bundle for a device ------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One bundle of the release as seen for one device: ``reason`` None when it can run there."""

    sha256: str
    target: str
    precision: str
    reason: str | None


@dataclass(frozen=True)
class Choice:
    """The bundle a device gets (None: none fits) and every candidate, the fitting ones first, best first."""

    bundle: Bundle | None
    candidates: tuple[Candidate, ...] = field(default=())

    @property
    def reasons(self) -> dict[str, str]:
        """sha256 -> why that bundle does not fit (fitting bundles are left out)."""
        return {c.sha256: c.reason for c in self.candidates if c.reason is not None}

    def explain(self) -> str:
        """One line for a refusal: each bundle with its reason."""
        if not self.candidates:
            return "the release has no bundles"
        return "; ".join(f"{c.target}/{c.precision} {c.sha256[:12]}: {c.reason or 'fits'}" for c in self.candidates)


def _why_not(bundle: Bundle, capabilities: Mapping[str, Any], now: float | None) -> str | None:
    if bundle.retired_at is not None:
        return "retired"
    if now is not None and bundle.expires_at is not None and bundle.expires_at <= now:
        return "expired (devices refuse it)"
    facts = RuntimeFacts.from_dict(bundle.runtime_facts)
    why = why_incompatible(facts, capabilities)
    if why is not None:
        return why
    missing = missing_accelerators(facts, capabilities)
    if missing:
        return f"the bundle needs the accelerator(s) {', '.join(missing)}, which the device does not report"
    return None


def choose(
    bundles: Sequence[Bundle],
    capabilities: Mapping[str, Any],
    precision_order: Sequence[str] = PRECISION_ORDER,
    *,
    now: float | None = None,
) -> Choice:
    """The best bundle of ``bundles`` (one release's) for a device with ``capabilities``; pure.

    The rollout engine loads a release once (``release_bundles``) and calls this per device. With ``now``,
    a bundle whose manifest has expired by then is left out too (every device would refuse it).
    """
    have = capabilities.get("accelerators") if isinstance(capabilities, Mapping) else None
    accelerators = {a for a in have if isinstance(a, str)} if isinstance(have, list) else set()
    rank = {p: i for i, p in enumerate(precision_order)}

    def key(bundle: Bundle) -> tuple[int, int, str]:
        used = len(accelerators.intersection(bundle.runtime_facts.get("accelerators") or ()))
        return (-used, rank.get(bundle.precision, len(rank)), bundle.sha256)

    judged = [(b, _why_not(b, capabilities, now)) for b in bundles]
    fitting = sorted((b for b, why in judged if why is None), key=key)
    others = sorted(((b, why) for b, why in judged if why is not None), key=lambda item: item[0].sha256)
    candidates = [Candidate(b.sha256, b.target, b.precision, None) for b in fitting]
    candidates += [Candidate(b.sha256, b.target, b.precision, why) for b, why in others]
    return Choice(fitting[0] if fitting else None, tuple(candidates))


def choose_bundle(
    session: Session,
    name: str,
    version: int,
    capabilities: Mapping[str, Any],
    precision_order: Sequence[str] = PRECISION_ORDER,
    *,
    now: float | None = None,
) -> Choice:
    """``choose`` over the bundles of release ``name`` ``version`` (no bundles: ``Choice(None, ())``)."""
    return choose(release_bundles(session, name, version), capabilities, precision_order, now=now)


# ---- the deploy command --------------------------------------------------------------------------


def artifact_url(base_url: str, sha256: str) -> str:
    """``<base>/artifacts/<sha256>.edgebundle``: where a device downloads a bundle."""
    return f"{base_url.rstrip('/')}/artifacts/{sha256}{BUNDLE_SUFFIX}"
