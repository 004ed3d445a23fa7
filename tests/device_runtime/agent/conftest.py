"""Fixtures handing out the real parts of ``agent_parts``: Mosquitto brokers, subscribers, an HTTP server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from agent_parts import Broker, BrokerPool, HttpServer, HttpState, Received, Subscriber, make_handler
from paho.mqtt.enums import CallbackAPIVersion


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
def subscribe() -> Iterator[Callable[..., Subscriber]]:
    """``subscribe(broker, topic, client_id=..., username=..., password=...) -> Subscriber`` (connected)."""
    made: list[Subscriber] = []

    def make(
        broker: Broker, topic: str, *, client_id: str = "", username: str | None = None, password: str | None = None
    ) -> Subscriber:
        client_id = client_id or f"test-sub-{len(made)}-{time.monotonic_ns()}"
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]  # floats work; paho types int
        if username is not None:
            client.username_pw_set(username, password)
        sub = Subscriber(client)

        def on_connect(c: paho.Client, u: object, flags: Any, reason: Any, props: Any) -> None:
            if not reason.is_failure:
                c.subscribe(topic, qos=1)

        def on_subscribe(c: paho.Client, u: object, mid: int, reasons: Any, props: Any) -> None:
            sub.subscribed.set()

        def on_message(c: paho.Client, u: object, msg: paho.MQTTMessage) -> None:
            with sub.lock:
                sub.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect("127.0.0.1", broker.port, keepalive=10)
        client.loop_start()
        made.append(sub)
        assert sub.subscribed.wait(5), "test subscriber did not get its SUBACK"
        return sub

    yield make
    for sub in made:
        sub.close()


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
