"""Comparing a model's outputs with its bundle's golden outputs; pure, no I/O.

An output passes when it has the golden shape, holds no NaN, and either every element is within
``atol + rtol * |expected|`` or the cosine similarity with the golden array is at least ``min_cosine``
(when the bundle sets one). Missing tolerances take the defaults below.

Padding: when the golden inputs hold an ``attention_mask`` [batch, sequence] and an output is token-level
(rank >= 3 with those first two dims, e.g. ``last_hidden_state``), positions where the mask is 0 are not
compared (nothing downstream reads them; the packager scores them the same way). Bundles without such a
mask are compared whole, as before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdk.errors import ManifestError
from sdk.scoring import MASK_INPUT, padding_mask

__all__ = ["MASK_INPUT", "Tolerance", "compare_output", "padding_mask"]


@dataclass(frozen=True)
class Tolerance:
    """How close an output must be to its golden array."""

    atol: float = 1e-4  # absolute, in the output's units
    rtol: float = 1e-3  # relative to |expected|
    min_cosine: float | None = None  # cosine similarity accepted instead of the elementwise bound

    @classmethod
    def from_manifest(cls, golden: Mapping[str, Any]) -> Tolerance:
        """Read ``golden["tolerance"]``.

        Raises:
            ManifestError: a tolerance is not a finite number >= 0 or is an unknown key.
        """
        raw = golden.get("tolerance", {})
        if not isinstance(raw, Mapping):
            raise ManifestError("golden.tolerance must be an object")
        unknown = sorted(set(raw) - {"atol", "rtol", "min_cosine"})
        if unknown:
            raise ManifestError(f"golden.tolerance has unknown keys: {', '.join(unknown)}")
        for key, value in raw.items():
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0:
                raise ManifestError(f"golden.tolerance.{key} must be a finite number >= 0, got {value!r}")
        return cls(**{k: float(v) for k, v in raw.items()})

    def to_dict(self) -> dict[str, float | None]:
        return {"atol": self.atol, "rtol": self.rtol, "min_cosine": self.min_cosine}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def compare_output(
    actual: np.ndarray, expected: np.ndarray, tol: Tolerance, mask: np.ndarray | None = None
) -> dict[str, Any]:
    """Metrics of one output against its golden array; ``passed`` says whether it is acceptable.

    ``mask``: the golden inputs' ``attention_mask``; padded positions of a token-level output are skipped.

    Returns:
        ``{"passed", "shape", "nan", "max_abs_error", "cosine", "within_tolerance", "reason"}``, JSON-ready
        (``reason`` is None when it passed).
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
    if keep is not None:  # only the scored positions: [tokens, ...] flattened
        metrics["masked_positions"] = int(keep.size - keep.sum())
        actual, expected = actual[keep], expected[keep]
    a = actual.astype(np.float64).ravel()
    e = expected.astype(np.float64).ravel()
    if np.isnan(a).any():
        metrics["nan"] = True
        metrics["reason"] = "output holds NaN"
        return metrics
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a - e)
        within = bool(np.all((diff <= tol.atol + tol.rtol * np.abs(e)) | (a == e)))  # a == e: equal infinities
        max_error = float(diff.max()) if diff.size else 0.0
    finite = bool(np.isfinite(a).all() and np.isfinite(e).all())
    cosine = _cosine(a, e) if finite else None
    metrics["max_abs_error"] = max_error if math.isfinite(max_error) else None  # None: JSON has no infinity
    metrics["cosine"] = cosine
    metrics["within_tolerance"] = within
    metrics["passed"] = within or (tol.min_cosine is not None and cosine is not None and cosine >= tol.min_cosine)
    if not metrics["passed"]:
        reason = f"max |error| {max_error:.3g} over atol {tol.atol:g} + rtol {tol.rtol:g} * |golden|"
        if tol.min_cosine is not None:
            reason += f", cosine {cosine if cosine is None else round(cosine, 6)} below {tol.min_cosine:g}"
        metrics["reason"] = reason
    return metrics
