"""A/B model slots and the pointer that says which one is active.

Layout under the agent's state directory::

    slots/A.<sha256:12>.<random>/   one installed bundle: bundle/ (verified members), manifest.json (the signed
                                    bytes), signatures.json (as shipped: re-verified against a new root), slot.json
    slots/B.<sha256:12>.<random>/   the other one
    slots/.incoming/                a bundle being verified (read_bundle's staging folder lives inside it)
    pointer.json                    {"active": "A", "slots": {"A": {..., "folder": ...}, "B": ... | null},
                                     "floors": {...}}

The pointer is the single commit point: it is replaced with temp file + fsync + ``os.replace`` + fsync of
the folder (``sdk.fsutil.atomic_write_bytes``), so after a crash it is either the old or the new one, whole.
Each slot entry names its folder, and a deployment installs into a new folder: the inactive slot's bundle
(the rollback target) stays listed and intact until the commit replaces its entry, and no pointer write
is needed before staging. A folder is set in the pointer only after it was filled and flushed. A folder the
pointer does not list is garbage and may be removed at any time (a pointer written by an older agent,
without ``folder``, names the folders ``A`` and ``B``).

``floors`` holds the highest version of each bundle name ever made active: the anti-rollback floor
(``device_runtime.floors.VersionFloors``, the record ``BundleStore`` keeps too; a later deploy below it
needs ``allow_downgrade``), which an explicit ``rollback`` does not lower. It is raised in the pointer
write that activates the bundle, so the commit and the floor cannot part. A pointer of an older agent
without ``floors`` loads with none.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from device_runtime.errors import StateError
from device_runtime.floors import VersionFloors
from sdk.bundle import VerifiedBundle
from sdk.errors import IntegrityError, ManifestError, SignatureError
from sdk.fsutil import PRIVATE_DIR_MODE, atomic_write_bytes, fsync_dir, make_private_dir, open_private
from sdk.manifest import Manifest, canonical_json
from sdk.signing import TrustedKeys, verify_signatures

__all__ = ["SLOTS", "Pointer", "SlotInfo", "SlotStore", "TreeFlush", "flush_tree", "other_slot"]

SLOTS = ("A", "B")
POINTER_FILE = "pointer.json"
POINTER_SCHEMA = 1
SLOTS_DIR = "slots"
INCOMING = ".incoming"
_BUNDLE = "bundle"
_MANIFEST = "manifest.json"
_SIGNATURES = "signatures.json"
_SLOT_META = "slot.json"
_CHUNK = 1 << 20  # bytes
_FOLDER_RE = re.compile(r"[AB](\.[0-9a-f]{12}\.[0-9a-f]{8})?")
_FLUSH_THREADS = 8  # fsyncs issued at once by flush_tree


def other_slot(slot: str) -> str:
    """``"B"`` for ``"A"`` and the reverse."""
    return SLOTS[1 - SLOTS.index(slot)]


@dataclass(frozen=True)
class SlotInfo:
    """What the pointer records about one installed slot."""

    name: str
    version: int
    target: str
    sha256: str  # of the bundle archive
    keyids: tuple[str, ...] = ()
    folder: str = ""  # under slots/; "" (pointers of older agents): the slot's name

    def model(self) -> dict[str, Any]:
        """The ``model`` object of the MQTT contract."""
        return {"name": self.name, "version": self.version, "target": self.target, "sha256": self.sha256}

    def to_dict(self) -> dict[str, Any]:
        return {**self.model(), "keyids": list(self.keyids), **({"folder": self.folder} if self.folder else {})}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SlotInfo:
        folder = str(d.get("folder", ""))
        if folder and not _FOLDER_RE.fullmatch(folder):
            raise ValueError(f"slot folder {folder!r} is not a slot folder name")
        return cls(
            str(d["name"]), int(d["version"]), str(d["target"]), str(d["sha256"]), tuple(d.get("keyids", ())), folder
        )

    @classmethod
    def of(cls, verified: VerifiedBundle) -> SlotInfo:
        """The entry of a bundle installed by ``SlotStore.install`` (its folder from its root)."""
        m = verified.manifest
        folder = verified.root.parent.name
        folder = folder if verified.root.name == _BUNDLE and _FOLDER_RE.fullmatch(folder) else ""
        return cls(m.name, m.version, m.target, verified.sha256, verified.keyids, folder)


@dataclass(frozen=True)
class Pointer:
    """The pointer file's content; pure data."""

    active: str | None = None
    slots: Mapping[str, SlotInfo | None] = field(default_factory=lambda: {s: None for s in SLOTS})
    floors: VersionFloors = field(default_factory=VersionFloors)

    def __post_init__(self) -> None:
        if self.active is not None and self.active not in SLOTS:
            raise StateError(f"pointer: active slot {self.active!r} is not one of {SLOTS}")
        if self.active is not None and self.slots.get(self.active) is None:
            raise StateError(f"pointer: active slot {self.active} has no bundle recorded")

    @property
    def active_info(self) -> SlotInfo | None:
        return None if self.active is None else self.slots.get(self.active)

    @property
    def inactive(self) -> str:
        """The slot a deployment writes into."""
        return "A" if self.active is None else other_slot(self.active)

    def floor(self, name: str) -> int | None:
        """The anti-rollback floor of ``name`` (``read_bundle``'s ``installed_version``)."""
        return self.floors.floor(name)

    def with_slot(self, slot: str, info: SlotInfo | None) -> Pointer:
        return replace(self, slots={**self.slots, slot: info})

    def activate(self, slot: str, *, raise_floor: bool = True) -> Pointer:
        """Make ``slot`` active; ``raise_floor`` lifts its name's version floor to its version."""
        info = self.slots.get(slot)
        if info is None:
            raise StateError(f"cannot activate empty slot {slot}")
        floors = self.floors.raised(info.name, info.version) if raise_floor else self.floors
        return replace(self, active=slot, floors=floors)

    def to_bytes(self) -> bytes:
        return canonical_json(
            {
                "schema": POINTER_SCHEMA,
                "active": self.active,
                "slots": {s: (None if i is None else i.to_dict()) for s, i in sorted(self.slots.items())},
                "floors": self.floors.to_json(),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Pointer:
        """Parse a pointer file.

        Raises:
            StateError: not a pointer of this schema.
        """
        try:
            raw = json.loads(data)
            if raw.get("schema") != POINTER_SCHEMA:
                raise ValueError(f"schema {raw.get('schema')!r}, expected {POINTER_SCHEMA}")
            slots = {s: (None if raw["slots"].get(s) is None else SlotInfo.from_dict(raw["slots"][s])) for s in SLOTS}
            floors = VersionFloors.from_json(raw.get("floors", {}))
            return cls(active=raw.get("active"), slots=slots, floors=floors)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise StateError(f"{POINTER_FILE} is corrupt: {e}") from e


class SlotStore:
    """The slots folder and the pointer file of one state directory. One writer (the agent) at a time."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        """Open the slot folders, creating them if needed.

        Raises:
            StateError: the folders cannot be created.
        """
        self.root = Path(state_dir).absolute()
        self.slots_dir = self.root / SLOTS_DIR
        try:
            make_private_dir(self.root)
            make_private_dir(self.slots_dir)
        except OSError as e:
            raise StateError(f"cannot create {self.slots_dir}: {e.strerror or e}") from e

    @property
    def pointer_path(self) -> Path:
        return self.root / POINTER_FILE

    @property
    def incoming(self) -> Path:
        """Where ``read_bundle`` extracts a new bundle: ``incoming / "bundle"``."""
        return self.slots_dir / INCOMING

    def folder(self, name: str) -> Path:
        """A slot folder by name (``SlotInfo.folder``, or ``A``/``B`` for pointers of older agents)."""
        if not _FOLDER_RE.fullmatch(name):
            raise StateError(f"{name!r} is not a slot folder name")
        return self.slots_dir / name

    def slot_dir(self, slot: str, info: SlotInfo) -> Path:
        """The folder of ``slot``, whose pointer entry is ``info``."""
        return self.folder(info.folder or slot)

    def read_pointer(self) -> Pointer:
        """The current pointer; an empty one when none was written yet.

        Raises:
            StateError: the file is unreadable or corrupt.
        """
        try:
            data = self.pointer_path.read_bytes()
        except FileNotFoundError:
            return Pointer()
        except OSError as e:
            raise StateError(f"cannot read {self.pointer_path}: {e.strerror or e}") from e
        return Pointer.from_bytes(data)

    def write_pointer(self, pointer: Pointer) -> None:
        """Replace the pointer atomically and durably (temp file, fsync, ``os.replace``, fsync folder).

        Raises:
            StateError: it cannot be written.
        """
        try:
            atomic_write_bytes(self.pointer_path, pointer.to_bytes())
        except OSError as e:
            raise StateError(f"cannot write {self.pointer_path}: {e.strerror or e}") from e

    def clean_incoming(self) -> None:
        """Remove a half-verified bundle (and read_bundle's staging folders) left by a crash."""
        shutil.rmtree(self.incoming, ignore_errors=True)

    def clean_unlisted(self, pointer: Pointer, keep: str | None = None) -> None:
        """Remove slot folders the pointer does not list (replaced bundles, crash leftovers), except the
        folder ``keep`` (a staged one)."""
        listed = {info.folder or slot for slot, info in pointer.slots.items() if info is not None}
        for path in self.slots_dir.iterdir():
            if path.name.startswith(".") or path.name in listed or path.name == keep:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def write_meta(self, verified: VerifiedBundle) -> None:
        """Add the slot metadata to a bundle verified into ``incoming / "bundle"`` (``install`` does it
        when this was not called).

        Raises:
            StateError: the files cannot be written.
        """
        try:
            self._write_meta(verified)
        except OSError as e:
            raise StateError(f"cannot stage {self.incoming}: {e.strerror or e}") from e

    def _write_meta(self, verified: VerifiedBundle) -> None:
        files = [(_MANIFEST, verified.manifest_bytes or verified.manifest.to_bytes()),
                 (_SLOT_META, canonical_json(SlotInfo.of(verified).to_dict()))]  # fmt: skip
        if verified.signatures_bytes:
            files.append((_SIGNATURES, verified.signatures_bytes))
        for name, data in files:
            with open_private(self.incoming / name, "wb") as f:
                f.write(data)

    def signed_by(self, slot: str, info: SlotInfo, trust: TrustedKeys) -> list[str]:
        """The keys of ``trust`` whose signatures on the slot's bundle are valid, a threshold of them.

        The bundle's own ``signatures.json`` is verified again over its manifest; a slot installed by an
        older agent, without it, counts the keys recorded at installation (``SlotInfo.keyids``).

        Raises:
            SignatureError: fewer than ``trust.threshold`` of its keys signed it (a revoked key's bundle).
            IntegrityError: the slot's files are missing.
            StateError: they are unreadable.
        """
        folder = self.slot_dir(slot, info)
        try:
            manifest = (folder / _MANIFEST).read_bytes()
            signatures = (folder / _SIGNATURES).read_bytes()
        except FileNotFoundError as e:
            if e.filename != str(folder / _SIGNATURES):
                raise IntegrityError(f"slot {slot} is incomplete: {e.filename} is missing") from e
            valid = sorted(set(info.keyids) & set(trust.by_id()))
            if len(valid) < trust.threshold:
                raise SignatureError(
                    f"{len(valid)} of the keys that signed slot {slot}'s bundle are trusted, {trust.threshold} required"
                ) from None
            return valid
        except OSError as e:
            raise StateError(f"slot {slot}'s files are unreadable: {e.strerror or e}") from e
        return verify_signatures(manifest, signatures, trust)

    def install(self, slot: str, verified: VerifiedBundle, *, flush: bool = True) -> VerifiedBundle:
        """Move a bundle verified into ``incoming / "bundle"`` into a new folder for ``slot``, flushed.

        The folder is new (``A.<sha256:12>.<random>``), so the bundle the pointer lists for ``slot`` stays
        intact until the pointer names this one (``SlotInfo.of`` the result). ``flush=False`` leaves the
        flush to the caller, who must ``start_flush(...).wait()`` before the pointer names the folder
        (the agent runs it beside the trial load). Until then a kill -9 loses nothing (the page cache
        survives it) and a power cut at worst leaves files that fail their hashes, which ``open_staged``
        refuses.

        Returns:
            The same bundle, now rooted in the slot's new folder.

        Raises:
            StateError: the files cannot be written or moved.
        """
        if verified.root != self.incoming / _BUNDLE:
            raise StateError(f"install expects a bundle verified into {self.incoming / _BUNDLE}")
        if slot not in SLOTS:
            raise StateError(f"no slot {slot!r}; the slots are {SLOTS}")
        target = self.folder(f"{slot}.{verified.sha256[:12]}.{os.urandom(4).hex()}")
        try:
            if not (self.incoming / _SLOT_META).exists():  # no write_meta() before
                self._write_meta(verified)
            os.replace(self.incoming, target)
            os.chmod(target, PRIVATE_DIR_MODE)  # read_bundle made ``incoming`` with the umask's mode
        except OSError as e:
            raise StateError(f"cannot install into slot {slot}: {e.strerror or e}") from e
        if flush:
            self.flush_folder(target.name)
        return replace(verified, root=target / _BUNDLE)

    def flush_folder(self, name: str) -> None:
        """Put a slot folder's files and folders, and its name in ``slots/``, on disk (before the pointer
        names it). read_bundle renames but does not flush member data: a power cut must not leave the
        pointer on a folder with truncated files.

        Raises:
            StateError: a file or folder cannot be flushed.
        """
        try:
            flush_tree(self.folder(name))
            fsync_dir(self.slots_dir)
        except OSError as e:
            raise StateError(f"cannot flush slot folder {name}: {e.strerror or e}") from e

    def start_flush(self, name: str, executor: Executor) -> TreeFlush:
        """``flush_folder`` on ``executor``'s threads: ``wait()`` on the result before the pointer names it.

        Raises:
            StateError: a file or folder cannot be opened.
        """
        try:
            return TreeFlush(executor).add_tree(self.folder(name)).add(self.slots_dir)
        except OSError as e:
            raise StateError(f"cannot flush slot folder {name}: {e.strerror or e}") from e

    def open_staged(self, slot: str, name: str, sha256: str) -> VerifiedBundle:
        """The folder ``name`` installed for ``slot`` by a deployment but not yet in the pointer, re-hashed.

        Raises:
            IntegrityError: the folder is incomplete, holds another bundle or a changed file.
            StateError: its metadata is unreadable.
        """
        try:
            meta = SlotInfo.from_dict(json.loads((self.folder(name) / _SLOT_META).read_bytes()))
        except FileNotFoundError as e:
            raise IntegrityError(f"slot {slot} is incomplete: {e.filename} is missing") from e
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StateError(f"slot {slot}'s metadata is unreadable: {e}") from e
        if meta.sha256 != sha256:
            raise IntegrityError(f"slot {slot} holds bundle {meta.sha256[:12]}, not {sha256[:12]}")
        return self.open_slot(slot, replace(meta, folder=name))

    def open_slot(self, slot: str, expected: SlotInfo, *, check_hashes: bool = True) -> VerifiedBundle:
        """A slot's bundle as a ``VerifiedBundle``, after checking it still is what the pointer says.

        Args:
            slot: ``"A"`` or ``"B"``.
            expected: the pointer's record of the slot (its ``folder`` says where it is).
            check_hashes: re-hash every member against the manifest (catches on-disk corruption).

        Raises:
            IntegrityError: a member is missing, changed, or the slot holds another bundle.
            StateError: the slot's metadata is unreadable.
        """
        folder = self.slot_dir(slot, expected)
        try:
            meta = SlotInfo.from_dict(json.loads((folder / _SLOT_META).read_bytes()))
            manifest = Manifest.from_bytes((folder / _MANIFEST).read_bytes())
        except FileNotFoundError as e:
            raise IntegrityError(f"slot {slot} is incomplete: {e.filename} is missing") from e
        except (OSError, ValueError, KeyError, TypeError, ManifestError) as e:
            raise StateError(f"slot {slot}'s metadata is unreadable: {e}") from e
        if meta.sha256 != expected.sha256 or manifest.name != expected.name or manifest.version != expected.version:
            raise IntegrityError(f"slot {slot} holds {meta.name} v{meta.version}, the pointer expects {expected}")
        root = folder / _BUNDLE
        if check_hashes:
            for entry in manifest.files:
                path = root / entry.path
                try:
                    digest, size = _hash_file(path)
                except OSError as e:
                    raise IntegrityError(f"slot {slot}: {entry.path} is unreadable: {e.strerror or e}") from e
                if size != entry.size or digest != entry.sha256:
                    raise IntegrityError(f"slot {slot}: {entry.path} does not match its manifest hash")
        return VerifiedBundle(manifest=manifest, root=root, sha256=expected.sha256, keyids=expected.keyids)


class TreeFlush:
    """fsyncs of files and folders, each submitted to ``executor`` as soon as it is added: all run at once.

    Each file's data and each folder's entries must be on disk before the pointer may name the slot; the
    order among them does not matter (nothing refers to the tree until they all returned), so the fsyncs
    run together and the file system commits them together (one ext4 journal commit for the lot instead
    of one per call in a row). Each path is opened when added, so the tree may be renamed while the
    flush runs. ``wait()`` returns when all are on disk.
    """

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._futures: list[Future[None]] = []

    def add_tree(self, root: Path) -> TreeFlush:
        """Flush every file and folder under ``root``, and ``root``.

        Raises:
            OSError: one cannot be opened.
        """
        for path in [*sorted(root.rglob("*")), root]:
            self.add(path)
        return self

    def add(self, path: Path) -> TreeFlush:
        """Flush one file or folder (a folder that cannot be opened, as on Windows, is skipped like ``fsync_dir``).

        Raises:
            OSError: a file cannot be opened.
        """
        if path.is_dir():
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                return self
        else:
            fd = os.open(path, os.O_RDWR)  # write access: Windows flushes only those
        self._futures.append(self._executor.submit(_fsync_and_close, fd))
        return self

    def wait(self) -> None:
        """Block until every fsync returned.

        Raises:
            OSError: the first one that failed.
        """
        for future in self._futures:
            future.result()


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_tree(root: Path) -> None:
    """Every file and folder under ``root`` (and ``root``) on disk, fsynced concurrently.

    Raises:
        OSError: a file or folder cannot be flushed.
    """
    with ThreadPoolExecutor(max_workers=_FLUSH_THREADS, thread_name_prefix="edgeship-fsync") as pool:
        TreeFlush(pool).add_tree(root).wait()


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
