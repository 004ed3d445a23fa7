"""Ed25519 keys, key ids and threshold signatures over canonical manifest bytes.

A key id is the hex sha256 of the 32 raw public-key bytes. ``signatures.json`` is a JSON list of
``{"keyid": hex, "sig": hex}``. A device trusts a set of public keys and a threshold: the bundle
is accepted when at least ``threshold`` distinct trusted keys have a valid signature.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sdk.errors import KeyFileError, ManifestError, SignatureError
from sdk.manifest import canonical_json, strict_json_loads

__all__ = [
    "TrustedKeys",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "sign_manifest",
    "signed_message",
    "verify_signatures",
]

MAX_KEY_FILE_BYTES = 16 * 2**10  # bytes
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


def generate_keypair(out_dir: str | os.PathLike[str], name: str = "edgeship") -> tuple[Path, Path]:
    """Create ``NAME.key`` (PKCS#8 PEM, mode 0600) and ``NAME.pub`` (PEM) in ``out_dir``.

    Returns:
        The private and public key paths.

    Raises:
        KeyFileError: either file exists already (keys are never overwritten).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (private_path, public_path):
        if p.exists():
            raise KeyFileError(f"{p} exists already; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
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


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PEM), refusing one that others can read.

    Raises:
        KeyFileError: missing, unreadable, group/world accessible, or not an Ed25519 private key.
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
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{p} is not an unencrypted PEM private key") from e
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


def sign_manifest(manifest_bytes: bytes, keys: Sequence[Ed25519PrivateKey]) -> bytes:
    """Sign manifest bytes with each key; returns the canonical ``signatures.json`` bytes."""
    if not keys:
        raise KeyFileError("at least one signing key is needed")
    entries = {key_id(k.public_key()): k.sign(signed_message(manifest_bytes)).hex() for k in keys}
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
