"""The device's record of installed bundles, under a state directory.

Layout::

    STATE_DIR/installed.json                            which versions of which bundle are installed,
                                                        and the anti-rollback floor of each name
    STATE_DIR/bundles/NAME/VERSION-SHA256[:12]/         one verified, extracted bundle
    STATE_DIR/.staging-XXXXXXXX/                        a bundle being verified (removed on failure)

Installing is two-phase so that a caller can try the bundle (load it in its backend) before it counts:
``stage`` verifies into a staging folder, ``StagedBundle.commit`` moves it into place and records it,
``StagedBundle.discard`` removes it. Until ``commit`` returns, the state directory's listing and
``installed.json`` are exactly what they were. ``installed.json`` is written with temp file + fsync +
``os.replace`` + fsync of the folder. One writer at a time is assumed (the CLI or a program calling
``load(state_dir=...)``; the OTA agent keeps its own record, ``slots.SlotStore``).

The version floor is ``device_runtime.floors.VersionFloors``, the same record and rule as the agent's
pointer, kept in ``installed.json`` under ``"floors"`` and raised in the write that records the install.
An ``installed.json`` written before floors were kept has none: its floors are the highest version
recorded per name, which is what they would have been.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from device_runtime.errors import StateError
from device_runtime.floors import VersionFloors
from sdk.bundle import ReadLimits, VerifiedBundle, read_bundle
from sdk.fsutil import atomic_write_bytes, fsync_dir
from sdk.manifest import canonical_json, format_time
from sdk.signing import TrustedKeys

__all__ = ["BundleStore", "InstalledBundle", "StagedBundle"]

STATE_FILE = "installed.json"
STATE_SCHEMA = 1
BUNDLES_DIR = "bundles"
_STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class InstalledBundle:
    """One recorded install."""

    name: str
    version: int
    target: str
    sha256: str  # of the archive file
    path: Path  # the extracted bundle folder
    installed: str  # UTC timestamp, manifest format

    def to_dict(self, state_dir: Path) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "target": self.target,
            "sha256": self.sha256,
            "path": self.path.relative_to(state_dir).as_posix(),
            "installed": self.installed,
        }


class BundleStore:
    """Installed bundle versions per name, and their extracted folders, under ``state_dir``."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        """Open (creating the folder if needed) a state directory.

        Raises:
            StateError: the folder cannot be created.
        """
        self.root = Path(state_dir).absolute()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StateError(f"cannot create state directory {self.root}: {e.strerror or e}") from e

    # ---- reading -------------------------------------------------------------------------------
    def _read_state(self) -> dict[str, Any]:
        path = self.root / STATE_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {"schema": STATE_SCHEMA, "bundles": {}, "floors": {}}
        except OSError as e:
            raise StateError(f"cannot read {path}: {e.strerror or e}") from e
        try:
            state = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StateError(f"{path} is corrupt: {e}") from e
        if not (
            isinstance(state, dict) and state.get("schema") == STATE_SCHEMA and isinstance(state.get("bundles"), dict)
        ):
            raise StateError(f"{path} is not an edgeship state file of schema {STATE_SCHEMA}")
        try:
            if "floors" in state:
                VersionFloors.from_json(state["floors"])
            else:  # written before floors were kept
                state["floors"] = VersionFloors.of(_accepted(state["bundles"])).to_json()
        except (ValueError, KeyError, TypeError) as e:
            raise StateError(f"{path} is corrupt: {e}") from e
        return state

    def installed(self, name: str) -> list[InstalledBundle]:
        """Every recorded install of bundle ``name``, oldest first.

        Raises:
            StateError: the state file is unreadable or corrupt.
        """
        try:
            return [
                InstalledBundle(
                    name=e["name"],
                    version=e["version"],
                    target=e["target"],
                    sha256=e["sha256"],
                    path=self.root / e["path"],
                    installed=e["installed"],
                )
                for e in self._read_state()["bundles"].get(name, [])
            ]
        except (KeyError, TypeError) as e:
            raise StateError(f"{self.root / STATE_FILE} has a malformed entry for {name!r}: {e}") from e

    def floors(self) -> VersionFloors:
        """The anti-rollback floors: the highest version of each name ever recorded.

        Raises:
            StateError: the state file is unreadable or corrupt.
        """
        return VersionFloors.from_json(self._read_state()["floors"])

    def highest_version(self, name: str) -> int | None:
        """The floor of ``name``: its highest version ever recorded, or None when there is none.

        Raises:
            StateError: the state file is unreadable or corrupt.
        """
        return self.floors().floor(name)

    # ---- installing ----------------------------------------------------------------------------
    def stage(
        self,
        path: str | os.PathLike[str],
        trust: TrustedKeys,
        *,
        allow_downgrade: bool = False,
        now: datetime | None = None,
        limits: ReadLimits = ReadLimits(),
    ) -> StagedBundle:
        """Verify a bundle completely into a staging folder; nothing is recorded yet.

        The version must not be lower than the highest recorded for that name unless
        ``allow_downgrade``.

        Raises:
            BundleError: any verification failure (``SignatureError``, ``RollbackError``, ...); see
                ``sdk.bundle.read_bundle``. Nothing is left behind.
            StateError: the state file is corrupt or the staging folder cannot be made.
        """
        try:
            staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.root))
        except OSError as e:
            raise StateError(f"cannot create a staging folder in {self.root}: {e.strerror or e}") from e
        try:
            verified = self._read(path, trust, staging / "bundle", allow_downgrade, now, limits)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return StagedBundle(self, verified, staging)

    def _read(
        self,
        path: str | os.PathLike[str],
        trust: TrustedKeys,
        dest: Path,
        allow_downgrade: bool,
        now: datetime | None,
        limits: ReadLimits,
    ) -> VerifiedBundle:
        # read_bundle looks the floor up by the verified name, before extracting anything.
        floors = self.floors()
        return read_bundle(
            path, trust, dest, installed_version=floors.floor, allow_downgrade=allow_downgrade, now=now, limits=limits
        )

    def _commit(self, verified: VerifiedBundle, staging: Path) -> InstalledBundle:
        manifest = verified.manifest
        final = self.root / BUNDLES_DIR / manifest.name / f"{manifest.version}-{verified.sha256[:12]}"
        existing = next((b for b in self.installed(manifest.name) if b.sha256 == verified.sha256), None)
        if existing is not None and existing.path.is_dir():  # the same archive again: keep what is there
            shutil.rmtree(staging, ignore_errors=True)
            return existing

        state = self._read_state()
        created = [p for p in (final.parent.parent, final.parent) if not p.exists()]
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # left by a crash between the move and the state write: replace it
                shutil.rmtree(final)
            os.replace(verified.root, final)
            fsync_dir(final.parent)
            if existing is not None:  # recorded, but its folder had gone: restored, nothing to record
                return existing
            entry = InstalledBundle(
                name=manifest.name,
                version=manifest.version,
                target=manifest.target,
                sha256=verified.sha256,
                path=final,
                installed=format_time(datetime.now(timezone.utc)),
            )
            state["bundles"].setdefault(manifest.name, []).append(entry.to_dict(self.root))
            floors = VersionFloors.from_json(state["floors"]).raised(manifest.name, manifest.version)
            state["floors"] = floors.to_json()
            self._write_state(state)
            return entry
        except OSError as e:
            shutil.rmtree(final, ignore_errors=True)
            for folder in reversed(created):
                shutil.rmtree(folder, ignore_errors=True)
            raise StateError(f"cannot install {manifest.name} v{manifest.version} in {self.root}: {e}") from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _write_state(self, state: dict[str, Any]) -> None:
        atomic_write_bytes(self.root / STATE_FILE, canonical_json(state))


class StagedBundle:
    """A verified bundle in a staging folder, not yet recorded. ``commit`` or ``discard`` it once."""

    def __init__(self, store: BundleStore, verified: VerifiedBundle, staging: Path) -> None:
        self.verified = verified
        self._store = store
        self._staging: Path | None = staging

    def commit(self) -> InstalledBundle:
        """Move the bundle into place and record it; the same archive installed before is reused.

        Raises:
            StateError: the folder or state file cannot be written; the store is left as it was.
        """
        if self._staging is None:
            raise StateError("this staged bundle was already committed or discarded")
        staging, self._staging = self._staging, None
        return self._store._commit(self.verified, staging)

    def discard(self) -> None:
        """Remove the staging folder; idempotent."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def _accepted(bundles: dict[str, Any]) -> list[tuple[str, int]]:
    """``(name, version)`` of every install recorded in ``installed.json``'s ``bundles``."""
    return [(name, int(entry["version"])) for name, entries in bundles.items() for entry in entries]
