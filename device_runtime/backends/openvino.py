"""OpenVINO adapter (bundle target ``openvino``): an IR (``model.xml`` + weights) in ``openvino.Core``.

Settings, each from the caller's ``BackendOptions`` first, then the bundle's ``runtime``:

- device: ``device=`` or the first of ``runtime["devices"]`` (default ``CPU``); ``CPU``, ``GPU``,
  ``NPU`` (with an index like ``GPU.1``), or ``AUTO`` / ``AUTO:GPU,CPU``. A device this OpenVINO does
  not have is a ``BackendError`` naming the ones it has.
- ``PERFORMANCE_HINT``: ``performance_hint=`` or ``runtime["performance_hint"]`` (default ``LATENCY``).
- ``INFERENCE_PRECISION_HINT``: from the bundle only, under the rule of ``sdk.precision``: the bundle's
  ``runtime["inference_precision_hint"]`` where the device (its ``OPTIMIZATION_CAPABILITIES``) would
  compute it at or above ``runtime["validated_inference_precision"]``, else ``f32`` (an fp16 bundle on a
  bf16 CPU, which would resolve f16 to bf16), else a ``BackendError``. The precision the plugin resolved
  is read back from the compiled model (``info["inference_precision_hint"]``); one below the validated
  precision is compiled again at f32 or refused. The golden health check then decides.
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
from sdk.precision import PrecisionChoice, at_least, choose_hint

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
        device = self._device(core, options.device or _first(runtime.devices) or DEFAULT_DEVICE)
        hint = str(options.performance_hint or runtime.performance_hint or DEFAULT_HINT).upper()
        if hint not in PERFORMANCE_HINTS:
            raise BackendError(f"performance hint {hint!r} is not one of {', '.join(PERFORMANCE_HINTS)}")
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint}
        capabilities = _capabilities(core, device)
        choice = self._precision(manifest, device, capabilities)
        if choice.hint is not None:
            config["INFERENCE_PRECISION_HINT"] = choice.hint
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
        forced = choice.forced
        # What the plugin resolved the hint to; virtual devices (AUTO) do not say: then the prediction.
        resolved = _type_name(_property(self._compiled, "INFERENCE_PRECISION_HINT", None))
        if resolved is not None and not at_least(resolved, choice.floor) and choice.hint != "f32":
            forced = (f"OpenVINO resolved {choice.hint or 'no hint'} to {resolved} on {device}, below the "
                      f"{choice.floor} the bundle was validated at: forced f32")  # fmt: skip
            self._compiled = core.compile_model(model, device, {**config, "INFERENCE_PRECISION_HINT": "f32"})
            resolved = _type_name(_property(self._compiled, "INFERENCE_PRECISION_HINT", None))
        if resolved is not None and not at_least(resolved, choice.floor):
            self._compiled = None
            raise BackendError(
                f"{manifest.name} v{manifest.version} cannot run on OpenVINO {device}: it computes in {resolved} "
                f"even with f32, below the {choice.floor} the bundle was validated at"
            )
        if forced:  # also in info["precision_forced"]
            log.info("%s v%s on %s: %s", manifest.name, manifest.version, device, forced)
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
            # the precision the device computes in (read back; predicted where the device does not report it)
            "inference_precision_hint": resolved or choice.expected,
            "requested_inference_precision": manifest.runtime.inference_precision_hint,
            "validated_inference_precision": choice.floor,
            "precision_forced": forced,
            "optimization_capabilities": {name: caps for name, caps in capabilities.items()},
            "inference_num_threads": int(_property(self._compiled, "INFERENCE_NUM_THREADS", 0) or 0),
            "optimal_requests": int(_property(self._compiled, "OPTIMAL_NUMBER_OF_INFER_REQUESTS", 1) or 1),
            "cache_dir": options.cache_dir,
            "loaded_from_cache": bool(_property(self._compiled, "LOADED_FROM_CACHE", False)),
            "compile_ms": round(compile_ms, 3),
        }
        log.debug("openvino model %s v%s: %s", manifest.name, manifest.version, self._info)

    @staticmethod
    def _precision(manifest: Manifest, device: str, capabilities: dict[str, list[str] | None]) -> PrecisionChoice:
        """The precision hint for ``device`` under the rule of ``sdk.precision``.

        Raises:
            BackendError: the runtime names an unknown precision, or the device cannot compute at the
                precision the bundle was validated at, not even with f32.
        """
        runtime = manifest.runtime
        requested, validated = runtime.inference_precision_hint, runtime.validated_inference_precision
        for key, value in (("inference_precision_hint", requested), ("validated_inference_precision", validated)):
            if value is not None and value not in PRECISION_HINTS:
                raise BackendError(f"runtime.{key} {value!r} is not one of {PRECISION_HINTS}")
        choice = choose_hint(
            requested,
            validated,
            [None if caps is None else frozenset(caps) for caps in capabilities.values()],
        )
        if choice.refused is not None:
            raise BackendError(f"{manifest.name} v{manifest.version} cannot run on OpenVINO {device}: {choice.refused}")
        return choice

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
        member = manifest.runtime.weights
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


def _capabilities(core: Any, device: str) -> dict[str, list[str] | None]:
    """Each device ``device`` may run on -> its ``OPTIMIZATION_CAPABILITIES`` (``None``: not reported).

    A virtual device (``AUTO``, ``AUTO:GPU,CPU``, ``MULTI:...``) may pick any device it names, or any this
    OpenVINO has when it names none, so the precision rule must hold on each of them.
    """
    base, _, rest = device.partition(":")
    if base in _VIRTUAL_DEVICES:
        names = [d for d in rest.split(",") if d] or [d for d in core.available_devices]
    else:
        names = [device]
    found: dict[str, list[str] | None] = {}
    for name in names:
        try:
            found[name] = [str(c) for c in core.get_property(name, "OPTIMIZATION_CAPABILITIES")]
        except Exception:  # RuntimeError: the plugin does not report it
            found[name] = None
    return found


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
