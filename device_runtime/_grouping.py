"""Length grouping for text batches on dynamic-shape runtimes: sort by length, run length-similar groups.

A batch of texts is padded to its longest text, so a batch of mixed lengths spends much of its compute on
padding (205 real sentences in batches of 32: 23% of the tokens are padding). sentence-transformers sorts
its input by length for the same reason. ``plan_groups`` splits a batch, sorted by token count, into
contiguous groups that minimise the padded tokens plus a per-run overhead (in tokens); the caller runs
each group cut to its own longest text and puts the outputs back in the caller's order.

Only for runtimes that take any batch and sequence length (ONNX Runtime, OpenVINO with dynamic shapes);
a bundle with a fixed batch or sequence length (TFLite buckets) is run in fixed chunks instead.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RUN_OVERHEAD_TOKENS", "plan_groups"]

# A model run's fixed cost, in padded tokens of work: measured on all-MiniLM-L6-v2 int8 under ONNX Runtime
# on one thread, one run costs about as much as 8 to 16 tokens; grouping is not sensitive to it there.
RUN_OVERHEAD_TOKENS = 12


def plan_groups(lengths: np.ndarray, overhead: int = RUN_OVERHEAD_TOKENS) -> list[np.ndarray]:
    """Row indices per group, each group's texts of similar token count; one group means "run as is".

    Args:
        lengths: tokens per text (the attention mask's row sums), one per row of the batch.
        overhead: the cost of one more model run, in padded tokens.

    Returns:
        Index arrays covering every row once, shortest texts first; the groups minimise
        ``sum(len(group) * longest(group)) + overhead * len(groups)`` over splits of the sorted order.
    """
    n = len(lengths)
    order = np.argsort(lengths, kind="stable")
    if n <= 1:
        return [order]
    sorted_lengths = np.asarray(lengths, dtype=np.int64)[order]
    if sorted_lengths[0] == sorted_lengths[-1]:
        return [order]
    # best[j]: the cheapest plan of the first j sorted rows; a group i..j-1 costs (j - i) * longest + overhead
    best = np.zeros(n + 1, dtype=np.int64)
    start = np.zeros(n + 1, dtype=np.int64)
    starts = np.arange(n, dtype=np.int64)
    for j in range(1, n + 1):
        costs = best[:j] + (j - starts[:j]) * sorted_lengths[j - 1] + overhead
        i = int(np.argmin(costs))
        best[j], start[j] = costs[i], i
    cuts = []
    j = n
    while j > 0:
        cuts.append((int(start[j]), j))
        j = int(start[j])
    return [order[i:j] for i, j in reversed(cuts)]
