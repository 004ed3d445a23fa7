"""Exponential backoff with full jitter, for reconnects and download retries.

paho-mqtt's own ``reconnect_delay_set`` doubles a delay with no jitter: after a broker restart a whole
fleet retries in lock-step and stampedes it. "Full jitter" (AWS architecture blog, 2015) spreads the
retries uniformly over ``[0, min(cap, base * 2**attempt)]``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff", "full_jitter"]


def full_jitter(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Return a delay in seconds drawn uniformly from ``[0, min(cap_s, base_s * 2**attempt)]``.

    Args:
        attempt: how many tries have failed so far, from 0.
        base_s: the ceiling of the first delay, in seconds.
        cap_s: the largest ceiling, in seconds.
        rng: the source of randomness (inject a seeded ``random.Random`` in tests).

    Raises:
        ValueError: a negative ``attempt``, ``base_s`` or ``cap_s``.
    """
    if attempt < 0 or base_s < 0 or cap_s < 0:
        raise ValueError(f"attempt, base_s and cap_s must be >= 0, got {attempt}, {base_s}, {cap_s}")
    # min() before the power would overflow: 2**attempt grows without bound on a long outage.
    ceiling = cap_s if attempt >= 64 else min(cap_s, base_s * 2**attempt)
    return rng.uniform(0.0, ceiling)


@dataclass
class Backoff:
    """A retry counter that hands out jittered delays: ``next_delay()`` after a failure, ``reset()`` after success.

    Attributes:
        base_s: ceiling of the first delay, in seconds.
        cap_s: largest ceiling of any delay, in seconds.
        rng: source of randomness; a fresh unseeded ``random.Random`` unless given.
        attempt: failures since the last ``reset()``.
    """

    base_s: float = 0.5  # seconds
    cap_s: float = 60.0  # seconds
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.cap_s < self.base_s:
            raise ValueError(f"need 0 <= base_s <= cap_s, got base_s={self.base_s}, cap_s={self.cap_s}")

    def next_delay(self) -> float:
        """Return the delay before the next try, in seconds, and count one more failure."""
        delay = full_jitter(self.attempt, self.base_s, self.cap_s, self.rng)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from the smallest delays (call after a success)."""
        self.attempt = 0
