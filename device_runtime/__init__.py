"""What runs on the device: verify a bundle, load it in its runtime, predict, health-check.

``import device_runtime`` needs only the sdk kernel, numpy and cryptography; a bundle's runtime
(``onnxruntime``, ...) is imported when a bundle of that target is loaded.

    with device_runtime.load("clf-3-onnxruntime-fp32.edgebundle", ["release.pub"]) as model:
        outputs = model.predict({"x": x})
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from device_runtime.errors import HealthCheckError, ModelClosedError, StateError

if TYPE_CHECKING:
    from device_runtime.agent.agent import Agent, AgentConfig
    from device_runtime.backends import BACKENDS, Backend, BackendOptions
    from device_runtime.model import Model, load, load_verified
    from device_runtime.pipelines import Pipeline, pipeline
    from device_runtime.preprocess import encode_text
    from device_runtime.store import BundleStore, InstalledBundle, StagedBundle
    from device_runtime.tasks import (
        EdgeModelForFeatureExtraction,
        EdgeModelForImageClassification,
        EdgeModelForSequenceClassification,
        EdgeModelForTokenClassification,
        TaskMismatchError,
    )

# Imported on first use: a device that only calls ``load``/``predict`` pays nothing for the agent (which
# also needs paho-mqtt, the ``device`` extra), and the agent's helper processes (the MQTT link, staging)
# import only what they use (the link process no numpy).
_LAZY = {
    "BACKENDS": "device_runtime.backends",
    "Backend": "device_runtime.backends",
    "BackendOptions": "device_runtime.backends",
    "Model": "device_runtime.model",
    "load": "device_runtime.model",
    "load_verified": "device_runtime.model",
    "BundleStore": "device_runtime.store",
    "InstalledBundle": "device_runtime.store",
    "StagedBundle": "device_runtime.store",
    "Agent": "device_runtime.agent.agent",
    "AgentConfig": "device_runtime.agent.agent",
    "encode_text": "device_runtime.preprocess",
    "Pipeline": "device_runtime.pipelines",
    "pipeline": "device_runtime.pipelines",
    "EdgeModelForFeatureExtraction": "device_runtime.tasks",
    "EdgeModelForImageClassification": "device_runtime.tasks",
    "EdgeModelForSequenceClassification": "device_runtime.tasks",
    "EdgeModelForTokenClassification": "device_runtime.tasks",
    "TaskMismatchError": "device_runtime.tasks",
}

__all__ = [
    "BACKENDS",
    "Agent",
    "AgentConfig",
    "Backend",
    "BackendOptions",
    "BundleStore",
    "EdgeModelForFeatureExtraction",
    "EdgeModelForImageClassification",
    "EdgeModelForSequenceClassification",
    "EdgeModelForTokenClassification",
    "HealthCheckError",
    "InstalledBundle",
    "Model",
    "ModelClosedError",
    "Pipeline",
    "StagedBundle",
    "StateError",
    "TaskMismatchError",
    "encode_text",
    "load",
    "load_verified",
    "pipeline",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'device_runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    """The public API too, not only what is imported yet: ``dir()`` and tab completion list the lazy names."""
    return sorted({*globals(), *__all__})
