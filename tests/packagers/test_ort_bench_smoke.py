"""Smoke test of ``benchmarks/bert_quantization.py``'s core functions on a tiny random BERT (seconds).

The benchmark itself needs the trained all-MiniLM-L6-v2 and minutes; this keeps its pieces from rotting:
tokenizing, packaging through the same calls, the baselines, loading bundles on the device runtime,
pooling, cosine, interleaved timing, the table and the verdicts.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from sdk.signing import TrustedKeys, generate_keypair, load_public_key

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bert_quantization.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("edgeship_bench_bert_quantization", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_benchmark_core_functions(bench: ModuleType, bert_cls_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    folder.mkdir()
    # a feature-extraction folder with the cls model's tokenizer (the benchmark tokenizes real text)
    for f in bert_cls_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    sentences = bench.load_sentences()
    assert 150 <= len(sentences) <= 300 and len(set(sentences)) == len(sentences)
    sentences = sentences[:12]
    feeds = bench.tokenize(folder, sentences, length=16)
    assert feeds["input_ids"].shape == (12, 16) and set(feeds) == set(bench.TEXT_INPUTS)
    calib_rows, eval_rows = bench.split(12)
    assert len(calib_rows) == 4 and not set(calib_rows) & set(eval_rows)

    private, public = generate_keypair(tmp_path / "keys")
    trust = TrustedKeys((load_public_key(public),))
    groups = bench.plan(["onnxruntime"], ["fp32", "int8"])
    assert groups == {("fp32", "int8"): ["onnxruntime"]}
    results, failures, _retry = bench.package_groups(folder, groups, bench.take(feeds, calib_rows), private,
                                             tmp_path / "out", lambda _line: None)  # fmt: skip
    assert failures == [] and [r.precision for r in results] == ["fp32", "int8"]

    held_out = bench.take(feeds, eval_rows)
    fp32_run, fp32_model = bench.bundle_runner(results[0].bundle_path, trust, 1)
    int8_run, int8_model = bench.bundle_runner(results[1].bundle_path, trust, 1)
    baselines = bench.dynamic_baselines(_model_file(results[0], trust, tmp_path), tmp_path)
    runs = {"fp32": fp32_run, "int8": int8_run} | {n: bench.ort_runner(p, 1) for n, p in baselines.items()}
    reference = bench.embed(fp32_run, held_out, batch=3)
    assert reference.shape == (8, 32)
    rows = [bench.Row("torch eager fp32", "torch", 1, bench.torch_runner(folder, 1))]
    for name, run in runs.items():
        kind = "baseline" if name.startswith("baseline") else "edgeship"
        rows.append(bench.Row(name if kind == "baseline" else f"edgeship onnxruntime {name}", kind, 1, run))
    for row in rows:
        cos = bench.cosines(bench.embed(row.run, held_out), reference)
        row.cosine_mean, row.cosine_min = float(cos.mean()), float(cos.min())
    assert rows[0].cosine_mean > 0.9999 and rows[1].cosine_mean > 0.99999  # torch vs the fp32 bundle
    timing = bench.time_interleaved({r.name: r.run for r in rows}, bench.take(feeds, eval_rows[:1]), rounds=3)
    for row in rows:
        row.p50, row.p95 = timing[row.name]
        assert 0 < row.p50 <= row.p95
    table = bench.format_table(rows)
    assert "baseline A" in table and "edgeship onnxruntime int8" in table
    lines, _ok = bench.judge(rows, packaging_s=1.0)
    assert any(line.startswith(("PASS", "FAIL")) for line in lines)
    assert lines[-1].startswith("PASS  packaging")
    mask = np.array([[1, 1, 0]])
    hidden = np.array([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    assert np.allclose(bench.mean_pool(hidden, mask), [[2.0, 1.0]])
    fp32_model.close()
    int8_model.close()


def _model_file(result: object, trust: TrustedKeys, tmp_path: Path) -> Path:
    from sdk.bundle import read_bundle

    bundle = read_bundle(result.bundle_path, trust, tmp_path / "fp32-bundle")  # type: ignore[attr-defined]
    return Path(bundle.path(bundle.manifest.model))
