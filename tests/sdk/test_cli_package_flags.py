"""`edgeship package` flags: per-target --precision, --input-shape, --allow-random-calibration, --overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_onnx import write_tiny_onnx

from sdk.cli.main import main


@pytest.fixture
def workspace(tmp_path: Path) -> tuple[list[str], Path]:
    model = write_tiny_onnx(tmp_path / "tiny.onnx")
    assert main(["-q", "keys", "generate", "--out", str(tmp_path), "--name", "k"]) == 0
    common = [str(model), "--key", str(tmp_path / "k.key"), "--name", "tiny", "--version", "1",
              "--out", str(tmp_path / "out")]  # fmt: skip
    return common, tmp_path / "out"


def test_per_target_precision_and_overwrite(
    workspace: tuple[list[str], Path], capfd: pytest.CaptureFixture[str]
) -> None:
    common, out = workspace
    args = ["package", *common, "--precision", "onnxruntime=fp32,int8-dynamic", "--input-shape", "x=1,4"]
    assert main(args) == 0, capfd.readouterr().err
    text, err = capfd.readouterr()
    assert "building onnxruntime" not in err  # --target came from the per-target precisions, not the default
    rows = [line for line in text.splitlines() if line.startswith("tiny-1-")]
    assert [r.split()[2] for r in rows] == ["fp32", "int8-dynamic"], text
    assert all(r.rstrip().endswith("pass (generated data)") for r in rows), text
    assert "note: validated on generated data, not yours" in text
    before = (out / "tiny-1-onnxruntime-fp32.edgebundle").read_bytes()

    assert main(args) == 1
    err = capfd.readouterr().err
    assert "error: tiny-1-onnxruntime-fp32.edgebundle, tiny-1-onnxruntime-int8-dynamic.edgebundle already in" in err
    assert "--overwrite" in err and (out / "tiny-1-onnxruntime-fp32.edgebundle").read_bytes() == before
    assert main([*args, "--overwrite"]) == 0
    assert main(["bundle", "inspect", str(out / "tiny-1-onnxruntime-fp32.edgebundle")]) == 0
    assert "samples of generated data (random (seed 0)), not yours" in capfd.readouterr().out


def test_int8_without_calibration_is_refused_unless_allowed(
    workspace: tuple[list[str], Path], capfd: pytest.CaptureFixture[str]
) -> None:
    common, out = workspace
    assert main(["-q", "package", *common, "--precision", "int8"]) == 1
    assert "static int8 is calibrated on data and none was given: pass --calibration" in capfd.readouterr().err
    assert main(["-q", "package", *common, "--precision", "int8", "--allow-random-calibration"]) == 0
    text = capfd.readouterr().out
    (row,) = [line for line in text.splitlines() if line.startswith("tiny-1-")]
    assert row.rstrip().endswith("pass (random calibration)"), text
    assert json.loads((out / "report.json").read_text())["bundles"][0]["generated_data"] is True


@pytest.mark.parametrize("bad", ["x", "x=", "=1,4", "x=1,0", "x=a,b"])
def test_bad_input_shape_is_a_usage_error(
    bad: str, workspace: tuple[list[str], Path], capfd: pytest.CaptureFixture[str]
) -> None:
    common, _ = workspace
    with pytest.raises(SystemExit) as exit_:
        main(["package", *common, "--input-shape", bad])
    assert exit_.value.code == 2 and "expected NAME=D0,D1,..." in capfd.readouterr().err
