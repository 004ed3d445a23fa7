"""Trust roots and signed freshness: any bytes give a root / freshness or their typed error
(``TrustRootError``, ``FreshnessError``), and a mutated document is accepted only if it is intact."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from conftest import bound, budget
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from sdk.errors import FreshnessError, TrustRootError
from sdk.freshness import make_freshness, sign_freshness, verify_freshness
from sdk.mqtt_contract import ContractError, parse_freshness
from sdk.trustroot import load_root, make_root, sign_root, update_root

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
ROOT_KEY, BUNDLE_KEY, TS_KEY = (Ed25519PrivateKey.generate() for _ in range(3))
ROOT = make_root(version=1, expires="2027-01-01T00:00:00Z", root_keys=[ROOT_KEY.public_key()],
                 bundle_keys=[BUNDLE_KEY.public_key()], timestamp_keys=[TS_KEY.public_key()])  # fmt: skip
ROOT_DOC = sign_root(ROOT, [ROOT_KEY])
NEXT_DOC = sign_root(make_root(version=2, expires="2027-01-01T00:00:00Z", root_keys=[ROOT_KEY.public_key()],
                               bundle_keys=[BUNDLE_KEY.public_key()]), [ROOT_KEY])  # fmt: skip
FRESH = make_freshness(5, NOW, timedelta(days=1), root_version=1)
FRESH_DOC = sign_freshness(FRESH, [TS_KEY])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
SIGNED_KEYS = ["_type", "version", "issued", "expires", "root_version", "keys", "roles", "pins", "downgrades", "x"]


def _mutate(data: st.DataObject, good: bytes) -> bytes:
    raw = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    return bytes(raw)


@budget(300)
@given(st.binary(max_size=3000))
def test_random_bytes(data: bytes) -> None:
    with bound():
        try:
            load_root(data, now=NOW)
        except TrustRootError:
            pass
        try:
            verify_freshness(data, ROOT, now=NOW, current=None)
        except FreshnessError:
            pass


@budget(300)
@given(st.data())
def test_mutated_root_and_freshness(data: st.DataObject) -> None:
    root_doc, fresh_doc, next_doc = _mutate(data, ROOT_DOC), _mutate(data, FRESH_DOC), _mutate(data, NEXT_DOC)
    with bound():
        try:
            assert load_root(root_doc, now=NOW) == ROOT  # accepted only if what is signed is intact
        except TrustRootError:
            pass
        try:
            assert update_root(ROOT, next_doc, now=NOW).version == 2
        except TrustRootError:
            pass
        try:
            assert verify_freshness(fresh_doc, ROOT, now=NOW, current=None) == FRESH
        except FreshnessError:
            pass


@budget(300)
@given(st.dictionaries(st.sampled_from(SIGNED_KEYS), JSON, max_size=8), st.lists(JSON, max_size=3))
def test_signed_parts_of_any_shape(signed: dict[str, object], signatures: list[object]) -> None:
    doc = {"signed": signed, "signatures": signatures}
    with bound():
        try:
            load_root(json.dumps(doc).encode(), now=NOW)
        except TrustRootError:
            pass
        try:
            verify_freshness(doc, ROOT, now=NOW, current=FRESH)
        except FreshnessError:
            pass
        try:
            parse_freshness({"schema": 1, "type": "timestamp", "timestamp": doc, "id": signatures})
        except ContractError:
            pass
