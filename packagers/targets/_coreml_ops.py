"""Torch op converters coremltools 9 lacks for the graphs edgeship traces (BERT-family transformers).

Under torch 2.13 and transformers 5, tracing a ``BertModel`` (or ``BertForSequenceClassification``,
``RobertaModel``, ``DistilBertModel``) records ``aten::new_ones`` in the attention-mask code
(``transformers.masking_utils``: ``q_idx.new_ones((), dtype=torch.bool)``), which coremltools 9 has
no converter for. Every other op of those traced graphs converts, ``aten::Int`` included (coremltools
registers it as ``int``), so only ``new_ones`` is added here. ``torch.export`` graphs fail earlier,
on fx-level ``__and__`` nodes that no op converter can reach, which is why the Core ML target traces
with ``torch.jit.trace``.

``register()`` is idempotent and never replaces a converter coremltools already has (a later
coremltools that ships its own ``new_ones`` keeps it). Import this module only after coremltools.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["ADDED_OPS", "register"]

ADDED_OPS = ("new_ones",)
_lock = threading.Lock()
_registered: list[str] = []  # the ops this module registered, for the build recipe


def new_ones(context: Any, node: Any) -> None:
    """``Tensor.new_ones(size, dtype=None, ...)``: a tensor of ones, of the source tensor's dtype by default."""
    from coremltools.converters.mil.frontend.torch.ops import NUM_TO_DTYPE_STRING, _get_inputs
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    inputs = _get_inputs(context, node, min_expected=2)
    source, size = inputs[0], inputs[1]
    dtype = inputs[2] if len(inputs) > 2 else None
    if dtype is not None and dtype.val is not None:
        dtype_name = NUM_TO_DTYPE_STRING[int(dtype.val)]
    else:
        dtype_name = types.builtin_to_string(source.dtype)
    if isinstance(size, list):  # a dynamic size arrives as a list of scalars
        size = mb.concat(values=size, axis=0)
    if size.val is not None:
        # A size known at conversion time (transformers asks for a scalar, size ()) becomes a constant:
        # Core ML's fill cannot make a rank-0 tensor.
        shape = tuple(int(d) for d in np.asarray(size.val).reshape(-1))
        np_dtype = types.nptype_from_builtin(types.string_to_builtin(dtype_name))
        context.add(mb.const(val=np.ones(shape, dtype=np_dtype), name=node.name))
        return
    ones = mb.fill(shape=size, value=1.0)
    context.add(mb.cast(x=ones, dtype=dtype_name, name=node.name))


def register() -> list[str]:
    """Register the missing converters once; returns the op names this module added.

    Ops coremltools already converts are left alone, so calling this again, or on a coremltools
    that has them, changes nothing.
    """
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op

    with _lock:
        known = _TORCH_OPS_REGISTRY.name_to_func_mapping
        # the registry keys a converter by its function's name
        for name, func in (("new_ones", new_ones),):
            if name in known:
                continue
            register_torch_op(func)
            _registered.append(name)
        return list(_registered)
