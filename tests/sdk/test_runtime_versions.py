"""The version tables: what a model needs, derived from what it uses (issue 13)."""

from __future__ import annotations

import itertools
import json

import pytest
from bundlekit import draft_manifest

from sdk.compat import version_at_least
from sdk.manifest import Manifest
from sdk.runtime_versions import (
    ORT_RELEASES,
    coreml_min_version,
    coreml_os_versions,
    coreml_spec_for_os,
    litert_min_version,
    onnxruntime_min_version,
    openvino_min_version,
    release_floor,
)


def test_ort_opset_17_needs_1_12_not_the_host() -> None:
    need = onnxruntime_min_version({"": 17}, ir_version=8, host="1.32.1")
    assert need.version == "1.12.0"
    assert any("ai.onnx opset 17" in r for r in need.reasons)


def test_ort_table_is_monotonic_and_the_jetson_release_reads_opset_20() -> None:
    for older, newer in itertools.pairwise(ORT_RELEASES):
        assert version_at_least(newer.version, older.version)
        assert (newer.opset, newer.ml_opset, newer.ir_version) >= (older.opset, older.ml_opset, older.ir_version)
    assert onnxruntime_min_version({"": 20, "ai.onnx.ml": 4}, 9).version == "1.17.0"


def test_ort_unknown_domains_and_ops_fall_back_to_the_host() -> None:
    need = onnxruntime_min_version({"": 17, "ai.onnx.ml": 5, "com.microsoft.nchwc": 1}, 8, host="1.32.1")
    assert need.version == "1.32.0"  # ai.onnx.ml 5 is not known to be read by any listed release
    assert onnxruntime_min_version({"": 17, "com.microsoft": 1}, 8, ["MatMulNBits"]).version == "1.17.0"
    with pytest.raises(ValueError, match=r"com\.microsoft Attention"):
        onnxruntime_min_version({"": 17, "com.microsoft": 1}, 8, ["Attention"])


def test_litert_reads_the_converter_metadata() -> None:
    assert litert_min_version("2.0.0").version == "1.0.0"  # a Raspberry Pi's ai-edge-litert 1.4.0 runs it
    assert litert_min_version("2.0.0", package="tflite-runtime").version == "2.0.0"
    assert litert_min_version("2.19.0", host="2.3.1").version == "2.3.0"
    assert litert_min_version(None, host="2.3.1").version == "2.3.0"


def test_openvino_ir_and_opsets() -> None:
    assert openvino_min_version(11, ["opset1", "opset8"]).version == "2022.1.0"
    assert openvino_min_version(11, ["opset13"], ["f32", "i8"]).version == "2023.2.0"
    assert openvino_min_version(11, ["opset1"], ["u4"], host="2026.4.1").version == "2026.4.0"


def test_coreml_deployment_targets_map_to_named_os_versions() -> None:
    assert coreml_os_versions(7) == {"iOS": "16", "macOS": "13", "watchOS": "9", "tvOS": "16"}
    assert coreml_spec_for_os("iOS16") == coreml_spec_for_os("macOS 13") == coreml_spec_for_os("macOS13.4") == 7
    assert coreml_spec_for_os("iOS 15.2") == 6
    assert coreml_min_version(6).version == "5.0.0"
    with pytest.raises(ValueError, match="older than"):
        coreml_spec_for_os("iOS12")
    with pytest.raises(ValueError, match="unknown OS"):
        coreml_spec_for_os("Android 14")


def test_release_floor() -> None:
    assert release_floor("2026.4.1-22982-e213a147257-releases/2026/4") == "2026.4.0"
    assert release_floor("1.32.0rc1") == "1.32.0"


def test_built_with_is_provenance_and_old_manifests_still_load() -> None:
    old = draft_manifest().to_dict()  # written before runtime.built_with existed
    assert "built_with" not in old["runtime"]
    assert Manifest.from_bytes(draft_manifest().to_bytes()).runtime.built_with is None
    new = {**old, "runtime": {**old["runtime"], "built_with": {"onnxruntime": "1.32.0", "onnx": "1.23.2"}}}
    m = Manifest.from_dict(new)
    assert m.runtime.built_with == {"onnxruntime": "1.32.0", "onnx": "1.23.2"}
    assert json.loads(m.to_bytes())["runtime"]["built_with"]["onnx"] == "1.23.2"
