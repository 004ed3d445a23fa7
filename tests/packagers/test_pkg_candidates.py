"""Candidate fallback: a candidate that fails to build, load, run or validate is dropped with its reason and
the best valid one is kept; per-target precision lists; honest defaults (int8 calibration, overwrite)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx_graphs import linear_onnx
from packager_checks import open_bundle

from packagers import PackageOptions, Precision, Target, package
from packagers.registry import BuiltModel, CandidateFailed
from packagers.requests import parse_pairs
from packagers.targets import _ort_quant
from packagers.targets.onnxruntime import OnnxRuntimePackager
from sdk.errors import DriftError, PackagingError
from sdk.signing import TrustedKeys

FAST = PackageOptions(benchmark_runs=2, benchmark_warmup=1, validation_samples=8)
X = np.random.default_rng(3).normal(size=(16, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graphs")
    corrupt = root / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 not a protobuf graph")
    wrong = linear_onnx(root / "wrong.onnx")
    from onnx import numpy_helper

    model = onnx.load(str(wrong))
    model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(-numpy_helper.to_array(model.graph.initializer[0]), "W")
    )
    onnx.save(model, str(wrong))
    return {
        "good": linear_onnx(root / "good.onnx"),
        "corrupt": corrupt,
        "fixed-batch": linear_onnx(root / "fixed.onnx", x_dims=(1, 4), y_dims=(1, 3)),
        "wrong": wrong,
    }


def _fake_build(graphs: dict[str, Path], labels: list[str]) -> Any:
    def build(self: Any, source: Any, precision: Precision, workdir: Path, options: Any, progress: Any) -> list[Any]:
        out: list[BuiltModel | CandidateFailed] = [CandidateFailed("broken-recipe", "build", "the quantizer raised")]
        for label in labels:
            workdir.mkdir(parents=True, exist_ok=True)
            path = shutil.copy(graphs[label], workdir / f"{label}.onnx")
            out.append(BuiltModel(Path(path), "model.onnx", {"package": "onnxruntime", "opset": 17}, {}, label))
        return out

    return build


def test_broken_candidates_are_dropped_with_their_reasons(
    graphs: dict[str, Path], key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(OnnxRuntimePackager, "build", _fake_build(graphs, ["corrupt", "fixed-batch", "wrong", "good"]))
    lines: list[str] = []
    (result,) = package(graphs["good"], name="m", version=1, key=key, out_dir=tmp_path, calibration={"x": X},
                        options=FAST, progress=lines.append)  # fmt: skip
    report = json.loads(open_bundle(result, trust, tmp_path / "b").path("report.json").read_bytes())
    assert report["chosen"] == "good" and result.validation["passed"]
    stages = {c["candidate"]: c.get("stage") for c in report["candidates"]}
    assert stages == {"broken-recipe": "build", "corrupt": "load", "fixed-batch": "run", "wrong": "validate",
                      "good": None}  # fmt: skip
    reasons = {c["candidate"]: c.get("reason", "") for c in report["candidates"]}
    assert "cannot load" in reasons["corrupt"] and "failed to run on 16 samples" in reasons["fixed-batch"]
    assert "cosine" in reasons["wrong"] and reasons["broken-recipe"] == "the quantizer raised"
    dropped = [line for line in lines if "dropped" in line]
    assert len(dropped) == 3 and any("corrupt dropped (the runtime cannot load it" in line for line in dropped)


def test_no_valid_candidate_fails_listing_every_reason(
    graphs: dict[str, Path], key: Ed25519PrivateKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(OnnxRuntimePackager, "build", _fake_build(graphs, ["corrupt", "fixed-batch"]))
    with pytest.raises(PackagingError) as err:
        package(graphs["good"], name="m", version=1, key=key, out_dir=tmp_path, calibration={"x": X}, options=FAST)
    text = str(err.value)
    assert text.startswith("nothing was written: onnxruntime fp32: no candidate could be built, loaded and run")
    assert "broken-recipe (build): the quantizer raised" in text and "corrupt (load)" in text
    assert "fixed-batch (run)" in text and not list(tmp_path.glob("*.edgebundle"))
    # Candidates that ran but all miss the tolerance are still a drift, not a packaging error.
    monkeypatch.setattr(OnnxRuntimePackager, "build", _fake_build(graphs, ["wrong"]))
    with pytest.raises(DriftError):
        package(graphs["good"], name="m", version=1, key=key, out_dir=tmp_path, calibration={"x": X}, options=FAST)


def test_ort_static_int8_keeps_per_tensor_when_per_channel_cannot_load(
    graphs: dict[str, Path], key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The CNN case: per-channel QDQ wrote a graph onnxruntime refuses (INVALID_GRAPH); per-tensor is kept."""
    real = _ort_quant.quantize_static_qdq

    def quantize(src: Path, dst: Path, feeds: Any, **kwargs: Any) -> dict[str, Any]:
        info = real(src, dst, feeds, **kwargs)
        if kwargs["per_channel"]:  # a graph onnx reads and onnxruntime refuses to load
            model = onnx.load(str(dst))
            next(n for n in model.graph.node if n.op_type == "DequantizeLinear").op_type = "DequantizeLinearBias"
            onnx.save(model, str(dst))
        return info

    monkeypatch.setattr(_ort_quant, "quantize_static_qdq", quantize)
    (result,) = package(graphs["good"], name="m", version=1, key=key, out_dir=tmp_path, precision="int8",
                        calibration={"x": X}, options=FAST)  # fmt: skip
    report = json.loads(open_bundle(result, trust, tmp_path / "b").path("report.json").read_bytes())
    assert report["chosen"] == "per-tensor"
    (dropped,) = [c for c in report["candidates"] if c["candidate"] == "per-channel"]
    assert dropped["stage"] == "load" and "cannot load" in dropped["reason"]


def test_a_precision_that_cannot_apply_is_skipped_with_a_note(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    """int4 needs MatMul weights; on a Gemm-only graph it is skipped while int8-dynamic is written."""
    model = linear_onnx(tmp_path / "gemm.onnx", op="Gemm")
    lines: list[str] = []
    results = package(model, name="g", version=1, key=key, out_dir=tmp_path / "out", precision="int8-dynamic,int4",
                      options=FAST, progress=lines.append)  # fmt: skip
    assert [r.precision for r in results] == ["int8-dynamic"]
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    (skipped,) = doc["skipped"]
    assert skipped.startswith("onnxruntime int4: no candidate") and "MatMulNBits" in skipped
    assert any(line.endswith(": skipped") and "int4" in line for line in lines), lines
    assert "Skipped: onnxruntime int4" in (tmp_path / "out" / "report.html").read_text()


def test_static_int8_needs_calibration_or_an_explicit_allowance(
    key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path
) -> None:
    model = linear_onnx(tmp_path / "m.onnx")
    with pytest.raises(PackagingError, match=r"pass --calibration .* or pass --allow-random-calibration"):
        package(model, name="m", version=1, key=key, out_dir=tmp_path / "out", precision="fp32,int8", options=FAST)
    assert not (tmp_path / "out").exists()  # refused before any work
    opts = PackageOptions(benchmark_runs=2, benchmark_warmup=1, validation_samples=8, allow_random_calibration=True)
    (result,) = package(model, name="m", version=1, key=key, out_dir=tmp_path / "out", precision="int8", options=opts)
    assert result.validation["data"] == "random (seed 0)"
    report = json.loads(open_bundle(result, trust, tmp_path / "b").path("report.json").read_bytes())
    assert report["data"] == {"origin": "random (seed 0)", "generated": True, "random_calibration": True}
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["bundles"][0]["generated_data"] is True
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Validated on generated data" in html and "passed (on generated data)" in html


def test_an_existing_bundle_is_not_replaced_without_overwrite(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    model = linear_onnx(tmp_path / "m.onnx")
    (first,) = package(model, name="m", version=1, key=key, out_dir=tmp_path, calibration={"x": X}, options=FAST)
    before = first.bundle_path.read_bytes()
    lines: list[str] = []
    with pytest.raises(PackagingError, match=r"m-1-onnxruntime-fp32.edgebundle already in .*--overwrite"):
        package(model, name="m", version=1, key=key, out_dir=tmp_path, precision="int8-dynamic,fp32",
                options=FAST, progress=lines.append)  # fmt: skip
    assert first.bundle_path.read_bytes() == before and not any("running" in line for line in lines)
    assert not (tmp_path / "m-1-onnxruntime-int8-dynamic.edgebundle").exists()
    again = PackageOptions(benchmark_runs=2, benchmark_warmup=1, overwrite=True)
    (second,) = package(model, name="m", version=1, key=key, out_dir=tmp_path, calibration={"x": X}, options=again)
    assert second.bundle_path == first.bundle_path
    (third,) = package(model, name="m", version=2, key=key, out_dir=tmp_path, calibration={"x": X}, options=FAST)
    assert third.bundle_path.name == "m-2-onnxruntime-fp32.edgebundle"


def test_per_target_precisions_and_all_int8() -> None:
    t, pairs, notes = parse_pairs("onnxruntime,openvino", ["onnxruntime=fp32,int8-dynamic", "openvino=int8"], "onnx")
    assert t == [Target.ONNXRUNTIME, Target.OPENVINO] and notes == []
    assert pairs == [(Target.ONNXRUNTIME, Precision.FP32), (Target.ONNXRUNTIME, Precision.INT8_DYNAMIC),
                     (Target.OPENVINO, Precision.INT8)]  # fmt: skip
    _, mapped, _ = parse_pairs(["onnxruntime", "openvino"], {"openvino": ["fp16"], "onnxruntime": "fp32"}, "onnx")
    assert mapped == [(Target.OPENVINO, Precision.FP16), (Target.ONNXRUNTIME, Precision.FP32)]
    _, family, notes = parse_pairs("onnxruntime,openvino", "all-int8", "onnx")
    assert (Target.ONNXRUNTIME, Precision.INT8_DYNAMIC) in family and (Target.OPENVINO, Precision.INT8) in family
    assert all(p.value.startswith("int8") for _, p in family)
    assert any(n.startswith("openvino does not support int8-dynamic: skipped (all-int8)") for n in notes), notes
    # A plain list keeps its meaning: every target must support every precision.
    with pytest.raises(PackagingError, match="target openvino does not support precision int8-dynamic"):
        parse_pairs("onnxruntime,openvino", "fp32,int8-dynamic", "onnx")


@pytest.mark.parametrize(
    ("target", "precision", "message"),
    [
        ("onnxruntime", ["onnxruntime=fp32", "int8"], "not both"),
        ("onnxruntime", ["openvino=fp32"], r"target\(s\) openvino not in --target"),
        ("onnxruntime,openvino", ["onnxruntime=fp32"], r"no precision given for target\(s\) openvino"),
        ("onnxruntime", ["onnxruntime=fp64"], "unknown precision 'fp64'"),
    ],
)
def test_bad_precision_requests_are_refused(target: str, precision: list[str], message: str) -> None:
    with pytest.raises(PackagingError, match=message):
        parse_pairs(target, precision, "onnx")


@pytest.mark.parametrize(
    ("target", "precision", "hint"),
    [
        ("onnxruntime", "int8", "int8-dynamic, fp16 (--precision onnxruntime=int8-dynamic)"),
        ("openvino", "int8", "int8-weights, fp16 (passed in this run) (--precision openvino=int8-weights)"),
        ("openvino", "int8-weights", "fp16 (passed in this run) (--precision openvino=fp16)"),
        ("tflite", "int8-dynamic", "fp16 (--precision tflite=fp16)"),
        ("onnxruntime", "int4", "fp16 (--precision onnxruntime=fp16)"),
    ],
)
def test_a_refused_precision_names_those_that_keep_more_in_float(target: str, precision: str, hint: str) -> None:
    from types import SimpleNamespace

    from packagers.orchestrator import _what_to_try
    from packagers.registry import get_packager

    def plan(p: str, passed: bool) -> Any:
        return SimpleNamespace(target=Target(target), precision=Precision(p), packager=get_packager(target),
                               built=SimpleNamespace(recipe={}), validation={"passed": passed})  # fmt: skip

    others = [plan("fp16", True)] if target == "openvino" else []
    assert _what_to_try(plan(precision, False), [plan(precision, False), *others]) == (
        f" (or one that keeps more in float: {hint})"
    )
    assert _what_to_try(plan("fp16", False), []) == ""  # nothing keeps more in float than fp16
