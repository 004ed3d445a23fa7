"""Bundle download with a size cap, a deadline, Range resume and a sha256 check.

``Downloader.download_file`` holds all the policy (limits, free space, retries, resume, verification, the
atomic rename) and calls one protected method, ``_fetch``, for the bytes; ``HttpDownloader`` implements
``_fetch`` on urllib for ``http`` and ``https``. Tests and other transports subclass ``Downloader``.

What a URL may reach (``HttpDownloader``): ``http``/``https`` only, on every hop; a redirect must keep the
scheme (no ``https`` -> ``http``, no ``ftp``); every connection, redirects included, goes only to an
address its ``HostPolicy`` allows, checked on the resolved addresses before connecting (the check and the
connection use the same address, so a name that resolves differently the second time gains nothing).

Bytes go to ``<dest>.part``; a part file left behind by a killed process is resumed by the next call.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import http.client
import ipaddress
import logging
import os
import random
import re
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from device_runtime.agent._backoff import Backoff
from sdk.errors import IntegrityError, StateError, TransportError
from sdk.fsutil import fsync_dir, fsync_file, open_private
from sdk.redact import redact_url

__all__ = ["Downloader", "FetchResponse", "HostPolicy", "HttpDownloader"]

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", re.IGNORECASE)


@dataclass
class FetchResponse:
    """What ``_fetch`` returns: the HTTP-like status, headers (lower-case names) and an open body.

    ``body.read1(n)`` (or ``read(n)``) must return at most ``n`` bytes, ``b""`` at the end.
    """

    status: int
    headers: Mapping[str, str]
    body: BinaryIO

    def close(self) -> None:
        self.body.close()


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class HostPolicy:
    """Which hosts a download may connect to (each hop of it).

    A host passes when it is named in ``allow`` (a host name or IP literal, compared with the URL's host,
    case-insensitive), or when every address it resolves to lies in an ``allow`` network (an IP address
    or CIDR block), or, with ``public``, when every address it resolves to is public
    (``ipaddress.is_global``: not loopback, link-local, private, multicast, reserved or unspecified).

    Attributes:
        allow: host names, IP addresses or CIDR networks allowed whatever they resolve to.
        public: also allow hosts whose every address is public.
    """

    allow: tuple[str, ...] = ()
    public: bool = True

    def __post_init__(self) -> None:
        for entry in self.allow:
            if not entry or (any(c in entry for c in "/ ") and _network(entry) is None):
                raise ValueError(f"allowed host {entry!r} is neither a host name, an IP address nor a network")

    def refusal(self, host: str, addresses: Sequence[str]) -> str | None:
        """Why ``host`` (resolved to ``addresses``) is refused, or None when it is allowed."""
        name = host.strip("[]").lower()
        if any(name == entry.lower() for entry in self.allow):
            return None
        networks = [n for n in map(_network, self.allow) if n is not None]
        ips = [ipaddress.ip_address(a.split("%", 1)[0]) for a in addresses]
        if ips and all(any(ip in n for n in networks) for ip in ips):
            return None
        if self.public and ips and all(ip.is_global for ip in ips):
            return None
        what = "public hosts and " if self.public else ""
        return f"host {name!r} is not allowed for downloads (allowed: {what}{', '.join(self.allow) or 'no others'})"


def _network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        return None


class _HostRefused(OSError):
    """Raised inside urllib's connection: the policy refuses the host (nothing was connected)."""


def _vetted_connection(
    policy: HostPolicy,
    address: tuple[str, int],
    timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]  # urllib's own default
    source_address: tuple[str, int] | None = None,
    **_ignored: Any,
) -> socket.socket:
    """``socket.create_connection`` that resolves first, checks every address, then connects to them."""
    host, port = address[0], address[1]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise OSError(f"cannot resolve {host!r}: {e}") from e
    addresses = [str(info[4][0]) for info in infos]
    why = policy.refusal(host, addresses)
    if why is not None:
        raise _HostRefused(why)
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                sock.settimeout(timeout)
            if source_address is not None:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error or OSError(f"cannot connect to {host!r}")


class _Retry(Exception):
    """This attempt failed in a way another attempt may fix (dropped connection, 5xx, short body)."""

    def __init__(self, message: str, progressed: bool = False) -> None:
        super().__init__(message)
        self.progressed = progressed  # bytes were received before the failure


class _RestartFromZero(_Retry):
    """The server's answer cannot be appended to the part file: delete it and ask for everything."""


class _Refused(TransportError):
    """Not worth another try; the part file is useless (4xx, too large)."""


class Downloader(abc.ABC):
    """Downloads one URL to a file, enforcing limits; subclasses provide ``_fetch``.

    Args:
        attempts: tries in a row without progress before giving up (an attempt that received bytes
            resets the count; the deadline still bounds the whole download).
        backoff_base_s: ceiling of the first retry delay, in seconds.
        backoff_cap_s: largest retry delay ceiling, in seconds.
        read_timeout_s: the longest silence tolerated on the connection, in seconds.
        chunk_size: bytes read at a time.
        clock: monotonic seconds (the deadline).
        sleep: sleeps a number of seconds (retry delays).
        rng: randomness for the retry jitter.
        response_hook: called with each response before its body is read, returns the response to
            read (the crash test hook wraps the body; None: the response as fetched).
        free_space: free bytes on the file system of a folder (``shutil.disk_usage``; tests pass a fake).
        reserve_bytes: free space that must remain after the download (the slot the bundle is
            extracted into, the journal, the outbox).
    """

    def __init__(
        self,
        *,
        attempts: int = 5,
        backoff_base_s: float = 0.5,  # seconds
        backoff_cap_s: float = 30.0,  # seconds
        read_timeout_s: float = 30.0,  # seconds
        chunk_size: int = 64 * 1024,  # bytes
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        response_hook: Callable[[FetchResponse], FetchResponse] | None = None,
        free_space: Callable[[Path], int] = _free_bytes,
        reserve_bytes: int = 64 * 2**20,  # bytes
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.attempts = attempts
        self.read_timeout_s = read_timeout_s
        self.chunk_size = chunk_size
        self._backoff_args = (backoff_base_s, backoff_cap_s)
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._response_hook = response_hook
        self._free_space = free_space
        self.reserve_bytes = reserve_bytes

    @abc.abstractmethod
    def _fetch(self, url: str, offset: int, timeout_s: float) -> FetchResponse:
        """Start fetching ``url`` from byte ``offset`` (``Range: bytes=offset-`` when > 0).

        HTTP error statuses are returned as responses, not raised.

        Raises:
            TransportError: the request could not be made or answered (retried by the caller).
        """

    def _check_url(self, url: str) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Refuse a URL this downloader cannot fetch.

        Raises:
            TransportError: the URL is unsupported.
        """

    def _open_part(self, path: Path, mode: str) -> BinaryIO:
        """Open the part file (a seam: tests make writes fail as on a full disk)."""
        return open_private(path, mode)  # 0600: a bundle being downloaded is no one else's

    def _check_space(self, folder: Path, needed: int) -> None:
        """Refuse a download that would leave less than ``reserve_bytes`` free.

        Raises:
            StateError: not enough space (or it cannot be measured).
        """
        try:
            free = self._free_space(folder)
        except OSError as e:
            raise StateError(f"cannot measure the free space in {folder}: {e.strerror or e}") from e
        if free < needed + self.reserve_bytes:
            raise StateError(
                f"not enough free space in {folder}: the download needs {needed} bytes plus "
                f"{self.reserve_bytes} in reserve, {free} free"
            )

    def download_file(
        self,
        url: str,
        dest: str | os.PathLike[str],
        *,
        max_length: int,
        expected_size: int | None = None,
        expected_sha256: str | None = None,
        deadline_s: float = 600.0,
    ) -> Path:
        """Download ``url`` to ``dest`` atomically, resuming ``dest.part`` if present.

        Args:
            url: what to download.
            dest: the final file; written only once every check has passed (``os.replace``).
            max_length: the most bytes accepted, whatever the server says.
            expected_size: the exact size, when known (it also caps the download).
            expected_sha256: hex sha256 the bytes must have, when known.
            deadline_s: the whole download, retries included, must finish within this many seconds.

        Returns:
            ``dest`` as a ``Path``.

        Raises:
            TransportError: a 4xx answer (not retried), a refused URL, host or redirect, a body larger
                than ``max_length`` or ``expected_size`` (the part file is deleted), the deadline passed,
                or all attempts failed.
            IntegrityError: the bytes do not match ``expected_sha256`` or ``expected_size`` (the part
                file is deleted).
            StateError: not enough free space for the announced size, or the part file could not be
                written (full disk, read-only folder; the part file is deleted).
        """
        self._check_url(url)
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        try:
            return self._download(url, dest, part, max_length, expected_size, expected_sha256, deadline_s)
        except OSError as e:  # the local file system, not the network (those are caught where read)
            _unlink(part)
            raise StateError(f"cannot write {part}: {e.strerror or e}") from e

    def _download(
        self,
        url: str,
        dest: Path,
        part: Path,
        max_length: int,
        expected_size: int | None,
        expected_sha256: str | None,
        deadline_s: float,
    ) -> Path:
        limit = max_length if expected_size is None else min(max_length, expected_size)
        if expected_size is not None:
            self._check_space(dest.parent, expected_size - (part.stat().st_size if part.exists() else 0))
        deadline = self._clock() + deadline_s
        backoff = Backoff(*self._backoff_args, rng=self._rng)
        failures = 0
        # Bytes inherited from an earlier call may belong to something else: if the hash fails on
        # a resumed file, start once from zero before blaming the server.
        inherited = part.exists() and part.stat().st_size > 0
        while True:
            if self._clock() >= deadline:
                raise TransportError(f"download of {redact_url(url)} passed its {deadline_s:.0f} s deadline")
            try:
                self._attempt(url, part, limit, deadline, deadline_s)
                if expected_size is not None and part.stat().st_size < expected_size:
                    # A close-delimited body (no Content-Length) that ended early: resume it.
                    raise _Retry(f"body ended after {part.stat().st_size} of {expected_size} bytes", True)
            except _Retry as e:
                if isinstance(e, _RestartFromZero):
                    _unlink(part)
                failures = 0 if e.progressed else failures + 1
                if failures >= self.attempts:
                    raise TransportError(f"download of {redact_url(url)} failed after {failures} attempts: {e}") from e
                delay = min(backoff.next_delay(), max(0.0, deadline - self._clock()))
                log.info("download of %s: %s; retrying in %.2f s", redact_url(url), e, delay)
                self._sleep(delay)
                continue
            except (_Refused, StateError) as e:
                _unlink(part)
                if isinstance(e, StateError):
                    raise
                raise TransportError(str(e)) from e
            # A deadline TransportError keeps the part file: a later call resumes it.
            size = part.stat().st_size
            if expected_size is not None and size != expected_size:
                _unlink(part)
                raise IntegrityError(f"{redact_url(url)}: got {size} bytes, expected {expected_size}")
            if expected_sha256 is not None:
                digest = _sha256(part)
                if digest != expected_sha256.lower():
                    _unlink(part)
                    if inherited:
                        log.warning(
                            "resumed part file of %s had the wrong hash; downloading from zero", redact_url(url)
                        )
                        inherited = False
                        continue
                    raise IntegrityError(
                        f"{redact_url(url)}: sha256 {digest} does not match the expected {expected_sha256}"
                    )
            fsync_file(part)
            os.replace(part, dest)
            fsync_dir(dest.parent)
            return dest

    def _attempt(self, url: str, part: Path, limit: int, deadline: float, deadline_s: float) -> None:
        """One request: append to ``part`` until the body ends.

        Raises:
            _Retry: worth another try (``_RestartFromZero``: after deleting the part file).
            _Refused: not worth another try, and the part file must go (4xx, too large).
            TransportError: the deadline passed.
        """
        offset = part.stat().st_size if part.exists() else 0
        if offset > limit:  # a stale part from something bigger
            _unlink(part)
            offset = 0
        timeout = max(0.001, min(self.read_timeout_s, deadline - self._clock()))
        try:
            response = self._fetch(url, offset, timeout)
        except _Refused:
            raise
        except TransportError as e:
            raise _Retry(str(e)) from e
        if self._response_hook is not None:
            response = self._response_hook(response)
        try:
            start = self._check_response(url, response, offset, limit)
            if start == 0 and offset > 0:
                log.info("%s: the server sent the whole file instead of a range; restarting from zero", redact_url(url))
            length = _int_header(response.headers, "content-length")
            if length is not None:
                self._check_space(part.parent, length)
            self._stream(url, response, part, start, limit, deadline, deadline_s)
        finally:
            response.close()

    def _check_response(self, url: str, response: FetchResponse, offset: int, limit: int) -> int:
        """Return the offset the body starts at (0 or ``offset``)."""
        status = response.status
        if status == 416 and offset > 0:  # our range starts at or past the end: the part is stale
            raise _RestartFromZero(f"{redact_url(url)}: HTTP 416 for a resume at byte {offset}")
        if 400 <= status < 500:
            raise _Refused(f"{redact_url(url)}: HTTP {status}")
        if status >= 500:
            raise _Retry(f"HTTP {status}")
        if status not in (200, 206):
            raise _Refused(f"{redact_url(url)}: unexpected HTTP {status}")
        length = _int_header(response.headers, "content-length")
        if status == 200:
            start = 0  # a server that ignores Range sends everything: never append it to the part
        else:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
            if match is None or int(match.group(1)) != offset:
                raise _RestartFromZero(
                    f"{redact_url(url)}: asked for bytes {offset}-,"
                    f" got Content-Range {response.headers.get('content-range')!r}"
                )
            start = offset
            if match.group(3) != "*" and int(match.group(3)) > limit:
                raise _Refused(f"{redact_url(url)}: the file is {match.group(3)} bytes, more than the {limit} allowed")
        if length is not None and start + length > limit:
            raise _Refused(
                f"{redact_url(url)}: the server announces {start + length} bytes, more than the {limit} allowed"
            )
        return start

    def _stream(
        self,
        url: str,
        response: FetchResponse,
        part: Path,
        start: int,
        limit: int,
        deadline: float,
        deadline_s: float,
    ) -> None:
        """Write the body to ``part`` from byte ``start``."""
        announced = _int_header(response.headers, "content-length")
        received = 0
        read = getattr(response.body, "read1", response.body.read)
        with self._open_part(part, "r+b" if start > 0 else "wb") as out:
            out.seek(start)
            out.truncate()
            while True:
                if self._clock() >= deadline:
                    raise TransportError(f"download of {redact_url(url)} passed its {deadline_s:.0f} s deadline")
                try:
                    chunk = read(self.chunk_size)
                except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                    raise _Retry(f"connection lost after {start + received} bytes: {e}", received > 0) from e
                if not chunk:
                    break
                received += len(chunk)
                if start + received > limit:
                    raise _Refused(f"{redact_url(url)}: the body passed the {limit}-byte limit")
                out.write(chunk)
            out.flush()
        if announced is not None and received < announced:
            raise _Retry(f"body ended after {received} of {announced} bytes", received > 0)


class HttpDownloader(Downloader):
    """``Downloader`` over ``http`` and ``https`` with urllib.

    Args:
        ca_file: CA bundle to verify HTTPS servers with (the system store when ``None``).
        hosts: the hosts every connection may go to (default: public addresses only).
        **kwargs: passed to ``Downloader``.
    """

    def __init__(
        self, *, ca_file: str | os.PathLike[str] | None = None, hosts: HostPolicy = HostPolicy(), **kwargs: object
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.hosts = hosts
        self._context = _ssl_context(os.fspath(ca_file) if ca_file else None)
        # No proxies from the environment: a device talks to its fleet's artifact server directly. Only
        # http/https handlers with the host check; redirects keep their scheme (_SameSchemeRedirect).
        opener = urllib.request.OpenerDirector()
        for handler in (
            urllib.request.ProxyHandler({}),
            _VettedHttpHandler(hosts),
            _VettedHttpsHandler(hosts, self._context),
            _SameSchemeRedirect(),
            urllib.request.HTTPDefaultErrorHandler(),
            urllib.request.HTTPErrorProcessor(),
            urllib.request.UnknownHandler(),
        ):
            opener.add_handler(handler)
        self._opener = opener

    def _check_url(self, url: str) -> None:
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise TransportError(f"unsupported URL scheme {scheme!r} in {redact_url(url)!r}; use http or https")

    def _fetch(self, url: str, offset: int, timeout_s: float) -> FetchResponse:
        request = urllib.request.Request(url, headers={"Accept-Encoding": "identity"})
        if offset > 0:
            request.add_header("Range", f"bytes={offset}-")
        try:
            response = self._opener.open(request, timeout=timeout_s)
        except urllib.error.HTTPError as e:  # an answer, just not a 2xx one
            return FetchResponse(e.code, _lower(e.headers), e)  # type: ignore[arg-type]
        except urllib.error.URLError as e:
            if isinstance(e.reason, _HostRefused):  # nothing was connected: not worth another try
                raise _Refused(f"cannot fetch {redact_url(url)}: {e.reason}") from e
            raise TransportError(f"cannot fetch {redact_url(url)}: {e.reason}") from e
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timeout, TLS
            raise TransportError(f"cannot fetch {redact_url(url)}: {e}") from e
        return FetchResponse(response.status, _lower(response.headers), response)


@functools.lru_cache(maxsize=4)
def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """Shared by the downloaders of one CA file: loading the CA store takes tens of milliseconds."""
    return ssl.create_default_context(cafile=ca_file)


class _VettedHttpHandler(urllib.request.HTTPHandler):
    def __init__(self, hosts: HostPolicy) -> None:
        super().__init__()
        self._hosts = hosts

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_VettedHTTPConnection, policy=self._hosts), req)  # type: ignore[arg-type]


class _VettedHttpsHandler(urllib.request.HTTPSHandler):
    def __init__(self, hosts: HostPolicy, context: ssl.SSLContext) -> None:
        super().__init__(context=context)
        self._hosts = hosts
        self._ssl_context = context

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connection = functools.partial(_VettedHTTPSConnection, policy=self._hosts)
        return self.do_open(connection, req, context=self._ssl_context)  # type: ignore[arg-type]


class _VettedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, policy: HostPolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_vetted_connection, policy)  # type: ignore[method-assign]


class _VettedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, policy: HostPolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_vetted_connection, policy)  # type: ignore[method-assign]


class _SameSchemeRedirect(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to the scheme it came from (urllib's default also follows ``ftp``)."""

    max_redirections = 5

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        old = urllib.parse.urlsplit(req.full_url).scheme.lower()
        new = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl)).scheme.lower()
        if new != old or new not in ("http", "https"):
            fp.close()
            raise _Refused(f"{redact_url(req.full_url)}: refused a redirect from {old} to {new or 'no scheme'}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _lower(headers: object) -> dict[str, str]:
    items = headers.items() if hasattr(headers, "items") else []
    return {str(k).lower(): str(v) for k, v in items}


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number >= 0 else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
