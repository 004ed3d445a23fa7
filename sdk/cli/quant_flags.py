"""`edgeship package`'s quantization flags: the knobs optimum and NNCF users know, and the mixed-precision cap.

Kept apart from ``sdk.cli.main`` so the package command's parser stays readable; ``main`` adds these
arguments and passes ``quantization_options(args)`` into ``PackageOptions``.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_quantization_arguments", "quantization_options"]


def _symmetry(value: str) -> bool:
    if value not in ("symmetric", "asymmetric"):
        raise argparse.ArgumentTypeError(f"expected symmetric or asymmetric, got {value!r}")
    return value == "symmetric"


def _share_or_count(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count (>= 1) or a share (< 1), got {value!r}") from None


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the int8 options to ``parser`` (one argument group)."""
    group = parser.add_argument_group("quantization (int8, int8-dynamic)")
    group.add_argument(
        "--calibration-size",
        type=int,
        metavar="N",
        help="static int8: calibration samples used (default: onnxruntime 128, openvino 300)",
    )
    group.add_argument(
        "--activations",
        type=_symmetry,
        metavar="symmetric|asymmetric",
        help="static int8 activations (default: the target's: asymmetric on onnxruntime)",
    )
    group.add_argument(
        "--weights", type=_symmetry, metavar="symmetric|asymmetric", help="int8 weights (default: symmetric)"
    )
    group.add_argument(
        "--per-channel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="int8 weights per output channel, or per tensor (default: validation picks)",
    )
    group.add_argument(
        "--smoothquant-alpha",
        type=float,
        metavar="A",
        help="SmoothQuant migration strength in [0, 1] for MatMul inputs; 0 switches smoothing off "
        "(default: onnxruntime picks per activation, openvino NNCF's 0.95 for transformers)",
    )
    group.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="NAME-OR-REGEX",
        help="keep these layers in float: a node name (ONNX for onnxruntime, NNCF for openvino) or a "
        "regular expression matching whole names; repeatable",
    )
    group.add_argument(
        "--exclude-op-type",
        action="append",
        default=[],
        metavar="OP",
        help="keep every layer of this op type in float (Conv, MatMul, Gemm, ...); repeatable",
    )
    group.add_argument(
        "--max-float-layers",
        type=_share_or_count,
        default=0.1,
        metavar="N|SHARE",
        help="mixed precision: at most this many quantized layers (>= 1) or this share of them (< 1) "
        "kept in float when plain int8 misses the tolerance (default: %(default)s; 0: no search)",
    )
    group.add_argument(
        "--target-cosine",
        type=float,
        metavar="C",
        help="the mean cosine an int8 bundle must reach (tightens the tolerance; the mixed-precision "
        "search keeps layers in float to meet it)",
    )


def quantization_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``PackageOptions`` keyword arguments the quantization flags set."""
    return {
        "calibration_size": args.calibration_size,
        "activation_symmetric": args.activations,
        "weight_symmetric": args.weights,
        "per_channel": args.per_channel,
        "smoothquant_alpha": args.smoothquant_alpha,
        "exclude": tuple(args.exclude),
        "exclude_op_types": tuple(args.exclude_op_type),
        "max_float_layers": args.max_float_layers,
        "target_cosine": args.target_cosine,
    }
