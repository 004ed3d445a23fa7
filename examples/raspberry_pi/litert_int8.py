"""Raspberry Pi (arm64, LiteRT): a PyTorch CNN to full-int8 TFLite bundles, run with 4 threads.

    python examples/raspberry_pi/litert_int8.py [OUT_DIR]

Host side (this script, on a laptop or CI with ``edgeship[host]``): trains a small CNN for a second on
scikit-learn's bundled 8x8 digits (``toy_models.py``; nothing is downloaded), then packages two static
int8 bundles with litert-torch + ai-edge-quantizer, calibrated on 128 training digits:

- ``digits-cnn``: int8 weights and activations with float32 input/output tensors (quantize and
  dequantize run inside the model): the usual choice for a Pi's CPU, where XNNPACK runs the int8 ops;
- ``digits-cnn-int8io``: int8 input/output tensors too (``extra["int8_io"]``), as microcontrollers
  and the Edge TPU need; the manifest records scale and zero point, so callers still pass floats.

Device side: copy ``OUT_DIR/bundles/*.edgebundle`` and ``OUT_DIR/keys/release.pub`` to the Pi and run
the second half of ``main`` there. The Pi needs only ``pip install 'edgeship[device,tflite]'``: LiteRT
(``ai-edge-litert``) publishes manylinux aarch64 wheels, so no TensorFlow or torch is installed there.
``device_runtime.load`` verifies the signature and every file's hash before anything is loaded.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import device_runtime
import sdk
from packagers import PackageOptions
from sdk.signing import generate_keypair

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/toy_models.py
from toy_models import digits, train_cnn  # stand-ins for your data and model (examples/toy_models.py)


def main(out_dir: Path) -> None:
    x_train, x_test, y_train, y_test = digits()
    model = train_cnn(x_train, y_train)
    with torch.no_grad():
        original = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())

    # ---- host: package (litert-torch traces at batch 1: TFLite models have fixed shapes) ----
    private_key, public_key = generate_keypair(out_dir / "keys", "release")
    common = dict(
        version=1, key=private_key, out_dir=out_dir / "bundles", target="tflite", precision="int8",
        example_inputs={"image": x_train[:1]}, calibration={"image": x_train[:128]}, labels=y_train[:128],
    )  # fmt: skip
    bundles = [
        *sdk.package(model, name="digits-cnn", **common),
        *sdk.package(model, name="digits-cnn-int8io", options=PackageOptions(extra={"int8_io": True}), **common),
    ]
    for result in bundles:
        (metrics,) = result.validation["metrics"].values()
        print(
            f"packaged {result.bundle_path.name}: {result.size_bytes} bytes, "
            f"int8 I/O {result.manifest.runtime['int8_io']}, cosine min {metrics['cosine_min']:.4f}, "
            f"top-1 agreement {metrics['top1_agreement']:.3f}"
        )

    # ---- device (the Pi): verify, health-check, run the held-out digits one at a time ----
    print(f"accuracy original (PyTorch) {original:.4f}")
    for result in bundles:
        with device_runtime.load(result.bundle_path, trust=[public_key], intra_op_threads=4) as pi_model:
            pi_model.health_check()  # the bundle's golden inputs reproduce its golden outputs here
            info = pi_model.backend_info
            (image,), (output,) = pi_model.manifest.inputs, pi_model.manifest.outputs
            logits = [pi_model.predict({image.name: x[None]})[output.name] for x in x_test]
            accuracy = float((np.concatenate(logits).argmax(1) == y_test).mean())
        print(
            f"accuracy {result.bundle_path.name} {accuracy:.4f} ({info['runtime']} {info['runtime_version']}, "
            f"threads {info['threads']}, delegates {info['delegates']}, health check passed)"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="edgeship-pi-")))
