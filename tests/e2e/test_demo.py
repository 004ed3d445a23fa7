"""`edgeship demo` (what `make demo` runs) as a user runs it, shortened: v1 is not packaged for Core ML.

The demo runs through the real entry point in a subprocess; the assertions read what it prints and what
it left behind. Every process it starts inherits a marker in its environment, so a process the demo
failed to stop (an agent's helper too) is found by the marker, whatever its command line.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MARKER = "EDGESHIP_DEMO_TEST_MARKER"

pytestmark = pytest.mark.timeout(300)


def _demo(out: Path, marker: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_FLEET_")}
    env[MARKER] = marker
    args = [sys.executable, "-m", "sdk.cli", "demo", "--out", str(out), "--targets", "onnxruntime,openvino,tflite"]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _left_behind(marker: str) -> list[str]:
    """Command lines of live processes whose environment holds ``marker``."""
    found = []
    needle = f"{MARKER}={marker}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes():
                stat = Path(f"/proc/{pid}/stat").read_text()
                if stat.rpartition(")")[2].split()[0] != "Z":  # a zombie is dead, only not reaped yet
                    found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_demo_rolls_out_pauses_on_the_broken_canary_and_leaves_nothing_running(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    started = time.monotonic()
    proc = _demo(tmp_path / "demo", marker)
    out, err = proc.communicate(timeout=240)
    took = time.monotonic() - started
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err[-4000:]}"
    # 1. the table: every runnable target at fp32 and int8, numerically validated; v2 for the devices' targets
    for target in ("onnxruntime", "openvino", "tflite"):
        for precision in ("fp32", "int8"):
            assert re.search(rf"^v1\s+{target}\s+{precision}\s+[\d.]+\s+0\.9\d+\s+[\d.]+\s+numeric: passed", out, re.M)
        assert re.search(rf"^v2\s+{target}\s+int8\s", out, re.M), out
    assert "coreml" not in out.split("== 2.")[0].split("--\n", 1)[1]  # shortened: no Core ML rows
    # 2. three devices, each with its one runtime
    for device, runtime in (("cam-1", "onnxruntime"), ("cam-2", "openvino"), ("cam-3", "ai-edge-litert")):
        assert re.search(rf"{device} online: runtimes \{{'{runtime}': ", err), err
    # 3. v1 everywhere, each device on its own target's bundle; v2: genuine on cam-1, broken on cam-2, paused
    assert "rollout 1 completed wave 1/1 active=3" in err, err
    for device, target in (("cam-1", "onnxruntime"), ("cam-2", "openvino"), ("cam-3", "tflite")):
        assert f"{device}  runs digits v1 from bundle v1 {target}/int8" in err, err
    assert "cam-1  runs digits v2 from bundle v2 onnxruntime/int8  (genuine v2: active)" in err, err
    assert "cam-2  runs digits v1 from bundle v1 openvino/int8  (v2 failed its health check: rolled back)" in err
    assert "cam-2 reported HealthCheckError: health check of digits v2 failed" in err, err
    assert "cam-3  runs digits v1 from bundle v1 tflite/int8  (never sent v2" in err, err
    assert re.search(r"rollout 2 paused wave 2/3 .*failed=1 breached: health_failures=0", err), err
    assert re.search(r"Pause\s+-\s+gate health_failures=0 breached", out), out
    # 4. the dashboard's address, the summary, and nothing left running
    assert re.search(r"^dashboard: http://127\.0\.0\.1:\d+/dashboard/", out, re.M), out
    assert re.search(r"^total\s+[\d.]+", out, re.M) and out.count(" ok\n") >= 4, out
    assert "stopped every process the demo started" in err
    assert _left_behind(marker) == []
    assert took < 180, f"the shortened demo took {took:.0f}s"


def test_ctrl_c_stops_every_process_the_demo_started(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    proc = _demo(tmp_path / "demo", marker)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:  # interrupt once the agents are up: broker, fleet and three agents running
        lines.append(line)
        if "cam-3 online" in line or "rollout 1:" in line:
            break
    else:
        pytest.fail("the demo ended before its devices came online:\n" + "".join(lines))
    assert len(_left_behind(marker)) >= 5  # the demo itself, the broker, the fleet, three agents (+ helpers)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, f"{out}\n{''.join(lines)}{err}"
    assert "interrupted: stopping every process the demo started" in err
    assert _left_behind(marker) == []
