"""Fixtures handing out the real parts of ``agent_parts``: subscribers here; the broker and HTTP server
fixtures are defined in ``agent_parts`` (the OTA tests import them too)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from agent_parts import (  # noqa: F401  (shared fixtures)
    Broker,
    Received,
    Subscriber,
    broker,
    broker_factory,
    http_server,
    make_link,
)
from paho.mqtt.enums import CallbackAPIVersion


@pytest.fixture
def subscribe() -> Iterator[Callable[..., Subscriber]]:
    """``subscribe(broker, topic, client_id=..., username=..., password=...) -> Subscriber`` (connected)."""
    made: list[Subscriber] = []

    def make(
        on: Broker, topic: str, *, client_id: str = "", username: str | None = None, password: str | None = None
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
        client.connect("127.0.0.1", on.port, keepalive=10)
        client.loop_start()
        made.append(sub)
        assert sub.subscribed.wait(5), "test subscriber did not get its SUBACK"
        return sub

    yield make
    for sub in made:
        sub.close()
