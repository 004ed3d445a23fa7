"""The device install resolves on each profile's platform: pip, asked for that platform's wheels, from PyPI.

For every profile with a Python (a Raspberry Pi, a Jetson, a Mac, an x86 gateway), pip resolves the
``device`` extra of pyproject.toml plus the profile's numpy requirement and its first runtime from PyPI
(``pip install --dry-run --only-binary=:all: --platform ... --report``): dependencies included, wheels only,
nothing installed. pip reads wheel metadata without downloading whole wheels where the index serves it,
and its HTTP cache makes a second run quick. A runtime or extra without a wheel for the device's
architecture, glibc or Python fails here, not on the device.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from sdk.profiles import DeviceProfile, load_profiles

ROOT = Path(__file__).resolve().parents[2]
_OFFLINE = ("NewConnectionError", "Max retries exceeded", "Could not fetch URL", "ProxyError",
            "Temporary failure in name resolution", "Network is unreachable")  # fmt: skip
_INSTALLABLE = [
    p for p in load_profiles().values() if p.python and any(r.source == "pypi" for r in p.runtimes.values())
]


def platform_tags(profile: DeviceProfile) -> list[str]:
    """The wheel platform tags such a device accepts, newest first (pip does not expand them itself)."""
    if profile.os == "linux":
        assert profile.glibc is not None
        minor = int(profile.glibc.split(".")[1])
        tags = [f"manylinux_2_{m}_{profile.arch}" for m in range(minor, 16, -1)]
        return [*tags, f"manylinux2014_{profile.arch}"]
    assert profile.os == "darwin" and profile.arch == "aarch64"
    majors = range(int(profile.os_version.split(".")[0]), 10, -1)
    return [f"macosx_{m}_0_{a}" for m in majors for a in ("arm64", "universal2")]


def _device_extra() -> list[str]:
    """The `device` extra of pyproject.toml, read with tomllib (3.11+) or from its one line (as
    tests/fleet/cli/test_fleet_device_install.py does)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        match = re.search(r"^device\s*=\s*\[(.*?)\]", text, re.M | re.S)
        assert match, "no device extra in pyproject.toml"
        return re.findall(r'"([^"]+)"', match.group(1))
    extras: dict[str, list[str]] = tomllib.loads(text)["project"]["optional-dependencies"]
    return extras["device"]


def requirements(profile: DeviceProfile) -> list[str]:
    """The device extra, the profile's numpy and its first runtime from PyPI, pinned."""
    extras = {"device": _device_extra()}
    runtime = next(r for r in profile.runtimes.values() if r.source == "pypi")
    numpy = [f"numpy{profile.numpy}"] if profile.numpy else []
    return [*extras["device"], *numpy, f"{runtime.package}=={runtime.version}"]


def _resolve(profile: DeviceProfile, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    assert profile.python is not None
    nodot = profile.python.replace(".", "")
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
               "--python-version", profile.python, "--implementation", "cp", "--abi", f"cp{nodot}", "--abi", "abi3",
               "--abi", "none", "--target", str(tmp_path / "target"), "--report", str(tmp_path / "report.json"),
               "--quiet", "--disable-pip-version-check"]  # fmt: skip
    for tag in platform_tags(profile):
        command += ["--platform", tag]
    wanted = requirements(profile)
    return subprocess.run([*command, *wanted], capture_output=True, text=True, timeout=300, check=False), wanted


@pytest.mark.network
@pytest.mark.parametrize("profile", _INSTALLABLE, ids=[p.name for p in _INSTALLABLE])
def test_the_device_install_resolves_on_the_profile_platform(profile: DeviceProfile, tmp_path: Path) -> None:
    done, wanted = _resolve(profile, tmp_path)
    if done.returncode != 0:
        if any(marker in done.stderr for marker in _OFFLINE):
            pytest.fail(f"cannot reach PyPI to resolve {profile.name}'s install (this check needs PyPI): "
                        f"{done.stderr.strip().splitlines()[-1]}")  # fmt: skip
        errors = [line for line in done.stderr.splitlines() if "ERROR" in line] or done.stderr.splitlines()[-3:]
        pytest.fail(f"{profile.name} ({profile.arch}, glibc {profile.glibc}, Python {profile.python}) cannot install "
                    f"{' '.join(wanted)}:\n" + "\n".join(errors))  # fmt: skip
    installed = {
        item["metadata"]["name"].lower(): (item["metadata"]["version"], item["download_info"]["url"].rsplit("/", 1)[-1])
        for item in json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))["install"]
    }
    runtime = next(r for r in profile.runtimes.values() if r.source == "pypi")
    assert installed[runtime.package][0] == runtime.version
    assert all(wheel.endswith(".whl") for _, wheel in installed.values())
    if profile.numpy and "<2" in profile.numpy:
        assert installed["numpy"][0].startswith("1."), installed["numpy"]


@pytest.mark.network
def test_a_runtime_without_a_wheel_for_the_platform_is_caught(tmp_path: Path) -> None:
    """onnxruntime 1.32 has no Python 3.10 wheel: an Ubuntu 22.04 gateway cannot install it."""
    x86 = load_profiles()["x86-gateway"]
    jammy = replace(x86, os_version="22.04", glibc="2.35", python="3.10")
    done, _ = _resolve(replace(jammy, runtimes={"onnxruntime": x86.runtimes["onnxruntime"]}), tmp_path)
    assert done.returncode != 0 and "onnxruntime==1.32.0" in done.stderr
