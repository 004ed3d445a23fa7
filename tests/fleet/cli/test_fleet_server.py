"""`edgeship fleet serve`: migrate (with retry), bind, start components, serve, stop everything; for real."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fleet.db import Database
from fleet.server import FleetServer, migrate_with_retry
from fleet.settings import FleetSettings
from sdk.errors import EdgeshipError, TransportError

ROOT = Path(__file__).resolve().parents[3]


class Recorder:
    """A component that runs a real thread and writes what happened to a shared log."""

    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._stop.wait, daemon=True)

    def start(self) -> None:
        if self.fail:
            raise RuntimeError("broker said no")
        self._thread.start()
        self.log.append(f"start {self.name}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.log.append(f"stop {self.name}")


def _run_in_thread(server: FleetServer) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            server.run()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def test_serves_the_api_and_stops_components_in_reverse(tmp_path: Path) -> None:
    log: list[str] = []
    lines: list[str] = []
    components = [("a", lambda db, s: Recorder("a", log)), ("none", lambda db, s: None),
                  ("b", lambda db, s: Recorder("b", log))]  # fmt: skip
    server = FleetServer(FleetSettings(state_dir=tmp_path, http_port=0), components, announce=lines.append)
    thread, errors = _run_in_thread(server)
    deadline = time.monotonic() + 20
    while not (server._uvicorn is not None and server._uvicorn.started):
        assert time.monotonic() < deadline and not errors, errors
        time.sleep(0.05)
    url = server.settings.server_url
    assert server.settings.http_port != 0 and lines[0].startswith(f"edgeship fleet serving {url} ")
    assert "components: a, b" in lines[0]
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/openapi.json").json()["info"]["title"] == "edgeship fleet"
    assert server.settings.artifacts_url == url
    server.request_stop()
    thread.join(20)
    assert not thread.is_alive() and errors == []
    assert log == ["start a", "start b", "stop b", "stop a"]
    assert (tmp_path / "fleet.db").is_file()


def test_a_component_that_fails_to_start_stops_the_others(tmp_path: Path) -> None:
    log: list[str] = []
    components = [("ingest", lambda db, s: Recorder("ingest", log)),
                  ("rollouts", lambda db, s: Recorder("rollouts", log, fail=True))]  # fmt: skip
    server = FleetServer(FleetSettings(state_dir=tmp_path, http_port=0), components, announce=lambda _: None)
    with pytest.raises(EdgeshipError, match="rollouts failed to start: broker said no"):
        server.run()
    assert log == ["start ingest", "stop ingest"]


def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    log: list[str] = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = FleetServer(FleetSettings(state_dir=tmp_path, http_port=port),
                             [("a", lambda db, s: Recorder("a", log))], announce=lambda _: None)  # fmt: skip
        with pytest.raises(TransportError, match=f"cannot listen on 127.0.0.1:{port}"):
            server.run()
    assert log == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_database_is_retried_then_reported_without_its_password(tmp_path: Path) -> None:
    url = f"postgresql://fleet:hunter2@127.0.0.1:{_free_port()}/fleet"
    settings = FleetSettings(state_dir=tmp_path, db_url=url, db_wait_s=1.5, http_port=0)
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        FleetServer(settings, [], announce=lambda _: None).run()
    assert 1.4 < time.monotonic() - started < 10
    message = str(caught.value)
    assert "hunter2" not in message and "fleet:***@127.0.0.1" in message
    attempts = re.search(r"unreachable after (\d+) attempts: ", message)
    assert attempts and int(attempts.group(1)) >= 2 and "refused" in message.lower()


def test_start_up_waits_for_a_database_that_appears(tmp_path: Path) -> None:
    folder = tmp_path / "later"  # SQLite cannot open a file in a folder that does not exist yet
    db = Database(f"sqlite:///{folder}/fleet.db")
    timer = threading.Timer(0.5, folder.mkdir)
    timer.start()
    try:
        migrate_with_retry(db, 10)
    finally:
        timer.cancel()
        db.close()
    assert (folder / "fleet.db").is_file()


def test_a_stop_while_waiting_for_the_database_ends_the_wait(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/missing/fleet.db")
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(TransportError, match="stopped while waiting for database"):
        migrate_with_retry(db, 60, stop=stop)
    assert time.monotonic() - started < 5
    db.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_serve_command_prints_its_url_and_stops_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdk.cli", "fleet", "serve", "--port", "0", "--state-dir", str(tmp_path),
         "--fleet", "plant-7", "--broker", "127.0.0.1:1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("edgeship fleet serving http://127.0.0.1:"), line + proc.stderr.read()
        assert "fleet 'plant-7'" in line
        url = line.split()[3]
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        proc.send_signal(sig)
        assert proc.wait(20) == 0
        assert "edgeship fleet stopped" in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_serve_command_refuses_bad_settings_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGESHIP_FLEET_LEASE_S": "-1"}
    result = subprocess.run(
        [sys.executable, "-m", "sdk.cli", "fleet", "serve", "--state-dir", str(tmp_path), "--trust", "nope.pub"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("error: fleet settings: ") and result.stderr.count("\n") == 1
    assert "lease_s must be > 0" in result.stderr and "no such file: nope.pub" in result.stderr
