"""``edgeship-device``: run a bundle on this device.

    edgeship-device predict --bundle FILE --trust PUB [--trust PUB ...] --input NAME=x.npy [...] [--state-dir DIR]
    edgeship-device health  --bundle FILE --trust PUB [--trust PUB ...] [--state-dir DIR]

Results go to stdout as JSON. An expected failure (any ``EdgeshipError``) prints one ``error: ...``
line to stderr and exits 1; bad usage exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.errors import HealthCheckError
from device_runtime.model import Model, load
from sdk.errors import EdgeshipError, InputError

__all__ = ["main"]

_HEAD = 8  # output values shown in the summary


def _named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got {text!r}")
    return name, Path(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeship-device", description="Run edgeship bundles on this device.")
    sub = parser.add_subparsers(dest="command", required=True)

    def bundle_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bundle", required=True, type=Path, help="the .edgebundle file")
        p.add_argument(
            "--trust",
            required=True,
            action="append",
            type=Path,
            metavar="PUB",
            help="a trusted public key file (repeat for several)",
        )
        p.add_argument("--state-dir", type=Path, help="install into this state directory (version history kept)")
        p.add_argument("--allow-downgrade", action="store_true", help="accept a version lower than installed")
        p.add_argument("--threads", type=int, help="intra-op threads (default: the runtime's choice)")

    predict = sub.add_parser("predict", help="run the model once on .npy inputs")
    bundle_args(predict)
    predict.add_argument(
        "--input",
        required=True,
        action="append",
        type=_named_path,
        metavar="NAME=FILE.npy",
        help="one input array (repeat for each input)",
    )
    health = sub.add_parser("health", help="run the bundle's golden health check")
    bundle_args(health)
    return parser


def _load(args: argparse.Namespace) -> Model:
    return load(
        args.bundle,
        args.trust,
        state_dir=args.state_dir,
        allow_downgrade=args.allow_downgrade,
        intra_op_threads=args.threads,
    )


def _model_info(model: Model) -> dict[str, Any]:
    m = model.manifest
    return {"name": m.name, "version": m.version, "target": m.target, "sha256": model.bundle_sha256}


def _read_inputs(pairs: list[tuple[str, Path]]) -> dict[str, np.ndarray]:
    inputs: dict[str, np.ndarray] = {}
    for name, path in pairs:
        if name in inputs:
            raise InputError(f"input {name!r} given twice")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read input {name!r} from {path}: {e}") from e
    return inputs


def _summary(array: np.ndarray) -> dict[str, Any]:
    flat = array.ravel()
    out: dict[str, Any] = {"dtype": str(array.dtype), "shape": list(array.shape)}
    if array.dtype.kind not in "biuf":
        return out
    values = flat.astype(np.float64)
    finite = values[np.isfinite(values)]
    if array.dtype.kind == "f":
        out["head"] = [v if np.isfinite(v) else None for v in values[:_HEAD].tolist()]  # JSON has no NaN
    else:
        out["head"] = flat[:_HEAD].tolist()
    out["non_finite"] = int(values.size - finite.size)
    if finite.size:
        out.update(min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean()))
    return out


def _predict(args: argparse.Namespace) -> int:
    inputs = _read_inputs(args.input)
    with _load(args) as model:
        outputs = model.predict(inputs)
        result = {"model": _model_info(model), "outputs": {name: _summary(v) for name, v in outputs.items()}}
    print(json.dumps(result, indent=2))
    return 0


def _health(args: argparse.Namespace) -> int:
    with _load(args) as model:
        try:
            metrics = model.health_check()
        except HealthCheckError as e:
            print(json.dumps({"model": _model_info(model), **e.metrics}, indent=2))
            raise
        print(json.dumps({"model": _model_info(model), **metrics}, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``edgeship-device``; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed usage (exit 2) or help (exit 0)
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command == "predict":
            return _predict(args)
        return _health(args)
    except EdgeshipError as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
