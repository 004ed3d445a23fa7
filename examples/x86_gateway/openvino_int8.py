"""x86 (OpenVINO, Intel CPUs): a PyTorch CNN as fp32 and NNCF int8 IR bundles, with a compiled-model cache.

    python examples/x86_openvino.py [OUT_DIR]

Host side (``edgeship[host]``): trains a small CNN for a second on scikit-learn's bundled digits
(``toy_models.py``; nothing is downloaded) and packages two OpenVINO bundles: ``fp32`` and ``int8``
(NNCF post-training quantization calibrated on 300 training digits; the validation recorded in the
manifest includes the accuracy on them).

Device side (an x86 box, ``pip install 'edgeship[device,openvino]'``): ``device_runtime.load`` with
``device="CPU"`` (or ``GPU``/``NPU``/``AUTO`` on an Intel machine that has them), the ``LATENCY``
performance hint (one request at a time, lowest delay; ``THROUGHPUT`` for many parallel requests) and
``cache_dir``: OpenVINO stores the compiled model there, and the next load (a restart, the next boot)
imports it instead of compiling, which is what ``loaded_from_cache`` shows on the second load. For each
bundle it prints held-out accuracy, p50 latency of one-image calls and the bundle size.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from toy_models import digits, train_cnn  # stand-ins for your data and model (examples/toy_models.py)

import device_runtime
import sdk
from sdk.signing import generate_keypair


def main(out_dir: Path) -> None:
    x_train, x_test, y_train, y_test = digits()
    model = train_cnn(x_train, y_train)
    with torch.no_grad():
        original = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())

    # ---- host: package ----
    private_key, public_key = generate_keypair(out_dir / "keys", "release")
    results = sdk.package(
        model, name="digits-cnn", version=1, key=private_key, out_dir=out_dir / "bundles", target="openvino",
        precision=["fp32", "int8"], example_inputs={"image": x_train[:2]},
        calibration={"image": x_train[:300]}, labels=y_train[:300],
    )  # fmt: skip

    # ---- device (the x86 box) ----
    cache_dir = out_dir / "openvino-cache"
    settings = {"device": "CPU", "performance_hint": "LATENCY", "cache_dir": cache_dir}
    print(f"accuracy original (PyTorch) {original:.4f}")
    for result in results:
        with device_runtime.load(result.bundle_path, trust=[public_key], **settings) as ov_model:
            info = ov_model.backend_info
            (output,) = ov_model.manifest.outputs
            predictions, latencies = [], []
            for image in x_test:  # one image per call, as a camera or sensor loop would send them
                start = time.perf_counter()
                logits = ov_model.predict({"image": image[None]})[output.name]
                latencies.append((time.perf_counter() - start) * 1000.0)
                predictions.append(int(logits.argmax()))
            accuracy = float((np.array(predictions) == y_test).mean())
        weights = sum(f.size for f in result.manifest.files if f.path.endswith(".bin"))
        print(
            f"accuracy {result.bundle_path.name} {accuracy:.4f}, p50 {statistics.median(latencies):.3f} ms, "
            f"bundle {result.size_bytes} bytes, weights {weights} bytes "
            f"(OpenVINO {info['runtime_version']} on {info['execution_devices']}, "
            f"hint {info['performance_hint']}, compiled in {info['compile_ms']:.1f} ms, "
            f"from cache {info['loaded_from_cache']})"
        )
    # A restart: the same bundles load from the compiled-model cache instead of being compiled again.
    for result in results:
        with device_runtime.load(result.bundle_path, trust=[public_key], **settings) as ov_model:
            info = ov_model.backend_info
        print(
            f"second load {result.bundle_path.name}: from cache {info['loaded_from_cache']}, "
            f"{info['compile_ms']:.1f} ms"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="edgeship-openvino-")))
