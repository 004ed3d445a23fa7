"""ONNX Runtime target: fp16, static int8 (QDQ), int4 (MatMulNBits) and the ORT format.

Each new precision is built once per input kind (torch module, transformers folder, .onnx file), and
every bundle is opened the way a device opens it: ``device_runtime.load`` verifies it and runs it in
onnxruntime, and the golden health check passes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packager_checks import Digits, assert_golden_healthy, min_cosine, open_bundle

import device_runtime
from packagers import PackageOptions, PackageResult, capabilities, package
from sdk.errors import PackagingError
from sdk.golden import check_golden
from sdk.signing import TrustedKeys


def _report(bundle: Any) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(bundle.path("report.json").read_bytes())
    return report


def _device_run(result: PackageResult, trust: TrustedKeys, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Load the bundle with the device runtime (verification + onnxruntime) and predict."""
    with device_runtime.load(result.bundle_path, trust) as model:
        return model.predict(feeds)


def _check_bundle(result: PackageResult, trust: TrustedKeys, dest: Path) -> Any:
    bundle = open_bundle(result, trust, dest)
    assert bundle.manifest.validation["passed"]
    assert_golden_healthy(bundle)
    golden_in = {k: np.load(bundle.path(p)) for k, p in bundle.manifest.golden["inputs"].items()}
    golden_out = {k: np.load(bundle.path(p)) for k, p in bundle.manifest.golden["outputs"].items()}
    outs = _device_run(result, trust, golden_in)
    assert check_golden(outs, golden_out, bundle.manifest.golden["tolerance"]) == []
    return bundle


class SeqMLP(torch.nn.Module):
    """Linear layers on [batch, tokens, features]: exported as MatMul + Add (what int4 quantizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.net(x))


def test_capabilities_declare_the_new_precisions() -> None:
    caps = capabilities("onnxruntime")
    assert [p.value for p in caps.precisions] == ["fp32", "fp16", "int8-dynamic", "int8", "int4"]
    assert caps.input_kinds == ("torch", "transformers", "onnx")


def test_torch_module_fp16_int8_int4(key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = SeqMLP().eval()
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((48, 8, 32)).astype(np.float32)}
    results = package(module, name="seq-mlp", version=1, key=key, out_dir=tmp_path, precision=["fp16", "int8", "int4"],
                      example_inputs=(torch.from_numpy(calib["x"][:2]),), calibration=calib,
                      options=PackageOptions(input_names=["x"], output_names=["y"]))  # fmt: skip
    feeds = {"x": rng.standard_normal((3, 8, 32)).astype(np.float32)}  # another batch size: the batch stays dynamic
    with torch.no_grad():
        ref = module(torch.from_numpy(feeds["x"])).numpy()
    for result in results:
        bundle = _check_bundle(result, trust, tmp_path / result.precision)
        m = bundle.manifest
        assert [(t.name, t.dtype) for t in m.inputs] == [("x", "float32")]  # fp16 keeps float32 I/O
        assert m.validation["data"] == "calibration"
        out = _device_run(result, trust, feeds)["y"]
        assert out.dtype == np.float32 and out.shape == (3, 8, 16)
        assert min_cosine(ref, out) > {"fp16": 0.9999, "int8": 0.97, "int4": 0.95}[result.precision]
        build = _report(bundle)["build"]
        if result.precision == "fp16":
            assert build["conversion"]["keep_io_types"] is True
            assert m.runtime["quantization"]["method"] == "fp16"
        elif result.precision == "int8":
            quant = build["quantization"]
            assert quant["format"] == "QDQ" and quant["calibration_method"] in ("minmax", "percentile")
            candidates = {c["candidate"] for c in _report(bundle)["candidates"]}  # no method given: both are tried
            assert {"per-channel", "per-channel-percentile"} <= candidates
            assert quant["recipe"] == "default" and quant["calibration_data"] == "calibration"
            assert m.runtime["quantization"]["method"] == "static"
        else:
            assert build["quantization"]["block_size"] == 32 and build["quantization"]["converted"] == 2
            assert m.runtime["quantization"]["op"] == "com.microsoft.MatMulNBits"


def test_transformers_fp16_int8_int4_and_smoothed_dynamic(
    bert_feature_folder: Path,
    key: Ed25519PrivateKey,
    trust: TrustedKeys,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # the quantization tools must not drop files into the current directory
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 100, size=(40, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[::3, 9:] = 0
    calib = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    results = package(bert_feature_folder, name="tiny-bert", version=1, key=key, out_dir=tmp_path / "out",
                      precision=["fp16", "int8", "int4", "int8-dynamic"], calibration=calib,
                      options=PackageOptions(extra={"int4_block_size": 16}))  # fmt: skip
    for result in results:
        bundle = _check_bundle(result, trust, tmp_path / result.precision)
        metrics = bundle.manifest.validation["metrics"]["last_hidden_state"]
        assert (
            metrics["cosine_mean"]
            > {"fp16": 0.9999, "int8": 0.99, "int4": 0.95, "int8-dynamic": 0.99}[result.precision]
        )
        report = _report(bundle)
        build = report["build"]
        if result.precision == "int8-dynamic":  # transformer graphs get a smoothed third candidate
            labels = [c["candidate"] for c in report["candidates"]]
            assert labels == ["per-tensor", "per-channel", "per-channel-smoothed"]
            if report["chosen"] == "per-channel-smoothed":
                assert build["quantization"]["smoothing"]["activations"] == 8
        if result.precision == "int8":
            quant = build["quantization"]
            assert quant["recipe"] == "transformer" and quant["per_channel"] is True
            assert quant["smoothing"]["activations"] == 8  # 2 layers x (QKV, context, FFN in, FFN out)
            assert quant["op_types"] == ["MatMul", "Gemm", "Conv", "Gather"]
            # the embedding tables are stored int8 too (a float word table tripled MiniLM's static bundle)
            graph = onnx.load(str(bundle.path(bundle.manifest.model))).graph
            floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
            tables = [n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in floats]
            dequantized = [n for n in graph.node if n.op_type == "Gather" and "DequantizeLinear" in n.input[0]]
            assert tables == [] and dequantized, [list(n.input) for n in graph.node if n.op_type == "Gather"]
            assert bundle.manifest.runtime["quantization"]["smoothed"] is True
        if result.precision == "int4":
            assert build["quantization"]["block_size"] == 16 and build["quantization"]["converted"] == 12
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".onnx"] == []


def test_onnx_file_fp16_int8_and_int4_refused(cnn: torch.nn.Module, digits: Digits, key: Ed25519PrivateKey,
                                              trust: TrustedKeys, tmp_path: Path) -> None:  # fmt: skip
    path = tmp_path / "cnn.onnx"
    x = digits.x_val.reshape(-1, 1, 8, 8)
    torch.onnx.export(cnn, (torch.from_numpy(x[:2]),), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False)  # fmt: skip
    np.savez(tmp_path / "calib.npz", image=x[:96])
    options = PackageOptions(calibration_method="percentile")
    results = package(path, name="cnn", version=1, key=key, out_dir=tmp_path / "out", precision=["fp16", "int8"],
                      calibration=tmp_path / "calib.npz", options=options)  # fmt: skip
    for result in results:
        bundle = _check_bundle(result, trust, tmp_path / result.precision)
        assert bundle.manifest.validation["metrics"]["logits"]["top1_agreement"] >= 0.95
        if result.precision == "int8":
            quant = _report(bundle)["build"]["quantization"]
            assert quant["calibration_method"] == "percentile" and quant["recipe"] == "default"
            assert _report(bundle)["chosen"] in ("per-tensor", "per-channel", "per-channel-conv")
    with pytest.raises(PackagingError, match="MatMul layers with constant weights"):
        package(path, name="cnn", version=1, key=key, out_dir=tmp_path / "refused", precision="int4",
                calibration=tmp_path / "calib.npz")  # fmt: skip
    assert not (tmp_path / "refused").exists()


def test_ort_format_round_trip(bert_cls_folder: Path, key: Ed25519PrivateKey, trust: TrustedKeys,
                               tmp_path: Path) -> None:  # fmt: skip
    results = package(bert_cls_folder, name="tiny-cls", version=1, key=key, out_dir=tmp_path / "out",
                      precision=["fp32", "int8"],
                      options=PackageOptions(extra={"ort_format": True}, allow_random_calibration=True))  # fmt: skip
    for result in results:
        m = result.manifest
        assert m.model == "model.ort" and m.runtime["format"] == "ort"
        assert [f.path for f in m.files if f.path.startswith("model.")] == ["model.ort"]
        bundle = open_bundle(result, trust, tmp_path / result.precision)
        assert bundle.path("model.ort").read_bytes()[4:8] == b"ORTM"  # flatbuffer file identifier
        assert _report(bundle)["build"]["ort_format"]["optimization_style"] == "Fixed"
        golden_in = {k: np.load(bundle.path(p)) for k, p in m.golden["inputs"].items()}
        golden_out = {k: np.load(bundle.path(p)) for k, p in m.golden["outputs"].items()}
        outs = _device_run(result, trust, golden_in)
        assert check_golden(outs, golden_out, m.golden["tolerance"]) == []


def test_bad_options_are_refused(bert_feature_folder: Path, key: Ed25519PrivateKey,
                                                 tmp_path: Path) -> None:  # fmt: skip
    with pytest.raises(PackagingError, match="calibration_method"):
        PackageOptions(calibration_method="kl")
    for extra, match in (({"int4_block_size": 24}, "int4_block_size"), ({"ort_format": "yes"}, "ort_format")):
        with pytest.raises(PackagingError, match=match):
            package(bert_feature_folder, name="x", version=1, key=key, out_dir=tmp_path / "out", precision="int4",
                    options=PackageOptions(extra=extra))  # fmt: skip
    assert not (tmp_path / "out").exists()
