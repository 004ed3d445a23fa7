"""`edgeship package`'s arguments about inputs and honest defaults, and how they become ``PackageOptions`` fields.

Kept apart from ``sdk.cli.main`` so the package command's growing flag set does not swell the main module.
"""

from __future__ import annotations

import argparse
from typing import Any

from sdk.errors import InputError

__all__ = ["add_input_arguments", "input_options", "per_target_targets"]


def _input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``name=1,3,640,640`` -> ("name", (1, 3, 640, 640)); argparse turns the ValueError into a usage error."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=D0,D1,... with integer dims >= 1, e.g. x=1,3,640,640"
        )
    return name, shape


def add_input_arguments(pk: Any) -> None:
    """--input-shape, --allow-random-calibration and --overwrite."""
    pk.add_argument(
        "--input-shape",
        action="append",
        type=_input_shape,
        metavar="NAME=D0,D1,...",
        help="the full shape (batch first) of an input with dynamic dims, for generated validation data when "
        "there is no --calibration, e.g. images=1,3,640,640 (repeatable)",
    )
    pk.add_argument(
        "--allow-random-calibration",
        action="store_true",
        help="static int8 without --calibration: calibrate on generated data (marked in the table, manifest and "
        "report); without it such a request is refused",
    )
    pk.add_argument(
        "--overwrite",
        action="store_true",
        help="replace bundles of the same name, version, target and precision in --out (refused otherwise)",
    )


def input_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``PackageOptions`` fields the arguments above set.

    Raises:
        InputError: one input's shape was given twice.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in args.input_shape or []:
        if name in shapes and shapes[name] != shape:
            raise InputError(f"--input-shape {name} given twice ({shapes[name]} and {shape})")
        shapes[name] = shape
    return {
        "input_shapes": shapes or None,
        "allow_random_calibration": bool(args.allow_random_calibration),
        "overwrite": bool(args.overwrite),
    }


def per_target_targets(precisions: list[str]) -> str | None:
    """The targets named by per-target precisions (``onnxruntime=fp32``), when --target was not given."""
    names = [p.partition("=")[0].strip() for p in precisions if "=" in p]
    return ",".join(dict.fromkeys(names)) or None
