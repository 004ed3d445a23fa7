"""Host-side packaging: turn a model into signed, validated bundles for edge runtimes.

``package(model, name=..., version=..., key=..., out_dir=...)`` is the entry point. Targets live one
per module behind the ``Target`` registry; each declares its ``Capabilities`` and unsupported
requests are refused before any work. Importing this package is cheap: torch, transformers, onnx
and onnxruntime are imported only inside the functions that use them.
"""

from __future__ import annotations

from packagers.options import (
    CALIBRATION_METHODS,
    DEFAULT_TOLERANCES,
    Capabilities,
    PackageOptions,
    PackageResult,
    Precision,
    Target,
    Tolerances,
)
from packagers.orchestrator import package
from packagers.registry import BuiltModel, Packager, available_targets, capabilities, capability_table, get_packager
from packagers.requests import is_generated
from packagers.sources import CALIBRATION_FORMATS, MODEL_PATHS, TASKS

__all__ = [
    "CALIBRATION_FORMATS",
    "CALIBRATION_METHODS",
    "DEFAULT_TOLERANCES",
    "MODEL_PATHS",
    "TASKS",
    "BuiltModel",
    "Capabilities",
    "PackageOptions",
    "PackageResult",
    "Packager",
    "Precision",
    "Target",
    "Tolerances",
    "available_targets",
    "capabilities",
    "capability_table",
    "get_packager",
    "is_generated",
    "package",
]
