"""Tiny transformers folders for every task, built from configs with random weights (nothing downloaded).

Shared by tests/packagers/test_tasks_*.py and tests/device_runtime/test_tasks_*.py (the latter load
this file by path: test folders are not packages).
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASK_WORDS = (
    "the quick brown fox jumps over lazy dog edge devices run small models close to data i loved this film "
    "acting was wonderful worst service have ever had is a cat sat on mat hello world paris berlin anna "
    "visited cafe naive resume in and with from"
).split()
MAX_LENGTH = 16  # the tokenizer's model_max_length: short, so truncation is easy to exercise
NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
IMAGE_LABELS = ("cat", "dog", "bird", "fish")
SENTENCES = [
    "Anna visited Paris and Berlin.",
    "The quick brown fox jumps over the lazy dog!",
    "Café, naïve résumé?",  # accents are stripped by the BERT normalizer
    "I loved this film, the acting was wonderful.",
    "Worst service I have ever had...",
    "Hello world",
    "A cat sat on the mat; a dog ran.",
    "zzz xylophone in 2024",  # words spelt letter by letter, and an unknown one ([UNK])
]
LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)  # far over MAX_LENGTH tokens


def wordpiece_vocab(
    words: Sequence[str] = TASK_WORDS, punctuation: str = ".,!?;", size: int | None = None
) -> dict[str, int]:
    """Special tokens, ``punctuation``, letters and ``##`` letters, then ``words``: the first ``size`` of them."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *punctuation]
    tokens += list(string.ascii_lowercase) + [f"##{c}" for c in string.ascii_lowercase]
    tokens += [w for w in dict.fromkeys(words) if w not in tokens]
    return {t: i for i, t in enumerate(tokens[:size])}


VOCAB_SIZE = len(wordpiece_vocab())


def write_tokenizer(
    folder: Path, vocab: dict[str, int] | None = None, *, max_length: int = MAX_LENGTH, decoder: bool = True
) -> None:
    """A WordPiece tokenizer (``vocab``, default ``wordpiece_vocab()``) saved as transformers saves BERT's."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = vocab if vocab is not None else wordpiece_vocab()
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    if decoder:
        tok.decoder = decoders.WordPiece(prefix="##")
    fast = BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=max_length,
    )  # fmt: skip
    fast.save_pretrained(folder)


def bert_config(vocab_size: int = VOCAB_SIZE, **extra: Any) -> Any:
    """A tiny BertConfig (2 layers, hidden 32)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, **extra,
    )  # fmt: skip


def _labels(names: tuple[str, ...]) -> dict[str, Any]:
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }


def text_folder(folder: Path, task: str, *, sentence_transformers: bool = False) -> Path:
    """A tiny BERT for ``task`` with its tokenizer; ``sentence_transformers`` adds CLS pooling + Normalize."""
    import torch
    import transformers

    torch.manual_seed({"feature-extraction": 0, "text-classification": 1, "token-classification": 2}[task])
    if task == "feature-extraction":
        model = transformers.BertModel(bert_config())
    elif task == "text-classification":
        model = transformers.BertForSequenceClassification(bert_config(**_labels(("negative", "neutral", "positive"))))
    else:
        model = transformers.BertForTokenClassification(bert_config(**_labels(NER_LABELS)))
    model.save_pretrained(folder)
    write_tokenizer(folder)
    if sentence_transformers:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        (folder / "modules.json").write_text(json.dumps(modules))
        (folder / "1_Pooling").mkdir()
        pooling = {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False,
                   "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}  # fmt: skip
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
        (folder / "2_Normalize").mkdir()
    return folder


def image_folder(folder: Path, **processor: Any) -> Path:
    """A tiny ViT classifier on 32x32 images with a PIL ViT image processor (``processor`` overrides)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    torch.manual_seed(3)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, initializer_range=0.2, **_labels(IMAGE_LABELS),
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    settings = {"size": {"height": 32, "width": 32}, "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225], **processor}  # fmt: skip
    ViTImageProcessorPil(**settings).save_pretrained(folder)
    return folder


def sample_images(n: int = 6, seed: int = 0) -> list[Any]:
    """RGB PIL images of varied sizes (and one grayscale, one RGBA): they exercise resize and conversion."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h, w = int(rng.integers(12, 80)), int(rng.integers(12, 80))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx * yy) % 256], axis=-1)
        pixels = np.clip(base + rng.normal(0, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, mode="RGB")
        images.append(image.convert("L") if i == 1 else image.convert("RGBA") if i == 2 else image)
    return images
