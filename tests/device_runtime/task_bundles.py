"""Helpers for the task-class tests: the tiny task folders and a signed bundle per (task, precision).

The folder builders live in tests/packagers/task_folders.py (the packager tests use them too); test
folders are not packages, so it is loaded by path under its own module name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from packagers import PackageOptions, package
from sdk.signing import generate_keypair, load_private_key


def _load_folders() -> ModuleType:
    if "task_folders" in sys.modules:  # already imported by the packager tests in this session
        return sys.modules["task_folders"]
    path = Path(__file__).resolve().parents[1] / "packagers" / "task_folders.py"
    spec = importlib.util.spec_from_file_location("task_folders", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["task_folders"] = module
    spec.loader.exec_module(module)
    return module


folders = _load_folders()
FAST = PackageOptions(benchmark_runs=3, benchmark_warmup=1)


class TaskBundles:
    """Builds each task folder once and packages it on demand into signed bundles."""

    def __init__(self, root: Path) -> None:
        self.root = root
        private, self.public = generate_keypair(root / "keys")
        self._key = load_private_key(private)
        self.folders: dict[str, Path] = {}
        self._bundles: dict[tuple[str, str], Path] = {}

    def folder(self, task: str) -> Path:
        if task not in self.folders:
            target = self.root / task
            target.mkdir()
            if task == "image-classification":
                self.folders[task] = folders.image_folder(target)
            else:
                self.folders[task] = folders.text_folder(target, task, sentence_transformers=True)
        return self.folders[task]

    def bundle(self, task: str, precision: str = "fp32") -> Path:
        if (task, precision) not in self._bundles:
            (result,) = package(self.folder(task), name=task, version=1, key=self._key, out_dir=self.root / "out",
                                precision=precision, options=FAST)  # fmt: skip
            self._bundles[task, precision] = result.bundle_path
        return self._bundles[task, precision]
