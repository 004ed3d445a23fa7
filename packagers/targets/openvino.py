"""Target: OpenVINO IR (``model.xml`` + ``model.bin``) for the OpenVINO runtime.

Conversion: ``openvino.convert_model`` on the source's fp32 ONNX graph (``source.onnx()``), for every
input kind. Measured on the test models (tiny BERT, 2 shared cores under load): converting the torch
module directly took 10 s against 2 s export + 3-10 s ``convert_model`` from ONNX, with identical
outputs; the ONNX route wins on robustness rather than speed: the ports keep the source's names (the
PyTorch frontend names them after ``forward``'s arguments), the named dims stay dynamic (-1) without
restating every shape, transformers folders need no access to the module, and the one export is shared
with the onnxruntime target. ``convert_model`` (rather than ``Core.read_model``) applies the MOC graph
cleanup, which halves the IR of a BERT.

- ``fp32``: the IR with fp32 weights (``compress_to_fp16=False``).
- ``fp16``: the IR with weights stored in fp16 (decompressed on CPUs that compute in fp32).
- ``int8``: NNCF post-training quantization (``nncf.quantize``) calibrated on the validation inputs,
  ``ModelType.TRANSFORMER`` (SmoothQuant, mixed preset) where the graph has attention.
  Layers ``PackageOptions`` keeps in float (``float_layers``, ``exclude``, ``exclude_op_types``) go into
  NNCF's ``IgnoredScope`` by OpenVINO friendly name (NNCF's node names); symmetric modes, SmoothQuant alpha
  and the calibration size into ``nncf.quantize`` (``packagers.targets._openvino_layers``).
- ``int8-weights``: ``nncf.compress_weights`` INT8_ASYM, per-channel, data-free.
- ``int4``: ``nncf.compress_weights`` INT4_SYM/ASYM with a group size and a ratio; NNCF keeps the
  embeddings, the last layer and layers it cannot group in int8; the report records how many weights
  ended in which precision, and a model with nothing in 4 bits is refused.

Validation runs the IR in OpenVINO's CPU plugin at the precision this host resolves the bundle's hint to
(``f32`` for fp32 and int8 bundles; for fp16 bundles ``f16`` on a host with half-precision units, ``f32``
elsewhere), and never below the hint: a bf16 host, which would resolve f16 to bf16, validates at f32
(``sdk.precision``). The manifest records it as ``runtime.validated_inference_precision``, the least
precision a device may run the bundle at.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packagers._quiet import quiet
from packagers.options import Capabilities, PackageOptions, Precision, Target
from packagers.registry import BuiltModel, CandidateFailed, Runner, version_floor
from sdk.errors import PackagingError
from sdk.precision import PrecisionChoice, choose_hint
from sdk.runtime_versions import Requirement, openvino_min_version

if TYPE_CHECKING:
    from packagers.sources.base import Source

__all__ = [
    "CAPABILITIES",
    "OpenVinoPackager",
    "compile_for_validation",
    "model_requirement",
    "runtime_min_version",
    "validation_precision",
]

CAPABILITIES = Capabilities(
    precisions=(Precision.FP32, Precision.FP16, Precision.INT8, Precision.INT8_WEIGHTS, Precision.INT4),
    input_kinds=("torch", "transformers", "onnx"),
    dynamic_shapes=True,
)
MODEL_MEMBER = "model.xml"
WEIGHTS_MEMBER = "model.bin"
ARCH = ["x86_64", "aarch64"]  # the CPU plugin's architectures (ARM through ACL / KleidiAI)
MAX_CALIBRATION = 300  # samples for nncf.quantize; NNCF's own default subset size
MAX_RECORDED = 256  # float layer names the manifest records (the report lists them all)
INT4_GROUP_SIZE = 128  # NNCF's default; smaller channels get a smaller power of two (ADJUST)
INT4_RATIO = 1.0  # share of the eligible weights in 4 bits; the rest stay int8
# Validation settings: batch 1 latency; the precision hint is the bundle's validated precision.
VALIDATION_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
# ov.Type names of compressed weight constants -> the precision they hold
_WEIGHT_TYPES = {"i4": "int4", "u4": "int4", "i8": "int8", "u8": "int8", "f16": "fp16", "f32": "fp32"}
# layer type -> inputs that may hold its weights; ops a weight passes through on its way there
_WEIGHT_INPUTS = {"MatMul": (0, 1), "Convolution": (1,), "GroupConvolution": (1,), "Gather": (0,)}
_THROUGH = {"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze", "FakeQuantize", "FakeConvert"}


def runtime_min_version() -> str:
    """The installed OpenVINO as ``major.minor.0`` (what the build host validated the IR with)."""
    import openvino as ov

    return version_floor(ov.__version__)


def model_requirement(path: Path, host: str | None = None) -> Requirement:
    """The first OpenVINO release that reads the IR ``.xml`` at ``path``: its IR version and its layers' operation sets.

    Raises:
        PackagingError: the file is not an OpenVINO IR.
        ValueError: the IR uses something the tables do not know and no ``host`` version was given.
    """
    import xml.etree.ElementTree as ET  # the IR is our own output, written by ov.save_model

    try:
        net = ET.parse(path).getroot()
        ir_version = int(net.get("version", "0"))
    except (ET.ParseError, ValueError) as e:
        raise PackagingError(f"{path.name} is not an OpenVINO IR: {e}") from e
    opsets = {layer.get("version", "") for layer in net.iter("layer")}
    types = {data.get("element_type", "") for data in net.iter("data")}
    return openvino_min_version(ir_version, opsets - {""}, types - {""}, host=host)


def validation_precision(requested: str) -> PrecisionChoice:
    """The precision this host's CPU plugin validates a bundle asking ``requested`` at (``choice.expected``).

    What the host resolves ``requested`` to, read from its ``OPTIMIZATION_CAPABILITIES``, or f32 where that
    is below ``requested`` (f16 on a bf16 CPU): a bundle is never validated below the precision it asks for.

    Raises:
        PackagingError: this host's CPU computes below ``requested`` even with f32.
    """
    import openvino as ov

    capabilities = frozenset(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    choice = choose_hint(requested, requested, [capabilities])
    if choice.refused is not None:
        raise PackagingError(f"this host cannot validate an OpenVINO bundle at {requested}: {choice.refused}")
    return choice


def compile_for_validation(xml: Path, precision: str = "f32") -> Any:
    """An OpenVINO CPU compiled model of ``xml`` computing in ``precision`` (read back from the plugin).

    Raises:
        PackagingError: OpenVINO cannot read or compile the IR, or this CPU resolves ``precision`` to
            another one (the manifest would claim a precision the bundle was not validated at).
    """
    import openvino as ov

    try:
        config = {**VALIDATION_CONFIG, "INFERENCE_PRECISION_HINT": precision}
        compiled = ov.Core().compile_model(str(xml), "CPU", config)
        resolved = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    except Exception as e:  # OpenVINO raises RuntimeError with the plugin's message
        raise PackagingError(f"OpenVINO cannot compile the built model {xml.name}: {str(e)[:300]}") from e
    if resolved != precision:
        raise PackagingError(f"OpenVINO's CPU plugin resolved INFERENCE_PRECISION_HINT={precision} to {resolved} "
                             "on this host; the bundle would claim a precision it was not validated at")  # fmt: skip
    return compiled


def _has_attention(model: Any) -> bool:
    """Whether the graph multiplies two activations (Q @ K^T): transformers get NNCF's transformer recipe."""
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        producers = [op.input_value(i).get_node() for i in range(2)]
        if all(_is_activation(p) for p in producers):
            return True
    return False


def _is_activation(node: Any) -> bool:
    """Not a constant weight, looking through the Convert / Reshape / Transpose that wrap constants."""
    seen = 0
    while node.get_type_name() in ("Convert", "Reshape", "Transpose", "Unsqueeze") and seen < 4:
        node, seen = node.input_value(0).get_node(), seen + 1
    return node.get_type_name() != "Constant"


def weight_precisions(model: Any) -> dict[str, int]:
    """How many weight tensors of MatMul, convolution and embedding layers the IR stores in each precision.

    A weight is found by walking up from the layer's weight input through the decompression and
    quantization ops (Convert, Subtract, Multiply, Reshape, FakeQuantize) to the Constant that holds it.
    """
    found: dict[str, str] = {}
    for op in model.get_ordered_ops():
        for index in _WEIGHT_INPUTS.get(op.get_type_name(), ()):
            node = op.input_value(index).get_node()
            for _ in range(8):  # a few ops at most lie between a weight and its layer
                if node.get_type_name() not in _THROUGH:
                    break
                node = node.input_value(0).get_node()
            if node.get_type_name() != "Constant" or int(np.prod(list(node.get_output_shape(0)) or [1])) < 16:
                continue
            kind = _WEIGHT_TYPES.get(node.get_element_type().get_type_name())
            if kind is not None:
                found[node.get_friendly_name()] = kind
    return dict(sorted(Counter(found.values()).items()))


class OpenVinoPackager:
    """Builds an OpenVINO IR (``model.xml`` + ``model.bin``) for OpenVINO's CPU plugin."""

    target = Target.OPENVINO
    capabilities = CAPABILITIES

    def build(
        self,
        source: Source,
        precision: Precision,
        workdir: Path,
        options: PackageOptions,
        progress: Callable[[str], None],
    ) -> list[BuiltModel | CandidateFailed]:
        """Convert the source to IR at ``precision`` under ``workdir``; a failed quantization is a ``CandidateFailed``.

        Raises:
            PackagingError: the precision is not supported, the conversion or NNCF failed, the IR lost a
                named input/output or a dynamic dim, or int4 found nothing to compress.
        """
        if precision not in CAPABILITIES.precisions:
            valid = ", ".join(p.value for p in CAPABILITIES.precisions)
            raise PackagingError(f"openvino does not support precision {precision.value}; valid: {valid}")
        import openvino as ov

        workdir.mkdir(parents=True, exist_ok=True)
        exported = source.onnx()
        progress(f"openvino {precision.value}: converting the ONNX graph to OpenVINO IR")
        start = time.perf_counter()
        try:
            model = ov.convert_model(str(exported.path))
        except Exception as e:  # the ONNX frontend raises RuntimeError/OpConversionFailure for unsupported ops
            raise PackagingError(f"openvino cannot convert the ONNX graph: {str(e)[:300]}") from e
        _fit_ports(model, source)
        recipe: dict[str, Any] = {
            "export": {"exporter": exported.exporter, "opset": exported.opset, "seconds": round(exported.seconds, 3)},
            "convert": {"tool": f"openvino.convert_model {ov.__version__} (ONNX frontend)",
                        "seconds": round(time.perf_counter() - start, 3)},
        }  # fmt: skip
        hint = "f16" if precision is Precision.FP16 else "f32"
        validated = validation_precision(hint)  # the host's resolved precision, never below the hint
        recipe["validation_precision"] = {"hint": hint, "validated": validated.expected, "forced": validated.forced}
        runtime: dict[str, Any] = {
            "package": "openvino",
            "arch": list(ARCH),
            "devices": ["CPU"],
            "performance_hint": "LATENCY",
            # fp32 and int8 bundles must compute in f32 everywhere to match their validation;
            # fp16 bundles ask for half precision where the device has it (GPU, NPU, ARM CPUs), and get
            # it only where this host validated at f16 (sdk.precision).
            "inference_precision_hint": hint,
            "validated_inference_precision": validated.expected,
            "weights": WEIGHTS_MEMBER,
            "opset": int(exported.opset),
            "exporter": exported.exporter,
        }
        try:  # one recipe per precision here: its failure is reported as that candidate's
            if precision is Precision.INT8:
                model, quant = self._quantize(model, source, options, progress)
            elif precision is Precision.INT8_WEIGHTS:
                model, quant = self._compress_int8(model, progress)
            elif precision is Precision.INT4:
                model, quant = self._compress_int4(model, options, progress)
            else:
                quant = None
        except PackagingError as e:
            return [CandidateFailed(precision.value, "build", str(e))]
        if quant is not None:
            recipe["quantization"] = quant
            runtime["quantization"] = {k: quant[k] for k in ("method", "mode", "weights") if k in quant}
            if quant.get("kept_float"):
                runtime["quantization"]["float_layers"] = list(quant["kept_float"][:MAX_RECORDED])
        out = workdir / MODEL_MEMBER
        # compress_to_fp16 only touches fp32 constants; quantized weights keep their int types.
        ov.save_model(model, str(out), compress_to_fp16=precision is Precision.FP16)
        host = metadata.version("openvino")
        need = model_requirement(out, host=host)
        runtime["min_version"] = need.version
        runtime["built_with"] = {"openvino": host}
        recipe["runtime_requirement"] = {"min_version": need.version, "reasons": list(need.reasons)}
        # Counted on the saved IR: fp16 compression happens while saving.
        saved = weight_precisions(ov.Core().read_model(str(out)))
        recipe["ir"] = {"weights": saved, "compress_to_fp16": precision is Precision.FP16}
        weights = out.with_suffix(".bin")
        return [
            BuiltModel(out, MODEL_MEMBER, runtime, recipe, precision.value, extra_members={WEIGHTS_MEMBER: weights})
        ]

    def _quantize(self, model: Any, source: Source, options: PackageOptions,
                  progress: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:  # fmt: skip
        import nncf

        from packagers.targets._openvino_layers import nncf_settings
        from packagers.targets._openvino_layers import quantized_layers as quantized_in

        transformer = source.kind == "transformers" or _has_attention(model)
        n = min(source.samples, options.calibration_size or MAX_CALIBRATION)
        # One sample per item: calibration statistics are per sample, and the IR's batch is dynamic.
        items = [{k: np.ascontiguousarray(v[i : i + 1]) for k, v in source.validation_inputs.items()} for i in range(n)]
        kwargs: dict[str, Any] = {"subset_size": n}
        if transformer:
            kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        settings = nncf_settings(model, options, transformer)
        if settings.unmatched:
            progress("openvino int8: no layer matched " + ", ".join(settings.unmatched))
        kwargs.update(settings.kwargs)
        progress(f"openvino int8: NNCF post-training quantization on {n} samples"
                 + (" (transformer recipe)" if transformer else ""))  # fmt: skip
        start = time.perf_counter()
        try:
            with quiet("nncf"):
                quantized = nncf.quantize(model, nncf.Dataset(items), **kwargs)
        except Exception as e:  # NNCF raises nncf.InternalError / ValidationError / RuntimeError
            raise PackagingError(f"NNCF int8 quantization failed: {type(e).__name__}: {str(e)[:300]}") from e
        weights = weight_precisions(quantized)
        if not weights.get("int8"):
            raise PackagingError("NNCF found no layer to quantize to int8 in this model; use fp32 or fp16")
        return quantized, {
            "method": "static",
            "tool": f"nncf.quantize (nncf {nncf.__version__})",
            "mode": "int8 weights and activations (FakeQuantize), calibrated",
            "model_type": "transformer" if transformer else "default",
            "preset": "mixed" if transformer else "performance",
            **settings.report,
            "quantized_layers": quantized_in(quantized),
            "calibration_samples": n,
            "calibration_data": source.data_origin,
            "weights": weights,
            "seconds": round(time.perf_counter() - start, 3),
        }

    def _compress_int8(self, model: Any, progress: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
        import nncf

        progress("openvino int8-weights: NNCF weight compression (INT8_ASYM, per-channel)")
        start = time.perf_counter()
        try:
            with quiet("nncf"):
                compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        except Exception as e:  # NNCF's own error types
            raise PackagingError(f"NNCF int8 weight compression failed: {type(e).__name__}: {str(e)[:300]}") from e
        weights = weight_precisions(compressed)
        if not weights.get("int8"):
            raise PackagingError("NNCF found no weights to compress to int8 in this model (it compresses MatMul, "
                                 "embedding and convolution weights); use fp32 or fp16")  # fmt: skip
        return compressed, {
            "method": "weight-only",
            "tool": f"nncf.compress_weights (nncf {nncf.__version__})",
            "mode": "INT8_ASYM",
            "granularity": "per output channel",
            "activations": "float",
            "weights": weights,
            "seconds": round(time.perf_counter() - start, 3),
        }

    def _compress_int4(self, model: Any, options: PackageOptions,
                       progress: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:  # fmt: skip
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

        extra = options.extra
        symmetric = bool(extra.get("openvino_int4_symmetric", True))
        mode = nncf.CompressWeightsMode.INT4_SYM if symmetric else nncf.CompressWeightsMode.INT4_ASYM
        group_size = int(extra.get("openvino_int4_group_size", INT4_GROUP_SIZE))
        ratio = float(extra.get("openvino_int4_ratio", INT4_RATIO))
        if not 0.0 < ratio <= 1.0 or group_size < -1 or group_size == 0:
            raise PackagingError(f"int4 needs 0 < ratio <= 1 and group_size > 0 or -1, got {ratio} and {group_size}")
        progress(f"openvino int4: NNCF weight compression ({mode.value}, group size {group_size}, ratio {ratio})")
        start = time.perf_counter()
        try:
            with quiet("nncf"):
                compressed = nncf.compress_weights(
                    model, mode=mode, group_size=group_size, ratio=ratio,
                    advanced_parameters=AdvancedCompressionParameters(
                        group_size_fallback_mode=GroupSizeFallbackMode.ADJUST
                    ),
                )  # fmt: skip
        except Exception as e:  # NNCF's own error types
            raise PackagingError(f"NNCF int4 weight compression failed: {type(e).__name__}: {str(e)[:300]}") from e
        weights = weight_precisions(compressed)
        if not weights.get("int4"):
            raise PackagingError(
                "NNCF compressed no weight of this model to 4 bits (int4 covers MatMul layers other than the "
                "embeddings and the last one, with channels divisible by a group size >= 16); use int8-weights or int8"
            )
        return compressed, {
            "method": "weight-only",
            "tool": f"nncf.compress_weights (nncf {nncf.__version__})",
            "mode": mode.value.upper(),
            "group_size": group_size,
            "group_size_fallback": "adjust (largest power of two >= 16 that divides the channel, else int8)",
            "ratio": ratio,
            "backup": "INT8_ASYM for the embeddings, the last layer and layers no group size fits",
            "activations": "float",
            "weights": weights,
            "seconds": round(time.perf_counter() - start, 3),
        }

    def quantized_layers(self, built: BuiltModel) -> list[str]:
        """The layers ``built`` quantized (NNCF node names, graph order): the names ``float_layers`` takes."""
        return list(built.recipe.get("quantization", {}).get("quantized_layers", []))

    def runner(self, built: BuiltModel) -> Runner:
        """A run function over an OpenVINO CPU compiled model of ``built`` at its validated precision.

        Raises:
            PackagingError: OpenVINO cannot compile the model, or not at that precision.
        """
        compiled = compile_for_validation(built.path, str(built.runtime.get("validated_inference_precision", "f32")))
        request = compiled.create_infer_request()
        outputs = [(port, port.get_any_name()) for port in compiled.outputs]
        inputs = {port.get_any_name() for port in compiled.inputs}

        def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            result = request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items() if k in inputs})
            return {name: np.array(result[port]) for port, name in outputs}

        return run


def _fit_ports(model: Any, source: Source) -> None:
    """Check the IR's ports carry the source's names and dtypes and its named dims stayed dynamic.

    The port's tensor names are reduced to the source's name (the device maps ports by it).

    Raises:
        PackagingError: a source input/output has no port of that name or another dtype, or a named dim
            became static.
    """
    from openvino import Type

    for what, ports, specs in (("input", model.inputs, source.inputs), ("output", model.outputs, source.outputs)):
        by_name = {name: port for port in ports for name in port.get_names()}
        missing = [s.name for s in specs if s.name not in by_name]
        if missing or len(ports) != len(specs):
            have = sorted(p.get_any_name() for p in ports)
            raise PackagingError(f"the OpenVINO IR has {what}s {have}, expected {[s.name for s in specs]}")
        for spec in specs:
            port = by_name[spec.name]
            port.get_tensor().set_names({spec.name})  # drop aliases: the device maps ports by this name
            shape = port.get_partial_shape()
            if shape.rank.is_dynamic or shape.rank.get_length() != len(spec.shape):
                raise PackagingError(f"{what} {spec.name!r}: the IR has shape {shape}, expected {list(spec.shape)}")
            for i, dim in enumerate(spec.shape):
                if isinstance(dim, str) and shape[i].is_static:
                    raise PackagingError(f"{what} {spec.name!r}: dim {i} ({dim}) became static {shape[i]} in the IR")
            want = Type(np.dtype(spec.dtype))
            if port.get_element_type() != want:  # the ONNX frontend keeps ONNX types; a change is a bug to surface
                raise PackagingError(f"{what} {spec.name!r}: the IR takes {port.get_element_type()}, not {spec.dtype}")
