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
  everywhere it appears, across inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sdk.errors import InputError
from sdk.manifest import TensorSpec

__all__ = ["check_inputs", "describe"]

# numpy kinds that are numbers or booleans; anything else (str, bytes, object, void, datetime) is junk.
_NUMERIC_KINDS = frozenset("biuf")


def describe(spec: TensorSpec) -> str:
    """``'x' float32 ['batch', 4]``: how an error names what the manifest declares."""
    return f"{spec.name!r} {spec.dtype} {list(spec.shape)}"


def check_inputs(specs: Sequence[TensorSpec], inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validate ``inputs`` against ``specs`` and return contiguous arrays of the declared dtypes.

    Args:
        specs: the manifest's inputs.
        inputs: input name -> array-like.

    Returns:
        Input name -> C-contiguous array, in ``specs`` order. The caller's arrays are never modified.

    Raises:
        InputError: not a mapping, a missing or unexpected name, a value that is not a numeric array,
            an unsafe dtype cast, or a shape that does not fit the declaration.
    """
    if not isinstance(inputs, Mapping):
        expected = ", ".join(describe(s) for s in specs)
        raise InputError(f"inputs must be a mapping of name -> array, got {type(inputs).__name__}; expected {expected}")
    declared = {s.name for s in specs}
    missing = [s for s in specs if s.name not in inputs]
    if missing:
        raise InputError(f"missing input(s): {', '.join(describe(s) for s in missing)}")
    unexpected = sorted(str(k) for k in inputs if k not in declared)
    if unexpected:
        expected = ", ".join(describe(s) for s in specs)
        raise InputError(f"unexpected input(s) {', '.join(map(repr, unexpected))}; the model takes {expected}")

    feeds: dict[str, np.ndarray] = {}
    dims: dict[str, tuple[int, str]] = {}  # dynamic dim name -> (size, input that set it)
    for spec in specs:
        array = _cast(spec, _as_array(spec, inputs[spec.name]))
        _check_shape(spec, array.shape, dims)
        feeds[spec.name] = np.ascontiguousarray(array)
    return feeds


def _as_array(spec: TensorSpec, value: Any) -> np.ndarray:
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
    source, target = array.dtype, np.dtype(spec.dtype)
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


def _check_shape(spec: TensorSpec, shape: tuple[int, ...], dims: dict[str, tuple[int, str]]) -> None:
    if len(shape) != len(spec.shape):
        raise InputError(
            f"input {describe(spec)}: got shape {list(shape)} (rank {len(shape)}, expected {len(spec.shape)})"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if isinstance(want, int):
            if want != got:
                raise InputError(f"input {describe(spec)}: got shape {list(shape)}, dimension {axis} must be {want}")
            continue
        seen = dims.setdefault(want, (got, spec.name))
        if seen[0] != got:
            raise InputError(
                f"input {describe(spec)}: got shape {list(shape)}, dimension {want!r} is {got} "
                f"but {seen[0]} on input {seen[1]!r}"
            )
