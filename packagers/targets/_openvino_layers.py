"""NNCF settings from ``PackageOptions`` and the layer names of an OpenVINO model, for the int8 recipe.

Layer names are OpenVINO friendly names, which are NNCF's node names: the names ``nncf.IgnoredScope``
takes and ``PackageOptions.float_layers`` holds for this target. ``exclude_op_types`` accepts ONNX op
types (``Conv``, ``MatMul``, ``Gemm``) as well as OpenVINO's (``Convolution``). nncf and openvino are
imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from packagers.layer_select import select_layers
from packagers.options import PackageOptions

__all__ = ["OP_ALIASES", "NncfSettings", "nncf_settings", "quantized_layers"]

OP_ALIASES: Mapping[str, tuple[str, ...]] = {
    "Conv": ("Convolution", "GroupConvolution"),
    "ConvTranspose": ("ConvolutionBackpropData", "GroupConvolutionBackpropData"),
    "Gemm": ("MatMul",),
    "Mul": ("Multiply",),
    "Sub": ("Subtract",),
    "Div": ("Divide",),
}
_WEIGHTED = {"Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData", "MatMul"}
_THROUGH = {"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze"}
_NOT_LAYERS = {"Parameter", "Constant", "Result", "FakeQuantize"}


@dataclass(frozen=True)
class NncfSettings:
    """Keyword arguments for ``nncf.quantize`` and what they mean, for the recipe."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    unmatched: tuple[str, ...] = ()


def nncf_settings(model: Any, options: PackageOptions, transformer: bool) -> NncfSettings:
    """Ignored scope, symmetric modes and SmoothQuant alpha for ``nncf.quantize`` on ``model``."""
    import nncf
    from nncf.common.quantization.structs import QuantizationScheme as scheme
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        QuantizationParameters,
    )

    layers = [(op.get_friendly_name(), op.get_type_name()) for op in model.get_ordered_ops()
              if op.get_type_name() not in _NOT_LAYERS]  # fmt: skip
    selection = select_layers(layers, options, OP_ALIASES)
    kwargs: dict[str, Any] = {}
    report: dict[str, Any] = {**selection.report(), "kept_float": list(selection.names)}
    if selection.names:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=list(selection.names), validate=False)
    advanced: dict[str, Any] = {}
    for side, value in (("activations", options.activation_symmetric), ("weights", options.weight_symmetric)):
        if value is not None:
            mode = scheme.SYMMETRIC if value else scheme.ASYMMETRIC
            advanced[f"{side}_quantization_params"] = QuantizationParameters(mode=mode)
            report[f"{side}_mode"] = "symmetric" if value else "asymmetric"
    alpha = options.smoothquant_alpha
    if alpha is not None:
        # NNCF smooths MatMul inputs under ModelType.TRANSFORMER only; -1 switches it off.
        advanced["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(matmul=alpha if alpha > 0 else -1)
        report["smoothquant_alpha"] = alpha if transformer else f"{alpha} (not applied: not a transformer graph)"
    if advanced:
        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(**advanced)
    return NncfSettings(kwargs, report, selection.unmatched)


def _weight_is_quantized(op: Any) -> bool:
    """Whether the weight input of ``op`` reaches an int8 constant or a FakeQuantize through decompression ops."""
    node = op.input_value(1).get_node()
    for _ in range(8):  # a few ops at most lie between a weight and its layer
        kind = node.get_type_name()
        if kind == "FakeQuantize":
            return True
        if kind not in _THROUGH:
            break
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant" and node.get_element_type().get_type_name() in ("i8", "u8")


def quantized_layers(model: Any) -> list[str]:
    """Friendly names of the convolution and MatMul layers whose weights NNCF quantized, graph order."""
    return [
        op.get_friendly_name() for op in model.get_ordered_ops()
        if op.get_type_name() in _WEIGHTED and op.get_input_size() > 1 and _weight_is_quantized(op)
    ]  # fmt: skip
