"""A small local HTTP API over a loaded model, for apps written in other languages.

Standard library only (``http.server``): nothing else to install on the device. It binds to loopback
unless told otherwise.

Routes (the full reference, with curl examples: ``docs/serving.md``):

- ``POST /v1/predict``: tensors in (JSON ``{"inputs": {name: nested list}}``, one ``.npy`` array or an
  ``.npz`` archive; a body without a Content-Type is told apart by its magic bytes), the answer of
  ``device_runtime.results`` out (JSON, or ``.npz`` / ``.npy`` as ``Accept`` asks).
- ``POST /v1/text``: ``{"text": "..." | [...], "top_k": K}`` (or a ``text/plain`` body) for bundles that
  carry a tokenizer: labels, entities or embeddings, as the bundle's task gives them.
- ``POST /v1/image``: an image file's bytes (``?top_k=K``) for image-classification bundles: labels.
- ``GET /v1/model``: the manifest summary and the backend in use.
- ``GET /healthz``: the bundle's golden health check, cached for ``health_ttl_s``; 200 when it
  passes, 503 when it fails or no model is loaded.
- ``GET /metrics``: Prometheus text format 0.0.4: the model's metrics and the HTTP status counts.

Every error is JSON ``{"error": {"type", "message"}}``: 400 for a malformed body or inputs that do
not fit the model, 401 no or wrong token, 403 a Host or Origin not allowed, 404 unknown route, 405 wrong
method, 408 a request not received within ``read_timeout_s``, 411 no ``Content-Length``, 413 body over
the cap, 415 unknown content type, 503 no model or every worker busy; 500 only for a runtime failure or a
bug. Request errors are counted in the model's ``metrics`` by kind, every response in the HTTP status
counts.

Hostile and careless clients: ``max_connections`` worker threads serve the connections (the others wait
in a bounded queue; an idle keep-alive connection gives its worker up when one waits), a request must
arrive whole within ``read_timeout_s`` (a client sending a byte at a time is dropped), JSON bodies are
capped at ``max_json_bytes`` (parsing costs many times the body in memory), the listen backlog is
``LISTEN_BACKLOG``. Browsers are kept out: the Host header must be an IP address, ``localhost`` or a name
in ``allow_hosts`` (DNS rebinding), a request whose ``Origin`` is not the server's own is refused before
its body is read (cross-origin POSTs, even CORS-"simple" ones), and JSON is only ``application/json``.
With ``token`` every request needs ``Authorization: Bearer TOKEN``; binding beyond loopback without one
is refused unless ``insecure_no_auth``.

The server asks ``model_provider`` for the model on each request, so the OTA agent can swap models
under it: a request that started on the old model finishes on it (``Model.close`` waits for it), and
one that finds the old model already closed is retried once on the new one.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import logging
import lzma
import queue
import selectors
import socket
import threading
import time
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit

import numpy as np

from device_runtime.errors import HealthCheckError, ModelClosedError
from device_runtime.model import Model
from device_runtime.results import image_answer, tensor_answer, text_answer
from sdk.errors import BackendError, EdgeshipError, InputError, TransportError

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_JSON_BYTES",
    "LISTEN_BACKLOG",
    "ModelServer",
    "check_exposure",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 2**20  # bytes; also the cap on the arrays an .npz body expands to
# bytes of a JSON body: json.loads costs up to ~14x the body in Python objects (a 16 MiB body of
# small floats took ~220 MiB), so tensors bigger than this go as .npy / .npz
DEFAULT_MAX_JSON_BYTES = 4 * 2**20
DEFAULT_MAX_CONNECTIONS = 32  # connections served at once (worker threads)
DEFAULT_READ_TIMEOUT_S = 30.0  # seconds a request (line, headers, body) may take to arrive, from its first byte
DEFAULT_HEADER_TIMEOUT_S = 10.0  # seconds a connection may take to send its request head, from accept
DEFAULT_HEALTH_TTL_S = 5.0  # seconds a health check result is served from cache
LISTEN_BACKLOG = 1024  # connections the kernel queues before accept (the kernel caps it at net.core.somaxconn)
_IDLE_TIMEOUT_S = 30.0  # seconds a keep-alive connection may sit idle between requests
_PENDING_PER_WORKER = 4  # accepted connections waiting for a worker, per worker, before 503
_MAX_HEADS = 1024  # connections held while their request head arrives; over it the oldest is dropped
_MAX_HEAD_BYTES = 65537  # a head not whole by then goes to a worker as is (http.server answers 414 / 431)
_POLL_S = 0.1  # seconds between the accept loop's checks for stop(): how long stop() takes at most
_JSON = "application/json"
_NPY = "application/x-npy"
_NPZ = "application/x-npz"
_NPY_MAGIC, _ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"
# What clients send when they name no type: curl --data-binary's default, and the generic one.
_UNTYPED = ("", "application/x-www-form-urlencoded", "application/octet-stream")
_JSON_TYPES = (_JSON, "text/json")
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})
_ROUTES: dict[str, tuple[str, ...]] = {
    "/v1/predict": ("POST",),
    "/v1/text": ("POST",),
    "/v1/image": ("POST",),
    "/v1/model": ("GET",),
    "/healthz": ("GET",),
    "/metrics": ("GET",),
}


class _HTTPError(Exception):
    """A request refused with ``status``; ``kind`` is the error kind counted in metrics."""

    def __init__(self, status: int, kind: str, message: str, type_: str = "BadRequest") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.type = type_


ModelProvider = Callable[[], Model]


class _Headers(Protocol):
    def get(self, name: str) -> str | None: ...


_R = TypeVar("_R")


class ModelServer:
    """The HTTP API over one model, or over whatever model ``model_provider`` returns right now.

    Args:
        model_provider: a ``Model``, or a callable returning the model to use for each request (the
            OTA agent's current model); it may raise or return None while no model is loaded (503).
        host: address to bind (loopback by default; ``0.0.0.0`` exposes the model to the network).
        port: TCP port; 0 picks a free one (read ``.port`` after ``start``).
        max_body_bytes: request bodies larger than this are refused with 413.
        health_ttl_s: how long a ``/healthz`` result is reused before the check runs again.
        max_json_bytes: JSON bodies larger than this are refused with 413 (at most ``max_body_bytes``).
        max_connections: connections served at once (worker threads); more wait, a few per worker, then 503.
        read_timeout_s: a request must arrive whole (line, headers, body) within this, from its first byte.
        header_timeout_s: a connection must send its request head (line, headers) within this, from accept
            (or from its first byte, between keep-alive requests); only then does it get a worker.
        token: when set, every request needs ``Authorization: Bearer <token>`` (401 otherwise).
        allow_hosts: host names accepted in the Host header besides IP addresses and ``localhost``
            (``"*"``: any).
        insecure_no_auth: allow binding beyond loopback without a token.

    Use ``start()`` / ``stop()`` (or a ``with`` block) to serve from a background thread.

    Raises:
        ValueError: a bad limit, an empty token, or a non-loopback ``host`` without a token or
            ``insecure_no_auth``.
    """

    def __init__(
        self,
        model_provider: ModelProvider | Model,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        health_ttl_s: float = DEFAULT_HEALTH_TTL_S,
        max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
        token: str | None = None,
        allow_hosts: Sequence[str] = (),
        insecure_no_auth: bool = False,
    ) -> None:
        if isinstance(model_provider, Model):
            fixed = model_provider
            self._provider: ModelProvider = lambda: fixed
        else:
            self._provider = model_provider
        for name, value in (
            ("max_body_bytes", max_body_bytes), ("max_json_bytes", max_json_bytes),
            ("max_connections", max_connections),
        ):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be an int > 0, got {value!r}")
        if not read_timeout_s > 0:
            raise ValueError(f"read_timeout_s must be > 0, got {read_timeout_s!r}")
        if not header_timeout_s > 0:
            raise ValueError(f"header_timeout_s must be > 0, got {header_timeout_s!r}")
        if token is not None and not token.strip():
            raise ValueError("the token is empty")
        check_exposure(host, token, insecure_no_auth)
        self.host = host
        self._requested_port = port
        self.max_body_bytes = max_body_bytes
        self.max_json_bytes = min(max_json_bytes, max_body_bytes)
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self.header_timeout_s = header_timeout_s
        self.health_ttl_s = health_ttl_s
        self._token = None if token is None else token.strip().encode()
        self._allow_hosts = frozenset(h.lower().strip("[]") for h in (*allow_hosts, host)) | _LOCAL_NAMES
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards _status_counts
        self._status_counts: dict[int, int] = {}
        self._health_lock = threading.Lock()  # one health check at a time; guards _health
        self._health: tuple[Model, float, int, dict[str, Any]] | None = None  # model, time, status, body

    # ---- lifecycle -----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The port listened on (the requested one before ``start``)."""
        return self._httpd.server_address[1] if self._httpd is not None else self._requested_port

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve from a background thread.

        Raises:
            TransportError: the address cannot be bound (port in use, bad host).
            RuntimeError: already started.
        """
        if self._httpd is not None:
            raise RuntimeError("server already started")
        try:
            httpd = _Server(
                (self.host, self._requested_port), self.max_connections, self.header_timeout_s, self.read_timeout_s
            )
        except OSError as e:
            raise TransportError(f"cannot listen on {self.host}:{self._requested_port}: {e}") from e
        httpd.app = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": _POLL_S}, name="edgeship-serve", daemon=True
        )
        self._thread.start()
        log.info("serving on %s", self.url)

    def stop(self) -> None:
        """Stop accepting requests and close the listening socket; idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> ModelServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- pieces the handler uses ---------------------------------------------------------------
    def admit(self, headers: _Headers) -> None:
        """Refuse a request from a browser on another origin or by a rebound name, or without the token.

        Raises:
            _HTTPError: 400 no Host, 403 a Host or Origin not allowed, 401 no or a wrong token.
        """
        host_header = headers.get("Host")
        if not host_header:
            raise _HTTPError(400, "bad_request", "a request needs a Host header")
        host = _host_name(host_header)
        if host is None or not (_is_ip(host) or host in self._allow_hosts or "*" in self._allow_hosts):
            raise _HTTPError(
                403, "forbidden_host", f"Host {host_header!r} is not an address of this server, localhost or "
                "a name allowed by --allow-host", "Forbidden",
            )  # fmt: skip
        origin = headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host_header.lower():
            raise _HTTPError(
                403, "forbidden_origin", f"requests from web pages of other origins ({origin!r}) are refused",
                "Forbidden",
            )  # fmt: skip
        if self._token is not None:
            scheme, _, given = (headers.get("Authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
                raise _HTTPError(401, "unauthorized", "this server needs Authorization: Bearer <token>", "Unauthorized")

    def model(self) -> Model:
        """The model to serve right now.

        Raises:
            _HTTPError: 503, the provider failed or has no model.
        """
        try:
            model = self._provider()
        except Exception as e:  # the provider is the caller's code: any failure means "no model now"
            log.warning("model provider failed: %s", e)
            raise _HTTPError(503, "unavailable", f"no model is loaded: {e}", "Unavailable") from e
        if model is None:
            raise _HTTPError(503, "unavailable", "no model is loaded", "Unavailable")
        return model

    def count_status(self, status: int) -> None:
        with self._lock:
            self._status_counts[status] = self._status_counts.get(status, 0) + 1

    def count_error(self, kind: str) -> None:
        """Count a request error in the current model's metrics (when there is one)."""
        try:
            model = self._provider()
        except Exception:
            return
        if model is not None:
            model.metrics.error(kind)

    def predict(
        self, inputs_of: Callable[[Model], Mapping[str, Any]], arrived: float
    ) -> tuple[Model, dict[str, np.ndarray]]:
        """Decode the inputs for the current model and run it, retrying once if it was swapped out.

        Raises:
            _HTTPError: no model; InputError, BackendError: from the model.
        """

        def run(model: Model) -> tuple[Model, dict[str, np.ndarray]]:
            return model, model.predict(inputs_of(model), queue_s=time.perf_counter() - arrived)

        return self.run(run)

    def run(self, fn: Callable[[Model], _R]) -> _R:
        """``fn(current model)``, once more on the new model if the old one was closed under it (an OTA swap).

        Raises:
            _HTTPError: no model; whatever ``fn`` raises.
        """
        model = self.model()
        try:
            return fn(model)
        except ModelClosedError:
            newer = self.model()
            if newer is model:
                raise _HTTPError(503, "closed", "the model is closed", "Unavailable") from None
            return fn(newer)

    def health(self) -> tuple[int, dict[str, Any]]:
        """``/healthz``: status and body, from the cache while it is fresh for the current model."""
        model = self.model()
        with self._health_lock:
            now = time.monotonic()
            cached = self._health
            if cached is not None and cached[0] is model and now - cached[1] < self.health_ttl_s:
                return cached[2], {**cached[3], "cached": True, "age_s": round(now - cached[1], 3)}
            summary = _model_summary(model)
            try:
                result = model.health_check()
                status, body = 200, {"status": "ok", "model": summary, "health": result}
            except HealthCheckError as e:
                status, body = 503, {"status": "failing", "model": summary, "health": e.metrics, "error": str(e)}
            except ModelClosedError as e:
                return 503, {"status": "unavailable", "error": str(e)}
            except BackendError as e:
                status, body = 503, {"status": "failing", "model": summary, "health": {}, "error": str(e)}
            self._health = (model, now, status, body)
            return status, {**body, "cached": False, "age_s": 0.0}

    def prometheus(self) -> str:
        """The current model's metrics (when there is one) and the HTTP status counts."""
        try:
            text = self.model().metrics.prometheus()
        except _HTTPError:
            text = ""
        with self._lock:
            counts = sorted(self._status_counts.items())
        lines = [
            "# HELP edgeship_http_responses_total HTTP responses of the serving endpoint, by status code.",
            "# TYPE edgeship_http_responses_total counter",
            *(f'edgeship_http_responses_total{{code="{code}"}} {n}' for code, n in counts),
        ]
        return text + "\n".join(lines) + "\n"


def check_exposure(host: str, token: str | None, insecure_no_auth: bool) -> None:
    """Refuse to serve beyond loopback without a token, unless told so.

    Raises:
        ValueError: ``host`` is not a loopback address or ``localhost``, no token, no ``insecure_no_auth``.
    """
    if token or insecure_no_auth:
        return
    name = host.lower().strip("[]")
    if name in _LOCAL_NAMES or (_is_ip(name) and ipaddress.ip_address(name).is_loopback):
        return
    raise ValueError(
        f"binding {host} exposes the model beyond this machine: give a token (--token-file or "
        "EDGESHIP_SERVE_TOKEN) or say --insecure-no-auth"
    )


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _host_name(host_header: str) -> str | None:
    """The name in a Host header (``name``, ``name:port``, ``[v6]:port``), lower case; None if malformed."""
    try:
        name = urlsplit(f"//{host_header.strip()}").hostname
    except ValueError:
        return None
    return name.rstrip(".") if name else None


class _Conn:
    """A connection in the selector: its request head so far, and when it must be complete."""

    __slots__ = ("address", "data", "deadline", "first_byte", "idle_until", "sock")

    def __init__(self, sock: socket.socket, address: Any, data: bytes, deadline: float, idle_until: float) -> None:
        self.sock = sock
        self.address = address
        self.data = bytearray(data)
        self.deadline = deadline  # the head must be in by then (once its first byte came)
        self.idle_until = idle_until  # a keep-alive connection may stay silent until then
        self.first_byte: float | None = time.monotonic() if data else None


class _Server(HTTPServer):
    """One selector thread (``serve_forever``) accepts connections and reads each one's request head
    (request line and headers); only a complete head gets a worker: ``max_connections`` worker threads take
    them from a bounded queue (503 when it is full). A slow head costs a buffer in the selector, not a
    worker. After an answer a keep-alive connection goes back to the selector for its next head."""

    request_queue_size = LISTEN_BACKLOG
    app: ModelServer

    def __init__(self, address: tuple[str, int], workers: int, header_timeout_s: float, read_timeout_s: float) -> None:
        self._pending: queue.Queue[tuple[socket.socket, Any, bytes, float] | None] = queue.Queue(
            workers * _PENDING_PER_WORKER
        )
        self._header_timeout_s = header_timeout_s
        self._read_timeout_s = read_timeout_s
        self._heads: dict[socket.socket, _Conn] = {}  # the selector thread's alone; oldest first
        self._back: queue.SimpleQueue[tuple[socket.socket, Any, bytes]] = queue.SimpleQueue()  # from workers
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._workers: list[threading.Thread] = []
        super().__init__(address, _Handler)  # binds (OSError: no worker started)
        self._workers = [
            threading.Thread(target=self._work, name=f"edgeship-serve-{i}", daemon=True) for i in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    # ---- the selector thread -------------------------------------------------------------------
    def serve_forever(self, poll_interval: float = _POLL_S) -> None:
        self._stopped.clear()
        self.socket.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(self.socket, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            try:
                while not self._stop.is_set():
                    for key, _ in sel.select(poll_interval):
                        if key.fileobj is self.socket:
                            self._accept(sel)
                        elif key.fileobj is self._wake_r:
                            self._drain_wake()
                        else:
                            self._read_head(sel, key.data)
                    self._take_back(sel)
                    self._expire(sel)
            finally:
                for conn in list(self._heads.values()):
                    self._drop(sel, conn)
                self._stopped.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake()
        self._stopped.wait()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # already awake (buffer full) or closed

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _hold(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        while len(self._heads) >= _MAX_HEADS:  # over the cap: the oldest (slowest) goes first
            self._drop(sel, next(iter(self._heads.values())))
        conn.sock.setblocking(False)
        self._heads[conn.sock] = conn
        sel.register(conn.sock, selectors.EVENT_READ, conn)
        if _head_end(conn.data) >= 0:  # a pipelined request that came with the previous one
            self._ready(sel, conn)

    def _drop(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        self._heads.pop(conn.sock, None)
        try:
            sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        self.shutdown_request(conn.sock)

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(64):  # a burst, without starving the connections already held
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                return
            except OSError:  # out of file descriptors: the oldest head makes room
                if self._heads:
                    self._drop(sel, next(iter(self._heads.values())))
                return
            now = time.monotonic()
            self._hold(sel, _Conn(sock, address, b"", now + self._header_timeout_s, now + self._header_timeout_s))

    def _read_head(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sel, conn)
            return
        if conn.first_byte is None:
            conn.first_byte = now = time.monotonic()
            conn.deadline = min(conn.deadline, now + self._header_timeout_s)
        conn.data += data
        if _head_end(conn.data) >= 0 or len(conn.data) > _MAX_HEAD_BYTES:  # too long: the worker answers 414/431
            self._ready(sel, conn)

    def _ready(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        """The head is in: the connection goes to a worker, or is refused (503) if the queue is full."""
        self._heads.pop(conn.sock, None)
        try:
            sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        first = conn.first_byte if conn.first_byte is not None else time.monotonic()
        try:
            self._pending.put_nowait((conn.sock, conn.address, bytes(conn.data), first))
        except queue.Full:
            self._refuse(conn.sock)

    def _take_back(self, sel: selectors.BaseSelector) -> None:
        while True:
            try:
                sock, address, leftover = self._back.get_nowait()
            except queue.Empty:
                return
            now = time.monotonic()
            idle_until = now + _IDLE_TIMEOUT_S
            self._hold(sel, _Conn(sock, address, leftover, now + self._header_timeout_s, idle_until))

    def _expire(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for conn in list(self._heads.values()):
            if conn.first_byte is None:
                late = now > conn.idle_until
            else:  # the head within header_timeout_s, and never more than read_timeout_s, from its first byte
                late = now > min(conn.deadline, conn.first_byte + self._read_timeout_s)
            if late:
                self._drop(sel, conn)

    def _refuse(self, request: socket.socket) -> None:
        body = json.dumps({"error": {"type": "Unavailable", "message": "every worker is busy; try again"}}).encode()
        head = f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {_JSON}\r\nContent-Length: {len(body)}\r\n"
        try:  # non-blocking: a small answer fits the socket's buffer, and the selector never waits on a client
            request.setblocking(False)
            request.send(head.encode() + b"Retry-After: 1\r\nConnection: close\r\n\r\n" + body)
        except OSError:
            pass
        self.app.count_status(503)
        self.shutdown_request(request)

    # ---- the workers ---------------------------------------------------------------------------
    def keep(self, sock: socket.socket, address: Any, leftover: bytes) -> None:
        """A worker hands a keep-alive connection back to wait for its next request in the selector."""
        self._back.put((sock, address, leftover))
        self._wake()

    def _work(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            request, client_address, head, first_byte = item
            handler: _Handler | None = None
            try:
                request.setblocking(True)
                request.settimeout(self._read_timeout_s)
                handler = _Handler(request, client_address, self, head=head, first_byte=first_byte)
            except Exception:
                self.handle_error(request, client_address)
            if handler is not None and handler.leftover is not None and not self._stop.is_set():
                self.keep(request, client_address, handler.leftover)
            else:
                self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        while True:  # connections still waiting for a worker: closed
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])
        while True:
            try:
                self.shutdown_request(self._back.get_nowait()[0])
            except queue.Empty:
                break
        for _ in self._workers:
            self._pending.put(None)
        self._wake_r.close()
        self._wake_w.close()


def _head_end(data: bytes | bytearray) -> int:
    """Where the request head ends (its blank line), or -1 while it has not come whole."""
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    return min(ends) if ends else -1


class _Reader(io.RawIOBase):
    """The handler's reads: the request head the selector read first, then the socket, under the request's
    deadline: the whole request must arrive by ``read_timeout_s`` after its first byte, however slowly it
    trickles in (each ``recv`` gets only the time left). ``end`` stops it: what is left unread (buffered)
    belongs to the connection's next request."""

    def __init__(self, sock: socket.socket, head: bytes, deadline: float, read_timeout_s: float) -> None:
        super().__init__()
        self._sock = sock
        self._head = memoryview(head)
        self._read_timeout_s = read_timeout_s
        self._deadline: float | None = deadline
        self._ended = False

    def readable(self) -> bool:
        return True

    def done(self) -> None:
        """The request is read: no deadline for writing the answer but the socket's own."""
        self._deadline = None
        self._sock.settimeout(self._read_timeout_s)  # for writing the answer to a slow reader

    def end(self) -> bytes:
        """No more reads; the head bytes not read yet."""
        self._ended = True
        rest, self._head = bytes(self._head), memoryview(b"")
        return rest

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        if self._ended:
            return 0
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the request did not arrive within {self._read_timeout_s:g} s")
            self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    """One request; the server hands a keep-alive connection back to its selector afterwards (``leftover``:
    the bytes already read of the next request; None: close the connection)."""

    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    server_version = "edgeship-device"
    sys_version = ""
    timeout = None  # the deadlines are _Reader's and the selector's
    disable_nagle_algorithm = True  # small responses go out at once
    server: _Server

    def __init__(
        self, request: Any, client_address: Any, server: _Server, *, head: bytes = b"", first_byte: float | None = None
    ) -> None:
        self._head = head  # the request head, read by the selector
        self._first_byte = time.monotonic() if first_byte is None else first_byte
        self.leftover: bytes | None = None
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        read_timeout_s = self.server.app.read_timeout_s
        self._reader = _Reader(self.connection, self._head, self._first_byte + read_timeout_s, read_timeout_s)
        self._buffered = io.BufferedReader(self._reader)
        self.rfile = self._buffered

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def finish(self) -> None:
        if not self.close_connection:
            rest = self._reader.end()
            self.leftover = self._buffered.read1(2**31) + rest if self._buffered.peek(1) else rest
        super().finish()

    # Every method goes through one dispatcher, so a known route answers 405 to the wrong one.
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's errors (malformed request line, unknown method...) as JSON too."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        self._send_json(code, {"error": {"type": HTTPStatus(code).phrase.replace(" ", ""), "message": text}})

    # ---- dispatch --------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        arrived = time.perf_counter()
        app = self.server.app
        self._body_read = False
        self._extra_headers: dict[str, str] = {}  # the handler serves every request of a keep-alive connection
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            app.admit(self.headers)
            allowed = _ROUTES.get(url.path)
            if allowed is None:
                raise _HTTPError(404, "not_found", f"no route {url.path!r}; routes: {', '.join(_ROUTES)}", "NotFound")
            if method not in allowed:
                raise _HTTPError(
                    405,
                    "method_not_allowed",
                    f"{url.path} takes {', '.join(allowed)}, not {method}",
                    "MethodNotAllowed",
                )
            if url.path == "/v1/predict":
                self._predict(app, query, arrived)
            elif url.path == "/v1/text":
                self._text(app)
            elif url.path == "/v1/image":
                self._image(app, query)
            elif url.path == "/v1/model":
                model = app.model()
                self._send_json(200, {**_model_summary(model), "backend": model.backend_info})
            elif url.path == "/healthz":
                self._send_json(*app.health())
            else:
                self._send(200, "text/plain; version=0.0.4; charset=utf-8", app.prometheus().encode())
        except _HTTPError as e:
            if e.status == 405:
                self._extra_headers = {"Allow": ", ".join(_ROUTES[url.path])}
            elif e.status == 401:
                self._extra_headers = {"WWW-Authenticate": 'Bearer realm="edgeship-device"'}
            if e.status in (400, 401, 403, 413) and self.command == "POST" and not self._body_read:
                self.close_connection = True  # its body stays unread: this connection cannot be reused
            if e.kind not in ("unavailable", "closed"):
                app.count_error(e.kind)
            self._send_error_json(e.status, e.type, str(e))
        except InputError as e:  # counted by the model
            self._send_error_json(400, "InputError", str(e))
        except ModelClosedError as e:
            self._send_error_json(503, "ModelClosedError", str(e))
        except EdgeshipError as e:  # BackendError: the runtime failed, not the client
            self._send_error_json(500, type(e).__name__, str(e))
        except Exception as e:  # a bug: answer, count and log it, keep serving
            log.exception("error serving %s %s", method, url.path)
            app.count_error("internal")
            self._send_error_json(500, "InternalError", f"{type(e).__name__}: {e}")

    def _predict(self, app: ModelServer, query: dict[str, str], arrived: float) -> None:
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        body = self._read_body(app.max_json_bytes if content_type in _JSON_TYPES else app.max_body_bytes)
        if content_type in _UNTYPED:  # no type named: tell .npy and .npz apart by their magic bytes, else JSON
            content_type = _NPY if body.startswith(_NPY_MAGIC) else _NPZ if body.startswith(_ZIP_MAGIC) else _JSON
            if content_type == _JSON:
                _check_json_size(len(body), app.max_json_bytes)
        if content_type in _JSON_TYPES:
            raw = _parse_json_inputs(body)

            def inputs_of(model: Model) -> Mapping[str, Any]:
                names = [spec.name for spec in model.manifest.inputs]
                if "text" in raw and "text" not in names and model.manifest.preprocessing.tokenizer is not None:
                    raise _HTTPError(
                        400, "input", f"this model takes tensors {names} here; send text to POST /v1/text "
                        '({"text": "..."}): the bundle carries its tokenizer', "InputError",
                    )  # fmt: skip
                return raw

        elif content_type == _NPY:
            array = _read_npy(body, "the body")

            def inputs_of(model: Model) -> Mapping[str, Any]:
                return {_single_name(model, query.get("input"), "input"): array}

        elif content_type == _NPZ:
            arrays = _read_npz(body, app.max_body_bytes)

            def inputs_of(model: Model) -> Mapping[str, Any]:
                return arrays

        else:
            raise _HTTPError(
                415,
                "unsupported_media_type",
                f"Content-Type {content_type!r} is not one of {_JSON}, {_NPY}, {_NPZ} (or none: told apart "
                "by its first bytes)",
                "UnsupportedMediaType",
            )
        model, outputs = app.predict(inputs_of, arrived)
        accept = (self.headers.get("Accept") or _JSON).lower()
        if _NPZ in accept:
            buffer = io.BytesIO()
            named: dict[str, Any] = dict(outputs)
            np.savez(buffer, **named)
            self._send(200, _NPZ, buffer.getvalue())
        elif _NPY in accept:
            name = _single_name_of(list(outputs), query.get("output"), "output")
            buffer = io.BytesIO()
            np.save(buffer, outputs[name], allow_pickle=False)
            self._send(200, _NPY, buffer.getvalue())
        else:
            self._send_json(200, tensor_answer(model, outputs))

    def _text(self, app: ModelServer) -> None:
        content_type = (self.headers.get("Content-Type") or _JSON).split(";")[0].strip().lower()
        body = self._read_body(app.max_json_bytes if content_type in _JSON_TYPES else app.max_body_bytes)
        if content_type == "text/plain":  # one text, as is
            try:
                request: dict[str, Any] = {"text": body.decode("utf-8")}
            except UnicodeDecodeError as e:
                raise _HTTPError(400, "bad_request", f"text/plain body is not UTF-8: {e}") from None
        elif content_type in _JSON_TYPES:
            request = _parse_json_object(body, '{"text": "..." or ["...", ...], "top_k": K}')
        else:
            raise _HTTPError(
                415, "unsupported_media_type", f"Content-Type {content_type!r} is not {_JSON} or text/plain",
                "UnsupportedMediaType",
            )  # fmt: skip
        unknown = set(request) - {"text", "top_k", "aggregation_strategy"}
        if "text" not in request or unknown:
            raise _HTTPError(
                400, "bad_request", 'body must be {"text": "..." or [...]} with optional "top_k", '
                f'"aggregation_strategy"; got keys {sorted(request)}',
            )  # fmt: skip
        options = {k: v for k, v in request.items() if k != "text"}
        self._send_json(200, app.run(lambda model: text_answer(model, request["text"], **options)))

    def _image(self, app: ModelServer, query: dict[str, str]) -> None:
        body = self._read_body(app.max_body_bytes)  # the image file's bytes, whatever Content-Type says
        top_k: int | None = 1
        if "top_k" in query:
            text = query["top_k"]
            top_k = None if text in ("0", "all") else _int_param(text, "top_k")
        self._send_json(200, app.run(lambda model: image_answer(model, body, top_k=top_k)))

    def _read_body(self, cap: int) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise _HTTPError(
                411, "length_required", "chunked bodies are not accepted; send Content-Length", "LengthRequired"
            )
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise _HTTPError(411, "length_required", "a POST needs a Content-Length header", "LengthRequired")
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError(length_text)
        except ValueError:
            self.close_connection = True
            raise _HTTPError(400, "bad_request", f"bad Content-Length {length_text!r}") from None
        if length > cap:
            self.close_connection = True  # the body stays unread: this connection cannot be reused
            what = "JSON body" if cap == self.server.app.max_json_bytes < self.server.app.max_body_bytes else "body"
            hint = " (send large tensors as .npy or .npz)" if what == "JSON body" else ""
            raise _HTTPError(
                413, "too_large", f"{what} of {length} bytes is over the {cap}-byte limit{hint}", "PayloadTooLarge"
            )
        try:
            body = self.rfile.read(length)
        except TimeoutError as e:
            self.close_connection = True
            raise _HTTPError(408, "timeout", str(e), "RequestTimeout") from None
        if len(body) != length:
            self.close_connection = True
            raise _HTTPError(400, "bad_request", f"body ended after {len(body)} of {length} bytes")
        self._body_read = True
        self._reader.done()
        return body

    # ---- responses -------------------------------------------------------------------------------
    def _send_error_json(self, status: int, type_: str, message: str) -> None:
        self._send_json(status, {"error": {"type": type_, "message": message}})

    def _send_json(self, status: int, body: Any) -> None:
        self._send(status, _JSON, json.dumps(body, allow_nan=False).encode())

    def _send(self, status: int, content_type: str, payload: bytes) -> None:
        self.server.app.count_status(status)
        self._reader.done()
        head = [f"{self.protocol_version} {status} {HTTPStatus(status).phrase}"]
        head += [f"Content-Type: {content_type}", f"Content-Length: {len(payload)}", "Cache-Control: no-store"]
        head += [f"{k}: {v}" for k, v in getattr(self, "_extra_headers", {}).items()]
        if self.close_connection:
            head.append("Connection: close")
        # One write for head and body: no Nagle / delayed-ACK stall between them.
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        self.log_request(status, len(payload))


# ---- request decoding (pure) -------------------------------------------------------------------------
def _parse_json_object(body: bytes, expected: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, an int over 4300 digits
        raise _HTTPError(400, "bad_request", f"body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(document, dict):
        raise _HTTPError(400, "bad_request", f"body must be a JSON object {expected}")
    return document


def _check_json_size(length: int, cap: int) -> None:
    if length > cap:
        raise _HTTPError(
            413, "too_large", f"JSON body of {length} bytes is over the {cap}-byte limit (send large tensors "
            "as .npy or .npz)", "PayloadTooLarge",
        )  # fmt: skip


def _parse_json_inputs(body: bytes) -> Mapping[str, Any]:
    expected = '{"inputs": {name: nested list}}'
    document = _parse_json_object(body, expected)
    if not isinstance(document.get("inputs"), dict):
        hint = " (text goes to POST /v1/text, images to POST /v1/image)" if "text" in document else ""
        raise _HTTPError(400, "bad_request", f"body must be a JSON object {expected}{hint}")
    return document["inputs"]


def _int_param(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _HTTPError(400, "bad_request", f"?{name}= must be an integer, got {text!r}") from None
    return value


def _read_npy(data: bytes, what: str) -> np.ndarray:
    """An ``.npy`` array read without trusting its header: the data must be exactly as long as it says."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except (ValueError, TypeError, SyntaxError, EOFError, tokenize.TokenError) as e:  # numpy tokenizes 1.0 headers
        raise _HTTPError(400, "bad_request", f"{what} is not a .npy array: {e}") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise _HTTPError(400, "bad_request", f"{what} holds {dtype} values; only numbers and booleans are accepted")
    if any(not isinstance(dim, int) or dim < 0 for dim in shape):
        raise _HTTPError(400, "bad_request", f"{what}: the header's shape {list(shape)} has a negative dimension")
    count = 1
    for dim in shape:
        count *= dim
    if any(dim > len(data) for dim in shape) and count == 0:  # (0, 10**20): no data, a shape numpy refuses
        raise _HTTPError(400, "bad_request", f"{what}: the header's shape {list(shape)} is too large")
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise _HTTPError(
            400,
            "bad_request",
            f"{what}: the header says {list(shape)} {dtype} ({count * dtype.itemsize} bytes) "
            f"but {len(data) - offset} bytes follow",
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


def _read_npz(data: bytes, cap: int) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, NotImplementedError) as e:  # "zip file version 6.4"
        raise _HTTPError(400, "bad_request", f"body is not a .npz archive: {e}") from None
    expanded = sum(m.file_size for m in members)
    if expanded > cap:  # a small compressed body must not expand past the body cap
        raise _HTTPError(
            413, "too_large", f".npz expands to {expanded} bytes, over the {cap}-byte limit", "PayloadTooLarge"
        )
    arrays: dict[str, np.ndarray] = {}
    for member in members:
        if not member.filename.endswith(".npy") or member.is_dir():
            raise _HTTPError(400, "bad_request", f".npz member {member.filename!r} is not an .npy array")
        try:
            raw = archive.read(member)
        # A corrupt member: zlib/lzma errors, EOFError (cut short), RuntimeError (encrypted)
        except (zipfile.BadZipFile, ValueError, OSError, NotImplementedError, zlib.error, lzma.LZMAError,
                EOFError, RuntimeError) as e:  # fmt: skip
            raise _HTTPError(400, "bad_request", f".npz member {member.filename!r} is unreadable: {e}") from None
        arrays[member.filename[: -len(".npy")]] = _read_npy(raw, f".npz member {member.filename!r}")
    return arrays


def _single_name(model: Model, requested: str | None, what: str) -> str:
    return _single_name_of([spec.name for spec in model.manifest.inputs], requested, what)


def _single_name_of(names: list[str], requested: str | None, what: str) -> str:
    if requested is not None:
        if requested not in names:
            raise _HTTPError(
                400, "input", f"?{what}={requested!r} is not one of the model's {what}s {names}", "InputError"
            )
        return requested
    if len(names) != 1:
        raise _HTTPError(
            400, "input", f"the model has {what}s {names}: name one with ?{what}=NAME, or use .npz", "InputError"
        )
    return names[0]


# ---- response encoding (pure) -------------------------------------------------------------------------
def _model_summary(model: Model) -> dict[str, Any]:
    m = model.manifest
    return {
        "name": m.name,
        "version": m.version,
        "label": m.label,
        "target": m.target,
        "precision": m.precision,
        "task": m.task,
        "sha256": model.bundle_sha256,
        "created": m.created,
        "inputs": [spec.to_dict() for spec in m.inputs],
        "outputs": [spec.to_dict() for spec in m.outputs],
        "input_policy": m.input_policy.to_dict(),
    }
