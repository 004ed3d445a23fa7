"""Mixed precision for TFLite: name the ops of a model as layers and keep chosen ones in float.

ai-edge-quantizer picks a recipe per op by matching a regex against the op's *scope* (its output
tensor names joined by ``;``, which litert-torch derives from the torch module path, e.g.
``__main__.Net/torch.nn.modules.linear.Linear_fc2;1;``). A layer here is one (op kind, scope) pair,
named readably from the module path: ``fully_connected:inner.fc2`` (``#2`` when two scopes read alike).
The signatures of a bucketed model share the module paths, so one name covers the op in every bucket.

``PackageOptions.float_layers`` takes these names, or regexes searched in them (``fc2``,
``encoder\\.1\\.``); each selected layer gets a ``NO_QUANTIZE`` recipe entry anchored on its exact scope.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdk.errors import PackagingError

__all__ = ["Layer", "keep_float", "list_layers", "quantized_layer_names", "select"]

_QDQ = {"QUANTIZE", "DEQUANTIZE"}  # inserted by the quantizer around float ops; not layers of the model
_INT_TYPES = {3, 7, 9}  # schema TensorType UINT8, INT16, INT8
# Ops that only move int8 values (no arithmetic): keeping one in float costs a QUANTIZE/DEQUANTIZE pair and gains
# nothing, so quantized_layer_names leaves them out of the search (float_layers may still name them).
_MOVES = {"RESHAPE", "TRANSPOSE", "CONCATENATION", "SLICE", "STRIDED_SLICE", "GATHER", "SQUEEZE", "EXPAND_DIMS",
          "PACK", "UNPACK", "SPLIT", "PAD", "BROADCAST_TO", "SELECT_V2"}  # fmt: skip


@dataclass(frozen=True)
class Layer:
    name: str  # "fully_connected:inner.fc2"
    kind: str  # the ai-edge-quantizer op name, "FULLY_CONNECTED"
    scope: str  # what the recipe regexes match (in the first signature)
    pattern: str  # a regex matching the scope in every signature


def _readable(scope: str, signature: str) -> str:
    """The module path of an op's first output tensor: ``pkg.Net_inner/torch...Linear_fc2;1;`` -> ``inner.fc2``.

    A tensor named after the signature's output (``seq_16_output_0``) reads ``output_0``.
    """
    first = scope.split(";", 1)[0]
    if "/" not in first:
        return first.removeprefix(signature + "_") or first
    parts = []
    for segment in first.split("/"):
        tail = segment.rsplit(".", 1)[-1].lstrip("_")
        parts.append(tail.split("_", 1)[1] if "_" in tail else "")
    return ".".join(p for p in parts if p) or first


def _ops(model: Any) -> Iterable[tuple[str, str, Any, list[Any]]]:
    """(kind, scope, op, tensors) of the first signature's subgraph, in graph order."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    subgraph = model.subgraphs[0]
    for op in subgraph.operators:
        code = model.operatorCodes[op.opcodeIndex].builtinCode
        kind = tfl.TFL_OP_CODE_TO_NAME.get(code)
        if kind is None:
            continue
        name = getattr(kind, "value", str(kind))
        yield name, tfl.get_op_scope(op, subgraph.tensors), op, subgraph.tensors


def _read(path: Path) -> Any:
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    return tfl.read_model(str(path))


def _signature(model: Any) -> str:
    raw = model.subgraphs[0].name
    return raw.decode() if isinstance(raw, bytes) else str(raw or "")


def _pattern(scope: str, signature: str) -> str:
    """A regex for ``scope`` in every signature: the tensor counters (``;4;``) and the signature's own names
    (``seq_16_output_0``) differ from one signature to the next, the module paths do not."""
    parts = []
    for part in re.split(r";\d*;", scope):
        escaped = re.escape(part)
        parts.append(escaped.replace(re.escape(signature), "[^;/]*") if signature else escaped)
    return "^" + r";\d*;".join(parts) + "$"


def _named(model: Any) -> list[tuple[Layer, Any, list[Any]]]:
    """Every op of the first signature with its layer, in graph order. Ops of one kind whose scopes differ only
    in their tensor counters are one layer (a recipe cannot tell them apart in the other signatures)."""
    signature = _signature(model)
    layers: dict[tuple[str, str], Layer] = {}
    used: set[str] = set()
    out = []
    for kind, scope, op, tensors in _ops(model):
        if kind in _QDQ or not scope:
            continue
        pattern = _pattern(scope, signature)
        layer = layers.get((kind, pattern))
        if layer is None:
            base = f"{kind.lower()}:{_readable(scope, signature)}"
            name, k = base, 1
            while name in used:
                k += 1
                name = f"{base}#{k}"
            used.add(name)
            layer = layers[(kind, pattern)] = Layer(name, kind, scope, pattern)
        out.append((layer, op, tensors))
    return out


def list_layers(path: Path) -> list[Layer]:
    """The float model's layers, in graph order."""
    return list({layer.name: layer for layer, _, _ in _named(_read(path))}.values())


def quantized_layer_names(path: Path) -> list[str]:
    """Names of the layers of a built model that compute on integer-quantized tensors (data moves left out)."""
    names: list[str] = []
    for layer, op, tensors in _named(_read(path)):
        if layer.kind in _MOVES:
            continue
        indices = [i for i in (*op.inputs, *op.outputs) if i >= 0]
        if any(int(tensors[i].type) in _INT_TYPES for i in indices) and layer.name not in names:
            names.append(layer.name)
    return names


def select(layers: Sequence[Layer], wanted: Sequence[str]) -> list[Layer]:
    """The layers ``wanted`` names: exact names, else regexes searched in the names.

    Raises:
        PackagingError: an entry that is not a valid regex or matches no layer (the message shows some names).
    """
    by_name = {layer.name: layer for layer in layers}
    chosen: dict[str, Layer] = {}
    for entry in wanted:
        if entry in by_name:
            chosen[entry] = by_name[entry]
            continue
        try:
            pattern = re.compile(entry)
        except re.error as e:
            raise PackagingError(f"float_layers entry {entry!r} is neither a layer name nor a regex: {e}") from e
        hits = [layer for layer in layers if pattern.search(layer.name)]
        if not hits:
            sample = ", ".join(layer.name for layer in layers[:5])
            raise PackagingError(
                f"float_layers entry {entry!r} matches no layer of the TFLite model ({len(layers)} layers, "
                f"e.g. {sample}); names come from quantized_layers() or report.json"
            )
        chosen.update({layer.name: layer for layer in hits})
    return [layer for layer in layers if layer.name in chosen]


def keep_float(quantizer: Any, layers: Sequence[Layer]) -> None:
    """Add a NO_QUANTIZE recipe entry for each layer, on its exact scope and op kind (later entries win)."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    for layer in layers:
        quantizer._recipe_manager.add_quantization_config(  # the public helpers all quantize; this sets a scope
            layer.pattern, qtyping.TFLOperationName(layer.kind),
            algorithm_key=AlgorithmName.NO_QUANTIZE,
        )  # fmt: skip
