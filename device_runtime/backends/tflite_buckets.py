"""Sequence buckets of a TFLite text model: one signature per sequence length, the smallest that fits runs.

TFLite models have static shapes, so a text model converted at one sequence length makes every text pay
for that length, and truncates longer ones. A bucketed model holds one signature per length (``seq_16``,
``seq_32``, ...; the weights are shared); the manifest's ``runtime.buckets`` lists them::

    {"axis": 1, "dim": "sequence", "lengths": [16, 32, 64, 128],
     "signatures": ["seq_16", "seq_32", "seq_64", "seq_128"],
     "pad": {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0}}

An input of length L runs in the smallest bucket >= L: every input is padded along ``axis`` with its
``pad`` value (the attention mask with 0, so the padded positions are masked out and the real tokens'
outputs equal the unpadded run's), and every output with the sequence dim is cut back to L. Pure numpy:
the packager validates with the same code the device runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdk.errors import BackendError, InputError

__all__ = ["SequenceBuckets", "signature_name"]


def signature_name(length: int) -> str:
    """The signature key of the bucket of ``length`` tokens."""
    return f"seq_{length}"


@dataclass(frozen=True)
class SequenceBuckets:
    """The bucket list of a model and how inputs are padded to a bucket and outputs cut back."""

    lengths: tuple[int, ...]  # ascending
    signatures: tuple[str, ...]  # one per length
    pad: Mapping[str, int]  # input name -> pad value
    axis: int = 1  # the sequence axis of inputs and sequence outputs
    dim: str = "sequence"  # its name in the manifest's shapes

    @classmethod
    def from_runtime(cls, raw: Any) -> SequenceBuckets:
        """Parse ``runtime.buckets``.

        Raises:
            BackendError: malformed (not ascending positive lengths, a signature per length, int pads).
        """
        if not isinstance(raw, Mapping):
            raise BackendError("runtime.buckets must be an object")
        lengths: Any = raw.get("lengths")
        signatures: Any = raw.get("signatures")
        pad: Any = raw.get("pad", {})
        axis, dim = raw.get("axis", 1), raw.get("dim", "sequence")
        ok = (
            isinstance(lengths, list) and lengths
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths)
            and lengths == sorted(set(lengths))
            and isinstance(signatures, list) and len(signatures) == len(lengths)
            and all(isinstance(s, str) and s for s in signatures)
            and isinstance(pad, Mapping) and all(isinstance(v, int) and not isinstance(v, bool) for v in pad.values())
            and isinstance(axis, int) and not isinstance(axis, bool) and axis >= 1 and isinstance(dim, str)
        )  # fmt: skip
        if not ok:
            raise BackendError(
                "runtime.buckets must be {lengths: ascending ints > 0, signatures: one name per length, "
                f"pad: {{input: int}}, axis: int >= 1, dim: str}}, got {raw!r:.200}"
            )
        return cls(tuple(lengths), tuple(signatures), dict(pad), axis, dim)

    def to_runtime(self) -> dict[str, Any]:
        """The manifest's ``runtime.buckets``."""
        return {"axis": self.axis, "dim": self.dim, "lengths": list(self.lengths),
                "signatures": list(self.signatures), "pad": dict(self.pad)}  # fmt: skip

    @property
    def max_length(self) -> int:
        return self.lengths[-1]

    def choose(self, length: int) -> int:
        """The index of the smallest bucket that holds ``length`` tokens.

        Raises:
            InputError: longer than the largest bucket (the tokenizer truncates to it; arrays must too).
        """
        for i, n in enumerate(self.lengths):
            if length <= n:
                return i
        raise InputError(
            f"the sequence has {length} tokens; this model's largest bucket is {self.max_length} "
            f"(buckets {list(self.lengths)}): truncate to {self.max_length}"
        )

    def padded(self, feeds: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
        """``feeds`` padded along the sequence axis to ``length`` with each input's pad value."""
        out = {}
        for name, value in feeds.items():
            missing = length - value.shape[self.axis]
            if missing <= 0:
                out[name] = value
                continue
            widths = [(0, 0)] * value.ndim
            widths[self.axis] = (0, missing)
            out[name] = np.pad(value, widths, constant_values=self.pad.get(name, 0))
        return out

    def cut(self, outputs: Mapping[str, np.ndarray], names: Sequence[str], length: int) -> dict[str, np.ndarray]:
        """``outputs`` with the sequence axis of each output in ``names`` cut back to ``length``."""
        out = dict(outputs)
        for name in names:
            index = [slice(None)] * out[name].ndim
            index[self.axis] = slice(0, length)
            out[name] = out[name][tuple(index)]
        return out
