"""x86 (OpenVINO, Intel CPUs): a PyTorch CNN as fp32 and NNCF int8 IR bundles, with a compiled-model cache.

    python examples/x86_gateway/openvino_int8.py [OUT_DIR]

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

Serving (the gateway's other programs, in any language): ``edgeship-device serve`` verifies the int8 bundle and
answers on ``http://127.0.0.1:PORT`` (``docs/serving.md``); this script starts it as a subprocess, POSTs
one test digit as an ``.npy`` body (what ``curl --data-binary @digit.npy URL/v1/predict`` sends) and prints
the predicted class from the JSON answer.
"""

from __future__ import annotations

import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

import device_runtime
import sdk
from sdk.signing import generate_keypair

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/toy_models.py
from toy_models import digits, train_cnn  # stand-ins for your data and model (examples/toy_models.py)


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

    serve_over_http(results[-1].bundle_path, public_key, x_test[0], int(y_test[0]))


def serve_over_http(bundle: Path, public_key: Path, image: np.ndarray, label: int) -> None:
    """``edgeship-device serve`` in a subprocess (as systemd would run it), one request from another program."""
    command = [sys.executable, "-m", "device_runtime.cli", "serve", "--bundle", str(bundle), "--trust", str(public_key),
               "--port", "0"]  # fmt: skip  # on the gateway: edgeship-device serve --bundle ... --port 8080
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as server:
        try:
            assert server.stdout is not None
            started = json.loads(server.stdout.readline())  # {"url": ..., "model": ...}: the address it listens on
            body = io.BytesIO()
            np.save(body, image[None])  # one [1, 1, 8, 8] float32 digit
            request = urllib.request.Request(f"{started['url']}/v1/predict", data=body.getvalue(), method="POST")
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = json.loads(response.read())
            ((name, output),) = answer["outputs"].items()
            predicted = int(np.argmax(output["data"]))
            print(f"served by edgeship-device serve at {started['url']}: {answer['model']['name']} "
                  f"v{answer['model']['version']} {answer['model']['precision']}, {name} -> class {predicted} "
                  f"(label {label})")  # fmt: skip
        finally:
            server.terminate()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="edgeship-openvino-")))
