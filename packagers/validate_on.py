"""Validate a bundle in the runtime release the device runs: ``--validate-on onnxruntime==1.17.3``.

The build host validates with its own runtime; a device may run an older one. ``prepare`` refuses, before
any work, a release with no wheel for this machine and makes (or reuses) its cached environment
(``packagers.runtime_envs``); ``validate_bundle`` then loads the signed bundle there exactly as a device
would (``python -m device_runtime.runcheck``: verify, load, golden health check), runs the validation
inputs, and compares the outputs with the reference by the same rule and tolerances as the host's
validation (``packagers.validation.compare_outputs``). The numbers go into the manifest's
``validation.on_runtime``, with the release they came from.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from packagers.options import Target, Tolerances
from packagers.runtime_envs import RuntimeEnv, check_wheel, ensure_env, parse_pinned
from packagers.validation import compare_outputs
from sdk.errors import PackagingError
from sdk.manifest import TensorSpec

__all__ = ["TARGET_OF", "ValidateOn", "prepare", "validate_bundle"]

TARGET_OF: dict[str, Target] = {"onnxruntime": Target.ONNXRUNTIME, "openvino": Target.OPENVINO,
                                "ai-edge-litert": Target.TFLITE}  # fmt: skip


@dataclass(frozen=True)
class ValidateOn:
    """The release one target's bundles are validated in, and its environment."""

    target: Target
    env: RuntimeEnv

    @property
    def label(self) -> str:
        return f"{self.env.package}=={self.env.version}"


def prepare(spec: str, targets: Sequence[Target], say: Callable[[str], None]) -> ValidateOn:
    """Check ``spec`` against the targets asked for and make its environment, before any build work.

    Raises:
        PackagingError: a bad spec, a runtime of none of ``targets``, or no wheel for this machine.
        RegistryUnreachable: PyPI could not be reached to make the environment.
    """
    package, version = parse_pinned(spec)
    target = TARGET_OF[package]
    if target not in targets:
        raise PackagingError(f"--validate-on {spec} validates {target.value} bundles; the targets asked are "
                             f"{', '.join(t.value for t in targets)}")  # fmt: skip
    check_wheel(package, version)
    return ValidateOn(target, ensure_env(spec, say=say))


_savez: Any = np.savez  # numpy's stub types **arrays as its allow_pickle flag


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def validate_bundle(
    on: ValidateOn, bundle: Path, key: Ed25519PublicKey, specs: Sequence[TensorSpec],
    inputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], tol: Tolerances,
) -> dict[str, Any]:  # fmt: skip
    """Load ``bundle`` in ``on``'s release, health-check it and compare it with ``reference``.

    Returns:
        ``{"package", "version", "numpy", "health", "health_metrics", "metrics", "passed", "failures"}``.

    Raises:
        PackagingError: the bundle did not load or run there (the message carries the runtime's error).
    """
    with tempfile.TemporaryDirectory(prefix="edgeship-validate-on-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "key.pub").write_bytes(_public_pem(key))
        _savez(tmp / "in.npz", **dict(inputs))
        run = on.env.run(["-m", "device_runtime.runcheck", str(bundle), "--trust", str(tmp / "key.pub"),
                          "--inputs", str(tmp / "in.npz"), "--outputs", str(tmp / "out.npz")])  # fmt: skip
        try:
            answer = json.loads(run.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError) as e:
            raise PackagingError(f"--validate-on {on.label}: the check did not answer: {run.stderr[-800:]}") from e
        if answer.get("load") != "ok" or answer.get("ran") != "ok":
            why = answer.get("load") if answer.get("load") != "ok" else answer.get("ran")
            raise PackagingError(f"--validate-on {on.label}: the bundle does not run there: {why}")
        with np.load(tmp / "out.npz", allow_pickle=False) as data:
            outputs = {k: data[k] for k in data.files}
    result = compare_outputs(specs, reference, outputs, tol)
    failures = list(result["failures"])
    if answer["health"] != "ok":
        failures.append(f"health check: {answer['health']}")
    return {
        "package": on.env.package, "version": answer.get("version") or on.env.version, "numpy": answer["numpy"],
        "health": answer["health"], "health_metrics": answer.get("health_metrics"), "metrics": result["metrics"],
        "passed": bool(result["passed"]) and answer["health"] == "ok", "failures": failures,
    }  # fmt: skip
