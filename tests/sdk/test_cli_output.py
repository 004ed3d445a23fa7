"""What `edgeship package --help`, the package table and `bundle inspect` tell a user (issue 12's stumbles)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from bundlekit import write_valid_bundle
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from packagers.options import CALIBRATION_METHODS
from packagers.registry import available_targets, capabilities
from packagers.sources import CALIBRATION_FORMATS, MODEL_PATHS, TASKS
from sdk.cli import main
from sdk.cli.main import build_parser
from sdk.cli.tables import human_size


def _package_help(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at hyphens otherwise
    parser = build_parser()
    (sub,) = (a for a in parser._actions if a.dest == "command")
    text = sub.choices["package"].format_help()  # type: ignore[attr-defined]
    return " ".join(text.split())  # argparse wraps lines anywhere


def test_package_help_lists_every_choice_of_the_registry_and_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _package_help(monkeypatch)
    for phrase in [*MODEL_PATHS.values(), *CALIBRATION_FORMATS, *TASKS, *CALIBRATION_METHODS]:
        assert " ".join(phrase.split()) in text, phrase
    for target in available_targets():
        precisions = ", ".join(p.value for p in capabilities(target).precisions)
        assert f"{target.value}: {precisions}" in text
    assert ".keras" in text and "SavedModel" in text  # what README promises
    assert "(default: onnxruntime" in text and "(default: fp32)" in text


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (89110 * 1024, "87.0 MiB"), (3 * 2**30, "3.0 GiB")],
)
def test_human_size(size: int, text: str) -> None:
    assert human_size(size) == text


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """The tiny linear ONNX model packaged with --labels and no --target/--precision (the defaults)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(weights, "W")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, root / "tiny.onnx")
    x = rng.normal(size=(32, 4)).astype(np.float32)
    np.savez(root / "calib.npz", x=x)
    np.save(root / "labels.npy", (x @ weights).argmax(1))
    assert main(["keys", "generate", "--out", str(root), "--name", "k"]) == 0
    return str(root), root / "tiny.onnx", root / "out" / "tiny-1-onnxruntime-fp32.edgebundle"


def test_package_table_has_accuracy_and_human_sizes_and_says_the_defaults(
    labelled_run: tuple[str, Path, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    root, model, bundle = labelled_run
    capfd.readouterr()
    code = main(["package", str(model), "--calibration", f"{root}/calib.npz", "--labels", f"{root}/labels.npy",
                 "--key", f"{root}/k.key", "--name", "tiny", "--version", "1", "--out", f"{root}/out"])  # fmt: skip
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "building onnxruntime fp32 (the default; choose with --target and --precision)" in err
    header, _, row = out.splitlines()[:3]
    assert header.split()[-2:] == ["accuracy", "validation"], out
    assert re.search(r"\b1\.0000 \(original 1\.0000\)", row), out
    assert re.search(r"\b\d+\.\d (B|KiB)\b", row) and "KiB" in row, out
    assert bundle.is_file()

    assert main(["bundle", "inspect", str(bundle)]) == 0
    out = capfd.readouterr().out
    assert "accuracy: 1.0000 (original 1.0000) on the labelled samples, scored on y" in out, out
    assert re.search(r"^files: +\d+, \d+\.\d KiB \(\d+ bytes\)$", out, re.M), out


def test_inspect_of_a_structure_only_bundle_does_not_claim_numeric_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Core ML on Linux: signed on a structural check; inspect must not say "passed against torch on N samples"."""
    validation = {
        "reference": "torch", "samples": 12, "metrics": {}, "passed": True, "accepted_drift": False,
        "numeric": {"ran": False, "reason": "Core ML predicts only on macOS"},
        "structure": {"passed": True, "problems": []},
    }  # fmt: skip
    path = tmp_path / "b.edgebundle"
    write_valid_bundle(path, [Ed25519PrivateKey.generate()], validation=validation)
    assert main(["bundle", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "validation: structural check only, passed: numeric validation did not run (Core ML predicts only" in out
    assert "against torch" not in out and "12 samples" not in out, out
