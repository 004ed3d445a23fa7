"""The artifact folder: verified bundles stored by content, ``<root>/<sha256>.edgebundle``.

Content addressing makes storing idempotent (the same bytes land on the same name, so a re-upload or two
concurrent uploads of one bundle replace a file with identical bytes) and lets the artifact server answer
without the database. Uploads arrive in ``<root>/.incoming`` (same file system, so the final move is one
``os.replace``), are verified there and only then renamed into place, fsynced first: a crash leaves either
no file or the whole file, never a partial bundle under a sha256 name. Leftovers of a crash in
``.incoming`` are removed by ``clean_incoming`` at start.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterable, Iterable
from pathlib import Path

from sdk.bundle import BUNDLE_SUFFIX
from sdk.fsutil import fsync_dir, fsync_file

__all__ = ["ArtifactStore", "TooLarge", "is_sha256"]

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def is_sha256(text: str) -> bool:
    """64 lowercase hex digits: the only names the store knows (no path can be smuggled in)."""
    return _SHA256_RE.fullmatch(text) is not None


class TooLarge(Exception):
    """An upload passed the size cap (the partial file is already removed)."""


class ArtifactStore:
    """Bundles on disk by sha256 (the folder is created when missing)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.incoming = self.root / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def filename(sha256: str) -> str:
        return f"{sha256}{BUNDLE_SUFFIX}"

    def path(self, sha256: str) -> Path:
        """Where the bundle ``sha256`` is (or would be) stored.

        Raises:
            ValueError: ``sha256`` is not 64 lowercase hex digits.
        """
        if not is_sha256(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.root / self.filename(sha256)

    def has(self, sha256: str) -> bool:
        return is_sha256(sha256) and self.path(sha256).is_file()

    def new_temp(self) -> Path:
        """A fresh, empty file in ``.incoming`` for an upload (the caller removes it, or ``put`` moves it)."""
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=self.incoming)
        os.close(fd)
        return Path(name)

    def temp_dir(self) -> Path:
        """A fresh folder in ``.incoming`` (verification extracts a bundle there)."""
        return Path(tempfile.mkdtemp(prefix="verify-", dir=self.incoming))

    def receive(self, chunks: Iterable[bytes], max_bytes: int) -> Path:
        """Write ``chunks`` to a new temp file, refusing more than ``max_bytes``.

        Raises:
            TooLarge: over the cap (nothing is left behind).
        """
        temp = self.new_temp()
        try:
            written = 0
            with open(temp, "wb") as out:
                for chunk in chunks:
                    written += len(chunk)
                    if written > max_bytes:
                        raise TooLarge(f"the upload is over the {max_bytes}-byte limit")
                    out.write(chunk)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp

    async def receive_async(self, chunks: AsyncIterable[bytes], max_bytes: int) -> Path:
        """``receive`` for an ASGI request body (the writes are small and buffered by the OS)."""
        temp = self.new_temp()
        try:
            written = 0
            with open(temp, "wb") as out:
                async for chunk in chunks:
                    written += len(chunk)
                    if written > max_bytes:
                        raise TooLarge(f"the upload is over the {max_bytes}-byte limit")
                    out.write(chunk)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp

    def put(self, temp: Path, sha256: str) -> Path:
        """Move a verified temp file to its sha256 name, durably (fsync, rename, fsync the folder)."""
        final = self.path(sha256)
        fsync_file(temp)
        os.replace(temp, final)
        fsync_dir(self.root)
        return final

    def put_copy(self, source: Path, sha256: str) -> Path:
        """Copy a verified file from outside the store to its sha256 name, atomically."""
        temp = self.new_temp()
        try:
            shutil.copyfile(source, temp)
            return self.put(temp, sha256)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def clean_incoming(self) -> None:
        """Remove what a crashed upload left in ``.incoming`` (call at start, before serving)."""
        for entry in self.incoming.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
