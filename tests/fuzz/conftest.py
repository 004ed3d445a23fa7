"""The fuzz suite's budget: hypothesis with a bounded number of examples per parser.

``FUZZ_EXAMPLES=N`` multiplies every budget by N for a longer run (docs/reliability.md, "Fuzzing").
Only typed errors are allowed out of a parser; each example is also bounded in time and memory.
"""

from __future__ import annotations

import os
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sdk"))  # bundlekit

SCALE = max(1, int(os.environ.get("FUZZ_EXAMPLES", "1")))


def budget(examples: int) -> Callable:
    """``@budget(n)``: hypothesis settings with ``n * FUZZ_EXAMPLES`` examples, no deadline flakiness."""
    return settings(
        max_examples=examples * SCALE,
        deadline=None,  # bound() below checks time per example, with a margin a busy CI box keeps
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )


@contextmanager
def bound(seconds: float = 2.0, megabytes: float = 64.0) -> Iterator[None]:
    """Fail an example that takes longer than ``seconds`` or allocates more than ``megabytes`` at its peak."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        elapsed = time.monotonic() - started
        assert elapsed < seconds, f"one example took {elapsed:.2f} s"
        assert peak < megabytes * 2**20, f"one example peaked at {peak / 2**20:.1f} MiB"
