"""The typed manifest sections (``sdk.sections``): strict parsing, and the same JSON back out."""

from __future__ import annotations

import json
from typing import Any

import pytest
from bundlekit import draft_manifest

from sdk.errors import ManifestError
from sdk.manifest import Manifest
from sdk.sections import Golden, GoldenTolerance, InputPolicy, Preprocessing, Runtime, Section, Validation

# What the current packagers write, one realistic object per section (docs/bundle-format.md, 4.4 to 4.7a).
WRITTEN: dict[type[Section], dict[str, Any]] = {
    Runtime: {
        "package": "onnxruntime", "min_version": "1.17.0", "arch": ["any"], "providers": ["CPUExecutionProvider"],
        "graph_optimization_level": "ORT_ENABLE_ALL", "format": "onnx", "opset": 17, "exporter": "torchscript",
        "quantization": {"method": "dynamic", "weight_type": "QInt8", "per_channel": False},
    },
    Preprocessing: {
        "tokenizer": {"files": ["tokenizer/tokenizer.json"], "max_length": 16, "padding": "longest"},
        "labels": ["negative", "neutral", "positive"], "problem_type": "single_label_classification",
        "pooling": {"mode": "mean", "normalize": False, "source": "default"},
    },
    Golden: {
        "inputs": {"x": "golden/inputs/x.npy"}, "outputs": {"y": "golden/outputs/y.npy"}, "samples": 4,
        "tolerance": {"atol": 0.0012, "rtol": 0.001, "min_cosine": 0.999}, "outputs_from": "torch",
        "latency_budget_ms": 250,
    },
    InputPolicy: {"nonfinite": "reject", "dims": {"sequence": [1, 64]}, "max_bytes": 4096},
    Validation: {
        "reference": "torch", "samples": 32, "data": "random", "metrics": {"y": {"cosine_min": 0.9999, "x": None}},
        "tolerances": {"min_cosine": 0.999}, "passed": True, "accepted_drift": False, "failures": [],
        "benchmark": {"p50": 0.1, "runs": 50}, "accuracy": {"bundle": 0.9}, "padding": {"outputs": ["y"]},
        "numeric": {"ran": False, "reason": "not macOS"}, "structure": {"passed": True},
    },
}  # fmt: skip


@pytest.mark.parametrize("cls", list(WRITTEN), ids=lambda c: c.section)
def test_what_the_packagers_write_reads_back_to_the_same_json(cls: type[Section]) -> None:
    section = cls.from_dict(WRITTEN[cls])
    assert json.dumps(section.to_dict(), sort_keys=True) == json.dumps(WRITTEN[cls], sort_keys=True)
    assert section == WRITTEN[cls] and dict(section) == WRITTEN[cls]  # the read-only mapping view
    assert cls.from_dict(section.to_dict()) == section
    assert cls.from_dict({}).to_dict() == {}  # nothing set, nothing written


@pytest.mark.parametrize("cls", list(WRITTEN), ids=lambda c: c.section)
def test_unknown_keys_are_refused_by_name(cls: type[Section]) -> None:
    with pytest.raises(ManifestError, match=rf"^{cls.section}: unknown keys \['surprise'\]"):
        cls.from_dict({**WRITTEN[cls], "surprise": 1})
    with pytest.raises(ManifestError, match=rf"^{cls.section} must be an object"):
        cls.from_dict([])


BAD: list[tuple[type[Section], dict[str, Any], str]] = [
    (Runtime, {"package": 3}, "runtime.package must be a string"),
    (Runtime, {"arch": "x86_64"}, "runtime.arch must be a list of strings"),
    (Runtime, {"providers": ["CPUExecutionProvider", 1]}, "runtime.providers must be a list of strings"),
    (Runtime, {"opset": True}, "runtime.opset must be an integer >= 0"),
    (Runtime, {"opset": "17"}, "runtime.opset must be an integer >= 0"),
    (Runtime, {"int8_io": "yes"}, "runtime.int8_io must be true or false"),
    (Runtime, {"tensor_map": ["x"]}, "runtime.tensor_map must be an object"),
    (Runtime, {"coreml_inputs": {"ids": 32}}, "runtime.coreml_inputs must be an object of strings"),
    (Preprocessing, {"labels": "cat,dog"}, "preprocessing.labels must be a list of strings"),
    (Preprocessing, {"labels": [0, 1]}, "preprocessing.labels must be a list of strings"),
    (Preprocessing, {"tokenizer": "bert"}, "preprocessing.tokenizer must be an object"),
    (Preprocessing, {"problem_type": 2}, "preprocessing.problem_type must be a string"),
    (Golden, {"inputs": ["golden/x.npy"]}, "golden.inputs must be an object of strings"),
    (Golden, {"outputs": {"y": 3}}, "golden.outputs must be an object of strings"),
    (Golden, {"samples": -1}, "golden.samples must be an integer >= 0"),
    (Golden, {"latency_budget_ms": 0}, "golden.latency_budget_ms must be a finite number > 0"),
    (Golden, {"tolerance": []}, "golden.tolerance must be an object"),
    (Golden, {"tolerance": {"atol": -1}}, "golden.tolerance.atol must be a finite number >= 0"),
    (Golden, {"tolerance": {"rtol": "0.1"}}, "golden.tolerance.rtol must be a finite number >= 0"),
    (Golden, {"tolerance": {"min_cosine": 1.5}}, "golden.tolerance.min_cosine must be a number from 0 to 1"),
    (Golden, {"tolerance": {"atol": True}}, "golden.tolerance.atol must be a finite number >= 0"),
    (Golden, {"tolerance": {"atl": 1.0}}, r"golden.tolerance: unknown keys \['atl'\]"),
    (InputPolicy, {"nonfinite": "clip"}, "input_policy.nonfinite must be reject or pass"),
    (InputPolicy, {"dims": {"b": [2, 1]}}, r"input_policy.dims.b must be \[min, max\]"),
    (InputPolicy, {"max_bytes": 0}, "input_policy.max_bytes must be an int > 0"),
    (Validation, {"passed": 1}, "validation.passed must be true or false"),
    (Validation, {"samples": 3.0}, "validation.samples must be an integer >= 0"),
    (Validation, {"failures": "none"}, "validation.failures must be a list of strings"),
    (Validation, {"metrics": {"y": float("nan")}}, "validation.metrics is not plain JSON"),
    (Validation, {"benchmark": 12}, "validation.benchmark must be an object"),
]


@pytest.mark.parametrize(("cls", "raw", "match"), BAD, ids=[m.split(" must")[0].split(":")[0] for _, _, m in BAD])
def test_wrong_types_are_refused_naming_the_field(cls: type[Section], raw: dict[str, Any], match: str) -> None:
    with pytest.raises(ManifestError, match=f"^{match}"):
        cls.from_dict(raw)
    with pytest.raises(ManifestError, match=match):  # the manifest refuses it the same way
        draft_manifest(**{cls.section.split(".")[0]: raw})


def test_null_reads_as_absent() -> None:
    assert Runtime.from_dict({"package": "onnxruntime", "signature": None}).to_dict() == {"package": "onnxruntime"}


def test_sections_are_typed_and_do_not_share_the_callers_objects() -> None:
    raw = json.loads(json.dumps(WRITTEN[Runtime]))
    runtime = Runtime.from_dict(raw)
    raw["quantization"]["method"] = "changed"
    assert runtime.quantization == {"method": "dynamic", "weight_type": "QInt8", "per_channel": False}
    assert runtime.arch == ("any",) and runtime.opset == 17 and runtime.signature is None
    golden = Golden.from_dict(WRITTEN[Golden])
    assert isinstance(golden.tolerance, GoldenTolerance) and golden.tolerance.min_cosine == 0.999
    assert golden.paths() == ["golden/inputs/x.npy", "golden/outputs/y.npy"]
    assert Golden().rule == GoldenTolerance() and GoldenTolerance().to_dict() == {"atol": 1e-4, "rtol": 1e-3}
    policy = InputPolicy.from_dict(WRITTEN[InputPolicy])
    assert policy.reject_nonfinite and policy.ranges == {"sequence": (1, 64)} and policy.max_bytes == 4096


def test_input_policy_defaults() -> None:
    # Moved from the device's serving tests with InputPolicy itself.
    policy = InputPolicy.from_dict({})
    assert policy.reject_nonfinite and policy.ranges == {} and policy.max_bytes is None
    policy = InputPolicy.from_dict({"nonfinite": "pass", "dims": {"b": [1, 2]}, "max_bytes": 10})
    assert not policy.reject_nonfinite and policy.ranges == {"b": (1, 2)} and policy.max_bytes == 10


def test_manifest_holds_typed_sections_and_writes_the_same_bytes() -> None:
    m = draft_manifest()
    assert isinstance(m.runtime, Runtime) and isinstance(m.golden, Golden) and isinstance(m.validation, Validation)
    assert isinstance(m.preprocessing, Preprocessing) and isinstance(m.input_policy, InputPolicy)
    again = Manifest.from_bytes(m.to_bytes())
    assert again == m and again.to_bytes() == m.to_bytes()
    typed = draft_manifest(runtime=Runtime(package="onnxruntime", providers=("CPUExecutionProvider",)))
    assert typed.to_dict()["runtime"] == {"package": "onnxruntime", "providers": ["CPUExecutionProvider"]}
