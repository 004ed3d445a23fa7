"""The agent in-process against a real Mosquitto and a real HTTP server, with real signed ORT bundles."""

from __future__ import annotations

import json
import os
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_parts import HttpServer, wait_for
from ota_parts import Fleet, X, assert_serves_v, deploy_cmd, serve, slow_linear_onnx
from runtime_bundles import GOLDEN_X, BundleMaker, Keys, W, linear_reference

import device_runtime.agent.deployer as deployer_module
from device_runtime.agent import Agent
from sdk.bundle import VerifiedBundle, inspect_bundle, write_bundle
from sdk.signing import generate_keypair, load_private_key

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def running(online: Callable[..., tuple[Agent, Fleet]]) -> tuple[Agent, Fleet]:
    return online()


def test_status_online_with_model_and_capabilities(running: tuple[Agent, Fleet], v1: Path) -> None:
    agent, fleet = running
    status = fleet.status()
    assert status is not None
    assert status["schema"] == 1 and status["state"] == "online"
    assert status["model"]["name"] == "linear" and status["model"]["version"] == 1
    assert status["model"]["target"] == "onnxruntime" and len(status["model"]["sha256"]) == 64
    caps = status["capabilities"]
    assert caps["arch"] and "onnxruntime" in caps["runtimes"] and isinstance(caps["accelerators"], list)
    assert status["runtime"]["backend"] == "onnxruntime" and status["runtime"]["version"]
    assert_serves_v(agent, 1)


def test_ping_and_config(running: tuple[Agent, Fleet]) -> None:
    agent, fleet = running
    fleet.send({"schema": 1, "id": "p1", "type": "ping"})
    fleet.wait_phase("p1", "pong", 10)
    fleet.send({"schema": 1, "id": "c1", "type": "config", "telemetry_interval_s": 0.2, "log_level": "debug"})
    applied = fleet.wait_phase("c1", "applied", 10)
    assert applied["detail"]["settings"]["telemetry_interval_s"] == 0.2
    wait_for(lambda: len(fleet.telemetry()) >= 4, 10, "telemetry at the new 0.2 s interval")
    t = fleet.telemetry()[-1]
    assert {"seq", "ts", "window_s", "count", "errors", "latency_ms", "rss_mb", "cpu_pct", "model", "dropped"} <= set(t)
    assert t["model"]["version"] == 1
    assert json.loads((agent.state_dir / "config.json").read_text())["telemetry_interval_s"] == 0.2
    fleet.send({"schema": 1, "id": "c2", "type": "config", "telemetry_interval_s": -1})
    fleet.wait_phase("c2", "failed", 10)
    assert agent.telemetry_interval_s == 0.2


def test_deploy_then_redelivered_command_is_acknowledged_not_rerun(
    running: tuple[Agent, Fleet], http_server: HttpServer, v2: Path
) -> None:
    agent, fleet = running
    serve(http_server, v2)
    cmd = deploy_cmd(http_server.url, v2, "d1", version=2)
    fleet.send(cmd)
    active = fleet.wait_phase("d1", "active", 30)
    assert fleet.phases("d1") == ["received", "downloading", "verifying", "staged", "health_check", "active"]
    assert active["detail"]["model"]["version"] == 2 and active["detail"]["previous"]["version"] == 1
    assert_serves_v(agent, 2)
    fleet.wait_status(lambda s: s["model"]["version"] == 2, what="v2 in status")
    requests = len(http_server.state.requests)

    fleet.send(cmd)  # the same command again
    wait_for(lambda: len(fleet.events("d1")) == 7, 10, "the duplicate's acknowledgement")
    dup = fleet.events("d1")[-1]
    assert dup["phase"] == "received" and dup["detail"]["duplicate"] is True and dup["detail"]["outcome"] == "active"
    time.sleep(0.3)
    assert len(http_server.state.requests) == requests, "a redelivered deploy must not download again"
    assert len(fleet.events("d1")) == 7


def test_rollback_command(running: tuple[Agent, Fleet], http_server: HttpServer, v2: Path) -> None:
    agent, fleet = running
    fleet.send({"schema": 1, "id": "r0", "type": "rollback"})
    assert "no previous model" in fleet.wait_phase("r0", "failed")["detail"]["message"]
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "d1"))
    fleet.wait_phase("d1", "active", 30)
    fleet.send({"schema": 1, "id": "r1", "type": "rollback"})
    done = fleet.wait_phase("r1", "rolled_back", 30)
    assert done["detail"]["model"]["version"] == 1
    assert_serves_v(agent, 1)
    fleet.wait_status(lambda s: s["model"]["version"] == 1, what="v1 after rollback")
    # the floor stays at 2: v1 again by deploy would need allow_downgrade; v2 again is fine
    fleet.send(deploy_cmd(http_server.url, v2, "d2"))
    fleet.wait_phase("d2", "active", 30)
    assert_serves_v(agent, 2)


def test_a_failed_deployment_keeps_the_rollback_target(
    running: tuple[Agent, Fleet], http_server: HttpServer, v2: Path, make_bundle: BundleMaker
) -> None:
    agent, fleet = running
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "d1"))
    fleet.wait_phase("d1", "active", 30)  # v2 serving, v1 the rollback target
    wrong = make_bundle(version=3, golden_outputs={"y": linear_reference(GOLDEN_X) + 1.0})
    serve(http_server, wrong)
    fleet.send(deploy_cmd(http_server.url, wrong, "d2"))
    fleet.wait_phase("d2", "rolled_back", 30)  # staged into v1's slot, failed its health check
    wait_for(lambda: agent.wait_idle(1), 10, "the deployment to end")
    folders = sorted(p.name for p in (agent.state_dir / "slots").iterdir())
    assert len(folders) == 2, folders  # the failed bundle's folder is gone, both listed ones stay
    fleet.send({"schema": 1, "id": "r1", "type": "rollback"})
    assert fleet.wait_phase("r1", "rolled_back", 30)["detail"]["model"]["version"] == 1
    assert_serves_v(agent, 1)


def _stranger_bundle(tmp_path: Path, good: Path, keys: Keys) -> Path:
    """The same members, signed by a key the device does not trust."""
    private_path, _ = generate_keypair(tmp_path / "stranger", "stranger")
    manifest, _ = inspect_bundle(good)
    members: dict[str, bytes] = {}
    with tarfile.open(good) as tar:
        for member in tar.getmembers():
            if member.name not in ("manifest.json", "signatures.json"):
                f = tar.extractfile(member)
                assert f is not None
                members[member.name] = f.read()
    out = tmp_path / "untrusted.edgebundle"
    write_bundle(out, manifest, members, [load_private_key(private_path)])
    return out


def _tampered(tmp_path: Path, good: Path) -> Path:
    data = bytearray(good.read_bytes())
    index = data.find(W.tobytes())  # the model's weights, inside model.onnx
    assert index > 0
    data[index + 5] ^= 0x01
    out = tmp_path / "tampered.edgebundle"
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("tampered", "IntegrityError"),
        ("untrusted", "SignatureError"),
        ("downgrade", "RollbackError"),
        ("wrong_target", "IncompatibleBundle"),
        ("wrong_arch", "IncompatibleBundle"),
        ("runtime_too_old", "IncompatibleBundle"),
    ],
)
@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML bundles are the wrong target everywhere but macOS")
def test_refused_bundles_leave_the_active_model_serving(
    case: str,
    error: str,
    running: tuple[Agent, Fleet],
    http_server: HttpServer,
    make_bundle: BundleMaker,
    keys: Keys,
    tmp_path: Path,
) -> None:
    agent, fleet = running
    before = agent.predict({"x": X})["y"]
    bundle = {
        "tampered": lambda: _tampered(tmp_path, make_bundle(version=3)),
        "untrusted": lambda: _stranger_bundle(tmp_path, make_bundle(version=3), keys),
        "downgrade": lambda: make_bundle(version=0),
        "wrong_target": lambda: make_bundle(version=3, target="coreml"),  # Core ML runs only on macOS
        "wrong_arch": lambda: make_bundle(version=3, runtime={"package": "onnxruntime", "arch": ["riscv64"]}),
        "runtime_too_old": lambda: make_bundle(version=3, runtime={"package": "onnxruntime", "min_version": "99.0"}),
    }[case]()
    serve(http_server, bundle)
    fleet.send(deploy_cmd(http_server.url, bundle, "bad"))
    failed = fleet.wait_phase("bad", "failed", 30)
    assert failed["detail"]["error"] == error, failed
    assert "active" not in fleet.phases("bad") and "staged" not in fleet.phases("bad")
    assert_serves_v(agent, 1)
    np.testing.assert_array_equal(agent.predict({"x": X})["y"], before)
    assert agent.active_slot == "A"
    assert not (agent.state_dir / "slots" / ".incoming").exists()


def test_health_check_failing_rolls_back_and_marks_the_bundle_bad(
    running: tuple[Agent, Fleet], http_server: HttpServer, make_bundle: BundleMaker
) -> None:
    agent, fleet = running
    wrong = make_bundle(version=5, golden_outputs={"y": linear_reference(GOLDEN_X) + 1.0})  # signed, but wrong
    serve(http_server, wrong)
    fleet.send(deploy_cmd(http_server.url, wrong, "h1"))
    fleet.wait_phase("h1", "rolled_back", 30)
    phases = fleet.phases("h1")
    assert phases[-3:] == ["health_check", "failed", "rolled_back"], phases
    assert fleet.events("h1")[-2]["detail"]["error"] == "HealthCheckError"
    assert_serves_v(agent, 1)
    # a new deployment of the same bytes is refused without a download
    requests = len(http_server.state.requests)
    fleet.send(deploy_cmd(http_server.url, wrong, "h2"))
    assert fleet.wait_phase("h2", "failed")["detail"]["error"] == "BadBundle"
    assert len(http_server.state.requests) == requests


def test_hanging_health_check_times_out_and_rolls_back(
    online: Callable[..., tuple[Agent, Fleet]],
    http_server: HttpServer,
    make_bundle: BundleMaker,
) -> None:
    agent, fleet = online(health_timeout_s=0.5)
    slow = make_bundle(version=4, model_bytes=slow_linear_onnx(6000))  # a few seconds per run
    serve(http_server, slow)
    start = time.monotonic()
    fleet.send(deploy_cmd(http_server.url, slow, "slow"))
    failed = fleet.wait_phase("slow", "failed", 30)
    assert "did not finish within 0.5 s" in failed["detail"]["message"]
    fleet.wait_phase("slow", "rolled_back", 5)
    assert time.monotonic() - start < 10
    assert_serves_v(agent, 1)


def test_hanging_load_times_out_and_frees_the_ota_worker(
    online: Callable[..., tuple[Agent, Fleet]],
    http_server: HttpServer,
    make_bundle: BundleMaker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_load = deployer_module.load_verified
    release = threading.Event()

    def stuck_load(verified: VerifiedBundle, **options: Any) -> Any:
        if verified.manifest.version == 4:  # a runtime that never returns from loading this bundle
            release.wait(30)
        return real_load(verified, **options)

    monkeypatch.setattr(deployer_module, "load_verified", stuck_load)
    agent, fleet = online(health_timeout_s=0.5)
    stuck = make_bundle(version=4)
    serve(http_server, stuck)
    fleet.send(deploy_cmd(http_server.url, stuck, "stuck"))
    failed = fleet.wait_phase("stuck", "failed", 30)
    assert "loading the model did not finish within 0.5 s" in failed["detail"]["message"], failed
    fleet.wait_phase("stuck", "rolled_back", 5)
    assert_serves_v(agent, 1)
    # the OTA worker is free again while that load is still stuck: the next deployment goes through
    v5 = make_bundle(version=5)
    serve(http_server, v5)
    fleet.send(deploy_cmd(http_server.url, v5, "next"))
    fleet.wait_phase("next", "active", 30)
    assert_serves_v(agent, 5)
    release.set()


def test_health_check_over_latency_budget_rolls_back(
    online: Callable[..., tuple[Agent, Fleet]],
    http_server: HttpServer,
    v2: Path,
) -> None:
    agent, fleet = online(health_latency_budget_ms=0.0001)  # no real model is this fast
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "lat"))
    assert "budget" in fleet.wait_phase("lat", "failed", 30)["detail"]["message"]
    fleet.wait_phase("lat", "rolled_back", 5)
    assert_serves_v(agent, 1)


@pytest.mark.parametrize("mode", ["drop", "ignore_range"])
def test_download_resumes_or_restarts(
    running: tuple[Agent, Fleet], http_server: HttpServer, v2: Path, mode: str
) -> None:
    agent, fleet = running
    serve(http_server, v2, mode)
    fleet.send(deploy_cmd(http_server.url, v2, "dl"))
    fleet.wait_phase("dl", "active", 30)
    if mode == "drop":
        assert any(r and r.startswith("bytes=") for r in http_server.state.ranges), http_server.state.ranges
    assert_serves_v(agent, 2)


@pytest.mark.parametrize("mode", ["oversized", "lying_length", "not_found"])
def test_download_refused(running: tuple[Agent, Fleet], http_server: HttpServer, v2: Path, mode: str) -> None:
    agent, fleet = running
    serve(http_server, v2, mode)
    fleet.send(deploy_cmd(http_server.url, v2, "dl"))
    failed = fleet.wait_phase("dl", "failed", 30)
    assert failed["detail"]["error"] == "TransportError" and failed["detail"]["bad"] is False
    assert_serves_v(agent, 1)


def test_events_do_not_carry_url_credentials(running: tuple[Agent, Fleet], http_server: HttpServer, v2: Path) -> None:
    _agent, fleet = running
    serve(http_server, v2, "not_found")
    fleet.send(deploy_cmd(http_server.url + "?X-Amz-Signature=s3cr3t&v=1", v2, "dl"))
    fleet.wait_phase("dl", "failed", 30)
    events = json.dumps(fleet.events("dl"))
    assert "s3cr3t" not in events and "X-Amz-Signature=REDACTED&v=1" in events


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_state_is_private(running: tuple[Agent, Fleet], http_server: HttpServer, v2: Path) -> None:
    agent, fleet = running
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "d1", version=2))
    fleet.wait_phase("d1", "active", 30)
    state = agent.state_dir
    folders = [state, *(p for p in state.rglob("*") if p.is_dir())]
    files = [p for p in state.rglob("*") if p.is_file()]
    assert {"outbox.sqlite", "commands.jsonl", "pointer.json"} <= {p.name for p in files}
    assert any(p.suffix == ".onnx" for p in files)  # the slot's model
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in folders if p.stat().st_mode & 0o077} == {}
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o077} == {}


def test_wrong_body_is_refused(
    running: tuple[Agent, Fleet], http_server: HttpServer, v2: Path, make_bundle: BundleMaker
) -> None:
    agent, fleet = running
    serve(http_server, make_bundle(version=7))  # the server sends another bundle than announced
    fleet.send(deploy_cmd(http_server.url, v2, "dl"))
    assert fleet.wait_phase("dl", "failed", 30)["detail"]["error"] == "IntegrityError"
    assert_serves_v(agent, 1)


def test_malformed_deploy_command(running: tuple[Agent, Fleet]) -> None:
    _, fleet = running
    fleet.send({"schema": 1, "id": "m1", "type": "deploy", "url": "ftp://x", "sha256": "00"})
    assert fleet.wait_phase("m1", "failed")["detail"]["error"] == "CommandError"
    fleet.send({"schema": 1, "id": "m2", "type": "reboot"})
    assert fleet.wait_phase("m2", "failed")["detail"]["error"] == "CommandError"


def test_swap_under_load_fails_no_request(running: tuple[Agent, Fleet], http_server: HttpServer, v2: Path) -> None:
    agent, fleet = running
    stop = threading.Event()
    results: dict[str, Any] = {"ok": 0, "errors": [], "versions": set()}
    lock = threading.Lock()

    def load() -> None:
        while not stop.is_set():
            try:
                y = agent.predict({"x": X})["y"]
                np.testing.assert_allclose(y, linear_reference(X), rtol=1e-5)
                with lock:
                    results["ok"] += 1
            except Exception as e:  # every failure is a test failure
                with lock:
                    results["errors"].append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        serve(http_server, v2)
        for cmd_id in ["s1", "r1", "s2"]:  # deploy, roll back, deploy again: three swaps
            if cmd_id.startswith("s"):
                fleet.send(deploy_cmd(http_server.url, v2, cmd_id))
                fleet.wait_phase(cmd_id, "active", 30)
            else:
                fleet.send({"schema": 1, "id": cmd_id, "type": "rollback"})
                fleet.wait_phase(cmd_id, "rolled_back", 30)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert results["errors"] == []
    assert results["ok"] > 50
    assert_serves_v(agent, 2)
