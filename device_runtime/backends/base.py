"""The seam between ``Model`` and one edge runtime.

``Backend.load`` / ``Backend.run`` are the public methods: they convert the runtime's own exceptions
into ``BackendError`` and check what comes back, then call the protected ``_load`` / ``_run`` an
adapter implements. Adapters import their runtime package inside ``_load`` (through
``import_runtime``), so importing an adapter module never needs the runtime installed.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from sdk.errors import BackendError, EdgeshipError
from sdk.manifest import Manifest

__all__ = ["Backend", "BackendOptions", "import_failure", "install_hint"]


def install_hint(extra: str) -> str:
    """The one command that installs a runtime extra."""
    return f"pip install 'edgeship[{extra}]'"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _installed(distributions: tuple[str, ...]) -> list[tuple[str, str]]:
    from importlib import metadata

    found = []
    for dist in distributions:
        try:
            found.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            continue
    return found


_NUMPY_ABI = ("compiled using NumPy 1.x", "numpy.core.multiarray failed to import", "_ARRAY_API not found",
              "numpy.core._multiarray_umath")  # fmt: skip
# Runtimes whose wheels before this release were built against numpy 1.x only (None: every release).
# Their import fails beside numpy 2 with an empty ImportError; numpy prints the reason on stderr.
# Sources: onnxruntime 1.19.0 release notes ("support for numpy 2.0"); tflite-runtime's last release, 2.14.
_NUMPY1_ONLY_BEFORE: dict[str, str | None] = {"onnxruntime": "1.19.0", "onnxruntime-gpu": "1.19.0",
                                               "tflite-runtime": None}  # fmt: skip


def _numpy1_build(dist: str, version: str) -> bool:
    from sdk.compat import version_at_least

    if dist not in _NUMPY1_ONLY_BEFORE:
        return False
    first_numpy2 = _NUMPY1_ONLY_BEFORE[dist]
    return first_numpy2 is None or not version_at_least(version, first_numpy2)


def import_failure(target: str, module: str, error: BaseException, extra: str) -> str:
    """Why ``module`` (the runtime of ``target`` bundles) did not import, and what to do about it.

    A runtime that is not installed is told apart from one that is installed but broken: a wheel built
    for numpy 1.x beside numpy 2 (onnxruntime before 1.19, tflite-runtime), a missing shared library.
    """
    from sdk.compat import RUNTIME_PACKAGES

    distributions = tuple(d for d, t in RUNTIME_PACKAGES.items() if t == target) or (module,)
    installed = _installed(distributions)
    if not installed:
        return (f"bundle target {target!r} needs the {module} package, which is not installed; "
                f"install it with: {install_hint(extra)}")  # fmt: skip
    what = ", ".join(f"{d} {v}" for d, v in installed)
    cause = f"{type(error).__name__}: {_first_line(error)}"
    chain = " ".join(str(e) for e in (error, error.__cause__, error.__context__) if e is not None)
    numpy1 = any(marker in chain for marker in _NUMPY_ABI) or any(_numpy1_build(d, v) for d, v in installed)
    if numpy1 and int(np.__version__.split(".")[0]) >= 2:
        advice = (f"it was built for numpy 1.x and numpy {np.__version__} is installed: pip install 'numpy<2' "
                  f"(or a release of {installed[0][0]} built for numpy 2)")  # fmt: skip
    else:
        dist, version = installed[0]
        advice = f"reinstall it (pip install --force-reinstall '{dist}=={version}') or install another release"
    return f"bundle target {target!r}: {what} is installed but failed to import ({cause}); {advice}"


@dataclass(frozen=True)
class BackendOptions:
    """What the caller may tune about a backend; ``None`` means the bundle's or runtime's default."""

    providers: tuple[str, ...] | None = None  # ONNX Runtime execution providers, in order of preference
    intra_op_threads: int | None = None  # threads inside one operator; 0 or None lets the runtime pick
    device: str | None = None  # OpenVINO device: CPU, GPU, NPU, AUTO (default: the bundle's)
    performance_hint: str | None = None  # OpenVINO: LATENCY or THROUGHPUT (default: the bundle's)
    cache_dir: str | None = None  # OpenVINO compiled-model cache folder, so a restart does not recompile
    compute_units: str | None = None  # Core ML: ALL, CPU_ONLY, CPU_AND_NE, CPU_AND_GPU (default: the bundle's)

    def __post_init__(self) -> None:
        if self.intra_op_threads is not None and (
            isinstance(self.intra_op_threads, bool)
            or not isinstance(self.intra_op_threads, int)
            or self.intra_op_threads < 0
        ):
            raise BackendError(f"intra_op_threads must be an int >= 0, got {self.intra_op_threads!r}")
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", str(self.cache_dir))


class Backend(abc.ABC):
    """One loaded model in one runtime. Not reusable: ``load`` once, ``run`` many times, ``close``."""

    name: ClassVar[str]  # the manifest target this adapter serves
    package: ClassVar[str]  # the runtime's import name
    extra: ClassVar[str]  # the pip extra that installs the runtime

    def __init__(self) -> None:
        self._manifest: Manifest | None = None

    @classmethod
    def import_runtime(cls) -> ModuleType:
        """Import the runtime package.

        Raises:
            BackendError: it is not installed (the message names the extra to install), or it is installed
                and fails to import (the message says what failed and what to do).
        """
        try:
            return importlib.import_module(cls.package)
        except Exception as e:  # ImportError, or a broken build's AttributeError/RuntimeError (numpy ABI)
            raise BackendError(import_failure(cls.name, cls.package, e, cls.extra)) from e

    def load(self, model_path: Path, manifest: Manifest, options: BackendOptions) -> None:
        """Load the verified model file.

        Raises:
            BackendError: the runtime is missing, or it cannot load this model with these options.
        """
        try:
            self._load(model_path, manifest, options)
        except EdgeshipError:
            raise
        except Exception as e:  # any runtime failure: a foreign exception type we convert here
            raise BackendError(f"{self.name} cannot load {model_path.name}: {_first_line(e)}") from e
        self._manifest = manifest

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference on already checked feeds.

        Returns:
            Output name -> array, for every output the manifest declares, in its order.

        Raises:
            BackendError: not loaded, the runtime failed, or a declared output is missing.
        """
        if self._manifest is None:
            raise BackendError(f"{self.name} backend is not loaded")
        try:
            raw = self._run(feeds)
        except EdgeshipError:
            raise
        except Exception as e:
            raise BackendError(f"{self.name} inference failed: {_first_line(e)}") from e
        outputs: dict[str, np.ndarray] = {}
        for spec in self._manifest.outputs:
            if spec.name not in raw:
                raise BackendError(f"{self.name} returned no output {spec.name!r}")
            outputs[spec.name] = np.asarray(raw[spec.name])
        return outputs

    @property
    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """Backend name, runtime version, providers in use, threads: JSON-ready, for status and logs."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the runtime's resources; idempotent."""

    @abc.abstractmethod
    def _load(self, model_path: Path, manifest: Manifest, options: BackendOptions) -> None: ...

    @abc.abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]: ...
