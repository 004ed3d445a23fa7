"""signatures.json: any bytes give the valid key ids or ``SignatureError``."""

from __future__ import annotations

import json

from conftest import bound, budget
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from sdk.errors import SignatureError
from sdk.signing import TrustedKeys, key_id, sign_manifest, verify_signatures

KEY = Ed25519PrivateKey.generate()
TRUST = TrustedKeys((KEY.public_key(),))
MANIFEST = b'{"name":"m"}'
GOOD = sign_manifest(MANIFEST, [KEY])
FIELD = st.text(max_size=100) | st.integers() | st.none()


@budget(300)
@given(st.binary(max_size=3000))
def test_random_signature_bytes(data: bytes) -> None:
    with bound():
        try:
            verify_signatures(MANIFEST, data, TRUST)
        except SignatureError:
            pass


@budget(300)
@given(st.data())
def test_mutated_signature_document(data: st.DataObject) -> None:
    raw = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    with bound():
        try:
            ids = verify_signatures(MANIFEST, bytes(raw), TRUST)
        except SignatureError:
            return
    assert ids == [key_id(KEY.public_key())]  # accepted only if what matters is intact


@budget(200)
@given(st.lists(st.dictionaries(st.sampled_from(["keyid", "sig", "alg", "x"]), FIELD, max_size=4), max_size=5))
def test_signature_entries_of_any_shape(entries: list[dict[str, object]]) -> None:
    for doc in (entries, {"signatures": entries}):
        with bound():
            try:
                verify_signatures(MANIFEST, json.dumps(doc).encode(), TRUST)
            except SignatureError:
                pass
