"""Target: ONNX Runtime (CPU execution provider).

- every precision starts from the exported (or given) ONNX graph after ``_onnx_rewrite``'s exact rewrites
  (constant affines and batch norms folded into convolutions, decomposed hard-swish fused; recorded as
  ``export.cpu_rewrites``; a graph they do not match is used as is).
- ``fp32``: that graph; the device applies ORT_ENABLE_ALL at load.
- ``fp16``: ``convert_float_to_float16`` with ``keep_io_types`` (callers still pass float32); op types
  without a float16 CPU kernel stay float32 (recorded).
- ``int8-dynamic``: ``quant_pre_process`` then ``quantize_dynamic`` with QInt8 weights. Per-channel
  weights help some models and hurt others (on a tiny BERT classifier per-tensor was better), so both
  variants are built and validation keeps the better one; the choice is recorded. Transformer graphs
  get a third candidate with the activation smoothing of the int8 recipe (below) before quantization.
  Where ``_ort_fusion`` recognises the attention blocks, each candidate is built on the fused graph
  (``QAttention``) and optimised offline, loaded at ``ORT_ENABLE_BASIC`` (recorded in the manifest).
- ``int8``: static QDQ calibrated on the calibration (else validation) samples, calibration method and
  per-channel from ``PackageOptions`` (unset: min-max, plus percentile candidates for graphs that are
  not transformers). Transformer graphs (LayerNormalization + MatMul weights) get the
  accuracy-aware recipe of ``packagers.targets._ort_quant``: SmoothQuant-style smoothing, weight MatMuls
  and embedding tables only, the most sensitive MatMuls kept in float; other graphs ORT's default QDQ op
  set, and graphs with convolutions also a ``per-channel-conv`` candidate (only Conv/ConvTranspose in int8;
  ``conv``: only it). The graph is raised to opset 13 and Constant-node weights become initializers first.
  Override with
  ``PackageOptions.extra["int8_recipe"] = "transformer" | "default" | "conv"`` and
  ``extra["int8_keep_float"] = N`` (MatMuls kept in float, worst first).
- ``int8`` and ``int8-dynamic`` keep in float the nodes ``PackageOptions`` names (``float_layers`` from the
  mixed-precision search, ``exclude`` names or regexes, ``exclude_op_types``) through ``nodes_to_exclude``;
  the names are ONNX node names after pre-processing (``quantized_layers`` lists the ones a build quantized).
- ``int4``: ``MatMulNBits`` 4-bit blockwise weights for MatMuls with constant weights (block size
  ``extra["int4_block_size"]``, default 32; ``extra["int4_accuracy_level"]``); refused for graphs without
  such MatMuls.
- ``extra["ort_format"] = True``: the chosen graph is converted to ``model.ort`` (ORT format, for
  minimal builds) with onnxruntime's converter.

onnx and onnxruntime are imported inside the functions (module name aside, ``import onnxruntime``
below resolves to the real package: imports are absolute).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packagers._ort_session import cpu_session
from packagers._quiet import quiet
from packagers.options import CALIBRATION_METHODS, Capabilities, PackageOptions, Precision, Target
from packagers.registry import BuiltModel, CandidateFailed, Runner, version_floor
from packagers.targets._onnx_rewrite import simplify_for_cpu
from sdk.errors import PackagingError
from sdk.runtime_versions import Requirement, onnxruntime_min_version

if TYPE_CHECKING:
    from packagers.sources.base import Source

__all__ = ["CAPABILITIES", "OnnxRuntimePackager", "model_requirement", "runtime_min_version", "strip_unused_opsets"]

CAPABILITIES = Capabilities(
    precisions=(Precision.FP32, Precision.FP16, Precision.INT8_DYNAMIC, Precision.INT8, Precision.INT4),
    input_kinds=("torch", "transformers", "onnx"),
    dynamic_shapes=True,
)
MODEL_MEMBER = "model.onnx"
ORT_MEMBER = "model.ort"
DEFAULT_INT4_BLOCK_SIZE = 32
MAX_RECORDED = 256  # float layer names the manifest records (the report lists them all)


def runtime_min_version() -> str:
    """The installed onnxruntime as ``major.minor.0``: what the build host validated with (``.ort`` files need it)."""
    import onnxruntime as ort

    return version_floor(ort.__version__)


def _host_versions() -> dict[str, str]:
    """Provenance for ``runtime.built_with``: the build host's onnxruntime and onnx."""
    import onnx
    import onnxruntime as ort

    return {"onnxruntime": str(ort.__version__), "onnx": str(onnx.__version__)}


def _used_domains(model: Any) -> set[str]:
    """Every domain a node uses: the main graph, its subgraphs (If/Loop/Scan bodies) and local functions."""
    from onnx import AttributeProto

    used: set[str] = set()
    graphs = [model.graph]
    nodes = [n for f in model.functions for n in f.node]
    used.update(f.domain for f in model.functions)
    while graphs or nodes:
        if graphs:
            nodes.extend(graphs.pop().node)
            continue
        node = nodes.pop()
        used.add(node.domain)
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                graphs.append(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                graphs.extend(attr.graphs)
    return {"" if d == "ai.onnx" else d for d in used}


def strip_unused_opsets(src: Path, dst: Path) -> tuple[Path, list[str]]:
    """Drop the opset imports no node uses (``quant_pre_process`` stamps every domain at the host's newest).

    An import the graph does not use still makes an older runtime refuse the model (onnxruntime 1.17
    refuses ``ai.onnx.ml`` opset 5). The default domain is always kept. ``src`` is never modified: when
    something is dropped the graph is written to ``dst``.

    Returns:
        The model to use (``src`` when nothing was dropped, else ``dst``) and the dropped ``domain:version``.
    """
    import onnx

    model = onnx.load(str(src))
    used = _used_domains(model)
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    dropped = [f"{o.domain}:{o.version}" for o in model.opset_import if o not in keep]
    if not dropped:
        return src, []
    del model.opset_import[:]
    model.opset_import.extend(keep)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=False)
    return dst, dropped


def model_requirement(path: Path, host: str | None = None) -> Requirement:
    """The first onnxruntime release that loads the ``.onnx`` at ``path`` (its opsets, IR version, contrib ops).

    Raises:
        ValueError: the model uses something the tables do not know and no ``host`` version was given.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opsets = {o.domain: int(o.version) for o in model.opset_import}
    contrib = {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}
    return onnxruntime_min_version(opsets, int(model.ir_version), contrib, host=host)


def _with_requirement(built: BuiltModel, workdir: Path) -> BuiltModel:
    """``built`` with unused opset imports stripped and ``runtime.min_version`` derived from the graph."""
    host = _host_versions()
    path, dropped = strip_unused_opsets(built.path, workdir / f"opsets-{built.candidate}" / MODEL_MEMBER)
    need = model_requirement(path, host=host["onnxruntime"])
    runtime = {**built.runtime, "min_version": need.version, "built_with": host}
    recipe = {**built.recipe, "runtime_requirement": {"min_version": need.version, "reasons": list(need.reasons),
                                                      "stripped_opsets": dropped}}  # fmt: skip
    return dataclasses.replace(built, path=path, runtime=runtime, recipe=recipe)


def _checked(built: BuiltModel | CandidateFailed, workdir: Path) -> BuiltModel | CandidateFailed:
    """``_with_requirement`` of a built candidate; one whose file cannot be read is a failed candidate."""
    if isinstance(built, CandidateFailed):
        return built
    try:
        return _with_requirement(built, workdir)
    except Exception as e:  # onnx's DecodeError, or a graph the requirement tables cannot place
        return CandidateFailed(built.candidate, "build", f"the built graph cannot be read: {str(e)[:300]}")


def _symbolic_shapes_complete(src: Path) -> tuple[bool, str]:
    """Whether onnxruntime's symbolic shape inference completes on ``src``, and why not.

    ``SymbolicShapeInference.infer_shapes`` (run by ``quant_pre_process``) writes
    ``sym_shape_infer_temp.onnx`` and external-data files into the current directory when it gives
    up, as it does on some attention graphs. This replays its steps without that dump, so
    ``quant_pre_process`` runs it only where it succeeds.
    """
    try:
        import onnx
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inference = SymbolicShapeInference(2**31 - 1, False, False, 0)  # quant_pre_process's defaults
        inference._preprocess(onnx.load(str(src)))
        complete = False
        while inference.run_:
            complete = inference._infer_impl()
    except Exception as e:  # a changed private API or an unsupported op: skip this step, say so
        return False, f"symbolic shape inference failed: {type(e).__name__}: {str(e)[:120]}"
    return complete, "" if complete else "symbolic shape inference is incomplete on this graph"


def _pre_process(src: Path, dst: Path) -> dict[str, Any]:
    """Shape inference + graph cleanup before quantization; records what could be applied."""
    from onnxruntime.quantization import quant_pre_process

    symbolic, why = _symbolic_shapes_complete(src)
    info: dict[str, Any] = {"symbolic_shape_inference": symbolic}
    if why:
        info["note"] = why
    try:
        with quiet("onnxruntime.quantization"):
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=not symbolic)
    except Exception as e:  # the quantizer can still work on the raw graph
        dst.unlink(missing_ok=True)
        return {**info, "applied": False, "note": f"pre-processing failed: {str(e)[:120]}"}
    return {**info, "applied": True}


def _int4_settings(options: PackageOptions) -> tuple[int, int | None]:
    """Block size and accuracy level for int4 from ``options.extra``.

    Raises:
        PackagingError: a block size that is not a power of two >= 16, or a level outside 0-4.
    """
    block = options.extra.get("int4_block_size", DEFAULT_INT4_BLOCK_SIZE)
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1):
        raise PackagingError(f"extra int4_block_size must be a power of two >= 16, got {block!r}")
    level = options.extra.get("int4_accuracy_level")
    if level is not None and level not in (0, 1, 2, 3, 4):
        raise PackagingError(f"extra int4_accuracy_level must be 0-4 or None, got {level!r}")
    return block, level


def _ort_format_option(options: PackageOptions) -> bool:
    value = options.extra.get("ort_format", False)
    if not isinstance(value, bool):
        raise PackagingError(f"extra ort_format must be true or false, got {value!r}")
    return value


def _float_record(names: tuple[str, ...]) -> dict[str, Any]:
    """``runtime.quantization``'s account of the layers kept in float (nothing when none is)."""
    return {"float_layers": list(names[:MAX_RECORDED])} if names else {}


class OnnxRuntimePackager:
    """Builds ``model.onnx`` for onnxruntime's CPU execution provider."""

    target = Target.ONNXRUNTIME
    capabilities = CAPABILITIES

    def __init__(self) -> None:
        # exported graph -> its rewritten copy and counts: the search builds many times from one export
        self._rewritten: dict[Path, tuple[Path, dict[str, Any]]] = {}

    def _cpu_graph(self, exported: Path, workdir: Path) -> tuple[Path, dict[str, Any]]:
        """``simplify_for_cpu`` of ``exported``, once per export while its result is on disk."""
        cached = self._rewritten.get(exported)
        if cached is None or not cached[0].is_file():
            cached = self._rewritten[exported] = simplify_for_cpu(exported, workdir / "simplified.onnx")
        return cached

    def _runtime(self, opset: int, exporter: str) -> dict[str, Any]:
        return {
            "package": "onnxruntime",
            "arch": ["any"],
            "providers": ["CPUExecutionProvider"],
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "format": "onnx",
            "opset": int(opset),
            "exporter": exporter,
        }

    def build(
        self,
        source: Source,
        precision: Precision,
        workdir: Path,
        options: PackageOptions,
        progress: Callable[[str], None],
    ) -> list[BuiltModel | CandidateFailed]:
        """Build the candidates for ``precision`` under ``workdir``; a recipe that fails is a ``CandidateFailed``.

        Raises:
            PackagingError: the precision is not supported, or export/quantization failed.
        """
        if precision not in CAPABILITIES.precisions:
            valid = ", ".join(p.value for p in CAPABILITIES.precisions)
            raise PackagingError(f"onnxruntime does not support precision {precision.value}; valid: {valid}")
        ort_format = _ort_format_option(options)  # bad extras fail before the export
        if precision is Precision.INT4:
            _int4_settings(options)
        workdir.mkdir(parents=True, exist_ok=True)
        exported = source.onnx()
        runtime = self._runtime(exported.opset, exported.exporter)
        export_info: dict[str, Any] = {"exporter": exported.exporter, "opset": exported.opset,
                                       "seconds": round(exported.seconds, 3)}  # fmt: skip
        graph, rewrites = self._cpu_graph(exported.path, workdir)
        if rewrites:
            export_info["cpu_rewrites"] = rewrites  # exact; validation checks the result like any candidate
        built: list[BuiltModel | CandidateFailed]
        if precision is Precision.FP32:
            built = [BuiltModel(graph, MODEL_MEMBER, runtime, {"export": export_info}, "fp32")]
        elif precision is Precision.FP16:
            built = [*self._fp16(graph, workdir, runtime, export_info, progress)]
        elif precision is Precision.INT8_DYNAMIC:
            built = self._int8_dynamic(graph, workdir, runtime, export_info, source, progress, options)
        elif precision is Precision.INT8:
            built = self._int8_static(graph, workdir, runtime, export_info, source, options, progress)
        else:
            try:
                built = [*self._int4(graph, workdir, runtime, export_info, options, progress)]
            except PackagingError as e:  # e.g. no MatMul with constant weights: the other precisions still count
                built = [CandidateFailed("int4", "build", str(e))]
        built = [_checked(b, workdir) for b in built]
        if ort_format:
            built = [self._to_ort(b, workdir, progress) if isinstance(b, BuiltModel) else b for b in built]
        return built

    def _fp16(self, src: Path, workdir: Path, runtime: Mapping[str, Any], export_info: Mapping[str, Any],
              progress: Callable[[str], None]) -> list[BuiltModel]:  # fmt: skip
        from packagers.targets._ort_quant import convert_fp16

        progress("onnxruntime fp16: converting weights and compute to float16 (float32 inputs/outputs)")
        out = workdir / "fp16" / MODEL_MEMBER
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        recipe = {**convert_fp16(src, out), "seconds": round(time.perf_counter() - start, 3)}
        rt = {**runtime, "quantization": {"method": "fp16", "keep_io_types": True}}
        return [BuiltModel(out, MODEL_MEMBER, rt, {"export": dict(export_info), "conversion": recipe}, "fp16")]

    def _int8_static(
        self,
        src: Path,
        workdir: Path,
        runtime: Mapping[str, Any],
        export_info: Mapping[str, Any],
        source: Source,
        options: PackageOptions,
        progress: Callable[[str], None],
    ) -> list[BuiltModel | CandidateFailed]:
        import onnx
        import onnxruntime as ort

        from packagers.targets._ort_layers import ensure_node_names, resolve_float_nodes, static_quantized_layers
        from packagers.targets._ort_quant import (
            ALPHAS,
            CONV_OPS,
            is_transformer_graph,
            prepare_for_qdq,
            quantize_static_qdq,
            sensitive_nodes,
            smooth_matmul_inputs,
            weight_matmuls,
        )

        recipe_name = str(options.extra.get("int8_recipe", "auto"))
        if recipe_name not in ("auto", "transformer", "default", "conv"):
            raise PackagingError(f"extra int8_recipe must be auto, transformer, default or conv, got {recipe_name!r}")
        keep_float = options.extra.get("int8_keep_float")
        if keep_float is not None and (isinstance(keep_float, bool) or not isinstance(keep_float, int)):
            raise PackagingError(f"extra int8_keep_float must be an integer, got {keep_float!r}")
        progress("onnxruntime int8: pre-processing the graph")
        src, prepared = prepare_for_qdq(src, workdir / "qdq-ready.onnx")
        pre = workdir / "preprocessed.onnx"
        pre_info = {**_pre_process(src, pre), **prepared}
        base = ensure_node_names(pre if pre_info["applied"] else src, workdir / "named.onnx")
        transformer = recipe_name == "transformer" or (
            recipe_name == "auto" and is_transformer_graph(onnx.load(str(base), load_external_data=False))
        )
        feeds = source.validation_inputs
        common = {
            "method": "static",
            "tool": f"onnxruntime.quantization.quantize_static (onnxruntime {ort.__version__})",
            "recipe": "transformer" if transformer else "default",
            "calibration_data": source.data_origin,
            "pre_process": pre_info,
        }
        smoothing: dict[str, Any] | None = None
        keep: list[str] = []
        alpha = options.smoothquant_alpha
        if (transformer and alpha != 0) or (alpha and weight_matmuls(onnx.load(str(base), load_external_data=False))):
            progress("onnxruntime int8: measuring activation outliers and per-layer sensitivity (smoothing)")
            smoothed = workdir / "smoothed.onnx"
            alphas = ALPHAS if alpha is None else (alpha,)
            smoothing = smooth_matmul_inputs(base, smoothed, feeds, workdir, alphas=alphas)
            if transformer and not options.float_layers:  # the search's or the user's float layers replace these
                keep = sensitive_nodes(smoothing["sensitivity"], keep_float)
            smoothing["sensitivity"] = dict(list(smoothing["sensitivity"].items())[:8])  # worst few, for the report
            base = smoothed
        selection = resolve_float_nodes(base, options, keep)
        if selection.unmatched:
            progress("onnxruntime int8: no layer matched " + ", ".join(selection.unmatched))
        # Per-tensor vs per-channel: transformers want per-channel (outlier rows); for other graphs
        # validation picks, as for int8-dynamic.
        channel_modes = (
            [options.per_channel] if options.per_channel is not None else ([True] if transformer else [False, True])
        )
        variants: list[tuple[bool, tuple[str, ...] | None]] = [
            (pc, None) for pc in channel_modes if recipe_name != "conv"
        ]  # fmt: skip
        has_conv = any(n.op_type in CONV_OPS for n in onnx.load(str(base), load_external_data=False).graph.node)
        if recipe_name == "conv" and not has_conv:
            raise PackagingError("extra int8_recipe conv quantizes convolutions and this graph has none; use auto")
        if not transformer and has_conv and recipe_name in ("auto", "conv"):  # per-tensor only when pinned so
            variants += [(pc, CONV_OPS) for pc in channel_modes if pc or options.per_channel is False]
        # Calibration: min-max, and for other graphs than transformers percentile too (clipping rare activation
        # peaks: PP-OCRv4's detector 0.983 -> 0.990 map cosine), unless the user chose one.
        rebuild = options.extra.get("int8_calibration")  # the search rebuilding one candidate (its ``rebuild_extra``)
        if rebuild is not None and rebuild not in CALIBRATION_METHODS:
            raise PackagingError(
                f"extra int8_calibration must be one of {', '.join(CALIBRATION_METHODS)}, got {rebuild!r}"
            )
        methods = [options.calibration_method or rebuild] if options.calibration_method or rebuild else (
            ["minmax"] if transformer else ["minmax", "percentile"])  # fmt: skip
        candidates: list[BuiltModel | CandidateFailed] = []
        for (per_channel, op_types), method in itertools.product(variants, methods):
            label = ("per-channel" if per_channel else "per-tensor") + ("-conv" if op_types else "")
            label += f"-{method}" if method != "minmax" and not options.calibration_method else ""  # added candidates
            progress(f"onnxruntime int8: calibrating ({method}) and quantizing ({label})")
            out = workdir / f"static-{label}" / MODEL_MEMBER
            out.parent.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            try:
                quant = quantize_static_qdq(base, out, feeds, method=method,
                                            per_channel=per_channel, weights_only=transformer,
                                            nodes_to_exclude=selection.names,
                                            max_samples=options.calibration_size or 128,
                                            symmetric_activations=options.activation_symmetric,
                                            symmetric_weights=options.weight_symmetric,
                                            op_types=op_types)  # fmt: skip
            except PackagingError as e:  # one recipe failing leaves the others
                candidates.append(CandidateFailed(label, "build", str(e)))
                continue
            pin = {"int8_recipe": "conv" if op_types else common["recipe"]}  # what rebuilds only this candidate
            if not options.calibration_method:
                pin["int8_calibration"] = method
            recipe = {**common, **quant, **selection.report(), "per_channel": per_channel, "rebuild_extra": pin,
                      "quantized_layers": static_quantized_layers(out, op_types),
                      "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
            if smoothing is not None:
                recipe["smoothing"] = smoothing
            rt = {**runtime, "quantization": {"method": "static", "format": "QDQ", "per_channel": per_channel,
                                              "calibration_method": method,
                                              "recipe": "conv" if op_types else common["recipe"],
                                              "smoothed": transformer,
                                              "float_nodes": len(selection.names),
                                              **_float_record(selection.names)}}  # fmt: skip
            candidates.append(BuiltModel(out, MODEL_MEMBER, rt, {"export": dict(export_info), "quantization": recipe},
                                         label))  # fmt: skip
        return candidates

    def _int4(self, src: Path, workdir: Path, runtime: Mapping[str, Any], export_info: Mapping[str, Any],
              options: PackageOptions, progress: Callable[[str], None]) -> list[BuiltModel]:  # fmt: skip
        from packagers.targets._ort_quant import quantize_int4

        block, level = _int4_settings(options)
        progress(f"onnxruntime int4: 4-bit MatMul weights (MatMulNBits, block {block})")
        out = workdir / "int4" / MODEL_MEMBER
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        recipe = {**quantize_int4(src, out, block_size=block, accuracy_level=level),
                  "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
        rt = {**runtime, "quantization": {"method": "weight-only", "bits": 4, "block_size": block,
                                          "op": "com.microsoft.MatMulNBits"}}  # fmt: skip
        return [BuiltModel(out, MODEL_MEMBER, rt, {"export": dict(export_info), "quantization": recipe}, "int4")]

    def _to_ort(self, built: BuiltModel, workdir: Path, progress: Callable[[str], None]) -> BuiltModel:
        from packagers.targets._ort_quant import to_ort_format

        progress(f"onnxruntime: converting the {built.candidate} graph to ORT format")
        path, info = to_ort_format(built.path, workdir / f"ort-{built.candidate}")
        # The graph is optimised at conversion; the device loads it as it is (a level is still recorded).
        # An ORT-format file is read by the converting release and later ones only: the host's release.
        rt = {**built.runtime, "format": "ort", "graph_optimization_level": "ORT_ENABLE_ALL",
              "min_version": runtime_min_version()}  # fmt: skip
        recipe = {**built.recipe, "ort_format": info}
        return BuiltModel(path, ORT_MEMBER, rt, recipe, built.candidate)

    def _int8_dynamic(self, src: Path, workdir: Path, runtime: Mapping[str, Any], export_info: Mapping[str, Any],
                      source: Source, progress: Callable[[str], None],
                      options: PackageOptions) -> list[BuiltModel | CandidateFailed]:  # fmt: skip
        import onnx
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        from packagers.targets._ort_fusion import optimize_offline, quantize_extra_options, try_fuse
        from packagers.targets._ort_layers import dynamic_quantized_layers, ensure_node_names, resolve_float_nodes
        from packagers.targets._ort_quant import ALPHAS, is_transformer_graph, smooth_matmul_inputs

        progress("onnxruntime int8-dynamic: pre-processing the graph")
        pre = workdir / "preprocessed.onnx"
        pre_info = _pre_process(src, pre)
        base = ensure_node_names(pre if pre_info["applied"] else src, workdir / "named.onnx")
        selection = resolve_float_nodes(base, options)
        if selection.unmatched:
            progress("onnxruntime int8-dynamic: no layer matched " + ", ".join(selection.unmatched))
        variants: list[tuple[str, bool, Path, dict[str, Any] | None]] = [
            (label, per_channel, base, None)
            for label, per_channel in (("per-tensor", False), ("per-channel", True))
            if options.per_channel in (None, per_channel)  # the option (or the search) pins one
        ]
        alpha = options.smoothquant_alpha
        if (
            alpha != 0
            and options.per_channel is not False
            and (alpha is not None or is_transformer_graph(onnx.load(str(base), load_external_data=False)))
        ):
            # Outlier channels in transformer activations cost dynamic int8 too (all-MiniLM-L6-v2: pooled
            # cosine 0.9925 -> 0.9955 with smoothing); a third candidate, validation still picks.
            progress("onnxruntime int8-dynamic: smoothing activation outliers (third candidate)")
            smoothed = workdir / "smoothed.onnx"
            smoothing = smooth_matmul_inputs(base, smoothed, source.validation_inputs, workdir,
                                             alphas=ALPHAS if alpha is None else (alpha,))  # fmt: skip
            smoothing["sensitivity"] = dict(list(smoothing["sensitivity"].items())[:8])
            smoothing["data"] = source.data_origin
            variants.append(("per-channel-smoothed", True, smoothed, smoothing))
        extra = {"WeightSymmetric": options.weight_symmetric is not False}
        # quantize_dynamic turns a Gemm into a MatMul named NAME_MatMul before it reads nodes_to_exclude
        excluded = [*selection.names, *(f"{name}_MatMul" for name in selection.names)]
        candidates: list[BuiltModel | CandidateFailed] = []
        pinned = options.for_runtime is not None or options.device is not None
        for label, per_channel, graph, smoothing_info in variants:
            # Attention layers fused into one op each become QAttention (packagers/targets/_ort_fusion.py); the
            # offline-optimised graph needs the host's onnxruntime, so not when an older release is asked for
            fusion: dict[str, Any] = {"fused": 0, "note": "not with --for-runtime/--device"}
            if not pinned:
                graph, fusion = try_fuse(graph, workdir / f"{label}-fused" / MODEL_MEMBER, source.validation_inputs,
                                         keep=set(excluded))  # fmt: skip
            fused = ", fused attention" if fusion["fused"] else ""
            progress(f"onnxruntime int8-dynamic: quantizing weights ({label}{fused})")
            out = workdir / label / MODEL_MEMBER
            out.parent.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            try:
                with quiet("onnxruntime.quantization"):
                    quantize_dynamic(str(graph), str(out), weight_type=QuantType.QInt8, per_channel=per_channel,
                                     reduce_range=False, use_external_data_format=False,
                                     nodes_to_exclude=excluded,
                                     extra_options={**extra, **quantize_extra_options()})  # fmt: skip
                # base's nodes now integer ops (fused attention's MatMuls are not among them), read before the
                # offline optimisation renames nodes
                quantized = dynamic_quantized_layers(base, out, {*IntegerOpsRegistry, "Gemm"})
                if fusion["fused"]:
                    fusion["offline_optimization"] = optimize_offline(out, out.with_name("optimized.onnx"))
                    out = out.with_name("optimized.onnx")
            except Exception as e:  # the quantizer raises plain Exceptions; one recipe failing leaves the others
                candidates.append(CandidateFailed(label, "build", f"int8-dynamic quantization failed: {str(e)[:300]}"))
                continue
            recipe = {
                "method": "dynamic",
                "tool": f"onnxruntime.quantization.quantize_dynamic (onnxruntime {ort.__version__})",
                "weight_type": "QInt8",
                "weights": f"int8 {'asymmetric' if options.weight_symmetric is False else 'symmetric'}, {label}",
                "activations": "uint8, scale and zero point computed at run time per tensor",
                "per_channel": per_channel,
                "reduce_range": False,
                "op_types": sorted(IntegerOpsRegistry),
                "pre_process": pre_info,
                **selection.report(),
                "quantized_layers": quantized,
                "seconds": round(time.perf_counter() - start, 3),
            }
            if smoothing_info is not None:
                recipe["smoothing"] = smoothing_info
            recipe["attention_fusion"] = fusion
            rt = {**runtime, "quantization": {"method": "dynamic", "weight_type": "QInt8", "per_channel": per_channel,
                                              "smoothed": smoothing_info is not None,
                                              "fused_attention": int(fusion["fused"]),
                                              **_float_record(selection.names)}}  # fmt: skip
            if fusion["fused"]:  # optimised offline without the fusion that slows it (see _ort_fusion)
                rt["graph_optimization_level"] = fusion["offline_optimization"]["device_level"]
            candidates.append(BuiltModel(out, MODEL_MEMBER, rt, {"export": dict(export_info), "quantization": recipe},
                                         label))  # fmt: skip
        return candidates

    def quantized_layers(self, built: BuiltModel) -> list[str]:
        """The ONNX nodes ``built`` computes in int8, graph order (the names ``float_layers`` takes)."""
        return list(built.recipe.get("quantization", {}).get("quantized_layers", []))

    def runner(self, built: BuiltModel) -> Runner:
        """A run function over an onnxruntime CPU session of ``built`` (ORT_ENABLE_ALL).

        Raises:
            PackagingError: onnxruntime cannot load the model.
        """
        level = str(built.runtime.get("graph_optimization_level", "ORT_ENABLE_ALL"))  # what the device applies
        session = cpu_session(built.path, optimization=level, what=f"the built model {built.path.name}")
        names = [o.name for o in session.get_outputs()]
        expected = {i.name for i in session.get_inputs()}

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            feeds = {k: np.ascontiguousarray(v) for k, v in inputs.items() if k in expected}
            return dict(zip(names, session.run(names, feeds), strict=True))

        return run
