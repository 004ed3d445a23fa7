"""Target: TFLite / LiteRT (``model.tflite``).

Sources and converters:
- torch modules and transformers folders: ``litert_torch.convert`` on the source's module, traced at
  a fixed batch (``PackageOptions.extra["batch_size"]``, default 1) and the validation data's other
  dims. litert-torch names the inputs ``args_0``... and takes int32 where the module took int64;
  the manifest keeps the user's names and dtypes and ``runtime["tensor_map"]`` says which model
  tensor each is. Quantized variants are made from that fp32 model with ai-edge-quantizer recipes
  (fp16: float16 weights; int8-dynamic: int8 weights, dynamic-range activations; int8: static
  int8 weights and activations calibrated on ``source.validation_inputs``).
- keras models / SavedModels: ``tf.lite.TFLiteConverter.from_saved_model`` (fp16 with float16
  weights, int8-dynamic with dynamic range quantization, int8 with a representative dataset and
  ``TFLITE_BUILTINS_INT8``). Unknown dims stay dynamic where the converted model keeps them
  (``shape_signature`` -1): the interpreter resizes to the input's shape.

``extra["int8_io"] = True`` (int8 only) gives int8 input and output tensors, as microcontrollers and
the Edge TPU need; their scale and zero point go to ``runtime["quantization"]`` so the device
quantizes the caller's floats and dequantizes the outputs. TFLite models are static: every dim the
converted model fixes is written as a number into the manifest (a batch-1 model says batch 1).

Text models from torch/transformers get one signature per sequence bucket (``_tflite_buckets``): the
sequence dim stays named in the manifest, ``runtime["buckets"]`` lists the lengths, the tokenizer's
``max_length`` becomes the largest bucket, and every bucket is checked against the reference. Int8
precisions keep ``options.float_layers`` in float (``_tflite_layers``; ``quantized_layers`` names them).
Heavy libraries are imported inside functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_runtime.backends.tflite_buckets import SequenceBuckets
from packagers._quiet import quiet
from packagers.options import Capabilities, PackageOptions, Precision, Target
from packagers.registry import BuiltModel, CandidateFailed, Runner
from packagers.targets._tflite_buckets import check_buckets, fit_length, plan_buckets, sequence_length
from packagers.targets._tflite_flatbuffer import read_facts
from packagers.targets._tflite_layers import keep_float, list_layers, quantized_layer_names, select
from packagers.targets._tflite_run import INT_RANGES, interpreter, run_rows, signature_runner
from sdk.compat import version_at_least
from sdk.errors import PackagingError
from sdk.manifest import TensorSpec
from sdk.runtime_versions import Requirement, litert_min_version

if TYPE_CHECKING:
    from packagers.sources.base import Source

__all__ = ["CAPABILITIES", "MODEL_MEMBER", "TfLitePackager", "inspect_model", "model_requirement"]

CAPABILITIES = Capabilities(
    precisions=(Precision.FP32, Precision.FP16, Precision.INT8_DYNAMIC, Precision.INT8),
    input_kinds=("torch", "transformers", "keras"),
    dynamic_shapes=False,
)
MODEL_MEMBER = "model.tflite"
SIGNATURE = "serving_default"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def model_requirement(model: Path | bytes, host: str | None = None) -> Requirement:
    """The first ai-edge-litert release that runs this .tflite: from the ``min_runtime_version`` its converter
    wrote (the TFLite runtime its op versions need); custom ops need the build host's release.

    Raises:
        PackagingError: not a readable .tflite.
        ValueError: the model needs something the tables do not know and no ``host`` was given.
    """
    try:
        facts = read_facts(model.read_bytes() if isinstance(model, Path) else model)
    except ValueError as e:
        raise PackagingError(f"the built TFLite model cannot be read: {e}") from e
    need = litert_min_version(facts.min_runtime_version, host=host)
    custom = sorted({c for _, _, c in facts.operators if c})
    if custom:  # a custom op (Flex, ...) is not versioned by the table: only the host is known to run it
        extra = litert_min_version(None, host=host)
        reasons = (*need.reasons, f"custom ops {', '.join(custom)} -> the build host's {extra.version}")
        need = Requirement(need.version if version_at_least(need.version, extra.version) else extra.version, reasons)
    return need


def inspect_model(model: Path | bytes, signature: str = SIGNATURE) -> dict[str, Any]:
    """Signature input/output details of a .tflite model: name -> {dtype, shape, shape_signature, quantization}.

    Raises:
        PackagingError: the model cannot be loaded or has no such signature.
    """
    try:
        loaded = interpreter(model)
        runner = loaded.get_signature_runner(signature)
    except Exception as e:  # ValueError for a bad flatbuffer or a missing signature
        raise PackagingError(f"the built TFLite model cannot be loaded: {str(e)[:300]}") from e

    def details(raw: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for name, d in raw.items():
            scale, zero = d["quantization"]
            out[name] = {
                "dtype": np.dtype(d["dtype"]).name,
                "shape": [int(x) for x in d["shape"]],
                "shape_signature": [int(x) for x in d.get("shape_signature", d["shape"])],
                "quantization": {"scale": float(scale), "zero_point": int(zero)} if scale else None,
            }
        return out

    return {"inputs": details(runner.get_input_details()), "outputs": details(runner.get_output_details())}


class TfLitePackager:
    """Builds ``model.tflite`` for LiteRT (ai-edge-litert, tflite-runtime or tensorflow.lite)."""

    target = Target.TFLITE
    capabilities = CAPABILITIES

    def __init__(self) -> None:
        # Calibration statistics of the float model by (model file, samples): one package() call quantizes
        # the same float model many times (int8 candidates, every step of the mixed-precision search), and
        # the min/max of its tensors do not depend on which layers are later kept float.
        self._calibrations: dict[tuple[Any, ...], Any] = {}

    def build(
        self,
        source: Source,
        precision: Precision,
        workdir: Path,
        options: PackageOptions,
        progress: Callable[[str], None],
    ) -> list[BuiltModel | CandidateFailed]:
        """Convert (and quantize) ``source`` to one ``model.tflite`` under ``workdir``.

        Returns:
            The built model, or a ``CandidateFailed`` when a sequence bucket other than the one the caller
            validates misses the tolerances.

        Raises:
            PackagingError: an unsupported precision, input kind or option, or a failed conversion.
        """
        why = CAPABILITIES.refuse(self.target, precision, source.kind)
        if why:
            raise PackagingError(why)
        int8_io = options.extra.get("int8_io", False)
        if not isinstance(int8_io, bool):
            raise PackagingError(f"option extra['int8_io'] must be True or False, got {int8_io!r}")
        if int8_io and precision is not Precision.INT8:
            raise PackagingError(f"extra['int8_io'] needs precision int8 (int8 tensors), not {precision.value}")
        batch = options.extra.get("batch_size", 1)
        if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= source.samples:
            raise PackagingError(f"option extra['batch_size'] must be an int from 1 to {source.samples}, got {batch!r}")
        if source.native is None:
            raise PackagingError(f"{source.description} carries no model for the TFLite converters")
        quantized = precision in (Precision.INT8, Precision.INT8_DYNAMIC)
        if options.float_layers and quantized and source.kind == "keras":
            raise PackagingError("float_layers (mixed precision) needs a torch or transformers source for TFLite; "
                                 "the TensorFlow converter quantizes every op it can")  # fmt: skip
        buckets = plan_buckets(source, options.extra)
        if buckets is not None and batch != 1:
            raise PackagingError(f"sequence buckets run one text at a time: use batch_size 1, not {batch}, "
                                 "or extra['seq_buckets'] = False")  # fmt: skip
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / MODEL_MEMBER
        start = time.perf_counter()
        if source.kind == "keras":
            converter, recipe = self._from_saved_model(source, precision, int8_io, out, progress)
        else:
            floats = options.float_layers if quantized else ()
            converter, recipe = self._from_torch(source, precision, int8_io, batch, workdir, out, progress,
                                                 buckets, floats, options.calibration_size)  # fmt: skip
        recipe["seconds"] = round(time.perf_counter() - start, 3)
        signature = buckets.signatures[-1] if buckets is not None else SIGNATURE
        details = inspect_model(out, signature)
        need = model_requirement(out, host=_version("ai-edge-litert"))
        recipe["runtime_requirement"] = {"min_version": need.version, "reasons": list(need.reasons)}
        inputs, outputs, tensor_map = _specs(source, details, named={buckets.dim} if buckets is not None else set())
        runtime: dict[str, Any] = {
            "package": "ai-edge-litert",
            "min_version": need.version,
            "built_with": {"ai-edge-litert": _version("ai-edge-litert")},
            "fallbacks": ["tflite-runtime", "tensorflow"],
            "arch": ["any"],
            "delegates": ["xnnpack"],
            "signature": signature,
            "converter": converter,
            "tensor_map": tensor_map,
            "int8_io": int8_io,
        }
        quant = {side: _io_quantization(details[side], tensor_map[side], specs) for side, specs in
                 (("inputs", inputs), ("outputs", outputs))}  # fmt: skip
        if quant["inputs"] or quant["outputs"]:
            runtime["quantization"] = quant
        if buckets is None:
            return [BuiltModel(out, MODEL_MEMBER, runtime, recipe, precision.value, inputs=inputs, outputs=outputs)]
        runtime["buckets"] = buckets.to_runtime()
        built = BuiltModel(out, MODEL_MEMBER, runtime, recipe, precision.value, inputs=inputs, outputs=outputs,
                           preprocessing=_capped_preprocessing(source, buckets.max_length),
                           input_policy=_capped_policy(source, buckets))  # fmt: skip
        runners = [signature_runner(out, runtime, s) for s in buckets.signatures]
        progress(f"tflite {precision.value}: checking buckets {list(buckets.lengths)} against the reference")
        checked = check_buckets(source, buckets, lambda i, x: run_rows(runners[i], x),
                                options.tolerances_for(precision))  # fmt: skip
        recipe["buckets"] = checked
        # The caller validates at the calibration length, which runs in one bucket: when that bucket fails, the
        # caller sees the failure itself (and the mixed-precision search needs the model); when only another
        # bucket fails, the caller would pass a model that drifts there, so it is not offered.
        validated = str(buckets.lengths[buckets.choose(sequence_length(source))])
        if not checked["passed"] and checked["lengths"][validated]["passed"]:
            return [CandidateFailed(built.candidate, "validate", "; ".join(checked["failures"])[:500])]
        return [built]

    def quantized_layers(self, built: BuiltModel) -> list[str]:
        """The layers ``built`` quantized, in graph order: the names ``PackageOptions.float_layers`` takes."""
        return quantized_layer_names(built.path)

    # ---- torch / transformers via litert-torch ----------------------------------------------------------
    def _float_torch(self, source: Source, batch: int, workdir: Path, progress: Callable[[str], None],
                     buckets: SequenceBuckets | None) -> Path:  # fmt: skip
        """The fp32 .tflite of the source, converted once per package() call and shared by the precisions.

        With buckets, one signature per bucket, traced at its length (litert-torch shares the weights).
        """
        import torch

        folder = source.workdir or workdir
        tag = "-s" + "-".join(str(n) for n in buckets.lengths) if buckets is not None else ""
        path = folder / f"tflite-fp32-b{batch}{tag}.tflite"
        if path.is_file():
            return path
        import litert_torch

        first = {s.name: np.ascontiguousarray(source.validation_inputs[s.name][:batch]) for s in source.inputs}
        traced = [(SIGNATURE, first)]
        if buckets is not None:
            traced = [(sig, fit_length(first, n)) for sig, n in zip(buckets.signatures, buckets.lengths, strict=True)]
        what = f"buckets {list(buckets.lengths)}" if buckets is not None else f"batch {batch}"
        progress(f"tflite: converting with litert-torch {_version('litert-torch')} ({what})")
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with quiet("litert"):
                converter = litert_torch.Converter()
                for name, arrays in traced:
                    converter.signature(name, source.native, tuple(torch.from_numpy(arrays[s.name])
                                                                   for s in source.inputs))  # fmt: skip
                model = converter.convert()
                model.export(str(path))
        except Exception as e:  # unsupported op, export failure: report, do not fall back silently
            raise PackagingError(f"litert-torch cannot convert {source.description}: {type(e).__name__}: "
                                 f"{str(e)[:400]}") from e  # fmt: skip
        return path

    def _from_torch(self, source: Source, precision: Precision, int8_io: bool, batch: int, workdir: Path, out: Path,
                    progress: Callable[[str], None], buckets: SequenceBuckets | None, float_layers: tuple[str, ...],
                    calibration_size: int | None) -> tuple[str, dict[str, Any]]:  # fmt: skip
        fp32 = self._float_torch(source, batch, workdir, progress, buckets)
        converter = f"litert-torch {_version('litert-torch')}"
        recipe: dict[str, Any] = {"converter": converter, "batch": batch, "int64_inputs": "int32 in the model"}
        if buckets is not None:
            recipe["sequence_buckets"] = list(buckets.lengths)
        if precision is Precision.FP32:
            out.write_bytes(fp32.read_bytes())
            return converter, {**recipe, "quantization": None}
        from ai_edge_quantizer import qtyping, quantizer
        from ai_edge_quantizer import recipe as aeq_recipe
        from ai_edge_quantizer.algorithm_manager import AlgorithmName

        progress(f"tflite {precision.value}: ai-edge-quantizer")
        q = quantizer.Quantizer(str(fp32))
        calibration = None
        if precision is Precision.FP16:
            q.add_weight_only_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, 16,
                                     algorithm_key=AlgorithmName.FLOAT_CASTING)  # fmt: skip
            method = "float16 weights (ai-edge-quantizer FLOAT_CASTING, weight-only), float compute"
        elif precision is Precision.INT8_DYNAMIC:
            q.load_quantization_recipe(aeq_recipe.dynamic_wi8_afp32())
            method = "int8 per-channel weights, activations quantized at run time (dynamic_wi8_afp32)"
        else:
            q.load_quantization_recipe(aeq_recipe.static_wi8_ai8())
            if not int8_io:  # keep float model inputs/outputs; a QUANTIZE / DEQUANTIZE op sits inside
                for op in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):
                    q._recipe_manager.add_quantization_config(".*", op, algorithm_key=AlgorithmName.NO_QUANTIZE)
            method = "static int8 (static_wi8_ai8: per-channel int8 weights, per-tensor int8 activations, min-max)"
        kept = select(list_layers(fp32), float_layers) if float_layers else []
        keep_float(q, kept)  # after the recipe: later entries win
        if precision is Precision.INT8:
            calibration = self._calibrate(q, source, fp32, batch, buckets, calibration_size)
        try:
            with quiet("litert"):
                result = q.quantize(calibration, enable_progress_report=False)
        except Exception as e:  # unsupported op patterns
            raise PackagingError(f"ai-edge-quantizer failed ({precision.value}): {str(e)[:300]}") from e
        out.write_bytes(bytes(result.quantized_model))
        recipe["quantization"] = {
            "tool": f"ai-edge-quantizer {_version('ai-edge-quantizer')}",
            "method": method,
            "calibration_samples": _calibration_count(source, batch, calibration_size) if calibration else 0,
            "int8_io": int8_io,
        }
        if precision in (Precision.INT8, Precision.INT8_DYNAMIC):
            recipe["float_layers"] = [layer.name for layer in kept]
        return converter, recipe

    def _calibrate(self, q: Any, source: Source, fp32: Path, batch: int, buckets: SequenceBuckets | None,
                   limit: int | None) -> Any:  # fmt: skip
        """Calibration samples for every signature: each bucket sees the samples at its full length.

        The first ``limit`` samples (all when None); the result is reused for the same float model file and
        samples within this packager's package() call.
        """
        n = _calibration_count(source, batch, limit)
        stat = fp32.stat()
        key = (str(fp32), stat.st_mtime_ns, stat.st_size, id(source), n, batch)
        if key in self._calibrations:
            return self._calibrations[key]
        inputs = {k: v[:n] for k, v in source.validation_inputs.items()}
        plan = [(SIGNATURE, inputs)]
        if buckets is not None:
            plan = [(sig, fit_length(inputs, length))
                    for sig, length in zip(buckets.signatures, buckets.lengths, strict=True)]  # fmt: skip
        data: dict[str, list[dict[str, np.ndarray]]] = {}
        for sig, arrays in plan:
            details = inspect_model(fp32, sig)["inputs"]
            conv = _converter_names([s.name for s in source.inputs], list(details))
            data[sig] = [{c: arrays[u][start : start + batch].astype(details[c]["dtype"]) for u, c in conv.items()}
                         for start in range(0, n, batch)]  # fmt: skip
        try:
            with quiet("litert"):
                result = q.calibrate(data, num_threads=1)
        except Exception as e:  # calibration runs the model: data that do not fit it
            raise PackagingError(f"ai-edge-quantizer calibration failed: {str(e)[:300]}") from e
        self._calibrations[key] = result
        return result

    # ---- keras / SavedModel via the TensorFlow converter ------------------------------------------------
    def _from_saved_model(self, source: Source, precision: Precision, int8_io: bool, out: Path,
                          progress: Callable[[str], None]) -> tuple[str, dict[str, Any]]:  # fmt: skip
        with quiet("tensorflow"):  # TF's C++ info lines at import
            import tensorflow as tf

        converter_name = f"tensorflow {tf.__version__} TFLiteConverter"
        progress(f"tflite {precision.value}: {converter_name}")
        converter = tf.lite.TFLiteConverter.from_saved_model(str(source.native), signature_keys=[SIGNATURE])
        quantization: dict[str, Any] | None = None
        if precision is Precision.FP16:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
            quantization = {"method": "float16 weights (post-training float16 quantization)"}
        elif precision is Precision.INT8_DYNAMIC:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            quantization = {"method": "dynamic range quantization: int8 weights, activations quantized at run time"}
        elif precision is Precision.INT8:
            data = source.validation_inputs

            def representative() -> Iterator[dict[str, np.ndarray]]:
                for i in range(source.samples):
                    yield {k: v[i : i + 1] for k, v in data.items()}

            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            if int8_io:
                converter.inference_input_type = tf.int8
                converter.inference_output_type = tf.int8
            quantization = {
                "method": "full integer quantization (TFLITE_BUILTINS_INT8) with a representative dataset",
                "calibration_samples": source.samples,
                "int8_io": int8_io,
            }
        try:
            with quiet("litert"):
                out.write_bytes(converter.convert())
        except Exception as e:  # ConverterError: ops without an (int8) TFLite kernel
            raise PackagingError(f"the TFLite converter failed ({precision.value}): {str(e)[:400]}") from e
        return converter_name, {"converter": converter_name, "quantization": quantization}

    def runner(self, built: BuiltModel) -> Runner:
        """A run function over an ai-edge-litert interpreter of ``built``, feeding by the manifest's tensor map.

        Rows beyond a fixed batch run in chunks (the last one padded); a dynamic batch is resized. A bucketed
        model runs each row in the smallest bucket that holds it, as the device does.

        Raises:
            PackagingError: the interpreter cannot load the model.
        """
        if "buckets" not in built.runtime:
            return signature_runner(built.path, built.runtime, SIGNATURE)
        buckets = SequenceBuckets.from_runtime(built.runtime["buckets"])
        runners = [signature_runner(built.path, built.runtime, s) for s in buckets.signatures]
        seq_outputs = [o.name for o in built.outputs or () if len(o.shape) > buckets.axis
                       and o.shape[buckets.axis] == buckets.dim]  # fmt: skip

        def run_row(row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            length = next(iter(row.values())).shape[buckets.axis]
            index = buckets.choose(length)
            outputs = runners[index](buckets.padded(row, buckets.lengths[index]))
            return buckets.cut(outputs, seq_outputs, length)

        return lambda inputs: run_rows(run_row, inputs)


def _capped_preprocessing(source: Source, max_length: int) -> dict[str, Any]:
    """The source's preprocessing with the tokenizer's ``max_length`` at the largest bucket."""
    out = dict(source.preprocessing)
    if isinstance(out.get("tokenizer"), Mapping):
        declared = out["tokenizer"].get("max_length")
        cap = min(declared, max_length) if isinstance(declared, int) else max_length
        out["tokenizer"] = {**out["tokenizer"], "max_length": cap}
    return out


def _calibration_count(source: Source, batch: int, limit: int | None) -> int:
    """Calibration samples used: ``limit`` (``PackageOptions.calibration_size``) or all, whole batches."""
    n = min(source.samples, limit or source.samples)
    return max(n - n % batch, batch)


def _capped_policy(source: Source, buckets: SequenceBuckets) -> dict[str, Any]:
    """The source's input policy with the sequence dim's range ending at the largest bucket."""
    out = dict(source.input_policy)
    dims = dict(out.get("dims") or {})
    low = dims.get(buckets.dim, [1, buckets.max_length])[0]
    out["dims"] = {**dims, buckets.dim: [low, buckets.max_length]}
    return out


def _io_quantization(details: Mapping[str, Any], names: Mapping[str, str],
                     specs: tuple[TensorSpec, ...]) -> dict[str, Any]:  # fmt: skip
    """User name -> {scale, zero_point, dtype} of each quantized model input/output the user sees as float."""
    out = {}
    for spec in specs:
        d = details[names[spec.name]]
        if d["dtype"] in INT_RANGES and d["dtype"] != spec.dtype:
            if d["quantization"] is None:
                raise PackagingError(f"{spec.name}: the model takes {d['dtype']} without a quantization scale")
            out[spec.name] = {**d["quantization"], "dtype": d["dtype"]}
    return out


def _converter_names(user: list[str], model: list[str]) -> dict[str, str]:
    """User input/output name -> the model's signature name: same name, else position (``args_0``, ``output_0``)."""
    if set(user) == set(model):
        return {n: n for n in user}
    if len(user) != len(model):
        raise PackagingError(f"the converted model has tensors {model}, the source declares {user}")

    def index(name: str) -> tuple[int, str]:
        digits = name.rsplit("_", 1)[-1]
        return (int(digits) if digits.isdigit() else 1 << 30, name)

    return dict(zip(user, sorted(model, key=index), strict=True))


def _fixed_spec(spec: TensorSpec, detail: Mapping[str, Any], named: set[str]) -> TensorSpec:
    """``spec`` with every dim the converted model fixes written as its number, but those in ``named``."""
    signature = detail["shape_signature"]
    if len(signature) != len(spec.shape):
        raise PackagingError(
            f"{spec.name}: the converted model has rank {len(signature)}, the source {len(spec.shape)}"
        )
    dims: list[int | str] = []
    for declared, sig in zip(spec.shape, signature, strict=True):
        if isinstance(declared, str) and declared in named:  # one signature per value (sequence buckets)
            dims.append(declared)
            continue
        if isinstance(declared, int) and sig > 0 and declared != sig:
            raise PackagingError(f"{spec.name}: the converted model has shape {signature}, the source {spec.shape}")
        dims.append(int(sig) if sig > 0 else declared)  # -1: the model resizes, the name stays
    return TensorSpec(spec.name, spec.dtype, tuple(dims))


def _specs(
    source: Source, details: Mapping[str, Any], named: set[str]
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], dict[str, dict[str, str]]]:
    tensor_map: dict[str, dict[str, str]] = {}
    specs: dict[str, tuple[TensorSpec, ...]] = {}
    for side, declared in (("inputs", source.inputs), ("outputs", source.outputs)):
        names = _converter_names([s.name for s in declared], list(details[side]))
        tensor_map[side] = names
        specs[side] = tuple(_fixed_spec(s, details[side][names[s.name]], named) for s in declared)
    for spec in source.inputs:
        model_dtype = details["inputs"][tensor_map["inputs"][spec.name]]["dtype"]
        if (
            model_dtype != spec.dtype
            and not (spec.dtype == "int64" and model_dtype == "int32")
            and (model_dtype not in INT_RANGES)
        ):
            raise PackagingError(f"input {spec.name!r}: the model takes {model_dtype}, the source {spec.dtype}")
    return specs["inputs"], specs["outputs"], tensor_map
