"""Key files and trust sets: permissions, formats and thresholds."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sdk.errors import KeyFileError, SignatureError
from sdk.signing import (
    TrustedKeys,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_signatures,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_keypair_private_0600_and_loads(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "keys", name="ci")
    assert (private.name, public.name) == ("ci.key", "ci.pub")
    assert _mode(private) == 0o600
    key = load_private_key(private)
    assert key_id(key.public_key()) == key_id(load_public_key(public))
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_generate_keypair_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        private, _ = generate_keypair(tmp_path)
    finally:
        os.umask(old)
    assert _mode(private) == 0o600


@pytest.mark.parametrize("existing", ["edgeship.key", "edgeship.pub"])
def test_generate_keypair_never_overwrites(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_bytes(b"precious")
    with pytest.raises(KeyFileError, match="exists"):
        generate_keypair(tmp_path)
    assert (tmp_path / existing).read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700 | 0o004])
def test_private_key_readable_by_others_refused(tmp_path: Path, mode: int) -> None:
    private, _ = generate_keypair(tmp_path)
    private.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(private)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_key_owner_only_loads(tmp_path: Path, mode: int) -> None:
    private, _ = generate_keypair(tmp_path)
    private.chmod(mode)
    assert isinstance(load_private_key(private), Ed25519PrivateKey)


def _private_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "k.key"
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: b"not a key at all",
        lambda: b"",
        lambda: _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        lambda: _pem(ec.generate_private_key(ec.SECP256R1())),
        lambda: Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"password"),
        ),
        lambda: (
            Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        ),
        lambda: b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 20000 + b"\n-----END PRIVATE KEY-----\n",
    ],
    ids=["text", "empty", "rsa", "ec", "encrypted", "public-key", "too-large"],
)
def test_private_key_wrong_content(tmp_path: Path, make) -> None:
    with pytest.raises(KeyFileError):
        load_private_key(_private_file(tmp_path, make()))


@pytest.mark.parametrize(
    "make",
    [
        lambda: b"garbage",
        lambda: (
            rsa.generate_private_key(public_exponent=65537, key_size=1024)
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        ),
        lambda: (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        ),
        lambda: _pem(Ed25519PrivateKey.generate()),
    ],
    ids=["text", "rsa", "ec", "private-key"],
)
def test_public_key_wrong_content(tmp_path: Path, make) -> None:
    path = tmp_path / "k.pub"
    path.write_bytes(make())
    with pytest.raises(KeyFileError):
        load_public_key(path)


def test_missing_key_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        load_private_key(tmp_path / "nope.key")
    with pytest.raises(KeyFileError):
        load_public_key(tmp_path / "nope.pub")
    with pytest.raises(KeyFileError):
        load_public_key(tmp_path)  # a directory


def test_key_id_is_sha256_of_raw_public_key() -> None:
    import hashlib

    pub = Ed25519PrivateKey.generate().public_key()
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(pub) == hashlib.sha256(raw).hexdigest()


# ---- trust sets ---------------------------------------------------------------------------------------
def _pubs(n: int) -> tuple[Ed25519PublicKey, ...]:
    return tuple(Ed25519PrivateKey.generate().public_key() for _ in range(n))


@pytest.mark.parametrize(("n", "threshold"), [(1, 0), (2, 3), (1, -1), (0, 1), (2, 1.5), (1, True)])
def test_trusted_keys_bad_threshold(n: int, threshold: object) -> None:
    with pytest.raises(KeyFileError):
        TrustedKeys(_pubs(n), threshold=threshold)  # type: ignore[arg-type]


def test_trusted_keys_duplicate_key() -> None:
    (pub,) = _pubs(1)
    same = Ed25519PublicKey.from_public_bytes(
        pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    with pytest.raises(KeyFileError, match="twice"):
        TrustedKeys((pub, same), threshold=1)


def test_trusted_keys_coerce(tmp_path: Path) -> None:
    _, public = generate_keypair(tmp_path)
    trust = TrustedKeys.coerce([public])
    assert trust.threshold == 1 and len(trust.keys) == 1
    assert TrustedKeys.coerce(trust) is trust
    with pytest.raises(KeyFileError):
        TrustedKeys.coerce([])


def test_verify_signatures_threshold_counts_distinct_keys() -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    trust = TrustedKeys((a.public_key(), b.public_key()), threshold=2)
    data = b'{"x":1}'
    assert verify_signatures(data, sign_manifest(data, [a, b]), trust) == sorted(
        [key_id(a.public_key()), key_id(b.public_key())]
    )
    with pytest.raises(SignatureError):
        verify_signatures(data, sign_manifest(data, [a, a]), trust)
    with pytest.raises(SignatureError):
        verify_signatures(data + b" ", sign_manifest(data, [a, b]), trust)


def test_sign_manifest_needs_a_key() -> None:
    with pytest.raises(KeyFileError):
        sign_manifest(b"{}", [])
