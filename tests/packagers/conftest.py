"""Session fixtures for the packager tests: small trained models, a tiny BERT folder, a signing key.

Nothing is downloaded: the digits data ship with scikit-learn, the transformers models are built
from configs with random weights, and the tokenizer is a hand-made WordPiece vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from packager_checks import Digits
from task_folders import bert_config, wordpiece_vocab, write_tokenizer

from sdk.signing import TrustedKeys, generate_keypair, load_private_key, load_public_key


def _train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits() -> Digits:
    return Digits()


@pytest.fixture(scope="session")
def mlp(digits: Digits) -> torch.nn.Module:
    """A 64-32-10 MLP trained on digits for a moment (about 90% held-out accuracy)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    return _train(model, digits.x_train, digits.y_train, epochs=60)


@pytest.fixture(scope="session")
def cnn(digits: Digits) -> torch.nn.Module:
    """A small CNN on [N, 1, 8, 8] digit images."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 10),
    )
    return _train(model, digits.x_train[:500].reshape(-1, 1, 8, 8), digits.y_train[:500], epochs=30)


WORDS = (
    "the quick brown fox jumps over lazy dog edge devices run small models close to data i loved this film "
    "acting was wonderful worst service have ever had is a cat sat on mat hello world"
).split()


def _tokenizer(folder: Path) -> None:
    """A tiny WordPiece tokenizer (vocab of 100) saved the way transformers saves BERT's."""
    write_tokenizer(folder, wordpiece_vocab(WORDS, punctuation=".,!?", size=100), max_length=64, decoder=False)


@pytest.fixture(scope="session")
def bert_feature_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BertModel folder with random weights and no tokenizer (random-id validation path)."""
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("bert-feature")
    torch.manual_seed(0)
    BertModel(bert_config(vocab_size=100)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bert_cls_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BertForSequenceClassification folder (3 labels) with a tokenizer."""
    from transformers import BertForSequenceClassification

    folder = tmp_path_factory.mktemp("bert-cls")
    torch.manual_seed(1)
    config = bert_config(vocab_size=100, num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"},
                          label2id={"negative": 0, "neutral": 1, "positive": 2})  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(folder)
    _tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def key(keypair: tuple[Path, Path]) -> Ed25519PrivateKey:
    return load_private_key(keypair[0])


@pytest.fixture(scope="session")
def trust(keypair: tuple[Path, Path]) -> TrustedKeys:
    public: Ed25519PublicKey = load_public_key(keypair[1])
    return TrustedKeys((public,))
