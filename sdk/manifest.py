"""The bundle manifest: a pure data model with canonical JSON.

``Manifest.from_bytes`` parses and validates untrusted bytes; ``Manifest.to_bytes`` writes the
canonical form (sorted keys, no whitespace, UTF-8) that signatures cover. Nothing here touches
disk or network, and no constructor mutates what it is given.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any

from sdk.errors import ManifestError
from sdk.sections import Golden, GoldenTolerance, InputPolicy, Preprocessing, Runtime, Section, Validation

__all__ = [
    "DTYPES",
    "PRECISIONS",
    "SCHEMA_VERSION",
    "TARGETS",
    "FileEntry",
    "Golden",
    "GoldenTolerance",
    "InputPolicy",
    "Manifest",
    "Preprocessing",
    "Runtime",
    "TensorSpec",
    "Validation",
    "canonical_json",
    "check_member_path",
    "format_time",
    "parse_time",
]

SCHEMA_VERSION = 1
TARGETS = ("onnxruntime", "openvino", "tflite", "coreml")
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8", "int8-weights", "int4", "int4-palette")
DTYPES = (
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64",
)  # fmt: skip
RESERVED_MEMBERS = ("manifest.json", "signatures.json")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_DIM_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_MAX_INT = 2**63 - 1  # versions and sizes fit a signed 64-bit int in every reader
_SECTIONS: dict[str, type[Section]] = {
    "runtime": Runtime, "preprocessing": Preprocessing, "validation": Validation, "golden": Golden,
    "input_policy": InputPolicy,
}  # fmt: skip


def canonical_json(obj: Any) -> bytes:
    """Encode ``obj`` as canonical JSON: sorted keys, no whitespace, UTF-8, no NaN."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        # A JSON "\ud800" escape parses to a lone surrogate, which UTF-8 cannot encode.
        return text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:  # UnicodeEncodeError is a ValueError
        raise ManifestError(f"value cannot be written as canonical JSON: {e}") from e


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise ManifestError(f"duplicate JSON key {duplicate!r}")
    return out


def _reject_constant(name: str) -> None:
    raise ManifestError(f"JSON constant {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 is infinity: as refused as the Infinity constant
        raise ManifestError(f"JSON number {text[:40]} is out of range")
    return value


# One decoder (json.loads builds a new one per call when given hooks; the fleet's ingest parses thousands a second).
_STRICT_DECODER = json.JSONDecoder(
    object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant, parse_float=_finite_float
)


def strict_json_loads(data: bytes, what: str) -> Any:
    """Parse UTF-8 JSON, refusing duplicate keys and NaN/Infinity (parser-differential attacks)."""
    try:
        text = data.decode("utf-8")
        return _STRICT_DECODER.decode(text)
    except ManifestError as e:
        raise ManifestError(f"{what}: {e}") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: an int of over 4300 digits too
        raise ManifestError(f"{what} is not valid UTF-8 JSON: {str(e)[:200]}") from e


def format_time(t: datetime) -> str:
    """Format an aware datetime as the manifest's UTC timestamp (``2026-01-31T12:00:00Z``)."""
    if t.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return t.astimezone(timezone.utc).strftime(_TIME_FORMAT)


def parse_time(text: str, what: str) -> datetime:
    """Parse a manifest timestamp; raises ManifestError if it is not ``YYYY-MM-DDTHH:MM:SSZ``."""
    try:
        return datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=timezone.utc)
    except (TypeError, ValueError) as e:
        raise ManifestError(f"{what} must look like 2026-01-31T12:00:00Z, got {text!r}") from e


def check_member_path(path: str) -> str | None:
    """Return why ``path`` is not a safe bundle member path, or None when it is.

    A safe path is relative, uses ``/`` separators, has no empty, ``.`` or ``..`` parts, no
    backslashes or control characters, and is not one of the reserved names.
    """
    if not isinstance(path, str) or not path:
        return "empty path"
    if len(path) > 255:
        return "path longer than 255 characters"
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        return "absolute path"
    if "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "backslash or control character in path"
    if any(0xD800 <= ord(c) <= 0xDFFF for c in path):
        return "path is not valid Unicode (lone surrogate)"
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "path with an empty, '.' or '..' part"
    if path in RESERVED_MEMBERS:
        return f"{path} is reserved"
    return None


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ManifestError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: a name, a numpy dtype name and a shape.

    Shape entries are ints for fixed dimensions and names (``"batch"``) for dynamic ones; the
    same name on several inputs means those dimensions must be equal.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and 0 < len(self.name) <= 256, f"bad tensor name {self.name!r}")
        _require(self.dtype in DTYPES, f"tensor {self.name!r}: dtype {self.dtype!r} not one of {', '.join(DTYPES)}")
        _require(isinstance(self.shape, (tuple, list)), f"tensor {self.name!r}: shape must be a list")
        object.__setattr__(self, "shape", tuple(self.shape))
        for dim in self.shape:
            if isinstance(dim, str):
                ok = _DIM_RE.fullmatch(dim) is not None
            else:
                ok = _is_int(dim) and dim >= 0
            _require(ok, f"tensor {self.name!r}: dimension {dim!r} must be a non-negative int or a name")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Any) -> TensorSpec:
        _require(isinstance(d, Mapping), "tensor spec must be an object")
        _require(set(d) == {"name", "dtype", "shape"}, f"tensor spec keys must be name, dtype, shape: {sorted(d)}")
        return cls(name=d["name"], dtype=d["dtype"], shape=d["shape"])  # __post_init__ checks it is a list


@dataclass(frozen=True)
class FileEntry:
    """One archive member other than the manifest and signatures."""

    path: str
    sha256: str
    size: int

    def __post_init__(self) -> None:
        why = check_member_path(self.path)
        _require(why is None, f"file entry {self.path!r}: {why}")
        _require(isinstance(self.sha256, str) and _SHA256_RE.fullmatch(self.sha256) is not None,
                 f"file entry {self.path!r}: sha256 must be 64 lowercase hex digits")  # fmt: skip
        _require(_is_int(self.size) and 0 <= self.size <= _MAX_INT,
                 f"file entry {self.path!r}: size must be an int from 0 to 2**63-1")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, d: Any) -> FileEntry:
        _require(isinstance(d, Mapping), "file entry must be an object")
        _require(set(d) == {"path", "sha256", "size"}, f"file entry keys must be path, sha256, size: {sorted(d)}")
        return cls(path=d["path"], sha256=d["sha256"], size=d["size"])


@dataclass(frozen=True)
class Manifest:
    """What a bundle holds and promises. Validated on construction; immutable.

    See docs/bundle-format.md for each field's meaning.
    """

    name: str
    version: int
    target: str
    precision: str
    model: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    created: str
    files: tuple[FileEntry, ...] = ()
    # The sections (sdk/sections.py): given as the class or as its JSON object, stored as the class.
    runtime: Runtime = field(default_factory=Runtime)
    label: str | None = None
    task: str | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    validation: Validation = field(default_factory=Validation)
    golden: Golden = field(default_factory=Golden)
    input_policy: InputPolicy = field(default_factory=InputPolicy)
    expires: str | None = None
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _require(_is_int(self.schema), "schema must be an integer")
        _require(1 <= self.schema <= SCHEMA_VERSION,
                 f"manifest schema {self.schema} is not supported (edgeship reads up to {SCHEMA_VERSION})")  # fmt: skip
        _require(isinstance(self.name, str) and _NAME_RE.fullmatch(self.name) is not None,
                 f"name {self.name!r} must be 1-128 of letters, digits, '.', '_', '-'")  # fmt: skip
        _require(_is_int(self.version) and 0 <= self.version <= _MAX_INT,
                 f"version must be an integer from 0 to 2**63-1, got {self.version!r}")  # fmt: skip
        _require(self.target in TARGETS, f"target {self.target!r} not one of {', '.join(TARGETS)}")
        _require(self.precision in PRECISIONS, f"precision {self.precision!r} not one of {', '.join(PRECISIONS)}")
        _require(self.label is None or isinstance(self.label, str), "label must be a string")
        _require(self.task is None or isinstance(self.task, str), "task must be a string")
        parse_time(self.created, "created")
        if self.expires is not None:
            parse_time(self.expires, "expires")
        why = check_member_path(self.model)
        _require(why is None, f"model path {self.model!r}: {why}")
        for name in ("inputs", "outputs", "files"):
            _require(isinstance(getattr(self, name), (list, tuple)), f"{name} must be a list")

        inputs = tuple(t if isinstance(t, TensorSpec) else TensorSpec.from_dict(t) for t in self.inputs)
        outputs = tuple(t if isinstance(t, TensorSpec) else TensorSpec.from_dict(t) for t in self.outputs)
        files = tuple(f if isinstance(f, FileEntry) else FileEntry.from_dict(f) for f in self.files)
        _require(len(inputs) > 0 and len(outputs) > 0, "a model needs at least one input and one output")
        for what, specs in (("input", inputs), ("output", outputs)):
            names = [t.name for t in specs]
            _require(len(set(names)) == len(names), f"duplicate {what} names: {names}")
        paths = [f.path for f in files]
        _require(len(set(paths)) == len(paths), "duplicate paths in files")
        # Members must extract to distinct files on case-insensitive or normalising file systems
        # (macOS, Windows), and no member may be the folder of another.
        folded = [unicodedata.normalize("NFC", p).casefold() for p in paths]
        _require(len(set(folded)) == len(folded), "paths in files that differ only by case or Unicode form")
        folders = {"/".join(parts[:i]) for parts in (p.split("/") for p in folded) for i in range(1, len(parts))}
        clash = sorted(folders.intersection(folded))
        if clash:
            raise ManifestError(f"path {clash[0]!r} in files is also used as a folder")
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "outputs", outputs)
        object.__setattr__(self, "files", files)
        for name, section in _SECTIONS.items():
            object.__setattr__(self, name, section.from_dict(getattr(self, name)))
        named = {d for spec in inputs for d in spec.shape if isinstance(d, str)}
        for dim in self.input_policy.ranges:
            _require(dim in named, f"input_policy.dims: {dim!r} is not a dynamic dimension of any input")

        golden_paths = self.golden_paths()
        if files:  # a draft built before its files are hashed has none yet
            _require(self.model in paths, f"model file {self.model!r} is not listed in files")
            for path in golden_paths:
                _require(path in paths, f"golden file {path!r} is not listed in files")
        self.to_bytes()  # every valid manifest can be written (a "\ud800" escape parses but cannot)

    # ---- derived views -------------------------------------------------------------------------
    def golden_paths(self) -> list[str]:
        """Paths of the golden input and output arrays, in manifest order."""
        return self.golden.paths()

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def created_at(self) -> datetime:
        return parse_time(self.created, "created")

    def expires_at(self) -> datetime | None:
        return None if self.expires is None else parse_time(self.expires, "expires")

    def with_files(self, files: Sequence[FileEntry]) -> Manifest:
        """A copy of this manifest listing ``files``."""
        return replace(self, files=tuple(sorted(files, key=lambda f: f.path)))

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name in ("inputs", "outputs", "files"):
                value = [v.to_dict() for v in value]
            elif isinstance(value, Section):
                value = value.to_dict()
            out[f.name] = value
        return out

    def to_bytes(self) -> bytes:
        """The canonical bytes that signatures cover."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        _require(isinstance(d, Mapping), "manifest must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        _require(not unknown, f"unknown manifest fields: {', '.join(unknown)}")
        try:
            return cls(**dict(d))
        except TypeError as e:  # a required field is missing
            raise ManifestError(f"manifest is incomplete: {e}") from e

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and validate untrusted manifest bytes.

        Raises:
            ManifestError: not UTF-8 JSON, duplicate keys, unknown or invalid fields.
        """
        return cls.from_dict(strict_json_loads(data, "manifest"))
