"""The fleet server against a real Mosquitto that speaks TLS only, with a private CA and client certificates.

The ingest and the command publisher must connect with the same settings: a publisher that verified the
broker against the system's CAs (as it once did) never connected, so no deploy or rollback reached a
device while the ingest worked.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from tls_parts import Pki, make_pki, mosquitto_tls_config

from fleet.db import Database
from fleet.rollouts.driver import PahoPublisher
from fleet.server import _ingest
from fleet.settings import FleetSettings
from fleet.wiring import rollout_driver
from sdk.errors import TransportError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "device_runtime" / "agent"))
from agent_parts import Broker, free_port


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    folder, port = tmp_path / "broker", free_port()
    folder.mkdir()
    broker = Broker(folder, port, mosquitto_tls_config(port, pki, folder / "data"))
    broker.start()
    yield broker
    broker.stop()


def subscriber(port: int, pki: Pki, got: list[tuple[str, Any]]) -> paho.Client:
    """A device-like TLS client (its own certificate) that records the fleet's commands."""
    ready = threading.Event()
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="tls-sub")
    sub.tls_set(ca_certs=str(pki.ca), certfile=str(pki.client_cert), keyfile=str(pki.client_key))
    sub.on_connect = lambda c, *_a: (c.subscribe("edgeship/v1/lab/+/cmd", qos=1), ready.set())
    sub.on_message = lambda _c, _u, m: got.append((m.topic, json.loads(m.payload)))
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    assert ready.wait(10), "the test's own TLS subscriber did not connect"
    time.sleep(0.2)
    return sub


def wait_for(predicate: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_the_ingest_and_the_command_publisher_both_reach_a_broker_with_a_private_ca_and_mutual_tls(
    tmp_path: Path, pki: Pki, tls_broker: Broker, sqlite_db: Database
) -> None:
    settings = FleetSettings.from_env_and_args(
        {
            "state_dir": tmp_path / "state", "broker": f"mqtts://127.0.0.1:{tls_broker.port}", "fleet": "lab",
            "broker_ca_file": pki.ca, "broker_cert_file": pki.client_cert, "broker_key_file": pki.client_key,
            "mqtt_client_id": "fleet-tls", "share_group": "none",
        },
        env={},
    )  # fmt: skip
    got: list[tuple[str, Any]] = []
    sub = subscriber(tls_broker.port, pki, got)
    ingest = _ingest(sqlite_db, settings)
    assert ingest is not None
    driver = rollout_driver(sqlite_db, settings)
    try:
        ingest.start()
        assert ingest.wait_connected(10), "the ingest did not connect"  # type: ignore[attr-defined]
        publisher = driver.publisher
        assert isinstance(publisher, PahoPublisher)
        assert wait_for(lambda: publisher.connected), (
            "the command publisher did not connect: " + (tls_broker.log.read_text()[-1500:])
        )
        command = {"schema": 1, "id": "ro1-dev1-rollback", "type": "rollback"}
        publisher.publish("dev1", command)
        assert wait_for(lambda: got)
    finally:
        driver.publisher.close()  # type: ignore[attr-defined]
        ingest.stop()
        sub.loop_stop()
        sub.disconnect()
    assert got == [("edgeship/v1/lab/dev1/cmd", command)]


def test_the_publisher_is_refused_without_the_ca_or_without_its_certificate(pki: Pki, tls_broker: Broker) -> None:
    # the system's CAs do not know the private CA: the TLS handshake fails
    with pytest.raises(TransportError):
        PahoPublisher("127.0.0.1", tls_broker.port, "lab", client_id="no-ca", tls=True, timeout_s=2)
    # the CA alone: the broker requires a client certificate
    with pytest.raises(TransportError):
        PahoPublisher("127.0.0.1", tls_broker.port, "lab", client_id="no-cert", ca_file=str(pki.ca), timeout_s=2)
    publisher = PahoPublisher(
        "127.0.0.1", tls_broker.port, "lab", client_id="mtls", ca_file=str(pki.ca), cert_file=str(pki.client_cert),
        key_file=str(pki.client_key), protocol="5",
    )  # fmt: skip
    assert publisher.connected
    publisher.close()
