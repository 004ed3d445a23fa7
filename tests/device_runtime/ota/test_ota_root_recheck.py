"""Installed bundles checked again against a new trust root (issue 14, key revocation), on a real agent.

When a root revokes the key that signed a slot's bundle, the agent reports the slot, never rolls back to
it, and leaves an untrusted active slot for the other one if that one is trusted (TUF: what a revoked key
signed is not used); with no trusted slot it keeps serving (never nothing) and says so. The same at boot.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from agent_parts import Broker, HttpServer, wait_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ota_parts import Fleet, assert_serves_v, deploy_cmd, serve
from runtime_bundles import BundleMaker, Keys

from device_runtime.agent import Agent
from sdk.signing import load_public_key
from sdk.trustroot import make_root, sign_root

pytestmark = pytest.mark.timeout(120)
LATER = "2099-01-01T00:00:00Z"


def _trust(fleet: Fleet, cmd_id: str, version: int, root_keys: list[Ed25519PrivateKey], bundle_keys: list[Any],
           signers: list[Any]) -> None:  # fmt: skip
    root = make_root(version=version, expires=LATER, root_keys=[k.public_key() for k in root_keys],
                     bundle_keys=bundle_keys)  # fmt: skip
    fleet.send({"schema": 1, "id": cmd_id, "type": "trust", "root": json.loads(sign_root(root, signers))})
    fleet.wait_phase(cmd_id, "applied", 10)


def _untrusted(fleet: Fleet) -> list[dict[str, Any]]:
    return [e for e in fleet.events() if e["cmd_id"] is None and e["detail"].get("error") == "Untrusted"]


def _setup(
    broker: Broker, agent_factory: Callable[..., Agent], fleet_factory: Callable[..., Fleet],
    make_bundle: BundleMaker, http_server: HttpServer, keys: Keys, *, co_signed: bool,
) -> tuple[Agent, Fleet, Ed25519PrivateKey, Ed25519PrivateKey]:  # fmt: skip
    """v1 (the release key, and the second key when ``co_signed``) in the standby slot, v2 (the release key
    only) active, root v1 trusting the release key and a second bundle key."""
    root_key, second = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    fleet = fleet_factory(broker.port)
    agent = agent_factory(broker.port, make_bundle(version=1, signers=[keys.private, *([second] * co_signed)]))
    fleet.wait_status(lambda s: s["state"] == "online" and s["model"] is not None, what="online")
    release = load_public_key(keys.public)
    _trust(fleet, "root-1", 1, [root_key], [release, second.public_key()], [root_key, keys.private])
    v2 = make_bundle(version=2)
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "d2"))
    fleet.wait_phase("d2", "active", 30)
    wait_for(lambda: agent.wait_idle(1), 15, "idle")
    assert agent.trust_status().get("unverified_slots") is None
    return agent, fleet, root_key, second


def test_revoking_the_active_bundles_key_falls_back_to_the_trusted_slot(
    broker: Broker, agent_factory: Callable[..., Agent], fleet_factory: Callable[..., Fleet],
    make_bundle: BundleMaker, http_server: HttpServer, keys: Keys,
) -> None:  # fmt: skip
    # v1 is co-signed by the second key, which root v2 keeps; v2 only by the release key, which it revokes.
    agent, fleet, root_key, second = _setup(
        broker, agent_factory, fleet_factory, make_bundle, http_server, keys, co_signed=True
    )
    active_slot = agent.active_slot
    _trust(fleet, "root-2", 2, [root_key], [second.public_key()], [root_key])
    wait_for(lambda: agent.wait_idle(1), 15, "idle")
    assert_serves_v(agent, 1)  # the revoked key's v2 no longer serves
    rolled = [e for e in _untrusted(fleet) if e["phase"] == "rolled_back"]
    assert rolled and rolled[0]["detail"]["model"]["version"] == 1
    assert any(e["phase"] == "failed" and e["detail"]["slot"] == active_slot for e in _untrusted(fleet))
    pointer = json.loads((agent.state_dir / "pointer.json").read_bytes())
    assert pointer["active"] != active_slot and pointer["floors"]["linear"] == 2  # the floor is not lowered
    assert list(agent.trust_status()["unverified_slots"]) == [active_slot]
    fleet.wait_status(lambda s: s["trust"].get("unverified_slots") is not None, what="reported in the status")
    # ...and the untrusted slot is never rolled back to.
    fleet.send({"schema": 1, "id": "back", "type": "rollback"})
    assert fleet.wait_phase("back", "failed", 30)["detail"]["error"] == "Untrusted"
    assert_serves_v(agent, 1)
    # At boot: the untrusted standby is reported again, the trusted active one serves.
    agent.stop()
    again = agent_factory(broker.port, state_dir=agent.state_dir)
    assert_serves_v(again, 1)
    assert list(again.trust_status()["unverified_slots"]) == [active_slot]


def test_with_no_trusted_slot_the_active_one_keeps_serving_reported(
    broker: Broker, agent_factory: Callable[..., Agent], fleet_factory: Callable[..., Fleet],
    make_bundle: BundleMaker, http_server: HttpServer, keys: Keys,
) -> None:  # fmt: skip
    agent, fleet, root_key, _ = _setup(
        broker, agent_factory, fleet_factory, make_bundle, http_server, keys, co_signed=False
    )
    newcomer = Ed25519PrivateKey.generate()
    _trust(fleet, "root-2", 2, [root_key], [newcomer.public_key()], [root_key])  # revokes the release key
    wait_for(lambda: agent.wait_idle(1), 15, "idle")
    wait_for(lambda: any("still serving" in e["detail"]["message"] or "served only" in e["detail"]["message"]
                         for e in _untrusted(fleet)), 10, "the loud report")  # fmt: skip
    assert_serves_v(agent, 2)  # never left with nothing
    assert sorted(agent.trust_status()["unverified_slots"]) == ["A", "B"]
    agent.stop()
    again = agent_factory(broker.port, state_dir=agent.state_dir)
    assert_serves_v(again, 2)  # at boot too: the active one, as a last resort
    assert sorted(again.trust_status()["unverified_slots"]) == ["A", "B"]
    # A bundle the new key signed replaces it the ordinary way.
    fresh = make_bundle(version=3, signers=[newcomer])
    serve(http_server, fresh)
    fleet.send(deploy_cmd(http_server.url, fresh, "d3"))
    fleet.wait_phase("d3", "active", 30)
    standby = "B" if again.active_slot == "A" else "A"
    assert list(again.trust_status()["unverified_slots"]) == [standby]  # only the old v2 now
