"""A device stand-in that speaks the contract over real MQTT (paho), and a started ``Ingest`` maker."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from agent_parts import Broker, wait_for
from fleet_parts import FLEET
from paho.mqtt.enums import CallbackAPIVersion

from fleet.db import Database
from fleet.ingest import Ingest, IngestSettings
from sdk.mqtt_contract import Topics, client_id, encode_payload

_ids = itertools.count()


class FakeDevice:
    """Publishes on one device's topics, QoS 1, each publish acknowledged by the broker before returning."""

    def __init__(self, broker: Broker, device_id: str, fleet: str = FLEET) -> None:
        self.topics = Topics(fleet, device_id)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{client_id(device_id)}-{next(_ids)}")
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def send(self, leaf: str, payload: dict[str, Any] | bytes, *, retain: bool = False, topic: str = "") -> None:
        data = payload if isinstance(payload, bytes) else encode_payload(payload)
        info = self.client.publish(topic or getattr(self.topics, leaf), data, qos=1, retain=retain)
        info.wait_for_publish(timeout=10)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def settings(broker: Broker, **overrides: Any) -> IngestSettings:
    values: dict[str, Any] = {
        "port": broker.port, "fleet": FLEET, "share_group": "fleet", "client_id": f"ingest-{next(_ids)}",
        "reconnect_base_s": 0.05, "reconnect_cap_s": 0.5, "retry_base_s": 0.05, "retry_cap_s": 0.3,
    }  # fmt: skip
    values.update(overrides)
    return IngestSettings(**values)


@pytest.fixture
def ingest_factory() -> Iterator[Callable[..., Ingest]]:
    """``ingest_factory(db, broker, **settings) -> Ingest``, started and subscribed; stopped after the test."""
    made: list[Ingest] = []

    def make(db: Database, broker: Broker, **overrides: Any) -> Ingest:
        ingest = Ingest(db, settings(broker, **overrides))
        ingest.start()
        made.append(ingest)
        assert ingest.wait_connected(10), "ingest did not connect"
        return ingest

    yield make
    for ingest in made:
        ingest.stop()


@pytest.fixture
def device_factory(broker: Broker) -> Iterator[Callable[[str], FakeDevice]]:
    made: list[FakeDevice] = []

    def make(device_id: str) -> FakeDevice:
        device = FakeDevice(broker, device_id)
        made.append(device)
        return device

    yield make
    for device in made:
        device.close()


__all__ = ["FakeDevice", "device_factory", "ingest_factory", "settings", "wait_for"]
