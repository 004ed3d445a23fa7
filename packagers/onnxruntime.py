"""Target: ONNX Runtime (CPU execution provider).

- ``fp32``: the exported (or given) ONNX graph as is; the device applies ORT_ENABLE_ALL at load.
- ``int8-dynamic``: ``quant_pre_process`` then ``quantize_dynamic`` with QInt8 weights. Per-channel
  weights help some models and hurt others (on a tiny BERT classifier per-tensor was better), so both
  variants are built and validation keeps the better one; the choice is recorded.

onnx and onnxruntime are imported inside the functions (module name aside, ``import onnxruntime``
below resolves to the real package: imports are absolute).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packagers.options import INPUT_KINDS, Capabilities, PackageOptions, Precision, Target
from packagers.registry import BuiltModel, Runner
from sdk.errors import PackagingError

if TYPE_CHECKING:
    from packagers.sources import Source

__all__ = ["CAPABILITIES", "OnnxRuntimePackager", "make_session", "runtime_min_version"]

CAPABILITIES = Capabilities(
    precisions=(Precision.FP32, Precision.INT8_DYNAMIC),
    input_kinds=INPUT_KINDS,
    dynamic_shapes=True,
)
MODEL_MEMBER = "model.onnx"


def runtime_min_version() -> str:
    """The installed onnxruntime as ``major.minor.0`` (what the built graphs were validated with)."""
    import onnxruntime as ort

    major, minor = ort.__version__.split(".")[:2]
    return f"{major}.{minor}.0"


def make_session(path: Path) -> Any:
    """An onnxruntime CPU session with ORT_ENABLE_ALL, as a device would create it.

    Raises:
        PackagingError: onnxruntime cannot load the file.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own Fail / InvalidGraph / NotImplemented types
        raise PackagingError(f"onnxruntime cannot load the built model {path.name}: {str(e)[:300]}") from e


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantization tools log advice at WARNING through the root logger; keep the CLI output clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


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
        with _quiet_quantizer():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=not symbolic)
    except Exception as e:  # the quantizer can still work on the raw graph
        dst.unlink(missing_ok=True)
        return {**info, "applied": False, "note": f"pre-processing failed: {str(e)[:120]}"}
    return {**info, "applied": True}


class OnnxRuntimePackager:
    """Builds ``model.onnx`` for onnxruntime's CPU execution provider."""

    target = Target.ONNXRUNTIME
    capabilities = CAPABILITIES

    def _runtime(self, opset: int, exporter: str) -> dict[str, Any]:
        return {
            "package": "onnxruntime",
            "min_version": runtime_min_version(),
            "arch": ["any"],
            "providers": ["CPUExecutionProvider"],
            "graph_optimization_level": "ORT_ENABLE_ALL",
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
    ) -> list[BuiltModel]:
        """Build the candidates for ``precision`` under ``workdir``.

        Raises:
            PackagingError: the precision is not supported, or export/quantization failed.
        """
        if precision not in CAPABILITIES.precisions:
            valid = ", ".join(p.value for p in CAPABILITIES.precisions)
            raise PackagingError(f"onnxruntime does not support precision {precision.value}; valid: {valid}")
        workdir.mkdir(parents=True, exist_ok=True)
        exported = source.onnx()
        runtime = self._runtime(exported.opset, exported.exporter)
        export_info = {"exporter": exported.exporter, "opset": exported.opset, "seconds": round(exported.seconds, 3)}
        if precision is Precision.FP32:
            return [BuiltModel(exported.path, MODEL_MEMBER, runtime, {"export": export_info}, "fp32")]
        return self._int8_dynamic(exported.path, workdir, runtime, export_info, progress)

    def _int8_dynamic(self, src: Path, workdir: Path, runtime: Mapping[str, Any], export_info: Mapping[str, Any],
                      progress: Callable[[str], None]) -> list[BuiltModel]:  # fmt: skip
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        progress("onnxruntime int8-dynamic: pre-processing the graph")
        pre = workdir / "preprocessed.onnx"
        pre_info = _pre_process(src, pre)
        base = pre if pre_info["applied"] else src
        candidates: list[BuiltModel] = []
        for per_channel in (False, True):
            label = "per-channel" if per_channel else "per-tensor"
            progress(f"onnxruntime int8-dynamic: quantizing weights ({label})")
            out = workdir / label / MODEL_MEMBER
            out.parent.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            try:
                with _quiet_quantizer():
                    quantize_dynamic(str(base), str(out), weight_type=QuantType.QInt8, per_channel=per_channel,
                                     reduce_range=False, use_external_data_format=False)  # fmt: skip
            except Exception as e:  # the quantizer raises plain Exceptions for unsupported graphs
                raise PackagingError(f"int8-dynamic quantization ({label}) failed: {str(e)[:300]}") from e
            recipe = {
                "method": "dynamic",
                "tool": f"onnxruntime.quantization.quantize_dynamic (onnxruntime {ort.__version__})",
                "weight_type": "QInt8",
                "weights": f"int8 symmetric, {label}",
                "activations": "uint8, scale and zero point computed at run time per tensor",
                "per_channel": per_channel,
                "reduce_range": False,
                "op_types": sorted(IntegerOpsRegistry),
                "pre_process": pre_info,
                "seconds": round(time.perf_counter() - start, 3),
            }
            rt = {**runtime, "quantization": {"method": "dynamic", "weight_type": "QInt8", "per_channel": per_channel}}
            candidates.append(BuiltModel(out, MODEL_MEMBER, rt, {"export": dict(export_info), "quantization": recipe},
                                         label))  # fmt: skip
        return candidates

    def runner(self, built: BuiltModel) -> Runner:
        """A run function over an onnxruntime CPU session of ``built`` (ORT_ENABLE_ALL).

        Raises:
            PackagingError: onnxruntime cannot load the model.
        """
        session = make_session(built.path)
        names = [o.name for o in session.get_outputs()]
        expected = {i.name for i in session.get_inputs()}

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            feeds = {k: np.ascontiguousarray(v) for k, v in inputs.items() if k in expected}
            return dict(zip(names, session.run(names, feeds), strict=True))

        return run
