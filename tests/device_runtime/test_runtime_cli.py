"""edgeship-device predict / health: JSON on stdout, one ``error:`` line on stderr for expected failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from runtime_bundles import GOLDEN_X, BundleMaker, Keys, linear_reference

from device_runtime.cli import main


@pytest.fixture
def x_file(tmp_path: Path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, GOLDEN_X)
    return path


def test_predict_prints_outputs_as_json(
    linear_bundle: Path, keys: Keys, x_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["predict", "--bundle", str(linear_bundle), "--trust", str(keys.public), "--input", f"x={x_file}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["model"]["name"] == "linear" and result["model"]["version"] == 1
    y = result["outputs"]["y"]
    expected = linear_reference(GOLDEN_X)
    assert y["dtype"] == "float32" and y["shape"] == [2, 3]
    np.testing.assert_allclose(y["data"], expected, rtol=1e-6)


def test_both_clis_take_one_grammar_and_print_one_shape(
    linear_bundle: Path, keys: Keys, x_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--input x.npy` (the model's only input) and `--input x=x.npy` on both CLIs; the same JSON, which is also
    the HTTP API's answer (tests/device_runtime/serving)."""
    from sdk.cli import main as host_main

    answers = []
    for spec in (str(x_file), f"x={x_file}"):
        assert main(["predict", "--bundle", str(linear_bundle), "--trust", str(keys.public), "--input", spec]) == 0
        answers.append(json.loads(capsys.readouterr().out))
        assert host_main(["predict", str(linear_bundle), "--trust", str(keys.public), "--input", spec]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert all(a == answers[0] for a in answers), answers
    assert set(answers[0]) == {"model", "outputs"} and set(answers[0]["outputs"]["y"]) == {"dtype", "shape", "data"}


def test_predict_with_state_dir_installs(
    linear_bundle: Path, keys: Keys, x_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    argv = ["predict", "--bundle", str(linear_bundle), "--trust", str(keys.public), "--input", f"x={x_file}"]
    assert main([*argv, "--state-dir", str(state)]) == 0
    assert json.loads((state / "installed.json").read_bytes())["bundles"]["linear"][0]["version"] == 1
    capsys.readouterr()


def test_health_prints_metrics(linear_bundle: Path, keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--bundle", str(linear_bundle), "--trust", str(keys.public)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] is True and result["outputs"]["y"]["passed"] is True


def test_failed_health_prints_metrics_and_one_error_line(
    make_bundle: BundleMaker, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = make_bundle(golden_outputs={"y": linear_reference(GOLDEN_X) - 1.0})
    assert main(["health", "--bundle", str(bad), "--trust", str(keys.public)]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["passed"] is False
    assert captured.err.startswith("error: health check of linear v1 failed") and captured.err.count("\n") == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--input", "x=missing.npy"], "error: cannot read input 'x'"),
        (["--input", "x=X", "--input", "z=X"], "error: unexpected input(s) 'z'"),
    ],
)
def test_bad_inputs_are_one_line(
    linear_bundle: Path, keys: Keys, x_file: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = [a.replace("X", str(x_file)) for a in extra]
    code = main(["predict", "--bundle", str(linear_bundle), "--trust", str(keys.public), *extra])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(message) and err.count("\n") == 1


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--bundle", "b", "--trust", "k"]) == 2  # no --input, --text or --image
    assert "one of the arguments --input --text --image is required" in capsys.readouterr().err
    assert main(["predict", "--bundle", "b", "--trust", "k", "--input", "x.npy", "--text", "hi"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_bare_file_for_a_model_with_several_inputs_is_one_line(
    masked_bundle: Path, keys: Keys, x_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["predict", "--bundle", str(masked_bundle), "--trust", str(keys.public), "--input", str(x_file)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: the model has inputs ") and "NAME=FILE.npy" in err, err


def test_text_to_a_tensor_bundle_is_one_line(
    linear_bundle: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["predict", "--bundle", str(linear_bundle), "--trust", str(keys.public), "--text", "hello"])
    err = capsys.readouterr().err
    assert code == 1 and "does not take text" in err and err.count("\n") == 1, err


def test_wrong_key_fails_with_one_line_and_no_traceback(linear_bundle: Path, keys: Keys, x_file: Path) -> None:
    """Through the installed console script, as an operator would run it."""
    script = Path(sys.executable).with_name("edgeship-device")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "device_runtime.cli"]
    result = subprocess.run(
        [*argv, "predict", "--bundle", str(linear_bundle), "--trust", str(keys.other_public), "--input", f"x={x_file}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: 0 valid signature(s) from trusted keys") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
