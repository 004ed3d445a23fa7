"""What each runtime release can run: data only, read by the device profiles and ``--for`` / ``--device``.

Every row names its source. Versions are compared with ``sdk.compat.version_at_least``, the one version
rule the device's staging check and the fleet's bundle choice use as well.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

__all__ = [
    "COREML_MIN_OS",
    "COREML_ML_PROGRAM_MIN_OS",
    "DEFAULT_OPSET",
    "ORT_NUMPY2_SINCE",
    "ORT_OPSETS",
    "ORT_PRECISION_SINCE",
]

DEFAULT_OPSET: Final = 17  # the export opset when neither the user nor a target runtime asks for another

# ONNX Runtime release (major.minor) -> (highest ONNX opset it implements, highest ONNX IR version it reads),
# newest first. Source: onnxruntime.ai/docs/reference/compatibility.html ("ONNX opset support"), whose
# table ends at 1.20; a newer release runs every model an older one runs, so releases after the last row
# are held to that row.
ORT_OPSETS: Final = (
    ("1.20", 21, 10),
    ("1.19", 21, 10),
    ("1.18", 21, 10),
    ("1.17", 20, 9),
    ("1.16", 19, 9),
    ("1.15", 19, 8),
    ("1.14", 18, 8),
    ("1.13", 17, 8),
    ("1.12", 17, 8),
    ("1.11", 16, 8),
    ("1.10", 15, 8),
    ("1.9", 15, 8),
    ("1.8", 14, 7),
    ("1.7", 13, 7),
    ("1.6", 13, 7),
)

# Precisions whose graph needs a newer ONNX Runtime than the opset alone says: int4 is ``MatMulNBits``,
# a contrib operator first released in ONNX Runtime 1.17 (its release notes).
ORT_PRECISION_SINCE: Final = MappingProxyType({"int4": "1.17"})

# numpy 2 support arrived in ONNX Runtime 1.19 (its release notes); older wheels need numpy<2 on the device.
ORT_NUMPY2_SINCE: Final = "1.19"

# Core ML: ML programs (the only format edgeship builds) need iOS 15 / macOS 12; the compressed
# precisions need iOS 16 / macOS 13 (coremltools' ``ct.target`` and packagers.targets.coreml).
COREML_ML_PROGRAM_MIN_OS: Final = MappingProxyType({"ios": 15, "darwin": 12})
COREML_MIN_OS: Final = MappingProxyType(
    {
        "int8-weights": MappingProxyType({"ios": 16, "darwin": 13}),
        "int4-palette": MappingProxyType({"ios": 16, "darwin": 13}),
    }
)
