"""Signed freshness (sdk/freshness.py) and the root's ``timestamp`` role: TUF's timestamp rules, pure."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sdk.errors import FreshnessError, TrustRootError
from sdk.freshness import Freshness, check_signed, make_freshness, sign_freshness, verify_freshness
from sdk.mqtt_contract import CommandError, ContractError, Topics, freshness_payload, parse_freshness, parse_topic
from sdk.trustroot import TrustRoot, load_root, make_root, sign_root

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
DAY = timedelta(days=1)


def _keys(n: int) -> list[Ed25519PrivateKey]:
    return [Ed25519PrivateKey.generate() for _ in range(n)]


def _root(timestamp: list[Ed25519PrivateKey], threshold: int = 1) -> tuple[TrustRoot, Ed25519PrivateKey]:
    root_key, bundle_key = _keys(2)
    root = make_root(
        version=3, expires="2027-01-01T00:00:00Z", root_keys=[root_key.public_key()],
        bundle_keys=[bundle_key.public_key()], timestamp_keys=[k.public_key() for k in timestamp],
        timestamp_threshold=threshold,
    )  # fmt: skip
    return root, root_key


def test_a_root_with_a_timestamp_role_round_trips_and_one_without_has_none() -> None:
    ts = _keys(2)
    root, root_key = _root(ts, threshold=2)
    loaded = load_root(sign_root(root, [root_key]), now=NOW)
    assert loaded == root
    keys = loaded.timestamp_keys()
    assert keys is not None and keys.threshold == 2 and len(keys.keys) == 2
    plain = make_root(version=1, expires="2027-01-01T00:00:00Z", root_keys=[root_key.public_key()],
                      bundle_keys=[ts[0].public_key()])  # fmt: skip
    assert plain.timestamp_keys() is None and "timestamp" not in plain.to_json()["roles"]
    signed = plain.to_json()
    signed["roles"]["snapshot"] = signed["roles"]["root"]
    with pytest.raises(TrustRootError, match="roles must be"):
        TrustRoot.from_json(signed)
    with pytest.raises(TrustRootError, match="threshold"):
        _root(ts[:1], threshold=2)


def test_valid_freshness_is_accepted_and_its_fields_read_back() -> None:
    ts = _keys(2)
    root, _ = _root(ts, threshold=2)
    fresh = make_freshness(7, NOW, DAY, root_version=3)
    doc = sign_freshness(fresh, ts)
    assert verify_freshness(doc, root, now=NOW, current=None) == fresh
    assert verify_freshness(json.loads(doc), root, now=NOW + timedelta(hours=23), current=fresh) == fresh  # again
    assert fresh.expires == "2026-06-02T00:00:00Z" and not fresh.expired(NOW) and fresh.expired(NOW + DAY)


@pytest.mark.parametrize(
    "case, match",
    [
        ("forged", "0 valid signature"),  # signed by a key the root does not name
        ("below_threshold", "1 valid signature"),
        ("tampered", "0 valid signature"),  # signed, then the version raised
        ("bundle_key", "0 valid signature"),  # a bundle key is not a timestamp key
        ("expired", "expired"),
        ("older", "replay"),
        ("same_version_other_content", "differs"),
        ("no_role", "no timestamp role"),
        ("malformed", "freshness"),
    ],
)
def test_refused_freshness(case: str, match: str) -> None:
    ts = _keys(2)
    root, _ = _root(ts, threshold=2)
    current = make_freshness(10, NOW, DAY)
    now, doc = NOW, b""
    if case == "forged":
        doc = sign_freshness(make_freshness(11, NOW, DAY), _keys(2))
    elif case == "below_threshold":
        doc = sign_freshness(make_freshness(11, NOW, DAY), ts[:1])
    elif case == "tampered":
        raw = json.loads(sign_freshness(make_freshness(11, NOW, DAY), ts))
        raw["signed"]["version"] = 99
        doc = json.dumps(raw).encode()
    elif case == "bundle_key":
        doc = sign_freshness(make_freshness(11, NOW, DAY), _keys(1))
    elif case == "expired":
        doc, now = sign_freshness(make_freshness(11, NOW, DAY), ts), NOW + DAY
    elif case == "older":
        doc = sign_freshness(make_freshness(9, NOW, DAY), ts)
    elif case == "same_version_other_content":
        doc = sign_freshness(make_freshness(10, NOW, 2 * DAY), ts)
    elif case == "no_role":
        root = make_root(version=1, expires="2027-01-01T00:00:00Z", root_keys=[ts[0].public_key()],
                         bundle_keys=[ts[1].public_key()])  # fmt: skip
        doc = sign_freshness(make_freshness(11, NOW, DAY), ts)
    else:
        doc = b'{"signed": {"_type": "edgeship-timestamp", "version": -1}, "signatures": []}'
    with pytest.raises(FreshnessError, match=match):
        verify_freshness(doc, root, now=now, current=current)
    assert issubclass(FreshnessError, TrustRootError)


@pytest.mark.parametrize(
    "signed",
    [
        {"_type": "edgeship-root", "version": 1, "issued": "2026-06-01T00:00:00Z", "expires": "2026-06-02T00:00:00Z"},
        {"_type": "edgeship-timestamp", "version": True, "issued": "2026-06-01T00:00:00Z",
         "expires": "2026-06-02T00:00:00Z"},
        {"_type": "edgeship-timestamp", "version": 1, "issued": "2026-06-02T00:00:00Z",
         "expires": "2026-06-01T00:00:00Z"},
        {"_type": "edgeship-timestamp", "version": 1, "issued": "yesterday", "expires": "2026-06-02T00:00:00Z"},
        {"_type": "edgeship-timestamp", "version": 1, "issued": "2026-06-01T00:00:00Z",
         "expires": "2026-06-02T00:00:00Z", "extra": 1},
        {"_type": "edgeship-timestamp", "version": 1, "issued": "2026-06-01T00:00:00Z",
         "expires": "2026-06-02T00:00:00Z", "root_version": "3"},
        [],
    ],
)  # fmt: skip
def test_malformed_signed_parts_are_typed_errors(signed: object) -> None:
    with pytest.raises(FreshnessError):
        Freshness.from_json(signed)


def test_domain_separation_a_root_signature_is_not_a_freshness_signature() -> None:
    ts = _keys(1)
    root, _ = _root(ts)
    fresh = make_freshness(1, NOW, DAY)
    forged = json.loads(sign_root(root, ts))["signatures"]  # the timestamp key's signature over a root
    doc = {"signed": fresh.to_json(), "signatures": forged}
    with pytest.raises(FreshnessError, match="0 valid"):
        check_signed(doc, root)
    with pytest.raises(FreshnessError, match="at most"):
        check_signed(b" " * 20000, root)


def test_the_contract_topic_and_envelope() -> None:
    topics = Topics("plant-1", "dev-1")
    assert topics.freshness == "edgeship/v1/plant-1/timestamp"
    with pytest.raises(ContractError):  # one level above the devices' topics: not a device topic
        parse_topic(topics.freshness)
    doc = json.loads(sign_freshness(make_freshness(1, NOW, DAY), _keys(1)))
    payload = freshness_payload(doc)
    assert parse_freshness(payload) == doc
    for bad in ({**payload, "timestamp": "x"}, {**payload, "extra": 1}, {**payload, "schema": 2},
                {**payload, "type": "trust"}, {k: v for k, v in payload.items() if k != "timestamp"}):  # fmt: skip
        with pytest.raises(CommandError):
            parse_freshness(bad)


def test_keys_root_create_adds_the_timestamp_role(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    from sdk.cli.main import main
    from sdk.signing import generate_keypair

    folder = Path(str(tmp_path))
    root_key, root_pub = generate_keypair(folder, "root")
    _, bundle_pub = generate_keypair(folder, "release")
    _, ts1 = generate_keypair(folder, "ts1")
    _, ts2 = generate_keypair(folder, "ts2")
    out = folder / "root.json"
    base = ["keys", "root", "create", "--root-key", str(root_pub), "--bundle-key", str(bundle_pub),
            "--sign", str(root_key), "--out", str(out)]  # fmt: skip
    assert main([*base, "--timestamp-key", str(ts1), "--timestamp-key", str(ts2), "--timestamp-threshold", "2"]) == 0
    root = load_root(out.read_bytes(), now=None)
    keys = root.timestamp_keys()
    assert keys is not None and keys.threshold == 2 and len(keys.keys) == 2
    capsys.readouterr()
    assert main([*base, "--timestamp-key", str(ts1), "--timestamp-threshold", "2"]) == 1  # above its keys
    assert "threshold" in capsys.readouterr().err
    assert main(base) == 0 and load_root(out.read_bytes(), now=None).timestamp_keys() is None
