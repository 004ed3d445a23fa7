"""Packaging for Core ML: every (input kind, precision) the target supports, once, on tiny models.

On Linux the bundles are checked for structure (Core ML cannot predict there); on macOS the same
bundles also load through ``device_runtime.load`` and are compared with the reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packager_checks import Digits, open_bundle

from packagers import PackageOptions, PackageResult, capabilities, package
from packagers.targets.coreml import MODEL_MEMBER, PACKAGE_ROOT, cast_input, import_coremltools
from sdk import cli
from sdk.errors import PackagingError
from sdk.manifest import TensorSpec
from sdk.signing import TrustedKeys

on_macos = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predicts only on macOS")
PRECISIONS = ("fp32", "fp16", "int8-weights", "int4-palette")
COMPRESSION_OPS = {"int8-weights": "constexpr_affine_dequantize", "int4-palette": "constexpr_lut_to_dense"}
TEXT_INPUTS = tuple(
    TensorSpec(n, "int64", ("batch", "sequence")) for n in ("input_ids", "attention_mask", "token_type_ids")
)


@pytest.fixture(scope="session")
def coreml_bundles(
    cnn: torch.nn.Module,
    digits: Digits,
    bert_feature_folder: Path,
    bert_cls_folder: Path,
    key: Ed25519PrivateKey,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[tuple[str, str], PackageResult]:
    """(model, precision) -> result: the CNN at every precision; the two BERT tasks share the four.

    Each (input kind, precision) is converted once; the BERTs split the precisions between them so both
    tasks' graphs go through the op converters without converting BERT eight times.
    """
    out = tmp_path_factory.mktemp("coreml-bundles")
    x = digits.x_val[:16].reshape(-1, 1, 8, 8)
    results: dict[tuple[str, str], PackageResult] = {}
    for r in package(cnn, name="cnn", version=1, key=key, out_dir=out, target="coreml", precision=list(PRECISIONS),
                     example_inputs=(x,), task="image-classification"):  # fmt: skip
        results[("cnn", r.precision)] = r
    for r in package(bert_feature_folder, name="bert-feat", version=1, key=key, out_dir=out, target="coreml",
                     precision=["fp32", "int8-weights"]):  # fmt: skip
        results[("bert-feat", r.precision)] = r
    for r in package(bert_cls_folder, name="bert-cls", version=1, key=key, out_dir=out, target="coreml",
                     precision=["fp16", "int4-palette"]):  # fmt: skip
        results[("bert-cls", r.precision)] = r
    return results


def _check_common(result: PackageResult, trust: TrustedKeys, dest: Path) -> Any:
    """Signed, verifiable, and the package's files are members under model.mlpackage/."""
    bundle = open_bundle(result, trust, dest)
    m = bundle.manifest
    assert m.target == "coreml" and m.model == MODEL_MEMBER
    paths = {f.path for f in m.files}
    assert f"{PACKAGE_ROOT}/Data/com.apple.CoreML/model.mlmodel" in paths
    assert any(p.startswith(f"{PACKAGE_ROOT}/Data/com.apple.CoreML/weights/") for p in paths)
    rt = m.runtime
    assert rt["package"] == "coremltools" and rt["format"] == "mlprogram"
    assert rt["minimum_deployment_target"] == "iOS16" and rt["compute_units"] == "ALL"
    v = m.validation
    assert v["passed"] is True and v["accepted_drift"] is False
    structure = v["structure"] if "structure" in v else json.loads(bundle.path("report.json").read_bytes())[
        "build"]["structure"]  # fmt: skip
    assert structure["passed"] and structure["problems"] == []
    if sys.platform != "darwin":  # no Core ML here: structure only, said so, golden from the reference
        assert v["numeric"]["ran"] is False and "only on macOS" in v["numeric"]["reason"]
        assert v["metrics"] == {} and v["benchmark"]["runs"] == 0
        assert m.golden["outputs_from"].startswith("torch")
        assert "p50" not in result.latency_ms
    # the package on disk, as the device extracts it, is an ML program with the manifest's inputs
    ct = import_coremltools()
    spec = ct.models.MLModel(str(bundle.path(MODEL_MEMBER).parent), skip_model_load=True).get_spec()
    assert [i.name for i in spec.description.input] == [t.name for t in m.inputs]
    assert [o.name for o in spec.description.output] == [t.name for t in m.outputs]
    ops = structure["ops"]
    if result.precision in COMPRESSION_OPS:
        assert ops.get(COMPRESSION_OPS[result.precision], 0) >= 1
        assert structure["weights_bytes"] < structure["uncompressed_weights_bytes"]
        assert rt["compute_precision"] == "float16"
    else:
        assert not any(op.startswith("constexpr_") for op in ops)
        assert rt["compute_precision"] == ("float32" if result.precision == "fp32" else "float16")
        assert (structure["float16_compute_ops"] > 0) == (result.precision == "fp16")
    return bundle


def test_cnn_every_precision(coreml_bundles: dict[tuple[str, str], PackageResult], trust: TrustedKeys,
                             tmp_path: Path) -> None:  # fmt: skip
    weights = {}
    for precision in PRECISIONS:
        result = coreml_bundles[("cnn", precision)]
        bundle = _check_common(result, trust, tmp_path / precision)
        m = bundle.manifest
        assert m.inputs == (TensorSpec("input", "float32", ("batch", 1, 8, 8)),)
        assert m.outputs == (TensorSpec("output", "float32", ("batch", 10)),)
        assert m.runtime["coreml_inputs"] == {"input": "float32"}
        assert m.runtime["dim_bounds"] == {"batch": [1, 1024]}
        weights[precision] = json.loads(bundle.path("report.json").read_bytes())["build"]["structure"]["weights_bytes"]
    # float16 halves the float32 weights; 4-bit palettes are smaller than int8
    assert weights["fp16"] < weights["fp32"] and weights["int4-palette"] < weights["int8-weights"] < weights["fp16"]


def test_bert_feature_extraction_and_classification(coreml_bundles: dict[tuple[str, str], PackageResult],
                                                    trust: TrustedKeys, tmp_path: Path) -> None:  # fmt: skip
    for (model, precision), result in coreml_bundles.items():
        if model == "cnn":
            continue
        bundle = _check_common(result, trust, tmp_path / f"{model}-{precision}")
        m = bundle.manifest
        assert m.inputs == TEXT_INPUTS  # the user's int64, whatever Core ML takes
        assert m.runtime["coreml_inputs"] == {t.name: "int32" for t in TEXT_INPUTS}
        assert m.runtime["dim_bounds"]["sequence"][1] == 64  # max_position_embeddings of the tiny BERT
        build = json.loads(bundle.path("report.json").read_bytes())["build"]
        assert build["convert"]["frontend"].startswith("torch.jit.trace")
        if model == "bert-feat":
            assert m.task == "feature-extraction"
            assert m.outputs == (TensorSpec("last_hidden_state", "float32", ("batch", "sequence", 32)),)
        else:
            assert m.task == "text-classification" and m.preprocessing["labels"] == ["negative", "neutral", "positive"]
            assert m.outputs == (TensorSpec("logits", "float32", ("batch", 3)),)
            assert any(f.path.startswith("tokenizer/") for f in m.files)


@on_macos
def test_bundles_predict_on_macos(coreml_bundles: dict[tuple[str, str], PackageResult], trust: TrustedKeys,
                                  digits: Digits, cnn: torch.nn.Module) -> None:  # fmt: skip
    import device_runtime

    x = digits.x_val[16:24].reshape(-1, 1, 8, 8)
    with torch.no_grad():
        ref = cnn(torch.from_numpy(x)).numpy()
    for precision in PRECISIONS:
        result = coreml_bundles[("cnn", precision)]
        assert result.validation["metrics"]["output"]["cosine_min"] >= 0.9
        with device_runtime.load(result.bundle_path, trust) as model:
            out = model.predict({"input": x})["output"]
        assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.8


def test_cli_inspect_says_numeric_validation_did_not_run(coreml_bundles: dict[tuple[str, str], PackageResult],
                                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert cli.main(["bundle", "inspect", str(coreml_bundles[("cnn", "fp32")].bundle_path)]) == 0
    text = capsys.readouterr().out
    assert "target:     coreml" in text
    if sys.platform != "darwin":
        assert "structural check only" in text and "numeric validation did not run" in text
        assert "Core ML predicts only on macOS" in text  # the reason, from the manifest
        assert "against torch" not in text


@pytest.mark.parametrize(
    ("precision", "model_kind", "expected"),
    [
        ("int8-dynamic", "torch", "does not support precision int8-dynamic; valid precisions: fp32, fp16, int8-w"),
        ("int8", "torch", "does not support precision int8;"),
        ("int4", "torch", "does not support precision int4;"),
        ("fp32", "onnx", "cannot build from a onnx model; valid input kinds: torch, transformers"),
    ],
)
def test_unsupported_triples_are_refused_before_any_work(
    precision: str, model_kind: str, expected: str, cnn: torch.nn.Module, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    model: Any = cnn
    if model_kind == "onnx":
        model = tmp_path / "model.onnx"
        model.write_bytes(b"not loaded: refused first")
    with pytest.raises(PackagingError, match=expected.replace("(", r"\(")):
        package(model, name="m", version=1, key=key, out_dir=tmp_path, target="coreml", precision=precision,
                example_inputs=(np.zeros((2, 1, 8, 8), np.float32),) if model_kind == "torch" else None)  # fmt: skip
    assert not list(tmp_path.glob("*.edgebundle"))
    assert capabilities("coreml").input_kinds == ("torch", "transformers")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"minimum_deployment_target": "iOS14"}, "minimum_deployment_target 'iOS14' is not one of"),
        ({"weight_threshold": 0}, "weight_threshold must be an integer >= 1"),
        ({"compute_units": "GPU"}, "compute_units must be one of ALL, CPU_ONLY"),
        ({"dim_bounds": {"batch": [4, 2]}}, r"dim_bounds\['batch'\] = \[4, 2\]"),
    ],
)
def test_bad_coreml_settings(extra: dict[str, Any], expected: str, cnn: torch.nn.Module, key: Ed25519PrivateKey,
                             tmp_path: Path) -> None:  # fmt: skip
    with pytest.raises(PackagingError, match=expected):
        package(cnn, name="m", version=1, key=key, out_dir=tmp_path, target="coreml", precision="fp32",
                example_inputs=(np.zeros((2, 1, 8, 8), np.float32),), options=PackageOptions(extra=extra))  # fmt: skip


def test_op_converters_register_once() -> None:
    import_coremltools()
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    from packagers.targets import _coreml_ops

    first = _coreml_ops.register()
    func = _TORCH_OPS_REGISTRY.name_to_func_mapping["new_ones"]
    assert _coreml_ops.register() == first  # idempotent
    assert _TORCH_OPS_REGISTRY.name_to_func_mapping["new_ones"] is func
    assert "int" in _TORCH_OPS_REGISTRY.name_to_func_mapping  # coremltools' own, left alone


def test_cast_input_refuses_ids_int32_cannot_hold() -> None:
    ids = np.array([[1, 2**31]], dtype=np.int64)
    with pytest.raises(PackagingError, match="outside int32"):
        cast_input("input_ids", ids, "int32")
    assert cast_input("input_ids", ids[:, :1], "int32").dtype == np.int32
