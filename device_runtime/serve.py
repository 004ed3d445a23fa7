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
not fit the model, 404 unknown route, 405 wrong method, 411 no ``Content-Length``, 413 body over the
cap, 415 unknown content type, 503 no model; 500 only for a runtime failure or a bug. Request errors
are counted in the model's ``metrics`` by kind, every response in the HTTP status counts.

The server asks ``model_provider`` for the model on each request, so the OTA agent can swap models
under it: a request that started on the old model finishes on it (``Model.close`` waits for it), and
one that finds the old model already closed is retried once on the new one.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import zipfile
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import numpy as np

from device_runtime.errors import HealthCheckError, ModelClosedError
from device_runtime.model import Model
from device_runtime.results import image_answer, tensor_answer, text_answer
from sdk.errors import BackendError, EdgeshipError, InputError, TransportError

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ModelServer"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 2**20  # bytes; also the cap on the arrays an .npz body expands to
DEFAULT_HEALTH_TTL_S = 5.0  # seconds a health check result is served from cache
_IDLE_TIMEOUT_S = 30.0  # seconds a keep-alive connection may sit idle or stall mid-request
_POLL_S = 0.1  # seconds between the accept loop's checks for stop(): how long stop() takes at most
_JSON = "application/json"
_NPY = "application/x-npy"
_NPZ = "application/x-npz"
_NPY_MAGIC, _ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"
# What clients send when they name no type: curl --data-binary's default, and the generic one.
_UNTYPED = ("", "application/x-www-form-urlencoded", "application/octet-stream")
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

    Use ``start()`` / ``stop()`` (or a ``with`` block) to serve from a background thread.
    """

    def __init__(
        self,
        model_provider: ModelProvider | Model,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        health_ttl_s: float = DEFAULT_HEALTH_TTL_S,
    ) -> None:
        if isinstance(model_provider, Model):
            fixed = model_provider
            self._provider: ModelProvider = lambda: fixed
        else:
            self._provider = model_provider
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be an int > 0, got {max_body_bytes!r}")
        self.host = host
        self._requested_port = port
        self.max_body_bytes = max_body_bytes
        self.health_ttl_s = health_ttl_s
        self._httpd: ThreadingHTTPServer | None = None
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
            httpd = _Server((self.host, self._requested_port), _Handler)
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # an idle keep-alive connection must not keep the process alive
    app: ModelServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    server_version = "edgeship-device"
    sys_version = ""
    timeout = _IDLE_TIMEOUT_S
    disable_nagle_algorithm = True  # small responses go out at once
    server: _Server

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
        self._extra_headers: dict[str, str] = {}  # the handler serves every request of a keep-alive connection
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
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
        body = self._read_body(app.max_body_bytes)
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type in _UNTYPED:  # no type named: tell .npy and .npz apart by their magic bytes, else JSON
            content_type = _NPY if body.startswith(_NPY_MAGIC) else _NPZ if body.startswith(_ZIP_MAGIC) else _JSON
        if content_type in (_JSON, "text/json", "text/plain"):
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
                f"Content-Type {content_type!r} is not one of {_JSON}, {_NPY}, {_NPZ}",
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
        body = self._read_body(app.max_body_bytes)
        content_type = (self.headers.get("Content-Type") or _JSON).split(";")[0].strip().lower()
        if content_type == "text/plain":  # one text, as is
            try:
                request: dict[str, Any] = {"text": body.decode("utf-8")}
            except UnicodeDecodeError as e:
                raise _HTTPError(400, "bad_request", f"text/plain body is not UTF-8: {e}") from None
        elif content_type in (_JSON, "text/json"):
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
            raise _HTTPError(
                413, "too_large", f"body of {length} bytes is over the {cap}-byte limit", "PayloadTooLarge"
            )
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise _HTTPError(400, "bad_request", f"body ended after {len(body)} of {length} bytes")
        return body

    # ---- responses -------------------------------------------------------------------------------
    def _send_error_json(self, status: int, type_: str, message: str) -> None:
        self._send_json(status, {"error": {"type": type_, "message": message}})

    def _send_json(self, status: int, body: Any) -> None:
        self._send(status, _JSON, json.dumps(body, allow_nan=False).encode())

    def _send(self, status: int, content_type: str, payload: bytes) -> None:
        self.server.app.count_status(status)
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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _HTTPError(400, "bad_request", f"body is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise _HTTPError(400, "bad_request", f"body must be a JSON object {expected}")
    return document


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
    except (ValueError, TypeError, SyntaxError, EOFError) as e:
        raise _HTTPError(400, "bad_request", f"{what} is not a .npy array: {e}") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise _HTTPError(400, "bad_request", f"{what} holds {dtype} values; only numbers and booleans are accepted")
    count = 1
    for dim in shape:
        count *= dim
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
    except (zipfile.BadZipFile, ValueError, OSError) as e:
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
        except (zipfile.BadZipFile, ValueError, OSError, NotImplementedError) as e:
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
