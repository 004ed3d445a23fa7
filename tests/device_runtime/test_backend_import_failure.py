"""A runtime that is installed but does not import is reported as such, with what to do (issue 13)."""

from __future__ import annotations

import importlib
from importlib import metadata
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from device_runtime.backends import base
from device_runtime.backends.onnxruntime import OnnxRuntimeBackend
from sdk.errors import BackendError

NUMPY_ABI = ImportError("")  # what onnxruntime 1.17.3 raises beside numpy 2 (numpy's text goes to stderr)


def _pretend(monkeypatch: pytest.MonkeyPatch, versions: dict[str, str], error: Exception | None,
             numpy_version: str = "2.4.6") -> None:  # fmt: skip
    def version(dist: str) -> str:
        if dist in versions:
            return versions[dist]
        raise metadata.PackageNotFoundError(dist)

    real = importlib.import_module

    def import_module(name: str, *args: Any) -> ModuleType:
        if name == "onnxruntime" and error is not None:
            raise error
        return real(name, *args)

    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setattr(importlib, "import_module", import_module)
    monkeypatch.setattr(np, "__version__", numpy_version)


def test_old_onnxruntime_beside_numpy_2_says_what_failed_and_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend(monkeypatch, {"onnxruntime": "1.17.3"}, NUMPY_ABI)
    with pytest.raises(BackendError) as caught:
        OnnxRuntimeBackend.import_runtime()
    text = str(caught.value)
    assert "onnxruntime 1.17.3 is installed but failed to import" in text
    assert "pip install 'numpy<2'" in text
    assert "not installed" not in text


def test_numpy_message_in_the_error_is_recognised_for_any_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    error = ImportError("A module that was compiled using NumPy 1.x cannot be run in NumPy 2.4.6")
    _pretend(monkeypatch, {"onnxruntime-gpu": "1.20.0"}, error)
    with pytest.raises(BackendError, match=r"onnxruntime-gpu 1\.20\.0 is installed.*numpy<2"):
        OnnxRuntimeBackend.import_runtime()


def test_other_import_failures_suggest_a_reinstall(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend(monkeypatch, {"onnxruntime": "1.22.0"}, ImportError("libgomp.so.1: cannot open shared object file"))
    with pytest.raises(
        BackendError, match=r"failed to import \(ImportError: libgomp.*force-reinstall 'onnxruntime==1\.22\.0'"
    ):
        OnnxRuntimeBackend.import_runtime()


def test_a_missing_runtime_is_still_called_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend(monkeypatch, {}, ModuleNotFoundError("No module named 'onnxruntime'"))
    with pytest.raises(BackendError, match="which is not installed; install it with: pip install 'edgeship"):
        OnnxRuntimeBackend.import_runtime()
    assert base.import_failure("onnxruntime", "onnxruntime", ImportError(), "onnxruntime").startswith("bundle target")
