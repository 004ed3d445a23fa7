"""load / Model / health_check / backend selection, on real signed ONNX bundles."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from runtime_bundles import GOLDEN_X, BundleMaker, Keys, linear_reference

import device_runtime
import sdk
from device_runtime.errors import HealthCheckError, ModelClosedError
from sdk.bundle import file_sha256
from sdk.errors import BackendError, EdgeshipError, IntegrityError, SignatureError
from sdk.manifest import TensorSpec
from sdk.signing import TrustedKeys, load_public_key


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make load()'s private extraction folders land in a folder the test can inspect."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_predict_matches_numpy(linear_bundle: Path, keys: Keys) -> None:
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    with device_runtime.load(linear_bundle, [keys.public]) as model:
        out = model.predict({"x": x})
    assert list(out) == ["y"]
    assert out["y"].dtype == np.float32 and out["y"].shape == (5, 3)
    np.testing.assert_allclose(out["y"], linear_reference(x), rtol=1e-5, atol=1e-6)


def test_model_describes_itself(linear_bundle: Path, keys: Keys) -> None:
    with device_runtime.load(linear_bundle, TrustedKeys.from_files([keys.public]), intra_op_threads=1) as model:
        assert model.manifest.name == "linear" and model.manifest.version == 1
        assert model.signature == {
            "inputs": [TensorSpec("x", "float32", ("batch", 4))],
            "outputs": [TensorSpec("y", "float32", ("batch", 3))],
        }
        assert model.bundle_sha256 == file_sha256(linear_bundle)
        info = model.backend_info
    assert info["backend"] == "onnxruntime"
    assert info["runtime_version"] == onnxruntime.__version__
    assert info["providers"] == ["CPUExecutionProvider"]
    assert info["intra_op_threads"] == 1
    assert info["graph_optimization_level"] == "ORT_ENABLE_ALL"


def test_trust_accepts_key_objects_and_the_sdk_facade(linear_bundle: Path, keys: Keys) -> None:
    with sdk.load(linear_bundle, [load_public_key(keys.public)]) as model:
        assert isinstance(model, device_runtime.Model)
        np.testing.assert_allclose(model.predict({"x": GOLDEN_X})["y"], linear_reference(GOLDEN_X), rtol=1e-6)


def test_untrusted_key_is_refused_and_leaves_nothing(linear_bundle: Path, keys: Keys, private_tmp: Path) -> None:
    with pytest.raises(SignatureError):
        device_runtime.load(linear_bundle, [keys.other_public])
    assert list(private_tmp.iterdir()) == []


def test_close_removes_the_private_folder_and_predict_then_fails(
    linear_bundle: Path, keys: Keys, private_tmp: Path
) -> None:
    model = device_runtime.load(linear_bundle, [keys.public])
    assert model.root.is_dir() and private_tmp in model.root.parents
    model.close()
    assert model.closed and list(private_tmp.iterdir()) == []
    with pytest.raises(ModelClosedError, match="closed") as info:
        model.predict({"x": GOLDEN_X})
    assert isinstance(info.value, EdgeshipError)
    with pytest.raises(ModelClosedError):
        model.health_check()
    model.close()  # idempotent


def test_context_manager_closes(linear_bundle: Path, keys: Keys, private_tmp: Path) -> None:
    with device_runtime.load(linear_bundle, [keys.public]) as model:
        assert not model.closed
    assert model.closed and list(private_tmp.iterdir()) == []
    with pytest.raises(ModelClosedError):
        model.predict({"x": GOLDEN_X})


# ---- health check --------------------------------------------------------------------------------
def test_health_check_passes_on_a_good_bundle(linear_bundle: Path, masked_bundle: Path, keys: Keys) -> None:
    for bundle, output in ((linear_bundle, "y"), (masked_bundle, "total")):
        with device_runtime.load(bundle, [keys.public]) as model:
            metrics = model.health_check()
        assert metrics["passed"] is True and metrics["latency_ms"] >= 0
        assert metrics["outputs"][output]["passed"] and metrics["outputs"][output]["max_abs_error"] < 1e-5
        assert metrics["outputs"][output]["cosine"] == pytest.approx(1.0)


def test_health_check_fails_when_golden_outputs_were_altered(make_bundle: BundleMaker, keys: Keys) -> None:
    altered = make_bundle(golden_outputs={"y": linear_reference(GOLDEN_X) + 0.5})  # signed: integrity passes
    with device_runtime.load(altered, [keys.public]) as model:
        with pytest.raises(HealthCheckError, match="health check of linear v1 failed: y: max") as info:
            model.health_check()
    assert isinstance(info.value, IntegrityError)
    assert info.value.metrics["passed"] is False
    assert info.value.metrics["outputs"]["y"]["max_abs_error"] == pytest.approx(0.5, abs=1e-5)


def test_health_check_needs_both_bounds_when_the_bundle_sets_a_cosine(make_bundle: BundleMaker, keys: Keys) -> None:
    # One rule on host and device (sdk.golden): elementwise AND per-sample cosine; a cosine never excuses drift.
    scaled = {"y": linear_reference(GOLDEN_X) * 1.01}  # 1% off everywhere: outside atol/rtol, cosine 1
    for tolerance in (None, {"atol": 1e-5, "rtol": 1e-4, "min_cosine": 0.999}):
        with device_runtime.load(make_bundle(golden_outputs=scaled, tolerance=tolerance), [keys.public]) as model:
            with pytest.raises(HealthCheckError, match="atol") as info:
                model.health_check()
        assert info.value.metrics["outputs"]["y"]["within_tolerance"] is False
        assert info.value.metrics["outputs"]["y"]["cosine"] == pytest.approx(1.0)
    one_sample_flipped = linear_reference(GOLDEN_X).copy()
    one_sample_flipped[0] = -one_sample_flipped[0]
    loose = {"atol": 100.0, "rtol": 0.0, "min_cosine": 0.99}  # elementwise bound passes; the cosine does not
    bundle = make_bundle(golden_outputs={"y": one_sample_flipped}, tolerance=loose)
    with device_runtime.load(bundle, [keys.public]) as model, pytest.raises(HealthCheckError, match="min cosine"):
        model.health_check()


def test_health_check_refuses_golden_of_the_wrong_shape(make_bundle: BundleMaker, keys: Keys) -> None:
    bundle = make_bundle(golden_outputs={"y": np.zeros((3, 3), np.float32)})
    with device_runtime.load(bundle, [keys.public]) as model, pytest.raises(HealthCheckError, match="golden"):
        model.health_check()


# ---- backends ------------------------------------------------------------------------------------
def test_target_without_an_adapter_names_the_extra(
    make_bundle: BundleMaker, keys: Keys, private_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As an older edgeship-device that predates the openvino adapter would see an openvino bundle.
    monkeypatch.delitem(device_runtime.backends.BACKENDS, "openvino", raising=False)
    bundle = make_bundle(target="openvino")
    with pytest.raises(BackendError, match=r"edgeship\[openvino\]") as info:
        device_runtime.load(bundle, [keys.public])
    assert "\n" not in str(info.value)
    assert list(private_tmp.iterdir()) == []


def test_missing_runtime_package_names_the_extra(
    linear_bundle: Path, keys: Keys, hide_runtime: Callable[[str], None]
) -> None:
    hide_runtime("onnxruntime")
    with pytest.raises(BackendError, match=r"pip install 'edgeship\[onnxruntime\]'") as info:
        device_runtime.load(linear_bundle, [keys.public])
    assert "\n" not in str(info.value)


def test_junk_model_file_is_a_backend_error(make_bundle: BundleMaker, keys: Keys, private_tmp: Path) -> None:
    junk = make_bundle(model_bytes=b"this is not an onnx model\x00\xff")  # signed: integrity passes
    with pytest.raises(BackendError, match=r"onnxruntime cannot load model\.onnx") as info:
        device_runtime.load(junk, [keys.public])
    assert "\n" not in str(info.value)
    assert list(private_tmp.iterdir()) == []


def test_manifest_that_disagrees_with_the_model_is_a_backend_error(make_bundle: BundleMaker, keys: Keys) -> None:
    wrong_dtype = make_bundle(inputs=(TensorSpec("x", "float64", ("batch", 4)),))
    with pytest.raises(BackendError, match="input 'x': the manifest says float64, the model takes tensor"):
        device_runtime.load(wrong_dtype, [keys.public])
    wrong_name = make_bundle(inputs=(TensorSpec("pixels", "float32", ("batch", 4)),))
    with pytest.raises(BackendError, match="do not match the model's"):
        device_runtime.load(wrong_name, [keys.public])


def test_unavailable_bundle_providers_fall_back_to_cpu(make_bundle: BundleMaker, keys: Keys) -> None:
    bundle = make_bundle(runtime={"providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]})
    with device_runtime.load(bundle, [keys.public]) as model:
        assert model.backend_info["providers"] == ["CPUExecutionProvider"]
        np.testing.assert_allclose(model.predict({"x": GOLDEN_X})["y"], linear_reference(GOLDEN_X), rtol=1e-6)


def test_explicit_providers_must_include_an_available_one(linear_bundle: Path, keys: Keys) -> None:
    with pytest.raises(BackendError, match="none of the requested execution providers CUDAExecutionProvider"):
        device_runtime.load(linear_bundle, [keys.public], providers=["CUDAExecutionProvider"])
    chain = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with device_runtime.load(linear_bundle, [keys.public], providers=chain) as model:
        assert model.backend_info["providers"] == ["CPUExecutionProvider"]


def test_graph_optimization_level_comes_from_the_bundle(make_bundle: BundleMaker, keys: Keys) -> None:
    plain = make_bundle(runtime={"providers": ["CPUExecutionProvider"], "graph_optimization_level": "ORT_DISABLE_ALL"})
    with device_runtime.load(plain, [keys.public]) as model:
        assert model.backend_info["graph_optimization_level"] == "ORT_DISABLE_ALL"
    bad = make_bundle(runtime={"graph_optimization_level": "FASTEST"})
    with pytest.raises(BackendError, match="graph_optimization_level 'FASTEST' is not one of"):
        device_runtime.load(bad, [keys.public])


@pytest.mark.parametrize("threads", [-1, 1.5, True])
def test_bad_thread_count_is_refused(linear_bundle: Path, keys: Keys, threads: object) -> None:
    with pytest.raises(BackendError, match="intra_op_threads"):
        device_runtime.load(linear_bundle, [keys.public], intra_op_threads=threads)  # type: ignore[arg-type]


def test_a_runtime_failure_is_a_backend_error_and_the_next_call_works(make_bundle: BundleMaker, keys: Keys) -> None:
    """ONNX Runtime's fast path (its C++ session called directly) hands failures to the public path."""
    from onnx import TensorProto, helper, numpy_helper
    from runtime_bundles import B, W

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["z"]),
            helper.make_node("Reshape", ["z", "two_rows"], ["y"]),  # fails at run time unless batch is 2
        ],
        "linear-two-rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            numpy_helper.from_array(W, "W"),
            numpy_helper.from_array(B, "b"),
            numpy_helper.from_array(np.array([2, 3], np.int64), "two_rows"),
        ],
    )
    model_bytes = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with device_runtime.load(make_bundle(model_bytes=model_bytes.SerializeToString()), [keys.public]) as model:
        x = np.ones((2, 4), np.float32)
        np.testing.assert_allclose(model.predict({"x": x})["y"], linear_reference(x), rtol=1e-5)
        with pytest.raises(BackendError, match="onnxruntime inference failed"):
            model.predict({"x": np.ones((3, 4), np.float32)})
        np.testing.assert_allclose(model.predict({"x": x * 2})["y"], linear_reference(x * 2), rtol=1e-5)
        assert model.metrics.snapshot()["errors"] == {"backend": 1}
