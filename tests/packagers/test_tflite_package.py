"""TFLite target: every supported (input kind, precision) once, bundles run in the real LiteRT runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packager_checks import Digits
from tflite_parts import check_bundle, keras_cnn

import device_runtime
from packagers import package
from packagers.options import PackageOptions
from packagers.registry import capabilities
from packagers.sources import detect_input_kind
from sdk.errors import InputError, PackagingError
from sdk.signing import TrustedKeys

PRECISIONS = ["fp32", "fp16", "int8-dynamic", "int8"]
# worst per-sample cosine against the reference on held-out digits, per precision
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8-dynamic": 0.99, "int8": 0.95}


@pytest.fixture(scope="session")
def keras_model(digits: Digits) -> Any:
    return keras_cnn(digits.x_train.reshape(-1, 8, 8, 1), digits.y_train)


@pytest.fixture(scope="session")
def cnn_bundles(cnn: torch.nn.Module, digits: Digits, key: Ed25519PrivateKey,
                tmp_path_factory: pytest.TempPathFactory) -> list[Any]:  # fmt: skip
    x = digits.x_val.reshape(-1, 1, 8, 8)
    return package(cnn, name="cnn", version=1, key=key, out_dir=tmp_path_factory.mktemp("tfl-cnn"), target="tflite",
                   precision=PRECISIONS, example_inputs=(torch.from_numpy(x[:2]),), calibration={"input": x[:64]},
                   labels=digits.y_val[:64])  # fmt: skip


@pytest.fixture(scope="session")
def keras_bundles(keras_model: Any, digits: Digits, key: Ed25519PrivateKey,
                  tmp_path_factory: pytest.TempPathFactory) -> list[Any]:  # fmt: skip
    x = digits.x_val.reshape(-1, 8, 8, 1)
    return package(keras_model, name="kcnn", version=1, key=key, out_dir=tmp_path_factory.mktemp("tfl-keras"),
                   target="tflite", precision=PRECISIONS, calibration={"pixels": x[:64]},
                   labels=digits.y_val[:64])  # fmt: skip


@pytest.mark.parametrize("index", range(len(PRECISIONS)), ids=PRECISIONS)
def test_torch_cnn_each_precision(cnn_bundles: list[Any], index: int, cnn: torch.nn.Module, digits: Digits,
                                  trust: TrustedKeys) -> None:  # fmt: skip
    result = cnn_bundles[index]
    m = result.manifest
    assert m.precision == PRECISIONS[index]
    # litert-torch renamed the input to args_0; the manifest keeps the user's name and a fixed batch of 1
    assert [(s.name, s.dtype, s.shape) for s in m.inputs] == [("input", "float32", (1, 1, 8, 8))]
    assert [(s.name, s.shape) for s in m.outputs] == [("output", (1, 10))]
    assert m.runtime["tensor_map"] == {"inputs": {"input": "args_0"}, "outputs": {"output": "output_0"}}
    assert m.runtime["package"] == "ai-edge-litert" and "quantization" not in m.runtime
    assert result.validation["accuracy"]["drop"] <= 0.03
    x = digits.x_val[:64].reshape(-1, 1, 8, 8)
    with torch.no_grad():
        ref = cnn(torch.from_numpy(x)).numpy()
    check_bundle(result, trust, {"input": x}, {"output": ref}, MIN_COSINE[m.precision])


def test_torch_fixed_batch_refuses_other_batches(cnn_bundles: list[Any], trust: TrustedKeys) -> None:
    with device_runtime.load(cnn_bundles[0].bundle_path, trust) as model, pytest.raises(InputError):
        model.predict({"input": np.zeros((2, 1, 8, 8), np.float32)})


@pytest.mark.parametrize("index", range(len(PRECISIONS)), ids=PRECISIONS)
def test_keras_each_precision(keras_bundles: list[Any], index: int, keras_model: Any, digits: Digits,
                              trust: TrustedKeys) -> None:  # fmt: skip
    result = keras_bundles[index]
    m = result.manifest
    assert m.precision == PRECISIONS[index] and m.validation["reference"].startswith("tensorflow")
    # the converted model keeps a dynamic batch (shape_signature -1): the manifest says so, the runtime resizes
    assert [(s.name, s.dtype, s.shape) for s in m.inputs] == [("pixels", "float32", ("batch", 8, 8, 1))]
    assert [(s.name, s.shape) for s in m.outputs] == [("logits", ("batch", 10))]
    assert m.runtime["tensor_map"] == {"inputs": {"pixels": "pixels"}, "outputs": {"logits": "output_0"}}
    x = digits.x_val[:64].reshape(-1, 8, 8, 1)
    ref = np.asarray(keras_model(x, training=False))
    check_bundle(result, trust, {"pixels": x}, {"logits": ref}, MIN_COSINE[m.precision])


@pytest.mark.parametrize("kind", ["torch", "keras"])
def test_int8_io_bundle_predicts_from_floats(
    kind: str,
    cnn: torch.nn.Module,
    keras_model: Any,
    digits: Digits,
    key: Ed25519PrivateKey,
    trust: TrustedKeys,
    tmp_path: Path,
) -> None:
    opts = PackageOptions(extra={"int8_io": True})
    if kind == "torch":
        x, name = digits.x_val[:64].reshape(-1, 1, 8, 8), "input"
        with torch.no_grad():
            ref = cnn(torch.from_numpy(x)).numpy()
        model: Any = cnn
        extra: dict[str, Any] = {"example_inputs": (torch.from_numpy(x[:1]),)}
    else:
        x, name = digits.x_val[:64].reshape(-1, 8, 8, 1), "pixels"
        ref, model, extra = np.asarray(keras_model(x, training=False)), keras_model, {}
    (result,) = package(model, name=f"{kind}-int8io", version=1, key=key, out_dir=tmp_path, target="tflite",
                        precision="int8", calibration={name: x}, options=opts, **extra)  # fmt: skip
    runtime = result.manifest.runtime
    assert runtime["int8_io"] is True
    quant = runtime["quantization"]
    out_name = result.manifest.outputs[0].name
    assert quant["inputs"][name]["dtype"] == "int8" and quant["inputs"][name]["scale"] > 0
    assert quant["outputs"][out_name]["dtype"] == "int8"
    assert result.manifest.inputs[0].dtype == "float32"  # callers pass floats; the device quantizes
    worst = check_bundle(result, trust, {name: x}, {out_name: ref}, MIN_COSINE["int8"])
    assert worst[out_name] >= 0.95


def test_bert_transformers_all_precisions(bert_feature_folder: Path, key: Ed25519PrivateKey, trust: TrustedKeys,
                                          tmp_path: Path) -> None:  # fmt: skip
    """One litert-torch conversion (about 30 s here) feeds every precision; int64 ids become int32 in the model."""
    results = package(bert_feature_folder, name="bert", version=1, key=key, out_dir=tmp_path, target="tflite",
                      precision=PRECISIONS,
                      options=PackageOptions(validation_samples=8, allow_random_calibration=True))  # fmt: skip
    for result in results:
        m = result.manifest
        assert [(s.name, s.dtype, s.shape) for s in m.inputs] == [
            (n, "int64", (1, 16)) for n in ("input_ids", "attention_mask", "token_type_ids")
        ]
        assert m.runtime["tensor_map"]["inputs"] == {"input_ids": "args_0", "attention_mask": "args_1",
                                                     "token_type_ids": "args_2"}  # fmt: skip
        assert "dims" not in m.input_policy  # the sequence is fixed at 16, no range left to police
        with device_runtime.load(result.bundle_path, trust) as model:
            model.health_check()
            ids = np.full((1, 16), 2**40, np.int64)
            with pytest.raises(InputError, match="int32"):
                model.predict({"input_ids": ids, "attention_mask": ids, "token_type_ids": ids})


def test_keras_file_and_saved_model(keras_model: Any, digits: Digits, key: Ed25519PrivateKey, trust: TrustedKeys,
                                    tmp_path: Path) -> None:  # fmt: skip
    keras_file = tmp_path / "model.keras"
    keras_model.save(keras_file)
    saved = tmp_path / "saved"
    keras_model.export(str(saved), verbose=False)
    assert detect_input_kind(keras_file) == detect_input_kind(saved) == detect_input_kind(keras_model) == "keras"
    x = digits.x_val[:32].reshape(-1, 8, 8, 1)
    ref = np.asarray(keras_model(x, training=False))
    (from_file,) = package(keras_file, name="kfile", version=1, key=key, out_dir=tmp_path / "a", target="tflite",
                           precision="fp32", calibration={"pixels": x})  # fmt: skip
    check_bundle(from_file, trust, {"pixels": x}, {"logits": ref}, 0.9999)
    (from_saved,) = package(saved, name="ksaved", version=1, key=key, out_dir=tmp_path / "b", target="tflite",
                            precision="fp32", calibration={"pixels": x})  # fmt: skip
    assert from_saved.manifest.outputs[0].name == "output_0"  # a bare SavedModel names its outputs itself
    check_bundle(from_saved, trust, {"pixels": x}, {"output_0": ref}, 0.9999)


def test_capabilities_and_refusals(tmp_path: Path, key: Ed25519PrivateKey, mlp: torch.nn.Module) -> None:
    caps = capabilities("tflite")
    assert [p.value for p in caps.precisions] == PRECISIONS
    assert caps.input_kinds == ("torch", "transformers", "keras") and not caps.dynamic_shapes
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not read: refused before any work")
    with pytest.raises(PackagingError, match="cannot build from a onnx model; valid input kinds: torch"):
        package(onnx_file, name="x", version=1, key=key, out_dir=tmp_path, target="tflite")
    for precision in ("int4", "int8-weights", "int4-palette"):
        with pytest.raises(PackagingError, match="valid precisions: fp32, fp16, int8-dynamic, int8"):
            package(mlp, name="x", version=1, key=key, out_dir=tmp_path, target="tflite", precision=precision,
                    example_inputs=(torch.zeros(1, 64),))  # fmt: skip
    with pytest.raises(PackagingError, match="int8_io'] needs precision int8"):
        package(mlp, name="x", version=1, key=key, out_dir=tmp_path, target="tflite", precision="fp16",
                example_inputs=(torch.zeros(1, 64),), options=PackageOptions(extra={"int8_io": True}))  # fmt: skip
    assert not any(tmp_path.glob("*.edgebundle"))


def test_text_classifier_with_fixed_sequence_runs_from_text(
    bert_cls_folder: Path, key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path
) -> None:
    """Without buckets (the bundles before them) the sequence is fixed: the device pads and truncates to exactly it,
    and a list of texts runs one at a time on the batch-1 model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from device_runtime import EdgeModelForSequenceClassification
    from device_runtime.tasks import TruncationWarning

    (result,) = package(bert_cls_folder, name="cls", version=1, key=key, out_dir=tmp_path, target="tflite",
                        precision="fp32", options=PackageOptions(validation_samples=4,
                                                                 extra={"seq_buckets": False}))  # fmt: skip
    assert "buckets" not in result.manifest.runtime
    length = result.manifest.inputs[0].shape[1]
    assert isinstance(length, int)
    texts = ["a short one", " ".join(["word"] * 200)]  # shorter than, and far longer than, the fixed length
    tokenizer = AutoTokenizer.from_pretrained(bert_cls_folder)
    hf = AutoModelForSequenceClassification.from_pretrained(bert_cls_folder).eval()
    with torch.no_grad():
        expected = hf(**tokenizer(texts, truncation=True, max_length=length, padding=True, return_tensors="pt")).logits
    model = EdgeModelForSequenceClassification.from_bundle(result.bundle_path, trust=trust)
    try:
        got = np.concatenate([model(text).logits for text in texts])  # fixed batch of 1
        with pytest.warns(TruncationWarning, match="1 of 2 texts were cut"):
            together = model(texts).logits  # a list on a batch-1 bundle: one text at a time, not an InputError
        assert model.model.metrics.truncated_texts >= 2
    finally:
        model.close()
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(together, got, atol=1e-6)
