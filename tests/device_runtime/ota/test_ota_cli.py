"""``edgeship-device run`` and ``edgeship broker`` as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_parts import Broker, HttpServer, free_port, wait_for
from ota_parts import ROOT, AgentProcess, Fleet, connect_fleet, deploy_cmd, unique_seqs
from runtime_bundles import Keys

from device_runtime.cli import main as device_main

pytestmark = pytest.mark.timeout(120)


def test_device_run_end_to_end(
    tmp_path: Path,
    broker: Broker,
    keys: Keys,
    fleet_factory: Callable[..., Fleet],
    http_server: HttpServer,
    v1: Path,
    v2: Path,
) -> None:
    fleet = fleet_factory(broker.port, "cli-dev")
    agent = AgentProcess(tmp_path / "state", broker.port, "cli-dev", keys.public, v1)
    agent.start()
    try:
        fleet.wait_status(lambda s: s["state"] == "online" and s["model"]["version"] == 1, 20, "online v1")
        http_server.state.body = v2.read_bytes()
        fleet.send(deploy_cmd(http_server.url, v2, "cli-1"))
        fleet.wait_phase("cli-1", "active", 30)
        fleet.wait_status(lambda s: s["model"]["version"] == 2, 10, "v2")
        # telemetry at the 1 s interval names v2 (a window that closed before the swap may still name v1)
        wait_for(lambda: (fleet.telemetry() or [{}])[-1].get("model", {}).get("version") == 2, 10, "v2 telemetry")
        assert agent.terminate() == 0, agent.tail()
        fleet.wait_status(lambda s: s["state"] == "offline", 10, "offline after SIGTERM")
        pointer = json.loads((tmp_path / "state" / "pointer.json").read_text())
        assert pointer["slots"][pointer["active"]]["version"] == 2
        # a restart serves v2 without the initial bundle and continues the telemetry seq
        before = max(unique_seqs(fleet.telemetry()))
        agent.start()
        fleet.wait_status(lambda s: s["state"] == "online" and s["model"]["version"] == 2, 20, "v2 after restart")
        wait_for(lambda: max(unique_seqs(fleet.telemetry())) > before, 10, "telemetry after the restart")
    finally:
        agent.kill()


def test_device_run_usage_errors(tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["run", "--state-dir", str(tmp_path / "s"), "--device-id", "d", "--trust", str(keys.public)]
    assert device_main([*base, "--broker", "http://x:1"]) == 1
    assert "mqtt://HOST:PORT" in capsys.readouterr().err
    assert device_main([*base, "--broker", "mqtts://x:8883"]) == 1
    assert "--tls-ca" in capsys.readouterr().err
    assert device_main([*base, "--broker", "mqtt://x:1", "--device-id", "a/b"]) == 1
    serve_beyond_loopback = [*base, "--broker", "mqtt://x:1", "--serve", "--serve-host", "0.0.0.0"]
    assert device_main(serve_beyond_loopback) == 1  # before anything starts
    err = capsys.readouterr().err
    assert "--serve-token-file" in err and "--serve-insecure-no-auth" in err
    assert device_main(["run", "--state-dir", "x"]) == 2


def test_edgeship_broker_command(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdk.cli", "broker", "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert "embedded MQTT broker" in proc.stdout.readline()
        fleet = connect_fleet(port, "probe")
        fleet.close()
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_the_agent_cleanly_with_its_own_offline_status(
    tmp_path: Path, broker: Broker, keys: Keys, fleet_factory: Callable[..., Fleet], v1: Path, signum: int
) -> None:
    """Ctrl-C reaches the whole process group (agent, link process, staging helper): no traceback, exit 0,
    and the agent's own ``offline`` status (``ts`` = the stop), not the Last Will ``1.5 x keepalive`` later
    (``ts`` = the connect)."""
    fleet = fleet_factory(broker.port, "sig-dev")
    agent = AgentProcess(tmp_path / "state", broker.port, "sig-dev", keys.public, v1)
    with open(agent.log, "wb") as log:  # its own group, as a shell's foreground job: the terminal signals all of it
        agent.proc = subprocess.Popen(agent.args, stdout=log, stderr=log, cwd=ROOT, start_new_session=True)
    try:
        fleet.wait_status(lambda s: s["state"] == "online", 30, "online")
        time.sleep(0.5)  # the link process and the staging helper are up
        sent = time.time()
        os.killpg(agent.proc.pid, signum)
        fleet.wait_status(lambda s: s["state"] == "offline", 3, "offline within about a second")
        arrived = time.time()
        status = fleet.status()
        assert status is not None
        assert arrived - sent < 2.0, f"offline after {arrived - sent:.1f} s: the Last Will, not a clean stop"
        assert status["ts"] >= sent - 0.5, f"ts {status['ts']} is the connection's: the Last Will"
        assert agent.wait_exit(15) == 0, agent.tail()
        log_text = agent.tail(100_000)
        assert "Traceback" not in log_text and "KeyboardInterrupt" not in log_text, log_text
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            os.killpg(agent.proc.pid, signal.SIGKILL)
            agent.proc.wait(10)
