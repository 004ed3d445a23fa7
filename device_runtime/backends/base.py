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

__all__ = ["Backend", "BackendOptions", "install_hint"]


def install_hint(extra: str) -> str:
    """The one command that installs a runtime extra."""
    return f"pip install 'edgeship[{extra}]'"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


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
            BackendError: it is not installed (the message names the extra to install).
        """
        try:
            return importlib.import_module(cls.package)
        except ImportError as e:
            raise BackendError(
                f"bundle target {cls.name!r} needs the {cls.package} package, which is not installed; "
                f"install it with: {install_hint(cls.extra)}"
            ) from e

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
