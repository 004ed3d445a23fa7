"""Normalise the three input kinds (torch module, transformers folder, .onnx file) to one ``Source``.

A ``Source`` knows its inputs and outputs (names, dtypes, shapes with named dynamic dims), how to
compute the reference outputs (numpy in, numpy out), the validation data, and how to produce an
fp32 ONNX graph of itself once for the targets that start from ONNX. Heavy libraries are imported
inside the functions that need them.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packagers._keras_source import is_keras_model, is_keras_path, keras_source
from packagers.options import PackageOptions
from sdk.errors import ManifestError, PackagingError
from sdk.manifest import DTYPES, TensorSpec

__all__ = [
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

TASKS = ("feature-extraction", "text-classification", "token-classification", "image-classification")
# What the device needs to turn raw text / images into the model's inputs lives in
# ``Source.preprocessing`` (the manifest's ``preprocessing``; docs/bundle-format.md section 4.5).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Files a transformers tokenizer may need at run time; those present are copied into the bundle.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "spm.model",
    "sentencepiece.bpe.model",
)
_TOKENIZER_CORE = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "spm.model",
                   "sentencepiece.bpe.model")  # fmt: skip
# Built-in validation text for models that ship a tokenizer (varied lengths exercise the padding).
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Edge devices run small models close to the data.",
    "I loved this film, the acting was wonderful!",
    "This was the worst service I have ever had.",
    "Shipping is free for orders over fifty euros.",
    "Is the meeting on Tuesday or on Thursday?",
    "A cat sat on the mat.",
    "The update rolled out to ten percent of the fleet before a gate paused it.",
    "Temperatures will drop sharply overnight.",
    "Please restart the device and try again.",
    "Neural networks approximate functions.",
    "What time does the train leave?",
    "Great value, would buy again.",
    "Terrible battery life and a cracked screen.",
    "Hello world",
    "The sensor reported an anomaly at noon, and the model flagged it within a second.",
)

Arrays = dict[str, np.ndarray]
Reference = Callable[[Mapping[str, np.ndarray]], Arrays]
_DIM_OK = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


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


# ---- input kinds -------------------------------------------------------------------------------
def detect_input_kind(model: Any) -> str:
    """Which of "torch", "transformers", "onnx" ``model`` is, without loading it.

    Raises:
        PackagingError: a path that does not exist, a folder without config.json, a file that is
            not .onnx, or an object that is not a torch module.
    """
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise PackagingError(f"model path {path} does not exist")
        if is_keras_path(path):
            return "keras"
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise PackagingError(
                    f"{path} is a folder without config.json; give a transformers model folder "
                    "(saved with save_pretrained) or an .onnx file"
                )
            return "transformers"
        if path.suffix.lower() == ".onnx":
            return "onnx"
        raise PackagingError(f"{path} is neither a transformers model folder nor an .onnx file")
    torch = sys.modules.get("torch")  # a caller holding a module has imported torch already
    if torch is not None and isinstance(model, torch.nn.Module):
        return "torch"
    if is_keras_model(model):
        return "keras"
    raise PackagingError(
        f"cannot package a {type(model).__name__}; give a torch.nn.Module, a transformers model folder or an .onnx file"
    )


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
        return _torch_source(model, example_inputs, data, task, options, progress)
    if example_inputs is not None:
        raise PackagingError("example_inputs are for torch modules; give calibration data for other models")
    if kind == "transformers":
        return _transformers_source(Path(model), task, data, raw, options, progress)
    if kind == "onnx":
        return _onnx_source(Path(model), task, data, options, progress)
    raise PackagingError(f"unknown input kind {kind!r}")


# ---- calibration / validation data ---------------------------------------------------------------
def raw_calibration(calibration: Any) -> list[str] | list[Path] | None:
    """Sentences of a ``.txt`` file (one per line, blank lines skipped) or the image files of a folder.

    Returns None for anything else (arrays, ``.npz``, a folder of ``.npy``): ``load_calibration`` reads those.

    Raises:
        PackagingError: the text file cannot be read or holds no sentence.
    """
    if not isinstance(calibration, (str, os.PathLike)):
        return None
    path = Path(calibration)
    if path.is_file() and path.suffix.lower() == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise PackagingError(f"cannot read calibration sentences {path}: {e}") from e
        sentences = [line.strip() for line in lines if line.strip()]
        if not sentences:
            raise PackagingError(f"calibration file {path} holds no sentence")
        return sentences
    if path.is_dir() and not any(path.glob("*.npy")):
        images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return images or None
    return None


def load_calibration(calibration: Any) -> Arrays:
    """Read calibration data: a dict name -> array, an .npz file, or a folder of NAME.npy files.

    Raises:
        PackagingError: the file or folder cannot be read, or holds no arrays.
    """
    arrays: Arrays = {}
    if isinstance(calibration, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in calibration.items()}
    elif isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration)
        try:
            if path.is_dir():
                arrays = {p.stem: np.load(p, allow_pickle=False) for p in sorted(path.glob("*.npy"))}
            elif path.suffix.lower() == ".npz":
                with np.load(path, allow_pickle=False) as npz:
                    arrays = {k: npz[k] for k in npz.files}
            else:
                raise PackagingError(
                    f"calibration {path} must be an .npz file, a folder of NAME.npy files, a .txt file of sentences "
                    "or a folder of images"
                )
        except (OSError, ValueError) as e:
            raise PackagingError(f"cannot read calibration data {path}: {e}") from e
    else:
        raise PackagingError(f"calibration must be a dict of arrays, an .npz file or a folder, got {type(calibration)}")
    if not arrays:
        raise PackagingError("calibration data holds no arrays")
    return arrays


def _fit_data(data: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> Arrays:
    """Check calibration arrays against the input specs and cast them safely (the caller caps the count)."""
    names = [s.name for s in specs]
    missing = [n for n in names if n not in data]
    extra = sorted(set(data) - set(names))
    if missing or extra:
        raise PackagingError(
            f"calibration data must hold exactly the inputs {names}; missing {missing}, unknown {extra}"
        )
    out: Arrays = {}
    counts = set()
    for spec in specs:
        arr = np.asarray(data[spec.name])
        target = np.dtype(spec.dtype)
        if arr.dtype != target:
            if not np.can_cast(arr.dtype, target, casting="same_kind"):
                raise PackagingError(f"calibration {spec.name}: dtype {arr.dtype} cannot be used as {spec.dtype}")
            arr = arr.astype(target)
        if arr.ndim != len(spec.shape):
            raise PackagingError(
                f"calibration {spec.name}: {arr.ndim} dims, the model expects {len(spec.shape)} {list(spec.shape)}"
            )
        for i, (have, want) in enumerate(zip(arr.shape, spec.shape, strict=True)):
            if isinstance(want, int) and i > 0 and have != want:
                raise PackagingError(f"calibration {spec.name}: dim {i} is {have}, the model expects {want}")
        counts.add(arr.shape[0])
        out[spec.name] = np.ascontiguousarray(arr)
    if len(counts) != 1 or 0 in counts:
        raise PackagingError(f"calibration inputs need the same non-zero number of samples, got {sorted(counts)}")
    return out


def _random_like(spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator, *, high: int = 2) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        if "mask" in spec.name.lower():
            return np.ones(shape, dtype=dtype)
        if "token_type" in spec.name.lower():
            return np.zeros(shape, dtype=dtype)
        return rng.integers(0, max(high, 1), size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


# ---- torch modules -------------------------------------------------------------------------------
def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def _flatten_outputs(out: Any) -> tuple[list[str] | None, list[Any]]:
    """Tensors a module returned, and their names when it returned a mapping."""
    import torch

    if isinstance(out, torch.Tensor):
        return None, [out]
    if isinstance(out, Mapping):  # includes transformers ModelOutput
        items = [(k, v) for k, v in out.items() if v is not None]
        return [str(k) for k, _ in items], [v for _, v in items]
    if isinstance(out, (tuple, list)):
        return None, list(out)
    raise PackagingError(f"the module returned a {type(out).__name__}; return a tensor, a tuple or a dict of tensors")


def _make_wrapper(module: Any, names: Sequence[str], as_kwargs: bool) -> Any:
    """A module with a positional ``forward(*inputs)`` returning a tuple of tensors (what exporters want)."""
    import torch

    class _Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *args: Any) -> tuple[Any, ...]:
            out = self.inner(**dict(zip(names, args, strict=True))) if as_kwargs else self.inner(*args)
            return tuple(_flatten_outputs(out)[1])

    return _Wrapper().eval()


def _torch_reference(wrapper: Any, input_names: Sequence[str], output_names: Sequence[str]) -> Reference:
    import torch

    def reference(inputs: Mapping[str, np.ndarray]) -> Arrays:
        tensors = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in input_names]
        with torch.no_grad():
            outs = wrapper(*tensors)
        return {n: t.detach().cpu().numpy() for n, t in zip(output_names, outs, strict=True)}

    return reference


def _set_eval(module: Any) -> Callable[[], None]:
    """Put ``module`` in eval mode; returns the function that restores each submodule's mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()

    def restore() -> None:
        for m, training in modes:
            m.training = training

    return restore


def _dtype_name(dtype: Any) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise PackagingError(f"dtype {name} is not supported in a bundle; supported: {', '.join(DTYPES)}")
    return name


def _spec(name: str, dtype: Any, shape: Sequence[int], dynamic: Mapping[int, str]) -> TensorSpec:
    dims: list[int | str] = [dynamic.get(i, int(d)) for i, d in enumerate(shape)]
    for d in dynamic:
        if not 0 <= d < len(shape):
            raise PackagingError(f"dynamic axis {d} of {name!r} is out of range for shape {list(shape)}")
    try:
        return TensorSpec(name=name, dtype=_dtype_name(dtype), shape=tuple(dims))
    except ManifestError as e:  # a dim name the bundle format refuses
        raise PackagingError(f"tensor {name!r}: {e}") from e


def _generated_like(examples: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], n: int, seed: int) -> Arrays:
    """Random validation samples shaped like the examples, with their value range."""
    rng = np.random.default_rng(seed)
    out: Arrays = {}
    for spec in specs:
        ex = examples[spec.name]
        shape = (n, *ex.shape[1:])
        if ex.dtype == np.bool_:
            out[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        elif ex.dtype.kind in "iu":
            lo, hi = (int(ex.min()), int(ex.max())) if ex.size else (0, 1)
            out[spec.name] = rng.integers(lo, hi + 1, size=shape).astype(ex.dtype)
        else:
            mean = float(ex.mean()) if ex.size else 0.0
            std = float(ex.std()) if ex.size > 1 else 0.0
            out[spec.name] = (mean + (std or 1.0) * rng.standard_normal(size=shape)).astype(ex.dtype)
    return out


def _takes_keywords(module: Any, names: Sequence[str]) -> bool:
    """Whether a dict of example inputs goes to ``forward`` by keyword (else: positional, names only)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return all(n in params for n in names)


def _torch_source(
    module: Any,
    example_inputs: Any,
    data: Arrays | None,
    task: str | None,
    options: PackageOptions,
    progress: Callable[[str], None],
) -> Source:
    import torch

    if example_inputs is None:
        raise PackagingError("a torch module needs example_inputs (a tuple of tensors or a dict name -> array)")
    as_kwargs = isinstance(example_inputs, Mapping) and _takes_keywords(module, [str(k) for k in example_inputs])
    if isinstance(example_inputs, Mapping):
        names = [str(k) for k in example_inputs]
        values = list(example_inputs.values())
        if options.input_names is not None and list(options.input_names) != names:
            raise PackagingError(
                f"options.input_names {list(options.input_names)} differ from the example keys {names}"
            )
    else:
        values = [example_inputs] if isinstance(example_inputs, (torch.Tensor, np.ndarray)) else list(example_inputs)
        default = ["input"] if len(values) == 1 else [f"input_{i}" for i in range(len(values))]
        names = list(options.input_names) if options.input_names is not None else default
        if len(names) != len(values):
            raise PackagingError(f"{len(values)} example inputs but {len(names)} input names: {names}")
    if len(set(names)) != len(names) or not values:
        raise PackagingError(f"input names must be unique and at least one: {names}")
    try:
        tensors = [v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v)) for v in values]
    except (TypeError, ValueError) as e:
        raise PackagingError(f"example inputs must be tensors or arrays: {e}") from e
    if any(t.dim() == 0 for t in tensors):
        raise PackagingError("example inputs need a batch dimension first")
    examples = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}

    restore = _set_eval(module)
    try:
        wrapper = _make_wrapper(module, names, as_kwargs)
        try:
            with torch.no_grad():
                raw = module(**dict(zip(names, tensors, strict=True))) if as_kwargs else module(*tensors)
        except Exception as e:  # the user's forward: any error means the examples do not fit
            raise PackagingError(f"the module failed on example_inputs: {type(e).__name__}: {e}") from e
        keys, outs = _flatten_outputs(raw)
        if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
            raise PackagingError("the module must return tensors (a tensor, a tuple or a dict of tensors)")
        default_out = keys or (["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))])
        out_names = list(options.output_names) if options.output_names is not None else default_out
        if len(out_names) != len(outs) or len(set(out_names)) != len(out_names):
            raise PackagingError(f"{len(outs)} outputs but output names {out_names}")
        if set(out_names) & set(names):
            raise PackagingError(f"output names {out_names} clash with input names {names}")

        axes = (
            dict(options.dynamic_axes)
            if options.dynamic_axes is not None
            else {n: {0: "batch"} for n in names + out_names}
        )
        unknown = sorted(set(axes) - set(names) - set(out_names))
        if unknown:
            raise PackagingError(f"dynamic_axes names unknown tensors {unknown}")
        inputs = tuple(_spec(n, examples[n].dtype, examples[n].shape, axes.get(n, {})) for n in names)
        outputs = tuple(
            _spec(n, o.detach().cpu().numpy().dtype, tuple(o.shape), axes.get(n, {}))
            for n, o in zip(out_names, outs, strict=True)
        )
        if data is not None:
            validation = _fit_data(data, inputs)
            origin = "calibration"
        else:
            validation = _generated_like(examples, inputs, options.validation_samples, options.seed)
            origin = f"random, shaped like example_inputs (seed {options.seed})"
        reference = _torch_reference(wrapper, names, out_names)

        def export(workdir: Path) -> OnnxExport:
            from packagers.export import torch2onnx

            return torch2onnx(
                wrapper, tuple(tensors), workdir / "source.onnx", input_names=names, output_names=out_names,
                dynamic_axes={k: dict(v) for k, v in axes.items()}, opset=options.opset, exporter=options.exporter,
                progress=progress,
            )  # fmt: skip
    except BaseException:
        restore()
        raise

    return Source(
        kind="torch",
        description=f"torch module {type(module).__name__}",
        inputs=inputs,
        outputs=outputs,
        reference=reference,
        reference_name=f"torch {_torch_version()}",
        validation_inputs=validation,
        data_origin=origin,
        task=task,
        info={"class": f"{type(module).__module__}.{type(module).__qualname__}"},
        export_fn=export,
        close_fn=restore,
        native=wrapper,
    )


# ---- transformers folders ------------------------------------------------------------------------
# task -> (transformers Auto class, output name); the task decides the head and so the output.
_TASK_MODELS = {
    "feature-extraction": ("AutoModel", "last_hidden_state"),
    "text-classification": ("AutoModelForSequenceClassification", "logits"),
    "token-classification": ("AutoModelForTokenClassification", "logits"),
    "image-classification": ("AutoModelForImageClassification", "logits"),
}
_ARCHITECTURE_TASKS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForImageClassification", "image-classification"),
)
# sentence-transformers Pooling modes the device implements (config key -> manifest name).
_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
PREPROCESSOR_MEMBER = "preprocessor/preprocessor_config.json"


@dataclass
class _Prepared:
    """The input side of a transformers source: what the model takes, the data, and the device's preprocessing."""

    inputs: tuple[TensorSpec, ...]
    arrays: Arrays
    origin: str
    axes: dict[str, dict[int, str]]
    preprocessing: dict[str, Any] = field(default_factory=dict)
    members: dict[str, Path | bytes] = field(default_factory=dict)
    input_policy: dict[str, Any] = field(default_factory=dict)


def _tokenizer_files(folder: Path) -> list[str]:
    if not any((folder / f).is_file() for f in _TOKENIZER_CORE):
        return []
    return [f for f in TOKENIZER_FILES if (folder / f).is_file()]


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a weight-loading bar on stderr; the CLI has its own progress lines."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _default_task(architectures: Sequence[str]) -> str:
    for suffix, task in _ARCHITECTURE_TASKS:
        if any(a.endswith(suffix) for a in architectures):
            return task
    return "feature-extraction"


def _labels(config: Any) -> list[str]:
    """Class names by index from the config's id2label (keys may be ints or strings)."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(int(config.num_labels))]


def _pooling(folder: Path) -> dict[str, Any]:
    """The sentence-embedding pooling a feature-extraction bundle declares.

    A sentence-transformers folder says how it pools (``1_Pooling/config.json``) and whether it
    normalises (a ``Normalize`` module); any other folder gets masked mean pooling, unnormalised.

    Raises:
        PackagingError: the folder asks for a pooling the device does not implement.
    """
    modules: list[dict[str, Any]] = []
    if (folder / "modules.json").is_file():
        try:
            modules = list(json.loads((folder / "modules.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise PackagingError(f"cannot read {folder / 'modules.json'}: {e}") from e
    pool_dirs = [str(m.get("path", "")) for m in modules if str(m.get("type", "")).endswith("Pooling")]
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules) or (folder / "2_Normalize").is_dir()
    config_path = folder / (pool_dirs[0] if pool_dirs else "1_Pooling") / "config.json"
    if not config_path.is_file():
        return {"mode": "mean", "normalize": normalize, "source": "default"}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PackagingError(f"cannot read the sentence-transformers pooling config {config_path}: {e}") from e
    modes = [k for k, v in config.items() if k.startswith("pooling_mode") and v is True]
    if len(modes) != 1 or modes[0] not in _POOLING_MODES:
        raise PackagingError(
            f"{config_path} asks for pooling {modes}; the device implements exactly one of "
            f"{', '.join(sorted(_POOLING_MODES))}"
        )
    return {"mode": _POOLING_MODES[modes[0]], "normalize": normalize, "source": str(config_path.relative_to(folder))}


def _text_inputs(
    folder: Path, config: Any, model: Any, data: Arrays | None, sentences: list[str] | None, options: PackageOptions
) -> _Prepared:
    """Input names, validation ids and the tokenizer contract of a text model."""
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params:
        raise PackagingError(f"{type(model).__name__} does not take input_ids; text tasks need a text model")
    input_names = ["input_ids"]
    if "attention_mask" in params:
        input_names.append("attention_mask")
    if "token_type_ids" in params and int(getattr(config, "type_vocab_size", 0) or 0) > 0:
        input_names.append("token_type_ids")
    vocab_size = int(getattr(config, "vocab_size", 0) or 0)
    max_positions = int(getattr(config, "max_position_embeddings", 0) or 512)
    max_length = max_positions
    prepared = _Prepared(inputs=(), arrays={}, origin="", axes={n: {0: "batch", 1: "sequence"} for n in input_names})

    tok_files = _tokenizer_files(folder)
    tokenizer = None
    if tok_files:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # broken tokenizer files must not be shipped
            raise PackagingError(f"cannot load the tokenizer in {folder}: {type(e).__name__}: {e}") from e
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:  # the device tokenizes with the `tokenizers` package only
            raise PackagingError(f"the tokenizer in {folder} has no fast (tokenizers) form the device could run")
        model_max = getattr(tokenizer, "model_max_length", None) or max_positions
        max_length = int(min(model_max if model_max < 10**6 else max_positions, max_positions))
        prepared.members = {f"tokenizer/{f}": folder / f for f in tok_files}
        # The device runs exactly the pipeline transformers ran here (transformers may rebuild parts of
        # it, e.g. the decoder), without per-call truncation or padding: those are declared below.
        effective = json.loads(backend.to_str())
        effective["truncation"] = effective["padding"] = None
        prepared.members["tokenizer/tokenizer.json"] = json.dumps(effective, ensure_ascii=False).encode("utf-8")
        pad_id = tokenizer.pad_token_id
        prepared.preprocessing["tokenizer"] = {
            "files": sorted(prepared.members),
            "class": type(tokenizer).__name__,
            "max_length": max_length,
            "truncation": True,
            "truncation_strategy": "longest_first",
            "truncation_side": str(tokenizer.truncation_side),
            "padding": "longest",
            "padding_side": str(tokenizer.padding_side),
            "pad_token": tokenizer.pad_token,
            "pad_id": int(pad_id) if pad_id is not None else None,
            "pad_type_id": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
            "add_special_tokens": True,
            "model_input_names": [str(n) for n in tokenizer.model_input_names],
        }

    if data is not None:
        raw, origin = dict(data), "calibration"
    elif tokenizer is not None:
        texts = sentences if sentences is not None else list(SENTENCES)
        enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="np")
        raw = {n: np.asarray(enc[n]).astype(np.int64) for n in input_names if n in enc}
        if "token_type_ids" in input_names and "token_type_ids" not in raw:
            raw["token_type_ids"] = np.zeros_like(raw["input_ids"])
        if "attention_mask" in input_names and "attention_mask" not in raw:
            raw["attention_mask"] = np.ones_like(raw["input_ids"])
        if vocab_size and int(raw["input_ids"].max()) >= vocab_size:
            raise PackagingError(f"the tokenizer in {folder} produces ids beyond the model's vocab_size {vocab_size}")
        origin = (
            f"{len(texts)} calibration sentences through the bundled tokenizer"
            if sentences is not None
            else f"{len(texts)} built-in sentences through the bundled tokenizer"
        )
    elif sentences is not None:
        raise PackagingError(f"calibration sentences need a tokenizer, and {folder} has none (save it with the model)")
    else:
        rng = np.random.default_rng(options.seed)
        n, length = options.validation_samples, min(options.sequence_length, max_positions)
        ids = rng.integers(0, max(vocab_size, 2), size=(n, length)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1::2, length - max(length // 4, 1) :] = 0  # pad the tail of every other sample
        raw = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        raw = {k: v for k, v in raw.items() if k in input_names}
        origin = f"random token ids within the vocabulary (seed {options.seed})"

    prepared.inputs = tuple(TensorSpec(n, "int64", ("batch", "sequence")) for n in input_names)
    prepared.arrays = _fit_data(raw, prepared.inputs)
    prepared.origin = origin
    length = prepared.arrays["input_ids"].shape[1]
    if length > max_length:
        raise PackagingError(f"calibration sequences have {length} tokens; the model takes at most {max_length}")
    # The device truncates to max_length, so a longer sequence is a caller's mistake worth refusing.
    prepared.input_policy = {"nonfinite": "reject", "dims": {"sequence": [1, max_length]}}
    return prepared


def _image_contract(processor: Any, folder: Path) -> dict[str, Any]:
    """What the device does to an image, from the image processor that saved ``preprocessor_config.json``.

    Raises:
        PackagingError: the processor resizes in a way the device does not implement (only a fixed
            height x width resize, no center crop or padding).
    """
    size = processor.size
    height = getattr(size, "height", None) if not isinstance(size, Mapping) else size.get("height")
    width = getattr(size, "width", None) if not isinstance(size, Mapping) else size.get("width")
    unsupported = [k for k in ("do_center_crop", "do_pad", "do_reduce_labels") if getattr(processor, k, None)]
    if not (height and width) or unsupported:
        raise PackagingError(
            f"the image processor in {folder} ({type(processor).__name__}: size {size!r}, "
            f"{unsupported or 'no crop/pad'}) is not supported: the device resizes to a fixed "
            "{'height', 'width'} without center crop or padding"
        )
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    return {
        "files": [PREPROCESSOR_MEMBER],
        "class": type(processor).__name__,
        "size": {"height": int(height), "width": int(width)},
        "do_resize": bool(processor.do_resize),
        "resample": int(processor.resample if processor.resample is not None else 2),  # PIL code, 2 = bilinear
        "do_rescale": bool(processor.do_rescale),
        "rescale_factor": float(processor.rescale_factor),
        "do_normalize": bool(processor.do_normalize),
        "image_mean": [float(v) for v in mean] if mean is not None else None,
        "image_std": [float(v) for v in std] if std is not None else None,
        "do_convert_rgb": True,  # images are decoded as RGB, as transformers' image pipeline does
        "channels_first": True,
    }


def _synthetic_images(n: int, height: int, width: int, seed: int) -> list[Any]:
    """Smooth colour gradients with noise, of varied sizes around the model's: they exercise the resize."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h = max(4, int(height * rng.uniform(0.5, 2.0)))
        w = max(4, int(width * rng.uniform(0.5, 2.0)))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, ((xx + yy) % (8 + i)) / (8 + i)], axis=-1) * 200
        pixels = np.clip(base + rng.normal(0, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, mode="RGB"))
    return images


def _image_inputs(
    folder: Path, config: Any, model: Any, data: Arrays | None, files: list[Path] | None, options: PackageOptions
) -> _Prepared:
    """pixel_values [batch, C, H, W] with H and W fixed by the image processor, and its contract."""
    params = inspect.signature(model.forward).parameters
    if "pixel_values" not in params:
        raise PackagingError(f"{type(model).__name__} does not take pixel_values; image tasks need an image model")
    if not (folder / "preprocessor_config.json").is_file():
        raise PackagingError(
            f"{folder} has no preprocessor_config.json; save the image processor with the model (save_pretrained)"
        )
    from PIL import Image, UnidentifiedImageError
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # a broken processor config must not be shipped
        raise PackagingError(f"cannot load the image processor in {folder}: {type(e).__name__}: {e}") from e
    contract = _image_contract(processor, folder)
    height, width = contract["size"]["height"], contract["size"]["width"]
    channels = int(getattr(config, "num_channels", 3) or 3)
    spec = TensorSpec("pixel_values", "float32", ("batch", channels, height, width))

    if data is not None:
        raw, origin = dict(data), "calibration"
    else:
        if files is not None:
            try:
                images = [Image.open(p).convert("RGB") for p in files]
            except (OSError, UnidentifiedImageError) as e:
                raise PackagingError(f"cannot read a calibration image: {e}") from e
            origin = f"{len(images)} calibration images through the bundled image processor"
        else:
            images = _synthetic_images(options.validation_samples, height, width, options.seed)
            origin = f"{len(images)} synthetic images through the bundled image processor (seed {options.seed})"
        try:
            pixels = processor(images=images, return_tensors="np")["pixel_values"]
        except Exception as e:  # the processor refused the images
            raise PackagingError(f"the image processor in {folder} failed: {type(e).__name__}: {e}") from e
        raw = {"pixel_values": np.asarray(pixels, dtype=np.float32)}
    return _Prepared(
        inputs=(spec,),
        arrays=_fit_data(raw, (spec,)),
        origin=origin,
        axes={"pixel_values": {0: "batch"}},
        preprocessing={"image": contract},
        members={PREPROCESSOR_MEMBER: folder / "preprocessor_config.json"},
        input_policy={"nonfinite": "reject"},
    )


def _transformers_source(
    folder: Path,
    task: str | None,
    data: Arrays | None,
    raw: list[str] | list[Path] | None,
    options: PackageOptions,
    progress: Callable[[str], None],
) -> Source:
    import torch
    import transformers

    progress(f"loading transformers model from {folder}")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # OSError, ValueError, JSON errors: all mean an unusable folder
        raise PackagingError(f"cannot read the transformers config in {folder}: {e}") from e
    task = task or _default_task(list(getattr(config, "architectures", None) or []))
    if task not in TASKS:
        raise PackagingError(
            f"task {task!r} is not supported for transformers folders; valid tasks: {', '.join(TASKS)}"
        )
    auto_name, output_name = _TASK_MODELS[task]
    try:
        with warnings.catch_warnings(), _no_progress_bars():
            warnings.simplefilter("ignore")
            model = getattr(transformers, auto_name).from_pretrained(folder, local_files_only=True)
    except Exception as e:  # missing or corrupt weights, unknown architecture
        raise PackagingError(f"cannot load the {task} model in {folder}: {type(e).__name__}: {e}") from e
    model.eval()

    is_image = task == "image-classification"
    if raw is not None and is_image != isinstance(raw[0], Path):
        want = "a folder of images" if is_image else "a .txt file of sentences"
        raise PackagingError(f"calibration for {task} must be {want} (or arrays)")
    if is_image:
        prepared = _image_inputs(folder, config, model, data, raw, options)  # type: ignore[arg-type]
    else:
        prepared = _text_inputs(folder, config, model, data, raw, options)  # type: ignore[arg-type]
    if task == "feature-extraction":
        prepared.preprocessing["pooling"] = _pooling(folder)
    else:
        prepared.preprocessing["labels"] = _labels(config)
        problem = getattr(config, "problem_type", None)
        if problem:  # decides softmax vs sigmoid scores in the device's pipelines
            prepared.preprocessing["problem_type"] = str(problem)
    input_names = [s.name for s in prepared.inputs]
    validation = prepared.arrays

    class _TaskWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, *args: Any) -> tuple[Any, ...]:
            out = self.inner(**dict(zip(input_names, args, strict=True)), return_dict=True)
            return (out[output_name],)

    wrapper = _TaskWrapper().eval()
    reference = _torch_reference(wrapper, input_names, [output_name])
    probe = reference({k: v[:2] for k, v in validation.items()})[output_name]
    out_shape: tuple[int | str, ...]
    if task in ("feature-extraction", "token-classification"):  # one vector per token
        out_shape = ("batch", "sequence", int(probe.shape[-1]))
        axes = {**prepared.axes, output_name: {0: "batch", 1: "sequence"}}
    else:
        out_shape = ("batch", int(probe.shape[-1]))
        axes = {**prepared.axes, output_name: {0: "batch"}}
    outputs = (TensorSpec(output_name, _dtype_name(probe.dtype), out_shape),)

    def export(workdir: Path) -> OnnxExport:
        from packagers.export import torch2onnx

        example = tuple(torch.from_numpy(validation[n][:2]) for n in input_names)
        return torch2onnx(
            wrapper, example, workdir / "source.onnx", input_names=input_names, output_names=[output_name],
            dynamic_axes=axes, opset=options.opset, exporter=options.exporter, progress=progress,
        )  # fmt: skip

    return Source(
        kind="transformers",
        description=f"transformers {type(model).__name__} from {folder.name}",
        inputs=prepared.inputs,
        outputs=outputs,
        reference=reference,
        reference_name=f"torch {_torch_version()}",
        validation_inputs=validation,
        data_origin=prepared.origin,
        task=task,
        preprocessing=prepared.preprocessing,
        members=prepared.members,
        input_policy=prepared.input_policy,
        info={
            "architecture": type(model).__name__,
            "transformers": transformers.__version__,
            "model_type": getattr(config, "model_type", None),
        },
        export_fn=export,
        native=wrapper,
    )


# ---- .onnx files ---------------------------------------------------------------------------------
def _dim_name(raw: str, tensor: str, index: int) -> str:
    if raw and _DIM_OK.match(raw):
        return raw
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", raw or f"{tensor}_dim{index}")
    if not cleaned or not (cleaned[0].isalpha() or cleaned[0] == "_"):
        cleaned = f"d_{cleaned}"
    return cleaned[:64]


def _onnx_specs(values: Sequence[Any]) -> tuple[TensorSpec, ...]:
    from onnx import helper

    specs = []
    for value in values:
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise PackagingError(f"ONNX value {value.name!r} is not a tensor (sequences and maps are not supported)")
        try:
            dtype = _dtype_name(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        except (KeyError, TypeError) as e:
            raise PackagingError(f"ONNX value {value.name!r} has an unsupported element type {ttype.elem_type}") from e
        dims: list[int | str] = []
        for i, d in enumerate(ttype.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(_dim_name(d.dim_param, value.name, i))
        specs.append(TensorSpec(value.name, dtype, tuple(dims)))
    return tuple(specs)


def _gather_vocab(graph: Any) -> dict[str, int]:
    """Input name -> rows of the initializer it indexes through a Gather (embedding tables)."""
    sizes = {init.name: int(init.dims[0]) for init in graph.initializer if len(init.dims) >= 1}
    vocab: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in sizes:
            vocab[node.input[1]] = min(vocab.get(node.input[1], 1 << 62), sizes[node.input[0]])
    return vocab


def _onnx_source(
    path: Path,
    task: str | None,
    data: Arrays | None,
    options: PackageOptions,
    progress: Callable[[str], None],
) -> Source:
    import onnx
    import onnxruntime as ort

    progress(f"checking ONNX model {path}")
    try:
        onnx.checker.check_model(str(path))
        proto = onnx.load(str(path))
    except Exception as e:  # DecodeError, ValidationError, OSError: all mean an unusable file
        raise PackagingError(f"{path} is not a valid ONNX model: {type(e).__name__}: {str(e)[:300]}") from e
    initializers = {i.name for i in proto.graph.initializer}
    inputs = _onnx_specs([v for v in proto.graph.input if v.name not in initializers])
    outputs = _onnx_specs(list(proto.graph.output))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    producer = f"{proto.producer_name} {proto.producer_version}".strip()

    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise PackagingError(f"onnxruntime cannot load {path}: {str(e)[:300]}") from e
    out_names = [o.name for o in outputs]

    def reference(feeds: Mapping[str, np.ndarray]) -> Arrays:
        result = session.run(out_names, {k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return {n: np.asarray(r) for n, r in zip(out_names, result, strict=True)}

    if data is not None:
        validation = _fit_data(data, inputs)
        origin = "calibration"
    else:
        rng = np.random.default_rng(options.seed)
        dim_values = dict(options.dim_values or {})
        vocab = _gather_vocab(proto.graph)
        validation = {}
        for spec in inputs:
            shape = tuple(
                (options.validation_samples if i == 0 else int(dim_values.get(d, options.sequence_length)))
                if isinstance(d, str) else d
                for i, d in enumerate(spec.shape)
            )  # fmt: skip
            validation[spec.name] = _random_like(spec, shape, rng, high=vocab.get(spec.name, 2))
        validation = _fit_data(validation, inputs)
        origin = f"random (seed {options.seed})"
    del proto

    def export(workdir: Path) -> OnnxExport:
        start = time.perf_counter()
        target = workdir / "source.onnx"
        try:
            model = onnx.load(str(path))  # pulls in external data, written back as one file
            onnx.save_model(model, str(target), save_as_external_data=False)
        except (ValueError, OSError) as e:
            raise PackagingError(f"cannot copy {path} into one ONNX file (over 2 GB?): {e}") from e
        return OnnxExport(target, opset, "given", time.perf_counter() - start)

    return Source(
        kind="onnx",
        description=f"ONNX model {path.name}",
        inputs=inputs,
        outputs=outputs,
        reference=reference,
        reference_name=f"onnxruntime {ort.__version__} fp32 (original .onnx)",
        validation_inputs=validation,
        data_origin=origin,
        task=task,
        info={"file": path.name, "opset": opset, "producer": producer},
        export_fn=export,
    )
