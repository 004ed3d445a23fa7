"""The production ACL example (docs/mosquitto) on a real Mosquitto: devices are fenced into their own topics."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from agent_parts import DOCS, MOSQUITTO_PASSWD, Broker, Received, free_port, wait_for
from paho.mqtt.enums import CallbackAPIVersion

from device_runtime.agent.mqtt import DeviceLink, MqttSettings, Topics
from device_runtime.agent.outbox import Outbox

pytestmark = pytest.mark.timeout(60)

PASSWORDS = {"fleet": "fleet-secret", "devA": "a-secret", "devB": "b-secret"}
TLS_LINES = ("certfile", "keyfile", "cafile", "tls_version", "require_certificate", "use_identity_as_username")


def production_config(folder: Path, port: int) -> str:
    """docs/mosquitto/mosquitto.conf with its TLS listener swapped for loopback and its paths moved to ``folder``."""
    if not Path(MOSQUITTO_PASSWD).exists():
        pytest.fail("mosquitto_passwd is missing: .ci/run must `apt-get install mosquitto` before the tests")
    passwd = folder / "passwd"
    for i, (user, password) in enumerate(PASSWORDS.items()):
        create = ["-c"] if i == 0 else []
        subprocess.run([MOSQUITTO_PASSWD, *create, "-b", str(passwd), user, password], check=True, timeout=30)
    lines = []
    for line in (DOCS / "mosquitto.conf").read_text().splitlines():
        key = line.split(" ", 1)[0]
        if not line.strip() or line.startswith("#") or key in TLS_LINES or key in ("log_dest", "log_type"):
            continue
        replacements = {
            "listener": f"listener {port} 127.0.0.1",
            "password_file": f"password_file {passwd}",
            "acl_file": f"acl_file {DOCS / 'acl'}",
            "persistence_location": f"persistence_location {folder / 'data'}/",
        }
        lines.append(replacements.get(key, line))
    assert "allow_anonymous false" in lines
    return "\n".join(lines)


class Client:
    """A bare paho client logged in as someone, recording what it receives."""

    def __init__(self, port: int, user: str, password: str | None = None) -> None:
        self.received: list[Received] = []
        self.granted: list[Any] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{user}-{time.monotonic_ns()}")
        self.client.username_pw_set(user, password if password is not None else PASSWORDS[user])
        self.client.on_message = lambda c, u, m: self.received.append(Received(m.topic, bytes(m.payload), m.retain))
        self.client.on_subscribe = lambda c, u, mid, reasons, p: self.granted.extend(reasons)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def subscribe(self, topic: str) -> None:
        before = len(self.granted)
        self.client.subscribe(topic, qos=1)
        wait_for(lambda: len(self.granted) > before, 5, f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=5)

    def topics(self) -> list[str]:
        return [m.topic for m in self.received]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_devices_are_fenced_into_their_own_topics(broker_factory: Callable[..., Broker], tmp_path: Path) -> None:
    folder = tmp_path / "prod"
    folder.mkdir()
    (folder / "data").mkdir()
    port = free_port()
    broker = broker_factory(port=port, config=production_config(folder, port))
    a, b = Topics("default", "devA"), Topics("default", "devB")
    fleet = Client(port, "fleet")
    raw_a = Client(port, "devA")
    links: list[DeviceLink] = []
    try:
        fleet.subscribe("edgeship/v1/#")
        for device in ("devA", "devB"):
            settings = MqttSettings(
                "127.0.0.1", port, device, username=device, password=PASSWORDS[device], backoff_base_s=0.05
            )
            got: list[dict[str, Any]] = []
            link = DeviceLink(settings, Outbox(tmp_path / f"{device}.db"), status=dict, on_command=got.append)
            link.got = got  # type: ignore[attr-defined]
            link.start()
            assert link.wait_connected(10), f"{device} could not log in"
            links.append(link)
        link_a, link_b = links

        # A publishes its own telemetry (and status): the fleet gets it.
        link_a.publish_telemetry({"count": 1})
        wait_for(lambda: a.telemetry in fleet.topics(), 5, "A's own telemetry at the fleet")
        wait_for(lambda: a.status in fleet.topics(), 5, "A's status at the fleet")

        # A publishes as B, then a marker as itself: the marker arrives, the forgery never does.
        raw_a.publish(b.telemetry, b'{"schema":1,"seq":999,"forged":true}')
        raw_a.publish(b.status, b'{"schema":1,"state":"offline","forged":true}')
        raw_a.publish(a.cmd, b'{"id":"self-cmd","type":"ping"}')  # devices may not write commands either
        raw_a.publish(a.events, b'{"schema":1,"cmd_id":"marker","phase":"received"}')
        wait_for(lambda: a.events in fleet.topics(), 5, "A's marker event")
        time.sleep(0.2)
        assert b.telemetry not in fleet.topics()  # B itself published no telemetry
        assert a.cmd not in fleet.topics()
        assert not [m for m in fleet.received if b"forged" in m.payload]

        # A tries to read B's commands, directly and by wildcard; the fleet commands both devices.
        raw_a.subscribe(b.cmd)
        raw_a.subscribe("edgeship/v1/+/+/cmd")
        raw_a.subscribe(a.cmd)
        fleet.publish(b.cmd, b'{"id":"for-b","type":"ping"}')
        fleet.publish(a.cmd, b'{"id":"for-a","type":"ping"}')
        wait_for(lambda: a.cmd in raw_a.topics(), 5, "A's own command at A")
        wait_for(lambda: link_b.got, 5, "B's command at B")  # type: ignore[attr-defined]
        wait_for(lambda: link_a.got, 5, "A's command at A's link")  # type: ignore[attr-defined]
        time.sleep(0.2)
        assert b.cmd not in raw_a.topics()
        assert link_b.got == [{"id": "for-b", "type": "ping"}]  # type: ignore[attr-defined]
        assert link_a.got == [{"id": "for-a", "type": "ping"}]  # type: ignore[attr-defined]
    finally:
        for link in links:
            link.stop()
        fleet.close()
        raw_a.close()
        broker.stop()


def test_wrong_password_is_refused_and_retried(broker_factory: Callable[..., Broker], tmp_path: Path) -> None:
    folder = tmp_path / "prod"
    folder.mkdir()
    (folder / "data").mkdir()
    port = free_port()
    broker_factory(port=port, config=production_config(folder, port))
    settings = MqttSettings("127.0.0.1", port, "devA", username="devA", password="wrong", backoff_base_s=0.05)
    with Outbox(tmp_path / "a.db") as outbox, DeviceLink(settings, outbox, status=dict) as link:
        wait_for(lambda: link.counters.connect_failures >= 2, 10, "refused connection attempts")
        assert not link.connected and link.counters.connects == 0


def test_only_the_fleet_writes_the_freshness_devices_read(
    broker_factory: Callable[..., Broker], tmp_path: Path
) -> None:
    """The fleet-wide freshness topic under the production ACL: the fleet's retained message reaches a
    device's link; a device's own publish there is dropped by the broker (it could only replay old signed
    ones anyway, which the device refuses)."""
    folder = tmp_path / "prod"
    folder.mkdir()
    (folder / "data").mkdir()
    port = free_port()
    broker = broker_factory(port=port, config=production_config(folder, port))
    topic = Topics("default", "devA").freshness
    fleet, raw_b = Client(port, "fleet"), Client(port, "devB")
    got: list[dict[str, Any]] = []
    settings = MqttSettings("127.0.0.1", port, "devA", username="devA", password=PASSWORDS["devA"])
    link = DeviceLink(settings, Outbox(tmp_path / "a.db"), status=dict, on_command=got.append)
    try:
        fleet.client.publish(topic, b'{"schema":1,"type":"timestamp","from":"fleet"}', qos=1, retain=True)
        time.sleep(0.2)
        forged = raw_b.client.publish(topic, b'{"schema":1,"type":"timestamp","forged":true}', qos=1, retain=True)
        forged.wait_for_publish(timeout=5)  # the broker acknowledges it, and drops it (ACL)
        link.start()  # after the publishes: the retained message is what arrives
        assert link.wait_connected(10)
        wait_for(lambda: got, 5, "the fleet's retained freshness at the device")
        time.sleep(0.3)
        assert got == [{"schema": 1, "type": "timestamp", "from": "fleet"}]
    finally:
        link.stop()
        fleet.close()
        raw_b.close()
        broker.stop()
