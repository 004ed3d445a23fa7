"""The one error tree of edgeship.

Errors are split by who is at fault: untrusted content (``BundleError`` and its children),
the caller's own data (``InputError``), the host-side build (``PackagingError``), the network
(``TransportError``) and local configuration (``KeyFileError``, ``BackendError``). Foreign
exceptions are converted at the seam where they happen, with ``raise X from e``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "BackendError",
    "BundleError",
    "DriftError",
    "EdgeshipError",
    "ExpiredError",
    "FreshnessError",
    "HealthCheckError",
    "InputError",
    "IntegrityError",
    "KeyFileError",
    "ManifestError",
    "ModelClosedError",
    "PackagingError",
    "RollbackError",
    "SignatureError",
    "StateError",
    "TransportError",
    "TrustRootError",
    "UnsafeArchiveError",
]


class EdgeshipError(Exception):
    """Root of every error edgeship raises on purpose."""


class BundleError(EdgeshipError):
    """A bundle cannot be trusted or read; nothing from it was installed or loaded."""


class ManifestError(BundleError):
    """The manifest is malformed: bad JSON, duplicate keys, missing or ill-typed fields."""


class SignatureError(BundleError):
    """Signatures are missing, invalid, from untrusted keys or below the threshold."""


class IntegrityError(BundleError):
    """A member's bytes do not match the manifest (hash, size), or a member is missing or extra."""


class RollbackError(BundleError):
    """The bundle's version is lower than the one installed and no downgrade was allowed."""


class ExpiredError(BundleError):
    """The bundle's ``expires`` time has passed (protects against freeze attacks)."""


class HealthCheckError(IntegrityError):
    """The model did not reproduce its bundle's golden outputs on this device.

    Attributes:
        metrics: what was measured, the same dict ``Model.health_check`` returns on success.
    """

    def __init__(self, message: str, metrics: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.metrics: dict[str, Any] = dict(metrics or {})


class UnsafeArchiveError(BundleError):
    """The archive itself is hostile or malformed: path traversal, links, devices, size bombs."""


class PackagingError(EdgeshipError):
    """The host could not build a bundle from the given model."""


class DriftError(PackagingError):
    """The built model's outputs differ from the original's beyond the tolerances."""


class InputError(EdgeshipError):
    """Inputs given to a model do not match its declared signature."""


class TransportError(EdgeshipError):
    """A network transfer failed (connection, timeout, truncated body)."""


class KeyFileError(EdgeshipError):
    """A key file is missing, malformed or has unsafe permissions."""


class BackendError(EdgeshipError):
    """The runtime a bundle needs is not installed or could not load the model."""


class ModelClosedError(EdgeshipError):
    """``predict`` or ``health_check`` was called on a ``Model`` after ``close()``."""


class StateError(EdgeshipError):
    """The device's state directory is unreadable, corrupt or cannot be written."""


class TrustRootError(EdgeshipError):
    """A trust root document is malformed, expired, not signed by a threshold of its root keys (and of the
    current root's, for an update), or not newer than the current root; the current root stays."""


class FreshnessError(TrustRootError):
    """Freshness metadata (``sdk.freshness``) is malformed, not signed by a threshold of the root's
    ``timestamp`` keys, expired, or older than (or different at the same version from) the one the
    device holds; the one it holds stays."""
