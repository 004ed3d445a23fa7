"""The registry of targets: one module per target behind the ``Target`` enum.

The only module-level table is ``_BUILTIN`` (read-only): target -> "module:Class" of its packager,
or None while the target is not implemented. Target modules import their heavy libraries inside
functions, so looking up capabilities costs nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from packagers.options import Capabilities, PackageOptions, Precision, Target
from sdk.errors import PackagingError
from sdk.manifest import TensorSpec

if TYPE_CHECKING:
    from packagers.sources.base import Source

__all__ = [
    "BuiltModel",
    "CandidateFailed",
    "Packager",
    "Runner",
    "available_targets",
    "capabilities",
    "capability_table",
    "get_packager",
    "version_floor",
]

Runner = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]

_BUILTIN: Mapping[Target, str | None] = MappingProxyType(
    {
        Target.ONNXRUNTIME: "packagers.targets.onnxruntime:OnnxRuntimePackager",
        Target.OPENVINO: "packagers.targets.openvino:OpenVinoPackager",
        Target.TFLITE: "packagers.targets.tflite:TfLitePackager",
        Target.COREML: "packagers.targets.coreml:CoreMlPackager",
    }
)


@dataclass(frozen=True)
class BuiltModel:
    """One candidate model file a packager built for a (target, precision)."""

    path: Path  # the model file on disk
    member: str  # its path inside the bundle, the manifest's ``model``
    runtime: Mapping[str, Any]  # the manifest's ``runtime``
    recipe: Mapping[str, Any] = field(default_factory=dict)  # how it was built, for the report
    candidate: str = "default"  # short label when a packager offers several variants
    # Other files the model needs beside ``path`` (bundle member -> file), e.g. OpenVINO's weights .bin.
    extra_members: Mapping[str, Path] = field(default_factory=dict)
    # The manifest's inputs/outputs when the build fixed dims the source left named (static-shape targets);
    # None keeps the source's specs.
    inputs: tuple[TensorSpec, ...] | None = None
    outputs: tuple[TensorSpec, ...] | None = None
    # The manifest's preprocessing / input_policy when the build narrowed the source's (a TFLite model with
    # sequence buckets caps the tokenizer's max_length at its largest bucket); None keeps the source's.
    preprocessing: Mapping[str, Any] | None = None
    input_policy: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class CandidateFailed:
    """A candidate a packager tried and could not build; ``build`` returns it beside the ones it built.

    The orchestrator drops it with its reason (progress output and ``report.json``) and keeps the best
    valid candidate; only when no candidate is valid does packaging fail, listing every reason.
    """

    candidate: str  # the label the candidate would have had
    stage: str  # "build", "load", "run" or "validate"
    reason: str  # short, one line


class Packager(Protocol):
    """What every target module provides."""

    target: Target
    capabilities: Capabilities

    def build(self, source: Source, precision: Precision, workdir: Path, options: PackageOptions,
              progress: Callable[[str], None]) -> list[BuiltModel | CandidateFailed]:  # fmt: skip
        """Build one or more candidates; the caller validates them and keeps the best.

        A recipe that fails is returned as a ``CandidateFailed`` (not raised) so the others still count.
        Int8 precisions honour ``options.float_layers`` (those layers stay in float); a packager that
        can keep layers in float also offers ``quantized_layers(built) -> list[str]``: the names of the
        layers ``built`` quantized, in graph order (the names ``float_layers`` takes), which the
        mixed-precision search uses.
        """
        ...

    def runner(self, built: BuiltModel) -> Runner:
        """Load ``built`` in the target's real runtime and return its run function."""
        ...


def version_floor(version: str) -> str:
    """``major.minor.0`` of an installed runtime's version: the manifest's ``runtime.min_version``."""
    major, minor = [*str(version).split("."), "0"][:2]
    return f"{major}.{minor}.0"


def available_targets() -> list[Target]:
    """The targets implemented in this version of edgeship."""
    return [t for t, path in _BUILTIN.items() if path is not None]


def get_packager(target: str | Target) -> Packager:
    """The packager of ``target``.

    Raises:
        PackagingError: unknown target, or one not implemented yet (the message lists those that are).
    """
    t = Target.parse(target)
    path = _BUILTIN.get(t)
    if path is None:
        valid = ", ".join(x.value for x in available_targets())
        raise PackagingError(f"target {t.value} is not implemented yet; available targets: {valid}")
    module_name, _, class_name = path.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    packager: Packager = cls()
    return packager


def capabilities(target: str | Target) -> Capabilities:
    """What ``target`` can build.

    Raises:
        PackagingError: unknown or not implemented target.
    """
    return get_packager(target).capabilities


def capability_table() -> tuple[list[str], list[list[str]]]:
    """Headers and rows describing every target, for ``edgeship targets`` and the README."""
    rows = []
    for target, path in _BUILTIN.items():
        if path is None:
            rows.append([target.value, "not implemented yet", "-", "-"])
            continue
        caps = capabilities(target)
        rows.append([
            target.value,
            ", ".join(p.value for p in caps.precisions),
            ", ".join(caps.input_kinds),
            "yes" if caps.dynamic_shapes else "no",
        ])  # fmt: skip
    return ["target", "precisions", "inputs", "dynamic shapes"], rows
