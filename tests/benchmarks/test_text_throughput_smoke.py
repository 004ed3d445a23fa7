"""``benchmarks/text_throughput.py``'s functions on a tiny random BERT (seconds, nothing downloaded).

The benchmark itself needs the trained all-MiniLM-L6-v2, optimum in its own venv (pip) and minutes; this
keeps its pieces from rotting: calibration feeds from real sentences, packaging through the same calls,
the feature-extraction task class as the edgeship rows run it, interleaved throughput passes, cosines,
the optimum worker's JSON read back, the table and the verdicts.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from sdk.signing import TrustedKeys, generate_keypair, load_public_key

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(240)


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"edgeship_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("text_throughput")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(ROOT / "tests" / "packagers"))
    try:
        from task_folders import text_folder
    finally:
        sys.path.remove(str(ROOT / "tests" / "packagers"))
    return text_folder(tmp_path_factory.mktemp("tiny-bert"), "feature-extraction")  # type: ignore[no-any-return]


def test_text_throughput_core_functions(bench: ModuleType, tiny_folder: Path, tmp_path: Path) -> None:
    sentences = bench.load_sentences()
    assert len(sentences) == 205 and len(bench.held_out_rows(205)) == 136
    calibration = bench.calibration_feeds(tiny_folder, sentences[:30])
    assert calibration["input_ids"].shape[0] == 10 and set(calibration) == {"input_ids", "attention_mask",
                                                                              "token_type_ids"}  # fmt: skip

    private, public = generate_keypair(tmp_path / "keys")
    trust = TrustedKeys((load_public_key(public),))
    results, failures = bench.build_bundles(tiny_folder, calibration, private, tmp_path / "out",
                                            {"onnxruntime": ("fp32", "int8-dynamic"), "nope": ("fp32",)},
                                            lambda _line: None)  # fmt: skip
    assert [r.precision for r in results] == ["fp32", "int8-dynamic"] and failures == ["nope: not installed here"]
    rows, models = [], []
    for result in results:
        embed, model = bench.edgeship_embedder(result.bundle_path, trust, 1)
        models.append(model)
        rows.append(bench.Row(f"edgeship onnxruntime {result.precision}", "edgeship", embed, size_bytes=1))
    texts = sentences[:9]
    calls: list[int] = []

    def remote(batch: int) -> tuple[float, np.ndarray]:  # a row timed in another process (optimum's worker)
        calls.append(batch)
        return 1e-3 if batch == 1 else 1.0, np.ones((9, 32))

    int8 = bench.Row("optimum int8 (avx512_vnni dynamic)", "optimum", remote=lambda b: (1e-9, -np.ones((9, 32))))
    optimum = [bench.Row("optimum fp32", "optimum", remote=remote), int8]
    reference = bench.measure(rows + optimum, texts, batches=(1, 4), repeats=2, evaluate=np.arange(1, 9))
    for model in models:
        model.close()
    assert calls == [1, 4, 1, 4]  # interleaved pass by pass with the local rows
    assert reference.shape == (9, 32)
    assert rows[0].cosine_mean > 0.99999 and rows[1].cosine_mean > 0.9  # the fp32 row is the reference here
    assert all(r.per_s[1] > 0 and r.per_s[4] > 0 for r in rows)
    assert optimum[0].per_s == {1: 9000.0, 4: 9.0}
    table = bench.format_table(optimum + rows, batches=(1, 4))
    assert "optimum int8" in table and "edgeship onnxruntime int8-dynamic" in table
    rows[0].per_s[32] = rows[0].per_s[4]
    optimum[0].per_s, optimum[1].per_s = {1: 1e-3, 32: 1e-3}, {1: 1e9, 32: 1e9}
    lines, ok = bench.judge(optimum + rows[:1])
    assert not ok and lines[1].startswith("PASS  batch 1 vs optimum fp32") and lines[2].startswith("FAIL")
    lines, ok = bench.judge(optimum)
    assert not ok and "no edgeship bundle" in lines[0]
