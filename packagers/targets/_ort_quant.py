"""Graph-level recipes behind the ONNX Runtime target's precisions (fp16, static int8, int4, ORT format).

Kept apart from ``packagers/targets/onnxruntime.py`` so the packager reads as "which recipe, which candidates";
each function here takes ONNX files in and writes one ONNX file out, and returns what it did for the
report. onnx and onnxruntime are imported inside the functions.

The static int8 recipe for transformer graphs (``smooth_matmul_inputs`` + ``quantize_static_qdq`` with
``weights_only``) exists because ORT's defaults lose too much on trained BERT-family encoders: on
all-MiniLM-L6-v2 (sentence embeddings, 136 held-out sentences) plain static QDQ reached cosine 0.94 and
quantize_dynamic per-channel 0.9925. Two things fix it:

- only the weight MatMuls are quantized, without Q/DQ on their outputs (ORT's QDQ quantizer otherwise
  also quantizes the activation x activation attention MatMuls and every MatMul output before its bias);
  the embedding tables (``Gather`` on a constant) are stored int8 as well, per tensor: left float, the word
  table alone made MiniLM's static bundle 65.7 MB against 29.9 MB (cosine 0.99908 -> 0.99875, same speed);
- SmoothQuant-style smoothing: outlier channels of the activations feeding each weight MatMul are divided
  by ``s`` (an explicit ``Mul``) and the weight rows multiplied by ``s``, exact in float. ``s = amax_x^a /
  amax_w^(1-a)`` with ``a`` chosen per activation from a small grid by the simulated int8 error on the
  calibration data (numpy, no extra ORT runs). Measured: cosine 0.996 at the same speed as quantize_dynamic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from packagers._ort_session import cpu_session
from packagers._quiet import quiet
from sdk.errors import PackagingError

__all__ = [
    "ALPHAS",
    "CONV_OPS",
    "activation_matmuls",
    "convert_fp16",
    "is_transformer_graph",
    "prepare_for_qdq",
    "quantize_int4",
    "quantize_static_qdq",
    "sensitive_nodes",
    "smooth_matmul_inputs",
    "to_ort_format",
    "weight_matmuls",
]

ALPHAS = (0.0, 0.3, 0.5, 0.65, 0.8)  # smoothing strengths tried per activation; 0 = leave it as is
_SMOOTH_MAX_SAMPLES = 64  # calibration samples used for the smoothing statistics
_SMOOTH_MAX_ROWS = 2048  # activation rows (tokens) kept per tensor for the simulated error
_MISSING_KERNEL = re.compile(r"Could not find an implementation for (\w+)\(")


def _initializers(model: Any) -> dict[str, Any]:
    return {init.name: init for init in model.graph.initializer}


def weight_matmuls(model: Any) -> list[Any]:
    """MatMul nodes whose second input is a 2-D constant (the layers weight quantization applies to)."""
    inits = _initializers(model)
    return [
        n
        for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
    ]


def activation_matmuls(model: Any) -> list[str]:
    """Names of MatMul nodes without a constant weight (attention scores and context)."""
    inits = _initializers(model)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in inits]


def is_transformer_graph(model: Any) -> bool:
    """LayerNormalization plus weight MatMuls: the graphs the transformer int8 recipe is for."""
    has_norm = any(n.op_type in ("LayerNormalization", "SkipLayerNormalization") for n in model.graph.node)
    return has_norm and bool(weight_matmuls(model))


# ---- fp16 ----------------------------------------------------------------------------------------
def convert_fp16(src: Path, dst: Path, max_tries: int = 8) -> dict[str, Any]:
    """Half-precision weights and compute, float32 inputs and outputs (``keep_io_types``).

    Ops without a float16 kernel in onnxruntime's CPU provider stay in float32: the conversion is
    retried with each op type the session refuses added to the block list.

    Raises:
        PackagingError: the converted graph still does not load after ``max_tries`` attempts.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked: list[str] = []
    for _ in range(max_tries):
        model = onnx.load(str(src))
        with quiet("onnxruntime.quantization"):
            converted = convert_float_to_float16(
                model, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + blocked
            )
        onnx.save_model(converted, str(dst))
        try:
            cpu_session(dst)
        except PackagingError as e:  # onnxruntime's NotImplemented: an op type without a CPU fp16 kernel
            cause = str(e.__cause__ or e)
            missing = _MISSING_KERNEL.search(cause)
            if missing is None or missing.group(1) in blocked:
                raise PackagingError(f"the fp16 graph does not load in onnxruntime: {cause[:300]}") from e
            blocked.append(missing.group(1))
            continue
        return {
            "tool": "onnxruntime.transformers.float16.convert_float_to_float16",
            "keep_io_types": True,
            "kept_float32_op_types": sorted(set(DEFAULT_OP_BLOCK_LIST) | set(blocked)),
            "added_to_block_list": blocked,
        }
    raise PackagingError(f"the fp16 graph still lacks CPU kernels after keeping {', '.join(blocked)} in float32")


# ---- SmoothQuant-style smoothing ------------------------------------------------------------------
def _simulated_error(x: np.ndarray, weights: Sequence[np.ndarray], exact: Sequence[np.ndarray]) -> float:
    """Relative squared error of ``x @ w`` with x as per-tensor asymmetric uint8, w as per-column int8.

    ``exact`` holds the float products (smoothing leaves them unchanged, so callers compute them once).
    """
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = (hi - lo) / 255.0 or 1.0
    zero = np.round(-lo / scale)
    xq = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
    err = total = 0.0
    for w, y in zip(weights, exact, strict=True):
        ws = np.abs(w).max(axis=0) / 127.0
        ws[ws == 0] = 1.0
        wq = np.round(w / ws) * ws
        err += float(((y - xq @ wq) ** 2).sum())
        total += float((y**2).sum())
    return err / total if total > 0 else 0.0


def _collect(
    model: Any, tensors: Sequence[str], feeds: Mapping[str, np.ndarray], workdir: Path
) -> dict[str, np.ndarray]:
    """Float values of ``tensors`` on the calibration samples (rows = tokens, columns = channels)."""
    import onnx
    from onnx import helper

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    present = {o.name for o in augmented.graph.output}
    for name in tensors:
        if name not in present:
            augmented.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    path = workdir / "smooth-stats.onnx"
    onnx.save_model(augmented, str(path))
    session = cpu_session(path, optimization="ORT_ENABLE_BASIC")  # requested outputs survive basic optimizations
    wanted = {i.name for i in session.get_inputs()}
    n = min(len(next(iter(feeds.values()))), _SMOOTH_MAX_SAMPLES)
    parts: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for start in range(0, n, 8):
        chunk = {k: np.ascontiguousarray(v[start : min(start + 8, n)]) for k, v in feeds.items() if k in wanted}
        for name, value in zip(tensors, session.run(list(tensors), chunk), strict=True):
            parts[name].append(value.reshape(-1, value.shape[-1]))
    path.unlink(missing_ok=True)
    return {t: np.concatenate(v).astype(np.float32) for t, v in parts.items()}


def smooth_matmul_inputs(src: Path, dst: Path, feeds: Mapping[str, np.ndarray], workdir: Path,
                         alphas: Sequence[float] = ALPHAS) -> dict[str, Any]:  # fmt: skip
    """Write ``src`` with SmoothQuant-style smoothing of every weight MatMul's input to ``dst``.

    Returns the recipe: smoothed tensors with their alpha, and the simulated int8 error per MatMul
    after smoothing (``sensitivity``, worst first) for choosing the layers kept in float.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    inits = _initializers(model)
    groups: dict[str, list[Any]] = {}
    for node in weight_matmuls(model):
        groups.setdefault(node.input[0], []).append(node)
    values = _collect(model, list(groups), feeds, workdir)
    rng = np.random.default_rng(0)
    chosen: dict[str, float] = {}
    sensitivity: dict[str, float] = {}
    for tensor, nodes in groups.items():
        x = values[tensor]
        if len(x) > _SMOOTH_MAX_ROWS:
            x_eval = x[rng.choice(len(x), _SMOOTH_MAX_ROWS, replace=False)]
        else:
            x_eval = x
        weights = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in nodes]
        exact = [x_eval @ w for w in weights]
        amax_x = np.maximum(np.abs(x).max(axis=0), 1e-8)
        amax_w = np.maximum(np.max([np.abs(w).max(axis=1) for w in weights], axis=0), 1e-8)
        best: tuple[float, float, np.ndarray] | None = None
        for alpha in alphas:
            s = np.clip(amax_x**alpha / amax_w ** (1 - alpha), 1e-5, 1e5) if alpha > 0 else np.ones_like(amax_x)
            s = s.astype(np.float32)
            err = _simulated_error(x_eval / s, [w * s[:, None] for w in weights], exact)
            if best is None or err < best[0]:
                best = (err, alpha, s)
        assert best is not None
        err, alpha, s = best
        for node, w, y in zip(nodes, weights, exact, strict=True):
            sensitivity[node.name] = _simulated_error(x_eval / s, [w * s[:, None]], [y])
        if alpha == 0:
            continue
        chosen[tensor] = alpha
        inverse = numpy_helper.from_array((1.0 / s).astype(np.float32), name=f"{tensor}_smooth_scale")
        smoothed = f"{tensor}_smoothed"
        model.graph.initializer.append(inverse)
        position = min(i for i, n in enumerate(model.graph.node) if tensor in n.input)
        model.graph.node.insert(position, helper.make_node("Mul", [tensor, inverse.name], [smoothed],
                                                           name=f"{tensor}_SmoothMul"))  # fmt: skip
        for node, w in zip(nodes, weights, strict=True):
            node.input[0] = smoothed
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(w * s[:, None], node.input[1]))
    onnx.save_model(model, str(dst))
    return {
        "method": "SmoothQuant-style per-channel smoothing, alpha per activation by simulated int8 error",
        "alphas_tried": list(alphas),
        "smoothed": len(chosen),
        "activations": len(groups),
        "alpha": {k: v for k, v in sorted(chosen.items())},
        "sensitivity": dict(sorted(sensitivity.items(), key=lambda kv: -kv[1])),
    }


def sensitive_nodes(sensitivity: Mapping[str, float], keep_float: int | None) -> list[str]:
    """The MatMuls kept in float: ``keep_float`` worst, or (None) those over 4x the median error, at most 1/6."""
    ranked = sorted(sensitivity.items(), key=lambda kv: -kv[1])
    if keep_float is not None:
        return [name for name, _ in ranked[: max(keep_float, 0)]]
    if not ranked:
        return []
    median = float(np.median([v for _, v in ranked]))
    cap = len(ranked) // 6
    return [name for name, err in ranked[:cap] if err > 4 * median]


# ---- static int8 (QDQ) -----------------------------------------------------------------------------
QDQ_MIN_OPSET = 13  # per-channel DequantizeLinear (its ``axis``) is opset 13
# The CNN recipe: convolutions only, in int8 (QLinearConv chains); the element-wise ops between them
# (hard-swish, squeeze-excite, residual adds) stay float. On PP-OCRv4's detector (320x320, 8 held-out
# images) ORT's default op set reached mean cosine 0.967, this one 0.978 (0.987 with one conv in float).
CONV_OPS = ("Conv", "ConvTranspose")


def prepare_for_qdq(src: Path, dst: Path) -> tuple[Path, dict[str, Any]]:
    """``src``, or a copy at ``dst`` the QDQ quantizer handles: constant weights as initializers, opset >= 13.

    Both fix silent or late failures on exported CNNs (PP-OCRv4's detector, paddle2onnx, opset 12):

    - weights held by ``Constant`` nodes are not seen as weights: the quantizer calibrates them as
      activations (per tensor, whatever ``per_channel`` says) when graph pre-processing did not fold them;
    - below opset 13 ``DequantizeLinear`` has no ``axis``, yet the quantizer writes one for per-channel
      weights and biases: the model is written, then refused at load (INVALID_GRAPH).

    The opset is raised with ``onnx.version_converter`` (exact: the ops keep their meaning).

    Raises:
        PackagingError: the opset conversion failed.
    """
    import onnx
    from onnx import numpy_helper, version_converter

    model = onnx.load(str(src))
    info: dict[str, Any] = {}
    constants = [
        n for n in model.graph.node
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1
        and n.attribute[0].name == "value"
    ]  # fmt: skip
    for node in constants:
        model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t),
                                                               node.output[0]))  # fmt: skip
        model.graph.node.remove(node)
    if constants:
        info["constants_to_initializers"] = len(constants)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), QDQ_MIN_OPSET)
    if opset < QDQ_MIN_OPSET:
        try:
            model = version_converter.convert_version(model, QDQ_MIN_OPSET)
        except Exception as e:  # the converter raises plain errors on ops it cannot adapt
            raise PackagingError(f"raising the opset {opset} -> {QDQ_MIN_OPSET} for int8 QDQ failed: "
                                 f"{str(e)[:300]}; export the model at opset >= 13") from e  # fmt: skip
        info["opset"] = {"from": int(opset), "to": QDQ_MIN_OPSET}
    if not info:
        return src, {}
    onnx.save_model(model, str(dst))
    return dst, info


class _Reader:
    """``CalibrationDataReader`` over arrays, in batches of 8."""

    def __init__(self, feeds: Mapping[str, np.ndarray], names: Sequence[str], limit: int) -> None:
        n = min(len(next(iter(feeds.values()))), limit)
        self._batches = [{k: np.ascontiguousarray(feeds[k][i : min(i + 8, n)]) for k in names} for i in range(0, n, 8)]
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._batches):
            return None
        self._next += 1
        return self._batches[self._next - 1]

    def rewind(self) -> None:
        self._next = 0


def quantize_static_qdq(src: Path, dst: Path, feeds: Mapping[str, np.ndarray], *, method: str, per_channel: bool,
                        weights_only: bool, nodes_to_exclude: Sequence[str] = (), max_samples: int = 128,
                        symmetric_activations: bool | None = None, symmetric_weights: bool | None = None,
                        op_types: Sequence[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """``quantize_static`` in QDQ format: uint8 asymmetric activations, int8 symmetric weights.

    Args:
        weights_only: the transformer recipe: only MatMul/Gemm/Conv with constant weights and Gather on
            constant tables (embeddings), no Q/DQ on MatMul outputs; otherwise ORT's default op set (CNNs
            get QLinearConv chains).
        nodes_to_exclude: nodes kept in float.
        max_samples: calibration samples used.
        symmetric_activations: activations symmetric (``ActivationSymmetric``); None: asymmetric.
        symmetric_weights: weights symmetric (``WeightSymmetric``); None: symmetric.
        op_types: the op types quantized (``CONV_OPS``: the CNN recipe); None: ORT's default set.

    Raises:
        PackagingError: the quantizer failed.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]  # fmt: skip
    model = onnx.load(str(src))
    names = [i.name for i in model.graph.input if i.name not in _initializers(model)]
    exclude = list(nodes_to_exclude)
    extra: dict[str, Any] = {}
    op_types = list(op_types) if op_types else None
    if weights_only:
        op_types = ["MatMul", "Gemm", "Conv", "Gather"]  # Gather: embedding tables stored int8 (size)
        exclude += activation_matmuls(model)
        extra = {"MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]}
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    if symmetric_activations is not None:
        extra["ActivationSymmetric"] = symmetric_activations
    if symmetric_weights is not None:
        extra["WeightSymmetric"] = symmetric_weights
    del model
    reader = _Reader(feeds, names, max_samples)
    try:
        with quiet("onnxruntime.quantization"):
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                            per_channel=per_channel, reduce_range=False, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=exclude, calibrate_method=calib,
                            extra_options=extra)  # fmt: skip
    except Exception as e:  # the quantizer raises plain Exceptions for graphs it cannot handle
        raise PackagingError(f"static int8 quantization failed: {str(e)[:300]}") from e
    return {
        "format": "QDQ",
        "activations": f"uint8 {'symmetric' if symmetric_activations else 'asymmetric'}, per tensor, calibrated",
        "weights": f"int8 {'asymmetric' if symmetric_weights is False else 'symmetric'}, "
        f"{'per-channel' if per_channel else 'per-tensor'}",
        "calibration_method": method,
        "calibration_samples": min(len(next(iter(feeds.values()))), max_samples),
        "op_types": op_types or "onnxruntime default (QDQRegistry)",
        "nodes_kept_float": [n for n in nodes_to_exclude],
        "extra_options": {k: v for k, v in extra.items()},
    }


# ---- int4 weight-only ------------------------------------------------------------------------------
def quantize_int4(src: Path, dst: Path, *, block_size: int, accuracy_level: int | None) -> dict[str, Any]:
    """4-bit blockwise weights for MatMuls with constant weights (``MatMulNBits``), float activations.

    Raises:
        PackagingError: the graph has no MatMul with a constant 2-D weight (e.g. only Gemm/Conv), or
            the quantizer failed.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    targets = weight_matmuls(model)
    if not targets:
        kinds = sorted({n.op_type for n in model.graph.node if n.op_type in ("Gemm", "Conv", "MatMul")})
        raise PackagingError(
            "int4 quantizes MatMul layers with constant weights (MatMulNBits) and this graph has none "
            f"(its weighted ops: {', '.join(kinds) or 'none'}); use int8 or int8-dynamic for it"
        )
    try:
        with quiet("onnxruntime.quantization"):
            quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                             accuracy_level=accuracy_level)  # fmt: skip
            quantizer.process()
            quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    except Exception as e:  # unsupported shapes or attributes
        raise PackagingError(f"int4 quantization failed: {str(e)[:300]}") from e
    converted = sum(1 for n in onnx.load(str(dst)).graph.node if n.op_type == "MatMulNBits")
    return {
        "tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
        "bits": 4,
        "block_size": block_size,
        "symmetric": True,
        "accuracy_level": accuracy_level,
        "matmuls": len(targets),
        "converted": converted,
        "activations": "float32",
    }


# ---- ORT format ------------------------------------------------------------------------------------
def to_ort_format(src: Path, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Convert ``src`` to an ORT-format ``model.ort`` with onnxruntime's converter (fixed optimizations).

    The NCHWc layout transformer is left out, so the file runs on any CPU (ARM included).

    Raises:
        PackagingError: the converter failed.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    stage = out_dir / "ort-format"
    stage.mkdir(parents=True, exist_ok=True)
    model = stage / "model.onnx"
    model.write_bytes(src.read_bytes())
    try:
        with quiet("onnxruntime.quantization"):
            convert_onnx_models_to_ort(model, output_dir=stage, optimization_styles=[OptimizationStyle.Fixed])
    except Exception as e:  # ValueError, onnxruntime errors
        raise PackagingError(f"conversion to ORT format failed: {str(e)[:300]}") from e
    ort_path = stage / "model.ort"
    if not ort_path.is_file():
        raise PackagingError("onnxruntime's converter wrote no model.ort")
    return ort_path, {
        "tool": "onnxruntime.tools.convert_onnx_models_to_ort",
        "optimization_style": "Fixed",
        "optimization_level": "all (NchwcTransformer disabled: runs on any CPU)",
    }
