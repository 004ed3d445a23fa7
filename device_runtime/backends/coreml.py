"""Core ML adapter (bundle target ``coreml``), for macOS through coremltools.

The bundle holds an ML program package: its files are members under ``model.mlpackage/`` and the
manifest's ``model`` is ``model.mlpackage/Manifest.json``, so the package root is the model file's
folder. Compute units come from ``BackendOptions.compute_units``, else the bundle's
``runtime.compute_units``, else ``ALL``. Core ML has no int64 tensors: inputs are cast to the dtypes in
``runtime.coreml_inputs`` (integers that int32 cannot hold are refused) and outputs back to the
manifest's dtypes.

Core ML runs only on Apple platforms: on any other system ``load`` fails with a ``BackendError`` that
names the platform, before importing anything.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.backends.base import Backend, BackendOptions
from sdk.errors import BackendError, InputError
from sdk.manifest import Manifest

__all__ = ["COMPUTE_UNITS", "CoreMlBackend"]

COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_NE", "CPU_AND_GPU")
_CORE_ML_DTYPES = ("float32", "float16", "int32")
PACKAGE_MANIFEST = "Manifest.json"


def _platform_name() -> str:
    return {"linux": "Linux", "win32": "Windows"}.get(sys.platform, platform.system() or sys.platform)


def _dtype_map(raw: Any, key: str, names: list[str]) -> dict[str, str]:
    """``runtime.<key>`` checked: tensor name -> Core ML dtype, for every name (missing: float32 is not assumed).

    Raises:
        BackendError: the map is malformed or misses a tensor.
    """
    if not isinstance(raw, dict) or set(raw) != set(names) or not all(v in _CORE_ML_DTYPES for v in raw.values()):
        raise BackendError(
            f"runtime.{key} must map each of {sorted(names)} to one of {', '.join(_CORE_ML_DTYPES)}, got {raw!r}"
        )
    return {str(k): str(v) for k, v in raw.items()}


class CoreMlBackend(Backend):
    """Runs a bundle's ``.mlpackage`` with ``coremltools.models.MLModel`` (macOS)."""

    name = "coreml"
    package = "coremltools"
    extra = "coreml"

    def __init__(self) -> None:
        super().__init__()
        self._model: Any = None
        self._info: dict[str, Any] = {}
        self._inputs: dict[str, str] = {}
        self._outputs: dict[str, str] = {}

    def _load(self, model_path: Path, manifest: Manifest, options: BackendOptions) -> None:
        if sys.platform != "darwin":
            raise BackendError(
                f"Core ML bundles run only on macOS/iOS; this is {_platform_name()}. Ship this release's "
                "onnxruntime, openvino or tflite bundle to this device instead"
            )
        if model_path.name != PACKAGE_MANIFEST:
            raise BackendError(
                f"a Core ML bundle's model must be its package's {PACKAGE_MANIFEST}, got {model_path.name}"
            )
        units = options.compute_units or manifest.runtime.compute_units or "ALL"
        if units not in COMPUTE_UNITS:
            raise BackendError(f"compute_units must be one of {', '.join(COMPUTE_UNITS)}, got {units!r}")
        self._inputs = _dtype_map(manifest.runtime.coreml_inputs, "coreml_inputs", [s.name for s in manifest.inputs])
        self._outputs = {s.name: s.dtype for s in manifest.outputs}
        ct = self.import_runtime()
        # MLModel compiles the package into its own temporary folder, so the bundle folder may move later.
        self._model = ct.models.MLModel(str(model_path.parent), compute_units=getattr(ct.ComputeUnit, units))
        described = {i.name for i in self._model.get_spec().description.input}
        if described != set(self._inputs):
            raise BackendError(
                f"the manifest's inputs {sorted(self._inputs)} do not match the model's {sorted(described)}"
            )
        self._info = {
            "backend": self.name,
            "runtime_version": str(ct.__version__),
            "compute_units": units,
            "platform": f"{_platform_name()} {platform.mac_ver()[0]}".strip(),
        }

    def _cast(self, name: str, array: np.ndarray) -> np.ndarray:
        target = np.dtype(self._inputs[name])
        if array.dtype == target:
            return array
        if target.kind == "i" and array.dtype.kind in "iub" and array.size:
            limits = np.iinfo(target)
            if int(array.min()) < limits.min or int(array.max()) > limits.max:
                raise InputError(f"input {name!r} holds values outside {target.name}, which this Core ML model takes")
        return array.astype(target)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        raw = self._model.predict({k: self._cast(k, np.asarray(v)) for k, v in feeds.items()})
        return {k: np.asarray(raw[k]).astype(dtype, copy=False) for k, dtype in self._outputs.items() if k in raw}

    @property
    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def close(self) -> None:
        self._model = None
