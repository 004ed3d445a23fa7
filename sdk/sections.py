"""The manifest's sections, one frozen dataclass each: ``runtime``, ``preprocessing``, ``golden``,
``input_policy`` and ``validation`` (docs/bundle-format.md, sections 4.4 to 4.7a).

The packager writes them and the device reads them through these classes, so both share one
definition of each key and its type. Parsing is strict: an unknown key or a value of the wrong type
is refused with a ``ManifestError`` naming ``section.key``, so a reader never silently ignores a
fact a newer writer meant it to act on. A JSON ``null`` reads as an absent key. ``to_dict`` writes
exactly the keys that are set, so a bundle written by the current packagers reads back to the same
JSON.

Objects whose inner shape belongs to one consumer (``runtime.quantization``, ``preprocessing.tokenizer``,
``validation.metrics``, ...) are checked to be JSON objects here and read by that consumer, which
refuses what it cannot use.

Each section also reads as a read-only mapping of its JSON form (``m.runtime["opset"]``,
``dict(m.golden)``), which is how manifests were read before the sections were typed; new code reads
the attributes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from sdk.errors import ManifestError

__all__ = ["Golden", "GoldenTolerance", "InputPolicy", "Preprocessing", "Runtime", "Section", "Validation"]

S = TypeVar("S", bound="Section")
Check = Callable[[Any, str], Any]  # (value, "section.key") -> the normalised value, or raises ManifestError


def _fail(where: str, expected: str, value: Any) -> ManifestError:
    shown = repr(value) if len(repr(value)) <= 80 else f"a {type(value).__name__}"
    return ManifestError(f"{where} must be {expected}, got {shown}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plain(value: Any, where: str) -> Any:
    """A deep copy of a JSON value; refuses anything JSON cannot hold (NaN, non-string keys, objects)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as e:
        raise ManifestError(f"{where} is not plain JSON: {e}") from e


def string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, "a string", value)
    return value


def boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, "true or false", value)
    return value


def count(value: Any, where: str) -> int:
    if not _is_int(value) or value < 0:
        raise _fail(where, "an integer >= 0", value)
    return int(value)


def positive(value: Any, where: str) -> float:
    if not _is_number(value) or value <= 0:
        raise _fail(where, "a finite number > 0", value)
    return value  # kept as written (an int stays an int): the JSON reads back the same


def non_negative(value: Any, where: str) -> float:
    if not _is_number(value) or value < 0:
        raise _fail(where, "a finite number >= 0", value)
    return value


def strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _fail(where, "a list of strings", value)
    return tuple(value)


def obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(where, "an object", value)
    return dict(_plain(dict(value), where))


def string_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        raise _fail(where, "an object of strings", value)
    return {str(k): v for k, v in value.items()}


# How a field is checked, by its annotation; ``Section.checks`` names the fields that need more.
_BY_TYPE: dict[str, Check] = {
    "str | None": string,
    "int | None": count,
    "bool | None": boolean,
    "tuple[str, ...] | None": strings,
    "dict[str, Any] | None": obj,
    "dict[str, str] | None": string_map,
}


def _json(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value


class Section(Mapping[str, Any]):
    """Base of the typed sections: strict construction, ``from_dict``/``to_dict``, read-only mapping view.

    Subclasses are frozen dataclasses; each field is checked (and normalised: lists to tuples, objects
    copied) by its annotation, or by its entry in ``checks``. A field left at ``None`` is absent from
    the JSON.
    """

    section: ClassVar[str]
    checks: ClassVar[Mapping[str, Check]] = {}

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None:
                check = self.checks.get(f.name) or _BY_TYPE[str(f.type)]
                object.__setattr__(self, f.name, check(value, f"{self.section}.{f.name}"))

    @classmethod
    def from_dict(cls: type[S], d: Any) -> S:
        """Parse the section's JSON object strictly.

        Raises:
            ManifestError: not an object, an unknown key, or a value of the wrong type (the message names it).
        """
        if isinstance(d, cls):
            return d
        if not isinstance(d, Mapping):
            raise _fail(cls.section, "an object", d)
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise ManifestError(f"{cls.section}: unknown keys {unknown} (known: {', '.join(sorted(known))})")
        return cls(**{str(k): v for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        """The section as plain JSON: only the keys that are set."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = _json(value)
        return out

    # ---- read-only mapping view of the JSON form -----------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # sections hold dicts

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()!r})"


# ---- runtime (4.4) -----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class Runtime(Section):
    """What the device needs to run the model, and the build facts of its target.

    The backends check the values they act on (an unknown execution provider or precision hint is a
    ``BackendError`` there); this class checks the keys and their types.
    """

    section: ClassVar[str] = "runtime"

    # every target
    package: str | None = None  # the runtime package: onnxruntime, openvino, ai-edge-litert, coremltools
    min_version: str | None = None  # lowest version of package the model needs (sdk.runtime_versions)
    built_with: dict[str, str] | None = None  # provenance: package -> the version the build host ran
    arch: tuple[str, ...] | None = None  # CPU architectures, or ("any",)
    format: str | None = None  # onnx, ort, mlprogram, ...
    opset: int | None = None  # ONNX opset of the export
    exporter: str | None = None  # torchscript, dynamo, given, ...
    quantization: dict[str, Any] | None = None  # how the weights/activations were quantized
    # onnxruntime
    providers: tuple[str, ...] | None = None  # execution providers, in preference order
    graph_optimization_level: str | None = None  # ORT_ENABLE_ALL, ...
    # openvino
    devices: tuple[str, ...] | None = None  # CPU, GPU, NPU, in preference order
    performance_hint: str | None = None  # LATENCY or THROUGHPUT
    inference_precision_hint: str | None = None  # the INFERENCE_PRECISION_HINT the device sets
    validated_inference_precision: str | None = None  # the precision the build host validated at
    weights: str | None = None  # the IR's weights member
    # tflite
    fallbacks: tuple[str, ...] | None = None  # other LiteRT packages that run it
    delegates: tuple[str, ...] | None = None  # xnnpack, edgetpu
    signature: str | None = None  # the signature runner's key
    converter: str | None = None  # what converted the model
    tensor_map: dict[str, Any] | None = None  # {"inputs"|"outputs": {manifest name: model name}}
    int8_io: bool | None = None  # the model takes and returns int8 (scales in quantization)
    # sequence buckets: {"axis", "lengths", "signatures", "pad"}; the backend runs the smallest that fits
    buckets: dict[str, Any] | None = None
    # coreml
    platforms: tuple[str, ...] | None = None  # macOS, iOS
    minimum_deployment_target: str | None = None
    compute_precision: str | None = None
    compute_units: str | None = None  # the default MLComputeUnits
    coreml_inputs: dict[str, str] | None = None  # tensor name -> the package's dtype
    coreml_outputs: dict[str, str] | None = None
    dim_bounds: dict[str, Any] | None = None  # dim name -> [min, max] the package accepts
    specification_version: int | None = None
    compression: dict[str, Any] | None = None  # palettization / quantization of the weights


# ---- preprocessing (4.5) -----------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class Preprocessing(Section):
    """What turns raw input (text, images) into the model's tensors, and how outputs are named."""

    section: ClassVar[str] = "preprocessing"

    tokenizer: dict[str, Any] | None = None  # read by device_runtime's TextEncoder
    image: dict[str, Any] | None = None  # read by device_runtime's ImageProcessor
    labels: tuple[str, ...] | None = None  # class names by index
    problem_type: str | None = None  # multi_label_classification scores with sigmoid
    pooling: dict[str, Any] | None = None  # feature-extraction: {"mode", "normalize", "source"}


# ---- golden (4.7) ------------------------------------------------------------------------------
def cosine_bound(value: Any, where: str) -> float:
    if not _is_number(value) or not 0 <= value <= 1:
        raise _fail(where, "a number from 0 to 1", value)
    return value


@dataclass(frozen=True, eq=False, repr=False)
class GoldenTolerance(Section):
    """How close a device's outputs must be to the golden outputs (the rule: ``sdk.golden``)."""

    section: ClassVar[str] = "golden.tolerance"
    checks: ClassVar[Mapping[str, Check]] = {"atol": non_negative, "rtol": non_negative, "min_cosine": cosine_bound}

    atol: float = 1e-4  # absolute, in the output's units
    rtol: float = 1e-3  # relative to |golden|
    min_cosine: float | None = None  # per-sample cosine similarity, checked as well when set


@dataclass(frozen=True, eq=False, repr=False)
class Golden(Section):
    """The arrays of the health check: inputs, the outputs the bundle produced for them, the tolerance."""

    section: ClassVar[str] = "golden"
    checks: ClassVar[Mapping[str, Check]] = {
        "tolerance": lambda value, where: GoldenTolerance.from_dict(value),  # its messages name the inner keys
        "latency_budget_ms": positive,
    }

    inputs: dict[str, str] | None = None  # tensor name -> .npy member
    outputs: dict[str, str] | None = None  # tensor name -> .npy member
    tolerance: GoldenTolerance | None = None  # None: the defaults
    samples: int | None = None  # batch size of the arrays
    outputs_from: str | None = None  # set when the outputs are the reference's (host could not run it)
    latency_budget_ms: float | None = None  # the golden run may take at most this on the device

    @property
    def rule(self) -> GoldenTolerance:
        """The tolerance to check with: the bundle's, or the defaults."""
        return self.tolerance if self.tolerance is not None else GoldenTolerance()

    def paths(self) -> list[str]:
        """Members of the golden input and output arrays, inputs first, in manifest order."""
        return [*(self.inputs or {}).values(), *(self.outputs or {}).values()]


# ---- input_policy (4.7a) -----------------------------------------------------------------------
def nonfinite(value: Any, where: str) -> str:
    if value not in ("reject", "pass"):
        raise _fail(where, "reject or pass", value)
    return str(value)


def dim_ranges(value: Any, where: str) -> dict[str, tuple[int, int]]:
    if not isinstance(value, Mapping):
        raise _fail(where, "an object", value)
    out: dict[str, tuple[int, int]] = {}
    for dim, bounds in value.items():
        ok = (isinstance(bounds, (list, tuple)) and len(bounds) == 2 and all(_is_int(b) for b in bounds)
              and 0 <= bounds[0] <= bounds[1])  # fmt: skip
        if not ok:
            raise _fail(f"{where}.{dim}", "[min, max] with 0 <= min <= max", bounds)
        out[str(dim)] = (int(bounds[0]), int(bounds[1]))
    return out


def byte_cap(value: Any, where: str) -> int:
    if not _is_int(value) or value <= 0:
        raise _fail(where, "an int > 0", value)
    return int(value)


@dataclass(frozen=True, eq=False, repr=False)
class InputPolicy(Section):
    """What the device accepts as input beyond names, dtypes and shapes.

    ``Manifest`` also checks that every name in ``dims`` is a dynamic dimension of some input.
    """

    section: ClassVar[str] = "input_policy"
    checks: ClassVar[Mapping[str, Check]] = {"nonfinite": nonfinite, "dims": dim_ranges, "max_bytes": byte_cap}

    nonfinite: str | None = None  # "reject" (the default) or "pass" NaN and Inf in inputs
    dims: dict[str, tuple[int, int]] | None = None  # dynamic dim -> inclusive (min, max)
    max_bytes: int | None = None  # bytes of all inputs of one call together

    @property
    def reject_nonfinite(self) -> bool:
        return self.nonfinite != "pass"

    @property
    def ranges(self) -> Mapping[str, tuple[int, int]]:
        """``dims``, empty when absent."""
        return self.dims or {}


# ---- validation (4.6) --------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class Validation(Section):
    """The numbers behind the decision to sign; a device does not re-judge them."""

    section: ClassVar[str] = "validation"

    reference: str | None = None  # the framework the build was compared with
    samples: int | None = None  # validation samples
    data: str | None = None  # where the samples came from
    metrics: dict[str, Any] | None = None  # per-output numbers
    accuracy: dict[str, Any] | None = None  # task accuracy of reference and bundle, with labels
    tolerances: dict[str, Any] | None = None  # what the metrics were judged against
    passed: bool | None = None
    accepted_drift: bool | None = None  # signed although it did not pass
    failures: tuple[str, ...] | None = None
    padding: dict[str, Any] | None = None  # which outputs were scored only where attention_mask != 0
    benchmark: dict[str, Any] | None = None  # host latency figures
    numeric: dict[str, Any] | None = None  # {"ran": false, "reason"} when the host could not run it
    structure: dict[str, Any] | None = None  # what was checked without running it
    on_runtime: dict[str, Any] | None = None  # --validate-on: health and metrics in that release, which it names
