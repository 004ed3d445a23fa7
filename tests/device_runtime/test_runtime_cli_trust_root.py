"""``--trust`` takes a signed trust root as well as key files, the same way in every command that verifies
bundles (sdk/trustfiles.py): the device CLI, the host's ``predict`` and ``bundle verify``, the fleet."""

from __future__ import annotations

import signal
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from runtime_bundles import GOLDEN_X, BundleMaker, Keys

from device_runtime.cli import main
from sdk.errors import KeyFileError, TrustRootError
from sdk.manifest import format_time
from sdk.signing import load_public_key
from sdk.trustfiles import is_root_file, load_trust
from sdk.trustroot import make_root, sign_root


def _write_root(folder: Path, keys: Keys, *, threshold: int = 1, expires_in: timedelta = timedelta(days=30),
                extra_bundle_keys: tuple[Ed25519PrivateKey, ...] = (), name: str = "root.json") -> Path:  # fmt: skip
    root_key = Ed25519PrivateKey.generate()
    root = make_root(
        version=1, expires=format_time(datetime.now(timezone.utc) + expires_in), root_keys=[root_key.public_key()],
        bundle_keys=[load_public_key(keys.public), *(k.public_key() for k in extra_bundle_keys)],
        bundle_threshold=threshold,
    )  # fmt: skip
    path = folder / name
    path.write_bytes(sign_root(root, [root_key]))
    return path


@pytest.fixture
def x_file(tmp_path: Path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, GOLDEN_X)
    return path


def test_load_trust_tells_keys_from_a_root(tmp_path: Path, keys: Keys) -> None:
    root = _write_root(tmp_path, keys)
    assert is_root_file(root) and not is_root_file(keys.public)
    from_root = load_trust([root])
    assert from_root.by_id() == load_trust([keys.public]).by_id() and from_root.threshold == 1
    assert load_trust([keys.public, keys.other_public], 2).threshold == 2
    with pytest.raises(KeyFileError, match="goes alone"):
        load_trust([root, keys.public])
    with pytest.raises(KeyFileError, match="root sets it"):
        load_trust([root], 1)
    with pytest.raises(TrustRootError, match="expired"):
        load_trust([_write_root(tmp_path, keys, expires_in=timedelta(days=-1), name="old.json")])
    forged = tmp_path / "forged.json"
    forged.write_bytes(root.read_bytes().replace(b'"version":1', b'"version":2'))
    with pytest.raises(TrustRootError, match="valid signature"):
        load_trust([forged])
    junk = tmp_path / "junk.json"
    junk.write_bytes(b"{ not json")
    with pytest.raises(TrustRootError):
        load_trust([junk])
    with pytest.raises(KeyFileError):
        load_trust([tmp_path / "missing.pub"])
    with pytest.raises(KeyFileError, match="no --trust"):
        load_trust([])


def test_device_predict_and_health_take_a_root(
    tmp_path: Path, keys: Keys, make_bundle: BundleMaker, x_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _write_root(tmp_path, keys)
    bundle = make_bundle()
    assert main(["predict", "--bundle", str(bundle), "--trust", str(root), "--input", f"x={x_file}"]) == 0
    assert main(["health", "--bundle", str(bundle), "--trust", str(root)]) == 0
    capsys.readouterr()
    # The root's threshold counts: 2 of its bundle keys, and the bundle has one signature.
    strict = _write_root(tmp_path, keys, threshold=2, extra_bundle_keys=(Ed25519PrivateKey.generate(),), name="r2")
    assert main(["predict", "--bundle", str(bundle), "--trust", str(strict), "--input", f"x={x_file}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "2 required" in err
    assert main(["health", "--bundle", str(bundle), "--trust", str(root), "--trust", str(keys.public)]) == 1
    assert "goes alone" in capsys.readouterr().err


def test_device_serve_takes_a_root(tmp_path: Path, keys: Keys, make_bundle: BundleMaker) -> None:
    import json
    import subprocess
    import sys

    root = _write_root(tmp_path, keys)
    command = [sys.executable, "-m", "device_runtime.cli", "serve", "--bundle", str(make_bundle()),
               "--trust", str(root), "--port", "0"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert json.loads(process.stdout.readline())["model"]["name"] == "linear"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_device_run_takes_a_root_given_as_trust(tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    import device_runtime.agent as agent_package

    root = _write_root(tmp_path, keys)
    seen: list[object] = []

    class _Stop(Exception):
        pass

    def fake_agent(config: object) -> object:
        seen.append(config)
        raise _Stop

    monkeypatch.setattr(agent_package, "Agent", fake_agent)
    base = ["run", "--state-dir", str(tmp_path / "s"), "--broker", "mqtt://127.0.0.1:1", "--device-id", "d1"]
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(_Stop):
            main([*base, "--trust", str(root)])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert seen[0].trust is None and seen[0].trust_root == root  # type: ignore[attr-defined]
    assert main([*base, "--trust", str(root), "--trust-root", str(root)]) == 1


def test_host_predict_and_bundle_verify_take_a_root(
    tmp_path: Path, keys: Keys, make_bundle: BundleMaker, x_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sdk.cli.main import main as host

    root = _write_root(tmp_path, keys)
    bundle = make_bundle()
    assert host(["bundle", "verify", str(bundle), "--trust", str(root)]) == 0
    assert host(["predict", str(bundle), "--trust", str(root), "--input", f"x={x_file}"]) == 0
    capsys.readouterr()
    assert host(["bundle", "verify", str(bundle), "--trust", str(root), "--threshold", "1"]) == 1
    assert "root sets it" in capsys.readouterr().err
    assert host(["bundle", "verify", str(bundle), "--trust", str(keys.public), "--threshold", "1"]) == 0


def test_the_fleet_server_takes_a_root(tmp_path: Path, keys: Keys) -> None:
    from fleet.app import create_fleet_app
    from fleet.db import Database
    from fleet.settings import FleetSettings

    root = _write_root(tmp_path, keys)
    settings = FleetSettings(state_dir=tmp_path / "fleet", trusted_keys=(root,))
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        app = create_fleet_app(db, settings)
        assert app.state.releases.trusted_keys.by_id() == load_trust([keys.public]).by_id()
    finally:
        db.close()
