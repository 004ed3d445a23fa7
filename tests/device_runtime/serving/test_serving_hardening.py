"""The endpoint against hostile or careless clients: 4xx for every client mistake, bounded workers and
read deadlines (slow clients), a JSON cap, browsers kept out (content types, Host, Origin), and a token."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from serving_parts import npz_body, request

from device_runtime.model import Model
from device_runtime.serve import ModelServer

ServeFactory = Callable[..., ModelServer]
X = json.dumps({"inputs": {"x": [[1.0, 2.0, 3.0, 4.0]]}}).encode()


def _npy_with_header(shape: tuple[int, ...], data: bytes) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


# ---- 4xx for client mistakes -----------------------------------------------------------------------------
@pytest.mark.parametrize("digits", [5000, 4000])
def test_a_json_number_with_thousands_of_digits_is_400(linear: Model, serve: ServeFactory, digits: int) -> None:
    server = serve(linear)
    body = b'{"inputs": {"x": [[1, 2, 3, ' + b"9" * digits + b"]]}}"
    response = request(server.port, "POST", "/v1/predict", body, {"Content-Type": "application/json"})
    assert response.status == 400, response.body


@pytest.mark.parametrize("shape", [(-1, -4), (-4, 1), (0, 10**20), (2**62, 2**62, 0)])
def test_npy_and_npz_headers_with_negative_or_huge_dims_are_400(
    linear: Model, serve: ServeFactory, shape: tuple[int, ...]
) -> None:
    server = serve(linear)
    count = int(np.prod(shape, dtype=object))
    body = _npy_with_header(shape, np.ones(max(count, 0) if count < 64 else 0, np.float32).tobytes())
    response = request(server.port, "POST", "/v1/predict", body, {"Content-Type": "application/x-npy"})
    assert response.status == 400, response.body
    archive = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("x.npy", body)
    response = request(server.port, "POST", "/v1/predict", archive.getvalue(), {"Content-Type": "application/x-npz"})
    assert response.status == 400, response.body
    assert linear.metrics.snapshot()["errors"].get("internal") is None


# ---- memory: JSON is capped well below the body cap ------------------------------------------------------
def test_a_json_body_over_the_json_cap_is_413_before_it_is_read(linear: Model, serve: ServeFactory) -> None:
    server = serve(linear, max_json_bytes=1000)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:  # head only: no body sent
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n"
        )
        reply = sock.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413") and "JSON" in reply, reply
    untyped = b'{"inputs": {"x": [[' + b"1.0, " * 1000 + b"1.0]]}}"
    assert request(server.port, "POST", "/v1/predict", untyped).status == 413
    assert request(server.port, "POST", "/v1/predict", npz_body({"x": np.ones((1, 4), np.float32)})).status == 200
    assert request(server.port, "POST", "/v1/predict", X).status == 200


# ---- browsers: content types, Host, Origin ---------------------------------------------------------------
def test_text_plain_is_not_json_on_predict(linear: Model, serve: ServeFactory) -> None:
    server = serve(linear)
    response = request(server.port, "POST", "/v1/predict", X, {"Content-Type": "text/plain"})
    assert response.status == 415, response.body


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_cross_origin_post_does_not_reach_the_model(linear: Model, serve: ServeFactory, content_type: str) -> None:
    server = serve(linear)
    for path in ("/v1/predict", "/v1/text", "/v1/image"):
        headers = {"Content-Type": content_type, "Origin": "http://evil.example"}
        response = request(server.port, "POST", path, X, headers)
        assert response.status == 403, (path, response.body)
    assert linear.metrics.snapshot()["count"] == 0
    same = {"Origin": f"http://127.0.0.1:{server.port}", "Content-Type": "application/json"}
    assert request(server.port, "POST", "/v1/predict", X, same).status == 200


def test_the_host_header_must_be_an_address_or_an_allowed_name(linear: Model, serve: ServeFactory) -> None:
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example."""
    server = serve(linear, allow_hosts=["device.local"])
    port = server.port
    assert request(port, "POST", "/v1/predict", X, {"Host": f"evil.example:{port}"}).status == 403
    assert request(port, "GET", "/v1/model", None, {"Host": "evil.example"}).status == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"device.local:{port}", "DEVICE.LOCAL"):
        assert request(port, "POST", "/v1/predict", X, {"Host": host}).status == 200, host


# ---- a token ------------------------------------------------------------------------------------------------
def test_a_token_is_required_when_set(linear: Model, serve: ServeFactory) -> None:
    server = serve(linear, token="s3cret-token")
    port = server.port
    missing = request(port, "POST", "/v1/predict", X)
    assert missing.status == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert request(port, "GET", "/healthz", None, {"Authorization": "Bearer wrong"}).status == 401
    assert request(port, "POST", "/v1/predict", X, {"Authorization": "Bearer s3cret-token"}).status == 200
    assert linear.metrics.snapshot()["count"] == 1


def test_binding_beyond_loopback_needs_a_token_or_an_explicit_opt_out(linear: Model) -> None:
    with pytest.raises(ValueError, match="token"):
        ModelServer(linear, "0.0.0.0", 0)
    ModelServer(linear, "0.0.0.0", 0, token="t")
    ModelServer(linear, "0.0.0.0", 0, insecure_no_auth=True)
    ModelServer(linear, "127.0.0.2", 0)
    ModelServer(linear, "localhost", 0)


# ---- workers, slow clients, backlog --------------------------------------------------------------------------
def _serve_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("edgeship-serve"))


def test_connections_are_served_by_a_bounded_pool(linear: Model, serve: ServeFactory) -> None:
    before = _serve_threads()
    server = serve(linear, max_connections=4)
    idle = []
    try:
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET /v1/model HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # keep-alive, then idle
            idle.append(sock)
        time.sleep(0.5)
        assert _serve_threads() - before <= 4 + 1, [t.name for t in threading.enumerate()]
        started = time.monotonic()
        assert request(server.port, "POST", "/v1/predict", X).status == 200  # idle keep-alives make room
        assert time.monotonic() - started < 5
    finally:
        for sock in idle:
            sock.close()


def _slowloris(port: int, stop: threading.Event, closed: list[float]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        try:
            while not stop.is_set():
                sock.sendall(b"X")  # one header byte at a time, never finishing
                time.sleep(0.1)
                sock.setblocking(False)
                try:
                    if sock.recv(65536) == b"":
                        break
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
        except OSError:
            pass
        closed.append(time.monotonic() - started)


def test_slow_clients_are_dropped_and_cannot_hold_every_worker(linear: Model, serve: ServeFactory) -> None:
    server = serve(linear, max_connections=2, read_timeout_s=1.0)
    stop = threading.Event()
    closed: list[float] = []
    slow = [threading.Thread(target=_slowloris, args=(server.port, stop, closed)) for _ in range(2)]
    for thread in slow:
        thread.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        response = request(server.port, "POST", "/v1/predict", X)
        assert response.status == 200 and time.monotonic() - started < 3.0
        deadline = time.monotonic() + 4
        while len(closed) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(closed) == 2 and max(closed) < 2.5, closed
    finally:
        stop.set()
        for thread in slow:
            thread.join(10)


def test_slow_request_heads_do_not_starve_good_clients(linear: Model, serve: ServeFactory) -> None:
    before = _serve_threads()
    server = serve(linear, max_connections=4)
    slow = []
    try:
        for _ in range(50):  # more slow heads than the pool and its queue (4 + 16) hold
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            slow.append(sock)
        time.sleep(0.3)
        for sock in slow:
            with contextlib.suppress(OSError):  # (before the fix most were refused 503)
                sock.sendall(b"X")  # still coming, slowly
        started = time.monotonic()
        statuses = [request(server.port, "POST", "/v1/predict", X).status for _ in range(20)]
        assert statuses == [200] * 20 and time.monotonic() - started < 5
        assert _serve_threads() - before <= 4 + 1, [t.name for t in threading.enumerate()]
    finally:
        for sock in slow:
            sock.close()


def test_the_listen_backlog_holds_a_burst_of_clients(linear: Model, serve: ServeFactory) -> None:
    from device_runtime.serve import LISTEN_BACKLOG

    assert LISTEN_BACKLOG >= 128
    server = serve(linear)
    results: list[Any] = []

    def one() -> None:
        results.append(request(server.port, "POST", "/v1/predict", X).status)

    threads = [threading.Thread(target=one) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results.count(200) == 64
