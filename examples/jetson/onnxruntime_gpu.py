"""Jetson (ONNX Runtime, TensorRT/CUDA execution providers): a transformers text classifier as fp16 and int8.

    python examples/jetson/onnxruntime_gpu.py [OUT_DIR]

Host side (``edgeship[host]``): builds a tiny BERT sentiment classifier (``toy_models.py``: 2 layers,
a small WordPiece vocabulary, fine-tuned for a second on ten sentences; nothing is downloaded; use your
own transformers folder instead) and packages it for ONNX Runtime twice: ``fp16`` for the GPU and ``int8-dynamic`` for
the CPU cores. The tokenizer travels in the bundle, so the device needs no transformers.

Device side: copy the bundles and ``keys/release.pub`` to the Jetson. Install ``pip install
'edgeship[device]'`` and then the ``onnxruntime-gpu`` wheel built for your JetPack (NVIDIA's Jetson
wheel index; PyPI's ``onnxruntime`` is CPU-only, so leave out the ``onnxruntime`` extra there).
``providers=[...]`` lists what to try, in order; the ones this onnxruntime build lacks are skipped,
``CPUExecutionProvider`` is always the last fallback, and ``backend_info["providers"]`` says what is in
use. (A list naming only providers that are all missing raises ``BackendError``; CPU in the list
avoids that.) On an x86 host without onnxruntime-gpu this prints ``['CPUExecutionProvider']``.
Provider names only: TensorRT runs with its default options (no engine cache), so its first load
builds the engine.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from transformers import pipeline as hf_pipeline

import device_runtime
import sdk
from device_runtime import pipeline
from sdk.signing import generate_keypair

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/toy_models.py
from toy_models import NEGATIVE, POSITIVE, tiny_text_classifier  # a stand-in for your model folder

GPU_FIRST = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
TEXTS = ["i loved the acting", "the worst film i have ever had", "wonderful service"]


def main(out_dir: Path) -> None:
    folder = tiny_text_classifier(out_dir / "tiny-sentiment", extra_words=" ".join(TEXTS))
    sentences = out_dir / "sentences.txt"  # validation and calibration texts, one per line
    sentences.write_text("\n".join(POSITIVE + NEGATIVE + TEXTS) + "\n")

    # ---- host: package ----
    private_key, public_key = generate_keypair(out_dir / "keys", "release")
    results = sdk.package(
        str(folder), name="tiny-sentiment", version=1, key=private_key, out_dir=out_dir / "bundles",
        target="onnxruntime", precision=["fp16", "int8-dynamic"], calibration=sentences,
    )  # fmt: skip
    for result in results:
        (metrics,) = result.validation["metrics"].values()
        print(f"packaged {result.bundle_path.name}: {result.size_bytes} bytes, cosine min {metrics['cosine_min']:.5f}")
    reference = hf_pipeline("text-classification", model=str(folder), device="cpu")(TEXTS[0])
    print(f"host transformers: {TEXTS[0]!r} -> {reference}")

    # ---- device (the Jetson) ----
    fp16, int8 = (r.bundle_path for r in results)
    # GPU: fp16 on TensorRT or CUDA, whichever this onnxruntime build has, else the CPU.
    with device_runtime.load(fp16, trust=[public_key], providers=GPU_FIRST) as model:
        print(f"{fp16.name}: requested {GPU_FIRST}, in use {model.backend_info['providers']}")
        classify = pipeline("text-classification", model)
        for text in TEXTS:
            print(f"  {text!r} -> {classify(text)}")
    # CPU cores (Jetson Orin: 6-12 Arm cores): int8 weights, 4 threads.
    with device_runtime.load(int8, trust=[public_key], providers=["CPUExecutionProvider"], intra_op_threads=4) as m:
        print(f"{int8.name}: in use {m.backend_info['providers']}, threads {m.backend_info['intra_op_threads']}")
        print(f"  {TEXTS[0]!r} -> {pipeline('text-classification', m)(TEXTS[0])}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="edgeship-jetson-")))
