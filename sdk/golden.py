"""The golden check: whether a model's outputs for the golden inputs match the bundle's golden outputs.

One rule, used twice: the packager checks that a bundle passes it on the build host before signing,
and the device runs it as the health check after loading (docs/bundle-format.md, section 4.7). Pure,
no I/O.

An output passes when it has the golden shape, every scored value is finite, and both
- every scored element is within ``atol + rtol * |golden|``, and
- when the tolerance sets ``min_cosine``, every sample's cosine similarity with the golden sample
  (first axis, the rest flattened) is at least ``min_cosine``.

Both, not either: the golden outputs come from the bundle's own model in its own runtime, so a device
differs only by its kernels (another CPU's instructions, threads, summation order). The packager
derives the tolerance from the precision: elementwise bounds wide enough for that noise, and the
cosine per sample so a batch of good samples cannot hide one that broke. A device that computes at a
lower precision than the bundle was validated at (bf16 for an fp16 bundle) shows drift beyond
kernel noise and should fail here rather than serve it.

Padding: positions where the golden inputs' ``attention_mask`` is 0 are not scored in token-level
outputs (``sdk.scoring.padding_mask``); they are zeroed on both sides before any metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from sdk.scoring import MASK_INPUT, cosine_per_sample, padding_mask, zero_unscored
from sdk.sections import GoldenTolerance

__all__ = ["MASK_INPUT", "GoldenTolerance", "check_golden", "compare_output"]


def compare_output(
    actual: np.ndarray, expected: np.ndarray, tol: GoldenTolerance, mask: np.ndarray | None = None
) -> dict[str, Any]:
    """Metrics of one output against its golden array; ``passed`` applies the golden rule.

    Args:
        actual: what the model returned for the golden inputs.
        expected: the golden output.
        tol: the bundle's ``golden.tolerance``.
        mask: the golden inputs' ``attention_mask``, when the model takes one.

    Returns:
        ``{"passed", "shape", "nan", "max_abs_error", "cosine", "within_tolerance", "reason"}`` and
        ``masked_positions`` when padding was left out; JSON-ready. ``cosine`` is the lowest per-sample
        cosine; ``max_abs_error`` and ``cosine`` are None when the output is not finite; ``reason`` is
        None when it passed.
    """
    metrics: dict[str, Any] = {
        "shape": list(actual.shape),
        "nan": False,
        "max_abs_error": None,
        "cosine": None,
        "within_tolerance": False,
        "passed": False,
        "reason": None,
    }
    if actual.shape != expected.shape:
        metrics["reason"] = f"shape {list(actual.shape)}, golden {list(expected.shape)}"
        return metrics
    keep = padding_mask(mask, expected)
    if keep is not None:
        metrics["masked_positions"] = int(keep.size - keep.sum())
    a = zero_unscored(actual.astype(np.float64), keep)
    e = zero_unscored(expected.astype(np.float64), keep)
    if not np.isfinite(a).all():
        metrics["nan"] = bool(np.isnan(a).any())
        metrics["reason"] = "NaN or Inf"
        return metrics
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a - e)
        within = bool(np.all(diff <= tol.atol + tol.rtol * np.abs(e)))
        max_error = float(diff.max()) if diff.size else 0.0
        cosines = cosine_per_sample(e, a)
    cosine = float(cosines.min()) if cosines.size else 1.0
    metrics["max_abs_error"] = max_error if math.isfinite(max_error) else None  # None: JSON has no infinity
    metrics["cosine"] = cosine if math.isfinite(cosine) else None
    metrics["within_tolerance"] = within
    problems = []
    if not within:
        problems.append(f"max |error| {max_error:.3g} over atol {tol.atol:g} + rtol {tol.rtol:g} * |golden|")
    if tol.min_cosine is not None and not (math.isfinite(cosine) and cosine >= tol.min_cosine):
        problems.append(f"min cosine {cosine:.6f} < {tol.min_cosine:g}")
    metrics["passed"] = not problems
    metrics["reason"] = "; ".join(problems) or None
    return metrics


def check_golden(
    outputs: Mapping[str, np.ndarray],
    golden: Mapping[str, np.ndarray],
    tolerance: GoldenTolerance | Mapping[str, Any],
    mask: np.ndarray | None = None,
) -> list[str]:
    """What fails the golden check, one line per output (empty when it passes).

    Args:
        outputs: output name -> what the model returned for the golden inputs.
        golden: output name -> golden array; every one must be in ``outputs``.
        tolerance: the bundle's ``golden.tolerance`` (the class or its JSON object).
        mask: the golden inputs' ``attention_mask``, when the model takes one.

    Raises:
        ManifestError: ``tolerance`` is a malformed object.
    """
    tol = GoldenTolerance.from_dict(tolerance)
    problems: list[str] = []
    for name, expected in golden.items():
        got = outputs.get(name)
        if got is None:
            problems.append(f"{name}: missing from the outputs")
            continue
        result = compare_output(np.asarray(got), np.asarray(expected), tol, mask)
        if not result["passed"]:
            problems.append(f"{name}: {result['reason']}")
    return problems
