"""Issue 14 (3, 4): what the unsigned transport can no longer decide, with real keys and a real agent.

A downgrade or a change of model needs the signed trust root; the root rotates by TUF's rule (a threshold
of the old root keys and of the new); an expired bundle is reported at boot and not rolled back to. Each
refusal leaves the device's trusted state (pointer, floors, root) as it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from agent_parts import Broker, HttpServer, wait_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ota_parts import Fleet, assert_serves_v, deploy_cmd, serve
from runtime_bundles import BundleMaker, Keys

from device_runtime.agent import Agent
from sdk.manifest import format_time
from sdk.signing import load_public_key
from sdk.trustroot import make_root, sign_root

pytestmark = pytest.mark.timeout(120)
LATER = "2099-01-01T00:00:00Z"


def _trusted_state(agent: Agent) -> tuple[bytes, bytes | None, dict[str, Any] | None]:
    root = agent.state_dir / "root.json"
    return (
        (agent.state_dir / "pointer.json").read_bytes(),
        root.read_bytes() if root.exists() else None,
        agent.active_model,
    )


def _trust_cmd(cmd_id: str, document: bytes) -> dict[str, Any]:
    return {"schema": 1, "id": cmd_id, "type": "trust", "root": json.loads(document)}


def _root(version: int, root_keys: list[Ed25519PrivateKey], bundle_keys: list[Any], **kw: Any) -> Any:
    return make_root(
        version=version, expires=kw.pop("expires", LATER), root_keys=[k.public_key() for k in root_keys],
        bundle_keys=bundle_keys, **kw,
    )  # fmt: skip


def _settle(agent: Agent) -> None:
    wait_for(lambda: agent.wait_idle(1), 15, "the agent to be idle")


@pytest.fixture
def running(online: Callable[..., tuple[Agent, Fleet]]) -> tuple[Agent, Fleet]:
    return online()


def test_unsigned_allow_downgrade_is_refused(
    running: tuple[Agent, Fleet], http_server: HttpServer, v2: Path, v1: Path
) -> None:
    agent, fleet = running
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "d2"))
    fleet.wait_phase("d2", "active", 30)
    _settle(agent)
    before = _trusted_state(agent)
    serve(http_server, v1)
    fleet.send(deploy_cmd(http_server.url, v1, "d1", allow_downgrade=True))  # the transport's say-so
    failed = fleet.wait_phase("d1", "failed", 30)
    assert failed["detail"]["error"] == "RollbackError"
    _settle(agent)
    assert _trusted_state(agent) == before
    assert_serves_v(agent, 2)


def test_a_bundle_of_another_name_is_refused(
    running: tuple[Agent, Fleet], http_server: HttpServer, make_bundle: BundleMaker
) -> None:
    agent, fleet = running
    _settle(agent)
    before = _trusted_state(agent)
    other = make_bundle(name="other-model", version=7)
    serve(http_server, other)
    fleet.send(deploy_cmd(http_server.url, other, "mix"))
    failed = fleet.wait_phase("mix", "failed", 30)
    assert failed["detail"]["error"] == "RollbackError" and "other-model" in failed["detail"]["message"]
    _settle(agent)
    assert _trusted_state(agent) == before
    assert_serves_v(agent, 1)


def test_a_signed_root_authorises_a_model_change_and_a_downgrade(
    running: tuple[Agent, Fleet], http_server: HttpServer, make_bundle: BundleMaker, keys: Keys, v1: Path, v2: Path
) -> None:
    agent, fleet = running
    root_key = Ed25519PrivateKey.generate()
    release = load_public_key(keys.public)
    # The --trust release key is the implicit root (version 0): it signs the first real root.
    doc = sign_root(_root(1, [root_key], [release], pins=("linear", "other-model"), downgrades={"linear": 1}),
                    [root_key, keys.private])  # fmt: skip
    fleet.send(_trust_cmd("t1", doc))
    assert fleet.wait_phase("t1", "applied", 10)["detail"]["root_version"] == 1
    assert agent.trust_root.version == 1
    fleet.wait_status(lambda s: s.get("trust", {}).get("root_version") == 1, what="root v1 in status")
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "d2"))
    fleet.wait_phase("d2", "active", 30)
    serve(http_server, v1)
    fleet.send(deploy_cmd(http_server.url, v1, "d1"))  # below the floor, authorised by the root
    fleet.wait_phase("d1", "active", 30)
    other = make_bundle(name="other-model", version=1)
    serve(http_server, other)
    fleet.send(deploy_cmd(http_server.url, other, "d3"))
    fleet.wait_phase("d3", "active", 30)
    assert agent.active_model is not None and agent.active_model["name"] == "other-model"


def test_rotation_revocation_and_root_rollback(
    running: tuple[Agent, Fleet], http_server: HttpServer, make_bundle: BundleMaker, keys: Keys
) -> None:
    agent, fleet = running
    old, new, bundle_key = (Ed25519PrivateKey.generate() for _ in range(3))
    release = load_public_key(keys.public)
    v1 = sign_root(_root(1, [old], [release, bundle_key.public_key()]), [old, keys.private])
    fleet.send(_trust_cmd("t1", v1))
    fleet.wait_phase("t1", "applied", 10)
    # v2 revokes the release key and moves the root role to the new key
    v2_root = _root(2, [new], [bundle_key.public_key()])
    fleet.send(_trust_cmd("t2-only-new", sign_root(v2_root, [new])))
    assert fleet.wait_phase("t2-only-new", "failed", 10)["detail"]["error"] == "TrustRootError"
    assert agent.trust_root.version == 1
    fleet.send(_trust_cmd("t2", sign_root(v2_root, [old, new])))
    fleet.wait_phase("t2", "applied", 10)
    assert agent.trust_root.version == 2
    _settle(agent)
    before = _trusted_state(agent)
    # the revoked key's bundle is refused
    revoked = make_bundle(version=5)
    serve(http_server, revoked)
    fleet.send(deploy_cmd(http_server.url, revoked, "d-revoked"))
    assert fleet.wait_phase("d-revoked", "failed", 30)["detail"]["error"] == "SignatureError"
    # the old root again (a replay by the transport) is refused
    fleet.send(_trust_cmd("t1-again", v1))
    assert fleet.wait_phase("t1-again", "failed", 10)["detail"]["error"] == "TrustRootError"
    _settle(agent)
    assert _trusted_state(agent) == before
    # the new key's bundle is accepted, and the root survives a restart
    fresh = make_bundle(version=6, signers=[bundle_key])
    serve(http_server, fresh)
    fleet.send(deploy_cmd(http_server.url, fresh, "d-new"))
    fleet.wait_phase("d-new", "active", 30)


def test_below_threshold_is_refused(
    running: tuple[Agent, Fleet], http_server: HttpServer, make_bundle: BundleMaker, keys: Keys
) -> None:
    agent, fleet = running
    root_key, second = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    release = load_public_key(keys.public)
    doc = sign_root(_root(1, [root_key], [release, second.public_key()], bundle_threshold=2), [root_key, keys.private])
    fleet.send(_trust_cmd("t1", doc))
    fleet.wait_phase("t1", "applied", 10)
    _settle(agent)
    before = _trusted_state(agent)
    one = make_bundle(version=2)
    serve(http_server, one)
    fleet.send(deploy_cmd(http_server.url, one, "d-one"))
    assert fleet.wait_phase("d-one", "failed", 30)["detail"]["error"] == "SignatureError"
    _settle(agent)
    assert _trusted_state(agent) == before
    two = make_bundle(version=2, signers=[keys.private, second])
    serve(http_server, two)
    fleet.send(deploy_cmd(http_server.url, two, "d-two"))
    fleet.wait_phase("d-two", "active", 30)


def _soon(seconds: float) -> str:
    return format_time(datetime.now(timezone.utc) + timedelta(seconds=seconds))


def test_expired_active_bundle_is_reported_at_boot_and_still_served(
    broker: Broker, agent_factory: Callable[..., Agent], fleet_factory: Callable[..., Fleet], make_bundle: BundleMaker,
    tmp_path: Path,
) -> None:  # fmt: skip
    state = tmp_path / "state-exp"
    short = make_bundle(version=1, expires=_soon(3))
    agent = agent_factory(broker.port, short, state_dir=state)
    assert agent.active_model is not None
    assert agent.trust_status()["model_expired"] is False
    agent.stop()
    time.sleep(max(0.0, 3.5))
    fleet = fleet_factory(broker.port)
    again = agent_factory(broker.port, state_dir=state)
    assert_serves_v(again, 1)  # never left with nothing
    assert again.trust_status()["model_expired"] is True
    fleet.wait_status(lambda s: s.get("trust", {}).get("model_expired") is True, what="expired reported")


def test_rollback_to_an_expired_slot_is_refused(
    broker: Broker, agent_factory: Callable[..., Agent], fleet_factory: Callable[..., Fleet],
    make_bundle: BundleMaker, http_server: HttpServer, v2: Path,
) -> None:  # fmt: skip
    fleet = fleet_factory(broker.port)
    short = make_bundle(version=1, expires=_soon(3))
    agent = agent_factory(broker.port, short)
    fleet.wait_status(lambda s: s["state"] == "online" and s["model"] is not None, what="online")
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "d2"))
    fleet.wait_phase("d2", "active", 30)
    _settle(agent)
    time.sleep(3.5)
    before = _trusted_state(agent)
    fleet.send({"schema": 1, "id": "r1", "type": "rollback"})
    failed = fleet.wait_phase("r1", "failed", 30)
    assert failed["detail"]["error"] == "ExpiredError"
    _settle(agent)
    assert _trusted_state(agent) == before
    assert_serves_v(agent, 2)


def test_host_cli_root_and_an_agent_started_from_it(
    broker: Broker, agent_factory: Callable[..., Agent], make_bundle: BundleMaker, keys: Keys, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from sdk.cli.main import main
    from sdk.signing import generate_keypair

    old_key, old_pub = generate_keypair(tmp_path / "k", "root-old")
    new_key, new_pub = generate_keypair(tmp_path / "k", "root-new")
    v1, v2 = tmp_path / "root-1.json", tmp_path / "root-2.json"
    base = ["--bundle-key", str(keys.public), "--pin", "linear"]
    assert main(["keys", "root", "create", "--root-key", str(old_pub), *base, "--sign", str(old_key),
                 "--out", str(v1)]) == 0  # fmt: skip
    assert main(["keys", "root", "rotate", "--current", str(v1), "--root-key", str(new_pub), *base,
                 "--sign", str(new_key), "--out", str(v2)]) == 0  # fmt: skip
    assert "not yet valid" in capsys.readouterr().out  # only the new key signed
    assert main(["keys", "root", "sign", str(v2), "--sign", str(old_key)]) == 0
    assert "valid root v2" in capsys.readouterr().out

    state = tmp_path / "state-root"
    agent = agent_factory(broker.port, make_bundle(version=1), state_dir=state, trust=None, trust_root=v1)
    assert agent.trust_root.version == 1 and agent.active_model is not None
    agent.stop()
    # a newer root file at start is applied by the rotation rule; the stored root then outranks the file
    again = agent_factory(broker.port, state_dir=state, trust_root=v2)
    assert again.trust_root.version == 2
    again.stop()
    third = agent_factory(broker.port, state_dir=state, trust_root=v1)  # an older image's file
    assert third.trust_root.version == 2
    assert_serves_v(third, 1)
