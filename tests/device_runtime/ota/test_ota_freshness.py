"""Signed freshness on a real agent and broker (issue 14, 4: freeze): the fleet's retained, signed,
short-lived timestamp; the device refuses forged, below-threshold and older ones, reports itself stale
when the newest valid one expires, and keeps serving its model."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from agent_parts import Broker, wait_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ota_parts import FLEET, Fleet, assert_serves_v
from runtime_bundles import Keys

from device_runtime.agent import Agent
from sdk.freshness import make_freshness, sign_freshness
from sdk.mqtt_contract import Topics, freshness_payload
from sdk.signing import load_public_key
from sdk.trustroot import make_root, sign_root

pytestmark = pytest.mark.timeout(120)


def _freshness(
    version: int, keys: list[Ed25519PrivateKey], lifetime_s: float = 3600, ago_s: float = 1, **kw: Any
) -> dict[str, Any]:
    issued = datetime.now(timezone.utc) - timedelta(seconds=ago_s)
    return json.loads(sign_freshness(make_freshness(version, issued, timedelta(seconds=lifetime_s), **kw), keys))


def _publish_retained(fleet: Fleet, document: dict[str, Any]) -> None:
    """What the fleet server does: the retained message on the fleet-wide freshness topic."""
    body = json.dumps(freshness_payload(document)).encode()
    info = fleet.client.publish(Topics(FLEET, fleet.device_id).freshness, body, qos=1, retain=True)
    info.wait_for_publish(timeout=5)


def _send(fleet: Fleet, cmd_id: str, document: dict[str, Any]) -> dict[str, Any]:
    """The same message on the device's cmd topic, with an id (so its refusal can be waited for)."""
    fleet.send({**freshness_payload(document), "id": cmd_id})
    return fleet.wait_phase(cmd_id, "failed", 10)


def _own_events(fleet: Fleet, error: str | None = None, phase: str | None = None) -> list[dict[str, Any]]:
    return [
        e for e in fleet.events()
        if e["cmd_id"] is None and (error is None or e["detail"].get("error") == error)
        and (phase is None or e["phase"] == phase)
    ]  # fmt: skip


def _freshness_state(fleet: Fleet) -> dict[str, Any] | None:
    status = fleet.status()
    return None if status is None else status.get("trust", {}).get("freshness")


def _install_root(agent: Agent, fleet: Fleet, keys: Keys, timestamp: list[Ed25519PrivateKey]) -> Ed25519PrivateKey:
    root_key = Ed25519PrivateKey.generate()
    root = make_root(
        version=1, expires="2099-01-01T00:00:00Z", root_keys=[root_key.public_key()],
        bundle_keys=[load_public_key(keys.public)], timestamp_keys=[k.public_key() for k in timestamp],
        timestamp_threshold=len(timestamp),
    )  # fmt: skip
    document = json.loads(sign_root(root, [root_key, keys.private]))
    fleet.send({"schema": 1, "id": "root-1", "type": "trust", "root": document})
    fleet.wait_phase("root-1", "applied", 10)
    return root_key


def test_fresh_then_stale_then_fresh_and_every_refusal(
    online: Callable[..., tuple[Agent, Fleet]], agent_factory: Callable[..., Agent], keys: Keys, broker: Broker
) -> None:
    agent, fleet = online(telemetry_interval_s=0.3)
    assert "freshness" not in agent.trust_status()  # the implicit root asks for none
    ts = [Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()]  # threshold 2
    _install_root(agent, fleet, keys, ts)
    fleet.wait_status(lambda s: s["trust"].get("freshness", {}).get("state") == "missing", what="missing")

    short = _freshness(100, ts, lifetime_s=4, root_version=2)
    _publish_retained(fleet, short)
    fleet.wait_status(lambda s: s["trust"]["freshness"]["state"] == "fresh", what="fresh")
    state = _freshness_state(fleet)
    assert state is not None and state["version"] == 100 and state["root_behind"] is True  # the fleet has root v2

    # Nothing newer comes (a freeze): the device says so, and keeps serving.
    wait_for(lambda: _own_events(fleet, "FreshnessStale"), 15, "the stale event")
    stale = _own_events(fleet, "FreshnessStale")[0]
    assert stale["phase"] == "failed" and short["signed"]["expires"] in stale["detail"]["message"]
    fleet.wait_status(lambda s: s["trust"]["freshness"]["state"] == "stale", what="stale")
    assert _freshness_state(fleet)["stale_since"] == short["signed"]["expires"]  # type: ignore[index]
    assert_serves_v(agent, 1)

    # Refused, each leaving the device's freshness as it was: forged, below threshold, older (a replay).
    held = (agent.state_dir / "timestamp.json").read_bytes()
    forged = _send(fleet, "forged", _freshness(101, [Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()]))
    assert forged["detail"]["error"] == "FreshnessError" and "0 valid signature" in forged["detail"]["message"]
    below = _send(fleet, "below", _freshness(101, ts[:1]))
    assert "1 valid signature" in below["detail"]["message"]
    older = _send(fleet, "older", _freshness(99, ts))
    assert "replay" in older["detail"]["message"]
    expired = _send(fleet, "expired", _freshness(101, ts, lifetime_s=60, ago_s=600))
    assert "expired" in expired["detail"]["message"]
    assert (agent.state_dir / "timestamp.json").read_bytes() == held
    assert agent.trust_status()["freshness"]["state"] == "stale"

    # The fleet is back: a newer valid one makes the device fresh again (reported).
    _publish_retained(fleet, _freshness(101, ts))
    wait_for(lambda: _own_events(fleet, phase="applied"), 10, "the fresh-again event")
    fleet.wait_status(lambda s: s["trust"]["freshness"]["state"] == "fresh", what="fresh again")

    # The version floor survives a restart: the older one is still refused (the retained 101 is not news).
    agent.stop()
    again = agent_factory(broker.port, state_dir=agent.state_dir)
    wait_for(lambda: (again.trust_status()["freshness"] or {}).get("version") == 101, 10, "freshness kept")
    assert _send(fleet, "older-after-restart", _freshness(100, ts))["detail"]["error"] == "FreshnessError"
    assert again.trust_status()["freshness"]["state"] == "fresh"


def test_a_device_without_a_timestamp_role_behaves_as_before(
    online: Callable[..., tuple[Agent, Fleet]],
) -> None:
    agent, fleet = online()
    _publish_retained(fleet, _freshness(1, [Ed25519PrivateKey.generate()]))  # for the devices that ask
    refused = _send(fleet, "unasked", _freshness(1, [Ed25519PrivateKey.generate()]))
    assert refused["detail"]["error"] == "FreshnessError" and "no timestamp role" in refused["detail"]["message"]
    assert "freshness" not in agent.trust_status()
    assert not (agent.state_dir / "timestamp.json").exists()
    assert not [e for e in _own_events(fleet) if str(e["detail"].get("error")).startswith("Freshness")]
    assert_serves_v(agent, 1)
