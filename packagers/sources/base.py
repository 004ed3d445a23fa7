"""What every input kind is normalised to: a ``Source``, and its fp32 ONNX graph (``OnnxExport``).

The kinds (``torch``, ``transformers``, ``onnx``, ``keras``) each build a Source in a module of their
own; the targets read only what is defined here. Nothing here imports a heavy library.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdk.errors import PackagingError
from sdk.manifest import DTYPES, TensorSpec

__all__ = ["Arrays", "OnnxExport", "Reference", "Source", "dtype_name"]

Arrays = dict[str, np.ndarray]
Reference = Callable[[Mapping[str, np.ndarray]], Arrays]


@dataclass(frozen=True)
class OnnxExport:
    """An fp32 ONNX graph of the source, in one file."""

    path: Path
    opset: int
    exporter: str  # "torchscript", "dynamo", or "given" for .onnx inputs
    seconds: float


@dataclass
class Source:
    """A model normalised for packaging, whatever it was given as."""

    kind: str  # "torch" | "transformers" | "onnx" | "keras"
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    reference: Reference
    reference_name: str  # e.g. "torch 2.13.0"
    validation_inputs: Arrays  # batch first, every input the same number of samples
    data_origin: str  # where the validation inputs came from
    task: str | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    members: dict[str, Path | bytes] = field(default_factory=dict)  # extra bundle members (tokenizer files)
    input_policy: dict[str, Any] = field(default_factory=dict)  # the manifest's input_policy
    info: dict[str, Any] = field(default_factory=dict)  # recorded in report.json
    export_fn: Callable[[Path], OnnxExport] | None = None
    # For converters that start from the model itself: the torch module (positional forward, tuple out)
    # or, for keras, the SavedModel folder.
    native: Any = None
    close_fn: Callable[[], None] | None = None
    workdir: Path | None = None  # scratch folder for the export, set by the caller
    _onnx: OnnxExport | None = None

    @property
    def samples(self) -> int:
        return len(next(iter(self.validation_inputs.values())))

    def onnx(self) -> OnnxExport:
        """The fp32 ONNX graph of this source, exported into ``workdir`` on first use.

        Raises:
            PackagingError: the export failed, or no workdir was set.
        """
        if self._onnx is None:
            if self.export_fn is None or self.workdir is None:
                raise PackagingError(f"{self.description} cannot be converted to ONNX (no exporter or workdir)")
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._onnx = self.export_fn(self.workdir)
        return self._onnx

    def close(self) -> None:
        """Undo what loading changed on the caller's objects (a torch module's train/eval mode)."""
        if self.close_fn is not None:
            self.close_fn()
            self.close_fn = None


def dtype_name(dtype: Any) -> str:
    """The manifest name of a numpy dtype.

    Raises:
        PackagingError: a dtype the bundle format does not hold.
    """
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise PackagingError(f"dtype {name} is not supported in a bundle; supported: {', '.join(DTYPES)}")
    return name
