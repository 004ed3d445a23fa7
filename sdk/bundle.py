"""Writing and safely reading ``.edgebundle`` archives.

A bundle is a POSIX tar archive (optionally gzip-compressed) whose first member is
``manifest.json`` and second ``signatures.json``; every other member is listed in the manifest's
``files`` with its sha256 and size. See docs/bundle-format.md.

Reading never trusts the archive: the manifest and signatures are read under byte caps and
verified first, then each member is streamed into a private staging folder, hashed and checked,
and only when everything passed is the staging folder renamed to its destination. On any failure
the staging folder is removed and the destination never appears.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from sdk.errors import (
    BundleError,
    ExpiredError,
    IntegrityError,
    ManifestError,
    RollbackError,
    UnsafeArchiveError,
)
from sdk.fsutil import PRIVATE_DIR_MODE, fsync_dir, open_private
from sdk.manifest import FileEntry, Manifest, check_member_path, strict_json_loads
from sdk.signing import SigningKey, TrustedKeys, sign_manifest, verify_signatures

__all__ = [
    "BUNDLE_SUFFIX",
    "ReadLimits",
    "VerifiedBundle",
    "bundle_filename",
    "file_sha256",
    "inspect_bundle",
    "read_bundle",
    "write_bundle",
]

BUNDLE_SUFFIX = ".edgebundle"
MANIFEST_NAME = "manifest.json"
SIGNATURES_NAME = "signatures.json"
_CHUNK = 1 << 20  # bytes


@dataclass(frozen=True)
class ReadLimits:
    """Caps applied while reading an untrusted bundle."""

    max_bundle_bytes: int = 4 * 2**30  # bytes, size of the archive file
    max_manifest_bytes: int = 1 * 2**20  # bytes
    max_signatures_bytes: int = 64 * 2**10  # bytes
    max_members: int = 1024  # archive members, manifest and signatures included
    max_member_bytes: int = 2 * 2**30  # bytes, one expanded member
    max_total_bytes: int = 4 * 2**30  # bytes, all expanded members together
    max_header_bytes: int = 64 * 2**10  # bytes, one pax extended header (read whole into memory)


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signatures, version, expiry and every member were checked."""

    manifest: Manifest
    root: Path  # folder holding the verified members
    sha256: str  # of the whole archive file
    keyids: tuple[str, ...]  # trusted keys whose signatures were valid
    # The signed bytes as read (``read_bundle``), so that an installed bundle can be verified again against
    # another set of keys (a device's new trust root); empty where the bundle was not read here.
    manifest_bytes: bytes = field(default=b"", repr=False, compare=False)
    signatures_bytes: bytes = field(default=b"", repr=False, compare=False)

    def path(self, member: str) -> Path:
        """Absolute path of a verified member."""
        self.manifest.file(member)  # KeyError for a path the manifest does not list
        return self.root / member


def bundle_filename(manifest: Manifest) -> str:
    """``NAME-VERSION-TARGET-PRECISION.edgebundle``."""
    return f"{manifest.name}-{manifest.version}-{manifest.target}-{manifest.precision}{BUNDLE_SUFFIX}"


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---- writing -----------------------------------------------------------------------------------
def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_bundle(
    out_path: str | os.PathLike[str],
    manifest: Manifest,
    members: Mapping[str, str | os.PathLike[str] | bytes],
    keys: Sequence[SigningKey],
) -> Manifest:
    """Hash ``members``, complete the manifest's ``files``, sign it and write the archive atomically.

    Args:
        out_path: the bundle file to write (replaced atomically if it exists).
        manifest: the manifest; its ``files`` are replaced by the entries computed here.
        members: archive path -> source file path or bytes.
        keys: what signs (at least one): ``sdk.signing.Signer`` objects (an HSM, a ``KeySigner``) or
            Ed25519 private keys.

    Returns:
        The manifest as written, with ``files`` filled in.

    Raises:
        ManifestError: a member path is unsafe, or the manifest's model/golden files are missing.
        KeyFileError: a signer failed (``sdk.signing.sign_entries``).
    """
    entries: list[FileEntry] = []
    for path, src in members.items():
        why = check_member_path(path)
        if why:
            raise ManifestError(f"bundle member {path!r}: {why}")
        if isinstance(src, bytes):
            entries.append(FileEntry(path, hashlib.sha256(src).hexdigest(), len(src)))
        else:
            entries.append(FileEntry(path, file_sha256(src), os.path.getsize(src)))
    final = manifest.with_files(entries)
    manifest_bytes = final.to_bytes()
    signatures_bytes = sign_manifest(manifest_bytes, keys)
    mtime = int(final.created_at().timestamp())

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name, data in ((MANIFEST_NAME, manifest_bytes), (SIGNATURES_NAME, signatures_bytes)):
                    tar.addfile(_tarinfo(name, len(data), mtime), io.BytesIO(data))
                for entry in final.files:
                    src = members[entry.path]
                    info = _tarinfo(entry.path, entry.size, mtime)
                    if isinstance(src, bytes):
                        tar.addfile(info, io.BytesIO(src))
                    else:
                        with open(src, "rb") as f:
                            tar.addfile(info, f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp_name, out)
        fsync_dir(out.parent)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return final


# ---- reading -----------------------------------------------------------------------------------
_GZIP_MAGIC = b"\x1f\x8b"
# Other compressions tarfile would detect; refused (xz may demand a huge dictionary up front).
_OTHER_MAGIC = ((b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
_MAX_HEADER_CHAIN = 4  # pax headers in a row before one member


def _member_kind(info: tarfile.TarInfo) -> str | None:
    """Why a member is not a plain file, or None for a plain file."""
    if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return None
    if info.issym():
        return "symbolic link"
    if info.islnk():
        return "hard link"
    if info.ischr() or info.isblk():
        return "device node"
    if info.isfifo():
        return "FIFO"
    if info.isdir():
        return "directory"
    return "special member"


def _strict_tarinfo(limits: ReadLimits) -> type[tarfile.TarInfo]:
    """A TarInfo class that refuses the header kinds tarfile would process at unbounded cost.

    tarfile reads a pax or GNU long-name header's whole body into memory and follows chains of
    them recursively, and expands GNU sparse maps: all before the caller sees the member, so a
    small gzip file could exhaust memory or the stack before any cap applied. Bundles need none
    of that: only ``x`` (per-member pax) headers up to ``max_header_bytes`` are accepted.
    """
    depth = 0

    class _StrictTarInfo(tarfile.TarInfo):
        def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
            nonlocal depth
            if self.type in (tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
                raise UnsafeArchiveError("global pax headers are not allowed in a bundle")
            if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.GNUTYPE_SPARSE):
                raise UnsafeArchiveError("GNU tar extensions (long names, sparse files) are not allowed in a bundle")
            if self.type != tarfile.XHDTYPE:
                return super()._proc_member(tf)  # type: ignore[misc]
            if not 0 <= self.size <= limits.max_header_bytes:
                raise UnsafeArchiveError(
                    f"pax header of {self.size} bytes, over the {limits.max_header_bytes}-byte cap"
                )
            depth += 1
            try:
                if depth > _MAX_HEADER_CHAIN:
                    raise UnsafeArchiveError("too many pax headers in a row")
                return super()._proc_member(tf)  # type: ignore[misc]
            finally:
                depth -= 1

        def _refuse_sparse(self, *args: object) -> None:
            raise UnsafeArchiveError("GNU sparse members are not allowed in a bundle")

        _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse

    return _StrictTarInfo


class _HashingFile(io.RawIOBase):
    """Read-only file wrapper that hashes every byte read, so the archive hash is of what was checked."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        data = self._raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha256.update(data)
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()

    def hexdigest(self) -> str:
        """Hash of the whole file: reads whatever the tar reader left unread."""
        while self.read(_CHUNK):
            pass
        return self.sha256.hexdigest()


class _ArchiveReader:
    """Walks an untrusted tar stream, enforcing member-level rules and caps."""

    def __init__(self, fileobj: io.BufferedReader, limits: ReadLimits) -> None:
        self.limits = limits
        try:
            magic = fileobj.peek(8)[:8]  # peek: the bytes stay in the stream (and in the file's hash)
        except OSError as e:
            raise UnsafeArchiveError(f"cannot read the bundle: {e}") from e
        for prefix, kind in _OTHER_MAGIC:
            if magic.startswith(prefix):
                raise UnsafeArchiveError(f"{kind}-compressed bundles are not supported (plain tar or gzip only)")
        strict = _strict_tarinfo(limits)
        try:
            if magic.startswith(_GZIP_MAGIC):
                self._tar = tarfile.open(fileobj=fileobj, mode="r|gz", tarinfo=strict)
            else:
                self._tar = tarfile.open(fileobj=fileobj, mode="r|", tarinfo=strict)
        # TypeError: a gzip header cut short (tarfile's stream calls ord() on an empty read)
        except (tarfile.TarError, OSError, EOFError, ValueError, RecursionError, TypeError) as e:
            raise UnsafeArchiveError(f"not a bundle archive (tar): {e}") from e
        self._iter = iter(self._tar)
        self.count = 0

    def next(self) -> tarfile.TarInfo | None:
        try:
            info = next(self._iter, None)
        except (tarfile.TarError, OSError, EOFError, ValueError, RecursionError) as e:
            raise UnsafeArchiveError(f"corrupt or truncated archive: {e}") from e
        if info is None:
            return None
        self.count += 1
        if self.count > self.limits.max_members:
            raise UnsafeArchiveError(f"archive has more than {self.limits.max_members} members")
        if info.size < 0:  # base-256 and pax sizes can be negative; tarfile does not refuse them
            raise UnsafeArchiveError(f"member {info.name!r} has a negative size")
        kind = _member_kind(info)
        if kind:
            raise UnsafeArchiveError(f"member {info.name!r} is a {kind}; bundles hold plain files only")
        why = check_member_path(info.name) if info.name not in (MANIFEST_NAME, SIGNATURES_NAME) else None
        if why:
            raise UnsafeArchiveError(f"member {info.name!r}: {why}")
        return info

    def read_small(self, info: tarfile.TarInfo, cap: int) -> bytes:
        if info.size > cap:
            raise UnsafeArchiveError(f"{info.name} is {info.size} bytes, over the {cap}-byte cap")
        return b"".join(self.stream(info))

    def stream(self, info: tarfile.TarInfo):  # type: ignore[no-untyped-def]
        f = self._tar.extractfile(info)
        if f is None:  # not reachable for regular files
            raise UnsafeArchiveError(f"member {info.name!r} has no data")
        remaining = info.size
        try:
            while remaining > 0:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    raise UnsafeArchiveError(f"archive ends inside member {info.name!r} (truncated)")
                remaining -= len(chunk)
                yield chunk
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            raise UnsafeArchiveError(f"corrupt or truncated archive in {info.name!r}: {e}") from e

    def close(self) -> None:
        self._tar.close()


def _open_header(path: Path, limits: ReadLimits) -> tuple[_HashingFile, _ArchiveReader, bytes, bytes]:
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise BundleError(f"bundle {path} is not a regular file")
        f = _HashingFile(open(path, "rb"))
    except OSError as e:
        raise BundleError(f"cannot open bundle {path}: {e.strerror or e}") from e
    try:
        if st.st_size > limits.max_bundle_bytes:
            raise UnsafeArchiveError(f"bundle is {st.st_size} bytes, over the {limits.max_bundle_bytes}-byte cap")
        reader = _ArchiveReader(io.BufferedReader(f, _CHUNK), limits)
        first = reader.next()
        if first is None or first.name != MANIFEST_NAME:
            raise UnsafeArchiveError(f"first member must be {MANIFEST_NAME}")
        manifest_bytes = reader.read_small(first, limits.max_manifest_bytes)
        second = reader.next()
        if second is None or second.name != SIGNATURES_NAME:
            raise UnsafeArchiveError(f"second member must be {SIGNATURES_NAME}")
        signatures_bytes = reader.read_small(second, limits.max_signatures_bytes)
    except BaseException:
        f.close()
        raise
    return f, reader, manifest_bytes, signatures_bytes


def inspect_bundle(
    path: str | os.PathLike[str], limits: ReadLimits = ReadLimits()
) -> tuple[Manifest, list[dict[str, str]]]:
    """Read a bundle's manifest and signature entries WITHOUT verifying anything.

    For display only (``edgeship bundle inspect``); never act on what this returns.
    """
    f, reader, manifest_bytes, signatures_bytes = _open_header(Path(path), limits)
    try:
        manifest = Manifest.from_bytes(manifest_bytes)
        sigs = strict_json_loads(signatures_bytes, "signatures.json")
        return manifest, sigs if isinstance(sigs, list) else []
    finally:
        reader.close()
        f.close()


def check_freshness(
    manifest: Manifest,
    *,
    installed_version: int | None,
    allow_downgrade: bool,
    now: datetime | None,
) -> None:
    """Refuse expired bundles and silent downgrades; pure.

    Raises:
        ExpiredError: ``expires`` is at or before ``now``.
        RollbackError: version lower than ``installed_version`` and no downgrade allowed.
    """
    now = now or datetime.now(timezone.utc)
    expires = manifest.expires_at()
    if expires is not None and expires <= now:
        raise ExpiredError(f"bundle {manifest.name} v{manifest.version} expired at {manifest.expires}")
    if installed_version is not None and manifest.version < installed_version and not allow_downgrade:
        raise RollbackError(
            f"bundle {manifest.name} v{manifest.version} is older than installed v{installed_version}; "
            "a downgrade must be allowed explicitly"
        )


def read_bundle(
    path: str | os.PathLike[str],
    trust: TrustedKeys,
    dest: str | os.PathLike[str],
    *,
    installed_version: int | Callable[[str], int | None] | None = None,
    allow_downgrade: bool = False,
    now: datetime | None = None,
    limits: ReadLimits = ReadLimits(),
) -> VerifiedBundle:
    """Verify a bundle completely and extract it to ``dest`` (which must not exist).

    Order: size cap, manifest and signatures under caps, signature threshold, manifest
    validation, expiry, version, then every member streamed into a staging folder beside
    ``dest`` with hash, size, type, path and count checks. ``dest`` appears (atomic rename)
    only when all passed. ``installed_version`` may be a function of the bundle's name (a device
    keeps one anti-rollback floor per model name), called once the manifest is verified.

    Raises:
        SignatureError, ManifestError, ExpiredError, RollbackError, IntegrityError,
        UnsafeArchiveError: see sdk.errors; nothing is left behind on failure.
    """
    bundle_path, dest_path = Path(path), Path(dest)
    if dest_path.exists():
        raise BundleError(f"destination {dest_path} exists already")
    f, reader, manifest_bytes, signatures_bytes = _open_header(bundle_path, limits)
    staging: Path | None = None
    try:
        keyids = verify_signatures(manifest_bytes, signatures_bytes, trust)
        manifest = Manifest.from_bytes(manifest_bytes)
        if manifest.model not in {e.path for e in manifest.files}:  # a draft (no files) is not a bundle
            raise ManifestError(f"model file {manifest.model!r} is not listed in files")
        floor = installed_version(manifest.name) if callable(installed_version) else installed_version
        check_freshness(manifest, installed_version=floor, allow_downgrade=allow_downgrade, now=now)

        expected = {e.path: e for e in manifest.files}
        dest_path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest_path.name}.staging-", dir=dest_path.parent))
        seen: set[str] = set()
        total = 0
        while (info := reader.next()) is not None:
            entry = expected.get(info.name)
            if entry is None:
                raise IntegrityError(f"member {info.name!r} is not listed in the manifest")
            if info.name in seen:
                raise UnsafeArchiveError(f"member {info.name!r} appears twice")
            seen.add(info.name)
            if info.size > limits.max_member_bytes:
                raise UnsafeArchiveError(f"member {info.name!r} is over the {limits.max_member_bytes}-byte cap")
            total += info.size
            if total > limits.max_total_bytes:
                raise UnsafeArchiveError(f"archive expands past the {limits.max_total_bytes}-byte cap")
            if info.size != entry.size:
                raise IntegrityError(f"member {info.name!r} is {info.size} bytes, manifest says {entry.size}")
            target = staging / info.name
            for folder in reversed(Path(info.name).parents[:-1]):  # golden/, then golden/inputs/: each 0700
                (staging / folder).mkdir(exist_ok=True, mode=PRIVATE_DIR_MODE)
            h = hashlib.sha256()
            with open_private(target, "xb") as out:
                for chunk in reader.stream(info):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != entry.sha256:
                raise IntegrityError(f"member {info.name!r} does not match its sha256 in the manifest")
        missing = sorted(set(expected) - seen)
        if missing:
            raise IntegrityError(f"members missing from the archive: {', '.join(missing)}")
        archive_sha = f.hexdigest()
        os.replace(staging, dest_path)
        staging = None
        fsync_dir(dest_path.parent)
        return VerifiedBundle(
            manifest=manifest, root=dest_path, sha256=archive_sha, keyids=tuple(keyids),
            manifest_bytes=manifest_bytes, signatures_bytes=signatures_bytes,
        )  # fmt: skip
    finally:
        reader.close()
        f.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
