"""A transformers text classifier: model folder -> signed bundle -> ``pipeline("text-classification", bundle)``.

    python examples/text_classifier/text_classifier.py [OUT_DIR]

Host side (``edgeship[host]``): ``toy_models.tiny_text_classifier`` saves a 2-layer BERT sentiment classifier
and its tokenizer the way ``save_pretrained`` does (nothing is downloaded; use your own folder instead).
``sdk.package`` reads the folder (task from the config's architecture), exports it for ONNX Runtime as fp32
and int8-dynamic, validates both against transformers on the sentences of ``sentences.txt`` and signs them.
The tokenizer and the labels travel in the bundle.

Device side (``pip install 'edgeship[device,onnxruntime]'``: no torch, no transformers): the same
``pipeline`` call as transformers', on the bundle, and the same text over HTTP (``POST /v1/text``), so an
app in another language sends text and never tokenizes.
"""

from __future__ import annotations

import json
import sys
import tempfile
import urllib.request
from pathlib import Path

from transformers import pipeline as hf_pipeline

import sdk
from device_runtime import pipeline
from device_runtime.serve import ModelServer
from sdk.signing import generate_keypair

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/toy_models.py
from toy_models import NEGATIVE, POSITIVE, tiny_text_classifier  # a stand-in for your model folder

TEXTS = ["i loved the acting", "the worst film i have ever had"]


def main(out_dir: Path) -> None:
    folder = tiny_text_classifier(out_dir / "tiny-sentiment", extra_words=" ".join(TEXTS))
    sentences = out_dir / "sentences.txt"  # validation and calibration texts, one per line
    sentences.write_text("\n".join(POSITIVE + NEGATIVE + TEXTS) + "\n")

    # ---- host: package (the CLI equivalent: edgeship package OUT/tiny-sentiment --target onnxruntime
    #      --precision fp32,int8-dynamic --calibration OUT/sentences.txt --key ... --name tiny-sentiment ...) ----
    private_key, public_key = generate_keypair(out_dir / "keys", "release")
    results = sdk.package(
        str(folder), name="tiny-sentiment", version=1, key=private_key, out_dir=out_dir / "bundles",
        target="onnxruntime", precision=["fp32", "int8-dynamic"], calibration=sentences,
    )  # fmt: skip
    for result in results:
        (metrics,) = result.validation["metrics"].values()
        print(
            f"packaged {result.bundle_path.name}: task {result.manifest.task}, cosine min {metrics['cosine_min']:.5f}"
        )
    reference = hf_pipeline("text-classification", model=str(folder), device="cpu")

    # ---- device ----
    for result in results:
        with pipeline("text-classification", result.bundle_path, trust=[public_key]) as classify:
            for text in TEXTS:
                print(f"{result.precision}: {text!r} -> {classify(text)} (transformers: {reference(text)})")
    # the same over HTTP, as `edgeship-device serve --bundle ... --trust ...` answers it (docs/serving.md)
    with pipeline("text-classification", results[0].bundle_path, trust=[public_key]) as classify:
        with ModelServer(classify.model.model) as server:
            request = urllib.request.Request(
                f"{server.url}/v1/text", data=json.dumps({"text": TEXTS}).encode(), method="POST",
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = json.loads(response.read())
    print(f"POST /v1/text -> {json.dumps(answer['labels'])}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="edgeship-text-")))
