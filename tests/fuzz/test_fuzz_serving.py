"""The serving endpoint's request decoding, without sockets: JSON, .npy and .npz bodies give arrays or a
4xx ``_HTTPError``; the input checks give arrays or ``InputError``."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
from conftest import bound, budget
from hypothesis import given
from hypothesis import strategies as st

from device_runtime._inputs import check_inputs
from device_runtime.serve import _HTTPError, _parse_json_inputs, _read_npy, _read_npz
from sdk.errors import InputError
from sdk.manifest import TensorSpec

CAP = 1 << 20


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


GOOD_NPY = _npy(np.arange(12, dtype=np.float32).reshape(3, 4))


def _npz(members: dict[str, bytes], compress: bool) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


GOOD_NPZ = _npz({"x.npy": GOOD_NPY}, compress=True)


def _expect_4xx(call: object) -> None:
    with bound():
        try:
            call()  # type: ignore[operator]
        except _HTTPError as e:
            assert 400 <= e.status < 500, e.status


@st.composite
def mutated(draw: st.DrawFn, good: bytes) -> bytes:
    data = good
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(data) - 1)) if data else 0
        kind = draw(st.sampled_from(["byte", "truncate", "insert"]))
        if kind == "byte" and data:
            data = data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos + 1 :]
        elif kind == "truncate":
            data = data[:pos]
        else:
            data = data[:pos] + draw(st.binary(min_size=1, max_size=64)) + data[pos:]
    return data


@budget(300)
@given(st.binary(max_size=2000) | st.text(max_size=300).map(str.encode))
def test_json_body_random(data: bytes) -> None:
    _expect_4xx(lambda: _parse_json_inputs(data))


@budget(300)
@given(mutated(GOOD_NPY) | st.binary(max_size=300))
def test_npy_body_mutated(data: bytes) -> None:
    _expect_4xx(lambda: _read_npy(data, "the body"))


@budget(300)
@given(mutated(GOOD_NPZ) | mutated(_npz({"x.npy": GOOD_NPY}, compress=False)) | st.binary(max_size=300))
def test_npz_body_mutated(data: bytes) -> None:
    _expect_4xx(lambda: _read_npz(data, CAP))


SPECS = (TensorSpec("x", "float32", ("batch", 4)), TensorSpec("ids", "int64", ("batch",)))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=40,
)


@budget(300)
@given(st.dictionaries(st.sampled_from(["x", "ids", "y"]), json_values, max_size=3))
def test_check_inputs_any_json(inputs: dict[str, object]) -> None:
    with bound():
        try:
            check_inputs(SPECS, json.loads(json.dumps(inputs)))
        except InputError:
            pass
