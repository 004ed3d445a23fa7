"""The artifact server: ``GET``/``HEAD /artifacts/<sha256>.edgebundle``, with single HTTP ranges.

Mounted at the root (not under ``/api/v1``) and open to anyone who can reach it: no token, because a
device trusts a bundle for its signatures (checked against keys installed on the device), never for where
it came from; the same is why ``artifact_base_url`` may point at any HTTP server or object store holding
the same files. The names are content hashes, so a file never changes: the ETag is its sha256 and it may
be cached for ever.

Ranges: one ``bytes=first-last``, ``bytes=first-`` or ``bytes=-suffix`` range is answered 206 with its
``Content-Range`` (the device agent resumes an interrupted download so); a range that is malformed or
starts past the end is 416 with ``Content-Range: bytes */<size>``; several ranges at once are answered
with the whole file (200), which RFC 9110 allows and every downloader handles. ``If-Range`` with another
ETag also gets the whole file. Bytes are streamed from disk in 1 MiB reads, from a file opened before the
answer starts (a missing file is a 404, not a broken stream).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import BinaryIO

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from fleet.releases.service import ReleaseSettings
from fleet.releases.store import ArtifactStore, is_sha256
from sdk.bundle import BUNDLE_SUFFIX

__all__ = ["RangeNotSatisfiable", "artifacts_router", "parse_range"]

_CHUNK = 1 << 20  # bytes per read

artifacts_router = APIRouter(tags=["artifacts"])


class RangeNotSatisfiable(Exception):
    """A ``Range`` header that is malformed or selects no byte of the file."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive ``(first, last)`` byte range a ``Range`` header asks for, or None for the whole file.

    Raises:
        RangeNotSatisfiable: malformed, not in bytes, or starting at or past ``size``.
    """
    if header is None or not header.strip():
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or not spec.strip():
        raise RangeNotSatisfiable(f"not a byte range: {header!r}")
    if "," in spec:
        return None  # several ranges: the whole file instead
    first_text, dash, last_text = spec.strip().partition("-")
    first_text, last_text = first_text.strip(), last_text.strip()
    if not dash or not (first_text or last_text) or not all(t.isdigit() for t in (first_text, last_text) if t):
        raise RangeNotSatisfiable(f"malformed range: {header!r}")
    if not first_text:  # the last N bytes
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"empty suffix range: {header!r}")
        return max(0, size - suffix), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if first >= size or last < first:
        raise RangeNotSatisfiable(f"range {header!r} is outside the {size}-byte file")
    return first, min(last, size - 1)


def _stream(f: BinaryIO, first: int, length: int) -> Iterator[bytes]:
    try:
        f.seek(first)
        remaining = length
        while remaining > 0:
            chunk = f.read(min(_CHUNK, remaining))
            if not chunk:
                return  # the file shrank under us: the client sees a short body and retries
            remaining -= len(chunk)
            yield chunk
    finally:
        f.close()


def _not_found(filename: str) -> Response:
    return JSONResponse({"error": "not_found", "detail": f"no artifact {filename[:80]}"}, 404)


@artifacts_router.get("/artifacts/{filename}", response_model=None)
@artifacts_router.head("/artifacts/{filename}", response_model=None, operation_id="head_artifact")
def get_artifact(filename: str, request: Request) -> Response:
    """A stored bundle, whole or one byte range (no token: devices verify signatures themselves)."""
    settings: ReleaseSettings = request.app.state.releases
    sha256 = filename.removesuffix(BUNDLE_SUFFIX)
    if not filename.endswith(BUNDLE_SUFFIX) or not is_sha256(sha256):
        return _not_found(filename)
    try:
        f = open(settings.store_dir / ArtifactStore.filename(sha256), "rb")  # closed by _stream or below
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return _not_found(filename)
    size = os.fstat(f.fileno()).st_size
    etag = f'"{sha256}"'
    headers = {"accept-ranges": "bytes", "etag": etag, "cache-control": "public, max-age=31536000, immutable"}
    if_range = request.headers.get("if-range")
    try:
        wanted = parse_range(request.headers.get("range"), size) if if_range in (None, etag) else None
    except RangeNotSatisfiable:
        f.close()
        return Response(status_code=416, headers={**headers, "content-range": f"bytes */{size}"})
    first, last = wanted if wanted is not None else (0, size - 1)
    length = last - first + 1 if size else 0
    status = 206 if wanted is not None else 200
    headers["content-length"] = str(length)
    if wanted is not None:
        headers["content-range"] = f"bytes {first}-{last}/{size}"
    if request.method == "HEAD":
        f.close()
        return Response(status_code=status, headers=headers, media_type="application/octet-stream")
    return StreamingResponse(_stream(f, first, length), status, headers, media_type="application/octet-stream")
