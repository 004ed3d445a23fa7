"""Durable file writes: the one place that knows the temp file + fsync + ``os.replace`` dance."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "fsync_dir", "fsync_file"]


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

    Writes a temp file beside it, fsyncs it, ``os.replace``s it over ``path`` and fsyncs the folder.

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
