"""``edgeship-device serve`` as a real process answering HTTP on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from runtime_bundles import Keys
from serving_parts import linear_reference, request

from device_runtime.cli import main


def test_serve_subprocess_answers_and_stops_on_sigterm(bundle_factory: Callable[..., Path], keys: Keys) -> None:
    command = [
        sys.executable, "-m", "device_runtime.cli", "serve", "--bundle", str(bundle_factory()),
        "--trust", str(keys.public), "--port", "0", "--max-body-bytes", "4096",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        started = json.loads(process.stdout.readline())
        assert started["url"].startswith("http://127.0.0.1:") and started["model"]["name"] == "linear"
        port = int(started["url"].rsplit(":", 1)[1])
        x = [[1.0, 2.0, 3.0, 4.0]]
        response = request(port, "POST", "/v1/predict", json.dumps({"inputs": {"x": x}}).encode())
        assert response.status == 200
        y = np.array(response.json()["outputs"]["y"]["data"], np.float32)
        np.testing.assert_allclose(y, linear_reference(np.array(x)), rtol=1e-6)
        assert request(port, "POST", "/v1/predict", b"{" * 5000).status == 413
        assert request(port, "GET", "/healthz").status == 200
        assert b"edgeship_inferences_total 1" in request(port, "GET", "/metrics").body
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_with_an_untrusted_key_prints_one_line(
    bundle_factory: Callable[..., Path], keys: Keys, capsys: object
) -> None:
    code = main(["serve", "--bundle", str(bundle_factory()), "--trust", str(keys.other_public), "--port", "0"])
    assert code == 1
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert err.startswith("error: ") and err.count("\n") == 1


def test_serve_on_a_busy_port_prints_one_line(bundle_factory: Callable[..., Path], keys: Keys, capsys: object) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--bundle", str(bundle_factory()), "--trust", str(keys.public), "--port", str(port)])
    assert code == 1
    assert "cannot listen" in capsys.readouterr().err  # type: ignore[attr-defined]


def test_serve_beyond_loopback_without_a_token_is_refused_in_one_line(
    bundle_factory: Callable[..., Path], keys: Keys, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGESHIP_SERVE_TOKEN", raising=False)
    code = main(["serve", "--bundle", str(bundle_factory()), "--trust", str(keys.public), "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--token-file" in err and "--insecure-no-auth" in err


@pytest.mark.parametrize("from_env", [True, False])
def test_serve_with_a_token_answers_only_with_it(
    bundle_factory: Callable[..., Path], keys: Keys, tmp_path: Path, from_env: bool
) -> None:
    command = [
        sys.executable, "-m", "device_runtime.cli", "serve", "--bundle", str(bundle_factory()),
        "--trust", str(keys.public), "--host", "0.0.0.0", "--port", "0", "--allow-host", "device.local",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "EDGESHIP_SERVE_TOKEN"}
    if from_env:
        env["EDGESHIP_SERVE_TOKEN"] = "tok-123"
    else:
        (tmp_path / "token").write_text("tok-123\n")
        command += ["--token-file", str(tmp_path / "token")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        port = int(json.loads(process.stdout.readline())["url"].rsplit(":", 1)[1])
        assert request(port, "GET", "/v1/model").status == 401
        ok = {"Authorization": "Bearer tok-123", "Host": f"device.local:{port}"}
        assert request(port, "GET", "/v1/model", None, ok).status == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
        assert process.stderr is not None and "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_header_timeout_closes_a_silent_connection(bundle_factory: Callable[..., Path], keys: Keys) -> None:
    """``--header-timeout`` reaches the server: a client that sends nothing is dropped after it, not
    after the default 10 s."""
    import socket
    import time

    command = [
        sys.executable, "-m", "device_runtime.cli", "serve", "--bundle", str(bundle_factory()),
        "--trust", str(keys.public), "--port", "0", "--header-timeout", "0.5",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        port = int(json.loads(process.stdout.readline())["url"].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=8) as silent:
            started = time.monotonic()
            assert silent.recv(1024) == b""  # closed by the server
            waited = time.monotonic() - started
        assert 0.3 < waited < 5.0
        assert request(port, "GET", "/healthz").status == 200  # a prompt client is served
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_serve_bad_header_timeout_is_one_line(
    bundle_factory: Callable[..., Path], keys: Keys, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    code = main(["serve", "--bundle", str(bundle_factory()), "--trust", str(keys.public), "--header-timeout", value])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--header-timeout must be a positive number" in err


def test_run_passes_serve_header_timeout_to_the_agent(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import device_runtime.agent as agent_package

    seen: list[object] = []

    class _Stop(Exception):
        pass

    def fake_agent(config: object) -> object:
        seen.append(config)
        raise _Stop

    monkeypatch.setattr(agent_package, "Agent", fake_agent)
    args = ["run", "--state-dir", str(tmp_path / "s"), "--broker", "mqtt://127.0.0.1:1", "--device-id", "d1",
            "--trust", str(keys.public), "--serve"]  # fmt: skip
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:  # ``run`` installs its SIGTERM/SIGINT handlers before it builds the agent
        with pytest.raises(_Stop):
            main([*args, "--serve-header-timeout", "2.5"])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert seen[0].serve_header_timeout_s == 2.5  # type: ignore[attr-defined]
    assert main([*args, "--serve-header-timeout", "0"]) == 1
    assert "--serve-header-timeout must be a positive number" in capsys.readouterr().err
