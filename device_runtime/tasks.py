"""Task classes in the style of optimum's ``ORTModelFor...``: raw text or images in, labelled outputs out.

Each class wraps a loaded ``Model`` whose bundle was packaged for its task, runs the preprocessing the
bundle declares (``device_runtime.preprocess``) and returns a small output object::

    clf = EdgeModelForSequenceClassification.from_bundle("clf-3-onnxruntime-fp32.edgebundle", trust=["release.pub"])
    out = clf(["I loved it", "Never again"])
    out.logits, out.labels, out.top_k(2)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import numpy as np

from device_runtime._grouping import plan_groups
from device_runtime.model import Model, Trust, load
from device_runtime.preprocess import TextBatch, TextEncoder, image_processor, text_encoder
from sdk.errors import EdgeshipError, InputError, ManifestError
from sdk.golden import MASK_INPUT

__all__ = [
    "EdgeModelForFeatureExtraction",
    "EdgeModelForImageClassification",
    "EdgeModelForSequenceClassification",
    "EdgeModelForTokenClassification",
    "FeatureExtractionOutput",
    "ImageClassifierOutput",
    "SequenceClassifierOutput",
    "TaskMismatchError",
    "TokenClassifierOutput",
    "TruncationWarning",
]

_T = TypeVar("_T", bound="EdgeTaskModel")


class TaskMismatchError(EdgeshipError, ValueError):
    """A task class or pipeline was given a bundle packaged for another task."""


class TruncationWarning(UserWarning):
    """Texts were longer than the bundle's ``max_length`` and were cut (counted in ``metrics.truncated_texts``)."""


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def class_scores(logits: np.ndarray, problem_type: str | None) -> np.ndarray:
    """Scores as transformers' classification pipelines compute them by default.

    Sigmoid for multi-label models and single-logit heads, none for regression, softmax otherwise.
    """
    x = logits.astype(np.float64)
    if problem_type == "multi_label_classification" or x.shape[-1] == 1:
        return _sigmoid(x)
    if problem_type == "regression":
        return x
    return _softmax(x)


def _ranked(scores: np.ndarray, id2label: Sequence[str], k: int | None) -> list[dict[str, Any]]:
    order = np.argsort(-scores, kind="stable")[: k if k is not None else len(scores)]
    return [{"label": id2label[i], "score": float(scores[i])} for i in order]


@dataclass(frozen=True)
class _Classified:
    logits: np.ndarray  # [batch, num_labels]
    id2label: tuple[str, ...]
    problem_type: str | None = None

    @property
    def scores(self) -> np.ndarray:
        """Probabilities [batch, num_labels] (softmax; sigmoid for multi-label or one-logit heads)."""
        return class_scores(self.logits, self.problem_type)

    @property
    def labels(self) -> list[str]:
        """The top label of each sample."""
        return [self.id2label[i] for i in self.logits.argmax(axis=-1)]

    def top_k(self, k: int | None = 1) -> list[list[dict[str, Any]]]:
        """Per sample, the ``k`` best ``{"label", "score"}`` (all labels when ``k`` is None), best first."""
        return [_ranked(row, self.id2label, k) for row in self.scores]


@dataclass(frozen=True)
class SequenceClassifierOutput(_Classified):
    """Text classification: ``logits`` [batch, num_labels] and label helpers."""


@dataclass(frozen=True)
class ImageClassifierOutput(_Classified):
    """Image classification: ``logits`` [batch, num_labels] and label helpers."""


@dataclass(frozen=True)
class TokenClassifierOutput:
    """Token classification: ``logits`` [batch, sequence, num_labels] with the tokens they belong to."""

    logits: np.ndarray
    id2label: tuple[str, ...]
    input_ids: np.ndarray  # [batch, sequence]
    tokens: list[list[str]]
    offsets: list[list[tuple[int, int]]]  # character span of each token in its text
    special_tokens_mask: np.ndarray  # 1 for special and padding tokens

    @property
    def scores(self) -> np.ndarray:
        """Softmax probabilities [batch, sequence, num_labels]."""
        return _softmax(self.logits.astype(np.float64))

    @property
    def labels(self) -> list[list[str]]:
        """The top label of every token position (special and padding tokens included), per text."""
        return [[self.id2label[i] for i in row] for row in self.logits.argmax(axis=-1)]


@dataclass(frozen=True)
class FeatureExtractionOutput:
    """Token vectors and the sentence embedding the bundle's pooling gives."""

    last_hidden_state: np.ndarray  # [batch, sequence, hidden]
    attention_mask: np.ndarray  # [batch, sequence]
    pooler_output: np.ndarray  # [batch, hidden]: pooled (and L2-normalised if the bundle says so)
    pooling: str

    @property
    def embeddings(self) -> np.ndarray:
        """Sentence embeddings [batch, hidden] (the same array as ``pooler_output``)."""
        return self.pooler_output


class EdgeTaskModel:
    """Shared part of the task classes: the task check, loading, closing and counting bad input."""

    task: ClassVar[str] = ""

    def __init__(self, model: Model) -> None:
        """Wrap a loaded model; prefer ``from_bundle``.

        Raises:
            TaskMismatchError: the bundle was packaged for another task.
        """
        bundle_task = model.manifest.task
        if bundle_task != self.task:
            right = TASK_CLASSES.get(bundle_task or "")
            hint = f"; use {right.__name__} or pipeline({bundle_task!r}, ...)" if right is not None else ""
            raise TaskMismatchError(
                f"bundle {model.manifest.name} v{model.manifest.version} is a {bundle_task or 'task-less'} model, "
                f"not {self.task}{hint}"
            )
        self.model = model

    @classmethod
    def from_bundle(cls: type[_T], path: str | os.PathLike[str], trust: Trust, **load_kwargs: Any) -> _T:
        """Verify and load a bundle (``device_runtime.load`` with ``load_kwargs``) as this task.

        Raises:
            TaskMismatchError: the bundle was packaged for another task (the model is closed again).
            BundleError, BackendError, KeyFileError, StateError: as ``device_runtime.load`` raises them.
        """
        model = load(path, trust, **load_kwargs)
        try:
            return cls(model)
        except BaseException:
            model.close()
            raise

    @property
    def manifest(self) -> Any:
        return self.model.manifest

    @property
    def id2label(self) -> tuple[str, ...]:
        """Class names by index, from the bundle's ``preprocessing.labels``."""
        labels = self.model.manifest.preprocessing.labels
        if labels is None:
            raise ManifestError(f"bundle {self.model.manifest.name} declares no labels (preprocessing.labels)")
        return labels

    def _counted(self, fn: Any, *args: Any) -> Any:
        """Run preprocessing; its InputErrors are counted like predict's own."""
        try:
            return fn(*args)
        except InputError:
            self.model.metrics.error("input")
            raise

    def close(self) -> None:
        """Close the underlying model (see ``Model.close``)."""
        self.model.close()

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _TextTaskModel(EdgeTaskModel):
    # Run a batch of texts in length-similar groups (``device_runtime._grouping``) where the bundle takes
    # any batch and sequence length; outputs come back in the caller's order. Token-level outputs at padding
    # positions are then zero where a text's group was shorter than the call, so it is off where tokens are
    # the result (token classification); the mask says which positions are real.
    group_by_length: bool = True

    @property
    def tokenizer(self) -> TextEncoder:
        """The bundle's tokenizer with its declared truncation and padding."""
        return text_encoder(self.model)

    def _encode(self, text: Any, text_pair: Any) -> TextBatch:
        batch: TextBatch = self._counted(lambda: self.tokenizer.encode(text, text_pair))
        if batch.truncated:
            self.model.metrics.truncated(len(batch.truncated))
            warnings.warn(
                f"{len(batch.truncated)} of {len(batch.tokens)} texts were cut to the bundle's max_length of "
                f"{self.tokenizer.max_length} tokens (texts {batch.truncated[:10]}); their results ignore the rest",
                TruncationWarning,
                stacklevel=3,
            )
        return batch

    def _predict(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``predict`` on tokenized texts; a bundle with a fixed batch (TFLite) runs them in chunks of it.

        Each chunk is cut to its own longest text (so a bucketed model picks the smallest bucket that fits),
        and token-level outputs are padded back with zeros to the call's sequence length.
        """
        spec = self.model.manifest.inputs[0]
        fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else None
        n = len(next(iter(feeds.values())))
        named_sequence = len(spec.shape) > 1 and isinstance(spec.shape[1], str)
        mask = feeds.get(MASK_INPUT)
        if fixed is None and self.group_by_length and named_sequence and mask is not None and n > 1:
            if self.tokenizer.padding_side == "right":
                return self._predict_grouped(feeds, mask)
        if fixed is None or n == fixed:
            return self.model.predict(feeds)
        width = next(iter(feeds.values())).shape[1]
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, n, fixed):
            chunk = {k: v[start : start + fixed] for k, v in feeds.items()}
            rows = len(next(iter(chunk.values())))
            if rows < fixed:  # repeat the last row to fill the batch; its outputs are dropped
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], fixed - rows, axis=0)]) for k, v in chunk.items()}
            if named_sequence and mask is not None and self.tokenizer.padding_side == "right":
                keep = max(int(np.nonzero(mask[start : start + rows].any(axis=0))[0].max(initial=0)) + 1, 1)
                chunk = {k: v[:, :keep] for k, v in chunk.items()}
            for k, v in self.model.predict(chunk).items():
                parts.setdefault(k, []).append(v[:rows])
        out = {}
        for k, arrays in parts.items():
            if arrays[0].ndim >= 2 and any(a.shape[1] != width for a in arrays) and named_sequence:
                arrays = [_pad_axis1(a, width) for a in arrays]
            out[k] = np.concatenate(arrays)
        return out

    def _predict_grouped(self, feeds: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
        """``predict`` per group of length-similar texts, each cut to its longest; rows back in order."""
        groups = plan_groups(mask.sum(axis=1))
        if len(groups) == 1:
            return self.model.predict(feeds)
        manifest = self.model.manifest
        sequence = manifest.inputs[0].shape[1]  # token-level outputs carry the same named dimension on axis 1
        token_level = {o.name for o in manifest.outputs if len(o.shape) > 1 and o.shape[1] == sequence}
        n, width = mask.shape
        out: dict[str, np.ndarray] = {}
        for rows in groups:
            keep = max(int(mask[rows[-1]].sum()), 1)  # sorted by length: the group's last text is its longest
            for k, v in self.model.predict({name: a[rows, :keep] for name, a in feeds.items()}).items():
                if k not in out:  # token-level outputs are zero at the padding up to the call's width
                    shape = (n, width, *v.shape[2:]) if k in token_level else (n, *v.shape[1:])
                    out[k] = np.zeros(shape, dtype=v.dtype)
                if k in token_level:
                    out[k][rows, :keep] = v
                else:
                    out[k][rows] = v
        return out


def _pad_axis1(array: np.ndarray, width: int) -> np.ndarray:
    """Zeros appended along axis 1 up to ``width`` (token outputs of a chunk cut shorter than the call)."""
    widths = [(0, 0)] * array.ndim
    widths[1] = (0, width - array.shape[1])
    return np.pad(array, widths)


class EdgeModelForSequenceClassification(_TextTaskModel):
    """A text-classification bundle: ``model(texts)`` -> ``SequenceClassifierOutput``."""

    task = "text-classification"

    def __call__(
        self, text: str | Sequence[str], text_pair: str | Sequence[str] | None = None
    ) -> SequenceClassifierOutput:
        """Classify one text or a batch (optionally sentence pairs).

        Raises:
            InputError: empty, blank or non-string text.
            ModelClosedError, BackendError: as ``Model.predict`` raises them.
        """
        batch = self._encode(text, text_pair)
        logits = self._predict(batch.feeds)["logits"]
        problem = self.model.manifest.preprocessing.problem_type
        return SequenceClassifierOutput(logits, self.id2label, problem)


class EdgeModelForTokenClassification(_TextTaskModel):
    """A token-classification bundle: ``model(texts)`` -> ``TokenClassifierOutput`` (one label per token)."""

    task = "token-classification"
    group_by_length = False  # its result is per token: padding positions keep the model's own logits

    def __call__(
        self, text: str | Sequence[str], text_pair: str | Sequence[str] | None = None
    ) -> TokenClassifierOutput:
        """Label every token of one text or a batch.

        Raises:
            InputError: empty, blank or non-string text.
            ModelClosedError, BackendError: as ``Model.predict`` raises them.
        """
        batch = self._encode(text, text_pair)
        logits = self._predict(batch.feeds)["logits"]
        return TokenClassifierOutput(
            logits=logits,
            id2label=self.id2label,
            input_ids=batch.feeds["input_ids"],
            tokens=batch.tokens,
            offsets=batch.offsets,
            special_tokens_mask=batch.special_tokens_mask,
        )


class EdgeModelForFeatureExtraction(_TextTaskModel):
    """A feature-extraction bundle: token vectors and sentence embeddings with the declared pooling."""

    task = "feature-extraction"

    @property
    def pooling(self) -> Mapping[str, Any]:
        """``{"mode": "mean"|"cls"|"max", "normalize": bool}`` from the bundle (default: mean, unnormalised)."""
        pooling = self.model.manifest.preprocessing.pooling
        return pooling if pooling is not None else {"mode": "mean", "normalize": False}

    def __call__(
        self, text: str | Sequence[str], text_pair: str | Sequence[str] | None = None
    ) -> FeatureExtractionOutput:
        """Embed one text or a batch.

        Raises:
            InputError: empty, blank or non-string text.
            ModelClosedError, BackendError: as ``Model.predict`` raises them.
            ManifestError: the bundle declares a pooling mode this runtime does not know.
        """
        batch = self._encode(text, text_pair)
        hidden = self._predict(batch.feeds)["last_hidden_state"]
        mask = batch.feeds.get("attention_mask")
        if mask is None:
            mask = np.ones(hidden.shape[:2], dtype=np.int64)
        mode = str(self.pooling.get("mode", "mean"))
        pooled = pool(hidden, mask, mode)
        if self.pooling.get("normalize"):
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return FeatureExtractionOutput(hidden, mask, pooled.astype(np.float32, copy=False), mode)


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Sentence vectors from token vectors as sentence-transformers' Pooling computes them.

    Raises:
        ManifestError: an unknown mode.
    """
    if mode == "mean":  # the masked sum as one matrix product per text: [batch, 1, seq] @ [batch, seq, hidden]
        weights = mask.astype(hidden.dtype)
        summed = np.matmul(weights[:, None, :], hidden)[:, 0]
        return summed / np.maximum(weights.sum(axis=1, keepdims=True), 1e-9)  # type: ignore[no-any-return]
    m = mask.astype(hidden.dtype)[..., None]
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return np.where(m > 0, hidden, np.finfo(hidden.dtype).min).max(axis=1)
    raise ManifestError(f"preprocessing.pooling.mode {mode!r} is not one of mean, cls, max")


class EdgeModelForImageClassification(EdgeTaskModel):
    """An image-classification bundle: ``model(images)`` -> ``ImageClassifierOutput``."""

    task = "image-classification"

    def preprocess(self, images: Any) -> np.ndarray:
        """Images (paths, bytes, PIL images, uint8 arrays; one or a list) -> pixel_values [batch, 3, H, W].

        Raises:
            InputError: a corrupt, unreadable or ill-shaped image.
        """
        processor = image_processor(self.model)
        return self._counted(processor, images)  # type: ignore[no-any-return]

    def __call__(self, images: Any) -> ImageClassifierOutput:
        """Classify one image or a list of images.

        Raises:
            InputError: a corrupt, unreadable or ill-shaped image.
            ModelClosedError, BackendError: as ``Model.predict`` raises them.
        """
        logits = self.model.predict({"pixel_values": self.preprocess(images)})["logits"]
        problem = self.model.manifest.preprocessing.problem_type
        return ImageClassifierOutput(logits, self.id2label, problem)


TASK_CLASSES: dict[str, type[EdgeTaskModel]] = {
    cls.task: cls
    for cls in (
        EdgeModelForSequenceClassification,
        EdgeModelForTokenClassification,
        EdgeModelForFeatureExtraction,
        EdgeModelForImageClassification,
    )
}
