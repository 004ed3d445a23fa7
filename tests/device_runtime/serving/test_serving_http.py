"""``ModelServer``: round trips equal to ``Model.predict``, every 4xx, caps, health, metrics, model swaps."""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from runtime_bundles import Keys
from serving_parts import (
    gated_model,
    linear_reference,
    masked_reference,
    npy_body,
    npz_body,
    parse_prometheus,
    request,
)

from device_runtime.model import Model
from device_runtime.serve import ModelServer
from sdk.errors import TransportError

ServeFactory = Callable[..., ModelServer]
JSON = {"Content-Type": "application/json"}
X = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)


def post_json(port: int, payload: object, path: str = "/v1/predict") -> tuple[int, dict]:
    response = request(port, "POST", path, json.dumps(payload).encode(), JSON)
    assert response.headers["content-type"] == "application/json"
    return response.status, response.json()


def decoded(output: dict) -> np.ndarray:
    return np.array(output["data"], dtype=output["dtype"]).reshape(output["shape"])


def test_json_round_trip_equals_predict(linear: Model, serve: ServeFactory) -> None:
    server = serve(linear)
    status, body = post_json(server.port, {"inputs": {"x": X.tolist()}})
    assert status == 200
    y = body["outputs"]["y"]
    assert y["dtype"] == "float32" and y["shape"] == [3, 3]
    np.testing.assert_array_equal(decoded(y), linear.predict({"x": X})["y"])


def test_json_with_several_inputs_and_integer_dtypes(masked: Model, serve: ServeFactory) -> None:
    server = serve(masked)
    ids, mask = [[1, 2, 3], [4, 5, 6]], [[1, 1, 0], [1, 0, 0]]
    status, body = post_json(server.port, {"inputs": {"input_ids": ids, "attention_mask": mask}})
    assert status == 200
    np.testing.assert_array_equal(decoded(body["outputs"]["total"]), masked_reference(np.array(ids), np.array(mask)))


def test_npy_round_trip(linear: Model, masked: Model, serve: ServeFactory) -> None:
    server = serve(linear)
    response = request(server.port, "POST", "/v1/predict", npy_body(X), {"Content-Type": "application/x-npy"})
    assert response.status == 200
    np.testing.assert_array_equal(decoded(response.json()["outputs"]["y"]), linear.predict({"x": X})["y"])
    # answer as .npy too; a Fortran-ordered input is read right
    fortran = np.asfortranarray(X)
    response = request(
        server.port,
        "POST",
        "/v1/predict?input=x",
        npy_body(fortran),
        {"Content-Type": "application/x-npy", "Accept": "application/x-npy"},
    )
    assert response.status == 200 and response.headers["content-type"] == "application/x-npy"
    np.testing.assert_array_equal(np.load(io.BytesIO(response.body)), linear.predict({"x": X})["y"])
    # a model with two inputs needs ?input=NAME for an .npy body
    two = serve(masked)
    ids = np.array([[1, 2, 3]], np.int64)
    response = request(two.port, "POST", "/v1/predict", npy_body(ids), {"Content-Type": "application/x-npy"})
    assert response.status == 400 and "?input=NAME" in response.json()["error"]["message"]
    assert masked.metrics.snapshot()["errors"] == {"input": 1}


def test_npz_round_trip(masked: Model, serve: ServeFactory) -> None:
    server = serve(masked)
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.int32)
    expected = masked.predict({"input_ids": ids, "attention_mask": mask})["total"]
    for compressed in (False, True):
        response = request(
            server.port,
            "POST",
            "/v1/predict",
            npz_body({"input_ids": ids, "attention_mask": mask}, compressed),
            {"Content-Type": "application/x-npz", "Accept": "application/x-npz"},
        )
        assert response.status == 200 and response.headers["content-type"] == "application/x-npz"
        with np.load(io.BytesIO(response.body), allow_pickle=False) as archive:
            np.testing.assert_array_equal(archive["total"], expected)


def test_nonfinite_outputs_become_null(model_factory: Callable[..., Model], serve: ServeFactory) -> None:
    server = serve(model_factory(input_policy={"nonfinite": "pass"}))
    status, body = post_json(server.port, {"inputs": {"x": [[float("nan"), 1.0, 2.0, 3.0]]}})
    assert status == 200 and body["outputs"]["y"]["data"] == [[None, None, None]]


def test_keep_alive_connection_serves_many_requests(linear: Model, serve: ServeFactory) -> None:
    import http.client

    server = serve(linear)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for i in range(20):
            body = json.dumps({"inputs": {"x": [[i, 0, 0, 0]]}}).encode()
            response = request(server.port, "POST", "/v1/predict", body, JSON, conn=conn)
            assert response.status == 200
        assert request(server.port, "GET", "/nope", conn=conn).status == 404  # an error keeps the connection
        assert request(server.port, "GET", "/v1/model", conn=conn).status == 200
    finally:
        conn.close()
    assert linear.metrics.count == 20


# ---- client mistakes: 4xx JSON, counted, never 500 -------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "kind", "match"),
    [
        ("GET", "/v2/predict", None, {}, 404, "not_found", "no route"),
        ("GET", "/v1/predict", None, {}, 405, "method_not_allowed", "takes POST"),
        ("DELETE", "/metrics", None, {}, 405, "method_not_allowed", "takes GET"),
        ("POST", "/v1/predict", b"{not json", JSON, 400, "bad_request", "not valid JSON"),
        ("POST", "/v1/predict", b"\xff\xfe", JSON, 400, "bad_request", "not valid JSON"),
        ("POST", "/v1/predict", b"[1, 2]", JSON, 400, "bad_request", "inputs"),
        ("POST", "/v1/predict", b'{"inputs": [1]}', JSON, 400, "bad_request", "inputs"),
        ("POST", "/v1/predict", b'{"inputs": {"X": [[1, 2, 3, 4]]}}', JSON, 400, "input", "missing input"),
        ("POST", "/v1/predict", b'{"inputs": {"x": [[1, 2, 3]]}}', JSON, 400, "input", "dimension 1 must be 4"),
        ("POST", "/v1/predict", b'{"inputs": {"x": [[1, 2, 3, 4]], "z": 1}}', JSON, 400, "input", "unexpected"),
        ("POST", "/v1/predict", b'{"inputs": {"x": [["a", "b", "c", "d"]]}}', JSON, 400, "input", "numeric"),
        ("POST", "/v1/predict", b'{"inputs": {"x": [[NaN, 1, 2, 3]]}}', JSON, 400, "input", "NaN"),
        ("POST", "/v1/predict", b'{"inputs": {"x": [[1, 2], [3]]}}', JSON, 400, "input", "cannot be read"),
        ("POST", "/v1/predict", b'{"inputs": {"x": []}}', JSON, 400, "input", "rank 1"),
        ("POST", "/v1/predict", b"x", {"Content-Type": "text/csv"}, 415, "unsupported_media_type", "text/csv"),
        ("POST", "/v1/predict", b"junk", {"Content-Type": "application/x-npy"}, 400, "bad_request", "not a .npy"),
        ("POST", "/v1/predict", b"junk", {"Content-Type": "application/x-npz"}, 400, "bad_request", "not a .npz"),
        ("POST", "/v1/predict?input=q", npy_body(X), {"Content-Type": "application/x-npy"}, 400, "input", "'q'"),
        ("POST", "/v1/predict", npy_body(X)[:-4], {"Content-Type": "application/x-npy"}, 400, "bad_request", "follow"),
        ("POST", "/v1/predict", npy_body(np.array(["ab"])), {"Content-Type": "application/x-npy"}, 400, "bad_request",
         "numbers"),
        ("POST", "/v1/predict", npz_body({"x": X, "w": X}), {"Content-Type": "application/x-npz"}, 400, "input",
         "unexpected"),
    ],
    ids=[
        "unknown-route", "get-predict", "delete-metrics", "bad-json", "not-utf8", "json-list", "inputs-list",
        "wrong-name", "wrong-dim", "extra-name", "strings", "nan", "ragged", "rank", "content-type", "bad-npy",
        "bad-npz", "npy-unknown-input", "npy-truncated", "npy-strings", "npz-extra",
    ],
)  # fmt: skip
def test_client_mistakes_are_4xx_json_and_counted(
    linear: Model,
    serve: ServeFactory,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    status: int,
    kind: str,
    match: str,
) -> None:
    server = serve(linear)
    response = request(server.port, method, path, body, headers)
    assert response.status == status, response.body
    error = response.json()["error"]
    assert set(error) == {"type", "message"} and match in error["message"]
    assert linear.metrics.snapshot()["errors"] == {kind: 1}
    if status == 405:
        assert response.headers["allow"] in ("POST", "GET")
    # the server is still up and right
    status_ok, ok = post_json(server.port, {"inputs": {"x": X.tolist()}})
    assert status_ok == 200
    np.testing.assert_array_equal(decoded(ok["outputs"]["y"]), linear_reference(X))


def test_body_cap_is_413_and_unread(linear: Model, serve: ServeFactory) -> None:
    server = serve(linear, max_body_bytes=1000)
    big = json.dumps({"inputs": {"x": [[0.123456789] * 4] * 100}}).encode()
    assert len(big) > 1000
    response = request(server.port, "POST", "/v1/predict", big, JSON)
    assert response.status == 413 and response.json()["error"]["type"] == "PayloadTooLarge"
    assert response.headers.get("connection") == "close"
    assert linear.metrics.snapshot()["errors"] == {"too_large": 1}
    small = json.dumps({"inputs": {"x": [[1, 2, 3, 4]]}}).encode()
    assert request(server.port, "POST", "/v1/predict", small, JSON).status == 200


def test_compressed_npz_bomb_is_refused(linear: Model, serve: ServeFactory) -> None:
    server = serve(linear, max_body_bytes=100_000)
    bomb = npz_body({"x": np.zeros((250_000, 4), np.float32)}, compressed=True)  # 4 MB of zeros, a few KB zipped
    assert len(bomb) < 100_000
    response = request(server.port, "POST", "/v1/predict", bomb, {"Content-Type": "application/x-npz"})
    assert response.status == 413 and "expands to" in response.json()["error"]["message"]


def test_npy_header_lying_about_its_size_is_refused(linear: Model, serve: ServeFactory) -> None:
    server = serve(linear)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 4)})
    lying = buffer.getvalue() + np.zeros(4, np.float32).tobytes()  # 16 bytes, not 16 GB
    response = request(server.port, "POST", "/v1/predict", lying, {"Content-Type": "application/x-npy"})
    assert response.status == 400 and "but 16 bytes follow" in response.json()["error"]["message"]


def test_post_without_length_or_chunked_is_411(linear: Model, serve: ServeFactory) -> None:
    server = serve(linear)
    for head in (
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\r\n",
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head)
            reply = sock.recv(65536).decode()
        assert reply.startswith("HTTP/1.1 411"), reply
    assert linear.metrics.snapshot()["errors"] == {"length_required": 2}


def test_garbage_request_line_is_a_json_400(linear: Model, serve: ServeFactory) -> None:
    server = serve(linear)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        reply = sock.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 400") and '"error"' in reply


# ---- model, health, metrics --------------------------------------------------------------------------------
def test_model_route(linear: Model, serve: ServeFactory) -> None:
    server = serve(linear)
    response = request(server.port, "GET", "/v1/model")
    info = response.json()
    assert response.status == 200
    assert info["name"] == "linear" and info["version"] == 1 and info["target"] == "onnxruntime"
    assert info["sha256"] == linear.bundle_sha256
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]
    assert info["backend"]["backend"] == "onnxruntime"


def test_healthz_runs_the_golden_check_and_caches_it(linear: Model, serve: ServeFactory) -> None:
    server = serve(linear, health_ttl_s=60)
    first = request(server.port, "GET", "/healthz")
    assert first.status == 200
    body = first.json()
    assert body["status"] == "ok" and body["health"]["passed"] is True and body["cached"] is False
    second = request(server.port, "GET", "/healthz").json()
    assert second["cached"] is True and second["health"] == body["health"]
    assert linear.metrics.count == 0  # health checks are not traffic


def test_healthz_reports_a_failing_model(make_bundle: Callable[..., Path], keys: Keys, serve: ServeFactory) -> None:
    import device_runtime

    wrong = {"y": np.zeros((2, 3), np.float32)}
    with device_runtime.load(make_bundle(golden_outputs=wrong), [keys.public]) as model:
        server = serve(model)
        response = request(server.port, "GET", "/healthz")
        assert response.status == 503
        body = response.json()
        assert body["status"] == "failing" and body["health"]["passed"] is False and "health check" in body["error"]


def test_metrics_route_is_prometheus(linear: Model, serve: ServeFactory) -> None:
    server = serve(linear)
    post_json(server.port, {"inputs": {"x": X.tolist()}})
    request(server.port, "GET", "/nowhere")
    response = request(server.port, "GET", "/metrics")
    assert response.status == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_prometheus(response.body.decode())["samples"]
    assert samples[("edgeship_inferences_total", ())] == 1
    assert samples[("edgeship_errors_total", (("kind", "not_found"),))] == 1
    assert samples[("edgeship_http_responses_total", (("code", "200"),))] == 1
    assert samples[("edgeship_http_responses_total", (("code", "404"),))] == 1
    assert samples[("edgeship_queue_seconds_count", ())] == 1


# ---- provider swaps --------------------------------------------------------------------------------------
def test_provider_swap_serves_the_new_model(model_factory: Callable[..., Model], serve: ServeFactory) -> None:
    first, second = model_factory(version=1), model_factory(version=2)
    current = {"model": first}
    server = serve(lambda: current["model"])
    assert request(server.port, "GET", "/v1/model").json()["version"] == 1
    current["model"] = second
    first.close()
    assert request(server.port, "GET", "/v1/model").json()["version"] == 2
    status, _ = post_json(server.port, {"inputs": {"x": X.tolist()}})
    assert status == 200 and second.metrics.count == 1 and first.metrics.count == 0


def test_request_in_flight_finishes_on_the_old_model(
    bundle_factory: Callable[..., Path], keys: Keys, tmp_path: Path, model_factory: Callable[..., Model],
    serve: ServeFactory,
) -> None:  # fmt: skip
    old, backend = gated_model(bundle_factory(), keys, tmp_path / "old")
    new = model_factory(version=2)
    current = {"model": old}
    server = serve(lambda: current["model"])
    backend.release.clear()
    results: list[tuple[int, dict]] = []
    thread = threading.Thread(target=lambda: results.append(post_json(server.port, {"inputs": {"x": X.tolist()}})))
    thread.start()
    assert backend.started.wait(10)
    current["model"] = new  # the agent switches traffic, then closes the old model
    closer = threading.Thread(target=old.close)
    closer.start()
    backend.release.set()
    thread.join(10)
    closer.join(10)
    assert results[0][0] == 200
    np.testing.assert_array_equal(decoded(results[0][1]["outputs"]["y"]), linear_reference(X))
    assert old.metrics.count == 1 and new.metrics.count == 0


def test_closed_model_is_retried_on_the_new_one(model_factory: Callable[..., Model], serve: ServeFactory) -> None:
    old, new = model_factory(version=1), model_factory(version=2)
    calls = {"n": 0}

    def provider() -> Model:  # the first lookup still sees the old model, already closed
        calls["n"] += 1
        return old if calls["n"] == 1 else new

    old.close()
    server = serve(provider)
    status, _ = post_json(server.port, {"inputs": {"x": X.tolist()}})
    assert status == 200 and new.metrics.count == 1


def test_no_model_is_503(serve: ServeFactory) -> None:
    def provider() -> Model:
        raise LookupError("nothing installed yet")

    server = serve(provider)
    for method, path in (("GET", "/v1/model"), ("GET", "/healthz"), ("POST", "/v1/predict")):
        response = request(server.port, method, path, b'{"inputs": {}}' if method == "POST" else None, JSON)
        assert response.status == 503 and response.json()["error"]["type"] == "Unavailable"
    response = request(server.port, "GET", "/metrics")
    samples = parse_prometheus(response.body.decode())["samples"]
    assert samples[("edgeship_http_responses_total", (("code", "503"),))] == 3


def test_closed_fixed_model_is_503(linear: Model, serve: ServeFactory) -> None:
    server = serve(linear)
    linear.close()
    status, body = post_json(server.port, {"inputs": {"x": X.tolist()}})
    assert status == 503 and body["error"]["type"] == "Unavailable"


# ---- lifecycle -------------------------------------------------------------------------------------------
def test_start_stop_and_port_in_use(linear: Model) -> None:
    with ModelServer(linear) as server:
        assert server.host == "127.0.0.1" and server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        with pytest.raises(TransportError, match="cannot listen"):
            ModelServer(linear, port=server.port).start()
        with pytest.raises(RuntimeError):
            server.start()
    server.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_bad_options_are_refused(linear: Model) -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        ModelServer(linear, max_body_bytes=0)


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "application/octet-stream"])
def test_untyped_npy_and_npz_bodies_are_recognised(
    linear: Model, serve: ServeFactory, content_type: str | None
) -> None:
    """`curl --data-binary @x.npy URL` names no type (curl sends form-urlencoded): the magic bytes tell."""
    server = serve(linear)
    headers = {"Content-Type": content_type} if content_type else {}
    for body in (npy_body(X), npz_body({"x": X})):
        response = request(server.port, "POST", "/v1/predict", body, headers)
        assert response.status == 200, response.json()
        np.testing.assert_array_equal(decoded(response.json()["outputs"]["y"]), linear_reference(X))


def test_the_answer_names_the_model_as_the_clis_do(linear: Model, serve: ServeFactory) -> None:
    from device_runtime.results import tensor_answer

    status, body = post_json(serve(linear).port, {"inputs": {"x": X.tolist()}})
    assert status == 200 and body == json.loads(json.dumps(tensor_answer(linear, linear.predict({"x": X}))))
    assert body["model"]["name"] == linear.manifest.name and body["model"]["sha256"] == linear.bundle_sha256
