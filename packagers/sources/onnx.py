"""The ``onnx`` input kind: an ``.onnx`` file, run by onnxruntime as its own reference.

Its inputs and outputs come from the graph (unnamed or odd dim names are made into valid ones), and
random validation ids stay within the embedding tables the graph indexes. onnx and onnxruntime are
imported inside the functions.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from packagers._ort_session import cpu_session
from packagers.options import PackageOptions
from packagers.sources.base import Arrays, OnnxExport, Source, dtype_name
from packagers.sources.data import choose_validation, generated_hint, guessed_dims
from sdk.errors import PackagingError
from sdk.manifest import TensorSpec

__all__ = ["onnx_source"]

_DIM_OK = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _dim_name(raw: str, tensor: str, index: int) -> str:
    if raw and _DIM_OK.fullmatch(raw):
        return raw
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", raw or f"{tensor}_dim{index}")
    if not cleaned or not (cleaned[0].isalpha() or cleaned[0] == "_"):
        cleaned = f"d_{cleaned}"
    return cleaned[:64]


def _dim(d: Any, tensor: str, index: int) -> int | str:
    """A positive ``dim_value``; else (a name, or -1 / 0 / nothing: dynamic) a valid dim name."""
    if d.HasField("dim_value") and d.dim_value > 0:
        return int(d.dim_value)
    return _dim_name(d.dim_param, tensor, index)


def _onnx_specs(
    values: Sequence[Any], shapes: Mapping[str, Sequence[int | str]] | None = None
) -> tuple[TensorSpec, ...]:
    """The specs of graph values as exporters write them.

    A dim with neither value nor name, or with a value of -1 or 0 (written by several exporters for a
    dynamic dim), is dynamic and gets a generated name (``x_dim2``). A value with no shape at all takes it
    from ``shapes``; without one it is refused with the flags that give it.
    """
    from onnx import helper

    specs = []
    for value in values:
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise PackagingError(f"ONNX value {value.name!r} is not a tensor (sequences and maps are not supported)")
        try:
            dtype = dtype_name(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        except (KeyError, TypeError) as e:
            raise PackagingError(f"ONNX value {value.name!r} has an unsupported element type {ttype.elem_type}") from e
        dims: list[int | str] = []
        if not ttype.HasField("shape"):
            if value.name not in (shapes or {}):
                raise PackagingError(
                    f"ONNX input {value.name!r} has no shape in the graph: give its shape with --input-shape "
                    f"{value.name}=1,... (input_shapes=...) or real inputs with --calibration"
                )
            dims = list((shapes or {})[value.name])
        dims += [_dim(d, value.name, i) for i, d in enumerate(ttype.shape.dim)]
        specs.append(TensorSpec(value.name, dtype, tuple(dims)))
    return tuple(specs)


def _name_unset_dims(proto: Any) -> bool:
    """Give every input/output dim stored as -1, 0 or nothing the name its spec has; True if one changed.

    onnxruntime reads ``dim_value: 0`` as a fixed zero, so the graph itself is fixed up, not just the specs.
    """
    changed = False
    initializers = {i.name for i in proto.graph.initializer}
    for value in [*(v for v in proto.graph.input if v.name not in initializers), *proto.graph.output]:
        for i, d in enumerate(value.type.tensor_type.shape.dim):
            if not d.dim_param and not (d.HasField("dim_value") and d.dim_value > 0):
                d.dim_param = _dim_name("", value.name, i)  # replaces the dim_value (a oneof)
                changed = True
    return changed


def _unshaped(proto: Any) -> set[str]:
    """Graph inputs and outputs that have no shape at all."""
    values = [*proto.graph.input, *proto.graph.output]
    return {v.name for v in values if v.type.HasField("tensor_type") and not v.type.tensor_type.HasField("shape")}


def _set_shapes(proto: Any, specs: Sequence[TensorSpec]) -> None:
    """Write the specs' shapes into the graph's inputs/outputs that have none, and name the unset dims."""
    by_name = {s.name: s for s in specs}
    for value in [*proto.graph.input, *proto.graph.output]:
        spec = by_name.get(value.name)
        if spec is not None and not value.type.tensor_type.HasField("shape"):
            shape = value.type.tensor_type.shape
            shape.SetInParent()
            for d in spec.shape:
                dim = shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                else:
                    dim.dim_param = d
    _name_unset_dims(proto)


def _inferred_shapes(proto: Any, inputs: Sequence[TensorSpec], names: Sequence[str]) -> dict[str, list[int | str]]:
    """The shapes ONNX shape inference gives the values ``names`` once the inputs' shapes are set (unknown dims
    named); those it cannot infer are left out."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    _set_shapes(model, inputs)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a refinement: without it every dim is named
        return {}
    out: dict[str, list[int | str]] = {}
    for value in [*inferred.graph.output, *inferred.graph.value_info]:
        if value.name in names and value.name not in out and value.type.tensor_type.HasField("shape"):
            out[value.name] = [_dim(d, value.name, i) for i, d in enumerate(value.type.tensor_type.shape.dim)]
    return out


def _gather_vocab(graph: Any) -> dict[str, int]:
    """Input name -> rows of the initializer it indexes through a Gather (embedding tables)."""
    sizes = {init.name: int(init.dims[0]) for init in graph.initializer if len(init.dims) >= 1}
    vocab: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in sizes:
            vocab[node.input[1]] = min(vocab.get(node.input[1], 1 << 62), sizes[node.input[0]])
    return vocab


def onnx_source(
    path: Path,
    task: str | None,
    data: Arrays | None,
    options: PackageOptions,
    progress: Callable[[str], None],
) -> Source:
    import onnx
    import onnxruntime as ort

    progress(f"checking ONNX model {path}")
    try:
        proto = onnx.load(str(path))
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as e:
            # A graph input/output without a shape (exporters write them; onnxruntime runs them) is named here.
            if not ("'shape' of 'type' is required" in str(e) and _unshaped(proto)):
                raise
    except Exception as e:  # DecodeError, ValidationError, OSError: all mean an unusable file
        raise PackagingError(f"{path} is not a valid ONNX model: {type(e).__name__}: {str(e)[:300]}") from e
    initializers = {i.name for i in proto.graph.initializer}
    graph_inputs = [v for v in proto.graph.input if v.name not in initializers]
    ranks = {k: len(v) for k, v in (options.input_shapes or {}).items()}
    ranks.update({k: np.asarray(v).ndim for k, v in (data or {}).items()})
    inputs = _onnx_specs(graph_inputs, {k: [_dim_name("", k, i) for i in range(r)] for k, r in ranks.items()})
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    producer = f"{proto.producer_name} {proto.producer_version}".strip()

    fixed = _name_unset_dims(proto)
    # the graph as given is the reference (with unset dims named, when it had any)
    session = cpu_session(proto.SerializeToString() if fixed else path, optimization="ORT_DISABLE_ALL")
    out_names = [o.name for o in proto.graph.output]

    def reference(feeds: Mapping[str, np.ndarray]) -> Arrays:
        result = session.run(out_names, {k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return {n: np.asarray(r) for n, r in zip(out_names, result, strict=True)}

    guessed = guessed_dims(inputs, options) if data is None else {}
    if guessed:
        progress("generating validation inputs with guessed dynamic dims (" + generated_hint(guessed, inputs, options)
                 + ")")  # fmt: skip
    validation, origin = choose_validation(inputs, options, data=data, vocab=_gather_vocab(proto.graph))
    unshaped = [o.name for o in proto.graph.output if o.name in _unshaped(proto)]
    out_shapes = _inferred_shapes(proto, inputs, unshaped) if unshaped else {}
    if any(n not in out_shapes for n in unshaped):  # not inferred: the rank one sample gives, every dim named
        try:
            first = reference({k: v[:1] for k, v in validation.items()})
        except Exception as e:  # onnxruntime's own error types
            hint = f" ({generated_hint(guessed, inputs, options)})" if guessed else ""
            raise PackagingError(f"{path.name} failed on the validation inputs: {str(e)[:300]}{hint}") from e
        for n in unshaped:
            out_shapes.setdefault(n, [_dim_name("", n, i) for i in range(first[n].ndim)])
    outputs = _onnx_specs(list(proto.graph.output), out_shapes)
    del proto

    def export(workdir: Path) -> OnnxExport:
        start = time.perf_counter()
        target = workdir / "source.onnx"
        try:
            model = onnx.load(str(path))  # pulls in external data, written back as one file
            _set_shapes(model, (*inputs, *outputs))
            onnx.save_model(model, str(target), save_as_external_data=False)
        except (ValueError, OSError) as e:
            raise PackagingError(f"cannot copy {path} into one ONNX file (over 2 GB?): {e}") from e
        return OnnxExport(target, opset, "given", time.perf_counter() - start)

    return Source(
        kind="onnx",
        description=f"ONNX model {path.name}",
        inputs=inputs,
        outputs=outputs,
        reference=reference,
        reference_name=f"onnxruntime {ort.__version__} fp32 (original .onnx)",
        validation_inputs=validation,
        data_origin=origin,
        task=task,
        info={
            "file": path.name,
            "opset": opset,
            "producer": producer,
            **({"guessed_dims": guessed} if guessed else {}),
        },
        export_fn=export,
    )
