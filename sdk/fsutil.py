"""Durable file writes: the one place that knows the temp file + fsync + ``os.replace`` dance.

Also where private files and folders are made: the device's state (outbox, journal, slots, downloads)
and the files a bundle is extracted to are the owner's alone (folders 0700, files 0600), whatever the
process umask, so another local user reads neither the model nor the commands (a deploy URL may hold a
token).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

__all__ = ["PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "atomic_write_bytes", "fsync_dir", "fsync_file",
           "make_private_dir", "open_private"]  # fmt: skip

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_FLAGS = {
    "xb": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "r+b": os.O_RDWR,
}


def make_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and its parents) if needed and make it the owner's alone (mode 0700).

    An existing folder is narrowed too: a state directory from an older release was created 0755. The
    parents are created with the umask's mode (they may be shared, like ``/var/lib``).

    Raises:
        OSError: it cannot be created (narrowing an existing folder is best effort).
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    if os.name == "posix" and folder.stat().st_mode & 0o777 != PRIVATE_DIR_MODE:
        try:
            os.chmod(folder, PRIVATE_DIR_MODE)
        except OSError:  # a read-only disk (or not ours): nothing new can be written into it either
            pass
    return folder


def open_private(path: str | os.PathLike[str], mode: str = "xb") -> BinaryIO:
    """Open ``path`` for writing in binary ``mode`` (``xb``, ``wb``, ``ab``, ``r+b``); a file it creates is 0600.

    Raises:
        OSError: as ``open`` would (``FileExistsError`` for ``xb`` on an existing file).
        ValueError: another mode.
    """
    if mode not in _FLAGS:
        raise ValueError(f"open_private mode must be one of {', '.join(_FLAGS)}, got {mode!r}")
    fd = os.open(path, _FLAGS[mode] | getattr(os, "O_BINARY", 0), PRIVATE_FILE_MODE)
    return os.fdopen(fd, mode)  # type: ignore[return-value]  # a binary mode (checked above)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders can't be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # Windows cannot open a folder; its renames are durable enough for us
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's data to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file, whole.

    Writes a temp file beside it, fsyncs it, ``os.replace``s it over ``path`` and fsyncs the folder. The
    file is 0600 (``mkstemp`` creates it so): what the agent writes this way is the owner's alone.

    ``durable=False`` skips both fsyncs: the new file is whole and in place for any process that reads it
    after this returns (a kill -9 does not lose the page cache), but a power cut may leave the previous
    file or, where the rename reached the disk before the data, an unreadable one. The caller makes it
    durable later with ``fsync_file`` and ``fsync_dir`` (the device agent overlaps them with other work).

    Raises:
        OSError: it cannot be written (the temp file is removed).
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)
