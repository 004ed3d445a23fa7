"""Cached virtual environments that hold one runtime release: ``onnxruntime==1.17.3`` and its numpy.

``ensure_env("onnxruntime==1.17.3")`` returns a ``RuntimeEnv``: a ``python -m venv`` under the cache
folder (``$EDGESHIP_RUNTIME_ENVS``, default ``~/.cache/edgeship/runtimes``), keyed by package, version and
Python, holding that release, the numpy it was built against (numpy<2 where the release predates numpy 2),
and the device side's own dependencies (``cryptography``, ``paho-mqtt``). The device runtime itself is not
installed there: ``RuntimeEnv.run`` puts this checkout on ``PYTHONPATH``, so the code that runs is the
code being tested. Creation holds a lock file, so two processes never build one environment at once, and
an environment is used only once its ``ok`` marker is written.

Used by ``edgeship package --validate-on`` and by the compatibility matrix (``benchmarks/compat_matrix.py``).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
import venv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sdk.compat import version_at_least
from sdk.errors import PackagingError
from sdk.runtime_versions import ORT_NUMPY2_SINCE

__all__ = [
    "NUMPY2_SINCE",
    "RegistryUnreachable",
    "RuntimeEnv",
    "cache_dir",
    "check_wheel",
    "ensure_env",
    "env_requirements",
    "parse_pinned",
]

_REPO = Path(__file__).resolve().parent.parent
# The first release of each runtime whose wheels run with numpy 2; older ones need numpy<2 beside them.
# onnxruntime: its 1.19 release notes. openvino: 2024.2 (2024.0/2024.1 declare numpy<2.0.0).
# ai-edge-litert: 1.x wheels are built against numpy 1 (the 1.4.0 wheel fails to import under numpy 2).
NUMPY2_SINCE: dict[str, str] = {"onnxruntime": ORT_NUMPY2_SINCE, "openvino": "2024.2", "ai-edge-litert": "2.0"}
_DEVICE_DEPS = ("cryptography>=42", "paho-mqtt>=2.0")  # the device extra's imports a bundle check needs
_UNREACHABLE = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
                "Max retries exceeded", "Name or service not known")  # fmt: skip
_PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\d+(?:\.\d+)*)")
CREATE_TIMEOUT_S = 900.0  # seconds, one pip install


class RegistryUnreachable(PackagingError):
    """PyPI (or the configured index) could not be reached, so the environment cannot be made."""


@dataclass(frozen=True)
class RuntimeEnv:
    """One cached environment: ``python`` runs with ``package==version`` importable."""

    package: str
    version: str
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def run(self, args: Sequence[str], *, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
        """Run ``python ARGS`` in the environment with this checkout importable; output captured as text."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")}
        env["PYTHONPATH"] = str(_REPO)
        env["PYTHONNOUSERSITE"] = "1"
        return subprocess.run([str(self.python), *args], capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)  # fmt: skip


def parse_pinned(spec: str) -> tuple[str, str]:
    """``"onnxruntime==1.17.3"`` -> ``("onnxruntime", "1.17.3")``.

    Raises:
        PackagingError: not ``PACKAGE==VERSION`` with an exact version, or not a runtime package edgeship knows.
    """
    match = _PIN.fullmatch(spec.strip())
    if match is None:
        raise PackagingError(f"give an exact runtime release as PACKAGE==VERSION (onnxruntime==1.17.3), got {spec!r}")
    package, version = match.group(1).lower(), match.group(2)
    if package not in NUMPY2_SINCE:
        raise PackagingError(f"no validation environment for {package}; one of: {', '.join(NUMPY2_SINCE)}")
    return package, version


def env_requirements(package: str, version: str) -> list[str]:
    """What ``pip install`` puts in the environment for ``package==version``."""
    numpy = "numpy>=1.24,<2" if not version_at_least(version, NUMPY2_SINCE[package]) else "numpy>=1.24"
    return [f"{package}=={version}", numpy, *_DEVICE_DEPS]


def cache_dir() -> Path:
    """``$EDGESHIP_RUNTIME_ENVS``, else ``~/.cache/edgeship/runtimes``."""
    given = os.environ.get("EDGESHIP_RUNTIME_ENVS")
    return Path(given) if given else Path.home() / ".cache" / "edgeship" / "runtimes"


def _python_tag() -> str:
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def _pip_failure(package: str, version: str, stderr: str) -> PackagingError:
    last = (stderr.strip().splitlines() or [""])[-1][:300]
    if any(word in stderr for word in _UNREACHABLE):
        return RegistryUnreachable(f"cannot make the {package}=={version} environment: PyPI is not reachable ({last})")
    if "No matching distribution" in stderr or "Could not find a version" in stderr:
        return PackagingError(f"{package}=={version} has no wheel for this machine ({sys.platform}, "
                              f"{os.uname().machine}, Python {sys.version_info.major}.{sys.version_info.minor}): "
                              f"{last}")  # fmt: skip
    return PackagingError(f"pip could not install {package}=={version}: {last}")


def check_wheel(package: str, version: str) -> None:
    """Refuse, before any work, a release PyPI has no wheel of for this machine and Python.

    Resolves ``package==version`` with ``pip install --dry-run --only-binary=:all: --no-deps`` (metadata
    only). Skipped when the environment is already cached.

    Raises:
        PackagingError: no wheel for this platform. RegistryUnreachable: PyPI could not be reached.
    """
    if (cache_dir() / f"{package}-{version}-{_python_tag()}" / "ok").exists():
        return
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps",
                          "--only-binary=:all:", "--ignore-installed", f"{package}=={version}"],
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    if pip.returncode != 0:
        raise _pip_failure(package, version, pip.stderr)


def ensure_env(spec: str, *, say: Callable[[str], None] | None = None) -> RuntimeEnv:
    """The cached environment for ``spec`` (``PACKAGE==VERSION``), made on first use.

    Raises:
        PackagingError: a bad spec, no wheel for this machine, or pip failed.
        RegistryUnreachable: PyPI could not be reached while making it.
    """
    package, version = parse_pinned(spec)
    root = cache_dir() / f"{package}-{version}-{_python_tag()}"
    env = RuntimeEnv(package, version, root)
    if (root / "ok").exists():
        return env
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be making it: wait, then use theirs
        if (root / "ok").exists():
            return env
        if say is not None:
            say(f"making the {package}=={version} environment in {root} (once)")
        started = time.monotonic()
        shutil.rmtree(root, ignore_errors=True)  # a half-made one from an interrupted run
        venv.create(root, with_pip=True, clear=True)
        requirements = env_requirements(package, version)
        pip = subprocess.run([str(env.python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "--only-binary=:all:", *requirements],
                             capture_output=True, text=True, timeout=CREATE_TIMEOUT_S, check=False)  # fmt: skip
        if pip.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            raise _pip_failure(package, version, pip.stderr)
        marker = {"requirements": requirements, "seconds": round(time.monotonic() - started, 1),
                  "python": sys.version.split()[0]}  # fmt: skip
        (root / "ok").write_text(json.dumps(marker, sort_keys=True) + "\n")
    return env
