"""Target: Core ML (an ML program ``.mlpackage`` built with coremltools).

The source's torch module (a torch module, or a transformers model behind its task wrapper) is traced
with ``torch.jit.trace`` and converted with ``ct.convert(..., convert_to="mlprogram")``; the op
converters coremltools 9 lacks for BERT-family graphs are added by ``packagers.targets._coreml_ops``.

- ``fp32``: compute precision FLOAT32.
- ``fp16``: compute precision FLOAT16 (weights and activations in half precision; inputs/outputs keep
  the manifest's float32).
- ``int8-weights``: ``ct.optimize.coreml.linear_quantize_weights``, int8 symmetric per channel.
- ``int4-palette``: ``ct.optimize.coreml.palettize_weights``, 4 bits (16 k-means centroids per tensor).
  The two compressed precisions compute in float16 by default (what the Neural Engine runs).

Inputs keep the user's names; named dims become ``ct.RangeDim`` (shared by name). Core ML has no
int64 tensors, so integer inputs (token ids) are int32 in the package: the manifest keeps the user's
dtypes and ``runtime.coreml_inputs`` / ``runtime.coreml_outputs`` give the package's, for the device
to cast (refusing values int32 cannot hold).

Bundle layout: the ``.mlpackage`` folder's files are members under ``model.mlpackage/``, and the
manifest's ``model`` is ``model.mlpackage/Manifest.json`` (the package root is its folder).

Core ML predicts only on macOS. On other hosts ``runner`` raises ``ValidationUnavailable`` after
``build`` has checked the saved package's structure (``_check_structure``): the bundle is signed on
that check, and the manifest says numeric validation did not run.

``PackageOptions.extra`` settings: ``minimum_deployment_target`` (a ``ct.target`` name, default
``iOS16``), ``compute_precision`` (``float32`` / ``float16``), ``weight_threshold`` (elements below
which a weight stays uncompressed, default 2048, coremltools' own), ``dim_bounds``
(``{dim: [min, max]}``; default the source's input policy, else ``[1, 1024]``: ML programs need a
finite bound) and
``compute_units`` (the device's default, ``ALL``).
"""

from __future__ import annotations

import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packagers._quiet import quiet
from packagers.options import Capabilities, PackageOptions, Precision, Target
from packagers.registry import BuiltModel, Runner
from packagers.validation import ValidationUnavailable
from sdk.errors import PackagingError
from sdk.manifest import TensorSpec
from sdk.runtime_versions import COREML_SPEC_OS, coreml_min_version, coreml_os_versions

if TYPE_CHECKING:
    from packagers.sources.base import Source

__all__ = ["CAPABILITIES", "MODEL_MEMBER", "PACKAGE_ROOT", "CoreMlPackager", "check_structure", "coreml_dtype"]

CAPABILITIES = Capabilities(
    precisions=(Precision.FP32, Precision.FP16, Precision.INT8_WEIGHTS, Precision.INT4_PALETTE),
    input_kinds=("torch", "transformers"),  # coremltools 9 has no ONNX frontend
    dynamic_shapes=True,
)
PACKAGE_ROOT = "model.mlpackage"
MODEL_MEMBER = f"{PACKAGE_ROOT}/Manifest.json"
DEFAULT_DEPLOYMENT_TARGET = "iOS16"
DEFAULT_DIM_BOUNDS = (1, 1024)  # a named dim without bounds; ML programs refuse unbounded ranges
DEFAULT_WEIGHT_THRESHOLD = 2048  # elements; coremltools' default: smaller tensors gain nothing from compression
COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_NE", "CPU_AND_GPU")
# Ops the compressed precisions must leave in the program (iOS16/17 and iOS18 spellings).
_COMPRESSION_OPS: Mapping[Precision, tuple[str, ...]] = {
    Precision.INT8_WEIGHTS: ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"),
    Precision.INT4_PALETTE: ("constexpr_lut_to_dense",),
}
# coremltools probes these at import (tensorflow and torchao alone cost ~30 s on 2 cores) and needs none
# of them for torch conversion: they are hidden while it imports unless already loaded.
_OPTIONAL_IMPORTS = ("tensorflow", "torchao", "torchvision", "torchaudio", "executorch", "xgboost", "libsvm")
# Core ML multiarray types (FeatureTypes_pb2.ArrayFeatureType) and MIL tensor types, by numpy name.
_ARRAY_TYPES = {"float32": 65568, "float16": 65552, "int32": 131104, "float64": 65600}
_COMPUTE_OPS = frozenset({"linear", "conv", "conv_transpose", "matmul", "einsum"})


def coreml_dtype(dtype: str) -> str:
    """The dtype a Core ML input/output holds for a manifest dtype: Core ML has no int64, int8 or bool tensors."""
    if dtype in ("float32", "float64"):
        return "float32"
    if dtype == "float16":
        return "float16"
    return "int32"


def predicts_here() -> bool:
    """Whether this host can run Core ML predictions (macOS only)."""
    return sys.platform == "darwin"


def numeric_unavailable_reason() -> str:
    return f"Core ML predicts only on macOS; this host is {platform.system() or sys.platform}: structure checked only"


def import_coremltools() -> Any:
    """Import coremltools quietly and without its optional framework probes.

    Raises:
        PackagingError: coremltools is not installed.
    """
    if "coremltools" in sys.modules:
        return sys.modules["coremltools"]
    hidden = [name for name in _OPTIONAL_IMPORTS if name not in sys.modules]
    with quiet("coremltools"):
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` raise ImportError
        try:
            import coremltools as ct
        except ImportError as e:
            raise PackagingError("the coreml target needs coremltools: pip install 'edgeship[coreml]'") from e
        finally:
            for name in hidden:
                if name in sys.modules and sys.modules[name] is None:
                    del sys.modules[name]
    return ct


class _Settings:
    """The target-specific settings read from ``PackageOptions.extra``, checked once."""

    def __init__(self, ct: Any, precision: Precision, extra: Mapping[str, Any]) -> None:
        target_name = str(extra.get("minimum_deployment_target", DEFAULT_DEPLOYMENT_TARGET))
        members = ct.target.__members__
        valid = [n for n, v in members.items() if v >= ct.target.iOS15]  # ML programs need iOS15 / macOS12
        if target_name not in valid:
            raise PackagingError(
                f"minimum_deployment_target {target_name!r} is not one of {', '.join(valid)} (ML programs need iOS15+)"
            )
        if precision in _COMPRESSION_OPS and members[target_name] < ct.target.iOS16:
            raise PackagingError(f"{precision.value} needs minimum_deployment_target iOS16 / macOS13 or later")
        self.target_name = target_name
        self.target = members[target_name]
        default_compute = "float32" if precision is Precision.FP32 else "float16"
        self.compute_precision = str(extra.get("compute_precision", default_compute))
        if self.compute_precision not in ("float32", "float16"):
            raise PackagingError(f"compute_precision must be float32 or float16, got {self.compute_precision!r}")
        if precision is Precision.FP16 and self.compute_precision != "float16":
            raise PackagingError("precision fp16 computes in float16; drop compute_precision or ask for fp32")
        if precision is Precision.FP32 and self.compute_precision != "float32":
            raise PackagingError("precision fp32 computes in float32; ask for fp16 to compute in float16")
        threshold = extra.get("weight_threshold", DEFAULT_WEIGHT_THRESHOLD)
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise PackagingError(f"weight_threshold must be an integer >= 1, got {threshold!r}")
        self.weight_threshold = threshold
        self.compute_units = str(extra.get("compute_units", "ALL"))
        if self.compute_units not in COMPUTE_UNITS:
            raise PackagingError(f"compute_units must be one of {', '.join(COMPUTE_UNITS)}, got {self.compute_units!r}")
        bounds = extra.get("dim_bounds", {})
        if not isinstance(bounds, Mapping):
            raise PackagingError("dim_bounds must map a dim name to [min, max]")
        self.dim_bounds = dict(bounds)


def _bounds(name: str, settings: _Settings, source: Source) -> tuple[int, int]:
    """[min, max] of a named dim: the user's, else the source's input policy, else DEFAULT_DIM_BOUNDS."""
    raw = settings.dim_bounds.get(name, source.input_policy.get("dims", {}).get(name, DEFAULT_DIM_BOUNDS))
    try:
        low, high = (int(v) for v in raw)
    except (TypeError, ValueError):
        raise PackagingError(f"dim_bounds[{name!r}] must be [min, max] integers, got {raw!r}") from None
    if not 1 <= low <= high:
        raise PackagingError(f"dim_bounds[{name!r}] = {[low, high]}: need 1 <= min <= max")
    return low, high


def _coreml_io(ct: Any, source: Source, examples: Mapping[str, np.ndarray], settings: _Settings,
               bounds: dict[str, list[int]]) -> tuple[Any, Any]:  # fmt: skip
    """ct.TensorType inputs (RangeDims shared by dim name) and outputs with the Core ML dtypes; fills ``bounds``."""
    dims: dict[str, Any] = {}
    inputs = []
    for spec in source.inputs:
        shape = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int):
                shape.append(d)
                continue
            if d not in dims:
                low, high = _bounds(d, settings, source)
                default = int(examples[spec.name].shape[i])
                if not low <= default <= high:
                    raise PackagingError(
                        f"dim {d!r} of the trace example is {default}, outside dim_bounds {[low, high]}"
                    )
                dims[d] = ct.RangeDim(lower_bound=low, upper_bound=high, default=default, symbol=d)
                bounds[d] = [low, high]
            shape.append(dims[d])
        inputs.append(ct.TensorType(name=spec.name, shape=tuple(shape), dtype=np.dtype(coreml_dtype(spec.dtype)).type))
    outputs = [
        ct.TensorType(name=spec.name, dtype=None if spec.dtype == "bool" else np.dtype(coreml_dtype(spec.dtype)).type)
        for spec in source.outputs
    ]
    return inputs, outputs


def _trace(source: Source, examples: Mapping[str, np.ndarray]) -> Any:
    import torch

    module = source.native
    if not isinstance(module, torch.nn.Module):
        raise PackagingError(f"{source.description} has no torch module to convert to Core ML")
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(examples[s.name])) for s in source.inputs)
    try:
        with torch.no_grad(), quiet("torch.jit"):  # TracerWarnings about Python branches on shapes
            return torch.jit.trace(module.eval(), tensors, strict=False, check_trace=False)
    except Exception as e:  # the user's forward under the tracer: any error is a failed export
        raise PackagingError(f"torch.jit.trace failed for Core ML: {type(e).__name__}: {str(e)[:300]}") from e


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _weights_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in _files(root) if "weights" in p.relative_to(root).parts)


def _main_block(spec: Any) -> Any:
    function = spec.mlProgram.functions["main"]
    return function, function.block_specializations[function.opset]


def _mil_dims(value_type: Any) -> list[int | None]:
    """Dims of a MIL tensor type: the size where fixed, None where symbolic."""
    dims: list[int | None] = []
    for d in value_type.tensorType.dimensions:
        dims.append(int(d.constant.size) if d.WhichOneof("dimension") == "constant" else None)
    return dims


def _shape_problems(what: str, spec: TensorSpec, dims: Sequence[int | None]) -> list[str]:
    if len(dims) != len(spec.shape):
        return [f"{what} {spec.name}: rank {len(dims)}, the manifest says {len(spec.shape)} {list(spec.shape)}"]
    problems = []
    for i, (have, want) in enumerate(zip(dims, spec.shape, strict=True)):
        if isinstance(want, int) and have != want:
            problems.append(f"{what} {spec.name}: dim {i} is {have}, the manifest says {want}")
        if isinstance(want, str) and have is not None:
            problems.append(f"{what} {spec.name}: dim {i} ({want}) was fixed to {have} by the conversion")
    return problems


def check_structure(
    ct: Any, package: Path, source: Source, precision: Precision, compute_precision: str,
    baseline_weights: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Check a saved ``.mlpackage`` without running it; what a host without Core ML can check.

    The package loads (``ct.models.MLModel(..., skip_model_load=True)``) and is an ML program; its
    inputs and outputs are the manifest's, in order, with the Core ML dtypes, ranks and fixed dims
    (named dims stay symbolic); the precision's ops are there (the compression constexprs, float16
    tensors for float16 compute, none for float32); compressed weights are smaller than the
    uncompressed conversion's (``baseline_weights``).

    Returns:
        ``{"passed": bool, "problems": [...], "ops": {...}, ...}`` for the manifest's ``validation.structure``.

    Raises:
        PackagingError: the package cannot be read at all.
    """
    try:
        with quiet("coremltools"):
            model = ct.models.MLModel(str(package), skip_model_load=True)
        spec = model.get_spec()
    except Exception as e:  # protobuf or file errors: the package is unusable
        raise PackagingError(f"the saved Core ML package cannot be read: {type(e).__name__}: {e}") from e
    problems: list[str] = []
    if spec.WhichOneof("Type") != "mlProgram":
        raise PackagingError(f"the saved Core ML package is a {spec.WhichOneof('Type')}, not an ML program")
    function, block = _main_block(spec)
    described = {"input": list(spec.description.input), "output": list(spec.description.output)}
    mil_inputs = {v.name: _mil_dims(v.type) for v in function.inputs}
    mil_outputs: dict[str, list[int | None]] = {}
    op_types: Counter[str] = Counter()
    fp16_compute = 0  # weight-bearing ops with float16 results (a float32 program may still cast a mask to fp16)
    fp16 = ct.proto.MIL_pb2.DataType.Value("FLOAT16")
    for op in block.operations:
        op_types[op.type] += 1
        for out in op.outputs:
            mil_outputs[out.name] = _mil_dims(out.type)
            if op.type in _COMPUTE_OPS and out.type.tensorType.dataType == fp16:
                fp16_compute += 1
    for what, specs, mil in (("input", source.inputs, mil_inputs), ("output", source.outputs, mil_outputs)):
        names = [f.name for f in described[what]]
        if names != [s.name for s in specs]:
            problems.append(f"{what}s are {names}, the manifest says {[s.name for s in specs]}")
            continue
        for feature, s in zip(described[what], specs, strict=True):
            want = _ARRAY_TYPES.get(coreml_dtype(s.dtype))
            have = feature.type.multiArrayType.dataType
            if s.dtype != "bool" and have != want:
                problems.append(f"{what} {s.name}: Core ML type {have}, expected {coreml_dtype(s.dtype)}")
            var = s.name if what == "input" else next(iter(o for o in block.outputs if o == s.name), s.name)
            if var not in mil:
                problems.append(f"{what} {s.name}: not found in the ML program")
                continue
            problems += _shape_problems(what, s, mil[var])
    compression = _COMPRESSION_OPS.get(precision)
    compressed_ops = sum(op_types[t] for t in compression) if compression else 0
    if compression and not compressed_ops:
        problems.append(f"no {' / '.join(compression)} op: no weight was compressed (lower weight_threshold?)")
    if compute_precision == "float16" and not fp16_compute:
        problems.append("float16 compute asked, but no linear/conv/matmul op computes in float16")
    if compute_precision == "float32" and fp16_compute:
        problems.append(f"float32 compute asked, but {fp16_compute} linear/conv/matmul ops compute in float16")
    weights = _weights_bytes(package)
    if compression and baseline_weights is not None and not weights < baseline_weights:
        problems.append(f"compressed weights ({weights} bytes) are not smaller than uncompressed ({baseline_weights})")
    result: dict[str, Any] = {
        "passed": not problems,
        "problems": problems,
        "loads": "ct.models.MLModel(skip_model_load=True)",
        "program": "mlProgram",
        "specification_version": int(spec.specificationVersion),
        "inputs": [s.name for s in source.inputs],
        "outputs": [s.name for s in source.outputs],
        "ops": dict(sorted(op_types.items())),
        "float16_compute_ops": fp16_compute,
        "weights_bytes": weights,
        "package_bytes": sum(p.stat().st_size for p in _files(package)),
    }
    if compression:
        result["compressed_weight_ops"] = compressed_ops
        if baseline_weights is not None:
            result["uncompressed_weights_bytes"] = baseline_weights
    return result


class CoreMlPackager:
    """Builds ``model.mlpackage`` (an ML program) for Core ML on macOS and iOS."""

    target = Target.COREML
    capabilities = CAPABILITIES

    def build(
        self,
        source: Source,
        precision: Precision,
        workdir: Path,
        options: PackageOptions,
        progress: Callable[[str], None],
    ) -> list[BuiltModel]:
        """Trace, convert, compress and check one ``.mlpackage`` under ``workdir``.

        Raises:
            PackagingError: the precision or input kind is not supported, a setting in
                ``options.extra`` is invalid, or tracing, conversion, compression or the structural
                check failed.
        """
        why = CAPABILITIES.refuse(Target.COREML, precision, source.kind)
        if why:
            raise PackagingError(why)
        ct = import_coremltools()
        from packagers.targets import _coreml_ops

        settings = _Settings(ct, precision, options.extra)
        added_ops = _coreml_ops.register()
        workdir.mkdir(parents=True, exist_ok=True)
        n = min(2, source.samples)  # batch 2: a batch of 1 lets the tracer bake the batch size in
        examples = {k: v[:n] for k, v in source.validation_inputs.items()}

        progress(f"coreml {precision.value}: tracing the model (torch.jit.trace)")
        start = time.perf_counter()
        traced = _trace(source, examples)
        bounds: dict[str, list[int]] = {}
        inputs, outputs = _coreml_io(ct, source, examples, settings, bounds)
        progress(f"coreml {precision.value}: converting to an ML program ({settings.target_name})")
        compute = ct.precision.FLOAT16 if settings.compute_precision == "float16" else ct.precision.FLOAT32
        try:
            with quiet("coremltools"):
                mlmodel = ct.convert(traced, source="pytorch", inputs=inputs, outputs=outputs, convert_to="mlprogram",
                                     minimum_deployment_target=settings.target, compute_precision=compute,
                                     skip_model_load=True)  # fmt: skip
        except Exception as e:  # NotImplementedError for a missing op, ValueError/RuntimeError inside passes
            raise PackagingError(f"coremltools could not convert the model: {type(e).__name__}: {str(e)[:400]}") from e
        convert_info = {
            "tool": f"coremltools {ct.__version__}",
            "frontend": f"torch.jit.trace (torch {_torch_version()})",
            "minimum_deployment_target": settings.target_name,
            "compute_precision": settings.compute_precision,
            "added_op_converters": added_ops,
            "seconds": round(time.perf_counter() - start, 3),
        }
        recipe: dict[str, Any] = {"convert": convert_info}
        baseline: int | None = None
        if precision in _COMPRESSION_OPS:
            uncompressed = workdir / "uncompressed" / PACKAGE_ROOT
            mlmodel.save(str(uncompressed))
            baseline = _weights_bytes(uncompressed)
            progress(f"coreml {precision.value}: compressing weights")
            mlmodel, recipe["compression"] = self._compress(ct, mlmodel, precision, settings)
        package = workdir / PACKAGE_ROOT
        mlmodel.save(str(package))
        progress(f"coreml {precision.value}: checking the saved package's structure")
        structure = check_structure(ct, package, source, precision, settings.compute_precision, baseline)
        if not structure["passed"]:
            raise PackagingError("the Core ML package failed its structural check: " + "; ".join(structure["problems"]))
        recipe["structure"] = structure
        spec = int(structure["specification_version"])
        need = coreml_min_version(spec, host=str(ct.__version__))
        os_versions = coreml_os_versions(spec) if spec in COREML_SPEC_OS else None
        recipe["runtime_requirement"] = {"min_version": need.version, "reasons": list(need.reasons),
                                         "os_versions": os_versions}  # fmt: skip
        runtime: dict[str, Any] = {
            "package": "coremltools",
            "min_version": need.version,
            "built_with": {"coremltools": str(ct.__version__)},
            "arch": ["aarch64", "x86_64"],  # Apple silicon (and iOS devices), Intel Macs
            "platforms": ["macOS", "iOS"],
            "format": "mlprogram",
            "minimum_deployment_target": settings.target_name,
            "compute_precision": settings.compute_precision,
            "compute_units": settings.compute_units,
            "coreml_inputs": {s.name: coreml_dtype(s.dtype) for s in source.inputs},
            "coreml_outputs": {s.name: coreml_dtype(s.dtype) for s in source.outputs},
            "dim_bounds": bounds,  # the package refuses dims outside these ranges
            "specification_version": structure["specification_version"],
        }
        if "compression" in recipe:
            runtime["compression"] = {k: recipe["compression"][k] for k in ("method", "nbits", "granularity")}
        extra = {f"{PACKAGE_ROOT}/{p.relative_to(package).as_posix()}": p for p in _files(package)}
        manifest_file = extra.pop(MODEL_MEMBER)
        return [
            BuiltModel(
                manifest_file, MODEL_MEMBER, runtime, recipe, precision.value, extra_members=extra,
                inputs=source.inputs, outputs=source.outputs,
            )
        ]  # fmt: skip

    @staticmethod
    def _compress(ct: Any, mlmodel: Any, precision: Precision, settings: _Settings) -> tuple[Any, dict[str, Any]]:
        from coremltools.optimize.coreml import (
            OpLinearQuantizerConfig,
            OpPalettizerConfig,
            OptimizationConfig,
            linear_quantize_weights,
            palettize_weights,
        )

        start = time.perf_counter()
        info: dict[str, Any]
        try:
            with quiet("coremltools"):
                if precision is Precision.INT8_WEIGHTS:
                    op_config: Any = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                                             granularity="per_channel",
                                                             weight_threshold=settings.weight_threshold)  # fmt: skip
                    out = linear_quantize_weights(mlmodel, OptimizationConfig(global_config=op_config))
                    info = {"method": "linear_quantize_weights", "mode": "linear_symmetric", "nbits": 8,
                            "granularity": "per_channel"}  # fmt: skip
                else:
                    op_config = OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_tensor",
                                                   weight_threshold=settings.weight_threshold)  # fmt: skip
                    out = palettize_weights(mlmodel, OptimizationConfig(global_config=op_config))
                    info = {"method": "palettize_weights", "mode": "kmeans", "nbits": 4, "granularity": "per_tensor"}
        except Exception as e:  # coremltools raises ValueError/AssertionError for weights it cannot compress
            raise PackagingError(f"Core ML weight compression ({precision.value}) failed: {str(e)[:300]}") from e
        info.update({
            "tool": f"coremltools.optimize.coreml (coremltools {ct.__version__})",
            "weight_threshold": settings.weight_threshold,
            "activations": settings.compute_precision,
            "seconds": round(time.perf_counter() - start, 3),
        })  # fmt: skip
        return out, info

    def runner(self, built: BuiltModel) -> Runner:
        """A run function over ``ct.models.MLModel`` on the CPU (macOS only).

        Inputs are cast to the package's Core ML dtypes and outputs back to the manifest's.

        Raises:
            ValidationUnavailable: this host is not macOS (the structural check in ``build`` passed).
            PackagingError: Core ML cannot load the package.
        """
        if not predicts_here():
            raise ValidationUnavailable(numeric_unavailable_reason(), built.recipe.get("structure", {}))
        ct = import_coremltools()
        try:
            with quiet("coremltools"):
                model = ct.models.MLModel(str(built.path.parent), compute_units=ct.ComputeUnit.CPU_ONLY)
        except Exception as e:  # Core ML's compile or load error
            raise PackagingError(f"Core ML cannot load the built package: {str(e)[:300]}") from e
        in_types = dict(built.runtime["coreml_inputs"])
        out_dtypes = {s.name: s.dtype for s in (built.outputs or ())}

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            feeds = {k: cast_input(k, np.asarray(v), in_types[k]) for k, v in inputs.items() if k in in_types}
            raw = model.predict(feeds)
            return {k: np.asarray(raw[k]).astype(out_dtypes.get(k, np.asarray(raw[k]).dtype)) for k in out_dtypes}

        return run


def cast_input(name: str, array: np.ndarray, dtype: str) -> np.ndarray:
    """``array`` as the Core ML dtype of input ``name``, refusing integers the dtype cannot hold.

    Raises:
        PackagingError: an integer value outside int32.
    """
    target = np.dtype(dtype)
    if array.dtype == target:
        return np.ascontiguousarray(array)
    if target.kind == "i" and array.dtype.kind in "iu" and array.size:
        info = np.iinfo(target)
        if int(array.min()) < info.min or int(array.max()) > info.max:
            raise PackagingError(f"input {name}: values outside {dtype}, which the Core ML model takes")
    return np.ascontiguousarray(array.astype(target))


def _torch_version() -> str:
    import torch

    return str(torch.__version__).split("+")[0]
