"""The `edgeship` CLI end to end on a tiny ONNX model: keys, package, inspect, verify, predict.

Every expected failure must exit non-zero with exactly one `error: ...` line on stderr.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tiny_onnx import write_tiny_onnx

from sdk.cli import main
from sdk.manifest import Manifest
from sdk.signing import load_private_key, sign_manifest


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, contains: str = "") -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert contains.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """y = softmax-free logits of a 4 -> 3 linear layer, batch dynamic."""
    return write_tiny_onnx(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, onnx_model: Path) -> dict[str, Path]:
    """Keys and fp32 + int8-dynamic bundles built through the CLI once for the module."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["keys", "generate", "--out", str(root / "keys"), "--name", "ci"]) == 0
    assert main(["keys", "generate", "--out", str(root / "keys"), "--name", "other"]) == 0
    calib = root / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).normal(size=(32, 4)).astype(np.float32))
    code = main(
        ["-q", "package", str(onnx_model), "--target", "onnxruntime", "--precision", "fp32,int8-dynamic",
         "--calibration", str(calib), "--key", str(root / "keys" / "ci.key"), "--name", "tiny",
         "--version", "3", "--out", str(root / "out")]
    )  # fmt: skip
    assert code == 0
    return {
        "root": root,
        "key": root / "keys" / "ci.key",
        "pub": root / "keys" / "ci.pub",
        "other_key": root / "keys" / "other.key",
        "other_pub": root / "keys" / "other.pub",
        "fp32": root / "out" / "tiny-3-onnxruntime-fp32.edgebundle",
        "int8": root / "out" / "tiny-3-onnxruntime-int8-dynamic.edgebundle",
    }


def test_keys_generate_writes_private_key_0600_and_refuses_overwrite(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert os.stat(workspace["key"]).st_mode & 0o777 == 0o600
    code, _, err = _run(capsys, "keys", "generate", "--out", workspace["root"] / "keys", "--name", "ci")
    _assert_one_line_error(code, err, "refusing to overwrite")


def test_package_writes_both_bundles(workspace: dict[str, Path]) -> None:
    assert workspace["fp32"].is_file() and workspace["int8"].is_file()


def test_inspect_shows_manifest(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "bundle", "inspect", workspace["int8"])
    assert code == 0
    assert "UNVERIFIED" in out and "tiny  version 3" in out and "int8-dynamic" in out
    code, out, _ = _run(capsys, "bundle", "inspect", "--json", workspace["fp32"])
    assert code == 0
    doc = json.loads(out)
    assert doc["manifest"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]
    assert doc["manifest"]["validation"]["passed"] is True


def test_verify_good_bundle(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    for bundle in ("fp32", "int8"):
        code, out, err = _run(capsys, "bundle", "verify", workspace[bundle], "--trust", workspace["pub"])
        assert code == 0, err
        assert out.startswith("OK tiny v3 onnxruntime/")


def _rewrite(src: Path, dst: Path, mutate: Callable[[list[tuple[tarfile.TarInfo, bytes]]], None]) -> Path:
    """Copy a bundle's members, let ``mutate`` edit the (info, data) list, write a new tar."""
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    mutate(members)
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return dst


def _flip_model_byte(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    i = next(i for i, (m, _) in enumerate(members) if m.name == "model.onnx")
    data = bytearray(members[i][1])
    data[len(data) // 2] ^= 0x01
    members[i] = (members[i][0], bytes(data))


def _edit_manifest(change: Callable[[dict], None], resign_with: Path | None = None):  # type: ignore[no-untyped-def]
    def mutate(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
        doc = json.loads(members[0][1])
        change(doc)
        manifest_bytes = Manifest.from_dict(doc).to_bytes()
        members[0] = (members[0][0], manifest_bytes)
        if resign_with is not None:
            members[1] = (members[1][0], sign_manifest(manifest_bytes, [load_private_key(resign_with)]))

    return mutate


def _add_symlink(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    link = tarfile.TarInfo("evil")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    members.append((link, b""))


def _add_traversal(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    members.append((tarfile.TarInfo("../x"), b"owned"))


def _drop_member(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    del members[-1]


@pytest.mark.parametrize(
    ("case", "contains"),
    [
        ("flipped-byte", "sha256"),
        ("edited-manifest", "signature"),
        ("untrusted-key", "signature"),
        ("expired", "expired"),
        ("symlink", "link"),
        ("traversal", ".."),
        ("missing-member", "missing"),
        ("not-a-bundle", "archive"),
        ("no-such-file", "cannot open"),
    ],
)
def test_verify_bad_bundles_one_line(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, contains: str
) -> None:
    good, key = workspace["fp32"], workspace["key"]
    bad = tmp_path / "bad.edgebundle"
    if case == "flipped-byte":
        _rewrite(good, bad, _flip_model_byte)
    elif case == "edited-manifest":
        _rewrite(good, bad, _edit_manifest(lambda d: d.update(version=99)))
    elif case == "untrusted-key":
        _rewrite(good, bad, _edit_manifest(lambda d: d.update(version=4), resign_with=workspace["other_key"]))
    elif case == "expired":
        _rewrite(good, bad, _edit_manifest(lambda d: d.update(expires="2001-01-01T00:00:00Z"), resign_with=key))
    elif case == "symlink":
        _rewrite(good, bad, _add_symlink)
    elif case == "traversal":
        _rewrite(good, bad, _add_traversal)
    elif case == "missing-member":
        _rewrite(good, bad, _drop_member)
    elif case == "not-a-bundle":
        bad.write_bytes(b"this is not a tar archive" * 100)
    code, _, err = _run(capsys, "bundle", "verify", bad, "--trust", workspace["pub"])
    _assert_one_line_error(code, err, contains)


def test_verify_refuses_downgrade_unless_allowed(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bundle", "verify", workspace["fp32"], "--trust", workspace["pub"], "--installed-version", "5"]
    code, _, err = _run(capsys, *args)
    _assert_one_line_error(code, err, "older than installed")
    code, _, _ = _run(capsys, *args, "--allow-downgrade")
    assert code == 0


def test_verify_threshold_two_needs_two_signers(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bundle", "verify", workspace["fp32"], "--trust", workspace["pub"], "--trust", workspace["other_pub"]]
    code, _, err = _run(capsys, *args, "--threshold", "2")
    _assert_one_line_error(code, err, "2 required")
    assert _run(capsys, *args)[0] == 0


def test_predict_with_npy_input(workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(2).normal(size=(2, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = _run(
        capsys, "predict", workspace["fp32"], "--trust", workspace["pub"], "--input", tmp_path / "x.npy",
        "--out", tmp_path / "y.npz",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["outputs"]["y"]["shape"] == [2, 3] and doc["model"]["name"] == "tiny"
    saved = np.load(tmp_path / "y.npz")["y"]
    assert np.allclose(np.asarray(doc["outputs"]["y"]["data"]), saved, atol=1e-5)


def test_predict_wrong_shape_is_one_line(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 5), np.float32))
    code, _, err = _run(
        capsys, "predict", workspace["fp32"], "--trust", workspace["pub"], "--input", tmp_path / "x.npy"
    )
    _assert_one_line_error(code, err, "x")
    # int64 -> float32 only when every value survives exactly; 2**40 + 1 does not
    np.save(tmp_path / "i.npy", np.full((2, 4), 2**40 + 1, np.int64))
    code, _, err = _run(
        capsys, "predict", workspace["fp32"], "--trust", workspace["pub"], "--input", tmp_path / "i.npy"
    )
    _assert_one_line_error(code, err, "int64")


def test_package_refuses_bad_inputs_in_one_line(
    workspace: dict[str, Path], onnx_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["-q", "package", "--key", workspace["key"], "--name", "t", "--version", "1", "--out", tmp_path / "out"]
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model" * 50)
    code, _, err = _run(capsys, *base, junk)
    _assert_one_line_error(code, err, "junk.onnx")
    code, _, err = _run(capsys, *base, onnx_model, "--precision", "int4-palette")
    _assert_one_line_error(code, err, "fp32")  # the message lists the valid choices
    code, _, err = _run(capsys, *base, onnx_model, "--target", "nosuchtarget")
    _assert_one_line_error(code, err, "onnxruntime")
    open_key = tmp_path / "open.key"
    open_key.write_bytes(workspace["key"].read_bytes())
    open_key.chmod(0o644)
    code, _, err = _run(capsys, *[a if a != workspace["key"] else open_key for a in base], onnx_model)
    _assert_one_line_error(code, err, "chmod 600")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_targets_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "targets")
    assert code == 0
    assert "onnxruntime" in out and "int8-dynamic" in out


def test_console_script_prints_no_traceback(workspace: dict[str, Path], tmp_path: Path) -> None:
    """The installed entry point, as a user runs it: a tampered bundle gives one line and exit 1."""
    bad = _rewrite(workspace["fp32"], tmp_path / "bad.edgebundle", _flip_model_byte)
    proc = subprocess.run(
        [sys.executable, "-m", "sdk.cli", "bundle", "verify", str(bad), "--trust", str(workspace["pub"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    _assert_one_line_error(proc.returncode, proc.stderr, "sha256")
