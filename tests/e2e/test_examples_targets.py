"""The deployment-story examples (Pi/LiteRT, Jetson/ORT, macOS/Core ML, x86/OpenVINO, OTA), run as a user runs them.

Each runs as ``python examples/X.py OUT_DIR`` in a subprocess; the assertions read what it prints.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def _run_example(name: str, out_dir: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / name), str(out_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _accuracies(stdout: str) -> dict[str, float]:
    """``accuracy NAME 0.9694 ...`` lines: NAME -> accuracy."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^accuracy (.+?),? (\d\.\d{4})\b", stdout, re.M)}


def test_raspberry_pi_litert_int8(tmp_path: Path) -> None:
    out = _run_example("raspberry_pi_litert_int8.py", tmp_path)
    float_io, int8_io = "digits-cnn-1-tflite-int8.edgebundle", "digits-cnn-int8io-1-tflite-int8.edgebundle"
    assert f"packaged {float_io}: " in out and "int8 I/O False" in out, out
    assert f"packaged {int8_io}: " in out and "int8 I/O True" in out, out
    acc = _accuracies(out)
    assert set(acc) == {"original (PyTorch)", float_io, int8_io}, out
    assert acc["original (PyTorch)"] > 0.9
    for name in (float_io, int8_io):
        assert acc[name] >= acc["original (PyTorch)"] - 0.03, out
    device_lines = [line for line in out.splitlines() if line.startswith("accuracy digits-cnn")]
    assert all("threads 4" in line and "health check passed" in line for line in device_lines), out
    assert (tmp_path / "bundles" / int8_io).is_file() and (tmp_path / "keys" / "release.pub").is_file()


def test_jetson_onnxruntime_gpu(tmp_path: Path) -> None:
    out = _run_example("jetson_onnxruntime_gpu.py", tmp_path)
    fp16, int8 = "tiny-sentiment-1-onnxruntime-fp16.edgebundle", "tiny-sentiment-1-onnxruntime-int8-dynamic.edgebundle"
    assert f"packaged {fp16}: " in out and f"packaged {int8}: " in out, out
    providers = re.search(rf"^{re.escape(fp16)}: requested \[.*TensorrtExecutionProvider.*\], in use (\[.*\])$", out,
                          re.M)  # fmt: skip
    assert providers and "CPUExecutionProvider" in providers.group(1), out
    assert re.search(rf"^{re.escape(int8)}: in use \['CPUExecutionProvider'\], threads 4$", out, re.M), out
    # transformers-shaped pipeline results; the device's fp16 matches the host's transformers pipeline
    host = re.search(r"^host transformers: 'i loved the acting' -> \[\{'label': '(\w+)', 'score': ([\d.]+)\}\]", out,
                     re.M)  # fmt: skip
    device = re.findall(r"^  '(.+?)' -> \[\{'label': '(\w+)', 'score': ([\d.]+)\}\]$", out, re.M)
    assert host and len(device) == 4, out
    assert [(text, label) for text, label, _ in device[:3]] == [
        ("i loved the acting", "positive"), ("the worst film i have ever had", "negative"),
        ("wonderful service", "positive"),
    ]  # fmt: skip
    assert host.group(1) == device[0][1] and abs(float(host.group(2)) - float(device[0][2])) < 0.01, out
    assert device[3][1] == "positive" and abs(float(device[3][2]) - float(device[0][2])) < 0.02, out


def test_macos_coreml(tmp_path: Path) -> None:
    out = _run_example("macos_coreml.py", tmp_path)
    names = ["tiny-sentiment-1-coreml-int8-weights.edgebundle", "tiny-sentiment-1-coreml-int4-palette.edgebundle"]
    for name in names:
        assert f"packaged {name}: " in out, out
    if sys.platform == "darwin":
        for name in names:
            assert f"{name}: compute units ALL on " in out, out
        assert out.count("numeric validation: cosine min") == 2, out
        return
    assert out.count("numeric validation did not run: Core ML predicts only on macOS") == 2, out
    assert out.count("structural validation: passed True, mlProgram") == 2, out
    assert "inputs ['input_ids', 'attention_mask', 'token_type_ids'], outputs ['logits']" in out, out
    for name in names:
        assert f"{name}: cannot run here: BackendError: Core ML bundles run only on macOS/iOS" in out, out


def test_x86_openvino(tmp_path: Path) -> None:
    out = _run_example("x86_openvino.py", tmp_path)
    fp32, int8 = "digits-cnn-1-openvino-fp32.edgebundle", "digits-cnn-1-openvino-int8.edgebundle"
    acc = _accuracies(out)
    assert set(acc) == {"original (PyTorch)", fp32, int8}, out
    assert acc["original (PyTorch)"] > 0.9
    assert abs(acc[fp32] - acc["original (PyTorch)"]) < 0.006, out  # same model: at most two ties flip
    assert acc[int8] >= acc["original (PyTorch)"] - 0.03, out
    weights = {}
    for name in (fp32, int8):
        line = re.search(rf"^accuracy {re.escape(name)} .*$", out, re.M)
        assert line, out
        m = re.search(r"p50 ([\d.]+) ms, bundle (\d+) bytes, weights (\d+) bytes", line.group(0))
        assert m and float(m.group(1)) > 0 and int(m.group(2)) > 0, line.group(0)
        weights[name] = int(m.group(3))
        assert "on ['CPU'], hint LATENCY" in line.group(0) and "from cache False" in line.group(0)
        assert re.search(rf"^second load {re.escape(name)}: from cache True, [\d.]+ ms$", out, re.M), out
    assert weights[int8] < 0.5 * weights[fp32], weights
    assert any((tmp_path / "openvino-cache").iterdir())


def test_ota_update_local(tmp_path: Path) -> None:
    out = _run_example("ota_update_local.py", tmp_path)
    lines = out.splitlines()

    def index(text: str) -> int:
        found = [i for i, line in enumerate(lines) if text in line]
        assert found, f"{text!r} not printed:\n{out}"
        return found[0]

    deploy = [line.split(": ", 1)[1].split(" ")[0] for line in lines if line.startswith("  event deploy-v2: ")]
    assert deploy[0] == "received" and deploy[-1] == "active", out
    assert {"downloading", "verifying", "staged", "health_check"} <= set(deploy), out
    active = index("event deploy-v2: active")
    on_v2 = index("status: online, model digits-cnn v2, slot B")
    assert on_v2 > active
    assert re.search(r"^device predicts with v2: \d \(label \d\)$", out, re.M), out
    rolled_back = index("event rollback-1: rolled_back")
    assert rolled_back > on_v2 and "failed" not in out
    assert index("status: online, model digits-cnn v1, slot A") < active  # before the deploy, v1 in slot A
    assert lines[-2] == "  status: online, model digits-cnn v1, slot A", out
    assert lines[-1] == "device pi-kitchen serving digits-cnn v1 again", out
