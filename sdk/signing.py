"""Ed25519 keys, key ids and threshold signatures over canonical manifest bytes.

A key id is the hex sha256 of the 32 raw public-key bytes. ``signatures.json`` is a JSON list of
``{"keyid": hex, "sig": hex}``. A device trusts a set of public keys and a threshold: the bundle
is accepted when at least ``threshold`` distinct trusted keys have a valid signature.

Whatever signs (bundles, trust roots) is a ``Signer``: a key id, its public key and ``sign(data)``.
``KeySigner`` holds a private key in memory (from a file, encrypted with a passphrase or not); an
HSM or a KMS is another ``Signer`` (docs/security.md has a PKCS#11 sketch). Every signature a signer
returns is checked against its public key before it is used.
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeAlias, runtime_checkable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sdk.errors import EdgeshipError, KeyFileError, ManifestError, SignatureError
from sdk.manifest import canonical_json, strict_json_loads

__all__ = [
    "PASSPHRASE_ENV",
    "KeySigner",
    "Signer",
    "SigningKey",
    "TrustedKeys",
    "as_signer",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "passphrase_from_env",
    "read_passphrase_file",
    "sign_entries",
    "sign_manifest",
    "signed_message",
    "verify_signatures",
]

MAX_KEY_FILE_BYTES = 16 * 2**10  # bytes
MAX_PASSPHRASE_BYTES = 1023  # bytes; the most cryptography's PKCS#8 encryption takes
PASSPHRASE_ENV = "EDGESHIP_KEY_PASSPHRASE"
_NO_PASSPHRASE = "the key is encrypted: pass --passphrase-file or set EDGESHIP_KEY_PASSPHRASE"
# Signed message = context + manifest bytes. The context (domain separation) means a signature
# made by the same key over some other JSON document can never pass as a manifest signature.
SIGNING_CONTEXT = b"edgeship-manifest-v1\n"


def signed_message(manifest_bytes: bytes) -> bytes:
    """The exact bytes an Ed25519 manifest signature covers."""
    return SIGNING_CONTEXT + manifest_bytes


def key_id(public_key: Ed25519PublicKey) -> str:
    """Hex sha256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    # O_EXCL: never overwrite an existing key; mode 0600 from the first byte written.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _passphrase_bytes(passphrase: bytes | str, where: str) -> bytes:
    data = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
    if not data:
        raise KeyFileError(f"{where}: the passphrase is empty")
    if len(data) > MAX_PASSPHRASE_BYTES:
        raise KeyFileError(f"{where}: the passphrase is longer than {MAX_PASSPHRASE_BYTES} bytes")
    return data


def read_passphrase_file(path: str | os.PathLike[str]) -> bytes:
    """The passphrase in a file: its bytes without one trailing newline (``echo secret > F`` works).

    Raises:
        KeyFileError: missing, unreadable, empty or longer than 1023 bytes. The message never holds the
            passphrase.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_PASSPHRASE_BYTES + 3)
    except OSError as e:
        raise KeyFileError(f"cannot read passphrase file {p}: {e.strerror or e}") from e
    for end in (b"\r\n", b"\n"):
        if data.endswith(end):
            data = data[: -len(end)]
            break
    return _passphrase_bytes(data, f"passphrase file {p}")


def passphrase_from_env() -> bytes | None:
    """``$EDGESHIP_KEY_PASSPHRASE`` as UTF-8 bytes; None when it is unset or empty."""
    value = os.environ.get(PASSPHRASE_ENV)
    return _passphrase_bytes(value, PASSPHRASE_ENV) if value else None


def generate_keypair(
    out_dir: str | os.PathLike[str], name: str = "edgeship", passphrase: bytes | str | None = None
) -> tuple[Path, Path]:
    """Create ``NAME.key`` (PKCS#8 PEM, mode 0600) and ``NAME.pub`` (PEM) in ``out_dir``.

    Args:
        out_dir: the folder (created if missing).
        name: the file name stem.
        passphrase: encrypt the private key with it (PKCS#8 ``ENCRYPTED PRIVATE KEY``, the best
            encryption ``cryptography`` has); None writes it unencrypted. The public key is the same
            either way.

    Returns:
        The private and public key paths.

    Raises:
        KeyFileError: either file exists already (keys are never overwritten), or the passphrase is
            empty or too long.
    """
    encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    if passphrase is not None:
        encryption = serialization.BestAvailableEncryption(_passphrase_bytes(passphrase, "generate_keypair"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (private_path, public_path):
        if p.exists():
            raise KeyFileError(f"{p} exists already; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_private(private_path, private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def _read_key_file(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"{path} is too large to be a key file")
        return path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror or e}") from e


def _is_encrypted(data: bytes) -> bool:
    # PKCS#8 (what edgeship writes) or a traditional OpenSSL PEM with a Proc-Type header.
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data


def load_private_key(path: str | os.PathLike[str], passphrase: bytes | str | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PEM, encrypted or not), refusing one that others can read.

    Args:
        path: the key file.
        passphrase: decrypts an encrypted key; when None, ``$EDGESHIP_KEY_PASSPHRASE`` is used for an
            encrypted key (and ignored for an unencrypted one). Given for a key that is not encrypted,
            the key loads and a ``UserWarning`` says the passphrase was not needed.

    Raises:
        KeyFileError: missing, unreadable, group/world accessible, encrypted without a passphrase,
            a wrong passphrase, or not an Ed25519 private key. No message holds the passphrase.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError as e:
        raise KeyFileError(f"cannot read private key {p}: {e.strerror or e}") from e
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"private key {p} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); run: chmod 600 {p}"
        )
    data = _read_key_file(p)
    password: bytes | None = None
    if _is_encrypted(data):
        password = _passphrase_bytes(passphrase, str(p)) if passphrase is not None else passphrase_from_env()
        if password is None:
            raise KeyFileError(f"{p}: {_NO_PASSPHRASE}")
    elif passphrase is not None:
        warnings.warn(f"{p} is not encrypted: the passphrase was not needed", UserWarning, stacklevel=2)
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        if password is not None:
            raise KeyFileError(f"{p}: wrong passphrase, or not an encrypted PEM private key") from e
        raise KeyFileError(f"{p} is not a PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{p} holds a {type(key).__name__}, edgeship signs with Ed25519")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load an Ed25519 public key (PEM).

    Raises:
        KeyFileError: missing, unreadable or not an Ed25519 public key.
    """
    p = Path(path)
    data = _read_key_file(p)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{p} is not a PEM public key") from e
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{p} holds a {type(key).__name__}, edgeship verifies Ed25519")
    return key


@runtime_checkable
class Signer(Protocol):
    """Whatever signs bundles and trust roots: an in-memory key (``KeySigner``), an HSM, a KMS.

    ``sign`` returns a 64-byte Ed25519 signature (RFC 8032 pure Ed25519, not Ed25519ph) over exactly
    ``data``. edgeship checks that ``key_id`` is ``sdk.signing.key_id(public_key)`` and verifies every
    signature with ``public_key`` before writing it, so a misconfigured signer fails the build instead
    of producing bundles no device accepts.
    """

    @property
    def key_id(self) -> str:
        """Hex sha256 of the raw public key (``sdk.signing.key_id``)."""
        ...

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The Ed25519 public key devices trust."""
        ...

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature over ``data``."""
        ...


class KeySigner:
    """A ``Signer`` over an Ed25519 private key held in this process."""

    __slots__ = ("_key", "_key_id", "_public_key")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"KeySigner takes an Ed25519PrivateKey, got {type(key).__name__}")
        self._key = key
        self._public_key = key.public_key()
        self._key_id = key_id(self._public_key)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], passphrase: bytes | str | None = None) -> KeySigner:
        """Load a key file (see ``load_private_key``: passphrase, ``$EDGESHIP_KEY_PASSPHRASE``, mode 0600).

        Raises:
            KeyFileError: as ``load_private_key``.
        """
        return cls(load_private_key(path, passphrase))

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._public_key

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def __repr__(self) -> str:  # never the key itself
        return f"KeySigner(key_id={self._key_id[:16]}...)"


SigningKey: TypeAlias = "Signer | Ed25519PrivateKey"


def as_signer(key: SigningKey) -> Signer:
    """A ``Signer`` as is; an ``Ed25519PrivateKey`` wrapped in a ``KeySigner``.

    Raises:
        KeyFileError: neither.
    """
    if isinstance(key, Ed25519PrivateKey):
        return KeySigner(key)
    if isinstance(key, Signer):
        return key
    raise KeyFileError(f"a signing key is a Signer or an Ed25519PrivateKey, got {type(key).__name__}")


def sign_entries(message: bytes, keys: Sequence[SigningKey]) -> dict[str, str]:
    """Sign ``message`` with each key: key id -> hex signature, each checked against its public key.

    Raises:
        KeyFileError: no key; a signer whose key id is not its public key's, whose ``sign`` failed (the
            foreign error is chained), or whose signature does not verify.
    """
    if not keys:
        raise KeyFileError("at least one signing key is needed")
    entries: dict[str, str] = {}
    for key in keys:
        signer = as_signer(key)
        public = signer.public_key
        kid = key_id(public)
        if signer.key_id != kid:
            raise KeyFileError(
                f"signer {signer.key_id[:16]} reports a key id that is not its public key's ({kid[:16]})"
            )
        try:
            signature = bytes(signer.sign(message))
        except EdgeshipError:
            raise
        except Exception as e:  # an HSM/KMS client's own error, converted at this seam
            raise KeyFileError(f"signer {kid[:16]} failed: {type(e).__name__}: {e}") from e
        try:
            public.verify(signature, message)
        except InvalidSignature as e:
            raise KeyFileError(
                f"signer {kid[:16]} returned a signature its public key does not verify "
                "(a different key, or not pure Ed25519?)"
            ) from e
        entries[kid] = signature.hex()
    return entries


def sign_manifest(manifest_bytes: bytes, keys: Sequence[SigningKey]) -> bytes:
    """Sign manifest bytes with each key (a ``Signer`` or an ``Ed25519PrivateKey``).

    Returns:
        The canonical ``signatures.json`` bytes.

    Raises:
        KeyFileError: as ``sign_entries``.
    """
    entries = sign_entries(signed_message(manifest_bytes), keys)
    return canonical_json([{"keyid": kid, "sig": sig} for kid, sig in sorted(entries.items())])


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys a device trusts and how many of them must sign."""

    keys: tuple[Ed25519PublicKey, ...]
    threshold: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        ids = {key_id(k) for k in self.keys}
        if len(ids) != len(self.keys):
            raise KeyFileError("the same public key is trusted twice")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int):
            raise KeyFileError(f"threshold must be an integer, got {self.threshold!r}")
        if not 1 <= self.threshold <= len(self.keys):
            raise KeyFileError(f"threshold {self.threshold} needs between 1 and {len(self.keys)} trusted keys")

    @classmethod
    def from_files(cls, paths: Iterable[str | os.PathLike[str]], threshold: int = 1) -> TrustedKeys:
        return cls(tuple(load_public_key(p) for p in paths), threshold)

    @classmethod
    def coerce(cls, trust: TrustedKeys | Iterable[str | os.PathLike[str] | Ed25519PublicKey]) -> TrustedKeys:
        """Accept a TrustedKeys, or a list of public keys / key file paths (threshold 1)."""
        if isinstance(trust, TrustedKeys):
            return trust
        if isinstance(trust, (str, os.PathLike, Ed25519PublicKey)):
            trust = [trust]
        keys = [k if isinstance(k, Ed25519PublicKey) else load_public_key(k) for k in trust]
        if not keys:
            raise KeyFileError("no trusted public keys given")
        return cls(tuple(keys))

    def by_id(self) -> dict[str, Ed25519PublicKey]:
        return {key_id(k): k for k in self.keys}


def verify_signatures(manifest_bytes: bytes, signatures_bytes: bytes, trust: TrustedKeys) -> list[str]:
    """Check ``signatures.json`` against the trusted keys; pure, no I/O.

    Returns:
        The sorted ids of the trusted keys whose signatures are valid.

    Raises:
        SignatureError: malformed signatures file, or fewer distinct valid trusted signatures
            than the threshold. Duplicate entries for one key count once.
    """
    try:
        entries = strict_json_loads(signatures_bytes, "signatures.json")
    except ManifestError as e:
        raise SignatureError(str(e)) from e
    if not isinstance(entries, list):
        raise SignatureError("signatures.json must be a JSON list")
    trusted = trust.by_id()
    valid: set[str] = set()
    for entry in entries:
        if not (isinstance(entry, dict) and set(entry) == {"keyid", "sig"}
                and isinstance(entry["keyid"], str) and isinstance(entry["sig"], str)):  # fmt: skip
            raise SignatureError('each signature must be {"keyid": str, "sig": str}')
        key = trusted.get(entry["keyid"])
        if key is None:
            continue
        try:
            key.verify(bytes.fromhex(entry["sig"]), signed_message(manifest_bytes))
        except (InvalidSignature, ValueError):
            continue
        valid.add(entry["keyid"])
    if len(valid) < trust.threshold:
        raise SignatureError(
            f"{len(valid)} valid signature(s) from trusted keys, {trust.threshold} required "
            f"({len(entries)} signature(s) present, {len(trusted)} key(s) trusted)"
        )
    return sorted(valid)
