"""What this device can run, read without importing any runtime: architecture, runtimes, accelerators.

The fleet picks, per device, the bundle whose target and architecture the device can run, from the
``capabilities`` in its status. Runtime versions come from ``importlib.metadata`` (the installed
distributions), accelerators from device nodes and platform facts; nothing here imports onnxruntime,
openvino, LiteRT or Core ML, so reporting capabilities costs no memory or start-up time.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import sys
from importlib import metadata
from typing import Any

__all__ = [
    "ARCH_ALIASES",
    "RUNTIME_PACKAGES",
    "accelerators",
    "arch_compatible",
    "capabilities",
    "machine_arch",
    "runtime_versions",
    "system_uptime_s",
    "target_runs_here",
    "version_at_least",
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


def machine_arch(machine: str | None = None) -> str:
    """The CPU architecture in the manifest's vocabulary (``x86_64``, ``aarch64``, ``armv7l``, ...)."""
    raw = (machine if machine is not None else platform.machine()).lower()
    return ARCH_ALIASES.get(raw, raw)


def arch_compatible(bundle_archs: object, arch: str) -> bool:
    """Whether a manifest's ``runtime.arch`` list admits ``arch``; a missing list or ``"any"`` admits all."""
    if bundle_archs is None:
        return True
    if not isinstance(bundle_archs, list):
        return False
    normalised = {machine_arch(str(a)) for a in bundle_archs}
    return "any" in normalised or arch in normalised


def target_runs_here(target: str, platform_name: str | None = None) -> bool:
    """Whether this operating system can run ``target`` bundles at all (Core ML: macOS only)."""
    allowed = TARGET_PLATFORMS.get(target)
    return allowed is None or (platform_name or sys.platform) in allowed


def runtime_versions() -> dict[str, str]:
    """Installed runtime distributions that can run models here, with versions: ``{"onnxruntime": "1.20.1"}``."""
    found: dict[str, str] = {}
    for package, target in RUNTIME_PACKAGES.items():
        if not target_runs_here(target):
            continue
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


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


def accelerators(runtimes: dict[str, str] | None = None) -> list[str]:
    """Accelerators this device appears to have, from device nodes and installed runtime builds.

    Names: ``cuda`` (an NVIDIA device node), ``tegra`` (Jetson), ``gpu-dri`` (a DRM render node),
    ``npu`` (a Linux accel node), ``edgetpu`` (Coral), ``hailo``, ``apple-neural-engine`` (Apple silicon).
    """
    runtimes = runtime_versions() if runtimes is None else runtimes
    found: list[str] = []
    if glob.glob("/dev/nvidia[0-9]*") or "onnxruntime-gpu" in runtimes:
        found.append("cuda")
    if os.path.exists("/etc/nv_tegra_release"):
        found.append("tegra")
    if glob.glob("/dev/dri/renderD*"):
        found.append("gpu-dri")
    if glob.glob("/dev/accel/accel*"):
        found.append("npu")
    if glob.glob("/dev/apex_[0-9]*"):
        found.append("edgetpu")
    if glob.glob("/dev/hailo[0-9]*"):
        found.append("hailo")
    if sys.platform == "darwin" and machine_arch() == "aarch64":
        found.append("apple-neural-engine")
    return found


def system_uptime_s() -> float | None:
    """Seconds since the machine booted, where readable (Linux ``/proc/uptime``)."""
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def capabilities() -> dict[str, Any]:
    """``{"arch", "runtimes": {package: version}, "accelerators": [...], "os", "python"}`` for the status."""
    runtimes = runtime_versions()
    return {
        "arch": machine_arch(),
        "runtimes": runtimes,
        "accelerators": accelerators(runtimes),
        "os": sys.platform,
        "python": platform.python_version(),
    }
