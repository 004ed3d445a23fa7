"""runtime.min_version says what the model needs, not what the build host had (issue 13).

The last test loads the bundles built here in onnxruntime 1.17.3 (a Jetson's JetPack release) and
ai-edge-litert 1.4.0 (the newest aarch64 wheel for a Raspberry Pi), each in a cached virtual
environment (``packagers.runtime_envs``): it skips only where PyPI cannot be reached.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packager_checks import Digits

from packagers import PackageResult, package
from packagers.runtime_envs import RegistryUnreachable, RuntimeEnv, ensure_env
from packagers.targets.onnxruntime import strip_unused_opsets
from sdk.bundle import read_bundle
from sdk.compat import version_at_least
from sdk.errors import PackagingError
from sdk.signing import TrustedKeys


@pytest.fixture(scope="module")
def mlp_bundles(mlp: torch.nn.Module, digits: Digits, key: Ed25519PrivateKey,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, PackageResult]:  # fmt: skip
    out = tmp_path_factory.mktemp("requirements")
    x = digits.x_val
    results = package(mlp, name="mlp", version=1, key=key, out_dir=out, target=["onnxruntime", "tflite"],
                      precision=["fp32", "int8-dynamic"], example_inputs=(torch.from_numpy(x[:2]),),
                      calibration={"input": x[:64]})  # fmt: skip
    return {f"{r.target}:{r.precision}": r for r in results}


def _model(result: PackageResult, trust: TrustedKeys, dest: Path) -> Path:
    bundle = read_bundle(result.bundle_path, trust, dest)
    return bundle.path(bundle.manifest.model)


def test_onnxruntime_min_version_comes_from_the_opset(mlp_bundles: dict[str, PackageResult], trust: TrustedKeys,
                                                      tmp_path: Path) -> None:  # fmt: skip
    import onnxruntime as ort

    for name in ("onnxruntime:fp32", "onnxruntime:int8-dynamic"):
        runtime = mlp_bundles[name].manifest.runtime
        model = onnx.load(str(_model(mlp_bundles[name], trust, tmp_path / name)))
        assert model.opset_import[0].version == 17  # the torch exporter's opset here
        assert runtime.min_version == "1.12.0", name  # ai.onnx opset 17, IR 8: not the host's release
        assert runtime.built_with == {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
        assert version_at_least("1.17.3", runtime.min_version)  # a Jetson's JetPack release


def test_int8_dynamic_keeps_only_the_domains_its_nodes_use(mlp_bundles: dict[str, PackageResult],
                                                           trust: TrustedKeys, tmp_path: Path) -> None:  # fmt: skip
    model = onnx.load(str(_model(mlp_bundles["onnxruntime:int8-dynamic"], trust, tmp_path / "b")))
    used = {n.domain for n in model.graph.node}
    assert {o.domain for o in model.opset_import} <= used | {""}
    report = json.loads(read_bundle(mlp_bundles["onnxruntime:int8-dynamic"].bundle_path, trust,
                                    tmp_path / "again").path("report.json").read_text())  # fmt: skip
    assert "ai.onnx.ml:5" in json.dumps(report)  # what quant_pre_process stamped, and was stripped


def test_strip_leaves_the_source_alone_and_keeps_used_domains(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])  # fmt: skip
    src = tmp_path / "src.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 5),
                                                      helper.make_opsetid("com.microsoft", 1)]), str(src))  # fmt: skip
    before = src.read_bytes()
    path, dropped = strip_unused_opsets(src, tmp_path / "out" / "model.onnx")
    assert src.read_bytes() == before
    assert sorted(dropped) == ["ai.onnx.ml:5", "com.microsoft:1"]
    assert [(o.domain, o.version) for o in onnx.load(str(path)).opset_import] == [("", 17)]
    assert strip_unused_opsets(path, tmp_path / "unused.onnx") == (path, [])


def test_tflite_min_version_runs_on_a_raspberry_pi(mlp_bundles: dict[str, PackageResult]) -> None:
    for name in ("tflite:fp32", "tflite:int8-dynamic"):
        runtime = mlp_bundles[name].manifest.runtime
        assert runtime.package == "ai-edge-litert"
        assert version_at_least("1.4.0", runtime.min_version), (name, runtime.min_version)
        assert set(runtime.built_with or {}) == {"ai-edge-litert"}


# ---- the real old runtimes ---------------------------------------------------------------------
_CHECK = """
import json, sys
import numpy as np
kind, model, inputs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
feeds = {k: np.load(v) for k, v in inputs.items()}
if kind == "onnxruntime":
    import onnxruntime as ort
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    print(ort.__version__, [o.shape for o in s.run(None, feeds)])
else:
    from importlib import metadata
    from ai_edge_litert.interpreter import Interpreter
    runner = Interpreter(model_path=model).get_signature_runner("serving_default")
    (name,) = runner.get_input_details()
    out = runner(**{name: next(iter(feeds.values()))[:1].astype(np.float32)})
    print(metadata.version("ai-edge-litert"), [v.shape for v in out.values()])
"""
_OLD = {"onnxruntime": "onnxruntime==1.17.3", "tflite": "ai-edge-litert==1.4.0"}


def _old_runtime(kind: str) -> RuntimeEnv:
    """The cached venv with the old runtime (packagers.runtime_envs); skips when PyPI cannot be reached."""
    try:
        return ensure_env(_OLD[kind])
    except RegistryUnreachable as e:
        pytest.skip(str(e))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["onnxruntime:fp32", "onnxruntime:int8-dynamic", "tflite:int8-dynamic"])
def test_bundles_built_here_load_in_the_old_runtimes(name: str, mlp_bundles: dict[str, PackageResult],
                                                      trust: TrustedKeys, tmp_path: Path) -> None:  # fmt: skip
    env = _old_runtime(name.split(":")[0])
    bundle = read_bundle(mlp_bundles[name].bundle_path, trust, tmp_path / "b")
    golden: Any = bundle.manifest.golden.inputs or {}
    inputs = {k: str(bundle.path(v)) for k, v in golden.items()}
    run = env.run(
        ["-c", _CHECK, name.split(":")[0], str(bundle.path(bundle.manifest.model)), json.dumps(inputs)], timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    version = run.stdout.split()[0]
    assert version_at_least(version, bundle.manifest.runtime.min_version or "0"), (version, bundle.manifest.runtime)


@pytest.mark.slow
def test_built_for_1_17_validates_in_1_17_3(mlp: torch.nn.Module, digits: Digits, key: Ed25519PrivateKey,
                                           tmp_path: Path) -> None:  # fmt: skip
    from packagers.options import PackageOptions

    _old_runtime("onnxruntime")
    x = digits.x_val
    (result,) = package(mlp, name="mlp", version=1, key=key, out_dir=tmp_path, target="onnxruntime",
                        precision="fp32", example_inputs=(torch.from_numpy(x[:2]),), calibration={"input": x[:64]},
                        options=PackageOptions(for_runtime="onnxruntime==1.17", validate_on="onnxruntime==1.17.3",
                                               benchmark_runs=3))  # fmt: skip
    on = result.manifest.validation.on_runtime
    assert on is not None and on["version"] == "1.17.3" and on["numpy"].startswith("1.")
    assert on["passed"] and on["health"] == "ok" and on["metrics"]["output"]["cosine_min"] > 0.9999, on


def test_validate_on_refuses_before_work(mlp: torch.nn.Module, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    from packagers.options import PackageOptions

    for spec, words in (("openvino==2024.0.0", "validates openvino bundles"), ("onnxruntime>=1.17", "exact")):
        with pytest.raises(PackagingError, match=words):
            package(mlp, name="mlp", version=1, key=key, out_dir=tmp_path, target="onnxruntime",
                    example_inputs=(torch.zeros(2, 64),), options=PackageOptions(validate_on=spec))  # fmt: skip
    assert not list(tmp_path.iterdir())
