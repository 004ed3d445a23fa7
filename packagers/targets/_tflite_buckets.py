"""Which sequence buckets a TFLite text model gets, and the check of every bucket against the reference.

A TFLite model is static, so a text model converted at the example's length would make that length the
bundle's ``max_length`` and every short text pay for it. Text sources are converted instead with one
signature per bucket (``device_runtime.backends.tflite_buckets``): by default 16, 32, 64, 128, 256, capped
at the tokenizer's ``max_length`` (256 is where sentence-transformers cuts MiniLM too; each bucket costs one
more traced signature, about 30 s for MiniLM), or ``PackageOptions.extra["seq_buckets"]`` (a list of
lengths; ``False`` keeps the single fixed length).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from device_runtime.backends.tflite_buckets import SequenceBuckets, signature_name
from packagers.options import Tolerances
from packagers.validation import compare_outputs
from sdk.errors import PackagingError
from sdk.golden import MASK_INPUT

if TYPE_CHECKING:
    from packagers.sources.base import Source

__all__ = ["DEFAULT_CAP", "check_buckets", "fit_length", "plan_buckets", "sequence_length"]

DEFAULT_CAP = 256  # tokens: the default bucket list stops here
_FIRST = 16  # tokens: the smallest default bucket
_DIM = "sequence"


def _max_length(source: Source) -> int | None:
    tokenizer = source.preprocessing.get("tokenizer") or {}
    if isinstance(tokenizer.get("max_length"), int):
        return int(tokenizer["max_length"])
    dims = (source.input_policy.get("dims") or {}).get(_DIM)
    return int(dims[1]) if isinstance(dims, (list, tuple)) and len(dims) == 2 else None


def sequence_length(source: Source) -> int:
    """The length of the source's validation sequences."""
    return int(source.validation_inputs[source.inputs[0].name].shape[1])


def plan_buckets(source: Source, extra: Mapping[str, Any]) -> SequenceBuckets | None:
    """The buckets to convert ``source`` with, or None for one fixed length.

    Default: buckets for a text source (a tokenizer, inputs [batch, "sequence"] with an attention mask);
    none otherwise. ``extra["seq_buckets"]``: a list of lengths, or False for none.

    Raises:
        PackagingError: a malformed list, buckets for a source without a named sequence dim and an attention
            mask, or validation sequences longer than the largest bucket.
    """
    wanted = extra.get("seq_buckets")
    if wanted is False:
        return None
    eligible = (
        source.kind in ("torch", "transformers")
        and all(len(s.shape) == 2 and s.shape[1] == _DIM for s in source.inputs)
        and any(s.name == MASK_INPUT for s in source.inputs)
    )
    if wanted is None:
        if not eligible or "tokenizer" not in source.preprocessing:
            return None
        cap = min(_max_length(source) or DEFAULT_CAP, DEFAULT_CAP)
        lengths = [n for n in (16, 32, 64, 128) if n < cap] + [cap]
        lengths = [n for n in lengths if n >= min(_FIRST, cap)]
        if sequence_length(source) > cap:  # calibration texts longer than the default cap: their length is the top
            lengths.append(sequence_length(source))
    else:
        ok = isinstance(wanted, (list, tuple)) and wanted and all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in wanted
        )  # fmt: skip
        if not ok:
            raise PackagingError(f"option extra['seq_buckets'] must be a list of lengths > 0 or False, got {wanted!r}")
        if not eligible:
            raise PackagingError(
                "option extra['seq_buckets'] needs a text model: inputs [batch, 'sequence'] with an "
                f"{MASK_INPUT!r} input to mask the padding; {source.description} takes "
                f"{[(s.name, list(s.shape)) for s in source.inputs]}"
            )
        lengths = sorted(set(wanted))
        top = _max_length(source)
        if top is not None and lengths[-1] > top:
            raise PackagingError(f"option extra['seq_buckets']: {lengths[-1]} tokens is beyond the model's {top}")
    length = sequence_length(source)
    if length > lengths[-1]:
        raise PackagingError(
            f"the validation sequences have {length} tokens, more than the largest bucket {lengths[-1]}; "
            "give longer buckets (extra['seq_buckets']) or shorter calibration texts"
        )
    tokenizer = source.preprocessing.get("tokenizer") or {}
    pad = {s.name: 0 for s in source.inputs}
    if "input_ids" in pad and isinstance(tokenizer.get("pad_id"), int):
        pad["input_ids"] = int(tokenizer["pad_id"])
    if "token_type_ids" in pad and isinstance(tokenizer.get("pad_type_id"), int):
        pad["token_type_ids"] = int(tokenizer["pad_type_id"])
    return SequenceBuckets(tuple(lengths), tuple(signature_name(n) for n in lengths), pad, 1, _DIM)


def fit_length(arrays: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """The samples tiled (or cut) along the sequence axis to exactly ``length`` tokens of real content.

    Used to calibrate and check a bucket with real token statistics at its full length; tiling keeps
    each sample's ids and mask (a masked gap in the middle is still a valid input).
    """
    out = {}
    for name, value in arrays.items():
        reps = -(-length // value.shape[1])
        out[name] = np.ascontiguousarray(np.tile(value, (1, reps))[:, :length])
    return out


def check_buckets(
    source: Source,
    buckets: SequenceBuckets,
    run_bucket: Callable[[int, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
    tolerances: Tolerances,
    samples: int = 8,
) -> dict[str, Any]:
    """Compare the built model with the reference at every bucket, on the validation samples at that length.

    Args:
        run_bucket: (bucket index, inputs at its length) -> the built model's outputs.
        samples: validation samples per bucket (the first ones).

    Returns:
        ``{"lengths": {length: {"cosine_min", "cosine_mean", "passed"}}, "passed": bool, "failures": [str]}``.
    """
    base = {k: v[:samples] for k, v in source.validation_inputs.items()}
    lengths: dict[str, Any] = {}
    failures: list[str] = []
    for index, n in enumerate(buckets.lengths):
        inputs = fit_length(base, n)
        reference = source.reference(inputs)
        built = run_bucket(index, inputs)
        result = compare_outputs(source.outputs, reference, built, tolerances, mask=inputs.get(MASK_INPUT))
        cosines = [m.get("cosine_min") for m in result["metrics"].values() if m.get("cosine_min") is not None]
        means = [m.get("cosine_mean") for m in result["metrics"].values() if m.get("cosine_mean") is not None]
        lengths[str(n)] = {
            "cosine_min": round(min(cosines), 6) if cosines else None,
            "cosine_mean": round(min(means), 6) if means else None,
            "passed": bool(result["passed"]),
        }
        failures += [f"bucket {n}: {f}" for f in result["failures"]]
    return {"lengths": lengths, "passed": not failures, "failures": failures, "samples": len(base[MASK_INPUT])}
