"""Packaging torch modules for onnxruntime: fp32 and int8-dynamic, read back and run like a device."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packager_checks import Digits, assert_golden_healthy, min_cosine, open_bundle, run

from packagers import PackageOptions, Tolerances, package
from sdk.errors import DriftError, PackagingError
from sdk.manifest import TensorSpec
from sdk.signing import TrustedKeys


def _torch_out(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_mlp_fp32_and_int8_with_labels(
    mlp: torch.nn.Module, digits: Digits, key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path
) -> None:
    lines: list[str] = []
    results = package(
        mlp, name="digits-mlp", version=3, key=key, out_dir=tmp_path / "out", precision=["fp32", "int8-dynamic"],
        example_inputs=(torch.from_numpy(digits.x_train[:2]),), calibration={"input": digits.x_val},
        labels=digits.y_val, label="3.0-rc1", progress=lines.append,
    )  # fmt: skip
    assert [(r.target, r.precision) for r in results] == [("onnxruntime", "fp32"), ("onnxruntime", "int8-dynamic")]
    assert any("validation passed" in line for line in lines) and any("wrote" in line for line in lines)
    for i, result in enumerate(results):
        bundle = open_bundle(result, trust, tmp_path / f"b{i}")
        m = bundle.manifest
        assert (m.name, m.version, m.label, m.model) == ("digits-mlp", 3, "3.0-rc1", "model.onnx")
        assert m.inputs == (TensorSpec("input", "float32", ("batch", 64)),)
        assert m.outputs == (TensorSpec("output", "float32", ("batch", 10)),)
        v = m.validation
        assert v["passed"] is True and v["accepted_drift"] is False and v["failures"] == []
        assert v["reference"] == f"torch {torch.__version__.split('+')[0]}"
        assert v["samples"] == len(digits.x_val) and v["data"] == "calibration"
        metrics = v["metrics"]["output"]
        assert set(metrics) >= {"max_abs_diff", "mean_abs_diff", "cosine_mean", "cosine_min", "top1_agreement"}
        acc = v["accuracy"]
        assert acc["output"] == "output" and acc["reference"] > 0.8 and acc["drop"] <= 0.03
        assert v["tolerances"]["min_cosine"] == (0.9999 if result.precision == "fp32" else 0.95)
        assert set(result.latency_ms) >= {"p50", "p95", "runs"} and result.latency_ms["p50"] > 0
        assert v["benchmark"]["batch"] == 1
        assert {f.path for f in m.files} >= {"model.onnx", "report.json", *m.golden_paths()}
        assert m.golden["inputs"]["input"].startswith("golden/inputs/")
        assert_golden_healthy(bundle)
        report = json.loads(bundle.path("report.json").read_bytes())
        assert report["validation"] == v and report["benchmark"]["p50"] == result.latency_ms["p50"]
        assert report["source"]["kind"] == "torch" and report["build"]["export"]["exporter"] == "torchscript"
        # The bundle's model on fresh data matches torch.
        out = run(bundle, {"input": digits.x[1600:1700]})["output"]
        ref = _torch_out(mlp, digits.x[1600:1700])
        if result.precision == "fp32":
            assert np.abs(out - ref).max() < 1e-4 and metrics["cosine_min"] > 0.99999
            assert m.runtime["graph_optimization_level"] == "ORT_ENABLE_ALL"
        else:
            assert min_cosine(ref, out) > 0.98 and (out.argmax(1) == ref.argmax(1)).mean() > 0.95
            assert m.runtime["quantization"]["weight_type"] == "QInt8"
            ops = {n.op_type for n in onnx.load(str(bundle.path("model.onnx"))).graph.node}
            assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
        assert m.runtime["package"] == "onnxruntime" and m.runtime["providers"] == ["CPUExecutionProvider"]
        assert m.runtime["min_version"].count(".") == 2 and m.runtime["arch"] == ["any"]
        assert m.runtime["opset"] == 17 and m.runtime["exporter"] == "torchscript"


def test_cnn_fp32_and_int8(cnn: torch.nn.Module, digits: Digits, key: Ed25519PrivateKey, trust: TrustedKeys,
                           tmp_path: Path) -> None:  # fmt: skip
    images = digits.x_val.reshape(-1, 1, 8, 8)
    results = package(
        cnn, name="digits-cnn", version=1, key=key, out_dir=tmp_path, precision="fp32,int8-dynamic",
        example_inputs={"image": images[:2]}, options=PackageOptions(output_names=["logits"], golden_samples=3),
    )  # fmt: skip
    assert len(results) == 2
    for i, result in enumerate(results):
        bundle = open_bundle(result, trust, tmp_path / f"b{i}")
        m = bundle.manifest
        assert m.inputs == (TensorSpec("image", "float32", ("batch", 1, 8, 8)),)
        assert m.outputs == (TensorSpec("logits", "float32", ("batch", 10)),)
        assert m.validation["samples"] == 32 and m.validation["data"].startswith("random")
        assert m.validation["metrics"]["logits"]["top1_agreement"] >= 0.9
        assert m.golden["samples"] == 3
        assert_golden_healthy(bundle)
        out = run(bundle, {"image": images[:64]})["logits"]
        ref = _torch_out(cnn, images[:64])
        assert min_cosine(ref, out) > (0.99999 if result.precision == "fp32" else 0.98)
    # The real digits are classified the same way by the int8 bundle.
    int8 = run(open_bundle(results[1], trust, tmp_path / "again"), {"image": images})["logits"]
    assert (int8.argmax(1) == _torch_out(cnn, images).argmax(1)).mean() > 0.95
    ops = {n.op_type for n in onnx.load(str(tmp_path / "again" / "model.onnx")).graph.node}
    assert "ConvInteger" in ops


def test_module_mode_is_restored(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    model.train()
    (result,) = package(model, name="m", version=1, key=key, out_dir=tmp_path, example_inputs=(torch.randn(2, 4),))
    assert result.validation["passed"]  # dropout was off during validation
    assert model.training and all(m.training for m in model.modules())


def test_dynamo_exporter(mlp: torch.nn.Module, key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path) -> None:
    (result,) = package(
        mlp, name="dyn", version=1, key=key, out_dir=tmp_path, example_inputs=(torch.rand(2, 64),),
        options=PackageOptions(exporter="dynamo", input_names=["pixels"], output_names=["scores"]),
    )  # fmt: skip
    bundle = open_bundle(result, trust, tmp_path / "b")
    assert bundle.manifest.runtime["exporter"] == "dynamo"
    assert bundle.manifest.inputs == (TensorSpec("pixels", "float32", ("batch", 64)),)
    out = run(bundle, {"pixels": np.ones((5, 64), np.float32)})["scores"]
    assert out.shape == (5, 10)


class Branchy(torch.nn.Module):
    """Data-dependent Python control flow: tracing keeps only the branch the example took."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_broken_export_raises_drift_and_writes_nothing(
    key: Ed25519PrivateKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "out"
    negative = -np.abs(np.random.default_rng(0).standard_normal((12, 8))).astype(np.float32)
    with pytest.raises(DriftError) as err:
        package(Branchy(), name="branchy", version=1, key=key, out_dir=out, precision=["fp32", "int8-dynamic"],
                example_inputs=(torch.ones(2, 8),), calibration={"input": negative})  # fmt: skip
    message = str(err.value)
    assert "fp32" in message and "cosine" in message and "--accept-drift" in message
    assert not out.exists() or not any(out.iterdir())
    assert list(scratch.iterdir()) == []  # the temporary folder was removed


def test_accept_drift_signs_and_records_it(key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path) -> None:
    negative = -np.abs(np.random.default_rng(0).standard_normal((12, 8))).astype(np.float32)
    (result,) = package(Branchy(), name="branchy", version=1, key=key, out_dir=tmp_path, accept_drift=True,
                        example_inputs=(torch.ones(2, 8),), calibration={"input": negative})  # fmt: skip
    v = open_bundle(result, trust, tmp_path / "b").manifest.validation
    assert v["passed"] is False and v["accepted_drift"] is True
    assert v["metrics"]["output"]["cosine_min"] < -0.99 and v["failures"]


def test_unmeetable_tolerances_fail_int8(mlp: torch.nn.Module, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    strict = PackageOptions(
        tolerances={"int8-dynamic": Tolerances(min_cosine=1.0, min_cosine_mean=1.0, max_rel_diff=0.0)}
    )
    with pytest.raises(DriftError, match="int8-dynamic"):
        package(mlp, name="m", version=1, key=key, out_dir=tmp_path, precision="int8-dynamic",
                example_inputs=(torch.rand(2, 64),), options=strict)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_torch_input_errors(mlp: torch.nn.Module, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    with pytest.raises(PackagingError, match="example_inputs"):
        package(mlp, name="m", version=1, key=key, out_dir=tmp_path)
    with pytest.raises(PackagingError, match="failed on example_inputs"):
        package(mlp, name="m", version=1, key=key, out_dir=tmp_path, example_inputs=(torch.rand(2, 5),))
    with pytest.raises(PackagingError, match="calibration data must hold exactly"):
        package(mlp, name="m", version=1, key=key, out_dir=tmp_path, example_inputs=(torch.rand(2, 64),),
                calibration={"x": np.zeros((4, 64), np.float32)})  # fmt: skip
    with pytest.raises(PackagingError, match="dim 1 is 63"):
        package(mlp, name="m", version=1, key=key, out_dir=tmp_path, example_inputs=(torch.rand(2, 64),),
                calibration={"input": np.zeros((4, 63), np.float32)})  # fmt: skip
    with pytest.raises(PackagingError, match="labels"):
        package(mlp, name="m", version=1, key=key, out_dir=tmp_path, example_inputs=(torch.rand(2, 64),),
                calibration={"input": np.zeros((4, 64), np.float32)}, labels=np.zeros(5, np.int64))  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_calibration_from_files(mlp: torch.nn.Module, digits: Digits, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    np.savez(tmp_path / "cal.npz", input=digits.x_val[:20])
    folder = tmp_path / "cal"
    folder.mkdir()
    np.save(folder / "input.npy", digits.x_val[:30].astype(np.float64))  # float64 is cast to the model's float32
    for i, cal in enumerate((tmp_path / "cal.npz", folder)):
        (result,) = package(mlp, name="m", version=1, key=key, out_dir=tmp_path / f"o{i}",
                            example_inputs=(torch.rand(2, 64),), calibration=cal)  # fmt: skip
        assert result.validation["samples"] == (20, 30)[i] and result.validation["passed"]


def test_validation_samples_are_capped(mlp: torch.nn.Module, digits: Digits, key: Ed25519PrivateKey,
                                       tmp_path: Path) -> None:  # fmt: skip
    (result,) = package(mlp, name="m", version=1, key=key, out_dir=tmp_path, example_inputs=(torch.rand(2, 64),),
                        calibration={"input": digits.x_val}, labels=digits.y_val,
                        options=PackageOptions(max_validation_samples=40, golden_samples=2))  # fmt: skip
    assert result.validation["samples"] == 40 and "accuracy" in result.validation
    assert result.manifest.golden["samples"] == 2
