"""The mixed-precision search: plain int8 ruins one layer of a tiny MLP, the search finds it and keeps only it float.

The model (``mixed_models``) has four layers; ``fc1`` sees an input feature 300x smaller than the
others with weights 300x larger, which int8 cannot hold. On every int8 recipe (onnxruntime static and
dynamic, OpenVINO NNCF) plain int8 fails validation and the search must keep exactly ``fc1`` in
float, the other three int8, and record that in the manifest and the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mixed_models import LAYERS, SENSITIVE, sensitive_inputs, write_sensitive_mlp
from packager_checks import open_bundle

from packagers import PackageOptions, Target, Tolerances, package
from sdk.errors import DriftError
from sdk.signing import TrustedKeys


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sensitive_mlp(tmp_path_factory.mktemp("mixed") / "mlp.onnx")


def _package(mlp: Path, key: Ed25519PrivateKey, out: Path, target: str, precision: str, lines: list[str] | None = None,
             **options: Any) -> Any:  # fmt: skip
    results = package(str(mlp), name="mlp", version=1, key=key, out_dir=out, target=target, precision=precision,
                      calibration=sensitive_inputs(), options=PackageOptions(**options),
                      progress=None if lines is None else lines.append)  # fmt: skip
    return results[0]


def _report(result: Any, trust: TrustedKeys, dest: Path) -> tuple[Any, dict[str, Any]]:
    bundle = open_bundle(result, trust, dest)
    return bundle, json.loads(bundle.path("report.json").read_bytes())


@pytest.mark.parametrize("precision", ["int8", "int8-dynamic"])
def test_onnxruntime_search_keeps_only_the_sensitive_layer_float(
    precision: str, mlp: Path, key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path
) -> None:
    import onnx

    lines: list[str] = []
    result = _package(mlp, key, tmp_path, "onnxruntime", precision, lines, max_float_layers=2, target_cosine=0.999)
    bundle, report = _report(result, trust, tmp_path / "x")
    fc1 = f"{SENSITIVE}/MatMulAddFusion"  # onnxruntime's pre-processing fused MatMul + Add into a Gemm
    search = report["build"]["mixed_precision"]
    assert search["plain"]["passed"] is False and search["outcome"] == "passed"
    assert search["quantized_layers"] == len(LAYERS) and search["cap"] == 2
    assert search["sensitivity"][0][0] == fc1 and search["sensitivity"][0][1] > 0  # measured, not guessed
    assert search["steps"][-1]["float_layers"] == [fc1] and search["steps"][-1]["passed"]
    assert set(search["cost"]) >= {"size_bytes", "p50_ms", "latency_ratio", "size_ratio"}
    assert report["build"]["quantization"]["float_layers"] == [fc1]
    assert bundle.manifest.runtime["quantization"]["float_layers"] == [fc1]
    assert result.validation["passed"] and result.validation["tolerances"]["min_cosine_mean"] == 0.999
    assert any("1 layer(s) kept in float (fc1/MatMulAddFusion): passed" in line for line in lines)
    graph = onnx.load(str(bundle.path("model.onnx"))).graph
    if precision == "int8-dynamic":
        integer = sorted(n.name for n in graph.node if n.op_type == "MatMulInteger")
        assert integer == [f"fc{i}/MatMulAddFusion_MatMul_quant" for i in (2, 3, 4)]
        assert [n.op_type for n in graph.node if n.name.startswith(fc1)] == ["MatMul", "Add"]  # float
    else:
        dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        gemms = {n.name: any(i in dequantized for i in n.input) for n in graph.node if n.op_type == "Gemm"}
        assert gemms == {fc1: False, **{f"fc{i}/MatMulAddFusion": True for i in (2, 3, 4)}}


def test_openvino_search_keeps_only_the_sensitive_layer_float(
    mlp: Path, key: Ed25519PrivateKey, trust: TrustedKeys, tmp_path: Path
) -> None:
    import openvino as ov

    from packagers.targets._openvino_layers import quantized_layers

    # NNCF on the three ordinary random layers reaches worst-sample cosine 0.89 here (onnxruntime: 0.9998),
    # so the worst-sample bound is 0.85; plain int8 is at 0.64 / mean 0.957, below the mean bound 0.98.
    tol = Tolerances(min_cosine=0.85, min_cosine_mean=0.98, max_rel_diff=None, min_top1_agreement=None,
                     golden_atol_rel=0.05, golden_rtol=0.05, golden_min_cosine=0.98)  # fmt: skip
    result = _package(mlp, key, tmp_path, "openvino", "int8", max_float_layers=2, tolerances=tol)
    bundle, report = _report(result, trust, tmp_path / "x")
    search = report["build"]["mixed_precision"]
    assert search["plain"]["passed"] is False and search["outcome"] == "passed"
    assert search["steps"][-1]["float_layers"] == [SENSITIVE]
    assert report["build"]["quantization"]["kept_float"] == [SENSITIVE]
    assert bundle.manifest.runtime["quantization"]["float_layers"] == [SENSITIVE]
    ir = ov.Core().read_model(str(bundle.path("model.xml")))
    assert quantized_layers(ir) == [name for name in LAYERS if name != SENSITIVE]


def test_a_cap_of_zero_switches_the_search_off(mlp: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    lines: list[str] = []
    with pytest.raises(DriftError, match="mean cosine"):
        _package(mlp, key, tmp_path, "onnxruntime", "int8-dynamic", lines, max_float_layers=0)
    assert not any("mixed precision" in line for line in lines)


def test_a_failed_search_still_logs_what_it_tried(mlp: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    tol = Tolerances(
        min_cosine=0.999999,
        min_cosine_mean=0.999999,
        max_rel_diff=None,
        golden_atol_rel=0.05,
        golden_rtol=0.05,
        golden_min_cosine=0.98,
    )  # int8 cannot reach this with one float layer
    result = package(str(mlp), name="mlp", version=1, key=key, out_dir=tmp_path, precision="int8-dynamic",
                     calibration=sensitive_inputs(), accept_drift=True,
                     options=PackageOptions(max_float_layers=1, tolerances=tol))[0]  # fmt: skip
    assert not result.validation["passed"] and result.validation["accepted_drift"]
    assert result.manifest.runtime["quantization"]["float_layers"] == [f"{SENSITIVE}/MatMulAddFusion"]
    cosine = result.validation["metrics"]["y"]["cosine_mean"]
    assert cosine > 0.999 and np.isfinite(cosine)  # the best it found, not the plain candidate


def test_a_refused_precision_says_what_to_try(mlp: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    tol = Tolerances(min_cosine=0.999999, min_cosine_mean=0.999999, max_rel_diff=None, golden_atol_rel=0.05,
                     golden_rtol=0.05, golden_min_cosine=0.98)  # fmt: skip
    with pytest.raises(DriftError) as refused:
        package(str(mlp), name="mlp", version=1, key=key, out_dir=tmp_path, precision="int8-dynamic",
                calibration=sensitive_inputs(), options=PackageOptions(max_float_layers=1, tolerances=tol))  # fmt: skip
    message = str(refused.value)
    assert "the search kept up to 1 of 4 layers float: raise --max-float-layers" in message, message
    assert "or one that keeps more in float: fp16 (--precision onnxruntime=fp16)" in message, message
    assert list(tmp_path.iterdir()) == []


class _FakePackager:
    """A target whose quantized layers are ``L0``..``L29``; quantizing ``L17`` ruins the output, the others barely."""

    target = Target.TFLITE
    layers = tuple(f"L{i}" for i in range(30))

    def __init__(self, reference: np.ndarray) -> None:
        self.reference = reference
        self.built: list[tuple[str, ...]] = []

    def build(self, source: Any, precision: Any, workdir: Path, options: PackageOptions, progress: Any) -> list[Any]:
        from packagers.registry import BuiltModel

        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "m.bin").write_bytes(b"x" * (100 + 10 * len(options.float_layers)))
        self.built.append(options.float_layers)
        name = str(options.extra.get("recipe", "fake"))  # "few": quantizes L0-L9 only (accurate, slower)
        recipe = {"quantization": {"float_layers": list(options.float_layers), "rebuild_extra": {"recipe": name}}}
        return [BuiltModel(workdir / "m.bin", "m.bin", {}, recipe, name)]

    def quantized_layers(self, built: Any) -> list[str]:
        layers = self.layers[:10] if built.candidate == "few" else self.layers
        return [n for n in layers if n not in built.recipe["quantization"]["float_layers"]]

    def runner(self, built: Any) -> Any:
        kept = set(built.recipe["quantization"]["float_layers"])
        noise = np.random.default_rng(0).standard_normal(self.reference.shape)
        scale = (0.0 if "L17" in kept else 1.0) + 0.001 * sum(n not in kept for n in self.layers)
        if built.candidate == "few":
            scale = 0.001
        return lambda feeds: {"y": self.reference[: len(feeds["x"])] + scale * noise[: len(feeds["x"])]}


def test_deep_graphs_are_probed_by_blocks_then_layers(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from packagers.mixed_precision import MAX_PROBES, search_float_layers
    from packagers.options import Precision
    from sdk.manifest import TensorSpec

    reference = np.random.default_rng(1).standard_normal((16, 8)) + 3.0
    inputs = {"x": np.zeros((16, 2), np.float32)}
    source = SimpleNamespace(inputs=[TensorSpec("x", "float32", ("batch", 2))],
                             outputs=[TensorSpec("y", "float32", ("batch", 8))])  # fmt: skip
    packager = _FakePackager(reference)
    plain = packager.build(source, Precision.INT8, tmp_path / "plain", PackageOptions(), print)[0]
    run = packager.runner(plain)
    tol = Tolerances(min_cosine=0.99, min_cosine_mean=0.999, max_rel_diff=None)
    from packagers.validation import compare_outputs

    plain_result = compare_outputs(source.outputs, {"y": reference}, run(inputs), tol)
    assert not plain_result["passed"]
    lines: list[str] = []
    found = search_float_layers(packager, source, Precision.INT8, plain, run, plain_result, [], inputs=inputs,  # type: ignore[arg-type]
                                reference={"y": reference}, tol=tol, labels=None,
                                options=PackageOptions(max_float_layers=0.1), workdir=tmp_path / "s",
                                say=lines.append)  # fmt: skip
    log = found.built.recipe["mixed_precision"]
    assert found.result["passed"] and found.built.recipe["quantization"]["float_layers"] == ["L17"]
    assert len(log["blocks"]) == MAX_PROBES and log["blocks"][0]["first"] <= "L17" <= log["blocks"][0]["last"]
    assert log["sensitivity"][0][0] == "L17" and log["cap"] == 3
    assert log["builds"] <= 2 * MAX_PROBES + 3  # base + blocks + layers of the worst blocks + one growth step
    assert log["cost"]["size_bytes"]["mixed"] > log["cost"]["size_bytes"]["plain"]
    assert found.summary[-1] == {"candidate": "fake+float", "passed": True, "float_layers": 1}


def _fake_setup(tmp_path: Path, *recipes: str) -> tuple[Any, Any, Any, list[Any], Tolerances, dict[str, np.ndarray]]:
    """The fake target's plain candidates for ``recipes`` (built, runner, validation), on 16 samples."""
    from types import SimpleNamespace

    from packagers.options import Precision
    from packagers.validation import compare_outputs
    from sdk.manifest import TensorSpec

    reference = np.random.default_rng(1).standard_normal((16, 8)) + 3.0
    inputs = {"x": np.zeros((16, 2), np.float32)}
    source = SimpleNamespace(inputs=[TensorSpec("x", "float32", ("batch", 2))],
                             outputs=[TensorSpec("y", "float32", ("batch", 8))])  # fmt: skip
    packager = _FakePackager(reference)
    tol = Tolerances(min_cosine=0.99, min_cosine_mean=0.999, max_rel_diff=None)
    plains = []
    for name in recipes:
        built = packager.build(source, Precision.INT8, tmp_path / name, PackageOptions(extra={"recipe": name}), print)[
            0
        ]
        run = packager.runner(built)
        plains.append((built, run, compare_outputs(source.outputs, {"y": reference}, run(inputs), tol)))
    return packager, source, reference, plains, tol, inputs


def test_found_float_layers_are_tried_on_faster_siblings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from packagers import mixed_precision
    from packagers.options import Precision

    packager, source, reference, plains, tol, inputs = _fake_setup(tmp_path, "fake", "fast", "slow")
    speed = {"fake": 10.0, "fast": 6.0, "slow": 12.0}  # ms at batch 1, as the short timing would measure
    monkeypatch.setattr(mixed_precision, "_p50", lambda built, run, feeds: speed[built.candidate])
    (plain, run, result), *siblings = plains
    assert not result["passed"]
    found = mixed_precision.search_float_layers(
        packager, source, Precision.INT8, plain, run, result, [], inputs=inputs, reference={"y": reference}, tol=tol,
        labels=None, options=PackageOptions(max_float_layers=0.1), workdir=tmp_path / "s", say=print,
        siblings=siblings)  # type: ignore[arg-type]  # fmt: skip
    log = found.built.recipe["mixed_precision"]
    assert found.result["passed"] and found.built.candidate == "fast"  # the same float layer, the faster recipe
    assert found.built.recipe["quantization"]["float_layers"] == ["L17"]
    assert [s["candidate"] for s in log["siblings"]] == ["fast"]  # the slower sibling is not rebuilt
    assert log["siblings"][0]["passed"] and log["siblings"][0]["p50_ms"] == 6.0


def test_a_faster_recipe_that_misses_the_tolerance_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from packagers import mixed_precision
    from packagers.options import Precision

    packager, source, reference, plains, tol, inputs = _fake_setup(tmp_path, "few", "fast")
    chosen, sibling = plains
    assert chosen[2]["passed"] and not sibling[2]["passed"]
    kwargs: dict[str, Any] = {"inputs": inputs, "reference": {"y": reference}, "tol": tol, "labels": None,
                              "options": PackageOptions(max_float_layers=0.1), "say": print}  # fmt: skip
    speed = {"few": 10.0, "fast": 6.0}
    monkeypatch.setattr(mixed_precision, "_p50", lambda built, run, feeds: speed[built.candidate])
    found = mixed_precision.search_faster_recipe(packager, source, Precision.INT8, chosen, [], [sibling],
                                                 workdir=tmp_path / "s", **kwargs)  # type: ignore[arg-type]  # fmt: skip
    assert found is not None and found.result["passed"] and found.built.candidate == "fast"
    assert found.built.recipe["quantization"]["float_layers"] == ["L17"]
    assert found.built.recipe["mixed_precision"]["instead_of"] == {"candidate": "few", "p50_ms": 10.0,
                                                                   "chosen_p50_ms": 6.0}  # fmt: skip
    speed["fast"] = 9.8  # within the margin: not worth a search
    assert mixed_precision.search_faster_recipe(packager, source, Precision.INT8, chosen, [], [sibling],
                                                workdir=tmp_path / "t", **kwargs) is None  # type: ignore[arg-type]  # fmt: skip
