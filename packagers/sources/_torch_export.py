"""torch -> ONNX export as one pure function (heavy imports inside).

The TorchScript exporter (``dynamo=False``) is tried first under ``exporter="auto"``: on the models
edgeship targets it exports a tiny BERT in about 0.3 s against 7-10 s for the dynamo exporter in
torch 2.13, with the same numbers, and it keeps the dynamic dims we name. When it fails (or is
removed from a future torch) the dynamo exporter is used and the run records which one it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from packagers._quiet import quiet
from packagers.sources.base import OnnxExport
from sdk.errors import PackagingError

__all__ = ["name_dynamic_dims", "torch2onnx"]


def name_dynamic_dims(model: Any, dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    """Give the graph inputs' and outputs' dynamic dims the names in ``dynamic_axes`` (in place)."""
    for value in [*model.graph.input, *model.graph.output]:
        axes = dynamic_axes.get(value.name)
        if not axes:
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, name in axes.items():
            if 0 <= axis < len(dims):
                dims[axis].Clear()
                dims[axis].dim_param = name


def _summary(e: BaseException) -> str:
    """One line from an exporter error (the dynamo exporter's are pages long)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if line.startswith("## Exception summary") and i + 1 < len(lines):
            return lines[i + 1][:300]
    return lines[0][:300] if lines else ""


def _export_torchscript(
    model: Any, args: tuple[Any, ...], path: Path, input_names: Sequence[str], output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]], opset: int,
) -> None:  # fmt: skip
    import torch

    torch.onnx.export(
        model, args, str(path), input_names=list(input_names), output_names=list(output_names),
        dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()}, opset_version=opset, dynamo=False,
        do_constant_folding=True, external_data=False,
    )  # fmt: skip


def _export_dynamo(
    model: Any, args: tuple[Any, ...], path: Path, input_names: Sequence[str], output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]], opset: int,
) -> None:  # fmt: skip
    import torch

    # AUTO lets torch.export find the real constraints (e.g. sequence <= max positions); the names
    # are put back on the graph afterwards.
    # The wrapper's forward takes *args, so the shapes are given for "args".
    shapes = {"args": tuple({axis: torch.export.Dim.AUTO for axis in dynamic_axes.get(n, {})} for n in input_names)}
    program = torch.onnx.export(
        model, args, input_names=list(input_names), output_names=list(output_names), dynamic_shapes=shapes,
        opset_version=opset, dynamo=True, external_data=False, optimize=True, verbose=False,
    )  # fmt: skip
    if program is None:
        raise RuntimeError("the dynamo exporter returned no program")
    program.save(str(path), external_data=False)


def torch2onnx(
    model: Any,
    example_inputs: tuple[Any, ...],
    path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int = 17,
    exporter: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> OnnxExport:
    """Export a torch module with a positional ``forward`` to one self-contained ONNX file.

    Args:
        model: the module, in eval mode; ``forward(*example_inputs)`` returns a tuple of tensors.
        example_inputs: tensors to trace with (batch first; use batch >= 2 so batch is not specialised).
        path: the .onnx file to write (weights inside, no external data).
        input_names: one name per example input.
        output_names: one name per returned tensor.
        dynamic_axes: tensor name -> {axis: dim name}, e.g. {"input_ids": {0: "batch", 1: "sequence"}}.
        opset: ONNX opset version.
        exporter: "auto" (TorchScript, then dynamo), "torchscript" or "dynamo".
        progress: called with a short line per step.

    Returns:
        The written file, its opset and which exporter produced it.

    Raises:
        PackagingError: the export failed, or the graph does not keep every named input and output.
    """
    import onnx

    report = progress or (lambda _line: None)
    order = {"auto": ("torchscript", "dynamo"), "torchscript": ("torchscript",), "dynamo": ("dynamo",)}.get(exporter)
    if order is None:
        raise PackagingError(f"exporter must be auto, torchscript or dynamo, got {exporter!r}")
    errors: list[str] = []
    for name in order:
        report(f"exporting to ONNX with the {name} exporter (opset {opset})")
        start = time.perf_counter()
        try:
            path.unlink(missing_ok=True)
            fn = _export_torchscript if name == "torchscript" else _export_dynamo
            with quiet("torch.onnx"):
                fn(model, example_inputs, path, input_names, output_names, dynamic_axes, opset)
            proto = onnx.load(str(path))
            name_dynamic_dims(proto, dynamic_axes)
            onnx.checker.check_model(proto)
        except Exception as e:  # any exporter failure: try the next one, report all if none works
            errors.append(f"{name}: {type(e).__name__}: {_summary(e)}")
            continue
        have_in = [v.name for v in proto.graph.input]
        have_out = [v.name for v in proto.graph.output]
        if have_in != list(input_names) or have_out != list(output_names):
            errors.append(
                f"{name}: graph has inputs {have_in} and outputs {have_out}, expected {list(input_names)} and "
                f"{list(output_names)} (an input the model ignores is dropped by the exporter)"
            )
            continue
        onnx.save_model(proto, str(path), save_as_external_data=False)
        opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
        return OnnxExport(path, int(opset_used), name, time.perf_counter() - start)
    raise PackagingError("torch -> ONNX export failed: " + "; ".join(errors))
