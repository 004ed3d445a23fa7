"""Calibration and validation data: read what the caller gave, fit it to the inputs, or make some up.

``choose_validation`` is the one rule every input kind follows for the samples the packager validates
(and calibrates) with: the caller's calibration arrays when given, else random samples shaped like the
caller's example inputs, else random samples from the input specs. Transformers folders go further
(sentences through the bundled tokenizer, images through the image processor) but take the caller's
arrays the same way, through ``fit_data``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packagers.sources.base import Arrays
from sdk.errors import PackagingError
from sdk.manifest import TensorSpec

if TYPE_CHECKING:
    from packagers.options import PackageOptions

__all__ = [
    "CALIBRATION_FORMATS",
    "IMAGE_SUFFIXES",
    "choose_validation",
    "fit_data",
    "generated_hint",
    "guessed_dims",
    "load_calibration",
    "raw_calibration",
    "shape_dim_values",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# What a calibration path may be, as ``raw_calibration`` and ``load_calibration`` read it (also `--help`'s list).
CALIBRATION_FORMATS = (
    "an .npz file (one array per input)",
    "a folder of NAME.npy files",
    "a .txt file of sentences, one per line (text models)",
    "a folder of images (image models)",
)


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
                raise PackagingError(f"calibration {path} must be {', or '.join(CALIBRATION_FORMATS)}")
        except (OSError, ValueError) as e:
            raise PackagingError(f"cannot read calibration data {path}: {e}") from e
    else:
        raise PackagingError(f"calibration must be a dict of arrays, an .npz file or a folder, got {type(calibration)}")
    if not arrays:
        raise PackagingError("calibration data holds no arrays")
    return arrays


def fit_data(data: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> Arrays:
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


def choose_validation(
    inputs: Sequence[TensorSpec],
    options: PackageOptions,
    *,
    data: Mapping[str, np.ndarray] | None,
    examples: Mapping[str, np.ndarray] | None = None,
    vocab: Mapping[str, int] | None = None,
) -> tuple[Arrays, str]:
    """The validation inputs of a source and where they came from (the manifest's ``validation.data``).

    Args:
        inputs: the source's input specs; the arrays are fitted to them.
        options: ``validation_samples`` and ``seed`` for random samples; ``input_shapes`` and ``dim_values``
            (else ``sequence_length``) for the named dims other than the first (batch).
        data: the caller's calibration arrays by input name: used as they are when given.
        examples: the caller's example inputs: random samples take their shapes and value ranges.
        vocab: input name -> exclusive upper bound of the integer ids it takes (embedding rows).

    Raises:
        PackagingError: the data do not fit the inputs.
    """
    if data is not None:
        return fit_data(data, inputs), "calibration"
    if examples is not None:
        generated = _generated_like(examples, inputs, options.validation_samples, options.seed)
        return fit_data(generated, inputs), f"random, shaped like example_inputs (seed {options.seed})"
    rng = np.random.default_rng(options.seed)
    dim_values = shape_dim_values(inputs, options)
    highs = dict(vocab or {})
    arrays: Arrays = {}
    for spec in inputs:
        shape = tuple(
            (options.validation_samples if i == 0 else int(dim_values.get(d, options.sequence_length)))
            if isinstance(d, str) else d
            for i, d in enumerate(spec.shape)
        )  # fmt: skip
        arrays[spec.name] = _random_like(spec, shape, rng, high=highs.get(spec.name, 2))
    return fit_data(arrays, inputs), f"random (seed {options.seed})"


def shape_dim_values(inputs: Sequence[TensorSpec], options: PackageOptions) -> dict[str, int]:
    """Named dim -> value for generated data: ``options.dim_values`` plus what ``options.input_shapes`` fixes.

    Raises:
        PackagingError: an input shape names an unknown input, has the wrong rank, contradicts a fixed dim
            or gives one named dim two values.
    """
    values = {str(k): int(v) for k, v in (options.dim_values or {}).items()}
    specs = {s.name: s for s in inputs}
    for name, given in (options.input_shapes or {}).items():
        if name not in specs:
            raise PackagingError(f"--input-shape names {name!r}, which is not an input; inputs: {sorted(specs)}")
        spec = specs[name]
        if len(given) != len(spec.shape):
            raise PackagingError(
                f"--input-shape {name}={','.join(map(str, given))}: {len(given)} dims, the model's input has "
                f"{len(spec.shape)} {list(spec.shape)}"
            )
        for i, (want, have) in enumerate(zip(spec.shape, given, strict=True)):
            if isinstance(want, int) and want != have:
                raise PackagingError(f"--input-shape {name}: dim {i} is fixed at {want} in the model, got {have}")
            if isinstance(want, str) and i > 0:
                if values.get(want, have) != have:
                    raise PackagingError(f"dim {want!r} is given two values, {values[want]} and {have}")
                values[want] = int(have)
    return values


def guessed_dims(inputs: Sequence[TensorSpec], options: PackageOptions) -> dict[str, list[str]]:
    """Input -> "dim i 'name'" of its dynamic dims (not the batch) that generated data has to guess a value for.

    Those take ``options.sequence_length``, a guess that suits token ids and may not suit an image: errors
    about generated data name them with the flags that fix them (``--input-shape``, ``--calibration``).
    """
    known = shape_dim_values(inputs, options)
    out: dict[str, list[str]] = {}
    for spec in inputs:
        dims = [f"dim {i} {d!r}" for i, d in enumerate(spec.shape) if i > 0 and isinstance(d, str) and d not in known]
        if dims:
            out[spec.name] = dims
    return out


def generated_hint(guessed: Mapping[str, Sequence[str]], inputs: Sequence[TensorSpec], options: PackageOptions) -> str:
    """What to pass when generated inputs with guessed dims fail: ``--calibration`` or ``--input-shape``."""
    dims = "; ".join(f"{name}: {', '.join(d)}" for name, d in guessed.items())

    def example(spec: TensorSpec) -> str:
        dims = ["1" if i == 0 and isinstance(d, str) else str(d) if isinstance(d, int) else "N"
                for i, d in enumerate(spec.shape)]  # fmt: skip
        return f"--input-shape {spec.name}={','.join(dims)}"

    examples = " ".join(example(spec) for spec in inputs if spec.name in guessed)
    return (
        f"the inputs were generated with a guessed value ({options.sequence_length}) for the dynamic dims {dims}; "
        f"pass real inputs with --calibration, or the shapes with {examples} (input_shapes=...)"
    )
