"""`edgeship demo --quick`, run as a user runs it (the examples are run by tests/examples, the full demo by
tests/e2e/test_demo.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_quick_demo_prints_table_with_accurate_bundles(tmp_path: Path) -> None:
    proc = _run([sys.executable, "-m", "sdk.cli", "demo", "--quick", "--out", str(tmp_path / "demo")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(.+?)\s+(\d\.\d{4})\s+(\d+\.\d{4})\s+(\d+\.\d)$", line)
        if m:
            rows[m.group(1).strip()] = (float(m.group(2)), float(m.group(3)), float(m.group(4)))
    assert set(rows) == {"original (PyTorch eager)", "onnxruntime fp32", "onnxruntime int8-dynamic"}, proc.stdout
    original = rows["original (PyTorch eager)"][0]
    assert original > 0.9
    assert abs(rows["onnxruntime fp32"][0] - original) < 0.003  # same model: at most one tie flips
    assert rows["onnxruntime int8-dynamic"][0] > original - 0.02
    # a second run reuses the keys and the installed versions (idempotent install)
    again = _run([sys.executable, "-m", "sdk.cli", "demo", "--quick", "--out", str(tmp_path / "demo")], tmp_path)
    assert again.returncode == 0, again.stderr
