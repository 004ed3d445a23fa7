"""The Core ML backend: a clear platform error off macOS, the install hint, dtype casts, options.

Real Core ML bundles predict in tests/packagers/test_coreml_package.py (macOS only); these tests use a
signed bundle with the layout of one (the package's files under ``model.mlpackage/``), which is all
the backend reads before it needs Core ML itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from runtime_bundles import CREATED, Keys, npy_bytes

import device_runtime
from device_runtime.backends import BackendOptions, create_backend
from device_runtime.backends.coreml import CoreMlBackend
from sdk.bundle import read_bundle, write_bundle
from sdk.errors import BackendError, InputError
from sdk.manifest import Manifest, TensorSpec, format_time
from sdk.signing import TrustedKeys, load_public_key

IDS = np.array([[101, 7, 102]], dtype=np.int64)


def _coreml_bundle(folder: Path, keys: Keys) -> Path:
    manifest = Manifest(
        name="tiny-coreml", version=1, target="coreml", precision="fp16", model="model.mlpackage/Manifest.json",
        inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        outputs=(TensorSpec("logits", "float32", ("batch", 2)),),
        created=format_time(CREATED),
        runtime={"package": "coremltools", "min_version": "9.0.0", "arch": ["aarch64", "x86_64"],
                 "compute_units": "CPU_AND_NE", "coreml_inputs": {"input_ids": "int32"},
                 "coreml_outputs": {"logits": "float32"}},
        golden={"inputs": {"input_ids": "golden/inputs/input_ids.npy"},
                "outputs": {"logits": "golden/outputs/logits.npy"}, "tolerance": {"atol": 1e-3, "rtol": 1e-3}},
    )  # fmt: skip
    members = {
        "model.mlpackage/Manifest.json": b'{"fileFormatVersion": "1.0.0"}',
        "model.mlpackage/Data/com.apple.CoreML/model.mlmodel": b"spec",
        "golden/inputs/input_ids.npy": npy_bytes(IDS),
        "golden/outputs/logits.npy": npy_bytes(np.zeros((1, 2), np.float32)),
    }
    path = folder / "tiny-coreml-1-coreml-fp16.edgebundle"
    write_bundle(path, manifest, members, [keys.private])
    return path


@pytest.fixture
def bundle_path(tmp_path: Path, keys: Keys) -> Path:
    return _coreml_bundle(tmp_path, keys)


def test_registered() -> None:
    assert isinstance(create_backend("coreml"), CoreMlBackend)


@pytest.mark.skipif(sys.platform == "darwin", reason="the platform error is for hosts other than macOS")
def test_load_off_macos_names_the_platform(bundle_path: Path, keys: Keys, hide_runtime: Callable[[str], None]) -> None:
    # refused before importing Core ML: an unimportable coremltools changes nothing
    hide_runtime("coremltools")
    with pytest.raises(BackendError, match=r"Core ML bundles run only on macOS/iOS; this is Linux"):
        device_runtime.load(bundle_path, keys.public)


def test_missing_coremltools_on_macos_names_the_extra(
    bundle_path: Path,
    keys: Keys,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    hide_runtime: Callable[[str], None],
) -> None:
    verified = read_bundle(bundle_path, TrustedKeys((load_public_key(keys.public),)), tmp_path / "x")
    monkeypatch.setattr(sys, "platform", "darwin")
    hide_runtime("coremltools")
    backend = CoreMlBackend()
    with pytest.raises(BackendError, match=r"pip install 'edgeship\[coreml\]'"):
        backend.load(verified.path(verified.manifest.model), verified.manifest, BackendOptions())


def test_bad_compute_units_and_dtype_map(
    bundle_path: Path, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    verified = read_bundle(bundle_path, TrustedKeys((load_public_key(keys.public),)), tmp_path / "x")
    model_path = verified.path(verified.manifest.model)
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(BackendError, match="compute_units must be one of ALL, CPU_ONLY, CPU_AND_NE, CPU_AND_GPU"):
        CoreMlBackend().load(model_path, verified.manifest, BackendOptions(compute_units="NPU"))
    broken = verified.manifest.to_dict()
    broken["runtime"] = {**broken["runtime"], "coreml_inputs": {"input_ids": "int64"}}
    with pytest.raises(BackendError, match=r"runtime\.coreml_inputs must map"):
        CoreMlBackend().load(model_path, Manifest.from_dict(broken), BackendOptions())


def test_inputs_cast_to_the_package_dtypes() -> None:
    backend = CoreMlBackend()
    backend._inputs = {"input_ids": "int32"}
    assert backend._cast("input_ids", IDS).dtype == np.int32
    with pytest.raises(InputError, match="outside int32"):
        backend._cast("input_ids", np.array([[2**40]], dtype=np.int64))
