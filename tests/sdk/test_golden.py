"""The golden check (``sdk.golden``): one rule for the packager's self-check and the device's health check."""

from __future__ import annotations

import numpy as np
import pytest

from sdk.errors import ManifestError
from sdk.golden import GoldenTolerance, check_golden, compare_output


def test_compare_output_rules() -> None:
    tol = GoldenTolerance(atol=1e-3, rtol=0.0, min_cosine=0.99)
    expected = np.array([1.0, 2.0, 3.0], np.float32)
    assert compare_output(expected + 1e-4, expected, tol)["passed"]
    nan = compare_output(np.array([1.0, np.nan, 3.0], np.float32), expected, tol)
    assert nan["passed"] is False and nan["nan"] is True
    flipped = compare_output(-expected, expected, tol)
    assert flipped["passed"] is False and flipped["cosine"] == pytest.approx(-1.0)
    assert compare_output(np.zeros(3), np.zeros(3), GoldenTolerance())["passed"]
    inf = compare_output(np.array([np.inf, 2.0, 3.0]), expected, tol)
    assert inf["passed"] is False and inf["max_abs_error"] is None and inf["cosine"] is None


def test_both_bounds_must_hold() -> None:
    golden = np.random.default_rng(0).standard_normal((4, 10))
    scaled = golden * 1.01  # cosine 1, every element 1% off
    assert compare_output(scaled, golden, GoldenTolerance(atol=0.0, rtol=0.02, min_cosine=0.999))["passed"]
    failed = compare_output(scaled, golden, GoldenTolerance(atol=0.0, rtol=1e-3, min_cosine=0.999))
    assert not failed["passed"] and failed["cosine"] == pytest.approx(1.0) and "atol" in failed["reason"]


def test_cosine_is_per_sample() -> None:
    golden = np.random.default_rng(1).standard_normal((8, 32))
    out = golden.copy()
    out[3] = np.random.default_rng(2).standard_normal(32) * 0.5  # one sample broken, small values
    loose = GoldenTolerance(atol=10.0, rtol=0.0, min_cosine=0.99)  # the elementwise bound alone passes it
    result = compare_output(out, golden, loose)
    assert result["within_tolerance"] and not result["passed"]
    assert result["reason"].startswith("min cosine")
    assert compare_output(golden, golden, loose)["passed"]


def test_non_finite_values_fail_even_when_equal() -> None:
    expected = np.array([[np.inf, 1.0]])
    result = compare_output(expected.copy(), expected, GoldenTolerance())
    assert not result["passed"] and result["reason"] == "NaN or Inf" and result["nan"] is False


def test_padding_is_left_out_on_both_sides() -> None:
    golden = np.random.default_rng(3).standard_normal((2, 5, 4))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    out = golden.copy()
    out[mask == 0] = np.nan  # nothing downstream reads padded positions
    tol = GoldenTolerance(atol=1e-6, rtol=0.0, min_cosine=0.999)
    assert not compare_output(out, golden, tol)["passed"]
    masked = compare_output(out, golden, tol, mask)
    assert masked["passed"] and masked["masked_positions"] == 3


def test_check_golden_names_each_failing_output() -> None:
    golden = {"a": np.ones((2, 3)), "b": np.ones((2, 3)), "c": np.ones((2, 3))}
    outputs = {"a": np.ones((2, 3)), "b": -np.ones((2, 3))}
    problems = check_golden(outputs, golden, {"atol": 1e-3, "rtol": 1e-3, "min_cosine": 0.99})
    assert problems[0].startswith("b: max |error| 2 over atol") and "min cosine -1.000000 < 0.99" in problems[0]
    assert problems[1] == "c: missing from the outputs" and len(problems) == 2
    assert check_golden({"a": np.ones((3, 3))}, {"a": np.ones((2, 3))}, GoldenTolerance()) == [
        "a: shape [3, 3], golden [2, 3]"
    ]
    with pytest.raises(ManifestError, match=r"golden\.tolerance: unknown keys"):
        check_golden(outputs, golden, {"atl": 1.0})
