"""edgeship's shared kernel and public face.

The kernel (every ``sdk`` module but ``sdk.api`` and ``sdk.cli``: manifest, signing, bundle, errors,
fsutil, ...) needs only numpy and cryptography, is what the device imports, and imports nothing of
``packagers``, ``device_runtime`` or ``fleet`` (docs/architecture.md; ``make lint`` checks it).
``package`` and ``load`` (``sdk.api``) are thin facades over ``packagers`` (host) and
``device_runtime`` (device), imported only when called.
"""

from __future__ import annotations

from sdk.api import load, package
from sdk.errors import (
    BackendError,
    BundleError,
    DriftError,
    EdgeshipError,
    ExpiredError,
    InputError,
    IntegrityError,
    KeyFileError,
    ManifestError,
    PackagingError,
    RollbackError,
    SignatureError,
    TransportError,
    UnsafeArchiveError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BundleError",
    "DriftError",
    "EdgeshipError",
    "ExpiredError",
    "InputError",
    "IntegrityError",
    "KeyFileError",
    "ManifestError",
    "PackagingError",
    "RollbackError",
    "SignatureError",
    "TransportError",
    "UnsafeArchiveError",
    "__version__",
    "load",
    "package",
]
