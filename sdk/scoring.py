"""Which positions of an output are scored against a reference: one rule for the host and the device.

The packager's validation (``packagers.validation``) and the golden check (``sdk.golden``, run by the
packager before signing and by the device's health check) must agree on it, or a bundle that passed on
the build host could fail on the device; the rule is part of the bundle format (docs/bundle-format.md, section 4.7).
"""

from __future__ import annotations

import numpy as np

__all__ = ["MASK_INPUT", "cosine_per_sample", "padding_mask", "zero_unscored"]

MASK_INPUT = "attention_mask"  # the input whose zeros mark padded positions


def padding_mask(mask: np.ndarray | None, array: np.ndarray) -> np.ndarray | None:
    """The boolean [batch, sequence] positions of ``array`` that are scored, or None to score everything.

    Token-level outputs (rank >= 3: [batch, sequence, ...], e.g. ``last_hidden_state`` or token logits)
    of a model with an ``attention_mask`` input hold, at padded positions (mask 0), values nothing
    downstream uses (mean pooling and token heads mask them); those positions are left out. Outputs of
    another rank or whose first two dims are not the mask's are scored whole.
    """
    if mask is None or array.ndim < 3:
        return None
    m = np.asarray(mask)
    if m.ndim != 2 or tuple(m.shape) != tuple(array.shape[:2]):
        return None
    return m != 0


def zero_unscored(array: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """``array`` with the positions ``keep`` leaves out set to 0, so they add nothing to any metric."""
    if keep is None:
        return array
    return np.where(keep.reshape(keep.shape + (1,) * (array.ndim - 2)), array, 0)


def cosine_per_sample(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample (first axis), the rest flattened; 1 when both are zero.

    A 0-d array is one sample.
    """
    rows = len(a) if np.ndim(a) else 1
    if rows == 0:
        return np.ones(0)
    x = np.asarray(a, np.float64).reshape(rows, -1)
    y = np.asarray(b, np.float64).reshape(rows, -1)
    num = (x * y).sum(axis=1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    both_zero = (np.abs(x).sum(axis=1) == 0) & (np.abs(y).sum(axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return np.where(both_zero, 1.0, cos)
