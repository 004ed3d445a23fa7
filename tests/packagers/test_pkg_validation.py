"""Validation metrics, pass/fail decisions, golden tolerances and the benchmark, on plain arrays."""

from __future__ import annotations

import numpy as np
import pytest

from packagers import DEFAULT_TOLERANCES, Precision, Tolerances
from packagers.benchmark import benchmark
from packagers.validation import compare_outputs, cosine_per_sample, golden_tolerance, is_logits_like
from sdk.errors import PackagingError
from sdk.golden import GoldenTolerance, check_golden, compare_output
from sdk.manifest import TensorSpec

LOGITS = TensorSpec("logits", "float32", ("batch", 5))
HIDDEN = TensorSpec("hidden", "float32", ("batch", "sequence", 8))


def _logits(n: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 5)) * 3).astype(np.float32)


def test_cosine_and_logits_detection() -> None:
    a = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])
    assert cosine_per_sample(a, b).tolist() == pytest.approx([1.0, 1.0, -1.0])
    assert cosine_per_sample(np.zeros((1, 3)), np.ones((1, 3))).tolist() == [0.0]
    assert is_logits_like(LOGITS) and not is_logits_like(HIDDEN)
    assert is_logits_like(TensorSpec("start_logits", "float32", ("batch", "sequence")))
    assert not is_logits_like(TensorSpec("score", "float32", ("batch", 1)))


def test_identical_outputs_pass_fp32() -> None:
    ref = _logits()
    result = compare_outputs([LOGITS], {"logits": ref}, {"logits": ref.copy()}, DEFAULT_TOLERANCES[Precision.FP32])
    m = result["metrics"]["logits"]
    assert result["passed"] and result["failures"] == []
    assert m["max_abs_diff"] == 0.0 and m["cosine_min"] == 1.0 and m["top1_agreement"] == 1.0


def test_int8_sized_noise_passes_int8_but_fails_fp32() -> None:
    ref = _logits()
    noisy = ref + np.random.default_rng(1).normal(0, 0.02, ref.shape).astype(np.float32)
    assert compare_outputs([LOGITS], {"logits": ref}, {"logits": noisy}, DEFAULT_TOLERANCES[Precision.INT8_DYNAMIC])[
        "passed"
    ]
    strict = compare_outputs([LOGITS], {"logits": ref}, {"logits": noisy}, DEFAULT_TOLERANCES[Precision.FP32])
    assert not strict["passed"] and any("max abs diff" in f for f in strict["failures"])


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        (lambda r: -r, "cosine"),
        (lambda r: np.roll(r, 1, axis=0), "cosine"),
        (lambda r: np.where(np.arange(r.shape[0])[:, None] == 0, np.nan, r), "NaN"),
        (lambda r: r[:, ::-1].copy(), "top-1"),
        (lambda r: r[:-1], "shape"),
    ],
)
def test_broken_outputs_fail_int8(broken, expected: str) -> None:  # type: ignore[no-untyped-def]
    ref = _logits()
    result = compare_outputs([LOGITS], {"logits": ref}, {"logits": broken(ref)},
                             DEFAULT_TOLERANCES[Precision.INT8_DYNAMIC])  # fmt: skip
    assert not result["passed"]
    assert any(expected in f for f in result["failures"]), result["failures"]


def test_accuracy_with_labels() -> None:
    ref = _logits()
    labels = ref.argmax(1)
    worse = ref.copy()
    worse[:10] = np.roll(worse[:10], 1, axis=1)  # 10 of 50 predictions change
    tol = Tolerances(min_cosine=-1.0, min_cosine_mean=-1.0, max_rel_diff=None, max_accuracy_drop=0.05)
    result = compare_outputs([LOGITS], {"logits": ref}, {"logits": worse}, tol, labels=labels)
    acc = result["accuracy"]
    assert acc["reference"] == 1.0 and acc["bundle"] == pytest.approx(0.8) and acc["drop"] == pytest.approx(0.2)
    assert not result["passed"] and any("accuracy" in f for f in result["failures"])
    with pytest.raises(PackagingError, match="logits-like"):
        hidden = np.zeros((4, 3, 8), np.float32)
        compare_outputs([HIDDEN], {"hidden": hidden}, {"hidden": hidden}, tol, labels=np.zeros(4, np.int64))


def test_golden_tolerance_catches_a_broken_model_not_kernel_noise() -> None:
    golden = {"logits": _logits(4)}
    for precision in (Precision.FP32, Precision.INT8_DYNAMIC):
        tol = golden_tolerance(DEFAULT_TOLERANCES[precision], golden)
        assert set(tol) == {"atol", "rtol", "min_cosine"}
        scale = float(np.abs(golden["logits"]).max())
        kernel_noise = golden["logits"] * (1 + 1e-5) + 1e-6 * scale
        assert check_golden({"logits": kernel_noise}, golden, tol) == []
        assert check_golden({"logits": -golden["logits"]}, golden, tol)
        assert check_golden({"logits": golden["logits"] * 1.5}, golden, tol)
        assert check_golden({"logits": golden["logits"] * np.nan}, golden, tol) == ["logits: NaN or Inf"]


def test_benchmark_counts_runs() -> None:
    calls = []
    result = benchmark(lambda feeds: calls.append(1), {"x": np.zeros((1, 3))}, warmup=2, runs=7)
    assert len(calls) == 9 and result["runs"] == 7 and result["batch"] == 1
    assert 0 <= result["min"] <= result["p50"] <= result["p95"]
    bounded = benchmark(lambda feeds: None, {"x": np.zeros((1, 3))}, warmup=0, runs=10_000, max_seconds=0.0)
    assert bounded["runs"] == 3


def _padded_hidden(n: int = 6, seq: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((n, seq, 8)).astype(np.float32)
    lengths = rng.integers(3, seq - 2, size=n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return hidden, mask


def test_padding_is_not_scored_but_real_drift_is() -> None:
    ref, mask = _padded_hidden()
    tol = DEFAULT_TOLERANCES[Precision.INT8]
    garbage = ref.copy()
    garbage[mask == 0] = np.random.default_rng(9).standard_normal((int((mask == 0).sum()), 8)) * 50
    garbage[0, -1] = np.nan  # a padded NaN is not read by anything either
    assert not compare_outputs([HIDDEN], {"hidden": ref}, {"hidden": garbage}, tol)["passed"]  # unmasked: fails
    result = compare_outputs([HIDDEN], {"hidden": ref}, {"hidden": garbage}, tol, mask=mask)
    assert result["passed"], result["failures"]
    m = result["metrics"]["hidden"]
    assert m["cosine_min"] == 1.0 and m["max_abs_diff"] == 0.0 and m["masked_positions"] == int((mask == 0).sum())
    assert result["padding"]["masked_by"] == "attention_mask" and result["padding"]["outputs"] == ["hidden"]
    drift = garbage.copy()
    drift[mask == 1] = -drift[mask == 1]  # every real token flipped
    failed = compare_outputs([HIDDEN], {"hidden": ref}, {"hidden": drift}, tol, mask=mask)
    assert not failed["passed"] and any("cosine" in f for f in failed["failures"])
    one = garbage.copy()
    one[2, 0] += 40.0  # one real token of one sample
    assert not compare_outputs([HIDDEN], {"hidden": ref}, {"hidden": one}, tol, mask=mask)["passed"]


def test_mask_leaves_other_outputs_whole() -> None:
    ref, mask = _padded_hidden()
    pooled = ref.mean(axis=1)  # rank 2: a sentence vector, scored whole
    spec = TensorSpec("pooled", "float32", ("batch", 8))
    result = compare_outputs([spec], {"pooled": pooled}, {"pooled": -pooled}, DEFAULT_TOLERANCES[Precision.INT8],
                             mask=mask)  # fmt: skip
    assert not result["passed"] and "padding" not in result


def test_token_logits_top1_ignores_padding() -> None:
    ref, mask = _padded_hidden()
    spec = TensorSpec("logits", "float32", ("batch", "sequence", 8))
    out = ref.copy()
    out[mask == 0] = out[mask == 0][:, ::-1]  # argmax changes only at padded tokens
    tol = Tolerances(min_cosine=-1.0, min_cosine_mean=-1.0, max_rel_diff=None, min_top1_agreement=0.99)
    assert not compare_outputs([spec], {"logits": ref}, {"logits": out}, tol)["passed"]
    result = compare_outputs([spec], {"logits": ref}, {"logits": out}, tol, mask=mask)
    assert result["passed"] and result["metrics"]["logits"]["top1_agreement"] == 1.0


def test_golden_check_masks_padding_on_both_sides() -> None:
    golden, mask = _padded_hidden(n=4)
    tol = golden_tolerance(DEFAULT_TOLERANCES[Precision.INT8], {"hidden": golden})
    garbage = golden.copy()
    garbage[mask == 0] = 1e3
    assert check_golden({"hidden": garbage}, {"hidden": golden}, tol)  # no mask: the old behaviour
    assert check_golden({"hidden": garbage}, {"hidden": golden}, tol, mask) == []
    assert check_golden({"hidden": -garbage}, {"hidden": golden}, tol, mask)
    device = GoldenTolerance(atol=tol["atol"], rtol=tol["rtol"], min_cosine=tol["min_cosine"])
    assert not compare_output(garbage, golden, device)["passed"]  # bundles without a mask: compared whole
    ok = compare_output(garbage, golden, device, mask)
    assert ok["passed"] and ok["masked_positions"] == int((mask == 0).sum())
    assert not compare_output(-garbage, golden, device, mask)["passed"]
