"""Real parts for the transport tests: a Mosquitto broker, an HTTP server, an MQTT subscriber.

Nothing here is mocked: the broker is Debian's ``mosquitto`` binary on a free 127.0.0.1 port with a
temporary config and persistence folder; the HTTP server is ``http.server`` in a thread. The fixtures
that hand these out are in ``conftest.py``.
"""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from device_runtime.agent.mqtt import DeviceLink, MqttSettings
from device_runtime.agent.outbox import Outbox

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
DOCS = Path(__file__).resolve().parents[3] / "docs" / "mosquitto"


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.02) -> None:
    """Poll ``condition`` until true; fail the test with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- Mosquitto ---------------------------------------------------------------------------------------


class Broker:
    """A real Mosquitto on 127.0.0.1 with persistence, controlled by the test."""

    def __init__(self, folder: Path, port: int, config: str | None = None) -> None:
        """Write the config; ``config`` replaces the default anonymous loopback one (it must set the listener)."""
        if not Path(MOSQUITTO).exists():
            pytest.fail("mosquitto is not installed: .ci/run must `apt-get install mosquitto` before the tests")
        self.folder = folder
        self.port = port
        self.log = folder / "mosquitto.log"
        self.data = folder / "data"
        self.data.mkdir(exist_ok=True)
        if config is None:
            config = "\n".join(
                [
                    f"listener {port} 127.0.0.1",
                    "allow_anonymous true",
                    "persistence true",
                    f"persistence_location {self.data}/",
                    "autosave_interval 1",
                    "max_queued_messages 100000",
                ]
            )
        self.config = folder / "mosquitto.conf"
        self.config.write_text(
            "\n".join(
                [
                    config,
                    f"log_dest file {self.log}",
                    "log_type all",
                    # Mosquitto started as root drops to user "mosquitto", which cannot write the temp folder.
                    f"user {getpass.getuser()}",
                    "",
                ]
            )
        )
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self._proc is None, "broker already running"
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                log = self.log.read_text() if self.log.exists() else ""
                self._proc = None
                pytest.fail(f"mosquitto exited at start: {err}\n{log[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("mosquitto did not listen within 10 s")
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop gracefully (SIGTERM): Mosquitto saves sessions and queued messages to disk."""
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill9(self) -> None:
        """SIGKILL: no goodbye, only what the last autosave put on disk survives."""
        if self._proc is None:
            return
        self._proc.kill()
        self._proc.wait(timeout=10)
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None


class BrokerPool:
    """The brokers one test makes, each in its own folder under ``root``; ``stop_all()`` after the test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.brokers: list[Broker] = []

    def make(self, start: bool = True, port: int | None = None, config: str | None = None) -> Broker:
        folder = self.root / f"broker{len(self.brokers)}"
        folder.mkdir()
        broker = Broker(folder, port or free_port(), config)
        self.brokers.append(broker)
        if start:
            broker.start()
        return broker

    def stop_all(self) -> None:
        for broker in self.brokers:
            broker.stop()


# -- the device link under test ------------------------------------------------------------------


STATUS = {
    "model": {"name": "clf", "version": 3, "target": "onnxruntime", "sha256": "ab" * 32},
    "runtime": "onnxruntime 1.17.0",
    "capabilities": {"arch": "x86_64", "runtimes": {"onnxruntime": "1.17.0"}, "accelerators": []},
}
LinkMaker = Callable[..., DeviceLink]


@pytest.fixture
def make_link(tmp_path: Path) -> Iterator[LinkMaker]:
    """``make_link(broker, device_id, outbox=None, on_command=None, max_messages=10_000) -> DeviceLink`` (started)."""
    links: list[DeviceLink] = []
    outboxes: list[Outbox] = []

    def make(
        broker: Broker,
        device_id: str,
        *,
        outbox: Outbox | None = None,
        on_command: Callable[[dict[str, Any]], None] | None = None,
        max_messages: int = 10_000,
    ) -> DeviceLink:
        if outbox is None:
            outbox = Outbox(tmp_path / f"{device_id}-{len(outboxes)}.db", max_messages=max_messages)
            outboxes.append(outbox)
        settings = MqttSettings(
            "127.0.0.1", broker.port, device_id, keepalive_s=5, backoff_base_s=0.05, backoff_cap_s=0.3
        )
        link = DeviceLink(settings, outbox, status=lambda: STATUS, on_command=on_command)
        links.append(link)
        link.start()
        return link

    yield make
    for link in links:
        link.stop()
    for outbox in outboxes:
        outbox.close()


# -- an MQTT subscriber standing in for the fleet ---------------------------------------------------


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Subscriber:
    """A paho client with a persistent session (QoS 1) that records every message it receives."""

    client: paho.Client
    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    subscribed: threading.Event = field(default_factory=threading.Event)

    def on(self, topic: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if m.topic == topic]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=5)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- HTTP ----------------------------------------------------------------------------------------------


@dataclass
class HttpState:
    """What the test HTTP server serves, and what it saw.

    Modes: ``normal`` (honours Range), ``drop`` (first request: cut the connection halfway),
    ``trickle`` (a byte every ``trickle_s``), ``ignore_range`` (always 200 and the whole body),
    ``bad_range`` (206 whose Content-Range always starts at 0), ``oversized`` (no Content-Length,
    ``body`` followed by extra bytes), ``lying_length`` (announces ``2**40`` bytes),
    ``error_then_ok`` (the first ``errors`` requests answer 500), ``not_found`` (404).
    """

    body: bytes = b""
    mode: str = "normal"
    trickle_s: float = 0.05
    errors: int = 1
    requests: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ranges(self) -> list[str | None]:
        with self.lock:
            return [r.get("range") for r in self.requests]


def make_handler(state: HttpState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection; a body may end at close

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            with state.lock:
                state.requests.append({k.lower(): v for k, v in self.headers.items()})
                number = len(state.requests)
            body, mode = state.body, state.mode
            if mode == "not_found":
                self.send_error(404)
                return
            if mode == "error_then_ok" and number <= state.errors:
                self.send_error(500)
                return
            if mode == "lying_length":
                self._send(200, body, {"Content-Length": str(2**40)})
                return
            if mode == "oversized":
                self._send(200, body + b"x" * len(body), {})
                return
            start = self._range_start()
            if mode in ("ignore_range", "trickle") or start is None:
                status, start = 200, 0
            else:
                status = 206
            shown_start = 0 if mode == "bad_range" else start
            part = body[start:]
            headers = {"Content-Length": str(len(part))}
            if status == 206:
                headers["Content-Range"] = f"bytes {shown_start}-{shown_start + len(part) - 1}/{len(body)}"
            if mode == "drop" and number == 1:
                self._send(status, part[: len(part) // 2], headers)
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if mode == "trickle":
                self._send(status, part, headers, trickle_s=state.trickle_s)
                return
            self._send(status, part, headers)

        def _range_start(self) -> int | None:
            value = self.headers.get("Range")
            if not value or not value.startswith("bytes=") or not value.endswith("-"):
                return None
            return int(value[len("bytes=") : -1])

        def _send(self, status: int, payload: bytes, headers: dict[str, str], trickle_s: float = 0.0) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            try:
                if trickle_s:
                    for i in range(len(payload)):
                        self.wfile.write(payload[i : i + 1])
                        self.wfile.flush()
                        time.sleep(trickle_s)
                else:
                    self.wfile.write(payload)
            except OSError:
                pass  # the client gave up

    return Handler


@dataclass
class HttpServer:
    state: HttpState
    url: str


# -- fixtures shared by the agent and OTA tests (imported by both conftest.py files) ------------------


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """``broker_factory(start=True, port=None, config=None) -> Broker``; all are stopped after the test."""
    pool = BrokerPool(tmp_path)
    yield pool.make
    pool.stop_all()


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    """A running anonymous Mosquitto with persistence."""
    return broker_factory()


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    """A ThreadingHTTPServer on 127.0.0.1 serving ``/bundle`` according to ``server.state``."""
    state = HttpState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield HttpServer(state, f"http://127.0.0.1:{server.server_address[1]}/bundle")
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
