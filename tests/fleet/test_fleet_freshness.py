"""The fleet's signed freshness (fleet/freshness.py): what it signs, its versions, and the retained message a
real device link receives through a real Mosquitto."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "device_runtime" / "agent"))

from agent_parts import Broker, BrokerPool, wait_for  # noqa: E402

from fleet.freshness import FreshnessPublisher  # noqa: E402
from fleet.server import _freshness  # noqa: E402
from fleet.settings import FleetSettings  # noqa: E402
from sdk.errors import InputError  # noqa: E402
from sdk.freshness import verify_freshness  # noqa: E402
from sdk.mqtt_contract import decode_payload, parse_freshness  # noqa: E402
from sdk.signing import KeySigner, generate_keypair  # noqa: E402
from sdk.trustroot import TrustRoot, make_root  # noqa: E402


def _root(timestamp_key: Any) -> TrustRoot:
    other = Ed25519PrivateKey.generate().public_key()
    return make_root(version=4, expires="2099-01-01T00:00:00Z", root_keys=[other], bundle_keys=[other],
                     timestamp_keys=[timestamp_key])  # fmt: skip


def test_documents_verify_and_versions_only_go_up() -> None:
    key = Ed25519PrivateKey.generate()
    sent: list[tuple[str, bytes]] = []
    accept = [True]
    now = [1_800_000_000.0]
    publisher = FreshnessPublisher(
        "plant", KeySigner(key), lambda t, p: bool(sent.append((t, p)) or accept[0]),
        every_s=60, lifetime_s=600, root_version=4, clock=lambda: now[0],
    )  # fmt: skip
    first = publisher.publish_now()
    assert first is not None and sent[0][0] == "edgeship/v1/plant/timestamp"
    root = _root(key.public_key())
    at = datetime.fromtimestamp(now[0], timezone.utc)
    fresh = verify_freshness(parse_freshness(decode_payload(sent[0][1])), root, now=at, current=None)
    assert fresh.version == 1_800_000_000 and fresh.root_version == 4
    assert (fresh.expires_at() - at).total_seconds() == 600
    second = publisher.publish_now()  # the same second: still a higher version
    now[0] -= 3600  # the server's clock jumps back: versions still go up
    third = publisher.publish_now()
    assert first["signed"]["version"] < second["signed"]["version"] < third["signed"]["version"]  # type: ignore[index]
    accept[0] = False  # the broker away: nothing issued is lost, the next one is higher still
    assert publisher.publish_now() is None
    accept[0] = True
    fourth = publisher.publish_now()
    assert fourth is not None and fourth["signed"]["version"] == third["signed"]["version"] + 1  # type: ignore[index]
    with pytest.raises(ValueError, match="below its lifetime"):
        FreshnessPublisher("plant", KeySigner(key), lambda t, p: True, every_s=600, lifetime_s=600)


def test_settings_refuse_a_lifetime_not_above_the_interval(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="freshness_lifetime_s"):
        FleetSettings(state_dir=tmp_path, freshness_interval_s=100, freshness_lifetime_s=50)
    with pytest.raises(InputError, match="no such file"):
        FleetSettings(state_dir=tmp_path, timestamp_key=tmp_path / "missing.key")
    assert _freshness(None, FleetSettings(state_dir=tmp_path)) is None  # type: ignore[arg-type]  # not asked


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    pool = BrokerPool(tmp_path)
    yield pool.make()
    pool.stop_all()


@pytest.mark.timeout(60)
def test_a_device_link_gets_the_retained_freshness_the_server_publishes(mosquitto: Broker, tmp_path: Path) -> None:
    from device_runtime.agent.mqtt import DeviceLink, MqttSettings
    from device_runtime.agent.outbox import Outbox
    from sdk.signing import load_private_key

    private, _ = generate_keypair(tmp_path / "keys", "timestamp")
    settings = FleetSettings(state_dir=tmp_path / "fleet", broker_port=mosquitto.port, broker_protocol="3.1.1",
                             fleet="plant", timestamp_key=private)  # fmt: skip
    component = _freshness(None, settings)  # type: ignore[arg-type]
    assert component is not None
    component.start()
    try:
        # The device connects later: the message is retained.
        got: list[dict[str, Any]] = []
        with Outbox(tmp_path / "o.db") as outbox:
            link = DeviceLink(MqttSettings("127.0.0.1", mosquitto.port, "dev-1", fleet="plant"), outbox,
                              status=lambda: {"state": "online"}, on_command=got.append)  # fmt: skip
            link.start()
            try:
                wait_for(lambda: bool(got), 20, "the retained freshness at the device")
            finally:
                link.stop()
        document = parse_freshness(got[0])
        root = _root(load_private_key(private).public_key())
        fresh = verify_freshness(document, root, now=datetime.now(timezone.utc), current=None)
        assert fresh.expires_at() > datetime.now(timezone.utc)
        assert json.loads(json.dumps(document))["signed"]["_type"] == "edgeship-timestamp"
    finally:
        component.stop()


def test_the_serve_flags_reach_the_settings(tmp_path: Path) -> None:
    from sdk.cli.fleet import _settings
    from sdk.cli.main import build_parser

    private, _ = generate_keypair(tmp_path / "keys", "timestamp")
    args = build_parser().parse_args(
        ["fleet", "serve", "--state-dir", str(tmp_path), "--timestamp-key", str(private),
         "--freshness-interval", "60", "--freshness-lifetime", "600"]
    )  # fmt: skip
    settings = _settings(args)
    assert settings.timestamp_key == private
    assert (settings.freshness_interval_s, settings.freshness_lifetime_s) == (60.0, 600.0)
