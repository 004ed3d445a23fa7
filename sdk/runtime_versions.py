"""Which runtime release a model needs, from what the model file uses: one table per target.

A bundle's ``runtime.min_version`` says the lowest release of ``runtime.package`` that loads its model,
derived here from the model's own facts (ONNX opsets and IR version, TFLite's ``min_runtime_version``,
OpenVINO IR and operation sets, the Core ML specification version), never from the build host's install.
The packagers read those facts from the model file and call the functions below; the device-profile and
install checks read the same tables (``coreml_os_versions``), so a writer and its readers cannot drift.

Pure and standard-library only. Every table cites where its facts come from. Where a model uses
something a table does not know (a newer opset, an unknown domain or contrib op), the answer is the
build host's release (``host``): the one version the model is known to load in, never a guess below it.
Each answer carries its reasons, so the report can say why a bundle needs what it needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "COREML_MIN_OS",
    "COREML_ML_PROGRAM_MIN_OS",
    "COREML_SPEC_COREMLTOOLS",
    "DEFAULT_OPSET",
    "ORT_NUMPY2_SINCE",
    "ORT_PRECISION_SINCE",
    "COREML_SPEC_OS",
    "LITERT_FIRST_RELEASE",
    "LITERT_FIRST_RELEASE_COVERS_TF",
    "ORT_CONTRIB_OPS",
    "ORT_RELEASES",
    "OPENVINO_BASE_TYPES",
    "OPENVINO_IR_VERSIONS",
    "OPENVINO_OPSETS",
    "OrtRelease",
    "Requirement",
    "coreml_min_version",
    "coreml_os_versions",
    "coreml_spec_for_os",
    "litert_min_version",
    "onnxruntime_min_version",
    "ort_limits",
    "openvino_min_version",
    "release_floor",
]


@dataclass(frozen=True)
class Requirement:
    """The lowest release of a runtime package a model needs, and why.

    Attributes:
        version: ``major.minor.patch`` of the package.
        reasons: what in the model set it (``"ai.onnx opset 17 -> onnxruntime 1.12.0"``), the host
            fallback included, in the order they were found.
    """

    version: str
    reasons: tuple[str, ...] = ()


def _key(version: str) -> tuple[int, ...]:
    parts = [int(m.group()) for m in (re.match(r"\d+", p) for p in version.split(".")) if m]
    return tuple(parts + [0] * (3 - len(parts)))


def release_floor(version: str) -> str:
    """``major.minor.0`` of an installed release (``"1.32.1"`` -> ``"1.32.0"``), suffixes dropped."""
    major, minor = _key(version)[:2]
    return f"{major}.{minor}.0"


def _highest(found: list[tuple[str, str]], host: str | None, unknown: list[str]) -> Requirement:
    """The highest version found; anything unknown raises it to the host's release."""
    reasons = [why for _, why in found]
    versions = [v for v, _ in found]
    if unknown:
        if host is None:
            raise ValueError(f"no release is known for {', '.join(unknown)} and no host version was given")
        floor = release_floor(host)
        versions.append(floor)
        reasons.extend(f"{what} is not in edgeship's table -> the build host's {floor}" for what in unknown)
    if not versions:
        raise ValueError("nothing to derive a version from")
    return Requirement(max(versions, key=_key), tuple(reasons))


# ---- ONNX Runtime ------------------------------------------------------------------------------
@dataclass(frozen=True)
class OrtRelease:
    """What one onnxruntime release implements: the newest ai.onnx and ai.onnx.ml opsets, and IR version."""

    version: str
    opset: int
    ml_opset: int
    ir_version: int


# Source: ONNX Runtime's version matrix, https://onnxruntime.ai/docs/reference/compatibility.html
# (formerly docs/Versioning.md in microsoft/onnxruntime), joined with onnx's own release table
# (onnx/docs/Versioning.md, "Released Versions": ONNX 1.12 -> opset 17 / ML 3 / IR 8, 1.14 -> 19 / 3 / 9,
# 1.15 -> 20 / 4 / 9, 1.16 -> 21 / 5 / 10). Where the two copies of the matrix disagree, the later
# release is kept (a device is refused needlessly rather than sent a model it cannot load): IR 8 from
# 1.10, IR 9 from 1.16. Checked here: onnxruntime 1.17.3 loads an opset 17 / IR 8 graph and refuses
# ai.onnx.ml opset 5. Each row is the first release with its maxima; ``ort_limits`` reads it per release.
# The compatibility table ends at 1.20 (opset 21): a model that needs more gets the build host's release.
ORT_RELEASES: tuple[OrtRelease, ...] = (
    OrtRelease("1.0.0", 11, 2, 6),
    OrtRelease("1.3.0", 12, 2, 6),
    OrtRelease("1.6.0", 13, 2, 7),
    OrtRelease("1.8.0", 14, 2, 7),
    OrtRelease("1.9.0", 15, 2, 7),
    OrtRelease("1.10.0", 15, 2, 8),
    OrtRelease("1.11.0", 16, 2, 8),
    OrtRelease("1.12.0", 17, 3, 8),
    OrtRelease("1.14.0", 18, 3, 8),
    OrtRelease("1.15.0", 19, 3, 8),
    OrtRelease("1.16.0", 19, 3, 9),
    OrtRelease("1.17.0", 20, 4, 9),
    OrtRelease("1.18.0", 21, 4, 10),
)
# com.microsoft contrib ops edgeship's quantizers write -> the first release with a CPU kernel.
# Source: onnxruntime docs/ContribOperators.md and the 1.17.0 release notes (MatMulNBits, 4-bit
# blockwise weights, first shipped in 1.17). Other contrib ops get the host's release.
ORT_CONTRIB_OPS: dict[str, str] = {"MatMulNBits": "1.17.0"}
_ORT_FLOOR = "1.0.0"  # every release runs opsets 7 and up (ONNX Runtime's backwards-compatibility note)


DEFAULT_OPSET = 17  # the export opset when neither the user nor a target runtime asks for another
# Precisions whose graph needs a newer ONNX Runtime than the opset alone says: int4 is MatMulNBits.
ORT_PRECISION_SINCE: dict[str, str] = {"int4": ORT_CONTRIB_OPS["MatMulNBits"]}
# numpy 2 support arrived in ONNX Runtime 1.19 (its release notes); older wheels need numpy<2 on the device.
ORT_NUMPY2_SINCE = "1.19"


def ort_limits(version: str) -> tuple[int, int] | None:
    """The highest ai.onnx opset and IR version onnxruntime ``version`` runs (a release newer than the
    table is held to its last row); None: older than the table."""
    found: tuple[int, int] | None = None
    for release in ORT_RELEASES:
        if _key(version) + (0,) * 3 >= _key(release.version):
            found = (release.opset, release.ir_version)
    return found


def _first_ort(what: str, needed: int, column: str) -> tuple[str, str] | None:
    for release in ORT_RELEASES:
        if getattr(release, column) >= needed:
            return release.version, f"{what} -> onnxruntime {release.version}"
    return None


def onnxruntime_min_version(
    opsets: Mapping[str, int], ir_version: int, contrib_ops: Iterable[str] = (), host: str | None = None
) -> Requirement:
    """The first onnxruntime release that loads a graph with these opset imports, IR version and contrib ops.

    Args:
        opsets: the graph's opset imports (domain -> version; ``""`` and ``"ai.onnx"`` are the default
            domain), after unused ones were stripped: each one must be known to the runtime.
        ir_version: the model's ``ir_version``.
        contrib_ops: op types of ``com.microsoft`` nodes.
        host: the build host's onnxruntime version, for anything the tables do not know.

    Raises:
        ValueError: something is unknown and no ``host`` was given.
    """
    found: list[tuple[str, str]] = [(_ORT_FLOOR, f"every graph -> onnxruntime {_ORT_FLOOR}")]
    unknown: list[str] = []
    for domain, version in sorted(opsets.items()):
        if domain in ("", "ai.onnx"):
            hit = _first_ort(f"ai.onnx opset {version}", version, "opset")
        elif domain == "ai.onnx.ml":
            hit = _first_ort(f"ai.onnx.ml opset {version}", version, "ml_opset")
        elif domain == "com.microsoft":
            continue  # judged per op below
        else:
            hit = None
        if hit is None:
            unknown.append(f"opset {domain or 'ai.onnx'} {version}")
        else:
            found.append(hit)
    hit = _first_ort(f"IR version {ir_version}", ir_version, "ir_version")
    if hit is None:
        unknown.append(f"IR version {ir_version}")
    else:
        found.append(hit)
    for op in sorted(set(contrib_ops)):
        if op in ORT_CONTRIB_OPS:
            found.append((ORT_CONTRIB_OPS[op], f"com.microsoft {op} -> onnxruntime {ORT_CONTRIB_OPS[op]}"))
        else:
            unknown.append(f"com.microsoft {op}")
    return _highest(found, host, unknown)


# ---- OpenVINO ----------------------------------------------------------------------------------
# Source: OpenVINO "Available Operation Sets" (docs.openvino.ai/2024/documentation/openvino-ir-format/
# operation-sets/available-opsets.html): the release that introduced each operation set.
OPENVINO_OPSETS: dict[int, str] = {
    1: "2020.1.0", 2: "2020.2.0", 3: "2020.4.0", 4: "2021.1.0", 5: "2021.2.0", 6: "2021.3.0", 7: "2021.4.0",
    8: "2022.1.0", 9: "2022.2.0", 10: "2022.3.0", 11: "2023.0.0", 12: "2023.1.0", 13: "2023.2.0",
    14: "2024.0.0", 15: "2024.5.0",
}  # fmt: skip
# IR v10 came with opset1 (2020.1); IR v11 with OpenVINO's API 2.0 (2022.1, "OpenVINO IR v11" in its
# release notes): an IR v11 file needs 2022.1 or later.
OPENVINO_IR_VERSIONS: dict[int, str] = {10: "2020.1.0", 11: "2022.1.0"}
# Element types every IR v10/v11 reader knows (the IR v10 specification's precisions); newer ones
# (u4/i4/nf4 weights, the f8 and f4 types) came in later releases and get the build host's release.
OPENVINO_BASE_TYPES = frozenset(
    {"f64", "f32", "f16", "bf16", "i64", "i32", "i16", "i8", "u64", "u32", "u16", "u8", "u1", "boolean"}
)


def openvino_min_version(
    ir_version: int, layer_opsets: Iterable[str], element_types: Iterable[str] = (), host: str | None = None
) -> Requirement:
    """The first OpenVINO release that reads an IR of ``ir_version`` whose layers use ``layer_opsets``.

    Args:
        ir_version: the ``version`` attribute of the IR's ``<net>``.
        layer_opsets: the layers' ``version`` attributes (``"opset1"``, ``"opset13"``, extension names).
        element_types: the ``element_type`` attributes of the layers' data (``"f32"``, ``"u4"``, ...).
        host: the build host's OpenVINO version, for anything the tables do not know.

    Raises:
        ValueError: something is unknown and no ``host`` was given.
    """
    found: list[tuple[str, str]] = []
    unknown: list[str] = []
    if ir_version in OPENVINO_IR_VERSIONS:
        first = OPENVINO_IR_VERSIONS[ir_version]
        found.append((first, f"IR v{ir_version} -> openvino {first}"))
    else:
        unknown.append(f"IR v{ir_version}")
    for name in sorted(set(layer_opsets)):
        match = re.fullmatch(r"opset(\d+)", name)
        number = int(match.group(1)) if match else None
        if number in OPENVINO_OPSETS:
            found.append((OPENVINO_OPSETS[number], f"{name} -> openvino {OPENVINO_OPSETS[number]}"))
        else:
            unknown.append(f"operation set {name!r}")
    unknown.extend(f"element type {t}" for t in sorted(set(element_types) - OPENVINO_BASE_TYPES))
    return _highest(found, host, unknown)


# ---- TFLite / LiteRT ---------------------------------------------------------------------------
# TFLite converters write ``min_runtime_version`` into the model's metadata: the TensorFlow Lite runtime
# release every (builtin op, op version) in the model needs, from the table in tensorflow's
# tensorflow/lite/tools/versioning/runtime_version.cc (FindMinimumRuntimeVersionForOp; e.g.
# FULLY_CONNECTED v5 -> "2.0.0"). That names TensorFlow / tflite-runtime releases. ai-edge-litert
# numbers its releases afresh: its first release, 1.0.0 (September 2024), is LiteRT cut from TensorFlow's
# sources after 2.17, so it runs every op version of TF 2.17 and before. Newer requirements get the
# build host's ai-edge-litert release (no published mapping from later TF releases).
LITERT_FIRST_RELEASE = "1.0.0"
LITERT_FIRST_RELEASE_COVERS_TF = "2.17.0"
_TF_PACKAGES = ("tflite-runtime", "tensorflow")  # numbered like min_runtime_version itself


def litert_min_version(min_runtime_version: str | None, package: str = "ai-edge-litert",
                       host: str | None = None) -> Requirement:  # fmt: skip
    """The first release of ``package`` that runs a .tflite whose metadata says ``min_runtime_version``.

    Args:
        min_runtime_version: the model's ``min_runtime_version`` metadata (a TensorFlow release), or
            None when the converter wrote none.
        package: ``ai-edge-litert``, or ``tflite-runtime`` / ``tensorflow`` (numbered like TensorFlow).
        host: the build host's version of ``package``, for what the table does not know.

    Raises:
        ValueError: something is unknown and no ``host`` was given.
    """
    if not min_runtime_version or not _key(min_runtime_version)[0]:
        return _highest([], host, ["a model without min_runtime_version metadata"])
    needed = ".".join(str(n) for n in _key(min_runtime_version))
    why = f"min_runtime_version {min_runtime_version} (TensorFlow Lite runtime)"
    if package in _TF_PACKAGES:
        return Requirement(needed, (f"{why} -> {package} {needed}",))
    if _key(needed) <= _key(LITERT_FIRST_RELEASE_COVERS_TF):
        return Requirement(LITERT_FIRST_RELEASE, (f"{why} -> {package} {LITERT_FIRST_RELEASE}",))
    return _highest([], host, [why])


# ---- Core ML -----------------------------------------------------------------------------------
# Source: coremltools' ``ct.target`` (coremltools/models/_deployment_compatibility.py), whose values are
# the Core ML specification versions; Apple's OS releases share them (iOS15 == macOS12 == 6, ...).
COREML_SPEC_OS: dict[int, dict[str, str]] = {
    4: {"iOS": "13", "macOS": "10.15", "watchOS": "6", "tvOS": "13"},
    5: {"iOS": "14", "macOS": "11", "watchOS": "7", "tvOS": "14"},
    6: {"iOS": "15", "macOS": "12", "watchOS": "8", "tvOS": "15"},
    7: {"iOS": "16", "macOS": "13", "watchOS": "9", "tvOS": "16"},
    8: {"iOS": "17", "macOS": "14", "watchOS": "10", "tvOS": "17"},
    9: {"iOS": "18", "macOS": "15", "watchOS": "11", "tvOS": "18"},
    10: {"iOS": "26", "macOS": "26", "watchOS": "26", "tvOS": "26"},
}
# The coremltools release that added each specification version to ``ct.target`` (and can load it):
# 5.0 brought ML programs (iOS15), then one major release per OS year (coremltools release notes).
COREML_SPEC_COREMLTOOLS: dict[int, str] = {
    4: "4.0.0", 5: "4.0.0", 6: "5.0.0", 7: "6.0.0", 8: "7.0.0", 9: "8.0.0", 10: "9.0.0",
}  # fmt: skip


# What edgeship builds for Core ML: ML programs need iOS 15 / macOS 12; the compressed precisions need
# iOS 16 / macOS 13 (coremltools' ``ct.target`` and packagers.targets.coreml). Keys: "ios", "darwin".
COREML_ML_PROGRAM_MIN_OS: dict[str, int] = {"ios": 15, "darwin": 12}
COREML_MIN_OS: dict[str, dict[str, int]] = {
    "int8-weights": {"ios": 16, "darwin": 13},
    "int4-palette": {"ios": 16, "darwin": 13},
}


def coreml_os_versions(specification_version: int) -> dict[str, str]:
    """The first OS releases that run a Core ML model of this specification version (``{"iOS": "15", ...}``).

    Raises:
        ValueError: a specification version the table does not know.
    """
    try:
        return dict(COREML_SPEC_OS[specification_version])
    except KeyError:
        raise ValueError(f"Core ML specification version {specification_version} is not in edgeship's table "
                         f"(known: {', '.join(map(str, COREML_SPEC_OS))})") from None  # fmt: skip


def coreml_spec_for_os(name: str) -> int:
    """The newest specification version an OS release runs: ``"iOS16"``, ``"macOS 13"``, ``"macOS13.4"`` -> 7.

    Raises:
        ValueError: an OS or release the table does not know (the message lists the names it does).
    """
    match = re.fullmatch(r"\s*(iOS|macOS|watchOS|tvOS)\s*(\d+(?:\.\d+)?)\s*", name, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"unknown OS release {name!r}; expected e.g. iOS16, macOS13, watchOS9, tvOS16")
    family = {k.lower(): k for k in ("iOS", "macOS", "watchOS", "tvOS")}[match.group(1).lower()]
    wanted = _key(match.group(2))
    best = None
    for spec, names in sorted(COREML_SPEC_OS.items()):
        if _key(names[family]) <= wanted:
            best = spec
    if best is None:
        first = COREML_SPEC_OS[min(COREML_SPEC_OS)][family]
        raise ValueError(f"{family} {match.group(2)} is older than edgeship's table ({family} {first} and later)")
    return best


def coreml_min_version(specification_version: int, host: str | None = None) -> Requirement:
    """The first coremltools release that loads a model of this specification version.

    Raises:
        ValueError: an unknown specification version and no ``host``.
    """
    version = COREML_SPEC_COREMLTOOLS.get(specification_version)
    if version is None:
        return _highest([], host, [f"Core ML specification version {specification_version}"])
    names = ", ".join(f"{k} {v}" for k, v in COREML_SPEC_OS[specification_version].items())
    return Requirement(version, (f"specification version {specification_version} ({names}) -> coremltools {version}",))
