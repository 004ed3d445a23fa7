"""Every bad input of the issue: a typed error naming what was expected, the model still usable, the error counted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from serving_parts import linear_reference, masked_reference

from device_runtime._inputs import InputPolicy, check_inputs
from device_runtime.model import Model
from sdk.errors import InputError
from sdk.manifest import TensorSpec

GOOD_X = np.ones((2, 4), dtype=np.float32)


def assert_refused(model: Model, inputs: Any, match: str) -> None:
    """Refused with InputError matching ``match``, counted once, and the model still answers."""
    before = model.metrics.snapshot()["errors"].get("input", 0)
    with pytest.raises(InputError, match=match):
        model.predict(inputs)
    assert model.metrics.snapshot()["errors"]["input"] == before + 1
    np.testing.assert_allclose(model.predict({"x": GOOD_X})["y"], linear_reference(GOOD_X), rtol=1e-6)


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({"X": GOOD_X}, r"missing input\(s\): 'x' float32 \['batch', 4\]"),
        ({"x": GOOD_X, "extra": GOOD_X}, r"unexpected input\(s\) 'extra'; the model takes 'x' float32"),
        ([GOOD_X], "must be a mapping"),
        ({"x": "1,2,3,4"}, "expected a numeric array"),
        ({"x": np.full((2, 4), 2**40 + 1, dtype=np.int64)}, "not exactly representable in float32"),
        ({"x": np.array([["a", "b", "c", "d"]])}, "expected a numeric array"),
        ({"x": np.ones(4, dtype=np.float32)}, r"rank 1, expected 2"),
        ({"x": np.ones((1, 2, 4), dtype=np.float32)}, r"rank 3, expected 2"),
        ({"x": np.ones((2, 5), dtype=np.float32)}, "dimension 1 must be 4"),
        ({"x": [[1.0, 2.0], [3.0]]}, "cannot be read as an array"),
        ({"x": np.ones((0, 4), dtype=np.float32)}, r"empty tensor \(dimension 'batch' is 0\)"),
        ({"x": np.array([[1.0, np.nan, 3.0, 4.0]], dtype=np.float32)}, r"1 NaN or infinite value\(s\)"),
        ({"x": np.array([[np.inf, -np.inf, 3.0, 4.0]])}, r"2 NaN or infinite value\(s\).*reject"),
    ],
    ids=[
        "wrong-name", "extra-name", "not-a-mapping", "string", "inexact-int", "text-array", "rank-low", "rank-high",
        "fixed-dim", "ragged", "empty", "nan", "inf",
    ],
)  # fmt: skip
def test_bad_inputs_are_refused_and_counted(linear: Model, inputs: Any, match: str) -> None:
    assert_refused(linear, inputs, match)


def test_float_into_an_int_input_is_refused(masked: Model) -> None:
    ids = np.array([[1.5, 2.0]])
    with pytest.raises(InputError, match=r"'input_ids' int64 \['batch', 'sequence'\]: cannot take float64"):
        masked.predict({"input_ids": ids, "attention_mask": np.ones((1, 2), np.int32)})
    assert masked.metrics.snapshot()["errors"] == {"input": 1}


def test_nonfinite_passes_when_the_policy_says_so(model_factory: Callable[..., Model]) -> None:
    model = model_factory(input_policy={"nonfinite": "pass"})
    x = np.array([[np.nan, 1.0, np.inf, 0.0]], dtype=np.float32)
    y = model.predict({"x": x})["y"]
    assert np.isnan(y).all()  # NaN flows through the matmul into every output
    assert model.metrics.snapshot()["errors"] == {} and model.metrics.count == 1


def test_large_finite_float16_sum_is_not_taken_for_infinity() -> None:
    spec = TensorSpec("h", "float16", ("n",))
    values = np.full(10, 60000, dtype=np.float16)  # each finite, their sum overflows float16
    assert check_inputs([spec], {"h": values})["h"].dtype == np.float16


def test_dynamic_dims_outside_their_range(model_factory: Callable[..., Model]) -> None:
    model = model_factory(model="masked", input_policy={"dims": {"batch": [1, 4], "sequence": [2, 8]}})
    ids, mask = np.arange(6).reshape(2, 3), np.ones((2, 3), np.int32)
    np.testing.assert_allclose(
        model.predict({"input_ids": ids, "attention_mask": mask})["total"], masked_reference(ids, mask)
    )
    cases = [
        ((5, 3), r"dimension 'batch' is 5, outside the declared range \[1, 4\]"),
        ((2, 9), r"dimension 'sequence' is 9, outside the declared range \[2, 8\]"),
        ((2, 1), r"dimension 'sequence' is 1, outside the declared range \[2, 8\]"),
        ((0, 3), r"dimension 'batch' is 0, outside the declared range \[1, 4\]"),
    ]
    for shape, match in cases:
        with pytest.raises(InputError, match=match):
            model.predict({"input_ids": np.zeros(shape, np.int64), "attention_mask": np.zeros(shape, np.int32)})
    assert model.metrics.snapshot()["errors"] == {"input": len(cases)}


def test_empty_tensor_allowed_when_declared() -> None:
    fixed = TensorSpec("e", "float32", (0, 3))
    assert check_inputs([fixed], {"e": np.zeros((0, 3), np.float32)})["e"].shape == (0, 3)
    ranged = TensorSpec("r", "float32", ("n", 3))
    policy = InputPolicy(dims={"n": (0, 4)})
    assert check_inputs([ranged], {"r": np.zeros((0, 3), np.float32)}, policy)["r"].shape == (0, 3)
    with pytest.raises(InputError, match="empty tensor"):
        check_inputs([ranged], {"r": np.zeros((0, 3), np.float32)})


def test_oversized_inputs_are_refused(model_factory: Callable[..., Model]) -> None:
    model = model_factory(input_policy={"max_bytes": 4 * 4 * 8})  # eight rows of float32[4]
    model.predict({"x": np.ones((8, 4), np.float32)})
    with pytest.raises(InputError, match=r"take 144 bytes or more .* limit of 128 bytes \(input_policy.max_bytes\)"):
        model.predict({"x": np.ones((9, 4), np.float32)})
    # counted after conversion: nine float64 rows are 288 bytes given, 144 as float32
    with pytest.raises(InputError, match="144 bytes"):
        model.predict({"x": np.ones((9, 4), np.float64)})
    assert model.metrics.snapshot()["errors"] == {"input": 2}


def test_callers_arrays_are_not_modified(linear: Model) -> None:
    x = np.asfortranarray(np.arange(8, dtype=np.float64).reshape(2, 4))
    copy = x.copy()
    linear.predict({"x": x})
    np.testing.assert_array_equal(x, copy)
