"""ONNX Runtime adapter (bundle target ``onnxruntime``).

Execution providers: the ones the bundle was built for (``manifest.runtime["providers"]``), or the
caller's ``providers=``, kept in order where this ``onnxruntime`` build has them, with the CPU
provider always last as the fallback. The graph optimisation level comes from
``manifest.runtime["graph_optimization_level"]`` (default ``ORT_ENABLE_ALL``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.backends.base import Backend, BackendOptions
from sdk.errors import BackendError
from sdk.manifest import Manifest, TensorSpec

__all__ = ["OnnxRuntimeBackend"]

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
DEFAULT_OPTIMIZATION = "ORT_ENABLE_ALL"
_OPTIMIZATION_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
# numpy dtype name -> ONNX Runtime's type string for a tensor of it
_ORT_TYPES = {
    "bool": "tensor(bool)", "int8": "tensor(int8)", "uint8": "tensor(uint8)", "int16": "tensor(int16)",
    "uint16": "tensor(uint16)", "int32": "tensor(int32)", "uint32": "tensor(uint32)", "int64": "tensor(int64)",
    "uint64": "tensor(uint64)", "float16": "tensor(float16)", "float32": "tensor(float)", "float64": "tensor(double)",
}  # fmt: skip


def choose_providers(requested: list[str] | None, available: list[str], *, explicit: bool) -> list[str]:
    """Providers to ask for: ``requested`` in order where available, then the CPU fallback.

    Args:
        requested: the caller's list (``explicit``) or the bundle's; None means CPU only.
        available: what ``onnxruntime.get_available_providers()`` says.
        explicit: the caller named the providers; then at least one of them must be available.

    Raises:
        BackendError: the caller named providers and none of them is available here.
    """
    wanted = [p for p in (requested or []) if p in available]
    if explicit and requested and not wanted:
        raise BackendError(
            f"none of the requested execution providers {', '.join(requested)} is available; "
            f"this onnxruntime has {', '.join(available)}"
        )
    if CPU not in wanted and CPU in available:
        wanted.append(CPU)
    return wanted


class OnnxRuntimeBackend(Backend):
    """Runs a bundle's ``.onnx`` model in an ``onnxruntime.InferenceSession``."""

    name = "onnxruntime"
    package = "onnxruntime"
    extra = "onnxruntime"

    def __init__(self) -> None:
        super().__init__()
        self._session: Any = None
        self._direct: Any = None  # the session's C++ side, for run()'s fast path
        self._info: dict[str, Any] = {}

    def _load(self, model_path: Path, manifest: Manifest, options: BackendOptions) -> None:
        ort = self.import_runtime()
        runtime = manifest.runtime
        level_name = runtime.graph_optimization_level or DEFAULT_OPTIMIZATION
        if level_name not in _OPTIMIZATION_LEVELS:
            raise BackendError(
                f"runtime.graph_optimization_level {level_name!r} is not one of {', '.join(_OPTIMIZATION_LEVELS)}"
            )
        bundle_providers = list(runtime.providers) if runtime.providers is not None else None  # typed by Runtime
        available = list(ort.get_available_providers())
        if options.providers is not None:
            providers = choose_providers(list(options.providers), available, explicit=True)
        else:
            providers = choose_providers(bundle_providers, available, explicit=False)

        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level_name)
        so.log_severity_level = 3  # errors only: warnings about unused providers are noise on a device
        if options.intra_op_threads is not None:
            so.intra_op_num_threads = options.intra_op_threads
        self._session = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
        self._check_signature("input", manifest.inputs, self._session.get_inputs())
        self._check_signature("output", manifest.outputs, self._session.get_outputs())
        self._output_names = [spec.name for spec in manifest.outputs]
        # ORT's Python ``run`` re-validates what check_inputs already has (input names, plain numpy feeds)
        # before calling its C++ session: ~2 us a call. run() calls the C++ side directly and hands any
        # failure to the public ``run``, which reports it or recovers (an execution provider's fallback).
        # Not with WebGPU, whose graph capture the public ``run`` must police.
        if "WebGpuExecutionProvider" not in self._session.get_providers():
            self._direct = getattr(self._session, "_sess", None)
        self._info = {
            "backend": self.name,
            "runtime_version": ort.__version__,
            "providers": list(self._session.get_providers()),
            "intra_op_threads": options.intra_op_threads or 0,  # 0: onnxruntime's default
            "graph_optimization_level": level_name,
        }
        log.debug("onnxruntime session for %s v%s: %s", manifest.name, manifest.version, self._info)

    def _check_signature(self, what: str, specs: tuple[TensorSpec, ...], args: list[Any]) -> None:
        """The model's own inputs/outputs must be the ones the manifest declares (names and dtypes)."""
        graph = {a.name: a.type for a in args}
        declared = [s.name for s in specs]
        # every graph input must be fed; a graph output the manifest does not declare is just not fetched
        if set(declared) - set(graph) or (what == "input" and set(graph) - set(declared)):
            raise BackendError(f"the manifest's {what}s {sorted(declared)} do not match the model's {sorted(graph)}")
        for spec in specs:
            if graph[spec.name] != _ORT_TYPES[spec.dtype]:
                raise BackendError(
                    f"{what} {spec.name!r}: the manifest says {spec.dtype}, the model takes {graph[spec.name]}"
                )

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        names = self._output_names
        direct = self._direct  # the C++ session (see _load), None where the public run must be used
        if direct is None:
            values = self._session.run(names, feeds)
        else:
            try:
                values = direct.run(names, feeds, None)
            except Exception:  # the public run raises it again, or recovers (execution provider fallback)
                values = self._session.run(names, feeds)
                self._direct = getattr(self._session, "_sess", None)  # a fallback makes a new C++ session
        return dict(zip(names, values, strict=True))

    @property
    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def close(self) -> None:
        self._direct = None
        self._session = None
