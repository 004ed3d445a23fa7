"""Checking and converting caller inputs against a manifest's declared inputs; pure, no I/O.

The rules (every refusal is an ``InputError`` naming the declared name, dtype and shape):

- names: every declared input is required, no undeclared name is accepted;
- values: numpy arrays, or anything ``numpy.asarray`` turns into a bool or numeric array (Python
  lists, scalars); strings, bytes, objects and ragged lists are refused;
- dtypes: a cast numpy calls ``safe`` is done silently (``int32 -> int64``, ``bool -> int64``); an
  integer narrowing (``int64 -> int32``, ``int -> uint``) and an integer to float cast
  (``int64 -> float32``) only when every value survives it exactly; a float narrowing
  (``float64 -> float32``) unless a finite value would overflow; never float to integer, never a
  number to bool;
- shapes: same rank, fixed dimensions equal, and a named dimension (``"batch"``) the same size
  everywhere it appears, across inputs;
- the manifest's ``input_policy`` (``sdk.sections.InputPolicy``): a named dimension inside its ``dims`` range
  ``[min, max]``; no zero-size dimension (an empty tensor) unless the shape declares ``0`` there or the
  ``dims`` range of that name starts at 0; no NaN or infinity in a float input unless ``nonfinite`` is
  ``"pass"``; the inputs' total size (after conversion) at most ``max_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from sdk.errors import InputError
from sdk.manifest import DTYPES, TensorSpec
from sdk.sections import InputPolicy

__all__ = ["check_inputs", "describe"]

# numpy kinds that are numbers or booleans; anything else (str, bytes, object, void, datetime) is junk.
_NUMERIC_KINDS = frozenset("biuf")
_NUMPY_DTYPES = {name: np.dtype(name) for name in DTYPES}  # manifest dtype name -> numpy dtype, built once


_DEFAULT_POLICY = InputPolicy()
SHAPE_CACHE_SIZE = 64  # shape combinations a model remembers as valid (check_inputs' valid_shapes)


def describe(spec: TensorSpec) -> str:
    """``'x' float32 ['batch', 4]``: how an error names what the manifest declares."""
    return f"{spec.name!r} {spec.dtype} {list(spec.shape)}"


def check_inputs(
    specs: Sequence[TensorSpec],
    inputs: Mapping[str, Any],
    policy: InputPolicy = _DEFAULT_POLICY,
    valid_shapes: set[tuple[tuple[int, ...], ...]] | None = None,
) -> dict[str, np.ndarray]:
    """Validate ``inputs`` against ``specs`` and ``policy``; return contiguous arrays of the declared dtypes.

    Args:
        specs: the manifest's inputs.
        inputs: input name -> array-like.
        policy: the manifest's input policy (default: non-finite values refused, no ranges, no byte cap).
        valid_shapes: combinations of input shapes (in ``specs`` order) already found valid for these
            ``specs`` and ``policy``; a combination in it skips the shape checks, a new valid one is added
            (up to ``SHAPE_CACHE_SIZE``). The caller keeps one set per model.

    Returns:
        Input name -> C-contiguous array, in ``specs`` order. The caller's arrays are never modified.

    Raises:
        InputError: not a mapping, a missing or unexpected name, a value that is not a numeric array,
            an unsafe dtype cast, a shape that does not fit the declaration, an empty tensor, a dynamic
            dimension outside its range, a NaN or infinity refused by the policy, or inputs larger in
            total than ``policy.max_bytes``.
    """
    # The checks below run on every predict: exact-type fast paths skip the slower ABC checks.
    if type(inputs) is not dict and not isinstance(inputs, Mapping):
        expected = ", ".join(describe(s) for s in specs)
        raise InputError(f"inputs must be a mapping of name -> array, got {type(inputs).__name__}; expected {expected}")
    missing = [s for s in specs if s.name not in inputs]
    if missing:
        raise InputError(f"missing input(s): {', '.join(describe(s) for s in missing)}")
    if len(inputs) != len(specs):  # every declared name is there, so some other name is too
        declared = {s.name for s in specs}
        unexpected = sorted(str(k) for k in inputs if k not in declared)
        expected = ", ".join(describe(s) for s in specs)
        raise InputError(f"unexpected input(s) {', '.join(map(repr, unexpected))}; the model takes {expected}")

    feeds: dict[str, np.ndarray] = {}
    dims: dict[str, tuple[int, str]] = {}  # dynamic dim name -> (size, input that set it)
    total_bytes = 0
    arrays = [_cast(spec, _as_array(spec, inputs[spec.name])) for spec in specs]
    shapes = tuple(array.shape for array in arrays)
    check_shapes = valid_shapes is None or shapes not in valid_shapes
    for spec, array in zip(specs, arrays, strict=True):
        if check_shapes:
            _check_shape(spec, array.shape, dims, policy)
        if policy.reject_nonfinite and array.dtype.kind == "f":
            _check_finite(spec, array)
        total_bytes += array.nbytes
        if policy.max_bytes is not None and total_bytes > policy.max_bytes:
            raise InputError(
                f"inputs take {total_bytes} bytes or more (input {describe(spec)}: {array.nbytes} bytes), "
                f"over the model's limit of {policy.max_bytes} bytes (input_policy.max_bytes)"
            )
        feeds[spec.name] = np.ascontiguousarray(array)
    if check_shapes and valid_shapes is not None and len(valid_shapes) < SHAPE_CACHE_SIZE:
        valid_shapes.add(shapes)
    return feeds


def _as_array(spec: TensorSpec, value: Any) -> np.ndarray:
    if type(value) is np.ndarray and value.dtype.kind in _NUMERIC_KINDS:
        return value
    if isinstance(value, (str, bytes, bytearray, Mapping)) or value is None:
        raise InputError(f"input {describe(spec)}: got {type(value).__name__}, expected a numeric array")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged lists, objects numpy cannot convert
        raise InputError(f"input {describe(spec)}: cannot be read as an array ({e})") from e
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise InputError(f"input {describe(spec)}: got {array.dtype} values, expected a numeric array")
    return array


def _cast(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    source, target = array.dtype, _NUMPY_DTYPES[spec.dtype]
    if source == target:
        return array
    if np.can_cast(source, target, casting="safe"):
        return array.astype(target)
    refused = f"input {describe(spec)}: cannot take {source} values"
    if target.kind == "b":
        raise InputError(f"{refused} (only bool converts to bool)")
    if source.kind == "f" and target.kind in "iu":
        raise InputError(f"{refused} (float is never cast to an integer type; round explicitly)")
    if source.kind in "iu" and target.kind in "iu":
        info = np.iinfo(target)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InputError(f"{refused}: values span [{array.min()}, {array.max()}], outside {target}'s range")
        return array.astype(target)
    if source.kind in "iu" and target.kind == "f":
        with np.errstate(invalid="ignore", over="ignore"):  # huge ints: the round trip below catches them
            cast = array.astype(target)
            exact = np.array_equal(cast.astype(source), array)
        if not exact:
            raise InputError(f"{refused}: some values are not exactly representable in {target}")
        return cast
    if source.kind == "f" and target.kind == "f":
        with np.errstate(over="ignore"):
            cast = array.astype(target)
        if np.any(np.isinf(cast) & np.isfinite(array)):
            raise InputError(f"{refused}: some finite values overflow {target}")
        return cast
    raise InputError(f"{refused}")  # not reachable for bool/int/uint/float sources, kept as a guard


_SMALL_INPUT = 256  # elements: up to this many, _check_finite sums in Python instead of calling numpy
_BUFFER_FORMATS: dict[np.dtype[Any], Literal["f", "d"]] = {np.dtype(np.float32): "f", np.dtype(np.float64): "d"}


def _check_finite(spec: TensorSpec, array: np.ndarray) -> None:
    fmt = _BUFFER_FORMATS.get(array.dtype)
    if fmt is not None and 0 < array.size <= _SMALL_INPUT and array.flags.c_contiguous:
        # NaN and infinity propagate into a sum, so a finite sum proves every value finite (a huge but
        # finite input can overflow it: the numpy check below then decides). For a small input this
        # beats numpy's ufunc machinery, which also leaves the runtime call right after it measurably
        # slower (benchmarks/runtime_overhead.py: ~5 us on a 64-float input).
        if math.isfinite(sum(array.data.cast("B").cast(fmt))):  # native byte order only (the dict's keys)
            return
    finite = np.isfinite(array)  # faster than a sum or min/max pass here, and never overflows
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise InputError(
            f"input {describe(spec)}: {bad} NaN or infinite value(s); the model refuses them "
            '(input_policy.nonfinite is "reject")'
        )


def _check_shape(
    spec: TensorSpec, shape: tuple[int, ...], dims: dict[str, tuple[int, str]], policy: InputPolicy
) -> None:
    if len(shape) != len(spec.shape):
        raise InputError(
            f"input {describe(spec)}: got shape {list(shape)} (rank {len(shape)}, expected {len(spec.shape)})"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if isinstance(want, int):
            if want != got:
                raise InputError(f"input {describe(spec)}: got shape {list(shape)}, dimension {axis} must be {want}")
            continue
        bounds = policy.ranges.get(want)
        if bounds is not None and not bounds[0] <= got <= bounds[1]:
            raise InputError(
                f"input {describe(spec)}: got shape {list(shape)}, dimension {want!r} is {got}, outside the "
                f"declared range [{bounds[0]}, {bounds[1]}] (input_policy.dims)"
            )
        if got == 0 and bounds is None:
            raise InputError(
                f"input {describe(spec)}: got shape {list(shape)}, an empty tensor (dimension {want!r} is 0)"
            )
        seen = dims.setdefault(want, (got, spec.name))
        if seen[0] != got:
            raise InputError(
                f"input {describe(spec)}: got shape {list(shape)}, dimension {want!r} is {got} "
                f"but {seen[0]} on input {seen[1]!r}"
            )
