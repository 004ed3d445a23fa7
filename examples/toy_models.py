"""Stand-ins for your own models, shared by the examples; nothing here is edgeship API.

- ``digits()``: scikit-learn's bundled 8x8 digits (no download) as ``[N, 1, 8, 8]`` float32 images in
  [0, 1], split 80/20 with a fixed seed.
- ``train_cnn(x, y)``: a small PyTorch CNN trained for about a second (about 97% held-out accuracy).
- ``tiny_text_classifier(folder)``: a 2-layer BERT sentiment classifier and its WordPiece tokenizer,
  fine-tuned for a second on ten sentences and saved the way transformers saves a model folder.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["NEGATIVE", "POSITIVE", "digits", "tiny_text_classifier", "train_cnn"]

POSITIVE = ["i loved this film", "the acting was wonderful", "great service", "a good film", "i loved the cat"]
NEGATIVE = ["worst service i have ever had", "the acting was bad", "a terrible film", "i hated this", "awful mat"]


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``x_train, x_test, y_train, y_test``: images ``[N, 1, 8, 8]`` float32, labels int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(x, y.astype(np.int64), test_size=0.2, random_state=0,
                                                        stratify=y)  # fmt: skip
    return x_train, x_test, y_train, y_test


def train_cnn(x: np.ndarray, y: np.ndarray, steps: int = 60, seed: int = 0) -> nn.Module:
    """Conv(8)-pool-Conv(16)-Linear on 8x8 images, ``steps`` full-batch Adam steps."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


def tiny_text_classifier(folder: Path, extra_words: str = "") -> Path:
    """A 2-layer BERT (hidden 32) with labels negative/positive and its tokenizer, saved in ``folder``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = " ".join([*POSITIVE, *NEGATIVE, extra_words]).split()
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase]
    tokens += [f"##{c}" for c in string.ascii_lowercase]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens + words))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )  # fmt: skip
    tokenizer = BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=64,
    )  # fmt: skip
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    batch = tokenizer(POSITIVE + NEGATIVE, padding=True, return_tensors="pt")
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    model.eval().save_pretrained(folder)
    return folder
