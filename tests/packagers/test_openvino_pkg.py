"""The OpenVINO target: every (input kind, precision) it declares once, on tiny models; refusals.

Each bundle is read back and verified like a device would, run through ``device_runtime.load`` on
fresh data against the original model within the bundle's tolerances, and health-checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from openvino_parts import check_bundle, run_on_device
from packager_checks import Digits, open_bundle

from packagers import PackageOptions, package
from packagers.options import Precision
from packagers.registry import capabilities, capability_table
from sdk.errors import PackagingError
from sdk.signing import TrustedKeys

SUPPORTED = ("fp32", "fp16", "int8", "int8-weights", "int4")
# Not among the packager's built-in validation sentences: fresh text from the same kind of distribution.
FRESH_SENTENCES = [
    "The lazy cat loved the quick data.",
    "Small devices have wonderful models!",
    "Is this the worst film you ever had?",
    "Hello, edge world.",
    "I run close to the mat over the dog.",
    "The acting was a service to the fox.",
]


def _torch(model: torch.nn.Module, *arrays: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(*[torch.from_numpy(a) for a in arrays]).numpy()


def _bert_inputs(n: int, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 100, size=(n, length)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[::2, length - 3 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@pytest.fixture(scope="module")
def bert_onnx(bert_feature_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT exported by hand to an .onnx file with named dynamic batch and sequence dims."""
    from transformers import BertModel

    model = BertModel.from_pretrained(bert_feature_folder).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    path = tmp_path_factory.mktemp("bert-onnx") / "bert.onnx"
    example = tuple(torch.from_numpy(v) for v in _bert_inputs(2, 8, 0).values())
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    with torch.no_grad():
        torch.onnx.export(Wrapper().eval(), example, str(path), input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
    return path


def test_capabilities_declared() -> None:
    caps = capabilities("openvino")
    assert [p.value for p in caps.precisions] == list(SUPPORTED)
    assert caps.input_kinds == ("torch", "transformers", "onnx") and caps.dynamic_shapes is True
    rows = {row[0]: row for row in capability_table()[1]}
    assert rows["openvino"][1] == ", ".join(SUPPORTED)


@pytest.mark.parametrize("precision", [p.value for p in Precision if p.value not in SUPPORTED])
def test_unsupported_precisions_are_refused_before_any_work(
    precision: str, mlp: torch.nn.Module, bert_cls_folder: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    for model in (mlp, bert_cls_folder):
        lines: list[str] = []
        with pytest.raises(PackagingError, match=f"target openvino does not support precision {precision}; "
                                                 f"valid precisions: {', '.join(SUPPORTED)}"):  # fmt: skip
            package(model, name="m", version=1, key=key, out_dir=tmp_path / "out", target="openvino",
                    precision=["fp32", precision], example_inputs=(torch.zeros(2, 64),) if model is mlp else None,
                    progress=lines.append)  # fmt: skip
        assert lines == [] and not (tmp_path / "out").exists()


def test_torch_cnn_fp32_fp16_int8_int8_weights(
    cnn: torch.nn.Module, digits: Digits, key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path
) -> None:
    images = digits.x_val.reshape(-1, 1, 8, 8)
    results = package(
        cnn, name="digits-cnn", version=2, key=key, out_dir=tmp_path / "out", target="openvino",
        precision=["fp32", "fp16", "int8", "int8-weights"], example_inputs=(torch.from_numpy(images[:2]),),
        calibration={"input": images}, labels=digits.y_val,
    )  # fmt: skip
    fresh = digits.x[1600:1700].reshape(-1, 1, 8, 8)
    reference = {"output": _torch(cnn, fresh)}
    for i, result in enumerate(results):
        weights = check_bundle(result, trust, tmp_path / f"b{i}")
        v = result.validation
        assert v["accuracy"]["reference"] > 0.8 and v["accuracy"]["drop"] <= 0.03
        numbers = run_on_device(result, trust, {"input": fresh}, reference)
        report = json.loads(open_bundle(result, trust, tmp_path / f"r{i}").path("report.json").read_bytes())
        assert report["build"]["ir"]["weights"] == weights and report["build"]["export"]["exporter"] == "torchscript"
        if result.precision == "fp32":
            assert set(weights) == {"fp32"} and numbers["output"]["max_rel_diff"] < 1e-5
        elif result.precision == "fp16":
            assert weights.get("fp16") and "fp32" not in weights
        elif result.precision == "int8":
            quant = report["build"]["quantization"]
            assert quant["calibration_samples"] == len(images) and quant["model_type"] == "default"
            assert weights.get("int8") == 3 and result.manifest.runtime["quantization"]["method"] == "static"
            assert v["metrics"]["output"]["top1_agreement"] >= 0.95 and v["metrics"]["output"]["cosine_mean"] > 0.99
        else:
            assert weights.get("int8") == 3 and result.manifest.runtime["quantization"]["mode"] == "INT8_ASYM"


def test_torch_int4_compresses_matmuls_and_refuses_a_cnn(
    mlp: torch.nn.Module, cnn: torch.nn.Module, digits: Digits, key: Ed25519PrivateKey, trust: TrustedKeys,
    tmp_path: Path,
) -> None:  # fmt: skip
    [result] = package(
        mlp, name="digits-mlp", version=1, key=key, out_dir=tmp_path / "out", target="openvino", precision="int4",
        example_inputs=(torch.from_numpy(digits.x_train[:2]),), calibration={"input": digits.x_val},
        labels=digits.y_val,
    )  # fmt: skip
    weights = check_bundle(result, trust, tmp_path / "b")
    # NNCF keeps the last layer in int8 (its backup precision) and the first in 4 bits.
    assert weights == {"int4": 1, "int8": 1}
    quant = json.loads(open_bundle(result, trust, tmp_path / "r").path("report.json").read_bytes())["build"]
    assert quant["quantization"]["mode"] == "INT4_SYM" and quant["quantization"]["weights"] == weights
    assert result.validation["accuracy"]["drop"] <= 0.05
    run_on_device(result, trust, {"input": digits.x[1600:1700]}, {"output": _torch(mlp, digits.x[1600:1700])})

    images = digits.x_val.reshape(-1, 1, 8, 8)
    with pytest.raises(PackagingError, match=r"NNCF compressed no weight of this model to 4 bits.*use int8-weights"):
        package(cnn, name="digits-cnn", version=1, key=key, out_dir=tmp_path / "cnn", target="openvino",
                precision="int4", example_inputs=(torch.from_numpy(images[:2]),))  # fmt: skip
    assert not (tmp_path / "cnn").exists()


def test_transformers_text_classification_and_feature_extraction(
    bert_cls_folder: Path, bert_feature_folder: Path, key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    cls = package(bert_cls_folder, name="bert-cls", version=1, key=key, out_dir=tmp_path / "out", target="openvino",
                  precision=["fp32", "int8", "int8-weights"],
                  options=PackageOptions(allow_random_calibration=True))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(bert_cls_folder)
    enc = tokenizer(FRESH_SENTENCES, padding="longest", return_tensors="np")
    fresh = {k: np.asarray(enc[k], dtype=np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        torch_cls = BertForSequenceClassification.from_pretrained(bert_cls_folder).eval()
        logits = torch_cls(**{k: torch.from_numpy(v) for k, v in fresh.items()}).logits.numpy()
    for i, result in enumerate(cls):
        m = result.manifest
        assert [s.name for s in m.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
        assert all(s.dtype == "int64" and s.shape == ("batch", "sequence") for s in m.inputs)
        assert m.task == "text-classification" and m.preprocessing["labels"] == ["negative", "neutral", "positive"]
        assert "tokenizer/tokenizer.json" in {f.path for f in m.files}
        weights = check_bundle(result, trust, tmp_path / f"c{i}")
        run_on_device(result, trust, fresh, {"logits": logits})
        if result.precision == "int8":
            quant = m.runtime["quantization"]
            assert quant["method"] == "static" and weights.get("int8", 0) >= 12
            assert m.validation["metrics"]["logits"]["top1_agreement"] >= 0.9

    feat = package(bert_feature_folder, name="bert-feat", version=1, key=key, out_dir=tmp_path / "out",
                   target="openvino", precision=["fp16", "int4"])  # fmt: skip
    with torch.no_grad():
        torch_feat = BertModel.from_pretrained(bert_feature_folder).eval()
        hidden = torch_feat(**{k: torch.from_numpy(v) for k, v in fresh.items()}).last_hidden_state.numpy()
    for i, result in enumerate(feat):
        assert result.manifest.outputs[0].shape == ("batch", "sequence", 32)
        weights = check_bundle(result, trust, tmp_path / f"f{i}")
        run_on_device(result, trust, fresh, {"last_hidden_state": hidden})
        if result.precision == "int4":
            # Hidden size 32 < group size 128: NNCF adjusted the group to 32; embeddings stay int8.
            assert weights == {"int4": 11, "int8": 4}  # 2 x 6 MatMuls but the last; 3 embeddings + it


def test_onnx_file_every_precision(bert_onnx: Path, key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path) -> None:
    import onnxruntime as ort

    results = package(bert_onnx, name="bert-onnx", version=1, key=key, out_dir=tmp_path / "out", target="openvino",
                      precision=list(SUPPORTED),
                      options=PackageOptions(validation_samples=24, allow_random_calibration=True))  # fmt: skip
    assert [r.precision for r in results] == list(SUPPORTED)
    fresh = _bert_inputs(5, 9, seed=7)
    session = ort.InferenceSession(str(bert_onnx), providers=["CPUExecutionProvider"])
    reference = {"last_hidden_state": session.run(["last_hidden_state"], fresh)[0]}
    for i, result in enumerate(results):
        m = result.manifest
        assert m.inputs[0].shape == ("batch", "sequence") and m.runtime["exporter"] == "given"
        weights = check_bundle(result, trust, tmp_path / f"b{i}")
        run_on_device(result, trust, fresh, reference)
        expected = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int8-weights": "int8", "int4": "int4"}
        assert weights.get(expected[result.precision], 0) > 0
        if result.precision == "int8":  # attention found in a plain .onnx file: NNCF's transformer recipe
            report = json.loads(open_bundle(result, trust, tmp_path / f"r{i}").path("report.json").read_bytes())
            assert report["build"]["quantization"]["model_type"] == "transformer"
