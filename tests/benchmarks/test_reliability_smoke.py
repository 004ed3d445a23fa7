"""benchmarks/reliability.py at its smallest: the swap and reconnect-storm rows (real Mosquitto, a real agent).

The other rows run test suites already run by CI (attacks, fuzz) or take minutes; this checks the script
runs end to end, prints its table under the CPU line and that simulated devices come back after a broker kill.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def test_reliability_smallest_run() -> None:
    command = [sys.executable, "benchmarks/reliability.py", "--only", "swaps", "storm", "--swaps", "1",
               "--devices", "50", "--outage-s", "0.5"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("cpu: ")
    failed_row = next(line for line in lines if line.startswith("| requests failed during swaps |"))
    assert "| 0 of " in failed_row, failed_row
    storm_row = next(line for line in lines if line.startswith("| reconnect storm"))
    assert "50 back in" in storm_row, storm_row
