"""Host CPU latency of a built model at batch 1: warm-up, then bounded timed runs."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["benchmark"]


def benchmark(
    run: Callable[[Mapping[str, np.ndarray]], Any],
    inputs: Mapping[str, np.ndarray],
    *,
    warmup: int = 5,
    runs: int = 50,
    max_seconds: float = 10.0,
) -> dict[str, Any]:
    """Time ``run(inputs)``; stops early once ``max_seconds`` have passed (after at least 3 runs).

    Args:
        run: the model call, e.g. an onnxruntime session run.
        inputs: one batch (batch 1 for the recorded numbers).
        warmup: untimed runs first (allocations, kernel selection).
        runs: timed runs at most.
        max_seconds: time budget for the timed runs, in seconds.

    Returns:
        {"p50", "p95", "mean", "min" (milliseconds), "runs", "batch", "host"}.
    """
    for _ in range(max(warmup, 0)):
        run(inputs)
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        run(inputs)
        times.append((time.perf_counter() - start) * 1000.0)
        if len(times) >= 3 and time.perf_counter() > deadline:
            break
    arr = np.asarray(times)
    batch = len(next(iter(inputs.values()))) if inputs else 0
    return {
        "p50": round(float(np.percentile(arr, 50)), 4),
        "p95": round(float(np.percentile(arr, 95)), 4),
        "mean": round(float(arr.mean()), 4),
        "min": round(float(arr.min()), 4),
        "runs": len(times),
        "batch": batch,
        "host": f"{platform.machine() or 'unknown'} CPU",
    }
