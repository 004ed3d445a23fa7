"""``pipeline(task, bundle)``: transformers-style pipelines over a bundle, with plain Python results.

The results have the shapes transformers' pipelines return, so code written against them runs
on the device unchanged::

    classify = pipeline("text-classification", "clf-3-onnxruntime-fp32.edgebundle", trust=["release.pub"])
    classify("I loved it")  # [{"label": "positive", "score": 0.98}]

Like transformers (batch size 1), each text runs on its own: the numbers do not depend on what else
was in the call, and feature-extraction returns each text's own length.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import numpy as np

from device_runtime.model import Model, Trust
from device_runtime.tasks import (
    TASK_CLASSES,
    EdgeModelForFeatureExtraction,
    EdgeModelForImageClassification,
    EdgeModelForSequenceClassification,
    EdgeModelForTokenClassification,
    EdgeTaskModel,
)
from sdk.errors import InputError

__all__ = ["ALIASES", "Pipeline", "pipeline"]

ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}
_LEGACY = object()  # text-classification without top_k: one dict per text, as transformers does


class Pipeline:
    """A task model and the transformers-style post-processing of its task; call it on inputs."""

    def __init__(self, task: str, model: EdgeTaskModel) -> None:
        self.task = task
        self.model = model

    def __call__(self, inputs: Any, **params: Any) -> Any:
        """Run the pipeline on one input or a list; see ``pipeline`` for what each task returns.

        Raises:
            InputError: inputs the task cannot take, or an unknown parameter.
            ModelClosedError, BackendError: as ``Model.predict`` raises them.
        """
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        if not items:
            raise InputError(f"{self.task}: no inputs given")
        handler = getattr(self, "_" + self.task.replace("-", "_"))
        try:
            inspect.signature(handler).bind(None, **params)
        except TypeError as e:  # an unknown keyword: the caller's mistake, like any other bad input
            raise InputError(f"{self.task}: {e}; it takes {list(inspect.signature(handler).parameters)[1:]}") from e
        results = [handler(item, **params) for item in items]
        if self.task == "text-classification" and params.get("top_k", _LEGACY) is _LEGACY:
            # transformers' legacy form: one dict per text in a list; a lone string gives [dict], a lone pair dict
            if not single:
                return [r[0] for r in results]
            return results[0][0] if isinstance(inputs, dict) else results[0]
        return results[0] if single else results

    def _text_classification(self, text: Any, top_k: Any = _LEGACY, text_pair: Any = None) -> Any:
        if isinstance(text, dict):  # transformers' {"text": ..., "text_pair": ...}
            text, text_pair = text.get("text"), text.get("text_pair")
        model: EdgeModelForSequenceClassification = self.model  # type: ignore[assignment]
        out = model(text, text_pair)
        if top_k is _LEGACY:
            return out.top_k(1)[0]
        return out.top_k(None if top_k is None else _positive_int(top_k, "top_k"))[0]

    def _token_classification(
        self, text: Any, aggregation_strategy: str = "none", ignore_labels: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        if aggregation_strategy not in ("none", "simple"):
            raise InputError(f"aggregation_strategy must be 'none' or 'simple', got {aggregation_strategy!r}")
        ignore = {"O"} if ignore_labels is None else set(ignore_labels)
        model: EdgeModelForTokenClassification = self.model  # type: ignore[assignment]
        out = model(text)
        scores = out.scores[0]
        unk = model.tokenizer.unk_token
        entities = []
        for i, token in enumerate(out.tokens[0]):
            if out.special_tokens_mask[0, i]:
                continue
            start, end = out.offsets[0][i]
            best = int(scores[i].argmax())
            entities.append({
                "entity": out.id2label[best],
                "score": float(scores[i, best]),
                "index": i,
                "word": text[start:end] if token == unk else token,
                "start": start,
                "end": end,
            })  # fmt: skip
        if aggregation_strategy == "simple":
            entities = _group_entities(entities, model.tokenizer.tokens_to_string)
        return [e for e in entities if e.get("entity", e.get("entity_group")) not in ignore]

    def _feature_extraction(self, text: Any, return_tensors: bool = False) -> Any:
        model: EdgeModelForFeatureExtraction = self.model  # type: ignore[assignment]
        hidden = model(text).last_hidden_state  # [1, sequence, hidden]
        return hidden if return_tensors else hidden.tolist()

    def _image_classification(self, image: Any, top_k: int | None = 5) -> list[dict[str, Any]]:
        model: EdgeModelForImageClassification = self.model  # type: ignore[assignment]
        out = model(image)
        k = len(out.id2label) if top_k is None else min(_positive_int(top_k, "top_k"), len(out.id2label))
        return out.top_k(k)[0]

    def close(self) -> None:
        """Close the underlying model."""
        self.model.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an int >= 1 or None, got {value!r}")
    return value


def _tag(entity: str) -> tuple[str, str]:
    if entity.startswith(("B-", "I-")):
        return entity[0], entity[2:]
    return "I", entity  # not in B-/I- form: a continuation


def _group_entities(entities: list[dict[str, Any]], join: Any) -> list[dict[str, Any]]:
    """transformers' "simple" aggregation: adjacent tokens with the same tag (not restarted by B-) form one group."""
    groups: list[list[dict[str, Any]]] = []
    for entity in entities:
        bi, tag = _tag(entity["entity"])
        if groups and tag == _tag(groups[-1][-1]["entity"])[1] and bi != "B":
            groups[-1].append(entity)
        else:
            groups.append([entity])
    return [
        {
            "entity_group": _tag(group[0]["entity"])[1],
            "score": float(np.mean([e["score"] for e in group])),
            "word": join([e["word"] for e in group]),
            "start": group[0]["start"],
            "end": group[-1]["end"],
        }
        for group in groups
    ]


def pipeline(
    task: str, bundle: str | os.PathLike[str] | Model, trust: Trust | None = None, **load_kwargs: Any
) -> Pipeline:
    """A transformers-style pipeline over a bundle packaged for ``task``.

    Args:
        task: ``text-classification`` (alias ``sentiment-analysis``), ``token-classification`` (``ner``),
            ``feature-extraction`` or ``image-classification``.
        bundle: an ``.edgebundle`` path (verified with ``trust``) or an already loaded ``Model``.
        trust: trusted public keys for a bundle path (see ``device_runtime.load``).
        load_kwargs: passed on to ``device_runtime.load``.

    Returns:
        A callable; for one input (a list of inputs gives a list of these):

        - text-classification: ``[{"label", "score"}]``; with ``top_k=k`` (None: all) the k best.
        - token-classification: ``[{"entity", "score", "index", "word", "start", "end"}, ...]``
          (``aggregation_strategy="simple"``: ``entity_group`` instead of ``entity`` and ``index``);
          labels in ``ignore_labels`` (default ``["O"]``) are left out.
        - feature-extraction: nested lists ``[1][tokens][hidden]`` (``return_tensors=True``: an array).
        - image-classification: the ``top_k`` (default 5) best ``{"label", "score"}``.

    Raises:
        ValueError: an unknown task, or ``trust`` missing for a path.
        TaskMismatchError: the bundle was packaged for another task.
        BundleError, BackendError, KeyFileError: as ``device_runtime.load`` raises them.
    """
    name = ALIASES.get(task, task)
    cls = TASK_CLASSES.get(name)
    if cls is None:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join([*TASK_CLASSES, *ALIASES])}")
    if isinstance(bundle, Model):
        return Pipeline(name, cls(bundle))
    if trust is None:
        raise ValueError("give trust=... (public keys) to verify the bundle")
    return Pipeline(name, cls.from_bundle(bundle, trust, **load_kwargs))
