"""Fixtures: keys and real signed bundles (see runtime_bundles.py)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from runtime_bundles import (
    CREATED,
    GOLDEN_X,
    LINEAR_SPECS,
    MASKED_SPECS,
    BundleMaker,
    Keys,
    linear_onnx,
    linear_reference,
    masked_sum_onnx,
    npy_bytes,
)

from sdk.bundle import write_bundle
from sdk.manifest import Manifest, TensorSpec, format_time
from sdk.signing import generate_keypair, load_private_key


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("keys")
    private_path, public_path = generate_keypair(folder, "release")
    _, other_public = generate_keypair(folder, "stranger")
    return Keys(load_private_key(private_path), public_path, other_public)


@pytest.fixture(scope="session")
def make_bundle(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> BundleMaker:
    """``make_bundle(name=..., version=..., ...) -> Path`` of a signed linear-model bundle (by default)."""
    folder = tmp_path_factory.mktemp("bundles")
    linear, masked = linear_onnx(), masked_sum_onnx()
    counter = itertools.count()

    def make(
        *,
        name: str = "linear",
        version: int = 1,
        target: str = "onnxruntime",
        model: str = "linear",
        model_bytes: bytes | None = None,
        golden_outputs: Mapping[str, np.ndarray] | None = None,
        tolerance: Mapping[str, float] | None = None,
        runtime: Mapping[str, Any] | None = None,
        inputs: tuple[TensorSpec, ...] | None = None,
        expires: str | None = None,
        signers: Sequence[Ed25519PrivateKey] | None = None,
    ) -> Path:
        golden_in: dict[str, np.ndarray]
        golden_out: dict[str, np.ndarray]
        if model == "linear":
            specs, onnx_bytes = LINEAR_SPECS, linear
            golden_in = {"x": GOLDEN_X}
            golden_out = {"y": linear_reference(GOLDEN_X)}
        else:
            specs, onnx_bytes = MASKED_SPECS, masked
            ids = np.array([[3, 4, 5], [6, 7, 8]], dtype=np.int64)
            mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.int32)
            golden_in = {"input_ids": ids, "attention_mask": mask}
            golden_out = {"total": (ids * mask).sum(axis=1).astype(np.float32)}
        if golden_outputs is not None:
            golden_out = dict(golden_outputs)
        members: dict[str, bytes] = {"model.onnx": model_bytes if model_bytes is not None else onnx_bytes}
        golden: dict[str, Any] = {
            "inputs": {},
            "outputs": {},
            "tolerance": dict(tolerance or {"atol": 1e-5, "rtol": 1e-4}),
        }
        for side, arrays in (("inputs", golden_in), ("outputs", golden_out)):
            for key, array in arrays.items():
                member = f"golden/{side}/{key}.npy"
                members[member] = npy_bytes(array)
                golden[side][key] = member
        manifest = Manifest(
            name=name,
            version=version,
            target=target,
            precision="fp32",
            model="model.onnx",
            inputs=inputs or tuple(specs["inputs"]),
            outputs=tuple(specs["outputs"]),
            created=format_time(CREATED),
            runtime=dict(runtime or {"package": "onnxruntime", "providers": ["CPUExecutionProvider"]}),
            golden=golden,
            expires=expires,
        )
        out = folder / f"{name}-{version}-{target}-{next(counter)}.edgebundle"
        write_bundle(out, manifest, members, list(signers) if signers is not None else [keys.private])
        return out

    return make


@pytest.fixture(scope="session")
def linear_bundle(make_bundle: BundleMaker) -> Path:
    return make_bundle()


@pytest.fixture(scope="session")
def masked_bundle(make_bundle: BundleMaker) -> Path:
    return make_bundle(name="masked", model="masked")


@pytest.fixture
def hide_runtime(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``hide_runtime("onnxruntime")``: ``import onnxruntime`` fails and no distribution of it is installed
    (its metadata is hidden too, so the backend says "not installed", not "installed but failed to import")."""
    import importlib.metadata

    real = importlib.metadata.version

    def hide(module: str) -> None:
        def version(dist: str) -> str:
            if dist.startswith(module):  # onnxruntime, onnxruntime-gpu, ...; openvino; coremltools
                raise importlib.metadata.PackageNotFoundError(dist)
            return real(dist)

        monkeypatch.setitem(sys.modules, module, None)  # type: ignore[arg-type]
        monkeypatch.setattr(importlib.metadata, "version", version)

    return hide
