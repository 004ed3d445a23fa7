"""The signed trust root (sdk/trustroot.py): TUF's root rules, pure, with real Ed25519 keys."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sdk.errors import TrustRootError
from sdk.signing import key_id
from sdk.trustroot import Role, TrustRoot, add_signatures, load_root, make_root, sign_root, update_root

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
LATER = "2027-01-01T00:00:00Z"


def _keys(n: int) -> list[Ed25519PrivateKey]:
    return [Ed25519PrivateKey.generate() for _ in range(n)]


def _root(
    version: int, root_keys: list[Ed25519PrivateKey], bundle_keys: list[Ed25519PrivateKey], **kw: object
) -> TrustRoot:
    return make_root(
        version=version,
        expires=str(kw.pop("expires", LATER)),
        root_keys=[k.public_key() for k in root_keys],
        bundle_keys=[k.public_key() for k in bundle_keys],
        **kw,  # type: ignore[arg-type]
    )


def test_round_trip_and_self_signature() -> None:
    r, b = _keys(2), _keys(1)
    root = _root(1, r, b, root_threshold=2, pins=("linear",), downgrades={"linear": 3})
    data = sign_root(root, r)
    loaded = load_root(data, now=NOW)
    assert loaded == root
    assert loaded.roles["root"] == Role(tuple(sorted(key_id(k.public_key()) for k in r)), 2)
    assert loaded.bundle_keys().threshold == 1 and loaded.pins == ("linear",) and loaded.downgrades == {"linear": 3}
    with pytest.raises(TrustRootError, match="1 valid signature"):
        load_root(sign_root(root, r[:1]), now=NOW)  # below the root role's threshold


def test_signature_of_a_key_outside_the_root_role_does_not_count() -> None:
    r, b = _keys(1), _keys(1)
    root = _root(1, r, b)
    with pytest.raises(TrustRootError):
        load_root(sign_root(root, b), now=NOW)  # a bundle key cannot sign the root


def test_rotation_needs_the_old_and_the_new_root_keys() -> None:
    old, new, b = _keys(1), _keys(1), _keys(1)
    current = load_root(sign_root(_root(1, old, b), old), now=NOW)
    v2 = _root(2, new, b)
    assert update_root(current, sign_root(v2, old + new), now=NOW) == v2
    with pytest.raises(TrustRootError, match="current root"):
        update_root(current, sign_root(v2, new), now=NOW)  # only the new keys
    with pytest.raises(TrustRootError):
        update_root(current, sign_root(v2, old), now=NOW)  # only the old keys: the new root is not self-signed


def test_version_must_increase_and_expired_root_refused() -> None:
    r, b = _keys(1), _keys(1)
    current = load_root(sign_root(_root(2, r, b), r), now=NOW)
    for version in (1, 2):
        with pytest.raises(TrustRootError, match="version"):
            update_root(current, sign_root(_root(version, r, b), r), now=NOW)
    with pytest.raises(TrustRootError, match="expired"):
        update_root(current, sign_root(_root(3, r, b, expires="2026-01-01T00:00:00Z"), r), now=NOW)


def test_co_signing_adds_a_signature_and_keeps_the_signed_part() -> None:
    r = _keys(2)
    root = _root(1, r, r[:1], root_threshold=2)
    one = sign_root(root, r[:1])
    both = add_signatures(one, r[1:])
    assert load_root(both, now=NOW) == root
    assert json.loads(both)["signed"] == json.loads(one)["signed"]


def test_a_tampered_root_is_refused() -> None:
    r, b = _keys(1), _keys(1)
    doc = json.loads(sign_root(_root(1, r, b), r))
    doc["signed"]["roles"]["bundles"]["threshold"] = 1
    doc["signed"]["pins"] = ["anything"]
    with pytest.raises(TrustRootError):
        load_root(json.dumps(doc).encode(), now=NOW)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.update(version=-1),
        lambda s: s.update(version=True),
        lambda s: s["roles"].pop("bundles"),
        lambda s: s["roles"]["root"].update(threshold=0),
        lambda s: s["roles"]["root"].update(threshold=5),
        lambda s: s["roles"]["root"].update(keyids=["00" * 32]),
        lambda s: s.update(expires="tomorrow"),
        lambda s: s.update(extra=1),
        lambda s: s.update(pins=[]),
        lambda s: s.update(downgrades={"x": -1}),
    ],
)
def test_malformed_roots_are_refused(mutate: object) -> None:
    r, b = _keys(1), _keys(1)
    signed = json.loads(sign_root(_root(1, r, b), r))["signed"]
    mutate(signed)  # type: ignore[operator]
    # signed again over the altered content: the parser, not the signature, must refuse it
    from sdk.trustroot import _sign_signed

    with pytest.raises(TrustRootError):
        load_root(_sign_signed(signed, r), now=NOW)


def test_implicit_root_from_trusted_keys() -> None:
    from sdk.signing import TrustedKeys

    b = _keys(2)
    implicit = TrustRoot.implicit(TrustedKeys(tuple(k.public_key() for k in b), threshold=2))
    assert implicit.version == 0 and implicit.expires is None and implicit.bundle_keys().threshold == 2
    # the --trust keys can sign the first real root (migration from flags to a root)
    v1 = _root(1, b[:1], b[:1])
    assert update_root(implicit, sign_root(v1, b), now=NOW) == v1
    with pytest.raises(TrustRootError):
        update_root(implicit, sign_root(v1, b[:1]), now=NOW)  # 1 of the 2 flag keys: below threshold 2
    assert NOW + timedelta(days=1) > NOW
