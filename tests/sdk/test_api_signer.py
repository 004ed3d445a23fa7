"""``sdk.package(key=Signer)``: a bundle signed by a key that never enters the packaging process.

The signer here is what an HSM adapter is to edgeship: it holds a key id and a public key, and each
signature comes from elsewhere (a separate Python process that alone reads the private key file).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from tiny_onnx import write_tiny_onnx

import sdk
from sdk.signing import Signer, generate_keypair, key_id, load_public_key

_SIGN = (
    "import sys; from cryptography.hazmat.primitives import serialization as s; "
    "k = s.load_pem_private_key(open(sys.argv[1], 'rb').read(), None); "
    "sys.stdout.buffer.write(k.sign(sys.stdin.buffer.read()))"
)


class ProcessSigner:
    """Signs in a child process, as a PKCS#11 token or a KMS would: the key is not in this process."""

    def __init__(self, private_path: Path, public_key: Ed25519PublicKey) -> None:
        self._private_path = private_path
        self.public_key = public_key
        self.key_id = key_id(public_key)
        self.calls = 0

    def sign(self, data: bytes) -> bytes:
        self.calls += 1
        run = subprocess.run([sys.executable, "-c", _SIGN, str(self._private_path)], input=data,
                             capture_output=True, check=True, timeout=60)  # fmt: skip
        return run.stdout


def test_package_with_a_process_signer_verifies_on_the_device(tmp_path: Path) -> None:
    from device_runtime import load

    private, public = generate_keypair(tmp_path / "hsm", "token")
    signer = ProcessSigner(private, load_public_key(public))
    assert isinstance(signer, Signer)
    calib = {"x": np.random.default_rng(1).normal(size=(16, 4)).astype(np.float32)}
    (result,) = sdk.package(write_tiny_onnx(tmp_path / "tiny.onnx"), name="tiny", version=1, key=signer,
                            out_dir=tmp_path / "out", calibration=calib)  # fmt: skip
    assert signer.calls == 1  # one bundle, one signature
    with load(result.bundle_path, trust=[public]) as model:
        y = model.predict({"x": calib["x"][:2]})
    assert next(iter(y.values())).shape == (2, 3)
