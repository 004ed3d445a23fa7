"""Every example folder, run as a user runs it: ``python examples/FOLDER/SCRIPT.py OUT_DIR`` in a subprocess.

The assertions read what the script prints. What this host cannot run is skipped with the reason: the GPU
providers of the Jetson example without a CUDA device, Core ML prediction off macOS (the conversion and the
structural check run everywhere).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def _run_example(name: str, out_dir: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout, not another install of edgeship
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args, *([str(out_dir)] if not args else [])],
        cwd=REPO, capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_every_example_folder_has_a_readme_and_a_script_run_here() -> None:
    folders = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    assert folders == ["fleet_rollout", "ios_coreml", "jetson", "quickstart", "raspberry_pi", "text_classifier",
                       "x86_gateway"]  # fmt: skip
    tested = Path(__file__).read_text()
    for folder in folders:
        readme = (EXAMPLES / folder / "README.md").read_text()
        for script in (EXAMPLES / folder).glob("*.py"):
            assert f"{folder}/{script.name}" in tested, f"no test runs {folder}/{script.name}"
            assert f"examples/{folder}/{script.name}" in readme, f"{folder}/README.md does not say how to run it"
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == ["toy_models.py"]  # no flat scripts left


def test_quickstart(tmp_path: Path) -> None:
    out = _run_example("quickstart/quickstart_onnxruntime.py", tmp_path)
    assert "tiny-cnn-1-onnxruntime-fp32.edgebundle" in out
    assert "tiny-cnn-1-onnxruntime-int8-dynamic.edgebundle" in out
    match = re.search(r"argmax (\[.*?\]) \(PyTorch: (\[.*?\])\)", out)
    assert match and len(match.group(1).split(",")) == 4, out


def _accuracies(stdout: str) -> dict[str, float]:
    """``accuracy NAME 0.9694 ...`` lines: NAME -> accuracy."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^accuracy (.+?),? (\d\.\d{4})\b", stdout, re.M)}


def test_raspberry_pi_litert_int8(tmp_path: Path) -> None:
    out = _run_example("raspberry_pi/litert_int8.py", tmp_path)
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


def test_raspberry_pi_systemd_unit(tmp_path: Path) -> None:
    """The unit parses (systemd-analyze verify where systemd is installed) and its ExecStart is a command line
    `edgeship-device` accepts."""
    from device_runtime.cli import _parser

    unit = (EXAMPLES / "raspberry_pi" / "edgeship-device.service").read_text()
    sections: dict[str, dict[str, str]] = {}
    current = ""
    for line in unit.splitlines():
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = {}
        elif line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            sections[current][key] = value
    assert set(sections) == {"Unit", "Service", "Install"}
    assert sections["Install"]["WantedBy"] == "multi-user.target" and sections["Service"]["Restart"] == "on-failure"
    argv = shlex.split(sections["Service"]["ExecStart"].replace("%H", "pi-17"))
    assert argv[0].endswith("/edgeship-device") and argv[1] == "run"
    args = _parser().parse_args(argv[1:])  # exits (fails the test) on anything the CLI refuses
    assert args.serve and args.serve_host == "127.0.0.1" and str(args.state_dir) == "/var/lib/edgeship"
    assert args.device_id == "pi-17" and args.threads == 4
    systemd_analyze = shutil.which("systemd-analyze")
    if systemd_analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit's keys were checked, not systemd's parse")
    copy = tmp_path / "edgeship-device.service"  # verify checks that ExecStart's program exists: point it at one
    copy.write_text(unit.replace(argv[0], shutil.which("true") or "/bin/true"))
    proc = subprocess.run([systemd_analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_jetson_onnxruntime_gpu(tmp_path: Path) -> None:
    """The bundle lists TensorRT and CUDA first; on this host the CPU fallback must actually run."""
    out = _run_example("jetson/onnxruntime_gpu.py", tmp_path)
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
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("no CUDA device: the TensorRT/CUDA providers were requested and the CPU fallback ran")
    assert "CUDAExecutionProvider" in providers.group(1) or "TensorrtExecutionProvider" in providers.group(1), out


def test_ios_coreml(tmp_path: Path) -> None:
    out = _run_example("ios_coreml/coreml.py", tmp_path)
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
    assert (tmp_path / "ios-app" / "TinySentiment.mlpackage" / "Manifest.json").is_file()  # what Xcode takes
    pytest.skip("prediction: Core ML predicts only on macOS (the conversion and the structural check ran)")


def test_x86_gateway_openvino(tmp_path: Path) -> None:
    out = _run_example("x86_gateway/openvino_int8.py", tmp_path)
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
    served = re.search(r"^served by edgeship-device serve at http://127\.0\.0\.1:\d+: digits-cnn v1 int8, \S+ -> "
                       r"class (\d) \(label (\d)\)$", out, re.M)  # fmt: skip
    assert served and served.group(1) == served.group(2), out


def test_text_classifier(tmp_path: Path) -> None:
    out = _run_example("text_classifier/text_classifier.py", tmp_path)
    assert "packaged tiny-sentiment-1-onnxruntime-fp32.edgebundle: task text-classification" in out, out
    results = re.findall(r"^(fp32|int8-dynamic): '(.+?)' -> \[\{'label': '(\w+)', 'score': ([\d.]+)\}\] "
                         r"\(transformers: \[\{'label': '(\w+)', 'score': ([\d.]+)\}\]\)$", out, re.M)  # fmt: skip
    assert len(results) == 4, out
    for precision, _, label, score, hf_label, hf_score in results:
        assert label == hf_label and abs(float(score) - float(hf_score)) < (1e-5 if precision == "fp32" else 0.02)
    assert [r[2] for r in results[:2]] == ["positive", "negative"]
    assert re.search(r'^POST /v1/text -> \[\[\{"label": "positive", .*\}\], \[\{"label": "negative", ', out, re.M), out


def test_fleet_rollout_ota_update_local(tmp_path: Path) -> None:
    out = _run_example("fleet_rollout/ota_update_local.py", tmp_path)
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


def test_fleet_rollout_against_a_live_fleet(tmp_path: Path) -> None:
    """fleet_rollout/rollout.py against `edgeship fleet serve`, Mosquitto and one `edgeship-device run` agent."""
    sys.path.insert(0, str(REPO / "tests" / "e2e"))  # the e2e tests' process helpers
    from fleet_e2e_parts import BrokerPool, FleetProcess, Owned, api_token, make_bundles, start_agents, wait_registered

    bundles = make_bundles(tmp_path / "bundles")
    (tmp_path / "broker").mkdir()
    owned, pool = Owned(), BrokerPool(tmp_path / "broker")
    try:
        broker = pool.make()
        tag = f"ex-{tmp_path.name[-24:]}"
        env = {"EDGESHIP_FLEET_SHARE_GROUP": tag, "EDGESHIP_FLEET_MQTT_CLIENT_ID": tag}
        fleet = owned.add(FleetProcess(tmp_path / "fleet", broker.port, bundles.public_key, env=env))
        fleet.start()
        token = api_token(f"sqlite:///{tmp_path / 'fleet' / 'fleet.db'}")
        api = owned.add(fleet.client(token))
        agents, _ = start_agents(tmp_path, broker.port, bundles.public_key, bundles.v1, ["kitchen-pi"])
        for agent in agents:
            owned.add(agent)
        wait_registered(api, ["kitchen-pi"], 1)
        out = _run_example(
            "fleet_rollout/rollout.py", tmp_path, "--server", fleet.url, "--token", token, "--bundle",
            str(bundles.v2), "--devices", "id=kitchen-pi", "--waves", "100%", "--soak", "1s",
            "--gate", "health_failures=0", "--timeout", "60",
        )  # fmt: skip
    finally:
        owned.close_all()
        pool.stop_all()
    assert "uploaded " in out and "release linear:2" in out, out
    assert "1 device(s) selected by id=kitchen-pi: kitchen-pi" in out, out
    assert re.search(r"^rollout 1 completed wave 1/1 active=1 of 1$", out, re.M), out
    assert re.search(r"^  audit Complete\b", out, re.M), out
