"""The targets: one module per runtime edgeship packages for, each with its ``Packager`` class.

``packagers.registry`` names them by module path and imports one only when it is asked for, so this
package imports none of them (and none of their heavy libraries). A target's private helpers sit
beside it: ``_ort_quant`` (the ONNX Runtime quantization recipes) and ``_coreml_ops`` (the torch op
converters coremltools lacks).
"""
