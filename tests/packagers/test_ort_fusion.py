"""Attention fusion for ONNX Runtime int8-dynamic (``packagers/targets/_ort_fusion.py``) on a tiny BERT.

The fused candidate must be built, validated like the others, recorded (manifest and report), and run
through ``device_runtime.load`` at the optimisation level the manifest names; a graph without attention
is left alone, and a fusion whose outputs disagree with the original is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packager_checks import min_cosine, open_bundle

import device_runtime
from packagers import PackageOptions, package
from packagers.targets import _ort_fusion
from packagers.targets._ort_fusion import FusionError, fuse_attention, try_fuse
from sdk.compat import version_at_least
from sdk.signing import TrustedKeys


def _text_feeds(n: int = 24, length: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    ids = rng.integers(5, 100, size=(n, length)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[::3, 7:] = 0  # padded rows: the fused Attention must mask them as the original does
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@pytest.fixture(scope="module")
def tiny_bert_onnx(bert_feature_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT exported as the packager exports it (TorchScript exporter, dynamic batch/sequence)."""
    from transformers import BertModel

    from packagers.sources._torch_export import torch2onnx

    model = BertModel.from_pretrained(bert_feature_folder, attn_implementation="sdpa").eval()
    feeds = {k: torch.from_numpy(v[:2]) for k, v in _text_feeds().items()}

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> tuple[torch.Tensor]:  # fmt: skip
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return (out.last_hidden_state,)

    path = tmp_path_factory.mktemp("fusion") / "bert.onnx"
    axes = {k: {0: "batch", 1: "sequence"} for k in feeds} | {"last_hidden_state": {0: "batch", 1: "sequence"}}
    torch2onnx(Wrapper().eval(), tuple(feeds.values()), path, input_names=list(feeds),
                output_names=["last_hidden_state"], dynamic_axes=axes)  # fmt: skip
    return path


def test_fuse_attention_matches_the_original(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    info = fuse_attention(tiny_bert_onnx, tmp_path / "fused.onnx", _text_feeds())
    assert info["fused"] == 2 and info["heads"] == [2] and info["masked"] is True  # 2 layers, 2 heads
    assert info["max_relative_difference"] < 1e-4
    ops = [n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node]
    assert ops.count("Attention") == 2 and "Softmax" not in ops
    # a layer kept in float by name keeps its attention unfused (its MatMuls keep their names)
    query = next(
        n.name
        for n in onnx.load(str(tiny_bert_onnx)).graph.node
        if n.name.endswith("layer.1/attention/self/query/MatMul")
    )
    info = fuse_attention(tiny_bert_onnx, tmp_path / "kept.onnx", _text_feeds(), keep={query})
    assert info["fused"] == 1 and query in {n.name for n in onnx.load(str(tmp_path / "kept.onnx")).graph.node}


def test_fusion_is_refused_when_outputs_disagree(
    tiny_bert_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_ort_fusion, "_AGREEMENT", -1.0)  # any difference at all counts as a wrong match
    with pytest.raises(FusionError, match="changed the outputs"):
        fuse_attention(tiny_bert_onnx, tmp_path / "fused.onnx", _text_feeds())
    assert not (tmp_path / "fused.onnx").exists()
    path, info = try_fuse(tiny_bert_onnx, tmp_path / "fused.onnx", _text_feeds())
    assert path == tiny_bert_onnx and info["fused"] == 0 and "changed the outputs" in info["note"]


def test_graph_without_attention_is_left_alone(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    graph = helper.make_graph(  # a classifier head: MatMul + Softmax, no attention around the Softmax
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Softmax", ["h"], ["y"], axis=-1)],
        "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], initializer=[w],
    )  # fmt: skip
    src = tmp_path / "head.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    path, info = try_fuse(src, tmp_path / "fused.onnx", {"x": np.zeros((2, 4), np.float32)})
    assert path == src and info["fused"] == 0 and not (tmp_path / "fused.onnx").exists()


def test_int8_dynamic_bundle_is_fused_and_runs_on_the_device(
    bert_feature_folder: Path, key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path
) -> None:
    feeds = _text_feeds()
    fp32, int8 = package(bert_feature_folder, name="tiny-bert", version=1, key=key, out_dir=tmp_path / "out",
                         precision=["fp32", "int8-dynamic"], calibration=feeds)  # fmt: skip
    runtime = int8.manifest.runtime
    assert runtime["quantization"]["fused_attention"] == 2
    assert runtime["graph_optimization_level"] == _ort_fusion.DEVICE_LEVEL
    bundle = open_bundle(int8, trust, tmp_path / "int8")
    report = json.loads(bundle.path("report.json").read_bytes())
    fusion = report["build"]["quantization"]["attention_fusion"]
    assert fusion["fused"] == 2 and fusion["offline_optimization"]["disabled_optimizers"] == ["SkipLayerNormFusion"]
    assert "QAttention" in {n.op_type for n in onnx.load(str(bundle.path(bundle.manifest.model))).graph.node}
    with device_runtime.load(fp32.bundle_path, trust) as ref, device_runtime.load(int8.bundle_path, trust) as model:
        assert model.backend_info["graph_optimization_level"] == "ORT_ENABLE_BASIC"
        want, got = ref.predict(feeds)["last_hidden_state"], model.predict(feeds)["last_hidden_state"]
    rows = feeds["attention_mask"].astype(bool)
    assert min_cosine(want[rows], got[rows]) > 0.98  # unpadded tokens; int8 of a random tiny BERT


def test_no_fusion_when_an_older_runtime_is_asked_for(
    bert_feature_folder: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    (result,) = package(bert_feature_folder, name="tiny-bert", version=1, key=key, out_dir=tmp_path / "out",
                        precision="int8-dynamic", calibration=_text_feeds(),
                        options=PackageOptions(for_runtime="onnxruntime==1.17"))  # fmt: skip
    runtime = result.manifest.runtime
    assert runtime["quantization"]["fused_attention"] == 0 and runtime["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert version_at_least("1.17.0", runtime["min_version"])  # a 1.17 device takes it
