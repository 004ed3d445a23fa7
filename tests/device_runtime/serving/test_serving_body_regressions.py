"""Bodies hypothesis found (tests/fuzz/test_fuzz_serving.py) that escaped the typed 400: now refused cleanly."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from device_runtime.serve import _HTTPError, _read_npy, _read_npz


def test_npy_header_that_does_not_tokenize_is_a_400() -> None:
    # A 1.0 header with its opening brace changed: numpy's header filter raised tokenize.TokenError.
    out = io.BytesIO()
    np.save(out, np.arange(12, dtype=np.float32).reshape(3, 4))
    data = bytearray(out.getvalue())
    data[data.index(b"{")] = 0
    with pytest.raises(_HTTPError) as caught:
        _read_npy(bytes(data), "the body")
    assert caught.value.status == 400


def test_npz_member_with_corrupt_deflate_data_is_a_400() -> None:
    # A member whose compressed bytes are damaged: zipfile raised zlib.error.
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", b"\x93NUMPY" + bytes(range(256)) * 4)
    data = bytearray(out.getvalue())
    start = 30 + len("x.npy")  # the local header, then the deflate stream
    data[start : start + 8] = b"\xff" * 8
    with pytest.raises(_HTTPError) as caught:
        _read_npz(bytes(data), 1 << 20)
    assert caught.value.status == 400


def test_npz_of_an_unsupported_zip_version_is_a_400() -> None:
    # A central directory naming zip version 6.4: zipfile.ZipFile raised NotImplementedError.
    data = (
        b"PK\x01\x02\x00\x00@"
        + bytes(44)
        + b"PK\x05\x06\x00\x00\x00\x00\x00\x00\x00\x003\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    )
    with pytest.raises(_HTTPError) as caught:
        _read_npz(data, 1 << 20)
    assert caught.value.status == 400
