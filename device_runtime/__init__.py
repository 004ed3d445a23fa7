"""What runs on the device: verify a bundle, load it in its runtime, predict, health-check.

``import device_runtime`` needs only the sdk kernel, numpy and cryptography; a bundle's runtime
(``onnxruntime``, ...) is imported when a bundle of that target is loaded.

    with device_runtime.load("clf-3-onnxruntime-fp32.edgebundle", ["release.pub"]) as model:
        outputs = model.predict({"x": x})
"""

from __future__ import annotations

from device_runtime.backends import BACKENDS, Backend, BackendOptions
from device_runtime.errors import HealthCheckError, ModelClosedError, StateError
from device_runtime.model import Model, load, load_verified
from device_runtime.store import BundleStore, InstalledBundle, StagedBundle

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendOptions",
    "BundleStore",
    "HealthCheckError",
    "InstalledBundle",
    "Model",
    "ModelClosedError",
    "StagedBundle",
    "StateError",
    "load",
    "load_verified",
]
