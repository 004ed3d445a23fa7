"""Device profiles: the devices edgeship packages for, read from one data file (``sdk/profiles.json``).

A profile says what a class of device has: CPU architecture, operating system and C library, Python,
the runtime release of each bundle target (``runtimes``), accelerators and the numpy it needs.
``edgeship devices`` lists them, ``edgeship package --device NAME`` builds for one, and
``tests/sdk/test_install_platforms.py`` resolves each one's install from PyPI, so a runtime that has no
wheel for a profile's platform is caught there. Pure: reading the package's own data file is the only I/O,
and every field is checked when the file is parsed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import Any

from sdk.compat import RUNTIME_PACKAGES, version_at_least
from sdk.errors import InputError
from sdk.runtime_versions import ORT_NUMPY2_SINCE

__all__ = [
    "OS_NAMES",
    "RUNTIME_SOURCES",
    "DeviceProfile",
    "RuntimeRelease",
    "RuntimeSpec",
    "get_profile",
    "load_profiles",
    "parse_profiles",
    "parse_runtime_spec",
    "profile_table",
]

OS_NAMES = ("linux", "darwin", "ios")  # ``sys.platform`` spellings, plus ios
RUNTIME_SOURCES = ("pypi", "vendor", "system")  # where the runtime comes from: PyPI, a vendor index, the OS
_TARGETS = ("onnxruntime", "openvino", "tflite", "coreml")
_VERSION = re.compile(r"\d+(\.\d+)*")
_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
_PROFILE_KEYS = frozenset(
    {"description", "arch", "os", "os_version", "glibc", "python", "runtimes", "accelerators", "numpy", "notes",
     "sources"}
)  # fmt: skip
_RUNTIME_KEYS = frozenset({"package", "version", "source"})


@dataclass(frozen=True)
class RuntimeRelease:
    """One runtime release a profile has for a bundle target."""

    package: str  # the distribution (``onnxruntime-gpu``), or the OS framework (``CoreML.framework``)
    version: str  # dotted release number
    source: str  # one of RUNTIME_SOURCES


@dataclass(frozen=True)
class DeviceProfile:
    """A class of device (``raspberry-pi-5``), as ``profiles.json`` describes it."""

    name: str
    description: str
    arch: str  # the manifest's vocabulary: aarch64, x86_64
    os: str  # one of OS_NAMES
    os_version: str  # Debian/Ubuntu release, iOS or macOS major version
    glibc: str | None  # Linux only
    python: str | None  # None: no Python on the device (an app embeds the model)
    runtimes: Mapping[str, RuntimeRelease]  # bundle target -> release
    accelerators: tuple[str, ...]  # the names of device_runtime._sysinfo.accelerators
    numpy: str | None  # the numpy requirement on the device (a PEP 440 specifier)
    notes: tuple[str, ...]
    sources: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The profile as JSON-ready data (``edgeship devices --json``)."""
        return {
            "name": self.name, "description": self.description, "arch": self.arch, "os": self.os,
            "os_version": self.os_version, "glibc": self.glibc, "python": self.python,
            "runtimes": {t: {"package": r.package, "version": r.version, "source": r.source}
                         for t, r in self.runtimes.items()},
            "accelerators": list(self.accelerators), "numpy": self.numpy, "notes": list(self.notes),
            "sources": list(self.sources),
        }  # fmt: skip

    def capabilities(self) -> dict[str, Any]:
        """The ``status`` capabilities such a device reports (docs/mqtt.md), for ``sdk.compat``'s rule."""
        return {
            "arch": self.arch,
            "os": self.os,
            "runtimes": {r.package: r.version for r in self.runtimes.values()},
            "accelerators": list(self.accelerators),
        }


@dataclass(frozen=True)
class RuntimeSpec:
    """A ``--for`` request: a bundle target and, optionally, the runtime release to build for."""

    target: str
    package: str | None  # None: the target's usual distribution
    version: str | None  # None: any release


def _str(value: Any, where: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _version(value: Any, where: str, *, optional: bool = False) -> str | None:
    text = _str(value, where, optional=optional)
    if text is not None and not _VERSION.fullmatch(text):
        raise InputError(f"{where} must be a dotted release number, got {text!r}")
    return text


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InputError(f"{where} must be a list of strings, got {value!r}")
    return tuple(value)


def _runtime(raw: Any, where: str) -> RuntimeRelease:
    if not isinstance(raw, dict) or set(raw) != _RUNTIME_KEYS:
        raise InputError(f"{where} must have exactly the keys {sorted(_RUNTIME_KEYS)}, got {raw!r}")
    source = _str(raw["source"], f"{where}.source")
    if source not in RUNTIME_SOURCES:
        raise InputError(f"{where}.source must be one of {', '.join(RUNTIME_SOURCES)}, got {source!r}")
    return RuntimeRelease(
        package=str(_str(raw["package"], f"{where}.package")),
        version=str(_version(raw["version"], f"{where}.version")),
        source=source,
    )


def _profile(name: str, raw: Any) -> DeviceProfile:
    where = f"profile {name!r}"
    if not _NAME.fullmatch(name):
        raise InputError(f"{where}: names are lower-case letters, digits and dashes")
    if not isinstance(raw, dict) or set(raw) != _PROFILE_KEYS:
        missing, extra = sorted(_PROFILE_KEYS - set(raw or ())), sorted(set(raw or ()) - _PROFILE_KEYS)
        raise InputError(f"{where}: missing keys {missing}, unknown keys {extra}")
    os_name = _str(raw["os"], f"{where}.os")
    if os_name not in OS_NAMES:
        raise InputError(f"{where}.os must be one of {', '.join(OS_NAMES)}, got {os_name!r}")
    glibc = _version(raw["glibc"], f"{where}.glibc", optional=True)
    if (glibc is None) != (os_name != "linux"):
        raise InputError(f"{where}: glibc is given for linux and only for linux")
    runtimes_raw = raw["runtimes"]
    if not isinstance(runtimes_raw, dict) or not runtimes_raw:
        raise InputError(f"{where}.runtimes must map bundle targets to releases")
    unknown = sorted(set(runtimes_raw) - set(_TARGETS))
    if unknown:
        raise InputError(f"{where}.runtimes: unknown targets {unknown}; known: {', '.join(_TARGETS)}")
    runtimes = {t: _runtime(r, f"{where}.runtimes.{t}") for t, r in runtimes_raw.items()}
    python = _version(raw["python"], f"{where}.python", optional=True)
    if python is None and any(r.source == "pypi" for r in runtimes.values()):
        raise InputError(f"{where}: a runtime from PyPI needs a python version")
    numpy = _str(raw["numpy"], f"{where}.numpy", optional=True)
    ort = runtimes.get("onnxruntime")
    if ort is not None and not version_at_least(ort.version, ORT_NUMPY2_SINCE) and "<2" not in (numpy or ""):
        raise InputError(f"{where}: onnxruntime {ort.version} needs numpy<2 (numpy 2 since {ORT_NUMPY2_SINCE})")
    return DeviceProfile(
        name=name,
        description=str(_str(raw["description"], f"{where}.description")),
        arch=str(_str(raw["arch"], f"{where}.arch")),
        os=os_name,
        os_version=str(_version(raw["os_version"], f"{where}.os_version")),
        glibc=glibc,
        python=python,
        runtimes=MappingProxyType(runtimes),
        accelerators=_strings(raw["accelerators"], f"{where}.accelerators"),
        numpy=numpy,
        notes=_strings(raw["notes"], f"{where}.notes"),
        sources=_strings(raw["sources"], f"{where}.sources"),
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise InputError(f"duplicate keys in the profiles file: {dupes}")
    return dict(pairs)


def parse_profiles(data: bytes) -> Mapping[str, DeviceProfile]:
    """Parse and check a profiles file (``{"schema": 1, "profiles": {name: profile}}``).

    Raises:
        InputError: not JSON, a duplicate key, or any field missing, unknown or of the wrong form.
    """
    try:
        raw = json.loads(data, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"the profiles file is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or raw.get("schema") != 1 or not isinstance(raw.get("profiles"), dict):
        raise InputError('the profiles file must be {"schema": 1, "profiles": {...}}')
    return MappingProxyType({name: _profile(name, p) for name, p in raw["profiles"].items()})


@lru_cache(maxsize=1)
def load_profiles() -> Mapping[str, DeviceProfile]:
    """The profiles shipped with edgeship (``sdk/profiles.json``), parsed once.

    Raises:
        InputError: the shipped file is invalid (a test keeps it valid).
    """
    return parse_profiles(resources.files("sdk").joinpath("profiles.json").read_bytes())


def get_profile(name: str) -> DeviceProfile:
    """The profile called ``name``.

    Raises:
        InputError: no such profile; the message lists them.
    """
    profiles = load_profiles()
    if name not in profiles:
        raise InputError(f"unknown device {name!r}; known devices: {', '.join(profiles)} (see `edgeship devices`)")
    return profiles[name]


def parse_runtime_spec(text: str) -> RuntimeSpec:
    """``onnxruntime==1.17``, ``onnxruntime-gpu==1.20``, ``openvino``, ``coreml==iOS17`` as a RuntimeSpec.

    A distribution name stands for its target (``ai-edge-litert`` -> tflite); Core ML's version is the OS
    it must run on (``iOS17``, ``macOS14``), kept as written.

    Raises:
        InputError: not ``NAME`` or ``NAME==VERSION``, or NAME is no runtime edgeship builds for.
    """
    name, sep, version = text.strip().partition("==")
    name = name.strip().lower()
    version = version.strip()
    target = name if name in _TARGETS else RUNTIME_PACKAGES.get(name)
    if target is None:
        known = ", ".join(sorted({*_TARGETS, *RUNTIME_PACKAGES}))
        raise InputError(f"--for {text!r}: unknown runtime {name!r}; known: {known}")
    if sep and not version:
        raise InputError(f"--for {text!r}: give a version after ==, or none at all")
    coreml_os = re.fullmatch(r"(?i)(ios|macos)(\d+)", version) if target == "coreml" else None
    if version and coreml_os is None and not _VERSION.fullmatch(version):
        hint = " (Core ML: iOS17, macOS14, ...)" if target == "coreml" else ""
        raise InputError(f"--for {text!r}: {version!r} is not a release number{hint}")
    package = None if name == target else name
    return RuntimeSpec(target=target, package=package, version=version or None)


def profile_table(profiles: Mapping[str, DeviceProfile] | None = None) -> tuple[list[str], list[list[str]]]:
    """Headers and rows for ``edgeship devices`` and docs/devices.md."""
    rows = []
    for p in (profiles or load_profiles()).values():
        system = f"{p.os} {p.os_version}" + (f", glibc {p.glibc}" if p.glibc else "")
        runtimes = ", ".join(f"{r.package} {r.version}" + ("" if r.source == "pypi" else f" ({r.source})")
                             for r in p.runtimes.values())  # fmt: skip
        rows.append([p.name, p.arch, system, p.python or "-", runtimes, ", ".join(p.accelerators) or "-",
                     p.numpy or "-"])  # fmt: skip
    return ["device", "arch", "os", "python", "runtimes", "accelerators", "numpy"], rows
