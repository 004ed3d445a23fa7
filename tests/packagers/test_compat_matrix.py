"""The compatibility matrix (issue 13): bundles built here, in the oldest promised runtime releases.

Runs ``benchmarks/compat_matrix.py`` (every target and precision, oldest and current release, in cached
virtual environments under ``$EDGESHIP_RUNTIME_ENVS``; skipped only where PyPI cannot be reached to make
them), and checks README's platform table is the one generated from the committed result and the profiles.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from packagers.runtime_envs import RegistryUnreachable, env_requirements, parse_pinned
from sdk.errors import PackagingError

ROOT = Path(__file__).resolve().parents[2]


def _matrix() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compat_matrix", ROOT / "benchmarks" / "compat_matrix.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["compat_matrix"] = module
    spec.loader.exec_module(module)
    return module


def test_readme_platform_table_is_generated_from_the_matrix() -> None:
    matrix = _matrix()
    result = json.loads(matrix.RESULT.read_text())
    readme = matrix.README.read_text()
    assert readme == matrix.readme_with_table(readme, result), "run benchmarks/compat_matrix.py --write-readme"
    assert matrix.passed(result) == []


def test_old_releases_get_numpy_1_and_specs_are_exact() -> None:
    assert "numpy>=1.24,<2" in env_requirements("onnxruntime", "1.17.3")
    assert "numpy>=1.24" in env_requirements("onnxruntime", "1.20.1")
    assert "numpy>=1.24,<2" in env_requirements("openvino", "2024.0.0")
    assert parse_pinned("ai-edge-litert==1.4.0") == ("ai-edge-litert", "1.4.0")
    for bad in ("onnxruntime>=1.17", "onnxruntime==1.17.*", "torch==2.1.0"):
        with pytest.raises(PackagingError):
            parse_pinned(bad)


@pytest.mark.slow
def test_every_target_passes_in_the_oldest_promised_release(tmp_path: Path) -> None:
    matrix = _matrix()
    try:
        result: dict[str, Any] = matrix.run_matrix(tmp_path, say=lambda _line: None)
    except RegistryUnreachable as e:
        pytest.skip(str(e))
    assert matrix.passed(result) == []
    cells = {(c["target"], c["precision"], c["version"]) for c in result["cells"]}
    for target, precisions in matrix.BUILDS.items():
        for precision in precisions:
            assert (target, precision, matrix.OLDEST[target]) in cells
    if result["platform"] == json.loads(matrix.RESULT.read_text())["platform"]:
        readme = matrix.README.read_text()
        assert readme == matrix.readme_with_table(readme, result), "the README's table no longer matches the matrix"
