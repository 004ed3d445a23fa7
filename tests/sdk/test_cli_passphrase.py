"""Encrypted signing keys through the `edgeship` CLI: keys generate, package, keys root create/sign/rotate.

Expected failures exit 1 with one `error: ...` line and no traceback; the passphrase is never printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from tiny_onnx import write_tiny_onnx

from sdk.cli import main
from sdk.signing import PASSPHRASE_ENV

SECRET = "s3cret-edge-passphrase"


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert SECRET not in out + err  # never printed, whatever happened
    return code, out, err


def _one_line_error(code: int, err: str, contains: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and contains in lines[0], lines[0]


@pytest.fixture(autouse=True)
def _no_env_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pass")
    (root / "pass.txt").write_text(SECRET + "\n")
    (root / "wrong.txt").write_text("not-the-passphrase\n")
    np.savez(root / "calib.npz", x=np.random.default_rng(1).normal(size=(16, 4)).astype(np.float32))
    return {
        "root": root, "pass": root / "pass.txt", "wrong": root / "wrong.txt", "calib": root / "calib.npz",
        "model": write_tiny_onnx(root / "tiny.onnx"),
    }  # fmt: skip


def _generate(capsys: pytest.CaptureFixture[str], out: Path, name: str, *extra: object) -> tuple[Path, Path]:
    code, stdout, _ = _run(capsys, "keys", "generate", "--out", out, "--name", name, *extra)
    assert code == 0
    assert ("encrypted with the passphrase" in stdout) == bool(extra or os.environ.get(PASSPHRASE_ENV))
    return out / f"{name}.key", out / f"{name}.pub"


def _package(ws: dict[str, Path], key: Path, out: Path, *extra: object) -> list[object]:
    return ["-q", "package", ws["model"], "--calibration", ws["calib"], "--key", key, "--name", "tiny",
            "--version", "1", "--out", out, *extra]  # fmt: skip


def test_generate_encrypted_then_package_and_verify(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, pub = _generate(capsys, tmp_path / "keys", "rel", "--passphrase-file", ws["pass"])
    with pytest.raises(TypeError):  # not decryptable without the passphrase
        serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert key.stat().st_mode & 0o777 == 0o600
    code, _, err = _run(capsys, *_package(ws, key, tmp_path / "out", "--passphrase-file", ws["pass"]))
    assert code == 0, err
    code, out, _ = _run(capsys, "bundle", "verify", tmp_path / "out" / "tiny-1-onnxruntime-fp32.edgebundle",
                        "--trust", pub)  # fmt: skip
    assert code == 0 and out.startswith("OK tiny v1")


def test_package_missing_or_wrong_passphrase_is_one_line(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, _ = _generate(capsys, tmp_path / "keys", "rel", "--passphrase-file", ws["pass"])
    code, _, err = _run(capsys, *_package(ws, key, tmp_path / "out"))
    _one_line_error(code, err, "the key is encrypted: pass --passphrase-file or set EDGESHIP_KEY_PASSPHRASE")
    code, _, err = _run(capsys, *_package(ws, key, tmp_path / "out", "--passphrase-file", ws["wrong"]))
    _one_line_error(code, err, "wrong passphrase")
    assert "not-the-passphrase" not in err
    code, _, err = _run(capsys, *_package(ws, key, tmp_path / "out", "--passphrase-file", tmp_path / "nope"))
    _one_line_error(code, err, "cannot read passphrase file")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_env_passphrase_generates_and_unlocks(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, SECRET)
    key, _ = _generate(capsys, tmp_path / "keys", "env")
    assert key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    code, _, err = _run(capsys, *_package(ws, key, tmp_path / "out"))
    assert code == 0, err
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    code, _, err = _run(capsys, *_package(ws, key, tmp_path / "out2"))
    _one_line_error(code, err, "wrong passphrase")


def test_passphrase_for_an_unencrypted_key_warns_and_signs(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, _ = _generate(capsys, tmp_path / "keys", "open")
    code, _, err = _run(capsys, *_package(ws, key, tmp_path / "out", "--passphrase-file", ws["pass"]))
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "not encrypted" in warnings[0], err


def test_trust_root_create_sign_rotate_with_encrypted_keys(
    ws: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    k = tmp_path / "keys"
    old_key, old_pub = _generate(capsys, k, "root-old", "--passphrase-file", ws["pass"])
    new_key, new_pub = _generate(capsys, k, "root-new", "--passphrase-file", ws["pass"])
    v1, v2 = tmp_path / "root-1.json", tmp_path / "root-2.json"
    code, out, _ = _run(capsys, "keys", "root", "create", "--root-key", old_pub, "--bundle-key", old_pub,
                        "--sign", old_key, "--passphrase-file", ws["pass"], "--out", v1)  # fmt: skip
    assert code == 0 and "valid root v1" in out
    rotate = ["keys", "root", "rotate", "--current", v1, "--root-key", new_pub, "--bundle-key", new_pub,
              "--sign", new_key, "--out", v2]  # fmt: skip
    code, _, err = _run(capsys, *rotate)
    _one_line_error(code, err, "the key is encrypted")
    assert not v2.exists()
    code, out, _ = _run(capsys, *rotate, "--passphrase-file", ws["pass"])
    assert code == 0 and "not yet valid" in out  # only the new key signed
    code, _, err = _run(capsys, "keys", "root", "sign", v2, "--sign", old_key, "--passphrase-file", ws["wrong"])
    _one_line_error(code, err, "wrong passphrase")
    monkeypatch.setenv(PASSPHRASE_ENV, SECRET)
    code, out, _ = _run(capsys, "keys", "root", "sign", v2, "--sign", old_key)
    assert code == 0 and "valid root v2" in out
    assert len(json.loads(v2.read_text())["signatures"]) == 2


def test_console_script_missing_passphrase_no_traceback(ws: dict[str, Path], tmp_path: Path) -> None:
    """As a user runs it: an encrypted key and no passphrase is one line and exit 1."""
    env = {k: v for k, v in os.environ.items() if k != PASSPHRASE_ENV}
    generate = [sys.executable, "-m", "sdk.cli", "keys", "generate", "--out", str(tmp_path), "--name", "k",
                "--passphrase-file", str(ws["pass"])]  # fmt: skip
    subprocess.run(generate, check=True, capture_output=True, env=env, timeout=120)
    proc = subprocess.run(
        [sys.executable, "-m", "sdk.cli", "keys", "root", "create", "--root-key", str(tmp_path / "k.pub"),
         "--bundle-key", str(tmp_path / "k.pub"), "--sign", str(tmp_path / "k.key"), "--out", str(tmp_path / "r")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    _one_line_error(proc.returncode, proc.stderr, "the key is encrypted")
    assert SECRET not in proc.stdout + proc.stderr
