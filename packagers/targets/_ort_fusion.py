"""Transformer attention fusion for the ONNX Runtime target: one ``com.microsoft.Attention`` node per layer.

Why: the exported attention of a BERT-family encoder is ~20 small ops per layer (the projections, reshapes,
transposes, scaling, mask, softmax, context), and ``quantize_dynamic`` on that graph quantizes the Q/K/V
projections as three separate MatMulInteger chains that ONNX Runtime cannot fuse again at load. With the
layer rewritten as ``Attention`` (Q/K/V weights packed into one [hidden, 3*hidden] matrix), the quantizer
turns it into ``QAttention``: one int8 GEMM for the three projections and ORT's fused attention kernel.
On all-MiniLM-L6-v2 at batch 1, sequence 128, one thread this takes the dynamic int8 graph from 12.0 to
7.5 ms (``benchmarks/bert_quantization.py``).

``onnxruntime.transformers.optimizer`` has such a fusion, but it does not recognise the attention that
torch's TorchScript exporter writes for transformers 5 (scale split over Q and K, a ``Where`` mask and an
``IsNaN`` guard after the softmax), so this module matches the structure itself, loosely (by following
data from each ``Softmax`` to the weight MatMuls), and never trusts the match: the fused graph is run
beside the original on the sample inputs and refused unless the outputs agree (``FusionError``).
A graph without a recognisable attention (a CNN, an MLP) is left alone: ``fused == 0``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sdk.errors import PackagingError

__all__ = ["FusionError", "fuse_attention"]

MASK_INPUT = "attention_mask"
_AGREEMENT = 1e-3  # max |fused - original| / max(|original|) on the samples for the fusion to be kept


class FusionError(PackagingError):
    """The fused graph does not compute what the original does (or ORT cannot load it)."""


class _Graph:
    """Producer/consumer/constant look-ups over an ONNX graph."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model = model
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.inits = {t.name: t for t in model.graph.initializer}
        self._np = numpy_helper

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is an initializer or a ``Constant`` node's output.

        ``Identity`` is followed: the TorchScript exporter shares equal initializers through it.
        """
        while (node := self.producer.get(name)) is not None and node.op_type == "Identity":
            name = node.input[0]
        if name in self.inits:
            return np.asarray(self._np.to_array(self.inits[name]))
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return np.asarray(self._np.to_array(attr.t))
        return None

    def node_of(self, name: str, op: str) -> Any | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None


def _perm(node: Any) -> tuple[int, ...]:
    return tuple(next((list(a.ints) for a in node.attribute if a.name == "perm"), []))


def _strip_scale(g: _Graph, name: str) -> tuple[str, float]:
    """Follow ``name`` up through Mul/Div by scalar constants; the tensor before them and the product."""
    scale = 1.0
    while True:
        node = g.producer.get(name)
        if node is None or node.op_type not in ("Mul", "Div"):
            return name, scale
        values = [g.const(i) for i in node.input]
        if node.op_type == "Div" and values[1] is not None and values[1].size == 1:
            scale, name = scale / float(values[1].reshape(-1)[0]), node.input[0]
        elif node.op_type == "Mul" and any(v is not None and v.size == 1 for v in values):
            k = 0 if values[0] is not None and values[0].size == 1 else 1
            scale, name = scale * float(np.asarray(values[k]).reshape(-1)[0]), node.input[1 - k]
        else:
            return name, scale


def _heads(g: _Graph, reshape: Any, hidden: int) -> int | None:
    """The head count of a [B, S, heads, head_size] Reshape (constant shape, or a Concat ending in constants)."""
    shape = g.const(reshape.input[1])
    candidates: list[np.ndarray] = []
    if shape is not None:
        candidates.append(shape.reshape(-1))
    else:
        concat = g.node_of(reshape.input[1], "Concat")
        if concat is not None:
            parts = [g.const(i) for i in concat.input]
            tail = [p.reshape(-1) for p in parts[-2:] if p is not None]
            if tail:
                candidates.append(np.concatenate(tail))
    for values in candidates:
        if len(values) < 2 or int(values[-1]) <= 0:
            continue
        heads, size = int(values[-2]), int(values[-1])
        if heads == -1 and hidden % size == 0:  # [B, S, -1, head_size]
            return hidden // size
        if heads > 0 and heads * size == hidden:
            return heads
    return None


_Projection = tuple[str, np.ndarray, np.ndarray, int, str]  # input, weight, bias, heads, MatMul node name


def _projection(g: _Graph, name: str, perm: tuple[int, ...]) -> _Projection | None:
    """``Transpose(perm)(Reshape(Add(MatMul(x, W), b)))`` -> (x, W, b, heads, MatMul name)."""
    transpose = g.node_of(name, "Transpose")
    if transpose is None or _perm(transpose) != perm:
        return None
    reshape = g.node_of(transpose.input[0], "Reshape")
    add = g.node_of(reshape.input[0], "Add") if reshape is not None else None
    if reshape is None or add is None:
        return None
    for k in (0, 1):
        bias, matmul = g.const(add.input[k]), g.node_of(add.input[1 - k], "MatMul")
        if matmul is None:
            continue
        weight = g.const(matmul.input[1])
        if bias is not None and weight is not None and weight.ndim == 2 and bias.shape == (weight.shape[1],):
            heads = _heads(g, reshape, int(weight.shape[1]))
            return (matmul.input[0], weight, bias, heads, matmul.name) if heads else None
    return None


def _key(g: _Graph, name: str) -> _Projection | None:
    """K transposed to [B, heads, head_size, S]: one Transpose(0,2,3,1), or (0,2,1,3) then (0,1,3,2)."""
    found = _projection(g, name, (0, 2, 3, 1))
    if found is None:
        outer = g.node_of(name, "Transpose")
        if outer is not None and _perm(outer) == (0, 1, 3, 2):
            found = _projection(g, outer.input[0], (0, 2, 1, 3))
    return found


def _match(g: _Graph, softmax: Any) -> dict[str, Any] | None:
    """The attention around ``softmax``, or None where the structure is not the one fused here."""
    probs = softmax.output[0]
    for node in g.consumers.get(probs, []):  # Where(IsNaN(p), 0, p): the exporter's guard for empty rows
        if node.op_type == "Where" and node.input[2] == probs:
            probs = node.output[0]
    context = next((n for n in g.consumers.get(probs, []) if n.op_type == "MatMul" and n.input[0] == probs), None)
    if context is None:
        return None
    merge = context
    for _ in range(3):  # the exporter may add a 4-D -> 4-D Reshape before the head merge
        merge = next((n for n in g.consumers.get(merge.output[0], []) if n.op_type in ("Transpose", "Reshape")), None)
        if merge is None or merge.op_type == "Transpose":
            break
    if (
        merge is None or merge.op_type != "Transpose" or _perm(merge) != (0, 2, 1, 3)
    ):  # (Shape consumers, reading the size, are left dead)
        return None
    out = next((n for n in g.consumers.get(merge.output[0], []) if n.op_type == "Reshape"), None)
    if out is None:
        return None
    scores, post_scale = _strip_scale(g, softmax.input[0])
    masked = False
    add = g.node_of(scores, "Add")
    if add is not None and g.const(add.input[0]) is None and g.const(add.input[1]) is None:
        masked = True
        for k in (0, 1):
            if g.node_of(_strip_scale(g, add.input[k])[0], "MatMul") is not None:
                scores = add.input[k]
                break
    scores, scale = _strip_scale(g, scores)
    qk = g.node_of(scores, "MatMul")
    if qk is None:
        return None
    q_name, q_scale = _strip_scale(g, qk.input[0])
    k_name, k_scale = _strip_scale(g, qk.input[1])
    q, key, v = _projection(g, q_name, (0, 2, 1, 3)), _key(g, k_name), _projection(g, context.input[1], (0, 2, 1, 3))
    if q is None or key is None or v is None or not q[0] == key[0] == v[0] or not q[3] == key[3] == v[3]:
        return None
    if not q[1].shape == key[1].shape == v[1].shape:
        return None
    return {"input": q[0], "output": out.output[0], "heads": q[3], "scale": scale * q_scale * k_scale * post_scale,
            "weight": np.concatenate([q[1], key[1], v[1]], axis=1), "bias": np.concatenate([q[2], key[2], v[2]]),
            "masked": masked, "name": softmax.name, "matmuls": [q[4], key[4], v[4]]}  # fmt: skip


def _prune(model: Any) -> int:
    """Remove nodes (and initializers) nothing reaches the outputs through; returns the nodes removed."""
    needed = {o.name for o in model.graph.output}
    keep: list[Any] = []
    for node in reversed(list(model.graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
            for attr in node.attribute:  # subgraphs read outer names
                if attr.type == attr.GRAPH:
                    needed.update(i for n in attr.g.node for i in n.input)
    removed = len(model.graph.node) - len(keep)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    inits = [t for t in model.graph.initializer if t.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return removed


def fuse_attention(src: Path, dst: Path, feeds: Mapping[str, np.ndarray], keep: Collection[str] = ()) -> dict[str, Any]:
    """Write ``src`` with each recognised attention block as one ``com.microsoft.Attention`` node to ``dst``.

    Args:
        src: the float ONNX graph (not modified).
        dst: where the fused graph goes (written only when something was fused).
        feeds: sample inputs; the fused graph must reproduce ``src``'s outputs on them.
        keep: node names that must stay as they are (layers kept in float by name): an attention block
            whose Q/K/V MatMul is one of them is not fused.

    Returns:
        ``{"fused": n, ...}``: layers fused (0: nothing recognised, ``dst`` not written), heads, nodes
        removed and the largest relative output difference on ``feeds``.

    Raises:
        FusionError: the fused graph does not load or disagrees with ``src`` (a structure matched
            that is not what this fusion assumes).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    g = _Graph(model)
    matches = [m for s in model.graph.node if s.op_type == "Softmax" and (m := _match(g, s)) is not None]
    matches = [m for m in matches if not set(m["matmuls"]) & set(keep)]
    inputs = {i.name for i in model.graph.input}
    if not matches or (any(m["masked"] for m in matches) and MASK_INPUT not in inputs):
        return {"fused": 0, "note": "no attention block of the fused form" if not matches else
                f"attention is masked but the graph has no {MASK_INPUT!r} input"}  # fmt: skip
    nodes = list(model.graph.node)
    mask = ""
    if any(m["masked"] for m in matches):  # the raw 0/1 padding mask, as int32, is what Attention reads
        mask = f"{MASK_INPUT}_int32_for_attention"
        nodes.insert(0, helper.make_node("Cast", [MASK_INPUT], [mask], to=TensorProto.INT32, name=f"{mask}_Cast"))
    for i, m in enumerate(matches):
        w, b = f"attention_{i}_qkv_weight", f"attention_{i}_qkv_bias"
        model.graph.initializer.extend([numpy_helper.from_array(m["weight"].astype(np.float32), w),
                                        numpy_helper.from_array(m["bias"].astype(np.float32), b)])  # fmt: skip
        producer = g.producer[m["output"]]
        fused = helper.make_node("Attention", [m["input"], w, b, mask if m["masked"] else ""], [m["output"]],
                                 name=f"Attention_{i}", domain="com.microsoft", num_heads=m["heads"],
                                 scale=float(m["scale"]))  # fmt: skip
        nodes[nodes.index(producer)] = fused
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    removed = _prune(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst))
    difference = _agreement(src, dst, feeds)
    if not difference <= _AGREEMENT:
        dst.unlink(missing_ok=True)
        raise FusionError(f"attention fusion changed the outputs (relative difference {difference:.2e} > "
                          f"{_AGREEMENT}); the graph is used unfused")  # fmt: skip
    return {"fused": len(matches), "op": "com.microsoft.Attention", "heads": sorted({m["heads"] for m in matches}),
            "masked": any(m["masked"] for m in matches), "nodes_removed": removed,
            "max_relative_difference": float(difference)}  # fmt: skip


def _agreement(src: Path, dst: Path, feeds: Mapping[str, np.ndarray]) -> float:
    """The largest |fused - original| / max|original| over the outputs, on up to 4 samples of ``feeds``."""
    from packagers._ort_session import cpu_session

    try:
        before = cpu_session(src, what="the unfused graph")
        after = cpu_session(dst, what="the fused graph")
    except PackagingError as e:
        raise FusionError(f"the attention-fused graph does not load: {e}") from e
    names = {i.name for i in before.get_inputs()}
    sample = {k: np.ascontiguousarray(v[:4]) for k, v in feeds.items() if k in names}
    worst = 0.0
    for a, b in zip(before.run(None, sample), after.run(None, sample), strict=True):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)))
    return worst


# Keys for quantize_dynamic's extra_options on a fused graph: shape inference gives no type for the
# outputs of com.microsoft ops, which are float here.
def quantize_extra_options() -> dict[str, Any]:
    """``quantize_dynamic`` extra options that let it quantize ``Attention`` graphs (as ``QAttention``)."""
    from onnx import TensorProto

    return {"DefaultTensorType": TensorProto.FLOAT}


def try_fuse(
    src: Path, dst: Path, feeds: Mapping[str, np.ndarray], keep: Collection[str] = ()
) -> tuple[Path, dict[str, Any]]:
    """``fuse_attention`` where it applies: the fused graph and its info, else ``src`` and why not."""
    try:
        info = fuse_attention(src, dst, feeds, keep)
    except FusionError as e:
        return src, {"fused": 0, "note": str(e)[:300]}
    return (dst if info["fused"] else src), info


# ONNX Runtime's SkipLayerNormFusion (Add + LayerNormalization -> SkipLayerNormalization, applied at
# ORT_ENABLE_EXTENDED and up) makes that pair ~6x slower on the CPU EP of onnxruntime 1.32 (40 us -> 250 us
# at 128 x 384, measured on AVX512 VNNI): 1.3 ms of a 12 ms MiniLM layer stack. The graph is optimised
# once here without it and loaded on the device at ORT_ENABLE_BASIC, which does not re-apply it.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
OFFLINE_LEVEL = "ORT_ENABLE_EXTENDED"
DEVICE_LEVEL = "ORT_ENABLE_BASIC"


def optimize_offline(src: Path, dst: Path) -> dict[str, Any]:
    """Write ``src`` optimised by onnxruntime (``OFFLINE_LEVEL`` without ``DISABLED_OPTIMIZERS``) to ``dst``.

    The written graph holds CPU-EP contrib ops (``DynamicQuantizeMatMul``, ``QAttention``...): the bundle
    is for onnxruntime's CPU execution provider, and its ``runtime.min_version`` is derived from them.

    Raises:
        FusionError: onnxruntime could not optimise the graph.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OFFLINE_LEVEL)
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(DISABLED_OPTIMIZERS))  # fmt: skip
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise FusionError(f"onnxruntime could not optimise the fused graph: {str(e)[:300]}") from e
    return {"level": OFFLINE_LEVEL, "disabled_optimizers": list(DISABLED_OPTIMIZERS), "device_level": DEVICE_LEVEL,
            "onnxruntime": str(ort.__version__)}  # fmt: skip
