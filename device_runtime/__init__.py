"""What runs on the device: verify a bundle, load it in its runtime, predict, health-check.

``import device_runtime`` needs only the sdk kernel, numpy and cryptography; a bundle's runtime
(``onnxruntime``, ...) is imported when a bundle of that target is loaded.

    with device_runtime.load("clf-3-onnxruntime-fp32.edgebundle", ["release.pub"]) as model:
        outputs = model.predict({"x": x})
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from device_runtime._preprocess import encode_text
from device_runtime.backends import BACKENDS, Backend, BackendOptions
from device_runtime.errors import HealthCheckError, ModelClosedError, StateError
from device_runtime.model import Model, load, load_verified
from device_runtime.pipeline import Pipeline, pipeline
from device_runtime.store import BundleStore, InstalledBundle, StagedBundle
from device_runtime.tasks import (
    EdgeModelForFeatureExtraction,
    EdgeModelForImageClassification,
    EdgeModelForSequenceClassification,
    EdgeModelForTokenClassification,
    TaskMismatchError,
)

if TYPE_CHECKING:
    from device_runtime.agent import Agent, AgentConfig

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
    # The agent needs paho-mqtt (the ``device`` extra): imported on first use, not by ``import device_runtime``.
    if name in ("Agent", "AgentConfig"):
        from device_runtime import agent

        return getattr(agent, name)
    raise AttributeError(f"module 'device_runtime' has no attribute {name!r}")
