"""Manifest and strict JSON: any bytes give a value or ``ManifestError``, nothing else."""

from __future__ import annotations

import json

from conftest import bound, budget
from hypothesis import given
from hypothesis import strategies as st

from sdk.errors import ManifestError
from sdk.manifest import Manifest, strict_json_loads

VALID = {
    "schema": 1, "name": "m", "version": 1, "target": "onnxruntime", "precision": "fp32",
    "model": "model.onnx", "created": "2026-01-01T00:00:00Z",
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 2]}],
    "files": [{"path": "model.onnx", "sha256": "ab" * 32, "size": 1}],
}  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@budget(300)
@given(st.binary(max_size=2000))
def test_strict_json_loads_random_bytes(data: bytes) -> None:
    with bound():
        try:
            strict_json_loads(data, "manifest")
        except ManifestError:
            pass


@budget(200)
@given(st.binary(max_size=2000))
def test_manifest_from_random_bytes(data: bytes) -> None:
    with bound():
        try:
            Manifest.from_bytes(data)
        except ManifestError:
            pass


@budget(400)
@given(st.sampled_from(sorted(VALID)), json_values)
def test_manifest_one_field_replaced(key: str, value: object) -> None:
    doc = {**VALID, key: value}
    with bound():
        try:
            Manifest.from_bytes(json.dumps(doc).encode())
        except ManifestError:
            pass


@budget(200)
@given(st.sampled_from(["inputs", "outputs", "files"]), st.sampled_from(["name", "dtype", "shape", "path", "sha256",
       "size"]), json_values)  # fmt: skip
def test_manifest_nested_field_replaced(section: str, key: str, value: object) -> None:
    doc = json.loads(json.dumps(VALID))
    doc[section][0][key] = value
    with bound():
        try:
            Manifest.from_bytes(json.dumps(doc).encode())
        except ManifestError:
            pass
