"""Text task classes and pipelines on real bundles match transformers on the same tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from task_bundles import TaskBundles, folders

import device_runtime
from device_runtime import (
    EdgeModelForFeatureExtraction,
    EdgeModelForSequenceClassification,
    EdgeModelForTokenClassification,
    TaskMismatchError,
    encode_text,
    pipeline,
)
from device_runtime import cli as device_cli
from sdk import cli
from sdk.errors import InputError

SENTENCES, LONG_TEXT, MAX_LENGTH = folders.SENTENCES, folders.LONG_TEXT, folders.MAX_LENGTH
FIRSTS, SECONDS = ["Anna visited Paris.", "Hello world"], ["Berlin, with a dog!", LONG_TEXT]  # sentence pairs


@pytest.fixture(scope="session")
def text_bundles(tmp_path_factory: pytest.TempPathFactory) -> TaskBundles:
    return TaskBundles(tmp_path_factory.mktemp("task-text"))


def _hf(folder: Path, task: str) -> tuple[Any, Any]:
    auto = {"text-classification": transformers.AutoModelForSequenceClassification,
            "token-classification": transformers.AutoModelForTokenClassification,
            "feature-extraction": transformers.AutoModel}[task]  # fmt: skip
    return auto.from_pretrained(folder).eval(), transformers.AutoTokenizer.from_pretrained(folder)


def _hf_run(model: Any, tokenizer: Any, texts: Any, pairs: Any = None) -> tuple[dict[str, np.ndarray], Any]:
    enc = tokenizer(texts, pairs, padding="longest", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
    return {k: v.numpy() for k, v in enc.items()}, out


def _plain(value: Any) -> Any:
    """transformers' results with numpy scalars as Python numbers, for comparison."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _same_results(ours: Any, theirs: Any, atol: float) -> None:
    theirs = _plain(theirs)
    assert type(ours) is type(theirs)
    if isinstance(ours, list):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            _same_results(a, b, atol)
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys()
        for k in ours:
            if k == "score":
                assert ours[k] == pytest.approx(theirs[k], abs=atol)
            else:
                assert ours[k] == theirs[k], (k, ours, theirs)
    else:
        assert ours == theirs


def test_token_ids_match_the_fast_tokenizer(text_bundles: TaskBundles) -> None:
    bundle = text_bundles.bundle("text-classification")
    _, tokenizer = _hf(text_bundles.folder("text-classification"), "text-classification")
    with device_runtime.load(bundle, [text_bundles.public]) as model:
        for texts, pairs in ((SENTENCES, None), ([LONG_TEXT, "Hello world"], None), (FIRSTS, SECONDS)):
            ours = encode_text(model, texts, pairs)
            theirs = tokenizer(texts, pairs, padding="longest", truncation=True, max_length=MAX_LENGTH,
                               return_tensors="np")  # fmt: skip
            assert list(ours) == ["input_ids", "attention_mask", "token_type_ids"]
            for name, array in ours.items():
                assert array.dtype == np.int64
                np.testing.assert_array_equal(array, theirs[name], err_msg=name)
        # One text, over max_length: truncated to max_length as declared, [SEP] kept.
        long = encode_text(model, LONG_TEXT)
        assert long["input_ids"].shape == (1, MAX_LENGTH) and long["input_ids"][0, -1] == tokenizer.sep_token_id
        accents = encode_text(model, "Café, naïve résumé?")["input_ids"][0]
        assert tokenizer.convert_ids_to_tokens(accents.tolist()) == ["[CLS]", "cafe", ",", "naive", "resume", "?",
                                                                      "[SEP]"]  # fmt: skip


@pytest.mark.parametrize("precision", ["fp32", "int8-dynamic"])
def test_sequence_classification(text_bundles: TaskBundles, precision: str) -> None:
    folder = text_bundles.folder("text-classification")
    hf_model, tokenizer = _hf(folder, "text-classification")
    _, ref = _hf_run(hf_model, tokenizer, SENTENCES)
    ref_pair = _hf_run(hf_model, tokenizer, FIRSTS, SECONDS)[1]
    atol = 1e-4 if precision == "fp32" else 0.1
    with EdgeModelForSequenceClassification.from_bundle(text_bundles.bundle("text-classification", precision),
                                                        trust=[text_bundles.public]) as clf:  # fmt: skip
        out = clf(SENTENCES)
        assert out.logits.shape == (len(SENTENCES), 3)
        np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=atol)
        assert clf.id2label == ("negative", "neutral", "positive")
        if precision == "fp32":
            assert out.labels == [clf.id2label[i] for i in ref.logits.argmax(-1)]
            np.testing.assert_allclose(out.scores, torch.softmax(ref.logits, -1).numpy(), atol=1e-5)
            np.testing.assert_allclose(clf(FIRSTS, SECONDS).logits, ref_pair.logits.numpy(), atol=1e-4)
        assert out.top_k(2)[0][0]["score"] >= out.top_k(2)[0][1]["score"]

    if precision == "fp32":
        hf_pipe = transformers.pipeline("text-classification", model=str(folder))
        with pipeline("sentiment-analysis", text_bundles.bundle("text-classification"),
                      trust=[text_bundles.public]) as pipe:  # fmt: skip
            _same_results(pipe(SENTENCES[0]), hf_pipe(SENTENCES[0], truncation=True), 1e-5)
            _same_results(pipe(SENTENCES), hf_pipe(SENTENCES, truncation=True), 1e-5)
            _same_results(pipe(SENTENCES[:2], top_k=None), hf_pipe(SENTENCES[:2], top_k=None, truncation=True), 1e-5)
            _same_results(pipe(LONG_TEXT, top_k=2), hf_pipe(LONG_TEXT, top_k=2, truncation=True), 1e-5)
            pair = {"text": FIRSTS[0], "text_pair": SECONDS[0]}
            _same_results(pipe(pair), hf_pipe(pair, truncation=True), 1e-5)


def test_token_classification(text_bundles: TaskBundles) -> None:
    folder = text_bundles.folder("token-classification")
    bundle = text_bundles.bundle("token-classification")
    hf_model, tokenizer = _hf(folder, "token-classification")
    enc, ref = _hf_run(hf_model, tokenizer, SENTENCES)
    with EdgeModelForTokenClassification.from_bundle(bundle, trust=[text_bundles.public]) as ner:
        out = ner(SENTENCES)
        np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=1e-4)
        np.testing.assert_array_equal(out.input_ids, enc["input_ids"])
        assert out.labels[0] == [folders.NER_LABELS[i] for i in ref.logits[0].argmax(-1)]
        assert out.tokens[0][:3] == ["[CLS]", "anna", "visited"] and out.offsets[0][1] == (0, 4)
    hf_pipe = transformers.pipeline("token-classification", model=str(folder))
    with pipeline("ner", bundle, trust=[text_bundles.public]) as pipe:
        for text in [*SENTENCES, LONG_TEXT]:
            for params in ({}, {"ignore_labels": []}, {"aggregation_strategy": "simple", "ignore_labels": []}):
                _same_results(pipe(text, **params), hf_pipe(text, **params), 1e-5)
        unknown = pipe("Paris 2024", ignore_labels=[])
        assert [e["word"] for e in unknown] == ["paris", "2024"]  # [UNK] tokens show the text they stand for
        _same_results(pipe(SENTENCES[:2]), hf_pipe(SENTENCES[:2]), 1e-5)


def test_feature_extraction_pooling_and_pipeline(text_bundles: TaskBundles) -> None:
    folder = text_bundles.folder("feature-extraction")
    bundle = text_bundles.bundle("feature-extraction")
    hf_model, tokenizer = _hf(folder, "feature-extraction")
    enc, ref = _hf_run(hf_model, tokenizer, SENTENCES)
    hidden = ref.last_hidden_state.numpy()
    with EdgeModelForFeatureExtraction.from_bundle(bundle, trust=[text_bundles.public]) as encoder:
        assert dict(encoder.pooling) == {"mode": "cls", "normalize": True, "source": "1_Pooling/config.json"}
        out = encoder(SENTENCES)  # mixed lengths: run in length-similar groups, padding positions meaningless
        real = enc["attention_mask"].astype(bool)
        np.testing.assert_array_equal(out.attention_mask, enc["attention_mask"])
        np.testing.assert_allclose(out.last_hidden_state[real], hidden[real], atol=1e-4)
        assert not out.last_hidden_state[~real].all(axis=-1).all()  # zeros where a text's group was shorter
        encoder.group_by_length = False  # one padded run: every position as transformers computes it
        np.testing.assert_allclose(encoder(SENTENCES).last_hidden_state, hidden, atol=1e-4)
        encoder.group_by_length = True
        cls = hidden[:, 0] / np.linalg.norm(
            hidden[:, 0], axis=-1, keepdims=True
        )  # sentence-transformers CLS + Normalize
        np.testing.assert_allclose(out.embeddings, cls, atol=1e-5)
        assert out.pooler_output is out.embeddings and out.pooling == "cls"
    # The pooling functions against sentence-transformers' definitions.
    mask = enc["attention_mask"][..., None]
    mean = (hidden * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(device_runtime.tasks.pool(hidden, enc["attention_mask"], "mean"), mean, atol=1e-6)
    maxed = np.where(mask > 0, hidden, -1e9).max(1)
    np.testing.assert_allclose(device_runtime.tasks.pool(hidden, enc["attention_mask"], "max"), maxed)

    hf_pipe = transformers.pipeline("feature-extraction", model=str(folder))
    with pipeline("feature-extraction", bundle, trust=[text_bundles.public]) as pipe:
        for text in (SENTENCES[0], SENTENCES[:3]):
            ours, theirs = pipe(text), hf_pipe(text, truncation=True)
            assert np.asarray(ours).shape == np.asarray(theirs).shape if isinstance(text, str) else len(ours) == 3
            np.testing.assert_allclose(np.asarray(ours[0]), np.asarray(theirs[0]), atol=1e-4)


def test_length_groups_keep_the_callers_order(text_bundles: TaskBundles) -> None:
    """Mixed-length batches run as length-similar groups, with the same results as one padded run, in order."""
    texts = [SENTENCES[i] for i in (1, 5, 3, 2, 0, 7, 4, 6)] * 2  # long and short interleaved
    lengths = encode_text_lengths(text_bundles, texts)
    assert len(device_runtime._grouping.plan_groups(lengths)) > 1  # the grouped path is the one under test
    for task, cls, field in (("feature-extraction", EdgeModelForFeatureExtraction, "pooler_output"),
                             ("text-classification", EdgeModelForSequenceClassification, "logits")):  # fmt: skip
        with cls.from_bundle(text_bundles.bundle(task), trust=[text_bundles.public]) as model:
            widths: list[int] = []
            model.model.predict = _counting(model.model.predict, widths)  # type: ignore[method-assign]
            grouped = getattr(model(texts), field)
            assert len(widths) > 1 and min(widths) < max(widths) == lengths.max()
            model.group_by_length = False
            calls = len(widths)
            plain = getattr(model(texts), field)
            assert widths[calls:] == [lengths.max()]  # off: one run padded to the longest text
            np.testing.assert_allclose(grouped, plain, atol=1e-5)
            singles = np.concatenate([getattr(model([t]), field) for t in texts])
            np.testing.assert_allclose(grouped, singles, atol=1e-5)  # row i is text i


def _counting(predict: Any, widths: list[int]) -> Any:
    """``predict`` that records the sequence length of every run."""

    def run(feeds: Any, **kwargs: Any) -> Any:
        widths.append(feeds["input_ids"].shape[1])
        return predict(feeds, **kwargs)

    return run


def encode_text_lengths(text_bundles: TaskBundles, texts: list[str]) -> np.ndarray:
    with EdgeModelForFeatureExtraction.from_bundle(text_bundles.bundle("feature-extraction"),
                                                   trust=[text_bundles.public]) as model:  # fmt: skip
        return np.asarray(model.tokenizer.encode(texts).feeds["attention_mask"].sum(axis=1))


def test_bad_text_inputs(text_bundles: TaskBundles) -> None:
    bundle = text_bundles.bundle("text-classification")
    with EdgeModelForSequenceClassification.from_bundle(bundle, trust=[text_bundles.public]) as clf:
        bad: list[Any] = ["", "   \n", 123, None, [], ["fine", 3], b"bytes", {"text": "x"}]
        for value in bad:
            with pytest.raises(InputError):
                clf(value)
        with pytest.raises(InputError, match="2 texts but 1 text pairs"):
            clf(["a cat", "a dog"], ["one"])
        assert clf.model.metrics.snapshot()["errors"]["input"] == len(bad) + 1
        assert clf(LONG_TEXT).logits.shape == (1, 3)  # truncated, not refused
        with pytest.raises(InputError, match=r"dimension 'sequence' is 17, outside the declared range \[1, 16\]"):
            clf.model.predict({n: np.ones((1, MAX_LENGTH + 1), np.int64) for n in clf.tokenizer.input_names})
    with pytest.raises(InputError, match=r"unknown keyword|unexpected keyword"):
        pipeline("text-classification", bundle, trust=[text_bundles.public])("a cat", colour="red")


def test_wrong_task_is_refused(text_bundles: TaskBundles) -> None:
    bundle = text_bundles.bundle("text-classification")
    with pytest.raises(TaskMismatchError, match="is a text-classification model, not token-classification; use "
                                                "EdgeModelForSequenceClassification"):  # fmt: skip
        EdgeModelForTokenClassification.from_bundle(bundle, trust=[text_bundles.public])
    with pytest.raises(TaskMismatchError, match="not image-classification"):
        pipeline("image-classification", bundle, trust=[text_bundles.public])
    with pytest.raises(ValueError, match="unknown task 'translation'"):
        pipeline("translation", bundle, trust=[text_bundles.public])
    with device_runtime.load(bundle, [text_bundles.public]) as model:  # a loaded model stays the caller's
        with pytest.raises(TaskMismatchError):
            EdgeModelForFeatureExtraction(model)
        assert pipeline("text-classification", model)("a cat")[0]["label"] in ("negative", "neutral", "positive")


def test_cli_predict_text(text_bundles: TaskBundles, capsys: pytest.CaptureFixture[str]) -> None:
    """`--text` on both CLIs: the bundle's tokenizer and task, labels out (the same answer as POST /v1/text)."""
    bundle = text_bundles.bundle("text-classification")
    hf_model, tokenizer = _hf(text_bundles.folder("text-classification"), "text-classification")
    ref = _hf_run(hf_model, tokenizer, [SENTENCES[0]])[1].logits.numpy()
    scores = np.exp(ref[0]) / np.exp(ref[0]).sum()
    argv = ["--trust", str(text_bundles.public), "--text", SENTENCES[0], "--top-k", "0"]
    assert cli.main(["predict", str(bundle), *argv]) == 0
    host = json.loads(capsys.readouterr().out)
    assert device_cli.main(["predict", "--bundle", str(bundle), *argv]) == 0
    assert json.loads(capsys.readouterr().out) == host
    assert host["task"] == "text-classification" and set(host["model"]) >= {"name", "version", "sha256"}
    (labels,) = host["labels"]
    assert labels[0]["label"] == ("negative", "neutral", "positive")[int(ref.argmax())] and len(labels) == len(scores)
    np.testing.assert_allclose(sorted((x["score"] for x in labels), reverse=True), sorted(scores, reverse=True),
                               atol=1e-4)  # fmt: skip
    assert cli.main(["predict", str(bundle), "--trust", str(text_bundles.public), "--text", " "]) == 1
    assert "empty" in capsys.readouterr().err


def _post(url: str, body: bytes, content_type: str | None) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST")
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_text_endpoint_per_task(text_bundles: TaskBundles) -> None:
    """POST /v1/text: an app in another language sends text; the device tokenizes (issue 12)."""
    from device_runtime.serve import ModelServer

    texts = [SENTENCES[0], SENTENCES[1]]
    for task in ("text-classification", "token-classification", "feature-extraction"):
        with pipeline(task, text_bundles.bundle(task), trust=[text_bundles.public]) as pipe, \
                ModelServer(pipe.model.model) as server:  # fmt: skip
            status, body = _post(f"{server.url}/v1/text", json.dumps({"text": texts}).encode(), "application/json")
            assert status == 200, body
            assert body["task"] == task and body["model"]["task"] == task
            if task == "text-classification":
                assert body["labels"] == [pipe(t, top_k=1) for t in texts]
                status, plain = _post(f"{server.url}/v1/text", texts[0].encode(), "text/plain")
                assert status == 200 and plain["labels"] == body["labels"][:1]
                # the stumble: text sent to the tensor route is pointed at /v1/text
                status, err = _post(f"{server.url}/v1/predict", b'{"inputs": {"text": "i loved the acting"}}', None)
                assert status == 400 and "POST /v1/text" in err["error"]["message"], err
                status, err = _post(f"{server.url}/v1/text", b'{"text": "a", "top_k": 0}', "application/json")
                assert status == 400 and "top_k" in err["error"]["message"]
            elif task == "token-classification":
                assert body["entities"] == [pipe(t) for t in texts]
            else:
                extractor: Any = pipe.model
                np.testing.assert_allclose(body["embeddings"][1], extractor(texts[1]).embeddings[0], atol=1e-6)
                assert len(body["embeddings"]) == 2 and body["pooling"] == dict(extractor.pooling)
            status, err = _post(f"{server.url}/v1/text", b'{"txt": "a"}', "application/json")
            assert status == 400 and err["error"]["type"] == "BadRequest"
            status, err = _post(f"{server.url}/v1/image", b"\x89PNG...", "image/png")
            assert status == 400 and "does not take images" in err["error"]["message"], err


LIGHT = textwrap.dedent(
    """
    import json, sys
    import device_runtime
    with device_runtime.pipeline("ner", sys.argv[1], trust=[sys.argv[2]]) as pipe:
        entities = pipe("Anna visited Paris.", ignore_labels=[])
    heavy = [m for m in ("torch", "transformers", "onnx", "tensorflow") if m in sys.modules]
    print(json.dumps({"entities": len(entities), "heavy": heavy, "tokenizers": "tokenizers" in sys.modules}))
    """
)


def test_pipeline_needs_no_host_libraries(text_bundles: TaskBundles) -> None:
    bundle = text_bundles.bundle("token-classification")
    run = subprocess.run([sys.executable, "-c", LIGHT, str(bundle), str(text_bundles.public)], capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"entities": 4, "heavy": [], "tokenizers": True}
