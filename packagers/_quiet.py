"""One ``quiet()`` for the converters: what each library prints while it works, and how to hush it.

The converters and quantizers edgeship drives talk in different ways: some log advice at WARNING
through their own logger or the root logger, some print progress on stdout (or stderr), some draw
tqdm bars that take no argument to turn them off, some warn about deprecations, and TensorFlow's C++
core logs unless an environment variable says otherwise before it is imported. The CLI has its own
progress lines, so while a converter runs its chatter is hidden; errors still propagate as
exceptions. Each library's habits are written down once, in ``LIBRARIES``; call sites name the
libraries they are about to call: ``with quiet("nncf"): ...``.

Everything changed is restored on exit except the environment variables, which are only set when
unset (the library reads them once, at import).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["LIBRARIES", "Chatter", "quiet"]


@dataclass(frozen=True)
class Chatter:
    """How one library talks while it converts, and so what ``quiet`` turns down."""

    loggers: tuple[str, ...] = ()  # loggers set to ERROR ("" is the root logger)
    stdout: bool = False  # progress and advice printed on stdout
    stderr: bool = False  # ... and on stderr
    warnings: bool = False  # warnings.warn chatter (deprecations, tracer warnings)
    # (module, attribute) of tqdm bars the library draws; swapped for disabled ones while quiet,
    # where the module is already imported (packaging runs one conversion at a time).
    tqdm: tuple[tuple[str, str], ...] = ()
    hf_progress_bars: bool = False  # transformers' weight-loading bars (its own switch)
    env: Mapping[str, str] = field(default_factory=dict)  # set where unset, before the library's import


_TF = Chatter(loggers=("",), stdout=True, stderr=True, env={"TF_CPP_MIN_LOG_LEVEL": "2"})

LIBRARIES: Mapping[str, Chatter] = MappingProxyType(
    {
        # The torch -> ONNX exporters: deprecation chatter and progress lines.
        "torch.onnx": Chatter(
            loggers=("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript"), warnings=True
        ),
        # torch.jit.trace: TracerWarnings about Python branches on shapes.
        "torch.jit": Chatter(warnings=True),
        # transformers' import and from_pretrained: a weight-loading bar on stderr and version warnings; the
        # import pulls in torchao where installed, which logs a WARNING for each of its CUDA kernels a CPU host
        # cannot load, and torch's pytree logs a deprecation for each of torchao's enums.
        "transformers": Chatter(
            loggers=("transformers", "torchao", "torch.utils._pytree"), warnings=True, hf_progress_bars=True
        ),
        # onnxruntime's quantization tools: advice at WARNING through the root logger, prints on stdout.
        "onnxruntime.quantization": Chatter(loggers=("",), stdout=True),
        # NNCF: progress bars on stdout and bit-width tables at INFO.
        "nncf": Chatter(loggers=("nncf",), stdout=True),
        # TensorFlow, its TFLite converter, litert-torch and ai-edge-quantizer: C++ info lines, progress
        # trees and advice on stdout/stderr and the root logger.
        "tensorflow": _TF,
        "litert": _TF,
        # coremltools: untested-version warnings on its logger, tqdm bars while converting and compressing.
        "coremltools": Chatter(
            loggers=("coremltools",),
            warnings=True,
            tqdm=(
                ("coremltools.converters.mil.frontend.torch.ops", "_tqdm"),
                ("coremltools.converters.mil.mil.passes.pass_pipeline", "tqdm"),
                ("coremltools.optimize.coreml._quantization_passes", "tqdm"),
            ),
        ),
    }
)


@contextlib.contextmanager
def quiet(*libraries: str) -> Iterator[None]:
    """Hide the chatter of ``libraries`` (names in ``LIBRARIES``) while the block runs.

    Raises:
        KeyError: a library ``LIBRARIES`` does not describe (a programming error, raised before anything changes).
    """
    chatter = [LIBRARIES[name] for name in libraries]
    for c in chatter:
        for key, value in c.env.items():
            os.environ.setdefault(key, value)
    names = list(dict.fromkeys(n for c in chatter for n in c.loggers))
    loggers = [logging.getLogger(n or None) for n in names]
    levels = [lg.level for lg in loggers]
    swapped = []
    with contextlib.ExitStack() as stack:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        stack.callback(_restore_levels, loggers, levels)
        for module_name, attr in (bar for c in chatter for bar in c.tqdm):
            module = sys.modules.get(module_name)
            bar = getattr(module, attr, None)
            if bar is not None:
                setattr(module, attr, functools.partial(bar, disable=True))
                swapped.append((module, attr, bar))
        stack.callback(_restore_bars, swapped)
        if any(c.hf_progress_bars for c in chatter):
            stack.enter_context(_no_hf_progress_bars())
        if any(c.warnings for c in chatter):
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
        sink = io.StringIO()
        if any(c.stdout for c in chatter):
            stack.enter_context(contextlib.redirect_stdout(sink))
        if any(c.stderr for c in chatter):
            stack.enter_context(contextlib.redirect_stderr(sink))
        yield


def _restore_levels(loggers: Sequence[logging.Logger], levels: Sequence[int]) -> None:
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


def _restore_bars(swapped: Sequence[tuple[object, str, object]]) -> None:
    for module, attr, bar in reversed(swapped):
        setattr(module, attr, bar)


@contextlib.contextmanager
def _no_hf_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
