"""``predict`` from many threads, ``close`` while calls run, ``predict_batch``, and their metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_bundles import Keys
from serving_parts import gated_model, linear_reference, masked_reference

from device_runtime.errors import ModelClosedError
from device_runtime.model import Model
from sdk.errors import BackendError, InputError


def test_threads_hammering_predict_get_their_own_results(linear: Model) -> None:
    errors: list[BaseException] = []
    per_thread = 150

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(per_thread):
                x = rng.standard_normal((int(rng.integers(1, 5)), 4)).astype(np.float32)
                np.testing.assert_allclose(linear.predict({"x": x})["y"], linear_reference(x), rtol=1e-5, atol=1e-6)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    snap = linear.metrics.snapshot()
    assert snap["count"] == 8 * per_thread and snap["error_count"] == 0
    assert snap["latency_ms"]["p50"] > 0


def test_close_waits_for_the_call_in_flight_and_refuses_new_ones(
    bundle_factory: Callable[..., Path], keys: Keys, tmp_path: Path
) -> None:
    model, backend = gated_model(bundle_factory(), keys, tmp_path / "m")
    backend.release.clear()
    x = np.ones((1, 4), np.float32)
    result: dict[str, Any] = {}
    running = threading.Thread(target=lambda: result.update(model.predict({"x": x})))
    running.start()
    assert backend.started.wait(10)
    closer = threading.Thread(target=model.close)
    closer.start()
    time.sleep(0.2)
    assert closer.is_alive(), "close() must wait for the call in flight"
    assert model.closed
    with pytest.raises(ModelClosedError, match="closed"):
        model.predict({"x": x})
    backend.release.set()
    running.join(10)
    closer.join(10)
    assert not closer.is_alive()
    np.testing.assert_allclose(result["y"], linear_reference(x), rtol=1e-6)
    snap = model.metrics.snapshot()
    assert snap["count"] == 1 and snap["errors"] == {"closed": 1}
    with pytest.raises(ModelClosedError):
        model.predict_batch([{"x": x}])
    assert model.metrics.snapshot()["errors"] == {"closed": 2}


def test_close_is_bounded(bundle_factory: Callable[..., Path], keys: Keys, tmp_path: Path) -> None:
    model, backend = gated_model(bundle_factory(), keys, tmp_path / "m")
    backend.release.clear()
    x = np.ones((1, 4), np.float32)
    result: dict[str, Any] = {}
    running = threading.Thread(target=lambda: result.update(model.predict({"x": x})))
    running.start()
    assert backend.started.wait(10)
    start = time.monotonic()
    model.close(timeout=0.2)
    assert time.monotonic() - start < 5
    backend.release.set()  # the straggler finishes on the session it holds
    running.join(10)
    np.testing.assert_allclose(result["y"], linear_reference(x), rtol=1e-6)


def test_backend_failures_are_counted(bundle_factory: Callable[..., Path], keys: Keys, tmp_path: Path) -> None:
    model, backend = gated_model(bundle_factory(), keys, tmp_path / "m")
    backend.fail_with = RuntimeError("device lost")
    with pytest.raises(BackendError, match="device lost"):
        model.predict({"x": np.ones((1, 4), np.float32)})
    assert model.metrics.snapshot()["errors"] == {"backend": 1}
    backend.fail_with = None
    model.predict({"x": np.ones((1, 4), np.float32)})
    assert model.metrics.count == 1
    model.close()


def test_health_check_is_not_counted_as_traffic(linear: Model) -> None:
    assert linear.health_check()["passed"]
    assert linear.metrics.snapshot()["count"] == 0


def test_metrics_report_the_backend(linear: Model) -> None:
    snap = linear.metrics.snapshot()
    assert snap["backend"] == "onnxruntime" and "CPUExecutionProvider" in snap["providers"]


# ---- predict_batch -------------------------------------------------------------------------------------
def test_predict_batch_stacks_compatible_items(bundle_factory: Callable[..., Path], keys: Keys, tmp_path: Path) -> None:
    model, backend = gated_model(bundle_factory(), keys, tmp_path / "m")
    rng = np.random.default_rng(1)
    items = [{"x": rng.standard_normal((rows, 4)).astype(np.float32)} for rows in (1, 3, 2)]
    items.append({"x": [[1, 2, 3, 4]]})  # lists and ints are converted as for predict
    results = model.predict_batch(items)
    assert backend.runs == 1  # one runtime call for the four items
    assert [r["y"].shape for r in results] == [(1, 3), (3, 3), (2, 3), (1, 3)]
    for item, result in zip(items, results, strict=True):
        np.testing.assert_allclose(result["y"], linear_reference(np.asarray(item["x"])), rtol=1e-5, atol=1e-6)
    assert model.metrics.snapshot()["count"] == 4
    model.close()


def test_predict_batch_loops_when_shapes_differ(masked: Model) -> None:
    items = [
        {"input_ids": np.arange(3).reshape(1, 3), "attention_mask": np.ones((1, 3), np.int32)},
        {"input_ids": np.arange(10).reshape(2, 5), "attention_mask": np.ones((2, 5), np.int32)},
    ]
    results = masked.predict_batch(items)
    for item, result in zip(items, results, strict=True):
        np.testing.assert_allclose(result["total"], masked_reference(item["input_ids"], item["attention_mask"]))


def test_predict_batch_loops_when_stacking_would_break_the_policy(
    model_factory: Callable[..., Model],
) -> None:
    model = model_factory(input_policy={"dims": {"batch": [1, 2]}})
    items = [{"x": np.full((2, 4), i, np.float32)} for i in range(3)]  # six rows stacked, two allowed
    results = model.predict_batch(items)
    for item, result in zip(items, results, strict=True):
        np.testing.assert_allclose(result["y"], linear_reference(item["x"]), rtol=1e-6)


def test_predict_batch_edge_cases(linear: Model) -> None:
    assert linear.predict_batch([]) == []
    one = linear.predict_batch([{"x": np.ones((1, 4), np.float32)}])
    np.testing.assert_allclose(one[0]["y"], linear_reference(np.ones((1, 4))), rtol=1e-6)
    with pytest.raises(InputError, match=r"batch item 1: input 'x' float32 \['batch', 4\]: got shape \[1, 5\]"):
        linear.predict_batch([{"x": np.ones((1, 4))}, {"x": np.ones((1, 5))}])
    with pytest.raises(InputError, match="list of input mappings"):
        linear.predict_batch({"x": np.ones((1, 4))})  # type: ignore[arg-type]
    assert linear.metrics.snapshot()["errors"] == {"input": 2}
