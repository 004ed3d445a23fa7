"""TFLite text bundles with sequence buckets, and TFLite mixed precision (layers kept in float).

One package call (a tiny BERT with a tokenizer, max_length 64) builds the TFLite bundles (buckets 16, 32, 64)
and an ONNX Runtime bundle that takes any length: the TFLite outputs must match it at every bucket.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from task_folders import LONG_TEXT, SENTENCES, bert_config, write_tokenizer
from tflite_parts import bundle_member

import device_runtime
from device_runtime import EdgeModelForFeatureExtraction
from device_runtime.tasks import TruncationWarning
from packagers import PackageOptions, package
from sdk.errors import InputError, PackagingError
from sdk.signing import TrustedKeys

BUCKETS = [16, 32, 64]
FLOAT_LAYER = r"fully_connected:inner\.encoder\.1\."  # the second encoder layer's 6 dense layers stay float


@pytest.fixture(scope="session")
def bucket_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BertModel feature extractor (2 layers, hidden 32, 64 positions) with a tokenizer of max_length 64."""
    import transformers

    folder = tmp_path_factory.mktemp("bert-buckets")
    torch.manual_seed(3)
    transformers.BertModel(bert_config()).save_pretrained(folder)
    write_tokenizer(folder, max_length=64)
    return folder


@pytest.fixture(scope="session")
def bucket_bundles(bucket_folder: Path, key: Ed25519PrivateKey, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """{(target, precision): PackageResult}: TFLite fp32 and int8-dynamic with the default buckets (int8-dynamic
    keeps the second encoder layer in float), and ONNX Runtime fp32 (any length) to compare with."""
    out = tmp_path_factory.mktemp("buckets")
    results = package(bucket_folder, name="fe", version=1, key=key, out_dir=out / "tflite", target="tflite",
                      precision=["fp32", "int8-dynamic"],
                      options=PackageOptions(validation_samples=8, float_layers=(FLOAT_LAYER,)))  # fmt: skip
    results += package(bucket_folder, name="fe", version=1, key=key, out_dir=out / "ort", target="onnxruntime",
                       options=PackageOptions(validation_samples=8))  # fmt: skip
    return {(r.target, r.precision): r for r in results}


def _ids(n: int, seed: int) -> dict[str, np.ndarray]:
    """One sequence of ``n`` tokens ([CLS] ... [SEP]) of random word ids."""
    ids = np.random.default_rng(seed).integers(5, 90, size=(1, n)).astype(np.int64)
    ids[0, 0], ids[0, -1] = 2, 3
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def test_manifest_states_the_buckets_and_max_length(bucket_bundles: Any, trust: TrustedKeys, tmp_path: Path) -> None:
    for precision in ("fp32", "int8-dynamic"):
        result = bucket_bundles[("tflite", precision)]
        m = result.manifest
        assert [s.shape for s in m.inputs] == [(1, "sequence")] * 3  # the sequence stays named
        assert m.outputs[0].shape == (1, "sequence", 32)
        assert m.runtime["buckets"]["lengths"] == BUCKETS
        assert m.runtime["buckets"]["signatures"] == ["seq_16", "seq_32", "seq_64"]
        assert m.preprocessing["tokenizer"]["max_length"] == 64  # the largest bucket, stated
        assert m.input_policy["dims"] == {"sequence": [1, 64]}
        report = json.loads(bundle_member(result, trust, tmp_path / precision, "report.json"))
        checked = report["build"]["buckets"]
        assert checked["passed"] and sorted(checked["lengths"], key=int) == [str(n) for n in BUCKETS]
        assert all(v["cosine_min"] >= 0.99 for v in checked["lengths"].values())


def test_float_layers_stay_float_in_every_bucket(bucket_bundles: Any, trust: TrustedKeys, tmp_path: Path) -> None:
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    result = bucket_bundles[("tflite", "int8-dynamic")]
    path = tmp_path / "model.tflite"
    path.write_bytes(bundle_member(result, trust, tmp_path / "x", "model.tflite"))
    model = tfl.read_model(str(path))
    for subgraph in model.subgraphs:
        weights = [int(subgraph.tensors[op.inputs[1]].type) for op in subgraph.operators
                   if getattr(tfl.TFL_OP_CODE_TO_NAME.get(model.operatorCodes[op.opcodeIndex].builtinCode), "value",
                              None) == "FULLY_CONNECTED"]  # fmt: skip
        assert weights == [9] * 6 + [0] * 6, (subgraph.name, weights)  # encoder.0 int8 (9), encoder.1 float32 (0)
    report = json.loads(bundle_member(result, trust, tmp_path / "r", "report.json"))
    assert len(report["build"]["float_layers"]) == 6
    assert all(n.startswith("fully_connected:inner.encoder.1.") for n in report["build"]["float_layers"])


@pytest.mark.parametrize("length", [5, 16, 17, 33, 64])  # inside, at and just past each bucket's edge
def test_every_bucket_matches_onnxruntime(bucket_bundles: Any, trust: TrustedKeys, length: int) -> None:
    """An input of any length runs in the smallest bucket that holds it, padded with the mask: same outputs."""
    feeds = _ids(length, seed=length)
    with device_runtime.load(bucket_bundles[("onnxruntime", "fp32")].bundle_path, trust) as ort:
        expected = ort.predict(feeds)["last_hidden_state"]
    for precision, atol in (("fp32", 1e-4), ("int8-dynamic", 0.15)):
        with device_runtime.load(bucket_bundles[("tflite", precision)].bundle_path, trust) as model:
            assert model.backend_info["sequence_buckets"] == BUCKETS
            got = model.predict(feeds)["last_hidden_state"]
        assert got.shape == (1, length, 32)  # cut back from the bucket to the input's length
        np.testing.assert_allclose(got, expected, atol=atol)


def test_texts_of_mixed_length_as_a_list_match_onnxruntime(bucket_bundles: Any, trust: TrustedKeys) -> None:
    """A list on the batch-1 TFLite bundle runs text by text (no InputError), each in its own bucket."""
    texts = [*SENTENCES, " ".join(["the quick brown fox jumps"] * 5)]
    with EdgeModelForFeatureExtraction.from_bundle(bucket_bundles[("onnxruntime", "fp32")].bundle_path, trust) as ort:
        expected = ort(texts)
    with EdgeModelForFeatureExtraction.from_bundle(bucket_bundles[("tflite", "fp32")].bundle_path, trust) as model:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing here is longer than 64 tokens: no truncation warning
            got = model(texts)
        alone = np.concatenate([model(text).embeddings for text in texts])
    assert got.last_hidden_state.shape == expected.last_hidden_state.shape
    np.testing.assert_allclose(got.embeddings, expected.embeddings, atol=1e-4)  # mean pooling with the mask
    np.testing.assert_allclose(alone, got.embeddings, atol=1e-6)
    real = expected.attention_mask.astype(bool)
    np.testing.assert_allclose(got.last_hidden_state[real], expected.last_hidden_state[real], atol=1e-4)


def test_longer_texts_are_truncated_visibly(bucket_bundles: Any, trust: TrustedKeys) -> None:
    long_text = LONG_TEXT + " " + LONG_TEXT  # far beyond 64 tokens
    with EdgeModelForFeatureExtraction.from_bundle(bucket_bundles[("tflite", "fp32")].bundle_path, trust) as model:
        with pytest.warns(TruncationWarning, match="1 of 2 texts were cut to the bundle's max_length of 64"):
            out = model([long_text, "hello world"])
        assert model.model.metrics.truncated_texts == 1
        assert "edgeship_truncated_texts_total 1" in model.model.metrics.prometheus()
        assert out.attention_mask[0].sum() == 64
        too_long = _ids(65, seed=0)
        with pytest.raises(InputError, match="sequence"):  # arrays past the largest bucket are refused, not cut
            model.model.predict(too_long)


def test_bucket_options_are_checked(bucket_folder: Path, mlp: torch.nn.Module, key: Ed25519PrivateKey,
                                    tmp_path: Path) -> None:  # fmt: skip
    for bad in ([0, 16], "16,32", [True]):
        with pytest.raises(PackagingError, match=r"seq_buckets'\] must be a list of lengths"):
            package(bucket_folder, name="x", version=1, key=key, out_dir=tmp_path, target="tflite",
                    options=PackageOptions(validation_samples=2, extra={"seq_buckets": bad}))  # fmt: skip
    with pytest.raises(PackagingError, match="beyond the model's 64"):
        package(bucket_folder, name="x", version=1, key=key, out_dir=tmp_path, target="tflite",
                options=PackageOptions(validation_samples=2, extra={"seq_buckets": [16, 128]}))  # fmt: skip
    with pytest.raises(PackagingError, match="needs a text model"):
        package(mlp, name="x", version=1, key=key, out_dir=tmp_path, target="tflite",
                example_inputs=(torch.zeros(1, 64),), options=PackageOptions(extra={"seq_buckets": [16]}))  # fmt: skip
    assert not any(tmp_path.glob("*.edgebundle"))


class _TinyText(torch.nn.Module):
    """Embedding + masked mean + linear: a text model from plain torch, inputs [batch, "sequence"]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.out = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        return self.out((self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0))


def test_torch_text_model_buckets_and_the_gate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A bucket that fails the tolerances is not offered when the caller's own check would pass (it validates at
    the calibration length, in another bucket); when that bucket fails too, the caller sees it and gets the model."""
    import packagers.targets.tflite as tfl
    from packagers.registry import BuiltModel, CandidateFailed, get_packager
    from packagers.sources import load_source

    ids = np.random.default_rng(0).integers(1, 50, size=(4, 8)).astype(np.int64)
    options = PackageOptions(input_names=["input_ids", "attention_mask"], output_names=["y"],
                             dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                           "attention_mask": {0: "batch", 1: "sequence"}, "y": {0: "batch"}},
                             extra={"seq_buckets": [8, 16]})  # fmt: skip
    source = load_source(_TinyText().eval(), "torch", task=None, example_inputs=(torch.from_numpy(ids[:1]),
                         torch.ones(1, 8, dtype=torch.int64)), calibration={"input_ids": ids,
                         "attention_mask": np.ones_like(ids)}, options=options, progress=lambda _: None)  # fmt: skip
    source.workdir = tmp_path / "source"
    packager = get_packager("tflite")
    (built,) = packager.build(source, tfl.Precision.FP32, tmp_path / "a", options, lambda _: None)
    assert isinstance(built, BuiltModel) and built.runtime["buckets"]["lengths"] == [8, 16]
    assert built.inputs is not None and built.inputs[0].shape == (1, "sequence")
    assert built.recipe["buckets"]["passed"]
    run = packager.runner(built)
    short = {"input_ids": ids[:2, :5], "attention_mask": np.ones((2, 5), np.int64)}
    np.testing.assert_allclose(run(short)["y"], source.reference(short)["y"], atol=1e-5)

    real = tfl.check_buckets

    def fail_at(length: str) -> Any:
        def check(*args: Any, **kwargs: Any) -> dict[str, Any]:
            result = real(*args, **kwargs)
            result["lengths"][length]["passed"], result["passed"] = False, False
            result["failures"] = [f"bucket {length}: y: min cosine 0.5 < 0.95"]
            return result

        return check

    monkeypatch.setattr(tfl, "check_buckets", fail_at("16"))  # the calibration length (8) runs in bucket 8
    (failed,) = packager.build(source, tfl.Precision.FP32, tmp_path / "b", options, lambda _: None)
    assert isinstance(failed, CandidateFailed) and failed.stage == "validate" and "bucket 16" in failed.reason
    monkeypatch.setattr(tfl, "check_buckets", fail_at("8"))
    (offered,) = packager.build(source, tfl.Precision.FP32, tmp_path / "c", options, lambda _: None)
    assert isinstance(offered, BuiltModel) and not offered.recipe["buckets"]["passed"]


# ---- mixed precision -------------------------------------------------------------------------------------------
class _Sensitive(torch.nn.Module):
    """fc1 -> sensitive -> head. ``sensitive`` has a weight of 1000 in every row, on an input that is always 0:
    harmless in float, but int8 weights (one scale per row) round every other weight of the layer to 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.sensitive, self.head = torch.nn.Linear(16, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 8)
        with torch.no_grad():
            self.fc1.weight[0], self.fc1.bias[0] = 0.0, -1.0  # channel 0 is 0 after the ReLU
            self.sensitive.weight[:, 0] = 1000.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.sensitive(torch.relu(self.fc1(x)))))


def _weight_types(path: Path) -> dict[str, str]:
    """dtype of each FULLY_CONNECTED's weight tensor in a .tflite, by the op's order."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    tensors = {d["index"]: d for d in interpreter.get_tensor_details()}
    ops = [op for op in interpreter._get_ops_details() if op["op_name"] == "FULLY_CONNECTED"]
    return {f"fc{i}": np.dtype(tensors[op["inputs"][1]]["dtype"]).name for i, op in enumerate(ops)}


def test_float_layers_keep_the_sensitive_layer_float(key: Ed25519PrivateKey, trust: TrustedKeys,
                                                     tmp_path: Path) -> None:  # fmt: skip
    from packagers.registry import get_packager
    from packagers.targets._tflite_layers import quantized_layer_names

    x = np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32)
    runs = {}
    # plain: the search switched off (cap 0); mixed: the layer named by the user; searched: found by the search
    for name, float_layers, cap in (("plain", (), 0.0), ("mixed", ("fully_connected:inner.sensitive",), 0.0),
                                    ("searched", (), 0.1)):  # fmt: skip
        (result,) = package(_Sensitive().eval(), name=name, version=1, key=key, out_dir=tmp_path / name,
                            target="tflite", precision="int8-dynamic", calibration={"input": x}, accept_drift=True,
                            example_inputs=(torch.zeros(1, 16),),
                            options=PackageOptions(float_layers=float_layers, max_float_layers=cap))  # fmt: skip
        model = tmp_path / f"{name}.tflite"
        model.write_bytes(bundle_member(result, trust, tmp_path / f"{name}-x", "model.tflite"))
        report = json.loads(bundle_member(result, trust, tmp_path / f"{name}-r", "report.json"))
        runs[name] = (result, model, report)
    plain, mixed = runs["plain"], runs["mixed"]
    assert not plain[0].validation["passed"]  # the plain recipe misses the tolerance
    assert mixed[0].validation["passed"]
    cos = {k: v[0].validation["metrics"]["output"]["cosine_min"] for k, v in runs.items()}
    assert cos["plain"] < 0.9 < 0.999 < cos["mixed"], cos
    assert mixed[2]["build"]["float_layers"] == ["fully_connected:inner.sensitive"]
    assert plain[2]["build"]["float_layers"] == []
    # the interpreter sees the sensitive layer's weights in float, the others in int8
    assert _weight_types(plain[1]) == {"fc0": "int8", "fc1": "int8", "fc2": "int8"}
    assert _weight_types(mixed[1]) == {"fc0": "int8", "fc1": "float32", "fc2": "int8"}
    named = quantized_layer_names(plain[1])
    assert "fully_connected:inner.sensitive" in named and len(named) == 3
    assert "fully_connected:inner.sensitive" not in quantized_layer_names(mixed[1])
    searched = runs["searched"]  # the mixed-precision search finds that layer by itself, and only it
    assert searched[0].validation["passed"]
    assert searched[2]["build"]["float_layers"] == ["fully_connected:inner.sensitive"]
    assert _weight_types(searched[1]) == {"fc0": "int8", "fc1": "float32", "fc2": "int8"}
    assert hasattr(get_packager("tflite"), "quantized_layers")


def test_static_int8_calibrates_once_per_sample_count(monkeypatch: pytest.MonkeyPatch, key: Ed25519PrivateKey,
                                                     trust: TrustedKeys, tmp_path: Path) -> None:  # fmt: skip
    """The float model's statistics do not depend on the layers kept float: every build of the search reuses
    them (calibrating MiniLM's five buckets took 55 s, and the search rebuilds dozens of times)."""
    from ai_edge_quantizer import quantizer

    from packagers.mixed_precision import PROBE_SAMPLES

    calls: list[int] = []
    original = quantizer.Quantizer.calibrate

    def counting(self: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(next(iter(data.values()))))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(quantizer.Quantizer, "calibrate", counting)
    x = np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32)
    (result,) = package(_Sensitive().eval(), name="cal", version=1, key=key, out_dir=tmp_path / "out", target="tflite",
                        precision="int8", calibration={"input": x}, accept_drift=True,
                        example_inputs=(torch.zeros(1, 16),), options=PackageOptions(calibration_size=24))  # fmt: skip
    report = json.loads(bundle_member(result, trust, tmp_path / "r", "report.json"))
    assert report["build"]["mixed_precision"]["builds"] > 2  # the search ran
    assert sorted(calls) == [PROBE_SAMPLES, 24]  # the plain build's 24 samples, the probes' 8: once each
    assert report["build"]["quantization"]["calibration_samples"] == 24


def test_float_layers_regex_and_unknown_names(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    (result,) = package(_Sensitive().eval(), name="re", version=1, key=key, out_dir=tmp_path / "a", target="tflite",
                        precision="int8", calibration={"input": x}, accept_drift=True,
                        example_inputs=(torch.zeros(1, 16),),
                        options=PackageOptions(float_layers=("sensitive",)))  # fmt: skip
    assert result.validation["metrics"]["output"]["cosine_min"] > 0.8  # the static recipe improves too
    with pytest.raises(PackagingError, match="matches no layer of the TFLite model"):
        package(_Sensitive().eval(), name="x", version=1, key=key, out_dir=tmp_path / "b", target="tflite",
                precision="int8-dynamic", calibration={"input": x}, example_inputs=(torch.zeros(1, 16),),
                options=PackageOptions(float_layers=("no_such_layer",)))  # fmt: skip
