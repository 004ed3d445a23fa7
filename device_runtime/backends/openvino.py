"""OpenVINO adapter (bundle target ``openvino``): an IR (``model.xml`` + weights) in ``openvino.Core``.

Settings, each from the caller's ``BackendOptions`` first, then the bundle's ``runtime``:

- device: ``device=`` or the first of ``runtime["devices"]`` (default ``CPU``); ``CPU``, ``GPU``,
  ``NPU`` (with an index like ``GPU.1``), or ``AUTO`` / ``AUTO:GPU,CPU``. A device this OpenVINO does
  not have is a ``BackendError`` naming the ones it has.
- ``PERFORMANCE_HINT``: ``performance_hint=`` or ``runtime["performance_hint"]`` (default ``LATENCY``).
- ``INFERENCE_PRECISION_HINT``: ``runtime["inference_precision_hint"]`` only: the precision the bundle
  was validated for (``f32`` for fp32 and int8 bundles: a CPU would otherwise compute in bf16 where it
  can; ``f16`` for fp16 bundles, which CPUs without half-precision units run in f32).
- ``INFERENCE_NUM_THREADS``: ``intra_op_threads=`` when > 0.
- ``CACHE_DIR``: ``cache_dir=``; OpenVINO stores the compiled blob there and a restart imports it
  instead of compiling (``info["loaded_from_cache"]``).

Concurrent ``run`` calls each take an idle ``InferRequest`` from a pool (one is created when none is
idle), so threads never share a request.
"""

from __future__ import annotations

import logging
import queue
import time
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.backends.base import Backend, BackendOptions
from sdk.errors import BackendError
from sdk.manifest import Manifest, TensorSpec

__all__ = ["OpenVinoBackend"]

log = logging.getLogger(__name__)

DEFAULT_DEVICE = "CPU"
DEFAULT_HINT = "LATENCY"
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
PRECISION_HINTS = ("f32", "f16", "bf16")
_VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")  # OpenVINO's meta devices over the real ones


class OpenVinoBackend(Backend):
    """Runs a bundle's OpenVINO IR on one OpenVINO device."""

    name = "openvino"
    package = "openvino"
    extra = "openvino"

    def __init__(self) -> None:
        super().__init__()
        self._compiled: Any = None
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._input_slots: list[tuple[str, int]] = []
        self._output_slots: list[tuple[str, int]] = []
        self._tensor: Any = None
        self._info: dict[str, Any] = {}

    def _load(self, model_path: Path, manifest: Manifest, options: BackendOptions) -> None:
        ov = self.import_runtime()
        runtime = manifest.runtime
        core = ov.Core()
        device = self._device(core, options.device or _first(runtime.get("devices")) or DEFAULT_DEVICE)
        hint = str(options.performance_hint or runtime.get("performance_hint") or DEFAULT_HINT).upper()
        if hint not in PERFORMANCE_HINTS:
            raise BackendError(f"performance hint {hint!r} is not one of {', '.join(PERFORMANCE_HINTS)}")
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint}
        precision = runtime.get("inference_precision_hint")
        if precision is not None:
            if precision not in PRECISION_HINTS:
                raise BackendError(f"runtime.inference_precision_hint {precision!r} is not one of {PRECISION_HINTS}")
            config["INFERENCE_PRECISION_HINT"] = precision
        if options.intra_op_threads:
            config["INFERENCE_NUM_THREADS"] = options.intra_op_threads
        if options.cache_dir is not None:
            Path(options.cache_dir).mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": options.cache_dir})

        weights = self._weights(model_path, manifest)
        start = time.perf_counter()
        # From a read model, not the path: OpenVINO keys a path's cache entry by the path, and each install
        # (temporary folder, A/B slot) puts the same bundle elsewhere; a model is keyed by its content.
        model = core.read_model(str(model_path), str(weights))
        self._compiled = core.compile_model(model, device, config)
        compile_ms = (time.perf_counter() - start) * 1000.0
        # run() sets tensors by port index: InferRequest.infer(dict) dispatches on key and value types
        # in Python, which costs more than the inference of a small model.
        self._input_slots = list(self._ports("input", manifest.inputs, self._compiled.inputs, exact=True).items())
        outputs = self._ports("output", manifest.outputs, self._compiled.outputs, exact=False)
        self._output_slots = [(spec.name, outputs[spec.name]) for spec in manifest.outputs]
        self._tensor = ov.Tensor
        self._idle.put(self._compiled.create_infer_request())
        self._info = {
            "backend": self.name,
            "runtime_version": ov.__version__.split("-")[0],
            "device": device,
            "execution_devices": [str(d) for d in _property(self._compiled, "EXECUTION_DEVICES", [])],
            "performance_hint": hint,
            "inference_precision_hint": _type_name(_property(self._compiled, "INFERENCE_PRECISION_HINT", precision)),
            "inference_num_threads": int(_property(self._compiled, "INFERENCE_NUM_THREADS", 0) or 0),
            "optimal_requests": int(_property(self._compiled, "OPTIMAL_NUMBER_OF_INFER_REQUESTS", 1) or 1),
            "cache_dir": options.cache_dir,
            "loaded_from_cache": bool(_property(self._compiled, "LOADED_FROM_CACHE", False)),
            "compile_ms": round(compile_ms, 3),
        }
        log.debug("openvino model %s v%s: %s", manifest.name, manifest.version, self._info)

    @staticmethod
    def _device(core: Any, device: str) -> str:
        """``device`` when this OpenVINO has it (for AUTO and friends: each device they name).

        Raises:
            BackendError: the device is not available here; the message lists the ones that are.
        """
        device = str(device).strip().upper()
        available = list(core.available_devices)  # e.g. ["CPU", "GPU.0", "GPU.1"]
        base, _, rest = device.partition(":")
        # AUTO alone lets OpenVINO pick among what it has; AUTO:GPU,CPU names devices that must exist.
        names = [d for d in rest.split(",") if d] if base in _VIRTUAL_DEVICES else [device]
        for name in names:
            if name not in available and not any(a.split(".")[0] == name for a in available):
                raise BackendError(
                    f"OpenVINO device {name!r} is not available here; this OpenVINO has: {', '.join(available)} "
                    "(and AUTO over them)"
                )
        return device

    @staticmethod
    def _weights(model_path: Path, manifest: Manifest) -> Path:
        """The IR's weights file: ``runtime["weights"]``, a verified member beside the IR.

        Raises:
            BackendError: the manifest names weights it does not list in ``files``.
        """
        member = manifest.runtime.get("weights")
        if member is None:
            return model_path.with_suffix(".bin")
        listed = {entry.path for entry in manifest.files}
        if not isinstance(member, str) or member not in listed:
            raise BackendError(f"runtime.weights {member!r} is not a file of the bundle")
        # Members and the model path share the bundle root: model_path = root / manifest.model.
        root = model_path
        for _ in Path(manifest.model).parts:
            root = root.parent
        return root / member

    @staticmethod
    def _ports(what: str, specs: tuple[TensorSpec, ...], ports: list[Any], *, exact: bool) -> dict[str, int]:
        """Map the manifest's tensors to the index of the compiled model's port of that name, checking dtypes.

        (The index in ``ports``, which ``set_input_tensor`` takes: ``Output.get_index`` is the node's.)

        Raises:
            BackendError: a declared tensor has no port or another dtype; an input port is not declared.
        """
        by_name = {name: (index, port) for index, port in enumerate(ports) for name in port.get_names()}
        declared = [s.name for s in specs]
        missing = [n for n in declared if n not in by_name]
        if missing or (exact and len(ports) != len(specs)):
            have = sorted(p.get_any_name() for p in ports)
            raise BackendError(f"the manifest's {what}s {sorted(declared)} do not match the model's {have}")
        mapped: dict[str, int] = {}
        for spec in specs:
            index, port = by_name[spec.name]
            dtype = np.dtype(port.get_element_type().to_dtype())
            if dtype != np.dtype(spec.dtype):
                raise BackendError(f"{what} {spec.name!r}: the manifest says {spec.dtype}, the model takes {dtype}")
            mapped[spec.name] = index
        return mapped

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        compiled = self._compiled
        if compiled is None:
            raise BackendError("openvino backend is closed")
        try:
            request = self._idle.get_nowait()
        except queue.Empty:  # every request is busy in another thread: one more
            request = compiled.create_infer_request()
        try:
            tensor = self._tensor
            for name, index in self._input_slots:  # C-contiguous (check_inputs): shared unless read-only
                array = feeds[name]
                request.set_input_tensor(index, tensor(array, shared_memory=array.flags.writeable))
            request.infer(share_outputs=True)
            # copied out before the request goes back to the pool
            return {name: request.get_output_tensor(index).data.copy() for name, index in self._output_slots}
        finally:
            self._idle.put(request)

    @property
    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def close(self) -> None:
        self._compiled = None
        self._idle = queue.SimpleQueue()


def _first(value: Any) -> str | None:
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value[0]
    return None


def _property(compiled: Any, name: str, default: Any) -> Any:
    """A compiled model's property, or ``default`` where the device does not report it."""
    try:
        return compiled.get_property(name)
    except Exception:  # RuntimeError: the plugin does not support this property
        return default


def _type_name(value: Any) -> str | None:
    """``f32`` for OpenVINO's ``Type.f32`` (what the precision property returns), else the text."""
    if value is None:
        return None
    name = getattr(value, "get_type_name", None)
    return str(name()) if callable(name) else str(value)
