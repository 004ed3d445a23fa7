"""``edgeship-device run --serve``: the local HTTP endpoint keeps answering through OTA swaps.

A real agent process, a real Mosquitto, the real HTTP bundle server, and a thread posting predict
requests the whole time while the fleet deploys a model with different outputs and then rolls back.
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_parts import Broker, HttpServer, free_port, wait_for
from onnx import TensorProto, helper, numpy_helper
from ota_parts import AgentProcess, Fleet, X, deploy_cmd
from runtime_bundles import GOLDEN_X, B, BundleMaker, Keys, W, linear_reference

from device_runtime.agent import Agent
from sdk.errors import TransportError

pytestmark = pytest.mark.timeout(120)

SHIFT = 10.0  # v2 answers linear_reference(x) + SHIFT


def _shifted_linear_onnx() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear_shifted",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(B + np.float32(SHIFT), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture
def shifted_v2(make_bundle: BundleMaker) -> Path:
    return make_bundle(
        version=2, model_bytes=_shifted_linear_onnx(), golden_outputs={"y": linear_reference(GOLDEN_X) + SHIFT}
    )


class _Caller:
    """Posts ``X`` to ``/v1/predict`` in a loop over one keep-alive connection; records every answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers: list[tuple[float, int, float | None]] = []  # (time the request was sent, status, y[0][0])
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = json.dumps({"inputs": {"x": X.tolist()}}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                conn.request("POST", "/v1/predict", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = json.loads(response.read())
            except (OSError, http.client.HTTPException, ValueError) as e:  # every failure is a test failure
                self.errors.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                continue
            first = payload["outputs"]["y"]["data"][0][0] if response.status == 200 else None
            self.answers.append((sent, response.status, first))
        conn.close()

    def __enter__(self) -> _Caller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def latest(self) -> float | None:
        return self.answers[-1][2] if self.answers else None

    def sent_after(self, moment: float) -> bool:
        """An answer came back to a request sent after ``moment`` (so it cannot have run on an older model)."""
        return any(t > moment for t, _, _ in self.answers[-5:])


V1_Y = float(linear_reference(X)[0][0])
V2_Y = V1_Y + SHIFT


def test_run_serve_answers_through_deploy_and_rollback(
    tmp_path: Path,
    broker: Broker,
    keys: Keys,
    fleet_factory: Callable[..., Fleet],
    http_server: HttpServer,
    v1: Path,
    shifted_v2: Path,
) -> None:
    fleet = fleet_factory(broker.port, "srv")
    port = free_port()
    agent = AgentProcess(tmp_path / "state", broker.port, "srv", keys.public, v1)
    agent.args += ["--serve", "--serve-port", str(port)]
    agent.start()
    try:
        fleet.wait_status(lambda s: s["state"] == "online" and s["model"]["version"] == 1, 20, "online v1")
        wait_for(lambda: f"http://127.0.0.1:{port}" in agent.tail(), 10, "the --serve address line")
        with _Caller(port) as caller:
            wait_for(lambda: len(caller.answers) >= 20, 10, "predict answers from v1")
            assert caller.latest() == pytest.approx(V1_Y, rel=1e-5)

            http_server.state.body = shifted_v2.read_bytes()
            fleet.send(deploy_cmd(http_server.url, shifted_v2, "srv-1"))
            fleet.wait_phase("srv-1", "active", 30)
            after_active = time.monotonic()
            wait_for(lambda: caller.sent_after(after_active), 10, "answers to requests sent after active")
            assert caller.latest() == pytest.approx(V2_Y, rel=1e-5)

            fleet.send({"schema": 1, "id": "srv-2", "type": "rollback"})
            fleet.wait_phase("srv-2", "rolled_back", 30)
            after_rollback = time.monotonic()
            wait_for(lambda: caller.sent_after(after_rollback), 10, "answers to requests sent after rolled_back")
            assert caller.latest() == pytest.approx(V1_Y, rel=1e-5)
        statuses = {status for _, status, _ in caller.answers}
        assert caller.errors == [] and statuses == {200}, (caller.errors[:5], statuses)
        values = [float(y) for _, _, y in caller.answers if y is not None]
        assert all(y == pytest.approx(V1_Y, rel=1e-5) or y == pytest.approx(V2_Y, rel=1e-5) for y in values)
        # v1 -> v2 -> v1: each swap is one switch, never back and forth
        switches = sum(1 for a, b in itertools.pairwise(values) if abs(a - b) > 1)
        assert switches == 2, switches
        assert len(caller.answers) > 50
        # HTTP calls are counted in the agent's telemetry (one Metrics for every model served)
        wait_for(lambda: sum(t.get("count", 0) for t in fleet.telemetry()) >= len(caller.answers), 10, "telemetry")
        assert agent.terminate() == 0, agent.tail()
    finally:
        agent.kill()


def test_agent_serve_in_process(broker: Broker, agent_factory: Callable[..., Agent], v1: Path, tmp_path: Path) -> None:
    agent = agent_factory(broker.port, v1, serve=True, serve_port=0)
    assert agent.server is not None and agent.serve_url == agent.server.url
    conn = http.client.HTTPConnection("127.0.0.1", agent.server.port, timeout=10)
    conn.request("GET", "/v1/model")
    model: dict[str, Any] = json.loads(conn.getresponse().read())
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    conn.close()
    assert agent.active_model is not None and agent.active_model["version"] == 1
    assert json.dumps(model).count('"linear"') >= 1
    # a port in use: start() fails with one error and leaves nothing running
    other = agent_factory(broker.port, v1, device_id="dev2", start=False, serve=True, serve_port=agent.server.port)
    with pytest.raises(TransportError):
        other.start()
