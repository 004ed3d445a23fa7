"""The inference-precision rule (``sdk.precision``) against every hint a device can receive on every kind of CPU.

The CI guard for the bug of issue 10: on a CPU with AVX512_BF16, OpenVINO resolves ``f16`` to ``bf16``,
so an fp16 bundle validated at f16 or f32 ran at a precision nobody checked, and the tests only saw it on
such a CPU. Here the capability sets are given (no hardware is read) and the rule is the real one.
"""

from __future__ import annotations

import itertools

import pytest

from sdk.precision import PRECISIONS, PrecisionChoice, at_least, choose_hint, resolve

# How OpenVINO's CPU plugin resolves INFERENCE_PRECISION_HINT on each kind of device, hint -> computed
# (measured on an AMD EPYC with AVX512_BF16: none -> bf16, f16 -> bf16, f32 -> f32; the others from the
# plugin's precision_support.cpp: f16 needs AVX512_FP16 / AVX2_VNNI_2 / ARM fp16).
DEVICES: dict[str, tuple[frozenset[str], dict[str | None, str]]] = {
    "avx2": (frozenset({"FP32", "INT8", "BIN", "WINOGRAD"}),
             {None: "f32", "bf16": "f32", "f16": "f32", "f32": "f32"}),
    "avx512-bf16 (EPYC, Cooper Lake)": (frozenset({"BF16", "FP32", "INT8", "BIN", "WINOGRAD"}),
                                         {None: "bf16", "bf16": "bf16", "f16": "bf16", "f32": "f32"}),
    "amx-fp16 (Sapphire Rapids)": (frozenset({"BF16", "FP16", "FP32", "INT8"}),
                                   {None: "bf16", "bf16": "bf16", "f16": "f16", "f32": "f32"}),
    "arm-fp16": (frozenset({"FP16", "FP32", "INT8"}), {None: "f16", "bf16": "f32", "f16": "f16", "f32": "f32"}),
    "half-only (an NPU)": (frozenset({"FP16", "INT8"}), {None: "f16", "bf16": "f16", "f16": "f16", "f32": "f16"}),
}  # fmt: skip
HINTS: list[str | None] = [None, *PRECISIONS]


@pytest.mark.parametrize("device", list(DEVICES))
def test_resolve_predicts_each_devices_plugin(device: str) -> None:
    caps, table = DEVICES[device]
    assert {hint: resolve(hint, caps) for hint in HINTS} == table


def test_precisions_are_ordered_by_mantissa() -> None:
    assert at_least("f32", "f16") and at_least("f16", "bf16") and at_least("f16", "f16")
    assert not at_least("bf16", "f16") and not at_least("f16", "f32") and not at_least(None, "bf16")


def _check(choice: PrecisionChoice, requested: str | None, validated: str | None, devices: list[str]) -> None:
    floor = validated or requested or "f32"
    assert choice.floor == floor
    computed = [DEVICES[d][1][choice.hint] for d in devices] if choice.refused is None else []
    if choice.refused is not None:
        # Refused only where even f32 computes lower on some device, and the line says so.
        assert any(not at_least(DEVICES[d][1]["f32"], floor) for d in devices)
        assert f"below the {floor} the bundle was validated at" in choice.refused and choice.hint is None
        return
    # The rule: every device computes at the validated precision or above.
    assert all(at_least(p, floor) for p in computed), (choice, computed)
    assert choice.expected == min(computed, key=PRECISIONS.index)
    # What the bundle asked for (no hint included) is kept where every device computes it safely.
    honoured = all(at_least(DEVICES[d][1][requested], floor) for d in devices)
    if honoured and (requested is None or at_least(requested, floor)):
        assert choice.hint == requested and choice.forced is None
    else:
        assert choice.hint == "f32" and choice.forced and "validated at: forced f32" in choice.forced


@pytest.mark.parametrize("requested", HINTS)
@pytest.mark.parametrize("validated", HINTS)
def test_every_hint_on_every_device_and_pair(requested: str | None, validated: str | None) -> None:
    singles = [[d] for d in DEVICES]
    pairs = [list(p) for p in itertools.combinations(DEVICES, 2)]  # AUTO over two devices
    for devices in singles + pairs:
        choice = choose_hint(requested, validated, [DEVICES[d][0] for d in devices])
        _check(choice, requested, validated, devices)


def test_the_issue_10_case() -> None:
    bf16_cpu = DEVICES["avx512-bf16 (EPYC, Cooper Lake)"][0]
    # An fp16 bundle validated at f16 (on a host with f16 units) lands on a bf16 CPU: forced to f32.
    choice = choose_hint("f16", "f16", [bf16_cpu])
    assert (choice.hint, choice.expected) == ("f32", "f32")
    assert choice.forced == "the device would compute f16 in bf16, below the f16 it was validated at: forced f32"
    # The same bundle on a CPU with f16 units runs at f16.
    assert choose_hint("f16", "f16", [DEVICES["amx-fp16 (Sapphire Rapids)"][0]]).hint == "f16"
    # Validated at f32 on a host without f16 units: it never runs at f16, even where the device could.
    assert choose_hint("f16", "f32", [DEVICES["arm-fp16"][0]]).hint == "f32"
    # A device that computes in half precision whatever it is told refuses an f32-validated bundle.
    refused = choose_hint("f32", "f32", [DEVICES["half-only (an NPU)"][0]]).refused
    assert refused == "even with f32 the device would compute in f16, below the f32 the bundle was validated at"


def test_unreported_capabilities_trust_the_hint_and_never_the_default() -> None:
    assert choose_hint("f32", "f32", [None]) == PrecisionChoice("f32", "f32", "f32")
    assert choose_hint("f16", "f16", [None]).hint == "f16"
    # Without a hint a virtual device picks its own precision: the floor is asked for instead.
    choice = choose_hint(None, None, [None])
    assert choice.hint == "f32" and choice.forced is not None
    with pytest.raises(ValueError, match="unknown inference precision 'f8'"):
        choose_hint("f8", None, [None])
