"""Backend adapters, one per bundle target, found through one registry.

The registry maps a manifest ``target`` to the module and class of its adapter, imported only when
a bundle of that target is loaded, so ``import device_runtime`` never imports a runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sdk.errors import BackendError

if TYPE_CHECKING:
    from device_runtime.backends.base import Backend, BackendOptions

__all__ = ["BACKENDS", "Backend", "BackendOptions", "create_backend"]

# target -> "module:Class"; openvino, tflite and coreml get theirs in later issues.
BACKENDS: dict[str, str] = {
    "onnxruntime": "device_runtime.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "device_runtime.backends.openvino:OpenVinoBackend",
    "tflite": "device_runtime.backends.tflite:TfLiteBackend",
    "coreml": "device_runtime.backends.coreml:CoreMlBackend",
}


def create_backend(target: str) -> Backend:
    """A fresh, unloaded adapter for a bundle target.

    Raises:
        BackendError: this edgeship has no adapter for ``target`` (the message names its extra).
    """
    from device_runtime.backends.base import install_hint

    spec = BACKENDS.get(target)
    if spec is None:
        raise BackendError(
            f"this edgeship-device has no backend for bundle target {target!r} yet "
            f"(it runs: {', '.join(sorted(BACKENDS))}); upgrade it and install the runtime with: "
            f"{install_hint(target)}"
        )
    module_name, class_name = spec.split(":")
    backend_class: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return backend_class()


def __getattr__(name: str) -> Any:
    """``Backend`` and ``BackendOptions`` on first use: the registry alone (the staging helper's
    compatibility check) needs no numpy."""
    if name in ("Backend", "BackendOptions"):
        from device_runtime.backends import base

        return getattr(base, name)
    raise AttributeError(f"module 'device_runtime.backends' has no attribute {name!r}")
