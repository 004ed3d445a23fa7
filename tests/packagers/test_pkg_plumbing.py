"""The packagers' shared plumbing on plain objects: quiet(), the validation-data chooser, the ORT session factory."""

from __future__ import annotations

import logging
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from packagers import PackageOptions
from packagers._ort_session import cpu_session
from packagers._quiet import LIBRARIES, quiet
from packagers.sources.data import choose_validation
from sdk.errors import PackagingError
from sdk.manifest import TensorSpec


def test_quiet_hides_chatter_and_restores_everything(capsys: pytest.CaptureFixture[str]) -> None:
    nncf, root = logging.getLogger("nncf"), logging.getLogger()
    nncf.setLevel(logging.DEBUG)
    root_level = root.level
    with quiet("nncf", "onnxruntime.quantization"):
        assert nncf.level == logging.ERROR and root.level == logging.ERROR
        print("a progress bar")
    assert nncf.level == logging.DEBUG and root.level == root_level
    assert "a progress bar" not in capsys.readouterr().out
    with quiet("tensorflow"):
        print("tree", file=sys.stderr)
    assert "tree" not in capsys.readouterr().err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet("torch.onnx"):
            warnings.warn("deprecated", DeprecationWarning, stacklevel=1)
        warnings.warn("after", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["after"]


def test_quiet_disables_tqdm_bars_for_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    module_name, attr = LIBRARIES["coremltools"].tqdm[0]
    calls: list[dict[str, object]] = []

    def bar(*args: object, **kwargs: object) -> None:
        calls.append(kwargs)

    monkeypatch.setitem(sys.modules, module_name, types.SimpleNamespace(**{attr: bar}))
    with quiet("coremltools"):
        getattr(sys.modules[module_name], attr)()
    getattr(sys.modules[module_name], attr)()
    assert calls == [{"disable": True}, {}]


def test_quiet_refuses_an_unknown_library_before_changing_anything() -> None:
    root_level = logging.getLogger().level
    with pytest.raises(KeyError), quiet("onnxruntime.quantization", "no-such-library"):
        pass
    assert logging.getLogger().level == root_level


def test_choose_validation_prefers_data_then_examples_then_specs() -> None:
    specs = (TensorSpec("input_ids", "int64", ("batch", "sequence")), TensorSpec("x", "float32", ("batch", 3)))
    options = PackageOptions(validation_samples=5, sequence_length=7, seed=1)
    data = {"input_ids": np.ones((2, 4), np.int32), "x": np.zeros((2, 3), np.float64)}
    arrays, origin = choose_validation(specs, options, data=data)
    assert origin == "calibration" and arrays["input_ids"].dtype == np.int64 and arrays["x"].shape == (2, 3)
    examples = {"input_ids": np.array([[3, 9]], np.int64), "x": np.full((1, 3), 2.0, np.float32)}
    arrays, origin = choose_validation(specs, options, data=None, examples=examples)
    assert origin == "random, shaped like example_inputs (seed 1)"
    assert arrays["input_ids"].shape == (5, 2) and 3 <= arrays["input_ids"].min() <= arrays["input_ids"].max() <= 9
    arrays, origin = choose_validation(specs, options, data=None, vocab={"input_ids": 50})
    assert origin == "random (seed 1)" and arrays["input_ids"].shape == (5, 7) and arrays["x"].shape == (5, 3)
    assert arrays["input_ids"].max() < 50 and arrays["x"].dtype == np.float32
    again, _ = choose_validation(specs, options, data=None, vocab={"input_ids": 50})
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)  # seeded
    with pytest.raises(PackagingError, match="calibration data must hold exactly"):
        choose_validation(specs, options, data={"x": data["x"]})


def test_cpu_session_reports_an_unloadable_graph(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(PackagingError, match="onnxruntime cannot load the thing: ") as err:
        cpu_session(bad, what="the thing")
    assert err.value.__cause__ is not None
