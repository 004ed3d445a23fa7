"""``Manifest.input_policy`` validation: what a bundle may declare about the inputs a device accepts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sdk.errors import ManifestError
from sdk.manifest import Manifest, TensorSpec


def manifest(policy: Any) -> Manifest:
    return Manifest(
        name="clf",
        version=1,
        target="onnxruntime",
        precision="fp32",
        model="model.onnx",
        inputs=(TensorSpec("ids", "int64", ("batch", "sequence")), TensorSpec("scale", "float32", (1,))),
        outputs=(TensorSpec("logits", "float32", ("batch", 2)),),
        created="2026-01-01T00:00:00Z",
        input_policy=policy,
    )


@pytest.mark.parametrize(
    "policy",
    [
        {},
        {"nonfinite": "reject"},
        {"nonfinite": "pass"},
        {"dims": {"batch": [1, 64], "sequence": [0, 512]}},
        {"dims": {"batch": [4, 4]}},
        {"max_bytes": 1},
        {"nonfinite": "pass", "dims": {"sequence": [1, 128]}, "max_bytes": 2**20},
    ],
)
def test_valid_policies_round_trip(policy: dict[str, Any]) -> None:
    m = manifest(policy)
    assert m.input_policy == policy
    again = Manifest.from_bytes(m.to_bytes())
    assert again.input_policy == policy and again == m


def test_policy_is_copied_not_shared() -> None:
    policy = {"dims": {"batch": [1, 8]}}
    m = manifest(policy)
    policy["dims"]["batch"][1] = 9999
    assert m.input_policy["dims"]["batch"] == [1, 8]


def test_manifest_without_a_policy_reads_as_the_defaults() -> None:
    raw = json.loads(manifest({}).to_bytes())
    del raw["input_policy"]  # a bundle built before the field existed
    assert Manifest.from_bytes(json.dumps(raw).encode()).input_policy == {}


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        ([], "input_policy must be an object"),
        ("reject", "input_policy must be an object"),
        ({"nan": "reject"}, r"unknown keys \['nan'\]"),
        ({"nonfinite": "reject", "max_batch": 4}, r"unknown keys \['max_batch'\]"),
        ({"nonfinite": "clip"}, "nonfinite must be reject or pass"),
        ({"nonfinite": True}, "nonfinite must be reject or pass"),
        ({"max_bytes": 0}, r"max_bytes must be an int > 0"),
        ({"max_bytes": -5}, r"max_bytes must be an int > 0"),
        ({"max_bytes": 1.5}, r"max_bytes must be an int > 0"),
        ({"max_bytes": True}, r"max_bytes must be an int > 0"),
        ({"max_bytes": "1MB"}, r"max_bytes must be an int > 0"),
        ({"dims": [["batch", 1, 2]]}, "dims must be an object"),
        ({"dims": {"batch": [4, 1]}}, r"dims.batch must be \[min, max\] with 0 <= min <= max"),
        ({"dims": {"batch": [-1, 4]}}, r"dims.batch must be \[min, max\]"),
        ({"dims": {"batch": [1]}}, r"dims.batch must be \[min, max\]"),
        ({"dims": {"batch": [1, 2, 3]}}, r"dims.batch must be \[min, max\]"),
        ({"dims": {"batch": {"min": 1, "max": 2}}}, r"dims.batch must be \[min, max\]"),
        ({"dims": {"batch": [1.0, 2]}}, r"dims.batch must be \[min, max\]"),
        ({"dims": {"batch": [True, 2]}}, r"dims.batch must be \[min, max\]"),
        ({"dims": {"batch": 8}}, r"dims.batch must be \[min, max\]"),
        ({"dims": {"tokens": [1, 2]}}, r"'tokens' is not a dynamic dimension of any input"),
        ({"dims": {"1": [1, 2]}}, r"'1' is not a dynamic dimension of any input"),
    ],
    ids=[
        "list", "string", "unknown-key", "unknown-key-beside-known", "nonfinite-value", "nonfinite-bool",
        "max-bytes-zero", "max-bytes-negative", "max-bytes-float", "max-bytes-bool", "max-bytes-string",
        "dims-list", "min-over-max", "negative-min", "one-bound", "three-bounds", "bounds-object", "float-bound",
        "bool-bound", "bare-int", "dim-not-an-input-dim", "fixed-dim-index",
    ],
)  # fmt: skip
def test_bad_policies_are_refused(policy: Any, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        manifest(policy)


def test_output_only_dim_is_not_an_input_dim() -> None:
    m = manifest({})
    outputs_only = Manifest(
        **{**{f: getattr(m, f) for f in ("name", "version", "target", "precision", "model", "inputs", "created")}},
        outputs=(TensorSpec("logits", "float32", ("batch", "classes")),),
        input_policy={"dims": {"batch": [1, 2]}},
    )
    assert outputs_only.input_policy["dims"] == {"batch": [1, 2]}
    with pytest.raises(ManifestError, match="'classes' is not a dynamic dimension of any input"):
        Manifest(
            **{f: getattr(m, f) for f in ("name", "version", "target", "precision", "model", "inputs", "created")},
            outputs=(TensorSpec("logits", "float32", ("batch", "classes")),),
            input_policy={"dims": {"classes": [1, 2]}},
        )
