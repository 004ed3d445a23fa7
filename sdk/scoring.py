"""Which positions of an output are scored against a reference: one rule for the host and the device.

The packager's validation (``packagers.validation``) and the device's golden health check
(``device_runtime._health``) must agree on it, or a bundle that passed on the build host could fail on
the device; the rule is part of the bundle format (docs/bundle-format.md, section 4.7).
"""

from __future__ import annotations

import numpy as np

__all__ = ["MASK_INPUT", "padding_mask"]

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
