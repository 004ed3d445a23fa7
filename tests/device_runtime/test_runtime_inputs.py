"""Input checking: every refusal happens before the backend runs and names the declared spec."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from runtime_bundles import Keys, linear_reference

import device_runtime
from device_runtime._inputs import check_inputs
from sdk.errors import InputError
from sdk.manifest import TensorSpec

X_SPEC = "'x' float32 ['batch', 4]"
IDS_SPEC = "'input_ids' int64 ['batch', 'sequence']"
MASK_SPEC = "'attention_mask' int32 ['batch', 'sequence']"


@pytest.fixture(scope="module")
def linear(linear_bundle: Path, keys: Keys) -> Iterator[device_runtime.Model]:
    with device_runtime.load(linear_bundle, [keys.public]) as model:
        yield model


@pytest.fixture(scope="module")
def masked(masked_bundle: Path, keys: Keys) -> Iterator[device_runtime.Model]:
    with device_runtime.load(masked_bundle, [keys.public]) as model:
        yield model


def ids_and_mask(batch: int = 2, sequence: int = 3) -> dict[str, np.ndarray]:
    ids = np.arange(batch * sequence, dtype=np.int64).reshape(batch, sequence)
    return {"input_ids": ids, "attention_mask": np.ones((batch, sequence), dtype=np.int32)}


# ---- names -------------------------------------------------------------------------------------
def test_missing_input_names_the_expected_spec(masked: device_runtime.Model) -> None:
    with pytest.raises(InputError, match="missing input") as info:
        masked.predict({"input_ids": np.zeros((1, 2), dtype=np.int64)})
    assert MASK_SPEC in str(info.value)


def test_unexpected_input_is_refused(linear: device_runtime.Model) -> None:
    with pytest.raises(InputError, match=r"unexpected input.*'z'") as info:
        linear.predict({"x": np.zeros((1, 4), np.float32), "z": np.zeros(1)})
    assert X_SPEC in str(info.value)


def test_inputs_must_be_a_mapping(linear: device_runtime.Model) -> None:
    with pytest.raises(InputError, match="mapping") as info:
        linear.predict([np.zeros((1, 4), np.float32)])  # type: ignore[arg-type]
    assert X_SPEC in str(info.value)


# ---- junk values ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    ["1 2 3 4", b"\x00\x01", None, {"a": 1}, [[1.0, 2.0], [3.0]], np.array([[object()] * 4]), [["a", "b", "c", "d"]]],
    ids=["str", "bytes", "None", "dict", "ragged", "object-array", "list-of-str"],
)
def test_non_numeric_values_are_refused(linear: device_runtime.Model, value: object) -> None:
    with pytest.raises(InputError) as info:
        linear.predict({"x": value})
    assert X_SPEC in str(info.value)


# ---- dtypes ---------------------------------------------------------------------------------------
def test_lists_are_accepted_and_converted(linear: device_runtime.Model, masked: device_runtime.Model) -> None:
    x = [[0.5, -1.0, 2.0, 0.0]]
    np.testing.assert_allclose(linear.predict({"x": x})["y"], linear_reference(np.array(x)), rtol=1e-6)
    # Python ints into a float32 input: exact, so allowed
    np.testing.assert_allclose(linear.predict({"x": [[1, 2, 3, 4]]})["y"], linear_reference(np.array([[1, 2, 3, 4]])))
    out = masked.predict({"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 0]]})  # int64 list -> int32 mask
    np.testing.assert_array_equal(out["total"], np.array([3.0], dtype=np.float32))


def test_float64_narrows_to_float32(linear: device_runtime.Model) -> None:
    x = np.array([[0.25, 0.5, 0.75, 1.0]], dtype=np.float64)
    np.testing.assert_allclose(linear.predict({"x": x})["y"], linear_reference(x), rtol=1e-6)


def test_float64_that_overflows_float32_is_refused(linear: device_runtime.Model) -> None:
    with pytest.raises(InputError, match="overflow float32") as info:
        linear.predict({"x": np.array([[1e300, 0, 0, 0]], dtype=np.float64)})
    assert X_SPEC in str(info.value)


def test_int64_narrows_to_int32_when_values_fit(masked: device_runtime.Model) -> None:
    feeds = ids_and_mask()
    feeds["attention_mask"] = feeds["attention_mask"].astype(np.int64)
    out = masked.predict(feeds)
    np.testing.assert_array_equal(out["total"], feeds["input_ids"].sum(axis=1).astype(np.float32))


def test_int64_that_does_not_fit_int32_is_refused(masked: device_runtime.Model) -> None:
    feeds = ids_and_mask()
    mask = feeds["attention_mask"].astype(np.int64)
    mask[0, 0] = 2**40
    feeds["attention_mask"] = mask
    with pytest.raises(InputError, match="outside int32's range") as info:
        masked.predict(feeds)
    assert MASK_SPEC in str(info.value)


def test_int32_widens_to_int64_and_bool_to_int(masked: device_runtime.Model) -> None:
    feeds = {"input_ids": np.array([[1, 2, 3]], dtype=np.int32), "attention_mask": np.array([[True, False, True]])}
    np.testing.assert_array_equal(masked.predict(feeds)["total"], np.array([4.0], dtype=np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_float_into_int_is_refused_even_when_whole(masked: device_runtime.Model, dtype: type) -> None:
    feeds = ids_and_mask()
    feeds["input_ids"] = feeds["input_ids"].astype(dtype)
    with pytest.raises(InputError, match="never cast to an integer") as info:
        masked.predict(feeds)
    assert IDS_SPEC in str(info.value)


def test_int_values_inexact_in_float32_are_refused(linear: device_runtime.Model) -> None:
    with pytest.raises(InputError, match="not exactly representable") as info:
        linear.predict({"x": np.array([[2**24 + 1, 0, 0, 0]], dtype=np.int64)})
    assert X_SPEC in str(info.value)


def test_number_into_bool_is_refused() -> None:
    spec = TensorSpec("flag", "bool", (1,))
    with pytest.raises(InputError, match="only bool converts to bool"):
        check_inputs([spec], {"flag": np.array([1], dtype=np.int64)})
    assert check_inputs([spec], {"flag": [True]})["flag"].dtype == np.bool_


def test_negative_values_into_unsigned_are_refused_and_fitting_ones_pass() -> None:
    spec = TensorSpec("ids", "uint8", (3,))
    with pytest.raises(InputError, match="outside uint8's range"):
        check_inputs([spec], {"ids": [1, -2, 3]})
    assert check_inputs([spec], {"ids": [1, 2, 255]})["ids"].tolist() == [1, 2, 255]


def test_caller_arrays_are_not_modified() -> None:
    spec = TensorSpec("x", "float32", (2,))
    x = np.array([1.5, 2.5], dtype=np.float64)
    feeds = check_inputs([spec], {"x": x})
    feeds["x"][0] = 99.0
    assert x.dtype == np.float64 and x[0] == 1.5


# ---- shapes --------------------------------------------------------------------------------------
def test_wrong_rank_is_refused(linear: device_runtime.Model) -> None:
    with pytest.raises(InputError, match=r"rank 1, expected 2") as info:
        linear.predict({"x": np.zeros(4, np.float32)})
    assert X_SPEC in str(info.value)


def test_wrong_fixed_dim_is_refused(linear: device_runtime.Model) -> None:
    with pytest.raises(InputError, match="dimension 1 must be 4") as info:
        linear.predict({"x": np.zeros((2, 5), np.float32)})
    assert X_SPEC in str(info.value)


def test_dynamic_batch_accepts_any_size(linear: device_runtime.Model) -> None:
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
        assert linear.predict({"x": x})["y"].shape == (batch, 3)


@pytest.mark.parametrize(("ids_shape", "mask_shape", "dim"), [((2, 3), (1, 3), "batch"), ((2, 3), (2, 4), "sequence")])
def test_shared_dynamic_dims_must_agree(
    masked: device_runtime.Model, ids_shape: tuple[int, int], mask_shape: tuple[int, int], dim: str
) -> None:
    feeds = {"input_ids": np.zeros(ids_shape, np.int64), "attention_mask": np.zeros(mask_shape, np.int32)}
    with pytest.raises(InputError, match=f"dimension '{dim}' is") as info:
        masked.predict(feeds)
    assert MASK_SPEC in str(info.value) and "on input 'input_ids'" in str(info.value)


# ---- non-finite values and the remembered shapes -----------------------------------------------
FLOAT_SPECS = (TensorSpec("x", "float32", ("batch", "n")),)
DOUBLE_SPECS = (TensorSpec("x", "float64", ("batch", "n")),)


@pytest.mark.parametrize("n", [4, 256, 257, 5000])  # the small-input path (<= 256 elements) and numpy's
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_nonfinite_value_anywhere_is_refused(n: int, bad: float) -> None:
    for specs, dtype in ((FLOAT_SPECS, np.float32), (DOUBLE_SPECS, np.float64)):
        x = np.ones((1, n), dtype)
        check_inputs(specs, {"x": x})
        x[0, n - 1] = bad
        with pytest.raises(InputError, match=r"1 NaN or infinite value\(s\)"):
            check_inputs(specs, {"x": x})


def test_huge_finite_values_whose_sum_overflows_pass() -> None:
    x = np.full((1, 4), np.finfo(np.float64).max)
    with np.errstate(over="ignore"):
        assert np.isinf(x.sum())  # the quick sum overflows; the exact check decides
    assert check_inputs(DOUBLE_SPECS, {"x": x})["x"] is x


def test_non_native_byte_order_and_strided_inputs_are_checked() -> None:
    swapped = np.array([[1.0, np.nan]], dtype=">f4")
    with pytest.raises(InputError, match="NaN"):
        check_inputs(FLOAT_SPECS, {"x": swapped})
    strided = np.array([[1.0, 5.0, np.inf, 6.0]], np.float32)[:, ::2]
    with pytest.raises(InputError, match="NaN"):
        check_inputs(FLOAT_SPECS, {"x": strided})


def test_remembered_shapes_still_check_each_new_combination() -> None:
    specs = (TensorSpec("a", "float32", ("batch", 2)), TensorSpec("b", "float32", ("batch", 3)))
    seen: set[tuple[tuple[int, ...], ...]] = set()
    check_inputs(specs, {"a": np.ones((2, 2), np.float32), "b": np.ones((2, 3), np.float32)}, valid_shapes=seen)
    assert seen == {((2, 2), (2, 3))}
    check_inputs(specs, {"a": np.ones((2, 2), np.float32), "b": np.ones((2, 3), np.float32)}, valid_shapes=seen)
    with pytest.raises(InputError, match="'batch' is 3 but 2"):
        check_inputs(specs, {"a": np.ones((2, 2), np.float32), "b": np.ones((3, 3), np.float32)}, valid_shapes=seen)
    with pytest.raises(InputError, match="dimension 1 must be 2"):
        check_inputs(specs, {"a": np.ones((2, 5), np.float32), "b": np.ones((2, 3), np.float32)}, valid_shapes=seen)
    assert seen == {((2, 2), (2, 3))}  # refused combinations are never remembered


def test_the_shape_memory_is_bounded() -> None:
    from device_runtime._inputs import SHAPE_CACHE_SIZE

    seen: set[tuple[tuple[int, ...], ...]] = set()
    for batch in range(1, SHAPE_CACHE_SIZE + 20):
        check_inputs(FLOAT_SPECS, {"x": np.ones((batch, 2), np.float32)}, valid_shapes=seen)
    assert len(seen) == SHAPE_CACHE_SIZE
