"""Length grouping of text batches (``device_runtime._grouping``): every row once, the cheapest split."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from device_runtime._grouping import plan_groups


def _cost(groups: list[np.ndarray], lengths: np.ndarray, overhead: int) -> int:
    return sum(len(g) * int(lengths[g].max()) + overhead for g in groups)


def _brute_force(lengths: np.ndarray, overhead: int) -> int:
    """The cheapest cost over every split of the sorted order into contiguous groups."""
    order = np.argsort(lengths, kind="stable")
    n, best = len(lengths), None
    for cuts in itertools.product((False, True), repeat=n - 1):
        bounds = [0, *[i + 1 for i, c in enumerate(cuts) if c], n]
        cost = _cost([order[a:b] for a, b in itertools.pairwise(bounds)], lengths, overhead)
        best = cost if best is None else min(best, cost)
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(6))
def test_groups_cover_every_row_once_and_are_the_cheapest_split(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 60, size=int(rng.integers(2, 10)))
    overhead = int(rng.choice([0, 4, 12, 40]))
    groups = plan_groups(lengths, overhead)
    rows = np.concatenate(groups)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    assert np.all(np.diff(lengths[rows]) >= 0)  # shortest first, each group contiguous in length order
    assert _cost(groups, lengths, overhead) == _brute_force(lengths, overhead)


def test_one_group_when_splitting_does_not_pay() -> None:
    assert [g.tolist() for g in plan_groups(np.array([7]))] == [[0]]
    assert len(plan_groups(np.array([9, 9, 9, 9]))) == 1  # equal lengths: nothing to save
    assert len(plan_groups(np.array([10, 11, 12]), overhead=12)) == 1  # saving 3 tokens costs a run of 12
    mixed = plan_groups(np.array([40, 5, 41, 6, 5, 39]), overhead=12)
    assert [sorted(g.tolist()) for g in mixed] == [[1, 3, 4], [0, 2, 5]]
