"""Layer names for ONNX Runtime's int8 recipes: which nodes stay float, which ones a build quantized.

The names are ONNX node names of the graph handed to the quantizer (after ``quant_pre_process``), the
names ``quantize_static`` / ``quantize_dynamic`` take in ``nodes_to_exclude`` and the ones
``PackageOptions.float_layers`` holds for this target. onnx is imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from packagers.layer_select import LayerSelection, select_layers
from packagers.options import PackageOptions

__all__ = ["dynamic_quantized_layers", "ensure_node_names", "onnx_layers", "resolve_float_nodes",
           "static_quantized_layers"]  # fmt: skip

# quant_pre_process fuses MatMul + Add into Gemm: a user excluding MatMul means those too
_OP_ALIASES = {"MatMul": ("Gemm",)}
_NOT_LAYERS = {"Constant", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# Ops that only move or reshape data: QDQ wraps them to keep int8 flowing, keeping one float gains nothing.
_DATA_MOVEMENT = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Slice", "Split", "Gather",
                  "MaxPool", "Pad", "Expand", "Identity", "Tile", "DepthToSpace", "SpaceToDepth", "Shape"}  # fmt: skip


def ensure_node_names(src: Path, dst: Path) -> Path:
    """``src``, or a copy at ``dst`` where every unnamed node got a unique name (``OpType_index``).

    Exporters may leave node names empty; ``nodes_to_exclude`` and the mixed-precision search name nodes.
    """
    import onnx

    model = onnx.load(str(src))
    if all(n.name for n in model.graph.node if n.op_type != "Constant"):
        return src
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if node.name:
            continue
        name, k = f"{node.op_type}_{i}", 0
        while name in used:
            k += 1
            name = f"{node.op_type}_{i}_{k}"
        node.name = name
        used.add(name)
    onnx.save_model(model, str(dst))
    return dst


def onnx_layers(path: Path) -> list[tuple[str, str]]:
    """(name, op type) of every computing node of the graph at ``path``, in graph order."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [(n.name, n.op_type) for n in model.graph.node if n.op_type not in _NOT_LAYERS and n.name]


def resolve_float_nodes(path: Path, options: PackageOptions, extra: list[str] | None = None) -> LayerSelection:
    """The nodes of ``path`` that ``options`` keeps in float (``float_layers``, ``exclude``, op types)."""
    selection = select_layers(onnx_layers(path), options, _OP_ALIASES)
    return selection if not extra else LayerSelection(
        tuple(dict.fromkeys([*selection.names, *extra])), selection.float_layers, selection.excluded,
        selection.unmatched,
    )  # fmt: skip


def static_quantized_layers(path: Path, op_types: Any = None) -> list[str]:
    """Nodes of a QDQ graph that compute on dequantized int8 inputs (data movement aside), graph order.

    ``op_types``: only these (a recipe that quantizes only them: the others read dequantized outputs in float).
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [
        n.name for n in model.graph.node
        if n.op_type not in _NOT_LAYERS | _DATA_MOVEMENT and n.name and any(i in dequantized for i in n.input)
        and (op_types is None or n.op_type in op_types)
    ]  # fmt: skip


def dynamic_quantized_layers(base: Path, built: Path, op_types: Any) -> list[str]:
    """Nodes of ``base`` of ``op_types`` that ``quantize_dynamic`` replaced by an integer op in ``built``.

    It names the integer node ``NAME_quant`` (a Gemm first becomes the MatMul ``NAME_MatMul``).
    """
    import onnx

    names = {n.name for n in onnx.load(str(built), load_external_data=False).graph.node}
    return [
        name for name, op in onnx_layers(base)
        if op in op_types and (f"{name}_quant" in names or f"{name}_MatMul_quant" in names)
    ]  # fmt: skip
