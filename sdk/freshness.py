"""Signed freshness: TUF's timestamp role, adapted to a fleet that pushes.

A trust root with a ``timestamp`` role (``sdk.trustroot``) asks its devices to hear, regularly, from the
fleet: the fleet server signs a short-lived document with the timestamp key and publishes it (a retained
MQTT message, ``sdk.mqtt_contract.Topics.freshness``); a device that holds only expired ones knows that
updates are being withheld from it (a freeze) instead of believing it is up to date::

    {"signed": {"_type": "edgeship-timestamp", "version": 1767225600, "issued": "2026-01-01T00:00:00Z",
                "expires": "2026-01-02T00:00:00Z", "root_version": 3},   (root_version: optional)
     "signatures": [{"keyid": "<hex>", "sig": "<hex>"}]}

A signature covers ``edgeship-timestamp-v1\\n`` + the canonical JSON of ``signed`` (domain-separated from
roots and manifests). ``root_version`` is the root the fleet distributes: a device whose root is older
knows a rotation (perhaps a revocation) is being withheld from it too.

Rules (``verify_freshness``), TUF's for timestamp metadata: signed by a threshold of the root's
``timestamp`` keys; not expired; a version not below the one the device holds (a lower one is a replay,
refused), and at the same version the very same document. Pure: no I/O, no clock of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature

from sdk.errors import FreshnessError, ManifestError
from sdk.manifest import canonical_json, format_time, parse_time, strict_json_loads
from sdk.signing import SigningKey, sign_entries
from sdk.trustroot import TrustRoot

__all__ = [
    "FRESHNESS_TYPE",
    "MAX_FRESHNESS_BYTES",
    "Freshness",
    "check_signed",
    "make_freshness",
    "sign_freshness",
    "verify_freshness",
]

FRESHNESS_CONTEXT = b"edgeship-timestamp-v1\n"
FRESHNESS_TYPE = "edgeship-timestamp"
MAX_FRESHNESS_BYTES = 16 * 2**10  # bytes of one document (real ones are under 1 KiB)
MAX_SIGNATURES = 64  # entries in its signatures list
_SIGNED_KEYS = {"_type", "version", "issued", "expires", "root_version"}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise FreshnessError(message)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class Freshness:
    """A parsed ``signed`` part (see the module docstring); validated in the constructor."""

    version: int
    issued: str
    expires: str
    root_version: int | None = None

    def __post_init__(self) -> None:
        _require(_is_count(self.version), f"freshness version must be an integer >= 0, got {self.version!r}")
        try:
            issued, expires = parse_time(self.issued, "issued"), parse_time(self.expires, "expires")
        except ManifestError as e:
            raise FreshnessError(f"freshness {e}") from e
        _require(expires > issued, "freshness expires must be after issued")
        _require(self.root_version is None or _is_count(self.root_version),
                 f"freshness root_version must be an integer >= 0, got {self.root_version!r}")  # fmt: skip

    def expires_at(self) -> datetime:
        return parse_time(self.expires, "expires")

    def expired(self, now: datetime) -> bool:
        return self.expires_at() <= now

    def to_json(self) -> dict[str, Any]:
        """The ``signed`` part."""
        signed: dict[str, Any] = {
            "_type": FRESHNESS_TYPE, "version": self.version, "issued": self.issued, "expires": self.expires,
        }  # fmt: skip
        if self.root_version is not None:
            signed["root_version"] = self.root_version
        return signed

    @classmethod
    def from_json(cls, signed: Any) -> Freshness:
        """Parse a ``signed`` part strictly.

        Raises:
            FreshnessError: unknown or missing keys, wrong types, bad values.
        """
        _require(isinstance(signed, dict), "freshness.signed must be an object")
        unknown = sorted(set(signed) - _SIGNED_KEYS)
        _require(not unknown, f"freshness.signed has unknown keys {unknown[:5]}")
        _require(signed.get("_type") == FRESHNESS_TYPE, f"freshness.signed._type must be {FRESHNESS_TYPE!r}")
        for key in ("issued", "expires"):
            _require(isinstance(signed.get(key), str), f"freshness.signed.{key} is required (a UTC timestamp)")
        return cls(signed.get("version"), signed["issued"], signed["expires"], signed.get("root_version"))  # type: ignore[arg-type]


def make_freshness(version: int, issued: datetime, lifetime: timedelta, root_version: int | None = None) -> Freshness:
    """Freshness metadata issued at ``issued`` (aware), valid for ``lifetime`` (whole seconds)."""
    return Freshness(version, format_time(issued), format_time(issued + lifetime), root_version)


def _message(signed: Mapping[str, Any]) -> bytes:
    try:
        return FRESHNESS_CONTEXT + canonical_json(signed)
    except ManifestError as e:
        raise FreshnessError(str(e)) from e


def sign_freshness(fresh: Freshness, keys: Sequence[SigningKey]) -> bytes:
    """The canonical document, signed by each key (a ``Signer`` or an ``Ed25519PrivateKey``).

    Raises:
        FreshnessError: no key.
        KeyFileError: a signer failed.
    """
    _require(bool(keys), "at least one key must sign freshness metadata")
    signed = fresh.to_json()
    signatures = [{"keyid": kid, "sig": sig} for kid, sig in sorted(sign_entries(_message(signed), keys).items())]
    return canonical_json({"signed": signed, "signatures": signatures})


def _parse(data: bytes | Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, str]]]:
    if isinstance(data, (bytes, bytearray)):
        _require(len(data) <= MAX_FRESHNESS_BYTES, f"a freshness document is at most {MAX_FRESHNESS_BYTES} bytes")
        try:
            doc = strict_json_loads(bytes(data), "freshness")
        except ManifestError as e:
            raise FreshnessError(str(e)) from e
    else:
        doc = data
    _require(isinstance(doc, Mapping) and set(doc) == {"signed", "signatures"},
             'a freshness document is {"signed": {...}, "signatures": [...]}')  # fmt: skip
    signatures = doc["signatures"]
    _require(isinstance(signatures, list) and len(signatures) <= MAX_SIGNATURES,
             f"freshness.signatures must be a list of at most {MAX_SIGNATURES}")  # fmt: skip
    for entry in signatures:
        ok = isinstance(entry, dict) and set(entry) == {"keyid", "sig"}
        _require(ok and all(isinstance(v, str) for v in entry.values()), 'each signature is {"keyid", "sig"}')
    _require(isinstance(doc["signed"], dict), "freshness.signed must be an object")
    return doc["signed"], signatures


def check_signed(data: bytes | Mapping[str, Any], root: TrustRoot) -> Freshness:
    """Parse ``data`` and check that a threshold of ``root``'s ``timestamp`` keys signed it (nothing else:
    neither expiry nor version; ``verify_freshness`` adds them).

    Raises:
        FreshnessError: malformed, the root has no ``timestamp`` role, or below its threshold.
    """
    signed, signatures = _parse(data)
    fresh = Freshness.from_json(signed)
    keys = root.timestamp_keys()
    _require(keys is not None, f"root v{root.version} has no timestamp role: it asks for no freshness metadata")
    assert keys is not None
    trusted = keys.by_id()
    message = _message(signed)
    valid: set[str] = set()
    for entry in signatures:
        key = trusted.get(entry["keyid"])
        if key is None:
            continue
        try:
            key.verify(bytes.fromhex(entry["sig"]), message)
        except (InvalidSignature, ValueError):
            continue
        valid.add(entry["keyid"])
    _require(len(valid) >= keys.threshold,
             f"{len(valid)} valid signature(s) of the root's timestamp keys, {keys.threshold} required")  # fmt: skip
    return fresh


def verify_freshness(
    data: bytes | Mapping[str, Any], root: TrustRoot, *, now: datetime, current: Freshness | None
) -> Freshness:
    """The freshness ``data`` holds, if it may replace ``current`` (TUF's rules, module docstring).

    Raises:
        FreshnessError: malformed, below the root's timestamp threshold, expired at ``now``, a version
            below ``current``'s, or a different document at ``current``'s version.
    """
    fresh = check_signed(data, root)
    if current is not None:
        _require(fresh.version >= current.version,
                 f"freshness version {fresh.version} is below the version {current.version} this device holds "
                 "(a replay)")  # fmt: skip
        _require(fresh.version > current.version or fresh == current,
                 f"freshness version {fresh.version} differs from the one held at that version")  # fmt: skip
    _require(not fresh.expired(now), f"freshness v{fresh.version} expired at {fresh.expires}")
    return fresh
