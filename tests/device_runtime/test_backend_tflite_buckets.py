"""The sequence-bucket rule of TFLite text bundles (``runtime.buckets``): parsing, choice, padding, cutting."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from device_runtime.backends.tflite_buckets import SequenceBuckets
from sdk.errors import BackendError, InputError, ManifestError
from sdk.sections import Runtime

RAW = {"axis": 1, "dim": "sequence", "lengths": [16, 32, 64], "signatures": ["seq_16", "seq_32", "seq_64"],
       "pad": {"input_ids": 0, "attention_mask": 0}}  # fmt: skip


def test_round_trip_and_choice() -> None:
    buckets = SequenceBuckets.from_runtime(RAW)
    assert buckets.to_runtime() == RAW and buckets.max_length == 64
    assert [buckets.choose(n) for n in (1, 16, 17, 32, 33, 64)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(InputError, match="65 tokens; this model's largest bucket is 64"):
        buckets.choose(65)


def test_padding_masks_and_cutting_restores_length() -> None:
    buckets = SequenceBuckets.from_runtime({**RAW, "pad": {"input_ids": 7, "attention_mask": 0}})
    feeds = {"input_ids": np.ones((1, 5), np.int64), "attention_mask": np.ones((1, 5), np.int64)}
    padded = buckets.padded(feeds, 16)
    assert padded["input_ids"].shape == (1, 16) and (padded["input_ids"][0, 5:] == 7).all()
    assert padded["attention_mask"][0].tolist() == [1] * 5 + [0] * 11
    outputs = {"last_hidden_state": np.zeros((1, 16, 4)), "pooled": np.zeros((1, 4))}
    cut = buckets.cut(outputs, ["last_hidden_state"], 5)
    assert cut["last_hidden_state"].shape == (1, 5, 4) and cut["pooled"].shape == (1, 4)


@pytest.mark.parametrize(
    "bad",
    [
        "not an object",
        {**RAW, "lengths": [32, 16, 64]},  # not ascending
        {**RAW, "lengths": [0, 16, 32]},
        {**RAW, "lengths": [16, 32]},  # one signature per length
        {**RAW, "signatures": ["seq_16", "", "seq_64"]},
        {**RAW, "pad": {"input_ids": "0"}},
        {**RAW, "axis": 0},
        {**RAW, "lengths": [16, True, 64]},
    ],
)
def test_malformed_buckets_are_refused(bad: Any) -> None:
    with pytest.raises(BackendError, match=r"runtime\.buckets must be"):
        SequenceBuckets.from_runtime(bad)


def test_runtime_section_carries_buckets_and_old_sections_still_parse() -> None:
    old = Runtime.from_dict({"signature": "serving_default", "tensor_map": {"inputs": {}, "outputs": {}}})
    assert old.buckets is None and "buckets" not in old.to_dict()
    new = Runtime.from_dict({"signature": "seq_64", "buckets": RAW})
    assert new.buckets == RAW and new.to_dict()["buckets"] == RAW
    with pytest.raises(ManifestError, match=r"runtime\.buckets must be an object"):
        Runtime.from_dict({"buckets": [16, 32]})
