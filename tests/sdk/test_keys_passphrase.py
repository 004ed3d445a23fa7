"""Passphrase-encrypted key files and the Signer seam (sdk/signing.py), without the CLI."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sdk.errors import KeyFileError
from sdk.signing import (
    PASSPHRASE_ENV,
    KeySigner,
    Signer,
    TrustedKeys,
    as_signer,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    read_passphrase_file,
    sign_manifest,
    verify_signatures,
)
from sdk.trustroot import load_root, make_root, sign_root

SECRET = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _no_env_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


@pytest.fixture
def encrypted(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys", "enc", passphrase=SECRET)


def test_encrypted_key_is_pkcs8_encrypted_and_useless_without_the_passphrase(encrypted: tuple[Path, Path]) -> None:
    private, public = encrypted
    data = private.read_bytes()
    assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert private.stat().st_mode & 0o777 == 0o600
    with pytest.raises(TypeError):  # cryptography itself: the file does not open without a password
        serialization.load_pem_private_key(data, password=None)
    with pytest.raises(ValueError):
        serialization.load_pem_private_key(data, password=b"not it")
    key = load_private_key(private, SECRET)
    assert key_id(key.public_key()) == key_id(load_public_key(public))
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")  # the public key file is unchanged


def test_encrypted_key_without_passphrase_says_how(encrypted: tuple[Path, Path]) -> None:
    with pytest.raises(KeyFileError, match="encrypted: pass --passphrase-file or set EDGESHIP_KEY_PASSPHRASE"):
        load_private_key(encrypted[0])


def test_wrong_passphrase_is_refused_without_echoing_it(encrypted: tuple[Path, Path]) -> None:
    with pytest.raises(KeyFileError, match="wrong passphrase") as info:
        load_private_key(encrypted[0], "hunter2-wrong")
    assert "hunter2" not in str(info.value)


def test_passphrase_from_the_environment(encrypted: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, SECRET)
    assert isinstance(load_private_key(encrypted[0]), Ed25519PrivateKey)
    assert isinstance(KeySigner.from_file(encrypted[0]), KeySigner)
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_private_key(encrypted[0])


def test_environment_passphrase_is_ignored_for_an_unencrypted_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private, _ = generate_keypair(tmp_path)
    monkeypatch.setenv(PASSPHRASE_ENV, SECRET)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(load_private_key(private), Ed25519PrivateKey)


def test_explicit_passphrase_for_an_unencrypted_key_loads_with_a_warning(tmp_path: Path) -> None:
    private, _ = generate_keypair(tmp_path)
    with pytest.warns(UserWarning, match="not encrypted"):
        assert isinstance(load_private_key(private, SECRET), Ed25519PrivateKey)


def test_passphrase_file_strips_one_newline_and_refuses_empty(tmp_path: Path) -> None:
    for body in (SECRET + "\n", SECRET + "\r\n", SECRET):
        (tmp_path / "p").write_text(body, newline="")
        assert read_passphrase_file(tmp_path / "p") == SECRET.encode()
    (tmp_path / "p").write_bytes(b"\n")
    with pytest.raises(KeyFileError, match="empty"):
        read_passphrase_file(tmp_path / "p")
    (tmp_path / "p").write_bytes(b"x" * 2000)
    with pytest.raises(KeyFileError, match="longer") as info:
        read_passphrase_file(tmp_path / "p")
    assert "xxxx" not in str(info.value)
    with pytest.raises(KeyFileError, match="cannot read passphrase file"):
        read_passphrase_file(tmp_path / "missing")


def test_generate_refuses_an_empty_passphrase(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="empty"):
        generate_keypair(tmp_path, passphrase="")
    assert not any(tmp_path.iterdir())


# ---- the Signer seam --------------------------------------------------------------------------------------
class CountingSigner:
    """A Signer that is not a private key: what an HSM adapter looks like to edgeship."""

    def __init__(self, key: Ed25519PrivateKey, report_id: str | None = None, corrupt: bool = False) -> None:
        self._key, self.calls, self._corrupt = key, 0, corrupt
        self.public_key: Ed25519PublicKey = key.public_key()
        self.key_id: str = report_id or key_id(self.public_key)

    def sign(self, data: bytes) -> bytes:
        self.calls += 1
        sig = self._key.sign(data)
        return bytes([sig[0] ^ 1]) + sig[1:] if self._corrupt else sig


def test_key_signer_and_custom_signer_are_signers() -> None:
    key = Ed25519PrivateKey.generate()
    signer = KeySigner(key)
    assert isinstance(signer, Signer) and isinstance(CountingSigner(key), Signer)
    assert not isinstance(key, Signer)
    assert as_signer(signer) is signer and as_signer(key).key_id == signer.key_id
    assert "PRIVATE" not in repr(signer) and signer.key_id[:16] in repr(signer)
    with pytest.raises(KeyFileError):
        as_signer("a.key")  # type: ignore[arg-type]


def test_custom_signer_signs_a_manifest_the_device_check_accepts() -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    counting = CountingSigner(a)
    data = b'{"x":1}'
    sigs = sign_manifest(data, [counting, b])  # a Signer and a plain private key together
    assert counting.calls == 1
    trust = TrustedKeys((a.public_key(), b.public_key()), threshold=2)
    assert verify_signatures(data, sigs, trust) == sorted([key_id(a.public_key()), key_id(b.public_key())])


def test_a_signer_with_a_wrong_key_id_or_bad_signature_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(KeyFileError, match="key id"):
        sign_manifest(b"{}", [CountingSigner(key, report_id="00" * 32)])
    with pytest.raises(KeyFileError, match="does not verify"):
        sign_manifest(b"{}", [CountingSigner(key, corrupt=True)])


def test_a_failing_signer_becomes_a_key_file_error() -> None:
    class Offline(CountingSigner):
        def sign(self, data: bytes) -> bytes:
            raise ConnectionError("token removed")

    with pytest.raises(KeyFileError, match="ConnectionError: token removed") as info:
        sign_manifest(b"{}", [Offline(Ed25519PrivateKey.generate())])
    assert isinstance(info.value.__cause__, ConnectionError)


def test_trust_root_signed_by_a_custom_signer_and_an_encrypted_key(encrypted: tuple[Path, Path]) -> None:
    disk = KeySigner.from_file(encrypted[0], SECRET)
    hsm = CountingSigner(Ed25519PrivateKey.generate())
    root = make_root(version=1, expires="2099-01-01T00:00:00Z", root_keys=[disk.public_key, hsm.public_key],
                     bundle_keys=[hsm.public_key], root_threshold=2)  # fmt: skip
    loaded = load_root(sign_root(root, [disk, hsm]), now=None)
    assert loaded.version == 1 and hsm.calls == 1
