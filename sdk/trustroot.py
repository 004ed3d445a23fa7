"""The signed trust root: which keys sign bundles, which keys sign the next root, and what they allow.

Modelled on TUF's root metadata (version, expiry, keys, roles with thresholds, rotation by the old keys,
revocation by a new root without the key), written as canonical JSON::

    {"signed": {"_type": "edgeship-root", "version": 2, "expires": "2027-01-01T00:00:00Z",
                "keys": {"<keyid>": {"ed25519": "<32 raw bytes, hex>"}},
                "roles": {"root": {"keyids": [...], "threshold": 1},
                          "bundles": {"keyids": [...], "threshold": 1},
                          "timestamp": {"keyids": [...], "threshold": 1}},   (optional: signed freshness)
                "pins": ["linear"],             (optional: the model names a device may run)
                "downgrades": {"linear": 3}},   (optional: versions below the floor it may install)
     "signatures": [{"keyid": "<hex>", "sig": "<hex>"}]}

A signature covers ``edgeship-root-v1\\n`` + the canonical JSON of ``signed`` (domain-separated from
manifest signatures). A root is valid on its own when a threshold of its ``root`` role signed it; a new
root replaces the current one only if, in addition, a threshold of the *current* root's ``root`` role
signed it and its version is higher (TUF's rotation rule). Key ids are ``sdk.signing.key_id``.

The optional ``timestamp`` role (TUF's timestamp role, adapted) names the keys that sign the fleet's
freshness metadata (``sdk.freshness``); a root without it asks for no freshness.

Pure: no I/O. The device keeps its root in its state directory (``device_runtime.agent.trust``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sdk.errors import ManifestError, RollbackError, TrustRootError
from sdk.manifest import canonical_json, parse_time, strict_json_loads
from sdk.signing import SigningKey, TrustedKeys, key_id, sign_entries

__all__ = [
    "OPTIONAL_ROLES",
    "ROLES",
    "Role",
    "TrustRoot",
    "add_signatures",
    "load_root",
    "make_root",
    "sign_root",
    "update_root",
]

ROOT_CONTEXT = b"edgeship-root-v1\n"
ROOT_TYPE = "edgeship-root"
ROLES = ("root", "bundles")  # every root has these
OPTIONAL_ROLES = ("timestamp",)  # a root may have these
MAX_ROOT_BYTES = 64 * 2**10  # bytes of a root document
MAX_KEYS = 64  # keys in one root
MAX_NAMES = 256  # pins and downgrades
_SIGNED_KEYS = {"_type", "version", "expires", "keys", "roles", "pins", "downgrades"}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise TrustRootError(message)


def _raw(key: Ed25519PublicKey) -> str:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


@dataclass(frozen=True)
class Role:
    """The keys of one role and how many of them must sign."""

    keyids: tuple[str, ...]
    threshold: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"keyids": sorted(self.keyids), "threshold": self.threshold}


@dataclass(frozen=True)
class TrustRoot:
    """A parsed root (see the module docstring); validated in the constructor.

    Attributes:
        version: strictly increasing from one root to its successor (0: an implicit root from ``--trust``).
        expires: ``YYYY-MM-DDTHH:MM:SSZ``; None only for an implicit root.
        keys: key id -> public key.
        roles: ``"root"`` and ``"bundles"``, and optionally ``"timestamp"`` (who signs freshness).
        pins: model names a device may run; None: the name of the model it runs (the first installed).
        downgrades: name -> the lowest version a device may install below its floor for that name.
    """

    version: int
    expires: str | None
    keys: Mapping[str, Ed25519PublicKey]
    roles: Mapping[str, Role]
    pins: tuple[str, ...] | None = None
    downgrades: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(isinstance(self.version, int) and not isinstance(self.version, bool) and self.version >= 0,
                 f"root version must be an integer >= 0, got {self.version!r}")  # fmt: skip
        if self.expires is not None:
            try:
                parse_time(self.expires, "expires")
            except ManifestError as e:
                raise TrustRootError(f"root {e}") from e
        _require(0 < len(self.keys) <= MAX_KEYS, f"a root lists 1-{MAX_KEYS} keys")
        for kid, key in self.keys.items():
            _require(key_id(key) == kid, f"key id {kid[:16]} is not the sha256 of its key")
        _require(set(ROLES) <= set(self.roles) <= {*ROLES, *OPTIONAL_ROLES},
                 f"root roles must be {ROLES}, optionally with {OPTIONAL_ROLES}")  # fmt: skip
        for name, role in self.roles.items():
            ok = isinstance(role.threshold, int) and not isinstance(role.threshold, bool)
            _require(ok and 1 <= role.threshold <= len(set(role.keyids)),
                     f"role {name}: threshold must be 1-{len(set(role.keyids))}, got {role.threshold!r}")  # fmt: skip
            unknown = [k for k in role.keyids if k not in self.keys]
            _require(not unknown, f"role {name} names keys the root does not list")
        if self.pins is not None:
            _require(0 < len(self.pins) <= MAX_NAMES and all(isinstance(n, str) and n for n in self.pins),
                     f"pins must be 1-{MAX_NAMES} model names (omit it to pin the running model)")  # fmt: skip
        _require(len(self.downgrades) <= MAX_NAMES, f"at most {MAX_NAMES} downgrades")
        for name, version in self.downgrades.items():
            ok = isinstance(version, int) and not isinstance(version, bool) and version >= 0
            _require(bool(name) and ok, f"downgrades.{name} must be a version >= 0, got {version!r}")

    @classmethod
    def implicit(cls, trust: TrustedKeys) -> TrustRoot:
        """The root a device started with ``--trust PUB ... --threshold N`` has: version 0, no expiry, the
        same keys and threshold for both roles (so those keys can sign the first real root)."""
        keys = trust.by_id()
        role = Role(tuple(sorted(keys)), trust.threshold)
        return cls(0, None, keys, {"root": role, "bundles": role})

    def role_keys(self, role: str) -> TrustedKeys:
        r = self.roles[role]
        return TrustedKeys(tuple(self.keys[k] for k in sorted(set(r.keyids))), r.threshold)

    def timestamp_keys(self) -> TrustedKeys | None:
        """The keys (and threshold) freshness metadata must be signed with; None: the root asks for none."""
        return self.role_keys("timestamp") if "timestamp" in self.roles else None

    def bundle_keys(self) -> TrustedKeys:
        """The keys (and threshold) a bundle must be signed with under this root."""
        return self.role_keys("bundles")

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and parse_time(self.expires, "expires") <= now

    def effective_floor(self, name: str, floor: int | None, running: str | None) -> int | None:
        """The version floor a bundle named ``name`` must meet on a device running ``running``.

        Raises:
            RollbackError: the root's ``pins`` (or, without pins, the running model's name) exclude ``name``.
        """
        allowed = self.pins if self.pins is not None else (None if running is None else (running,))
        if allowed is not None and name not in allowed:
            raise RollbackError(
                f"bundle {name!r} is not a model this device may run ({', '.join(allowed)}); "
                "a change of model needs a trust root whose pins list it"
            )
        lowest = self.downgrades.get(name)
        if floor is None or lowest is None:
            return floor
        return min(floor, lowest)

    def to_json(self) -> dict[str, Any]:
        """The ``signed`` part."""
        signed: dict[str, Any] = {
            "_type": ROOT_TYPE,
            "version": self.version,
            "expires": self.expires,
            "keys": {kid: {"ed25519": _raw(k)} for kid, k in sorted(self.keys.items())},
            "roles": {name: self.roles[name].to_json() for name in (*ROLES, *OPTIONAL_ROLES) if name in self.roles},
        }
        if self.pins is not None:
            signed["pins"] = sorted(self.pins)
        if self.downgrades:
            signed["downgrades"] = dict(sorted(self.downgrades.items()))
        return signed

    @classmethod
    def from_json(cls, signed: Any) -> TrustRoot:
        """Parse a ``signed`` part strictly.

        Raises:
            TrustRootError: unknown or missing keys, wrong types, bad values.
        """
        _require(isinstance(signed, dict), "root.signed must be an object")
        unknown = sorted(set(signed) - _SIGNED_KEYS)
        _require(not unknown, f"root.signed has unknown keys {unknown[:5]}")
        _require(signed.get("_type") == ROOT_TYPE, f"root.signed._type must be {ROOT_TYPE!r}")
        _require(isinstance(signed.get("expires"), str), "root.signed.expires is required (a UTC timestamp)")
        raw_keys, raw_roles = signed.get("keys"), signed.get("roles")
        _require(isinstance(raw_keys, dict) and isinstance(raw_roles, dict), "root.signed needs keys and roles")
        keys: dict[str, Ed25519PublicKey] = {}
        for kid, entry in raw_keys.items():
            ok = isinstance(entry, dict) and set(entry) == {"ed25519"} and isinstance(entry["ed25519"], str)
            _require(ok, 'each root key is {"ed25519": "<hex>"}')
            try:
                keys[kid] = Ed25519PublicKey.from_public_bytes(bytes.fromhex(entry["ed25519"]))
            except ValueError as e:
                raise TrustRootError(f"root key {kid[:16]} is not an Ed25519 public key") from e
        roles: dict[str, Role] = {}
        for name, role in raw_roles.items():
            ok = isinstance(role, dict) and set(role) == {"keyids", "threshold"} and isinstance(role["keyids"], list)
            _require(ok and all(isinstance(k, str) for k in role["keyids"]),
                     f'role {name!r} must be {{"keyids": [...], "threshold": n}}')  # fmt: skip
            _require(len(set(role["keyids"])) == len(role["keyids"]), f"role {name!r} lists a key twice")
            roles[name] = Role(tuple(role["keyids"]), role["threshold"])
        pins = signed.get("pins")
        _require(pins is None or isinstance(pins, list), "root.signed.pins must be a list of model names")
        downgrades = signed.get("downgrades", {})
        _require(isinstance(downgrades, dict), "root.signed.downgrades must be an object of names to versions")
        return cls(signed.get("version"), signed["expires"], keys, roles,  # type: ignore[arg-type]
                   None if pins is None else tuple(pins), dict(downgrades))  # fmt: skip


def make_root(
    *,
    version: int,
    expires: str,
    root_keys: Iterable[Ed25519PublicKey],
    bundle_keys: Iterable[Ed25519PublicKey],
    root_threshold: int = 1,
    bundle_threshold: int = 1,
    pins: Sequence[str] | None = None,
    downgrades: Mapping[str, int] | None = None,
    timestamp_keys: Iterable[Ed25519PublicKey] = (),
    timestamp_threshold: int = 1,
) -> TrustRoot:
    """A root from public keys (the host's ``edgeship keys root create``); ``timestamp_keys`` (none: no
    ``timestamp`` role) sign the fleet's freshness metadata."""
    root_list, bundle_list, timestamp_list = list(root_keys), list(bundle_keys), list(timestamp_keys)
    keys = {key_id(k): k for k in [*root_list, *bundle_list, *timestamp_list]}
    roles = {
        "root": Role(tuple(sorted({key_id(k) for k in root_list})), root_threshold),
        "bundles": Role(tuple(sorted({key_id(k) for k in bundle_list})), bundle_threshold),
    }
    if timestamp_list:
        roles["timestamp"] = Role(tuple(sorted({key_id(k) for k in timestamp_list})), timestamp_threshold)
    return TrustRoot(version, expires, keys, roles, None if pins is None else tuple(pins), dict(downgrades or {}))


def _message(signed: Mapping[str, Any]) -> bytes:
    try:
        return ROOT_CONTEXT + canonical_json(signed)
    except ManifestError as e:
        raise TrustRootError(str(e)) from e


def _sign_signed(signed: Mapping[str, Any], keys: Sequence[SigningKey], existing: Sequence[Any] = ()) -> bytes:
    message = _message(signed)
    entries = {e["keyid"]: e["sig"] for e in existing}
    entries.update(sign_entries(message, keys))
    signatures = [{"keyid": kid, "sig": sig} for kid, sig in sorted(entries.items())]
    return canonical_json({"signed": signed, "signatures": signatures})


def sign_root(root: TrustRoot, keys: Sequence[SigningKey]) -> bytes:
    """The canonical root document, signed by each key (a ``Signer`` or an ``Ed25519PrivateKey``).

    Raises:
        TrustRootError: no key.
        KeyFileError: a signer failed (``sdk.signing.sign_entries``).
    """
    _require(bool(keys), "at least one key must sign a root")
    return _sign_signed(root.to_json(), keys)


def _parse(data: bytes | Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, str]]]:
    if isinstance(data, (bytes, bytearray)):
        _require(len(data) <= MAX_ROOT_BYTES, f"a root document is at most {MAX_ROOT_BYTES} bytes")
        try:
            doc = strict_json_loads(bytes(data), "root")
        except ManifestError as e:
            raise TrustRootError(str(e)) from e
    else:
        doc = data
    _require(isinstance(doc, dict) and set(doc) == {"signed", "signatures"},
             'a root document is {"signed": {...}, "signatures": [...]}')  # fmt: skip
    signatures = doc["signatures"]
    _require(isinstance(signatures, list), "root.signatures must be a list")
    for entry in signatures:
        ok = isinstance(entry, dict) and set(entry) == {"keyid", "sig"}
        _require(ok and all(isinstance(v, str) for v in entry.values()), 'each signature is {"keyid", "sig"}')
    _require(isinstance(doc["signed"], dict), "root.signed must be an object")
    return doc["signed"], signatures


def add_signatures(data: bytes, keys: Sequence[SigningKey]) -> bytes:
    """``data`` (a root document) with signatures of ``keys`` added (``edgeship keys root sign``)."""
    signed, existing = _parse(data)
    TrustRoot.from_json(signed)
    return _sign_signed(signed, keys, existing)


def _check_threshold(signed: Mapping[str, Any], signatures: Sequence[Mapping[str, str]], by: TrustRoot,
                     what: str) -> None:  # fmt: skip
    message = _message(signed)
    role = by.roles["root"]
    valid: set[str] = set()
    for entry in signatures:
        kid = entry["keyid"]
        if kid not in role.keyids or kid not in by.keys:
            continue
        try:
            by.keys[kid].verify(bytes.fromhex(entry["sig"]), message)
        except (InvalidSignature, ValueError):
            continue
        valid.add(kid)
    _require(len(valid) >= role.threshold,
             f"{len(valid)} valid signature(s) of {what}'s root keys, {role.threshold} required")  # fmt: skip


def load_root(data: bytes | Mapping[str, Any], *, now: datetime | None) -> TrustRoot:
    """Parse a root document and check that a threshold of its own root keys signed it, unexpired.

    The first root of a device (``--trust-root FILE``, from its image) is accepted this way. ``now=None``
    skips the expiry (the root a device already holds: an expired one is reported, not dropped).

    Raises:
        TrustRootError: malformed, below its own threshold, or expired at ``now``.
    """
    signed, signatures = _parse(data)
    root = TrustRoot.from_json(signed)
    _check_threshold(signed, signatures, root, "the new root")
    _require(now is None or not root.expired(now), f"root v{root.version} expired at {root.expires}")
    return root


def update_root(current: TrustRoot, data: bytes | Mapping[str, Any], *, now: datetime) -> TrustRoot:
    """The next root, if it follows ``current`` by TUF's rule.

    Raises:
        TrustRootError: malformed, expired, not signed by a threshold of its own root keys and of the
            current root's, or a version not above the current one.
    """
    signed, signatures = _parse(data)
    root = load_root(data, now=now)
    _check_threshold(signed, signatures, current, "the current root")
    _require(root.version > current.version,
             f"root version {root.version} is not above the current version {current.version}")  # fmt: skip
    return root
