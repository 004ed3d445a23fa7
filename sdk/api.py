"""The two-call public face: ``sdk.package`` (host) and ``sdk.load`` (device).

Facades over ``packagers`` and ``device_runtime``, imported only when called, so ``import sdk`` stays
light; this module sits above the kernel and is the only ``sdk`` module besides ``sdk.cli`` that may
import those packages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from device_runtime import Model
    from packagers import PackageResult

__all__ = ["load", "package"]


def package(model: Any, **kwargs: Any) -> list[PackageResult]:
    """Build signed bundles from a model; see ``packagers.package`` for the arguments."""
    from packagers import package as _package

    return _package(model, **kwargs)


def load(path: Any, trust: Any, **kwargs: Any) -> Model:
    """Verify and load a bundle; see ``device_runtime.load`` for the arguments."""
    from device_runtime import load as _load

    return _load(path, trust, **kwargs)
