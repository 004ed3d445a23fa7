"""The ``torch`` input kind: a ``torch.nn.Module`` with example inputs.

The module is wrapped so its ``forward`` takes positional tensors and returns a tuple (what the
exporters and converters want), put in eval mode for the packaging (restored by ``Source.close``), and
exported to ONNX once, on first use, with ``torch2onnx``. torch is imported inside the functions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from packagers.options import PackageOptions
from packagers.sources._torch_export import torch2onnx
from packagers.sources.base import Arrays, OnnxExport, Reference, Source, dtype_name
from packagers.sources.data import choose_validation
from sdk.errors import ManifestError, PackagingError
from sdk.manifest import TensorSpec

__all__ = ["torch_reference", "torch_source", "torch_version"]


def torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def _flatten_outputs(out: Any) -> tuple[list[str] | None, list[Any]]:
    """Tensors a module returned, and their names when it returned a mapping."""
    import torch

    if isinstance(out, torch.Tensor):
        return None, [out]
    if isinstance(out, Mapping):  # includes transformers ModelOutput
        items = [(k, v) for k, v in out.items() if v is not None]
        return [str(k) for k, _ in items], [v for _, v in items]
    if isinstance(out, (tuple, list)):
        return None, list(out)
    raise PackagingError(f"the module returned a {type(out).__name__}; return a tensor, a tuple or a dict of tensors")


def _make_wrapper(module: Any, names: Sequence[str], as_kwargs: bool) -> Any:
    """A module with a positional ``forward(*inputs)`` returning a tuple of tensors (what exporters want)."""
    import torch

    class _Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *args: Any) -> tuple[Any, ...]:
            out = self.inner(**dict(zip(names, args, strict=True))) if as_kwargs else self.inner(*args)
            return tuple(_flatten_outputs(out)[1])

    return _Wrapper().eval()


def torch_reference(wrapper: Any, input_names: Sequence[str], output_names: Sequence[str]) -> Reference:
    import torch

    def reference(inputs: Mapping[str, np.ndarray]) -> Arrays:
        tensors = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in input_names]
        with torch.no_grad():
            outs = wrapper(*tensors)
        return {n: t.detach().cpu().numpy() for n, t in zip(output_names, outs, strict=True)}

    return reference


def _set_eval(module: Any) -> Callable[[], None]:
    """Put ``module`` in eval mode; returns the function that restores each submodule's mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()

    def restore() -> None:
        for m, training in modes:
            m.training = training

    return restore


def _spec(name: str, dtype: Any, shape: Sequence[int], dynamic: Mapping[int, str]) -> TensorSpec:
    dims: list[int | str] = [dynamic.get(i, int(d)) for i, d in enumerate(shape)]
    for d in dynamic:
        if not 0 <= d < len(shape):
            raise PackagingError(f"dynamic axis {d} of {name!r} is out of range for shape {list(shape)}")
    try:
        return TensorSpec(name=name, dtype=dtype_name(dtype), shape=tuple(dims))
    except ManifestError as e:  # a dim name the bundle format refuses
        raise PackagingError(f"tensor {name!r}: {e}") from e


def _takes_keywords(module: Any, names: Sequence[str]) -> bool:
    """Whether a dict of example inputs goes to ``forward`` by keyword (else: positional, names only)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return all(n in params for n in names)


def torch_source(
    module: Any,
    example_inputs: Any,
    data: Arrays | None,
    task: str | None,
    options: PackageOptions,
    progress: Callable[[str], None],
) -> Source:
    import torch

    if example_inputs is None:
        raise PackagingError("a torch module needs example_inputs (a tuple of tensors or a dict name -> array)")
    as_kwargs = isinstance(example_inputs, Mapping) and _takes_keywords(module, [str(k) for k in example_inputs])
    if isinstance(example_inputs, Mapping):
        names = [str(k) for k in example_inputs]
        values = list(example_inputs.values())
        if options.input_names is not None and list(options.input_names) != names:
            raise PackagingError(
                f"options.input_names {list(options.input_names)} differ from the example keys {names}"
            )
    else:
        values = [example_inputs] if isinstance(example_inputs, (torch.Tensor, np.ndarray)) else list(example_inputs)
        default = ["input"] if len(values) == 1 else [f"input_{i}" for i in range(len(values))]
        names = list(options.input_names) if options.input_names is not None else default
        if len(names) != len(values):
            raise PackagingError(f"{len(values)} example inputs but {len(names)} input names: {names}")
    if len(set(names)) != len(names) or not values:
        raise PackagingError(f"input names must be unique and at least one: {names}")
    try:
        tensors = [v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v)) for v in values]
    except (TypeError, ValueError) as e:
        raise PackagingError(f"example inputs must be tensors or arrays: {e}") from e
    if any(t.dim() == 0 for t in tensors):
        raise PackagingError("example inputs need a batch dimension first")
    examples = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}

    restore = _set_eval(module)
    try:
        wrapper = _make_wrapper(module, names, as_kwargs)
        try:
            with torch.no_grad():
                raw = module(**dict(zip(names, tensors, strict=True))) if as_kwargs else module(*tensors)
        except Exception as e:  # the user's forward: any error means the examples do not fit
            raise PackagingError(f"the module failed on example_inputs: {type(e).__name__}: {e}") from e
        keys, outs = _flatten_outputs(raw)
        if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
            raise PackagingError("the module must return tensors (a tensor, a tuple or a dict of tensors)")
        default_out = keys or (["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))])
        out_names = list(options.output_names) if options.output_names is not None else default_out
        if len(out_names) != len(outs) or len(set(out_names)) != len(out_names):
            raise PackagingError(f"{len(outs)} outputs but output names {out_names}")
        if set(out_names) & set(names):
            raise PackagingError(f"output names {out_names} clash with input names {names}")

        axes = (
            dict(options.dynamic_axes)
            if options.dynamic_axes is not None
            else {n: {0: "batch"} for n in names + out_names}
        )
        unknown = sorted(set(axes) - set(names) - set(out_names))
        if unknown:
            raise PackagingError(f"dynamic_axes names unknown tensors {unknown}")
        inputs = tuple(_spec(n, examples[n].dtype, examples[n].shape, axes.get(n, {})) for n in names)
        outputs = tuple(
            _spec(n, o.detach().cpu().numpy().dtype, tuple(o.shape), axes.get(n, {}))
            for n, o in zip(out_names, outs, strict=True)
        )
        validation, origin = choose_validation(inputs, options, data=data, examples=examples)
        reference = torch_reference(wrapper, names, out_names)

        def export(workdir: Path) -> OnnxExport:
            return torch2onnx(
                wrapper, tuple(tensors), workdir / "source.onnx", input_names=names, output_names=out_names,
                dynamic_axes={k: dict(v) for k, v in axes.items()}, opset=options.export_opset,
                exporter=options.exporter, progress=progress,
            )  # fmt: skip
    except BaseException:
        restore()
        raise

    return Source(
        kind="torch",
        description=f"torch module {type(module).__name__}",
        inputs=inputs,
        outputs=outputs,
        reference=reference,
        reference_name=f"torch {torch_version()}",
        validation_inputs=validation,
        data_origin=origin,
        task=task,
        info={"class": f"{type(module).__module__}.{type(module).__qualname__}"},
        export_fn=export,
        close_fn=restore,
        native=wrapper,
    )
