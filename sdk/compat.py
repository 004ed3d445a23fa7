"""Whether a bundle runs on a device, decided from the device's reported ``capabilities``: one rule, two users.

The device agent refuses a bundle it cannot run before it installs it (``device_runtime.agent.staging``),
and the fleet picks, per device, the bundle of a release that device can run (``fleet.releases``). Both
call ``why_incompatible`` here, so the fleet never sends a bundle the device would refuse and never
withholds one it would take. Pure: no I/O and no platform probing; the device reads its own facts in
``device_runtime._sysinfo.capabilities()`` and passes them in, as it publishes them in its ``status``
(docs/mqtt.md)::

    {"arch": "aarch64", "runtimes": {"onnxruntime": "1.20.1"}, "accelerators": ["cuda"], "os": "linux"}

A bundle's side of the rule is ``RuntimeFacts``: its target and the manifest's ``runtime`` package,
minimum version and CPU architectures, plus the accelerators it is built for. Accelerators are not part
of the device's refusal (a device's accelerator detection is a guess from device nodes, and a bundle that
asks for a missing ONNX Runtime provider falls back to the CPU), so they are a separate question,
``missing_accelerators``, that the fleet asks when it chooses among bundles: an OpenVINO bundle compiled
for the GPU or NPU, or a LiteRT bundle for the Edge TPU, fails to load without it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdk.manifest import Manifest

__all__ = [
    "ARCH_ALIASES",
    "RUNTIME_PACKAGES",
    "TARGET_PLATFORMS",
    "RuntimeFacts",
    "arch_compatible",
    "missing_accelerators",
    "normalise_arch",
    "target_runs_on",
    "version_at_least",
    "why_incompatible",
]

# distribution name -> the bundle target it serves
RUNTIME_PACKAGES: dict[str, str] = {
    "onnxruntime": "onnxruntime",
    "onnxruntime-gpu": "onnxruntime",
    "onnxruntime-openvino": "onnxruntime",
    "onnxruntime-directml": "onnxruntime",
    "openvino": "openvino",
    "ai-edge-litert": "tflite",
    "tflite-runtime": "tflite",
    "coremltools": "coreml",
}
# targets whose runtime can only run models on some operating systems (coremltools installs on Linux too)
TARGET_PLATFORMS: dict[str, tuple[str, ...]] = {"coreml": ("darwin",)}
ARCH_ALIASES: dict[str, str] = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}

# What a manifest's runtime section names -> the accelerator (the names of ``_sysinfo.accelerators``).
_ORT_PROVIDERS = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda",
                  "CoreMLExecutionProvider": "apple-neural-engine"}  # fmt: skip
_OPENVINO_DEVICES = {"GPU": "gpu-dri", "NPU": "npu"}
_TFLITE_DELEGATES = {"edgetpu": "edgetpu"}


def normalise_arch(raw: str) -> str:
    """A CPU architecture in the manifest's vocabulary (``x86_64``, ``aarch64``, ``armv7l``, ...)."""
    low = raw.lower()
    return ARCH_ALIASES.get(low, low)


def arch_compatible(bundle_archs: object, arch: str) -> bool:
    """Whether a manifest's ``runtime.arch`` list admits ``arch``; a missing list or ``"any"`` admits all."""
    if bundle_archs is None:
        return True
    if not isinstance(bundle_archs, (list, tuple)):
        return False
    normalised = {normalise_arch(str(a)) for a in bundle_archs}
    return "any" in normalised or normalise_arch(arch) in normalised


def target_runs_on(target: str, platform_name: str) -> bool:
    """Whether an operating system (``sys.platform``) can run ``target`` bundles at all (Core ML: macOS only)."""
    allowed = TARGET_PLATFORMS.get(target)
    return allowed is None or platform_name in allowed


def _version_tuple(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def version_at_least(installed: str, minimum: str) -> bool:
    """Compare dotted release numbers (``"1.20.1" >= "1.17"``); suffixes such as ``rc1`` are ignored."""
    have, need = _version_tuple(installed), _version_tuple(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


@dataclass(frozen=True)
class RuntimeFacts:
    """The facts of a bundle the rule needs; what the fleet stores per bundle (``to_dict``).

    Attributes:
        target: the manifest's target (``onnxruntime``, ``openvino``, ``tflite``, ``coreml``).
        package: the runtime distribution it was built for (None: the target's name).
        min_version: the lowest version of that runtime it needs (None: any).
        arch: CPU architectures it runs on (None: any).
        accelerators: accelerators it is built to use, preferred ones included.
        required_accelerators: accelerators it cannot load without (a subset of ``accelerators``).
    """

    target: str
    package: str | None = None
    min_version: str | None = None
    arch: tuple[str, ...] | None = None
    accelerators: tuple[str, ...] = ()
    required_accelerators: tuple[str, ...] = ()

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> RuntimeFacts:
        runtime = manifest.runtime
        wanted: list[str] = []
        required: list[str] = []
        if manifest.target == "onnxruntime":  # providers fall back to the CPU: preferred, not required
            wanted = [_ORT_PROVIDERS[p] for p in runtime.providers or () if p in _ORT_PROVIDERS]
        elif manifest.target == "openvino" and runtime.devices:  # the first device must exist (backend)
            first = str(runtime.devices[0]).strip().upper().split(".")[0]
            if first in _OPENVINO_DEVICES:
                required = [_OPENVINO_DEVICES[first]]
            wanted = [_OPENVINO_DEVICES[d] for d in (str(x).upper().split(".")[0] for x in runtime.devices)
                      if d in _OPENVINO_DEVICES]  # fmt: skip
        elif manifest.target == "tflite":  # an external delegate that cannot load fails the bundle
            required = [_TFLITE_DELEGATES[d] for d in runtime.delegates or () if d in _TFLITE_DELEGATES]
            wanted = list(required)
        elif manifest.target == "coreml" and runtime.compute_units not in (None, "CPU_ONLY"):
            wanted = ["apple-neural-engine"]
        return cls(
            target=manifest.target,
            package=runtime.package,
            min_version=runtime.min_version,
            arch=None if runtime.arch is None else tuple(str(a) for a in runtime.arch),
            accelerators=tuple(dict.fromkeys(wanted)),
            required_accelerators=tuple(dict.fromkeys(required)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "package": self.package,
            "min_version": self.min_version,
            "arch": None if self.arch is None else list(self.arch),
            "accelerators": list(self.accelerators),
            "required_accelerators": list(self.required_accelerators),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RuntimeFacts:
        arch = d.get("arch")
        return cls(
            target=str(d["target"]),
            package=d.get("package"),
            min_version=d.get("min_version"),
            arch=None if arch is None else tuple(arch),
            accelerators=tuple(d.get("accelerators") or ()),
            required_accelerators=tuple(d.get("required_accelerators") or ()),
        )


def _facts(bundle: RuntimeFacts | Manifest) -> RuntimeFacts:
    return bundle if isinstance(bundle, RuntimeFacts) else RuntimeFacts.from_manifest(bundle)


def why_incompatible(bundle: RuntimeFacts | Manifest, capabilities: Mapping[str, Any]) -> str | None:
    """Why a device with these ``capabilities`` cannot run the bundle, or None when it can.

    Checks, in order: the operating system (``os``) can run the target at all, a runtime distribution of
    the target is installed (``runtimes``), one of them is at least the bundle's ``min_version``, and the
    CPU (``arch``) is one the bundle lists. ``capabilities`` may come from the network: any shape is
    answered with a reason, never an exception.
    """
    facts = _facts(bundle)
    if not isinstance(capabilities, Mapping):
        return "the device reported no capabilities"
    runtimes = capabilities.get("runtimes")
    if not isinstance(runtimes, Mapping) or not all(isinstance(v, str) for v in runtimes.values()):
        return "the device reported no runtimes (capabilities.runtimes must map packages to versions)"
    platform_name = capabilities.get("os")
    if facts.target in TARGET_PLATFORMS and not (
        isinstance(platform_name, str) and target_runs_on(facts.target, platform_name)
    ):
        where = " or ".join(TARGET_PLATFORMS[facts.target])
        return f"{facts.target} bundles do not run on {platform_name or 'an unreported OS'} (only on {where})"
    package = facts.package or facts.target
    installed = {p: v for p, v in runtimes.items() if RUNTIME_PACKAGES.get(p) == facts.target}
    if not installed:
        return f"no {facts.target} runtime is installed (the bundle needs {package})"
    minimum = facts.min_version
    if minimum is not None and not any(version_at_least(v, minimum) for v in installed.values()):
        return f"the bundle needs {package} >= {minimum}; this device has {installed}"
    arch = capabilities.get("arch")
    if not isinstance(arch, str):
        return "the device reported no CPU architecture (capabilities.arch)"
    archs = None if facts.arch is None else list(facts.arch)
    if not arch_compatible(archs, arch):
        return f"the bundle is built for {archs}, this device is {arch}"
    return None


def missing_accelerators(bundle: RuntimeFacts | Manifest, capabilities: Mapping[str, Any]) -> tuple[str, ...]:
    """The accelerators the bundle cannot load without that the device does not report (empty: none)."""
    facts = _facts(bundle)
    have = capabilities.get("accelerators") if isinstance(capabilities, Mapping) else None
    present = {a for a in have if isinstance(a, str)} if isinstance(have, list) else set()
    return tuple(a for a in facts.required_accelerators if a not in present)
