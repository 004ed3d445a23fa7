"""Reconnect backoff: bounded, growing, jittered, reproducible with a seeded rng."""

from __future__ import annotations

import random
import statistics

import pytest

from device_runtime.agent._backoff import Backoff, full_jitter


def test_delays_stay_within_the_growing_ceiling_and_the_cap() -> None:
    rng = random.Random(1)
    for attempt in range(200):
        ceiling = min(10.0, 0.5 * 2**attempt)
        for _ in range(50):
            assert 0.0 <= full_jitter(attempt, 0.5, 10.0, rng) <= ceiling


def test_jitter_spreads_a_fleet_over_the_whole_window() -> None:
    # 1000 devices reconnecting after the same outage, attempt 5: ceiling min(60, 0.5 * 32) = 16 s.
    delays = [Backoff(0.5, 60.0, random.Random(seed), attempt=5).next_delay() for seed in range(1000)]
    assert min(delays) < 0.5 and max(delays) > 15.5
    assert statistics.mean(delays) == pytest.approx(8.0, rel=0.1)
    # No second of the window gets more than 10% of the fleet (a stampede would put it all in one).
    per_second = [sum(1 for d in delays if s <= d < s + 1) for s in range(16)]
    assert max(per_second) < 100


def test_backoff_counts_attempts_and_resets() -> None:
    backoff = Backoff(1.0, 4.0, random.Random(7))
    ceilings = []
    for _ in range(5):
        ceilings.append(min(4.0, 1.0 * 2**backoff.attempt))
        assert backoff.next_delay() <= ceilings[-1]
    assert ceilings == [1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.attempt == 0


def test_same_seed_same_delays() -> None:
    a = Backoff(0.5, 30.0, random.Random(42))
    b = Backoff(0.5, 30.0, random.Random(42))
    assert [a.next_delay() for _ in range(10)] == [b.next_delay() for _ in range(10)]


def test_huge_attempt_counts_do_not_overflow() -> None:
    assert 0.0 <= full_jitter(10_000, 0.5, 60.0, random.Random(0)) <= 60.0


@pytest.mark.parametrize("args", [(-1, 0.5, 1.0), (0, -0.5, 1.0), (0, 0.5, -1.0)])
def test_negative_values_are_refused(args: tuple[int, float, float]) -> None:
    with pytest.raises(ValueError):
        full_jitter(*args, random.Random(0))


def test_cap_below_base_is_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)
