"""Load a bundle, run its health check and, optionally, given inputs: one JSON line out (``python -m``).

The host runs this inside a virtual environment holding another runtime release
(``packagers.runtime_envs``): ``edgeship package --validate-on`` and the compatibility matrix compare what
that release computes with the reference, and need what a device would do, spoken as data::

    python -m device_runtime.runcheck BUNDLE --trust PUB [--inputs IN.npz --outputs OUT.npz]

Prints ``{"package", "version", "numpy", "python", "load", "health", "ran"}`` (``load``/``health``: ``"ok"``
or the error; ``health_metrics``: the health check's numbers). With ``--inputs``, the model's outputs for
those arrays (batch first) are written to ``--outputs``, one sample at a time where the model's batch is
fixed. Exit status 0 when everything asked for worked, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import numpy as np

from device_runtime.model import Model, load

__all__ = ["main"]

_PACKAGES = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "openvino": ("openvino",),
             "tflite": ("ai-edge-litert", "tflite-runtime", "tensorflow"), "coreml": ("coremltools",)}  # fmt: skip


_savez: Any = np.savez  # numpy's stub types **arrays as its allow_pickle flag


def _installed(target: str) -> tuple[str | None, str | None]:
    for name in _PACKAGES.get(target, ()):
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None, None


def _run_all(model: Model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    try:
        return model.predict(inputs)
    except Exception:  # a fixed batch: one sample at a time
        n = len(next(iter(inputs.values())))
        parts = [model.predict({k: v[i : i + 1] for k, v in inputs.items()}) for i in range(n)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m device_runtime.runcheck", description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--trust", action="append", required=True)
    parser.add_argument("--inputs", help=".npz of input arrays, batch first")
    parser.add_argument("--outputs", help=".npz the outputs are written to")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"numpy": np.__version__, "python": platform.python_version(), "load": None,
                              "health": None, "ran": None}  # fmt: skip
    ok = True
    try:
        model = load(args.bundle, args.trust)
    except Exception as e:  # the answer is data: the caller records why it did not load
        report["load"] = f"{type(e).__name__}: {str(e)[:500]}"
        print(json.dumps(report))
        return 1
    with model:
        report["load"] = "ok"
        report["package"], report["version"] = _installed(model.manifest.target)
        try:
            metrics: Any = model.health_check()
            report["health"] = "ok"
        except Exception as e:
            metrics = getattr(e, "metrics", None)
            report["health"] = f"{type(e).__name__}: {str(e)[:500]}"
            ok = False
        report["health_metrics"] = metrics
        if args.inputs:
            try:
                with np.load(args.inputs, allow_pickle=False) as data:
                    inputs = {k: data[k] for k in data.files}
                _savez(args.outputs, **_run_all(model, inputs))
                report["ran"] = "ok"
            except Exception as e:
                report["ran"] = f"{type(e).__name__}: {str(e)[:500]}"
                ok = False
    print(json.dumps(report, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
