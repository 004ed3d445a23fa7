"""The inference-precision rule: a bundle runs at a precision it was validated at, or at a higher one.

OpenVINO's plugins treat ``INFERENCE_PRECISION_HINT`` as a wish, not an order: the CPU plugin resolves
``f16`` to ``bf16`` on a CPU with AVX512_BF16 or AMX (8-bit mantissa, below the f16 the hint names), to
``f16`` where it has half-precision units (AVX512_FP16, AVX2_VNNI_2, ARM fp16) and to ``f32`` elsewhere;
without a hint it picks ``bf16`` or ``f16`` where it can. A bundle validated at f16 or f32 on the build
host would then run on such a device at a precision nobody checked. This module holds the rule both sides
apply, with no OpenVINO import so that it can be tested against every capability set:

- the packager validates at the precision its own host resolves the bundle's hint to, never below the
  hint, and records it as ``runtime.validated_inference_precision``;
- the device compiles with a hint whose resolution on its device is at least that precision, forcing
  ``f32`` where the bundle's own hint would resolve lower, and refuses the bundle (one clear line) where
  even ``f32`` resolves lower; it then reads the resolved precision back from the compiled model, and
  the golden health check decides whether the bundle is accepted.

Precisions are OpenVINO's type names; capabilities are a device's ``OPTIMIZATION_CAPABILITIES``
(``FP32``, ``FP16``, ``BF16``, ``INT8``, ...). A capability set of ``None`` means the device does not say.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

__all__ = ["PRECISIONS", "PrecisionChoice", "at_least", "choose_hint", "resolve"]

# Float inference precisions from least to most precise (mantissa bits, sign and hidden bit included).
PRECISIONS = ("bf16", "f16", "f32")  # 8, 11, 24
_CAPABILITY = {"bf16": "BF16", "f16": "FP16", "f32": "FP32"}


def at_least(actual: str | None, floor: str) -> bool:
    """Whether computing in ``actual`` is as precise as ``floor`` or more (an unknown ``actual`` is not)."""
    if actual not in PRECISIONS:
        return False
    return PRECISIONS.index(actual) >= PRECISIONS.index(floor)


def resolve(hint: str | None, capabilities: Collection[str] | None) -> str | None:
    """The precision a device with ``capabilities`` is expected to compute in for ``hint``.

    The CPU plugin's resolution (OpenVINO 2024-2026), which the GPU plugin follows: a hint the device has
    units for is kept; ``f16`` falls back to ``bf16`` where the device has bf16 units, anything else to
    ``f32``, or, on a device without f32 (an NPU), to the half precision it has. Without a hint the
    device picks its fastest: ``bf16``, else ``f16``, else ``f32``. Capabilities ``None`` (a device that
    does not report them: ``AUTO`` and the other virtual devices): the hint itself, assumed honoured, or
    unknown (``None``) without one. The device checks the result
    against the compiled model where it can; this prediction only chooses what to ask for.
    """
    if capabilities is None:
        return hint
    have = {p for p in PRECISIONS if _CAPABILITY[p] in capabilities}
    if hint is None:
        return next((p for p in ("bf16", "f16") if p in have), "f32")
    if hint in have:
        return hint
    if hint == "f16" and "bf16" in have:
        return "bf16"
    if "f32" in have or not have:  # a device that names no float precision is assumed to compute in f32
        return "f32"
    return next(p for p in ("f16", "bf16") if p in have)


@dataclass(frozen=True)
class PrecisionChoice:
    """What to compile with, and why.

    ``floor`` is the precision the bundle was validated at (what it must not run below); ``hint`` the
    ``INFERENCE_PRECISION_HINT`` to set (``None``: set none); ``expected`` the precision the least precise
    of the candidate devices is expected to compute in; ``forced`` says why ``hint`` is not the bundle's
    own; ``refused`` (``hint`` is then ``None``) says why no hint satisfies the rule on these devices.
    """

    floor: str
    hint: str | None
    expected: str | None
    forced: str | None = None
    refused: str | None = None


def choose_hint(
    requested: str | None, validated: str | None, capabilities: Sequence[Collection[str] | None]
) -> PrecisionChoice:
    """The hint to compile with so that every candidate device computes at ``validated`` or above.

    Args:
        requested: the bundle's ``runtime.inference_precision_hint`` (``None``: the bundle asks none).
        validated: the bundle's ``runtime.validated_inference_precision``; bundles without it (written by
            hand) are held to ``requested``, or to ``f32`` when they ask none.
        capabilities: one capability set per device the model may run on (``AUTO`` picks among several);
            ``None`` for a device that does not report them.
    """
    floor = validated or requested or "f32"
    if floor not in PRECISIONS:
        raise ValueError(f"unknown inference precision {floor!r}; one of {', '.join(PRECISIONS)}")
    devices = list(capabilities) or [None]

    def worst(hint: str | None) -> str | None:
        found = [resolve(hint, caps) for caps in devices]
        if any(p is None for p in found):
            return None
        return min(found, key=lambda p: PRECISIONS.index(p or "f32"))

    if requested is None or at_least(requested, floor):
        expected = worst(requested)
        if at_least(expected, floor):
            return PrecisionChoice(floor, requested, expected)
        why = f"the device would compute {requested or 'without a hint'} in {expected or 'an unreported precision'}"
    else:
        why = f"the bundle asks {requested}"
    expected = worst("f32")
    if at_least(expected, floor):
        return PrecisionChoice(
            floor, "f32", expected, forced=f"{why}, below the {floor} it was validated at: forced f32"
        )
    best = expected or "an unreported precision"
    refused = f"even with f32 the device would compute in {best}, below the {floor} the bundle was validated at"
    return PrecisionChoice(floor, None, expected, refused=refused)
