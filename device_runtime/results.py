"""One request grammar and one answer shape for the three front doors of a model on the device.

``edgeship-device predict``, the host's ``edgeship predict`` and the HTTP API (``device_runtime.serve``)
take the same requests and print the same JSON, so a script written against one reads the others:

- tensors: ``{"model": {...}, "outputs": {name: {"dtype", "shape", "data"}}}`` (``data`` nested lists,
  non-finite floats as ``null``);
- text, for bundles that carry a tokenizer: ``{"model", "task", ...}`` with ``labels`` (text-classification:
  per text the ``top_k`` best ``{"label", "score"}``), ``entities`` (token-classification) or
  ``embeddings`` (feature-extraction: per text one vector, pooled as the bundle declares);
- images, for image-classification bundles: ``{"model", "task", "labels"}`` as for text.

Text and images run one at a time (like transformers' pipelines), so a fixed-batch bundle takes a list too
and a result does not depend on what else was in the request.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.model import Model
from device_runtime.pipelines import Pipeline
from device_runtime.preprocess import encode_text
from device_runtime.tasks import TASK_CLASSES, EdgeModelForFeatureExtraction
from sdk.errors import InputError

__all__ = [
    "IMAGE_TASKS",
    "TEXT_TASKS",
    "add_request_arguments",
    "answer",
    "encode_array",
    "image_answer",
    "model_info",
    "read_input_files",
    "tensor_answer",
    "text_answer",
]

TEXT_TASKS = ("text-classification", "token-classification", "feature-extraction")
IMAGE_TASKS = ("image-classification",)
DEFAULT_TOP_K = 1  # labels per text or image, best first (None: every label)


def model_info(model: Model) -> dict[str, Any]:
    """Which model answered: name, version, target, precision, task and the bundle's sha256."""
    m = model.manifest
    return {
        "name": m.name,
        "version": m.version,
        "target": m.target,
        "precision": m.precision,
        "task": m.task,
        "sha256": model.bundle_sha256,
    }


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """``{"dtype", "shape", "data"}`` with ``data`` as nested lists (JSON has no NaN or infinity: ``null``)."""
    data: Any
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        boxed = array.astype(object)
        boxed[~np.isfinite(array)] = None
        data = boxed.tolist()
    else:
        data = array.tolist()
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": data}


def tensor_answer(model: Model, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """The answer to a tensor request."""
    return {"model": model_info(model), "outputs": {name: encode_array(a) for name, a in outputs.items()}}


def read_input_files(specs: Sequence[str], input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """``--input`` values: ``FILE.npy`` (a model with one input) or ``NAME=FILE.npy`` (one per input).

    Raises:
        InputError: a bare FILE.npy for a model with several inputs, an input given twice, an unreadable file.
    """
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            if len(input_names) != 1:
                raise InputError(f"the model has inputs {', '.join(input_names)}: give --input NAME=FILE.npy for each")
            name, path = input_names[0], spec
        if name in inputs:
            raise InputError(f"input {name!r} given twice")
        try:
            inputs[name] = np.load(Path(path), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read input {name!r} from {path}: {e}") from e
    return inputs


def _top_k(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"top_k must be an int >= 1 or null (every label), got {value!r}")
    return value


def _task_pipeline(model: Model, tasks: Sequence[str], what: str) -> Pipeline:
    task = model.manifest.task
    if task is None or task not in tasks:
        raise InputError(
            f"bundle {model.manifest.name} v{model.manifest.version} is a {task or 'task-less'} model: "
            f"it does not take {what} (tasks that do: {', '.join(tasks)})"
        )
    return Pipeline(task, TASK_CLASSES[task](model))


def text_answer(
    model: Model, texts: str | Sequence[str], *, top_k: Any = DEFAULT_TOP_K, aggregation_strategy: str = "none"
) -> dict[str, Any]:
    """Run text through the bundle's tokenizer and task.

    Args:
        model: a loaded model whose bundle carries a tokenizer.
        texts: one text or a list.
        top_k: text-classification: labels per text (None: all).
        aggregation_strategy: token-classification: ``none`` or ``simple`` (transformers' grouping).

    Returns:
        ``{"model", "task", "labels" | "entities" | "embeddings"}``, one entry per text; a task-less bundle
        with a tokenizer answers with its raw ``outputs`` instead.

    Raises:
        InputError: no tokenizer, a non-text task, empty or non-string text, a bad ``top_k``.
        ModelClosedError, BackendError: as ``Model.predict`` raises them.
    """
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items or not all(isinstance(t, str) for t in items):
        raise InputError("text must be a string or a non-empty list of strings")
    head: dict[str, Any] = {"model": model_info(model), "task": model.manifest.task}
    if model.manifest.task is None and model.manifest.preprocessing.tokenizer is not None:
        return {**tensor_answer(model, model.predict(encode_text(model, items))), "task": None}
    pipe = _task_pipeline(model, TEXT_TASKS, "text")
    if pipe.task == "text-classification":
        return {**head, "labels": pipe(items, top_k=_top_k(top_k))}
    if pipe.task == "token-classification":
        return {**head, "entities": pipe(items, aggregation_strategy=aggregation_strategy)}
    extractor: EdgeModelForFeatureExtraction = pipe.model  # type: ignore[assignment]
    vectors = [extractor(text).embeddings[0] for text in items]
    return {**head, "embeddings": [v.tolist() for v in vectors], "pooling": dict(extractor.pooling)}


def image_answer(model: Model, images: Any, *, top_k: Any = DEFAULT_TOP_K) -> dict[str, Any]:
    """Classify images (paths, encoded bytes, PIL images or uint8 arrays; one or a list) with the bundle's
    image preprocessing.

    Returns:
        ``{"model", "task", "labels"}``: per image the ``top_k`` best ``{"label", "score"}``.

    Raises:
        InputError: not an image-classification bundle, a corrupt image, a bad ``top_k``.
        ModelClosedError, BackendError: as ``Model.predict`` raises them.
    """
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise InputError("no image given")
    pipe = _task_pipeline(model, IMAGE_TASKS, "images")
    return {"model": model_info(model), "task": pipe.task, "labels": pipe(items, top_k=_top_k(top_k))}


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """The request options of both CLIs' ``predict``: ``--input``, ``--text`` or ``--image``, and ``--top-k``."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--input",
        action="append",
        metavar="[NAME=]FILE.npy",
        help="an input array: FILE.npy for a model with one input, else NAME=FILE.npy for each (repeat)",
    )
    group.add_argument("--text", action="append", help="a text, for bundles that carry a tokenizer (repeat for more)")
    group.add_argument(
        "--image", action="append", type=Path, help="an image file, for image-classification bundles (repeat)"
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        metavar="K",
        help=f"--text / --image classification: labels per input, best first (default {DEFAULT_TOP_K}; 0: all)",
    )


def answer(model: Model, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Run the request ``add_request_arguments`` parsed: the JSON answer, and the raw outputs of a tensor request.

    Raises:
        InputError: unreadable or ill-fitting inputs, text or images the bundle does not take.
        ModelClosedError, BackendError: as ``Model.predict`` raises them.
    """
    top_k = None if args.top_k == 0 else args.top_k
    if args.text:
        return text_answer(model, args.text, top_k=top_k), None
    if args.image:
        return image_answer(model, [str(p) for p in args.image], top_k=top_k), None
    outputs = model.predict(read_input_files(args.input, [spec.name for spec in model.manifest.inputs]))
    return tensor_answer(model, outputs), outputs
