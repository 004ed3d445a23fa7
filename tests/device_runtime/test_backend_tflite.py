"""The TFLite backend: real LiteRT interpreters on tiny models, runtime fallback order, bad bundles."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from runtime_bundles import Keys
from tflite_backend_parts import W, float_model, int8_model, io_quantization, reference, write_tflite_bundle

import device_runtime
from sdk.errors import BackendError, InputError
from sdk.manifest import TensorSpec

X = TensorSpec("x", "float32", ("batch", 4))
IDS = TensorSpec("token_ids", "int64", ("batch", 3))  # the model's own name is "ids", and it takes int32
Y = TensorSpec("y", "float32", ("batch", 3))
FLOAT_RUNTIME = {"tensor_map": {"inputs": {"x": "x", "token_ids": "ids"}, "outputs": {"y": "output_0"}}}
INT8_RUNTIME = {"tensor_map": {"inputs": {"x": "x"}, "outputs": {"y": "output_0"}}}


@pytest.fixture(scope="module")
def models() -> dict[str, bytes]:
    return {"float": float_model(), "int8": int8_model()}


@pytest.fixture(scope="module")
def float_bundle(models: dict[str, bytes], keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tflite_bundle(tmp_path_factory.mktemp("tfl") / "float.edgebundle", keys.private, models["float"],
                               (X, IDS), (Y,), FLOAT_RUNTIME)  # fmt: skip


def test_float_model_maps_names_casts_ids_and_resizes_batch(float_bundle: Path, keys: Keys) -> None:
    rng = np.random.default_rng(0)
    with device_runtime.load(float_bundle, keys.public, intra_op_threads=2) as model:
        info = model.backend_info
        assert info["runtime"] == "ai-edge-litert" and info["signature"] == "serving_default" and info["threads"] == 2
        for batch in (1, 5, 2):  # the interpreter resizes to each batch
            x = rng.standard_normal((batch, 4)).astype(np.float32)
            ids = rng.integers(0, 10, (batch, 3)).astype(np.int64)
            out = model.predict({"x": x, "token_ids": ids})["y"]
            np.testing.assert_allclose(out, reference(x, ids), rtol=1e-5, atol=1e-5)
        with pytest.raises(InputError, match="int32"):
            model.predict({"x": x[:1], "token_ids": np.array([[1, 2, 2**40]], np.int64)})


def test_results_are_the_callers_not_views_of_the_interpreter(float_bundle: Path, keys: Keys) -> None:
    x = np.ones((2, 4), np.float32)
    ids = np.zeros((2, 3), np.int64)
    with device_runtime.load(float_bundle, keys.public) as model:
        first = model.predict({"x": x, "token_ids": ids})["y"]
        kept = first.copy()
        model.predict({"x": x * 7, "token_ids": ids + 1})
        np.testing.assert_array_equal(first, kept)


def test_concurrent_predicts_share_one_interpreter_safely(float_bundle: Path, keys: Keys) -> None:
    rng = np.random.default_rng(1)
    cases = [(rng.standard_normal((b, 4)).astype(np.float32), rng.integers(0, 10, (b, 3))) for b in (1, 2, 3, 4) * 4]
    errors: list[BaseException] = []
    with device_runtime.load(float_bundle, keys.public) as model:

        def work(x: np.ndarray, ids: np.ndarray) -> None:
            try:
                for _ in range(20):
                    out = model.predict({"x": x, "token_ids": ids})["y"]
                    np.testing.assert_allclose(out, reference(x, ids), rtol=1e-5, atol=1e-5)
            except BaseException as e:  # collected for the main thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=case) for case in cases]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


def test_int8_io_quantized_from_manifest_scales(models: dict[str, bytes], keys: Keys, tmp_path: Path) -> None:
    runtime = {**INT8_RUNTIME, "int8_io": True, "quantization": io_quantization(models["int8"])}
    path = write_tflite_bundle(tmp_path / "int8.edgebundle", keys.private, models["int8"], (X,), (Y,), runtime)
    x = np.random.default_rng(2).uniform(-1, 1, (6, 4)).astype(np.float32)
    with device_runtime.load(path, keys.public) as model:
        out = model.predict({"x": x})["y"]  # floats in, floats out
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, x @ W, atol=0.05)


def test_int8_model_without_scales_in_the_manifest_is_refused(models: dict[str, bytes], keys: Keys,
                                                              tmp_path: Path) -> None:  # fmt: skip
    path = write_tflite_bundle(tmp_path / "noscale.edgebundle", keys.private, models["int8"], (X,), (Y,), INT8_RUNTIME)
    with pytest.raises(BackendError, match="the manifest says float32, the model takes int8"):
        device_runtime.load(path, keys.public)


def test_corrupt_signed_model_is_a_backend_error(keys: Keys, tmp_path: Path) -> None:
    path = write_tflite_bundle(tmp_path / "corrupt.edgebundle", keys.private, b"TFL3 not a flatbuffer" * 8, (X,),
                               (Y,), INT8_RUNTIME)  # fmt: skip
    with pytest.raises(BackendError, match=r"tflite cannot load model\.tflite"):
        device_runtime.load(path, keys.public)


def test_edgetpu_delegate_missing_is_a_clear_error(models: dict[str, bytes], keys: Keys, tmp_path: Path) -> None:
    runtime = {**FLOAT_RUNTIME, "delegates": ["edgetpu"]}
    path = write_tflite_bundle(tmp_path / "tpu.edgebundle", keys.private, models["float"], (X, IDS), (Y,), runtime)
    with pytest.raises(BackendError, match=r"Edge TPU.*libedgetpu\.so\.1"):
        device_runtime.load(path, keys.public)


def test_wrong_tensor_map_is_refused(models: dict[str, bytes], keys: Keys, tmp_path: Path) -> None:
    runtime = {"tensor_map": {"inputs": {"x": "args_0", "token_ids": "ids"}, "outputs": {"y": "output_0"}}}
    path = write_tflite_bundle(tmp_path / "map.edgebundle", keys.private, models["float"], (X, IDS), (Y,), runtime)
    with pytest.raises(BackendError, match="no tensor 'args_0'"):
        device_runtime.load(path, keys.public)


_BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        root = name.split(".")[0]
        if root in {missing!r}:
            raise ImportError(f"No module named {{name!r}} (blocked by the test)")
        if root in {broken!r}:  # what tflite-runtime 2.14 does under numpy 2
            raise AttributeError("_ARRAY_API not found")
        return None
sys.meta_path.insert(0, Block())
"""


def _run_blocked(missing: set[str], broken: set[str], body: str) -> subprocess.CompletedProcess[str]:
    code = _BLOCKER.format(missing=missing, broken=broken) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)


def test_runtime_fallback_order_in_a_subprocess(float_bundle: Path, keys: Keys) -> None:
    """No ai_edge_litert and a tflite_runtime broken by numpy 2: tensorflow.lite runs the bundle."""
    body = f"""
    import numpy as np, device_runtime
    from device_runtime.backends.tflite import import_interpreter
    print("picked", import_interpreter()[1])
    with device_runtime.load({str(float_bundle)!r}, {str(keys.public)!r}) as m:
        out = m.predict({{"x": np.ones((2, 4), np.float32), "token_ids": np.ones((2, 3), np.int64)}})["y"]
        print("runtime", m.backend_info["runtime"], out.shape)
    """
    done = _run_blocked({"ai_edge_litert"}, {"tflite_runtime"}, body)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "picked tensorflow" in done.stdout and "runtime tensorflow (2, 3)" in done.stdout


def test_no_runtime_names_the_extra(float_bundle: Path, keys: Keys) -> None:
    body = f"""
    import device_runtime
    from sdk.errors import BackendError
    try:
        device_runtime.load({str(float_bundle)!r}, {str(keys.public)!r})
    except BackendError as e:
        print("ERROR", e)
    """
    done = _run_blocked({"ai_edge_litert", "tensorflow"}, {"tflite_runtime"}, body)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install 'edgeship[tflite]'" in done.stdout
    assert "tflite-runtime: AttributeError: _ARRAY_API not found" in done.stdout


def test_backend_module_imports_no_runtime() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys, device_runtime.backends.tflite; "
         "print(sorted(m for m in ('ai_edge_litert', 'tensorflow', 'torch') if m in sys.modules))"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout.strip() == "[]", done.stderr
