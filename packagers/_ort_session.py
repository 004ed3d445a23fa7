"""The one way the packagers open an ONNX graph in onnxruntime: a CPU session, errors as PackagingError.

The onnx source runs the given graph as the reference, the onnxruntime target validates what it built
(as a device would load it), and its quantization recipes probe and measure intermediate graphs; all
three go through ``cpu_session`` so the provider, the log level and the error they raise agree.
onnxruntime is imported inside the function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdk.errors import PackagingError

__all__ = ["cpu_session"]


def cpu_session(path: Path | str | bytes, *, optimization: str = "ORT_ENABLE_ALL", what: str | None = None) -> Any:
    """An onnxruntime session of ``path`` on the CPU execution provider, logging errors only.

    Args:
        path: the .onnx (or .ort) file, or a serialized model.
        optimization: a ``GraphOptimizationLevel`` name: ``ORT_ENABLE_ALL`` (what a device applies),
            ``ORT_ENABLE_BASIC`` (keeps requested intermediate outputs) or ``ORT_DISABLE_ALL`` (the graph
            as given, for a reference).
        what: how the error message names the file (default: the path).

    Raises:
        PackagingError: onnxruntime cannot load the file; onnxruntime's own error is the cause.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    opts.log_severity_level = 3
    try:
        model = path if isinstance(path, bytes) else str(path)
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own Fail / InvalidGraph / NotImplemented types
        name = what or ("the model" if isinstance(path, bytes) else path)
        raise PackagingError(f"onnxruntime cannot load {name}: {str(e)[:300]}") from e
