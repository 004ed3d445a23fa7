"""edgeship's shared kernel and public face.

The kernel (``sdk.manifest``, ``sdk.signing``, ``sdk.bundle``, ``sdk.errors``) needs only numpy
and cryptography and is what the device imports. ``package`` and ``load`` are thin facades over
``packagers`` (host) and ``device_runtime`` (device), imported only when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from device_runtime import Model
    from packagers import PackageResult

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


def package(model: Any, **kwargs: Any) -> list[PackageResult]:
    """Build signed bundles from a model; see ``packagers.package`` for the arguments."""
    from packagers import package as _package

    return _package(model, **kwargs)


def load(path: Any, trust: Any, **kwargs: Any) -> Model:
    """Verify and load a bundle; see ``device_runtime.load`` for the arguments."""
    from device_runtime import load as _load

    return _load(path, trust, **kwargs)
