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
import sys
from collections.abc import Collection
from importlib import metadata
from typing import Any

# The rule's vocabulary and helpers live in the kernel (the fleet decides with them too); re-exported here.
from sdk.compat import (
    ARCH_ALIASES,
    RUNTIME_PACKAGES,
    TARGET_PLATFORMS,
    arch_compatible,
    normalise_arch,
    target_runs_on,
    version_at_least,
)

__all__ = [
    "ARCH_ALIASES",
    "RUNTIME_PACKAGES",
    "TARGET_PLATFORMS",
    "accelerators",
    "arch_compatible",
    "capabilities",
    "machine_arch",
    "runtime_versions",
    "system_uptime_s",
    "target_runs_here",
    "version_at_least",
]


def machine_arch(machine: str | None = None) -> str:
    """The CPU architecture in the manifest's vocabulary (``x86_64``, ``aarch64``, ``armv7l``, ...)."""
    return normalise_arch(machine if machine is not None else platform.machine())


def target_runs_here(target: str, platform_name: str | None = None) -> bool:
    """Whether this operating system can run ``target`` bundles at all (Core ML: macOS only)."""
    return target_runs_on(target, platform_name or sys.platform)


def runtime_versions(targets: Collection[str] | None = None) -> dict[str, str]:
    """Installed runtime distributions that can run models here, with versions: ``{"onnxruntime": "1.20.1"}``.

    Args:
        targets: only the runtimes of these bundle targets (None: every target).
    """
    found: dict[str, str] = {}
    for package, target in RUNTIME_PACKAGES.items():
        if not target_runs_here(target) or (targets is not None and target not in targets):
            continue
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


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


def capabilities(targets: Collection[str] | None = None) -> dict[str, Any]:
    """``{"arch", "runtimes": {package: version}, "accelerators": [...], "os", "python"}`` for the status.

    Args:
        targets: report (and so accept) only the runtimes of these bundle targets, for a device that has
            several installed but is to run one (None: every installed runtime).
    """
    runtimes = runtime_versions(targets)
    return {
        "arch": machine_arch(),
        "runtimes": runtimes,
        "accelerators": accelerators(runtimes),
        "os": sys.platform,
        "python": platform.python_version(),
    }
