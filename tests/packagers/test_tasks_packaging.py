"""The task/preprocessing contract the packager writes for transformers folders (manifest.preprocessing).

Device-side behaviour on the same kind of bundles is in tests/device_runtime/test_tasks_*.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packager_checks import assert_golden_healthy, open_bundle
from task_folders import LONG_TEXT, MAX_LENGTH, NER_LABELS, SENTENCES, image_folder, sample_images, text_folder
from transformers import AutoModelForTokenClassification, AutoTokenizer

from packagers import PackageOptions, package
from sdk.errors import PackagingError
from sdk.manifest import TensorSpec
from sdk.signing import TrustedKeys

FAST = PackageOptions(benchmark_runs=3, benchmark_warmup=1)


@pytest.fixture(scope="session")
def ner_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return text_folder(tmp_path_factory.mktemp("pkg-ner"), "token-classification")


@pytest.fixture(scope="session")
def vit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("pkg-vit"))


def test_token_classification_sentences_and_per_token_accuracy(
    ner_folder: Path, key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path
) -> None:
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join([*SENTENCES, "", LONG_TEXT]) + "\n", encoding="utf-8")
    # Per-token labels: the reference's own predictions with a few flipped, -100 on specials and padding.
    tokenizer = AutoTokenizer.from_pretrained(ner_folder)
    enc = tokenizer([*SENTENCES, LONG_TEXT], padding="longest", truncation=True, max_length=MAX_LENGTH,
                    return_tensors="pt", return_special_tokens_mask=True)  # fmt: skip
    hf = AutoModelForTokenClassification.from_pretrained(ner_folder).eval()
    with torch.no_grad():
        predicted = hf(**{k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits.argmax(-1)
    labels = predicted.numpy().copy()
    labels[:, 1] = (labels[:, 1] + 1) % len(NER_LABELS)  # the first word of each sentence is "wrong"
    labels[enc["special_tokens_mask"].numpy() == 1] = -100

    (result,) = package(ner_folder, name="ner", version=1, key=key, out_dir=tmp_path, calibration=sentences,
                        labels=labels, options=FAST)  # fmt: skip
    bundle = open_bundle(result, trust, tmp_path / "x")
    m = bundle.manifest
    assert m.task == "token-classification"
    assert m.outputs == (TensorSpec("logits", "float32", ("batch", "sequence", len(NER_LABELS))),)
    assert m.preprocessing["labels"] == list(NER_LABELS)
    tok = m.preprocessing["tokenizer"]
    assert {k: tok[k] for k in ("max_length", "truncation_side", "padding_side", "pad_token", "pad_id")} == {
        "max_length": MAX_LENGTH, "truncation_side": "right", "padding_side": "right", "pad_token": "[PAD]",
        "pad_id": 0,
    }  # fmt: skip
    assert tok["model_input_names"] == ["input_ids", "token_type_ids", "attention_mask"]
    assert tok["add_special_tokens"] is True and tok["padding"] == "longest"
    assert m.input_policy == {"nonfinite": "reject", "dims": {"sequence": [1, MAX_LENGTH]}}
    # The bundled tokenizer.json is the pipeline transformers ran (its decoder included), without call state.
    shipped = json.loads(bundle.path("tokenizer/tokenizer.json").read_bytes())
    assert shipped["decoder"]["type"] == "WordPiece" and shipped["truncation"] is None and shipped["padding"] is None
    v = m.validation
    assert v["data"] == f"{len(SENTENCES) + 1} calibration sentences through the bundled tokenizer"
    assert v["samples"] == len(SENTENCES) + 1
    scored = labels >= 0
    expected = float((predicted.numpy() == labels)[scored].mean())
    assert v["accuracy"]["output"] == "logits"
    assert v["accuracy"]["reference"] == pytest.approx(expected) and v["accuracy"]["drop"] == 0
    assert 0.5 < expected < 1.0
    assert_golden_healthy(bundle)


def test_image_classification_folder_of_images(
    vit_folder: Path, key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(sample_images(6)):
        image.save(images / f"{i:02d}.png")
    (result,) = package(vit_folder, name="vit", version=1, key=key, out_dir=tmp_path, calibration=images,
                        labels=np.arange(6) % 4, options=FAST)  # fmt: skip
    bundle = open_bundle(result, trust, tmp_path / "x")
    m = bundle.manifest
    assert m.task == "image-classification"
    assert m.inputs == (TensorSpec("pixel_values", "float32", ("batch", 3, 32, 32)),)
    assert m.outputs == (TensorSpec("logits", "float32", ("batch", 4)),)
    assert m.preprocessing["labels"] == ["cat", "dog", "bird", "fish"]
    image = m.preprocessing["image"]
    assert image["size"] == {"height": 32, "width": 32} and image["resample"] == 2
    assert image["rescale_factor"] == pytest.approx(1 / 255) and image["do_resize"] and image["do_normalize"]
    assert image["image_mean"] == [0.485, 0.456, 0.406] and image["image_std"] == [0.229, 0.224, 0.225]
    assert image["channels_first"] is True
    assert image["files"] == ["preprocessor/preprocessor_config.json"]
    assert (
        bundle.path("preprocessor/preprocessor_config.json").read_bytes()
        == (vit_folder / "preprocessor_config.json").read_bytes()
    )
    assert m.input_policy == {"nonfinite": "reject"}
    assert m.validation["data"] == "6 calibration images through the bundled image processor"
    assert set(m.validation["accuracy"]) == {"output", "reference", "bundle", "drop"}
    assert_golden_healthy(bundle)


def test_feature_extraction_pooling(
    tmp_path_factory: pytest.TempPathFactory, bert_feature_folder: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    st = text_folder(tmp_path_factory.mktemp("pkg-st"), "feature-extraction", sentence_transformers=True)
    (result,) = package(st, name="st", version=1, key=key, out_dir=tmp_path, options=FAST)
    assert result.manifest.preprocessing["pooling"] == {
        "mode": "cls", "normalize": True, "source": "1_Pooling/config.json",
    }  # fmt: skip
    assert result.manifest.preprocessing["tokenizer"]["max_length"] == MAX_LENGTH
    # A plain model folder: masked mean, unnormalised; no tokenizer: the sequence range is the positions.
    (plain,) = package(bert_feature_folder, name="plain", version=1, key=key, out_dir=tmp_path, options=FAST)
    assert plain.manifest.preprocessing == {"pooling": {"mode": "mean", "normalize": False, "source": "default"}}
    assert plain.manifest.input_policy["dims"] == {"sequence": [1, 64]}


def test_refusals(
    ner_folder: Path, vit_folder: Path, bert_feature_folder: Path, key: Ed25519PrivateKey, tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    out = tmp_path / "out"
    sentences = tmp_path / "s.txt"
    sentences.write_text("one sentence\n", encoding="utf-8")
    with pytest.raises(PackagingError, match="calibration for image-classification must be a folder of images"):
        package(vit_folder, name="x", version=1, key=key, out_dir=out, calibration=sentences)
    with pytest.raises(PackagingError, match="calibration sentences need a tokenizer"):
        package(bert_feature_folder, name="x", version=1, key=key, out_dir=out, calibration=sentences)
    module = torch.nn.Linear(4, 2)
    with pytest.raises(PackagingError, match="calibration for transformers folders"):
        package(module, name="x", version=1, key=key, out_dir=out, calibration=sentences,
                example_inputs=(np.zeros((1, 4), np.float32),))  # fmt: skip
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(PackagingError, match="holds no sentence"):
        package(ner_folder, name="x", version=1, key=key, out_dir=out, calibration=blank)
    with pytest.raises(PackagingError, match=r"labels have shape \[1\]"):
        package(ner_folder, name="x", version=1, key=key, out_dir=out, calibration=sentences, labels=[0])
    with pytest.raises(PackagingError, match=r"valid tasks: .*token-classification, image-classification"):
        package(ner_folder, name="x", version=1, key=key, out_dir=out, task="summarization")
    with pytest.raises(PackagingError, match="cannot load the image-classification model"):
        package(ner_folder, name="x", version=1, key=key, out_dir=out, task="image-classification")
    crop = {"do_center_crop": True, "crop_size": {"height": 24, "width": 24}}
    cropped = image_folder(tmp_path_factory.mktemp("pkg-crop"), **crop)
    with pytest.raises(PackagingError, match="without center crop"):
        package(cropped, name="x", version=1, key=key, out_dir=out)
    (cropped / "preprocessor_config.json").unlink()
    with pytest.raises(PackagingError, match=r"no preprocessor_config\.json"):
        package(cropped, name="x", version=1, key=key, out_dir=out)
    assert not out.exists()
