"""TFLite / LiteRT adapter (bundle target ``tflite``).

The interpreter comes from the first runtime that imports: ``ai_edge_litert.interpreter``, then
``tflite_runtime.interpreter``, then ``tensorflow.lite``. A runtime that is installed but broken
(tflite-runtime 2.14 was built against numpy 1 and fails to import under numpy 2) is skipped like a
missing one, and the reason is kept for the error message.

The manifest's ``runtime`` says how to feed the model: ``tensor_map`` (manifest name -> the model's
signature name, as converters rename inputs to ``args_0``...), ``quantization`` (scale and zero point
of int8 inputs/outputs: callers pass and get floats), ``delegates`` (``xnnpack`` is built in;
``edgetpu`` loads ``libedgetpu.so.1`` and fails clearly where it is missing), ``buckets`` (one signature
per sequence length: each call runs the smallest that fits, see ``tflite_buckets``). int64 inputs of a model
that takes int32 (token ids) are narrowed after a range check. One interpreter is not thread-safe:
calls are serialised by a lock.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.backends.base import Backend, BackendOptions, install_hint
from device_runtime.backends.tflite_buckets import SequenceBuckets
from sdk.errors import BackendError, InputError
from sdk.manifest import Manifest

__all__ = ["RUNTIMES", "TfLiteBackend", "import_interpreter"]

# (import name, package name for messages); the first that imports wins.
RUNTIMES = (
    ("ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime.interpreter", "tflite-runtime"),
    ("tensorflow", "tensorflow"),  # its ``lite`` API (tf.lite.Interpreter, tf.lite.experimental.load_delegate)
)
EDGETPU_LIBRARY = "libedgetpu.so.1"
_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}
_INT32 = np.iinfo(np.int32)


def import_interpreter() -> tuple[Any, str, str]:
    """The interpreter module of the first runtime that works: (module, package name, version).

    Raises:
        BackendError: none imports (the message names the extra and why each failed).
    """
    failures = []
    for module_name, package in RUNTIMES:
        try:
            module: Any = importlib.import_module(module_name)
            if module_name == "tensorflow":
                module = _TfLite(module.lite)
            if not hasattr(module, "Interpreter"):
                raise ImportError(f"{module_name} has no Interpreter")
        except Exception as e:  # ImportError, or a broken build's AttributeError/RuntimeError (numpy ABI)
            failures.append(f"{package}: {_first_line(e)}")
            continue
        return module, package, _version(package, module_name)
    raise BackendError(
        "bundle target 'tflite' needs a LiteRT runtime (ai-edge-litert, tflite-runtime or tensorflow) and none "
        f"works here ({'; '.join(failures)}); install it with: {install_hint('tflite')}"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _version(package: str, module_name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        root = importlib.import_module(module_name.split(".")[0])
        return str(getattr(root, "__version__", "unknown"))


class _TfLite:
    """``tf.lite`` seen as an interpreter module: ``Interpreter`` and ``load_delegate`` at the top."""

    def __init__(self, lite: Any) -> None:
        self.Interpreter = lite.Interpreter
        self.load_delegate = lite.experimental.load_delegate


class TfLiteBackend(Backend):
    """Runs a bundle's ``model.tflite`` in a LiteRT interpreter."""

    name = "tflite"
    package = "ai_edge_litert"
    extra = "tflite"

    def __init__(self) -> None:
        super().__init__()
        self._interpreter: Any = None
        self._runner: Any = None
        self._lock = threading.Lock()
        self._info: dict[str, Any] = {}
        self._buckets: SequenceBuckets | None = None
        self._bucket_runners: list[Any] = []
        self._sequence_outputs: list[str] = []  # outputs with the bucketed sequence dim, cut back after a run

    def _load(self, model_path: Path, manifest: Manifest, options: BackendOptions) -> None:
        module, package, version = import_interpreter()
        runtime = manifest.runtime
        delegates = self._delegates(module, ["xnnpack"] if runtime.delegates is None else list(runtime.delegates))
        kwargs: dict[str, Any] = {"model_path": str(model_path)}
        if options.intra_op_threads:
            kwargs["num_threads"] = options.intra_op_threads
        if delegates:
            kwargs["experimental_delegates"] = delegates
        self._interpreter = module.Interpreter(**kwargs)
        signatures = self._interpreter.get_signature_list()
        key = runtime.signature or (next(iter(signatures)) if signatures else None)
        if runtime.buckets is not None:
            self._buckets = SequenceBuckets.from_runtime(runtime.buckets)
            missing = [s for s in self._buckets.signatures if s not in signatures]
            if missing:
                raise BackendError(f"runtime.buckets names signatures {missing} the model lacks ({sorted(signatures)})")
            self._bucket_runners = [self._interpreter.get_signature_runner(s) for s in self._buckets.signatures]
            key = self._buckets.signatures[-1]
            axis, dim = self._buckets.axis, self._buckets.dim
            self._sequence_outputs = [o.name for o in manifest.outputs if len(o.shape) > axis and o.shape[axis] == dim]
        if signatures:
            if key not in signatures:
                raise BackendError(f"the model has no signature {key!r} (it has {sorted(signatures)})")
            self._runner = self._interpreter.get_signature_runner(key)
            in_details = dict(self._runner.get_input_details())
            out_details = dict(self._runner.get_output_details())
        else:  # an old model without signatures: tensor names and indices
            self._interpreter.allocate_tensors()
            in_details = {d["name"]: d for d in self._interpreter.get_input_details()}
            out_details = {d["name"]: d for d in self._interpreter.get_output_details()}
        self._bind(manifest, in_details, out_details)
        self._info = {
            "backend": self.name,
            "runtime": package,
            "runtime_version": version,
            "signature": key if signatures else None,
            "threads": options.intra_op_threads or 0,  # 0: the runtime's default
            "delegates": ["xnnpack", *(["edgetpu"] if delegates else [])],
        }
        if self._buckets is not None:
            self._info["sequence_buckets"] = list(self._buckets.lengths)

    def _delegates(self, module: Any, wanted: Any) -> list[Any]:
        """External delegates the manifest asks for; XNNPACK is built into the CPU interpreter."""
        if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
            raise BackendError("runtime.delegates must be a list of delegate names")
        unknown = sorted(set(wanted) - {"xnnpack", "edgetpu"})
        if unknown:
            raise BackendError(f"runtime.delegates: unknown delegates {unknown} (known: edgetpu, xnnpack)")
        if "edgetpu" not in wanted:
            return []
        load = getattr(module, "load_delegate", None)
        try:
            if load is None:
                raise ValueError("this runtime cannot load external delegates")
            return [load(EDGETPU_LIBRARY)]
        except (ValueError, OSError, RuntimeError) as e:
            raise BackendError(
                f"the bundle was built for the Edge TPU and its delegate {EDGETPU_LIBRARY} cannot be loaded here "
                f"({_first_line(e)}); install the Edge TPU "
                "runtime (libedgetpu) or use a CPU bundle"
            ) from e

    def _bind(self, manifest: Manifest, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Match the manifest's tensors to the model's and note how each is converted."""
        runtime = manifest.runtime
        tmap = runtime.tensor_map or {}
        quant = runtime.quantization or {}
        if not isinstance(tmap, Mapping) or not isinstance(quant, Mapping):
            raise BackendError("runtime.tensor_map and runtime.quantization must be objects")
        self._feeds: list[tuple[str, str, Any, np.dtype, Mapping[str, Any] | None]] = []
        for spec in manifest.inputs:
            model_name = (tmap.get("inputs") or {}).get(spec.name, spec.name)
            if model_name not in inputs:
                raise BackendError(f"input {spec.name!r}: the model has no tensor {model_name!r} ({sorted(inputs)})")
            detail = inputs[model_name]
            dtype = np.dtype(detail["dtype"])
            q = _quant((quant.get("inputs") or {}).get(spec.name), spec.name)
            if q is None and dtype.name != spec.dtype and not (spec.dtype == "int64" and dtype.name == "int32"):
                raise BackendError(f"input {spec.name!r}: the manifest says {spec.dtype}, the model takes {dtype.name}")
            self._feeds.append((spec.name, model_name, detail["index"], dtype, q))
        if len(self._feeds) != len(inputs):
            raise BackendError(
                f"the model takes {sorted(inputs)}; the manifest feeds {[s.name for s in manifest.inputs]}"
            )
        self._fetches: list[tuple[str, str, Any, Mapping[str, Any] | None]] = []
        for spec in manifest.outputs:
            model_name = (tmap.get("outputs") or {}).get(spec.name, spec.name)
            if model_name not in outputs:
                raise BackendError(f"output {spec.name!r}: the model has no tensor {model_name!r} ({sorted(outputs)})")
            q = _quant((quant.get("outputs") or {}).get(spec.name), spec.name)
            self._fetches.append((spec.name, model_name, outputs[model_name]["index"], q))

    def _convert(self, name: str, value: np.ndarray, dtype: np.dtype, q: Mapping[str, Any] | None) -> np.ndarray:
        if q is not None:
            low, high = _INT_RANGES[q["dtype"]]
            scaled = np.round(value.astype(np.float32) / np.float32(q["scale"])) + q["zero_point"]
            return np.clip(scaled, low, high).astype(q["dtype"])
        if value.dtype == np.int64 and dtype == np.int32:
            if value.size and (value.min() < _INT32.min or value.max() > _INT32.max):
                raise InputError(f"input {name!r}: values outside the int32 range the model takes")
        return np.ascontiguousarray(value, dtype=dtype)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        buckets, length, runner = self._buckets, 0, self._runner
        if buckets is not None:  # the smallest bucket that holds the sequence, inputs padded to it
            length = next(iter(feeds.values())).shape[buckets.axis]
            index = buckets.choose(length)
            feeds = buckets.padded(feeds, buckets.lengths[index])
            runner = self._bucket_runners[index]
        converted = {model: self._convert(user, feeds[user], dtype, q) for user, model, _, dtype, q in self._feeds}
        with self._lock:  # one interpreter, one call at a time
            if runner is not None:
                values = runner(**converted)  # copies of the output tensors (GetTensor copies)
            else:
                values = self._invoke(converted)
        result = {}
        for user, model, _, q in self._fetches:
            value = values[model]
            if q is not None:
                value = (value.astype(np.float32) - np.float32(q["zero_point"])) * np.float32(q["scale"])
            result[user] = value
        if buckets is not None:
            result = buckets.cut(result, self._sequence_outputs, length)
        return result

    def _invoke(self, converted: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        interpreter = self._interpreter
        resized = False
        for _, model, index, _, _ in self._feeds:
            if tuple(interpreter.get_tensor(index).shape) != converted[model].shape:
                interpreter.resize_tensor_input(index, list(converted[model].shape), strict=True)
                resized = True
        if resized:
            interpreter.allocate_tensors()
        for _, model, index, _, _ in self._feeds:
            interpreter.set_tensor(index, converted[model])
        interpreter.invoke()
        return {model: np.array(interpreter.get_tensor(index)) for _, model, index, _ in self._fetches}

    @property
    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def close(self) -> None:
        with self._lock:
            self._runner = None
            self._bucket_runners = []
            self._interpreter = None


def _quant(raw: Any, name: str) -> Mapping[str, Any] | None:
    if raw is None:
        return None
    ok = (
        isinstance(raw, Mapping)
        and raw.get("dtype") in _INT_RANGES
        and isinstance(raw.get("scale"), (int, float))
        and raw["scale"] > 0
        and isinstance(raw.get("zero_point"), int)
    )
    if not ok:
        raise BackendError(
            f"runtime.quantization of {name!r} must be {{dtype: int8|uint8|int16, scale > 0, zero_point}}"
        )
    return raw
