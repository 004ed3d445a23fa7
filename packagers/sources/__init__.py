"""The input kinds edgeship packages, each normalised to one ``Source`` (``packagers.sources.base``).

One module per kind: ``torch`` (a module with example inputs), ``transformers`` (a model folder),
``onnx`` (an .onnx file), ``keras`` (a Keras model or SavedModel); ``data`` holds the calibration
readers and the one rule for choosing validation data. This module tells the kinds apart and loads
one. Heavy libraries are imported inside the functions that need them, so importing this is cheap.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

from packagers.options import PackageOptions
from packagers.sources.base import OnnxExport, Reference, Source
from packagers.sources.data import CALIBRATION_FORMATS, load_calibration, raw_calibration
from packagers.sources.keras import KERAS_SUFFIXES, is_keras_model, is_keras_path, keras_source
from packagers.sources.onnx import onnx_source
from packagers.sources.torch import torch_source
from packagers.sources.transformers import TASKS, TOKENIZER_FILES, transformers_source
from sdk.errors import PackagingError

__all__ = [
    "CALIBRATION_FORMATS",
    "MODEL_PATHS",
    "TASKS",
    "TOKENIZER_FILES",
    "OnnxExport",
    "Reference",
    "Source",
    "detect_input_kind",
    "load_calibration",
    "load_source",
    "raw_calibration",
]

# What a model *path* may be, by the kind ``detect_input_kind`` finds (the CLI's `--help` lists these).
MODEL_PATHS = MappingProxyType(
    {
        "onnx": "an .onnx file",
        "transformers": "a transformers model folder (saved with save_pretrained; see --task)",
        "keras": f"a Keras model file ({', '.join(KERAS_SUFFIXES)}) or a TensorFlow SavedModel folder",
    }
)


def detect_input_kind(model: Any) -> str:
    """Which of "torch", "transformers", "onnx", "keras" ``model`` is, without loading it.

    Raises:
        PackagingError: a path that does not exist or is none of ``MODEL_PATHS``, or an object that is
            neither a torch module nor a Keras model.
    """
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise PackagingError(f"model path {path} does not exist")
        if is_keras_path(path):
            return "keras"
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise PackagingError(f"{path} is a folder without config.json or saved_model.pb; give {_model_paths()}")
            return "transformers"
        if path.suffix.lower() == ".onnx":
            return "onnx"
        raise PackagingError(f"{path} is not a model edgeship reads; give {_model_paths()}")
    torch = sys.modules.get("torch")  # a caller holding a module has imported torch already
    if torch is not None and isinstance(model, torch.nn.Module):
        return "torch"
    if is_keras_model(model):
        return "keras"
    raise PackagingError(
        f"cannot package a {type(model).__name__}; give a torch.nn.Module, a Keras model, or a path: {_model_paths()}"
    )


def _model_paths() -> str:
    return ", ".join(MODEL_PATHS.values())


def load_source(
    model: Any,
    kind: str,
    *,
    task: str | None,
    example_inputs: Any,
    calibration: Any,
    options: PackageOptions,
    progress: Callable[[str], None],
) -> Source:
    """Load ``model`` (of the ``kind`` detect_input_kind returned) as a Source.

    Raises:
        PackagingError: the model cannot be loaded or run, or the example/calibration data do not fit it.
    """
    raw = raw_calibration(calibration)  # sentences or image files, turned into arrays by the model's preprocessing
    if raw is not None and kind != "transformers":
        raise PackagingError(
            "a text file of sentences or a folder of images is calibration for transformers folders (which carry "
            "the tokenizer or image processor); give arrays (.npz or a folder of NAME.npy) for other models"
        )
    data = load_calibration(calibration) if calibration is not None and raw is None else None
    if kind == "keras":
        return keras_source(model, example_inputs, data, task, options, progress)
    if kind == "torch":
        return torch_source(model, example_inputs, data, task, options, progress)
    if example_inputs is not None:
        raise PackagingError("example_inputs are for torch modules; give calibration data for other models")
    if kind == "transformers":
        return transformers_source(Path(model), task, data, raw, options, progress)
    if kind == "onnx":
        return onnx_source(Path(model), task, data, options, progress)
    raise PackagingError(f"unknown input kind {kind!r}")
