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
from packagers.sources.data import choose_validation
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


def _onnx_specs(values: Sequence[Any]) -> tuple[TensorSpec, ...]:
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
        for i, d in enumerate(ttype.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(_dim_name(d.dim_param, value.name, i))
        specs.append(TensorSpec(value.name, dtype, tuple(dims)))
    return tuple(specs)


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
        onnx.checker.check_model(str(path))
        proto = onnx.load(str(path))
    except Exception as e:  # DecodeError, ValidationError, OSError: all mean an unusable file
        raise PackagingError(f"{path} is not a valid ONNX model: {type(e).__name__}: {str(e)[:300]}") from e
    initializers = {i.name for i in proto.graph.initializer}
    inputs = _onnx_specs([v for v in proto.graph.input if v.name not in initializers])
    outputs = _onnx_specs(list(proto.graph.output))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    producer = f"{proto.producer_name} {proto.producer_version}".strip()

    session = cpu_session(path, optimization="ORT_DISABLE_ALL")  # the graph as given is the reference
    out_names = [o.name for o in outputs]

    def reference(feeds: Mapping[str, np.ndarray]) -> Arrays:
        result = session.run(out_names, {k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return {n: np.asarray(r) for n, r in zip(out_names, result, strict=True)}

    validation, origin = choose_validation(inputs, options, data=data, vocab=_gather_vocab(proto.graph))
    del proto

    def export(workdir: Path) -> OnnxExport:
        start = time.perf_counter()
        target = workdir / "source.onnx"
        try:
            model = onnx.load(str(path))  # pulls in external data, written back as one file
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
        info={"file": path.name, "opset": opset, "producer": producer},
        export_fn=export,
    )
