"""The device must not pull in host-side libraries: checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from runtime_bundles import Keys

FORBIDDEN = ["torch", "tensorflow", "transformers", "onnx", "coremltools", "packagers", "fleet"]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    forbidden = json.loads(sys.argv[3])
    report = {}
    import device_runtime, device_runtime.cli, device_runtime.metrics, device_runtime.serve
    # nor the agent subsystem (nor paho-mqtt): the runtime never imports it
    report["after_import"] = [
        m for m in forbidden + ["onnxruntime", "device_runtime.agent", "paho"] if m in sys.modules
    ]
    with device_runtime.load(sys.argv[1], [sys.argv[2]]) as model:
        y = model.predict({"x": [[1.0, 2.0, 3.0, 4.0]]})["y"]
        report["health"] = model.health_check()["passed"]
    report["shape"] = list(y.shape)
    report["after_predict"] = [m for m in forbidden if m in sys.modules]
    report["onnxruntime_loaded"] = "onnxruntime" in sys.modules
    print(json.dumps(report))
    """
)


def test_device_runtime_imports_no_host_libraries(linear_bundle: Path, keys: Keys) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(linear_bundle), str(keys.public), json.dumps(FORBIDDEN)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["after_import"] == []  # not even onnxruntime before a bundle needs it, nor the agent
    assert report["shape"] == [1, 3] and report["health"] is True
    assert report["after_predict"] == []
    assert report["onnxruntime_loaded"] is True


@pytest.mark.parametrize("module", ["device_runtime.agent.linkproc", "device_runtime.agent.staging"])
def test_the_agents_helper_processes_import_no_model_code(module: str) -> None:
    """The MQTT link process and the staging helper run beside the agent on every device: they need
    paho, sqlite3, tar and signatures, not numpy (~20 MB each)."""
    script = f"import sys, {module}\nprint(sorted(m for m in ('numpy', 'device_runtime.model') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_dir_lists_the_lazy_public_api_without_importing_it() -> None:
    """``dir(device_runtime)`` (tab completion, help()) shows every name of ``__all__``, loaded or not."""
    script = (
        "import json, sys, device_runtime\n"
        "names = dir(device_runtime)\n"
        "lazy = ('device_runtime.model', 'device_runtime.agent')\n"
        "print(json.dumps({'missing': sorted(set(device_runtime.__all__) - set(names)),\n"
        "                  'imported': [m for m in lazy if m in sys.modules]}))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"missing": [], "imported": []}
