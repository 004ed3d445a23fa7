"""Packaging transformers folders (tiny BERTs from configs) for onnxruntime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packager_checks import assert_golden_healthy, min_cosine, open_bundle, run
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from packagers import package
from sdk.errors import PackagingError
from sdk.manifest import TensorSpec
from sdk.signing import TrustedKeys

TEXT_INPUTS = tuple(
    TensorSpec(n, "int64", ("batch", "sequence")) for n in ("input_ids", "attention_mask", "token_type_ids")
)


def _ids(batch: int, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 100, size=(batch, length)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, length // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _torch_ref(model: torch.nn.Module, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return out[output].numpy()


def test_feature_extraction_fp32_and_int8(
    bert_feature_folder: Path,
    key: Ed25519PrivateKey,
    trust: TrustedKeys,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # the quantization tools must not drop debug files into the current directory
    results = package(bert_feature_folder, name="tiny-bert", version=1, key=key, out_dir=tmp_path,
                      precision=["fp32", "int8-dynamic"])  # fmt: skip
    model = AutoModel.from_pretrained(bert_feature_folder, local_files_only=True).eval()
    feeds = _ids(3, 11, seed=5)  # batch and length differ from the validation data: dims are dynamic
    ref = _torch_ref(model, feeds, "last_hidden_state")
    sizes = {}
    for result in results:
        bundle = open_bundle(result, trust, tmp_path / result.precision)
        m = bundle.manifest
        assert m.task == "feature-extraction"
        assert m.inputs == TEXT_INPUTS
        assert m.outputs == (TensorSpec("last_hidden_state", "float32", ("batch", "sequence", 32)),)
        assert "tokenizer" not in m.preprocessing  # no tokenizer in this folder
        assert not any(f.path.startswith("tokenizer/") for f in m.files)
        v = m.validation
        assert v["passed"] and v["data"].startswith("random token ids")
        assert v["metrics"]["last_hidden_state"]["cosine_mean"] >= 0.99
        assert "top1_agreement" not in v["metrics"]["last_hidden_state"]
        assert v["padding"] == {"masked_by": "attention_mask", "outputs": ["last_hidden_state"],
                                "rule": "token-level outputs scored only where attention_mask != 0"}  # fmt: skip
        assert_golden_healthy(bundle)
        out = run(bundle, feeds)["last_hidden_state"]
        assert out.shape == (3, 11, 32)
        assert min_cosine(ref, out) > (0.99999 if result.precision == "fp32" else 0.99)
        sizes[result.precision] = m.file("model.onnx").size
        build = json.loads(bundle.path("report.json").read_bytes())["build"]
        assert build["export"]["exporter"] == "torchscript"
        if result.precision == "int8-dynamic":
            quant = build["quantization"]
            assert quant["pre_process"]["applied"] and quant["weight_type"] == "QInt8"
            assert quant["pre_process"]["symbolic_shape_inference"] is False  # incomplete on BERT graphs
            assert quant["per_channel"] == m.runtime["quantization"]["per_channel"]
    assert sizes["int8-dynamic"] < 0.8 * sizes["fp32"]
    assert list(cwd.iterdir()) == []


def test_text_classification_with_tokenizer(
    bert_cls_folder: Path, key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path
) -> None:
    results = package(str(bert_cls_folder), name="tiny-cls", version=2, key=key, out_dir=tmp_path,
                      precision=["fp32", "int8-dynamic"])  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(bert_cls_folder, local_files_only=True).eval()
    for result in results:
        bundle = open_bundle(result, trust, tmp_path / result.precision)
        m = bundle.manifest
        assert m.task == "text-classification"
        assert m.inputs == TEXT_INPUTS
        assert m.outputs == (TensorSpec("logits", "float32", ("batch", 3)),)
        tok = m.preprocessing["tokenizer"]
        assert "tokenizer/tokenizer.json" in tok["files"] and tok["max_length"] == 64
        assert all(bundle.path(f).is_file() for f in tok["files"])
        assert m.preprocessing["labels"] == ["negative", "neutral", "positive"]
        v = m.validation
        assert v["passed"] and "tokenizer" in v["data"] and v["samples"] == 16
        assert v["metrics"]["logits"]["top1_agreement"] >= 0.9
        assert_golden_healthy(bundle)
        # A device-side round trip: the bundled tokenizer feeds the bundled model.
        tokenizer = AutoTokenizer.from_pretrained(bundle.root / "tokenizer")
        enc = tokenizer(["a brand new sentence", "the cat"], padding=True, return_tensors="np")
        feeds = {t.name: enc[t.name].astype(np.int64) for t in m.inputs}
        out = run(bundle, feeds)["logits"]
        ref = _torch_ref(model, feeds, "logits")
        assert out.shape == (2, 3)
        assert min_cosine(ref, out) > (0.99999 if result.precision == "fp32" else 0.99)
    assert results[1].manifest.runtime["quantization"]["method"] == "dynamic"


def test_task_override_and_labels(bert_cls_folder: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    # The classifier folder packaged as feature extraction: the encoder's hidden states.
    (result,) = package(bert_cls_folder, name="enc", version=1, key=key, out_dir=tmp_path, task="feature-extraction")
    assert result.manifest.task == "feature-extraction"
    assert result.manifest.outputs[0].name == "last_hidden_state"
    assert "labels" not in result.manifest.preprocessing
    # Labels with calibration ids give task accuracy on both models.
    feeds = _ids(12, 9, seed=1)
    (scored,) = package(bert_cls_folder, name="cls", version=1, key=key, out_dir=tmp_path, calibration=feeds,
                        labels=np.arange(12) % 3)  # fmt: skip
    acc = scored.validation["accuracy"]
    assert acc["output"] == "logits" and acc["reference"] == acc["bundle"]
    assert scored.validation["data"] == "calibration"


def test_bad_folders(bert_feature_folder: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    empty = tmp_path / "no-config"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(PackagingError, match=r"config\.json"):
        package(empty, name="x", version=1, key=key, out_dir=tmp_path / "out")
    broken = tmp_path / "broken"
    shutil.copytree(bert_feature_folder, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"this is not a safetensors file")
    with pytest.raises(PackagingError, match="cannot load"):
        package(broken, name="x", version=1, key=key, out_dir=tmp_path / "out")
    with pytest.raises(PackagingError, match="valid tasks: feature-extraction, text-classification"):
        package(bert_feature_folder, name="x", version=1, key=key, out_dir=tmp_path / "out", task="translation")
    with pytest.raises(PackagingError, match="example_inputs are for torch modules"):
        package(bert_feature_folder, name="x", version=1, key=key, out_dir=tmp_path / "out",
                example_inputs=(np.zeros((1, 4), np.int64),))  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_exported_text_onnx_file(bert_cls_folder: Path, key: Ed25519PrivateKey, trust: TrustedKeys,
                                 tmp_path: Path) -> None:  # fmt: skip
    """A BERT exported to .onnx elsewhere: random ids stay inside the embedding table found in the graph."""
    first = package(bert_cls_folder, name="src", version=1, key=key, out_dir=tmp_path / "a")[0]
    src = open_bundle(first, trust, tmp_path / "src").path("model.onnx")
    assert {n.op_type for n in onnx.load(str(src)).graph.node} >= {"Gather"}
    results = package(src, name="from-onnx", version=1, key=key, out_dir=tmp_path / "b",
                      precision=["fp32", "int8-dynamic"])  # fmt: skip
    for result in results:
        m = result.manifest
        assert m.inputs == TEXT_INPUTS
        assert m.validation["passed"] and m.validation["reference"].endswith("fp32 (original .onnx)")
        assert m.runtime["exporter"] == "given"


def test_packaging_a_folder_prints_only_edgeship_lines(
    bert_cls_folder: Path, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    """`edgeship package FOLDER` in a fresh process (where transformers, torchao and torch are first imported)
    prints progress lines and the table, none of the libraries' noise (torchao's CUDA kernels, torch's pytree
    deprecations, weight-loading bars); and the loggers it turned down are restored afterwards."""
    import os
    import subprocess
    import sys

    script = (
        "import logging, sys\n"
        "from sdk.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "levels = {n: logging.getLogger(n).level for n in ('torchao', 'transformers', 'torch.utils._pytree', '')}\n"
        "print('levels', sorted(levels.items()), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    argv = [str(bert_cls_folder), "--key", str(keypair[0]), "--name", "quiet", "--version", "1", "--out",
            str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script, "package", *argv], capture_output=True, text=True,
                          timeout=300, env=env, cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-1].startswith("levels ["), lines
    noise = [line for line in lines[:-1] if not line.startswith("[")]
    assert noise == [], noise
    assert "('torchao', 0)" in lines[-1] and "('transformers', " in lines[-1], lines[-1]
