"""``pip install edgeship[device,onnxruntime]`` in a fresh venv: no host libraries, and a real prediction.

The venv is built once per test session from a copy of this checkout's sources (``pip install`` from a
folder builds in that folder; a copy keeps ``build/`` leftovers out of the checkout and out of the
wheel). pip's own cache makes a rebuild take seconds once the wheels were downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import venv
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdk.bundle import write_bundle
from sdk.manifest import Manifest, TensorSpec
from sdk.signing import generate_keypair, load_private_key

REPO = Path(__file__).resolve().parents[2]
HEAVY = ["torch", "tensorflow", "transformers", "onnx", "coremltools", "tensorflow-cpu", "tf-keras", "openvino"]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "sdk", "device_runtime", "packagers", "fleet"]
W = np.arange(12, dtype=np.float32).reshape(4, 3) / 7.0
B = np.array([1.0, -0.5, 0.25], dtype=np.float32)

PREDICT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import device_runtime
    with device_runtime.load(sys.argv[1], [sys.argv[2]]) as model:
        x = np.load(sys.argv[3])
        y = model.predict({"x": x})["y"]
        health = model.health_check()["passed"]
    host = [m for m in ("torch", "tensorflow", "transformers", "onnx", "coremltools") if m in sys.modules]
    print(json.dumps({"y": y.tolist(), "health": health, "file": device_runtime.__file__, "host_modules": host}))
    """
)


def _run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def light_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no system site-packages) with the repo installed as ``edgeship[device,onnxruntime]``."""
    root = tmp_path_factory.mktemp("light-install")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.is_file():
            shutil.copy2(path, source / name)
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    result = _run([str(python), "-m", "pip", "install", "--quiet", f"{source}[device,onnxruntime]"], root)
    assert result.returncode == 0, result.stdout + result.stderr
    return python


def _bundle(folder: Path) -> tuple[Path, Path]:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    private, public = generate_keypair(folder, "release")
    golden_x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)

    def npy(array: np.ndarray) -> bytes:
        path = folder / "tmp.npy"
        np.save(path, array)
        return path.read_bytes()

    manifest = Manifest(
        name="light",
        version=1,
        target="onnxruntime",
        precision="fp32",
        model="model.onnx",
        inputs=(TensorSpec("x", "float32", ("batch", 4)),),
        outputs=(TensorSpec("y", "float32", ("batch", 3)),),
        created="2026-01-01T00:00:00Z",
        runtime={"package": "onnxruntime", "providers": ["CPUExecutionProvider"]},
        golden={"inputs": {"x": "golden/x.npy"}, "outputs": {"y": "golden/y.npy"}},
    )
    members = {
        "model.onnx": model.SerializeToString(),
        "golden/x.npy": npy(golden_x),
        "golden/y.npy": npy(golden_x @ W + B),
    }
    out = folder / "light-1-onnxruntime-fp32.edgebundle"
    write_bundle(out, manifest, members, [load_private_key(private)])
    return out, public


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_light_install_has_no_host_libraries_and_predicts(light_venv: Path, tmp_path: Path) -> None:
    listed = _run([str(light_venv), "-m", "pip", "list", "--format=json"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed.stdout)}
    assert {"edgeship", "onnxruntime", "numpy", "cryptography", "paho-mqtt"} <= set(installed)
    assert sorted(set(HEAVY) & set(installed)) == []

    bundle, public = _bundle(tmp_path)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = _run([str(light_venv), "-c", PREDICT, str(bundle), str(public), str(tmp_path / "x.npy")], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert Path(report["file"]).resolve().is_relative_to(light_venv.parent.parent.resolve())  # not the checkout
    assert report["health"] is True and report["host_modules"] == []
    np.testing.assert_allclose(np.array(report["y"], np.float32), x @ W + B, rtol=1e-5, atol=1e-6)

    cli = _run([str(light_venv.parent / "edgeship-device"), "--help"], tmp_path)
    assert cli.returncode == 0 and "serve" in cli.stdout
