"""Plain data shared by every target: targets, precisions, capabilities, tolerances, options, results.

Nothing here imports a heavy library; ``import packagers`` stays cheap.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from sdk.errors import PackagingError
from sdk.manifest import Manifest
from sdk.runtime_versions import DEFAULT_OPSET

__all__ = [
    "CALIBRATION_METHODS",
    "DEFAULT_TOLERANCES",
    "INT8_FAMILY",
    "INPUT_KINDS",
    "Capabilities",
    "PackageOptions",
    "PackageResult",
    "Precision",
    "Target",
    "Tolerances",
]

INPUT_KINDS = ("torch", "transformers", "onnx", "keras")  # every kind packagers.sources can load
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")  # static int8 calibration


_E = TypeVar("_E", bound="_Named")


class _Named(str, Enum):
    """A string enum whose ``parse`` takes a member or its value, in any case."""

    @classmethod
    def parse(cls: type[_E], value: str | _E) -> _E:
        """The member named by ``value``.

        Raises:
            PackagingError: ``value`` names no member; the message lists them.
        """
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            what = cls.__name__.lower()
            choices = ", ".join(m.value for m in cls)
            raise PackagingError(f"unknown {what} {value!r}; known {what}s: {choices}") from None


class Target(_Named):
    """An edge runtime a bundle is built for (the manifest's ``target``)."""

    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"
    TFLITE = "tflite"
    COREML = "coreml"


class Precision(_Named):
    """Numeric precision of the built model (the manifest's ``precision``)."""

    FP32 = "fp32"
    FP16 = "fp16"  # weights and compute in half precision where the target runs it
    INT8_DYNAMIC = "int8-dynamic"  # int8 weights, activations quantized at run time
    INT8 = "int8"  # static int8 weights and activations, calibrated on data
    INT8_WEIGHTS = "int8-weights"  # weight-only int8 compression, float activations
    INT4 = "int4"  # weight-only 4-bit (blockwise / grouped)
    INT4_PALETTE = "int4-palette"  # 4-bit weight palettization (a 16-entry lookup table per tensor)


# Precisions that quantize activations (calibrated or at run time): the ones the mixed-precision search serves.
INT8_FAMILY = (Precision.INT8, Precision.INT8_DYNAMIC)


@dataclass(frozen=True)
class Capabilities:
    """What one target can build, declared up front so requests are refused before any work."""

    precisions: tuple[Precision, ...]
    input_kinds: tuple[str, ...]  # subset of INPUT_KINDS
    dynamic_shapes: bool  # named dynamic dims (batch, sequence) survive the build

    def refuse(self, target: Target, precision: Precision, input_kind: str) -> str | None:
        """Why ``target`` cannot build ``precision`` from ``input_kind``, or None when it can."""
        if precision not in self.precisions:
            valid = ", ".join(p.value for p in self.precisions)
            return f"target {target.value} does not support precision {precision.value}; valid precisions: {valid}"
        if input_kind not in self.input_kinds:
            valid = ", ".join(self.input_kinds)
            return f"target {target.value} cannot build from a {input_kind} model; valid input kinds: {valid}"
        return None


@dataclass(frozen=True)
class Tolerances:
    """How far a built model's outputs may drift from the reference and still be signed.

    Every bound is checked per output on the validation samples; None switches a check off.
    """

    min_cosine: float = 0.9999  # lowest per-sample cosine similarity (outputs flattened per sample)
    min_cosine_mean: float = 0.9999  # mean of the per-sample cosine similarities
    max_rel_diff: float | None = 1e-3  # max |built - reference| divided by max |reference|
    min_top1_agreement: float | None = None  # logits-like outputs: share of samples with the same argmax
    max_accuracy_drop: float | None = 0.01  # with labels: reference accuracy minus bundle accuracy
    # Dense probability maps (N,C,H,W or N,H,W in [0, 1], C <= 4): lowest mean IoU of the maps thresholded at 0.5.
    # int8 default 0.9, from PP-OCRv4's text detector (16 rendered text crops, 320x320): ORT static per-tensor
    # 0.911, NNCF 0.961 (0.973 with the one convolution the mixed-precision search kept float).
    min_iou: float | None = None
    # Golden health check on the device (another CPU's kernels): |out - golden| <= atol + rtol * |golden|,
    # with atol = golden_atol_rel * max |golden|, and per-sample cosine >= golden_min_cosine.
    golden_atol_rel: float = 1e-3
    golden_rtol: float = 1e-3
    golden_min_cosine: float = 0.999

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise PackagingError(f"tolerance {name} must be a finite number, got {value!r}")
            low = -1.0 if "cosine" in name else 0.0  # cosine similarity lies in [-1, 1]
            if value < low:
                raise PackagingError(f"tolerance {name} must be >= {low:g}, got {value!r}")
        for name in ("min_cosine", "min_cosine_mean", "golden_min_cosine", "min_top1_agreement", "min_iou"):
            value = getattr(self, name)
            if value is not None and value > 1:
                raise PackagingError(f"tolerance {name} must be <= 1, got {value!r}")

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


# Tuned on the tests' models (tiny BERT, digits MLP and CNN). Measured int8-dynamic: mean cosine
# 0.9995-0.99998, worst sample 0.9957 (CNN, 200 samples), top-1 agreement >= 0.985. The worst-sample
# bound is looser than the mean because the minimum over many samples keeps falling as N grows; a
# model whose export does not match its eager behaviour lands far below both.
_FOUR_BIT = Tolerances(
    min_cosine=0.9, min_cosine_mean=0.95, max_rel_diff=None, min_top1_agreement=0.8, max_accuracy_drop=0.05,
    golden_atol_rel=0.1, golden_rtol=0.1, golden_min_cosine=0.95,
)  # fmt: skip
DEFAULT_TOLERANCES: Mapping[Precision, Tolerances] = MappingProxyType(
    {
        Precision.FP32: Tolerances(),
        Precision.FP16: Tolerances(
            min_cosine=0.999, min_cosine_mean=0.999, max_rel_diff=1e-2, min_top1_agreement=0.95, max_accuracy_drop=0.01,
            golden_atol_rel=1e-2, golden_rtol=1e-2, golden_min_cosine=0.995,
        ),
        Precision.INT8_DYNAMIC: Tolerances(
            min_cosine=0.95, min_cosine_mean=0.99, max_rel_diff=None, min_top1_agreement=0.9, max_accuracy_drop=0.03,
            min_iou=0.9,
            golden_atol_rel=0.05, golden_rtol=0.05, golden_min_cosine=0.98,
        ),
        Precision.INT8: Tolerances(
            min_cosine=0.95, min_cosine_mean=0.98, max_rel_diff=None, min_top1_agreement=0.9, max_accuracy_drop=0.03,
            min_iou=0.9,
            golden_atol_rel=0.05, golden_rtol=0.05, golden_min_cosine=0.98,
        ),
        # Weight-only int8 (per-channel, float activations): tiny BERT cosine 0.99998 (OpenVINO/NNCF).
        Precision.INT8_WEIGHTS: Tolerances(
            min_cosine=0.99, min_cosine_mean=0.995, max_rel_diff=None, min_top1_agreement=0.95, max_accuracy_drop=0.02,
            golden_atol_rel=0.02, golden_rtol=0.02, golden_min_cosine=0.99,
        ),
        Precision.INT4: _FOUR_BIT,
        # 4-bit palettization (16 k-means centroids per weight tensor, float activations): INT4's bounds.
        Precision.INT4_PALETTE: _FOUR_BIT,
    }
)  # fmt: skip


@dataclass(frozen=True)
class PackageOptions:
    """Less common knobs of ``package``; the defaults suit small and medium models."""

    input_names: Sequence[str] | None = None  # torch modules: names for the positional example inputs
    output_names: Sequence[str] | None = None  # torch modules: names for the returned tensors
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None  # torch: {tensor: {dim: name}}; default batch
    opset: int | None = None  # ONNX opset for torch exports; None: 17, or the oldest planned runtime's highest
    exporter: str = "auto"  # "auto" (TorchScript, then dynamo if it fails), "torchscript" or "dynamo"
    tolerances: Tolerances | Mapping[str, Tolerances] | None = None  # one for all, or per precision
    golden_samples: int = 4  # validation samples stored for the on-device health check
    validation_samples: int = 32  # generated when no calibration data is given (one top-1 flip = 3%)
    max_validation_samples: int = 512  # calibration data beyond this is not used for validation
    sequence_length: int = 16  # text models without a tokenizer: length of the random ids
    dim_values: Mapping[str, int] | None = None  # .onnx files: values for named dynamic dims of random data
    seed: int = 0  # random validation data
    benchmark_warmup: int = 5  # runs
    benchmark_runs: int = 50  # timed runs
    benchmark_max_seconds: float = 10.0  # seconds, stops the timed runs early
    labels_output: str | None = None  # output the labels are scored against; default the first logits-like one
    # static int8 (onnxruntime): "minmax", "entropy" or "percentile"; None: minmax, and for graphs that are not
    # transformers percentile too, as a second candidate (validation picks)
    calibration_method: str | None = None
    per_channel: bool | None = None  # static int8 weights per output channel; None: the target decides
    extra: Mapping[str, Any] = field(default_factory=dict)  # target-specific settings, recorded in the report
    for_runtime: str | None = None  # build for this runtime release: "onnxruntime==1.17", "coreml==iOS17"
    device: str | None = None  # build for this device profile (sdk/profiles.json, `edgeship devices`)
    validate_on: str | None = None  # also validate in this exact release, in a cached venv: "onnxruntime==1.17.3"
    # Mixed precision (int8 targets): layers kept in float, by the target's own layer names (ONNX node names
    # for onnxruntime, NNCF node names for openvino, op names for tflite); set by the user or by the search.
    float_layers: tuple[str, ...] = ()
    max_float_layers: float = 0.1  # search cap: a count (>= 1) or a share of the quantized layers (< 1)
    # Generated validation data: the full shape of an input, batch first ({"x": (1, 3, 640, 640)}); named dims
    # take these values (the batch dim, if named, takes validation_samples).
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    allow_random_calibration: bool = False  # static int8 without calibration data: calibrate on generated data
    overwrite: bool = False  # replace bundles of the same name, version, target and precision in out_dir
    # Quantization knobs (int8 family), as optimum / NNCF users know them; None: the target's default.
    calibration_size: int | None = None  # static int8: calibration samples used (ORT 128, NNCF 300)
    activation_symmetric: bool | None = None  # static int8 activations symmetric (zero point fixed)
    weight_symmetric: bool | None = None  # int8 weights symmetric
    smoothquant_alpha: float | None = None  # SmoothQuant migration strength in [0, 1]; 0 switches it off
    exclude: tuple[str, ...] = ()  # layers kept float: exact names or regular expressions (full match)
    exclude_op_types: tuple[str, ...] = ()  # op types kept float (ONNX names: Conv, MatMul, Gemm, ...)
    target_cosine: float | None = None  # mean cosine an int8 bundle must reach; the search runs to meet it

    def __post_init__(self) -> None:
        if self.exporter not in ("auto", "torchscript", "dynamo"):
            raise PackagingError(f"exporter must be auto, torchscript or dynamo, got {self.exporter!r}")
        for name in ("golden_samples", "validation_samples", "max_validation_samples", "benchmark_runs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PackagingError(f"option {name} must be an integer >= 1, got {value!r}")
        if self.calibration_method is not None and self.calibration_method not in CALIBRATION_METHODS:
            raise PackagingError(
                f"calibration_method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.calibration_method!r}"
            )
        if self.opset is not None and (not isinstance(self.opset, int) or not 7 <= self.opset <= 25):
            raise PackagingError(f"option opset must be an integer between 7 and 25, got {self.opset!r}")
        for tensor, shape in (self.input_shapes or {}).items():
            if (
                not isinstance(tensor, str)
                or not tensor
                or not isinstance(shape, (tuple, list))
                or not shape
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
            ):
                raise PackagingError(
                    f"input_shapes[{tensor!r}] must be a non-empty tuple of integers >= 1 (e.g. 1,3,640,640), "
                    f"got {shape!r}"
                )  # fmt: skip
        for name in ("for_runtime", "device", "validate_on"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise PackagingError(f"option {name} must be a non-empty string, got {value!r}")
        self._check_quantization()

    def _check_quantization(self) -> None:
        """Refuse quantization knobs no quantizer could honour, naming the valid range."""
        for name in ("float_layers", "exclude", "exclude_op_types"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v.strip() for v in value):
                raise PackagingError(f"option {name} must be a sequence of non-empty strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise PackagingError(f"option exclude: {pattern!r} is not a valid regular expression: {e}") from e
        cap = self.max_float_layers
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap < 0:
            raise PackagingError(f"option max_float_layers must be a count >= 1 or a share in [0, 1), got {cap!r}")
        if cap >= 1 and int(cap) != cap:
            raise PackagingError(f"option max_float_layers >= 1 is a count of layers and must be whole, got {cap!r}")
        if self.calibration_size is not None and (
            isinstance(self.calibration_size, bool) or not isinstance(self.calibration_size, int)
            or self.calibration_size < 1
        ):  # fmt: skip
            raise PackagingError(f"option calibration_size must be an integer >= 1, got {self.calibration_size!r}")
        for name in ("activation_symmetric", "weight_symmetric"):
            if getattr(self, name) not in (None, True, False):
                raise PackagingError(f"option {name} must be true, false or None, got {getattr(self, name)!r}")
        for name, low, high in (("smoothquant_alpha", 0.0, 1.0), ("target_cosine", -1.0, 1.0)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise PackagingError(f"option {name} must be a number in [{low:g}, {high:g}], got {value!r}")

    def float_layer_cap(self, quantized: int) -> int:
        """How many of ``quantized`` layers the mixed-precision search may keep in float."""
        if self.max_float_layers >= 1:
            return min(int(self.max_float_layers), quantized)
        share = math.floor(self.max_float_layers * quantized)
        return min(quantized, max(share, 1 if self.max_float_layers > 0 else 0))  # a share > 0 allows one layer

    @property
    def export_opset(self) -> int:
        """The ONNX opset exports use: ``opset``, else the default (``package`` sets it from a runtime plan)."""
        return DEFAULT_OPSET if self.opset is None else self.opset

    def tolerances_for(self, precision: Precision) -> Tolerances:
        """The tolerances that gate ``precision``: an override if given, else the default.

        Raises:
            PackagingError: an override mapping names an unknown precision.
        """
        tol = DEFAULT_TOLERANCES[precision]
        if isinstance(self.tolerances, Tolerances):
            tol = self.tolerances
        elif self.tolerances:
            overrides = {Precision.parse(k): v for k, v in self.tolerances.items()}
            tol = overrides.get(precision, tol)
        if self.target_cosine is not None and precision in INT8_FAMILY and self.target_cosine > tol.min_cosine_mean:
            tol = replace(tol, min_cosine_mean=float(self.target_cosine))  # tightens, never loosens
        return tol


@dataclass(frozen=True)
class PackageResult:
    """One signed bundle written by ``package``."""

    bundle_path: Path
    manifest: Manifest
    target: str
    precision: str
    validation: Mapping[str, Any]  # same as manifest.validation
    size_bytes: int
    latency_ms: Mapping[str, Any]  # host CPU, batch 1: p50, p95, runs
