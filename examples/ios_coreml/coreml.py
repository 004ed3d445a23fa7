"""iOS / macOS (Core ML): a transformers text classifier as int8-weight and 4-bit palettized ML programs.

    python examples/ios_coreml/coreml.py [OUT_DIR]

Host side (``edgeship[host]``; coremltools converts on Linux and macOS alike): builds a tiny BERT
sentiment classifier (``toy_models.py``; nothing is downloaded) and packages two compressed Core ML
bundles: ``int8-weights`` (linear int8 weights, per channel) and ``int4-palette`` (16 k-means
centroids per weight tensor). Both compute in float16, what the Neural Engine runs, and declare
``compute_units`` ALL (CPU, GPU and Neural Engine; ``PackageOptions.extra["compute_units"]``). The
toy's weights are mostly below coremltools' 2048-element threshold (``extra["weight_threshold"]``),
so little of it is compressed; a real model's large weights are.

Core ML predicts only on Apple platforms. On macOS, the bundles are validated numerically against
the PyTorch model while packaging, and the device half below classifies with
``EdgeModelForSequenceClassification`` (``pip install 'edgeship[device,coreml]'`` on the Mac). On
Linux, a bundle is signed on a structural check of the saved package, the manifest says numeric
validation did not run, and loading fails with a clear ``BackendError``: this script prints both and
exits 0.

For an iOS app: verify the bundle on the build machine and take the ``.mlpackage`` out of it (this script
writes ``OUT_DIR/ios-app/TinySentiment.mlpackage``); add it to the Xcode project, which compiles it into
the app. The tokenizer files travel beside it in the bundle (``preprocessing`` in the manifest); the README
here has the Swift side.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import sdk
from device_runtime import EdgeModelForSequenceClassification
from packagers import PackageOptions
from sdk.bundle import read_bundle
from sdk.errors import BackendError
from sdk.signing import TrustedKeys, generate_keypair

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/toy_models.py
from toy_models import NEGATIVE, POSITIVE, tiny_text_classifier  # a stand-in for your model folder

TEXTS = ["i loved the acting", "the worst film i have ever had"]


def main(out_dir: Path) -> None:
    folder = tiny_text_classifier(out_dir / "tiny-sentiment", extra_words=" ".join(TEXTS))
    sentences = out_dir / "sentences.txt"
    sentences.write_text("\n".join(POSITIVE + NEGATIVE + TEXTS) + "\n")

    # ---- host: package ----
    private_key, public_key = generate_keypair(out_dir / "keys", "release")
    results = sdk.package(
        str(folder), name="tiny-sentiment", version=1, key=private_key, out_dir=out_dir / "bundles",
        target="coreml", precision=["int8-weights", "int4-palette"], calibration=sentences,
        options=PackageOptions(extra={"compute_units": "ALL"}),
    )  # fmt: skip
    for result in results:
        validation = result.validation
        print(f"packaged {result.bundle_path.name}: {result.size_bytes} bytes")
        if validation.get("numeric", {}).get("ran", True):
            (metrics,) = validation["metrics"].values()
            print(f"  numeric validation: cosine min {metrics['cosine_min']:.5f}, passed {validation['passed']}")
        else:
            print(f"  numeric validation did not run: {validation['numeric']['reason']}")
            s = validation["structure"]
            print(
                f"  structural validation: passed {s['passed']}, {s['program']} spec {s['specification_version']}, "
                f"inputs {s['inputs']}, outputs {s['outputs']}, {s['compressed_weight_ops']} compressed weight op(s), "
                f"weights {s['weights_bytes']} bytes (uncompressed {s['uncompressed_weights_bytes']}), "
                f"problems {s['problems']}"
            )

    # ---- the iOS app: the verified .mlpackage, for Xcode ----
    verified = read_bundle(results[0].bundle_path, TrustedKeys.from_files([public_key]), out_dir / "verified")
    mlpackage = next(verified.root.rglob("*.mlpackage"))
    app_model = out_dir / "ios-app" / "TinySentiment.mlpackage"
    shutil.copytree(mlpackage, app_model)
    print(f"for Xcode: {app_model} (verified: {len(verified.keyids)} signature(s), every file's sha256)")

    # ---- device (the Mac) ----
    for result in results:
        try:
            classifier = EdgeModelForSequenceClassification.from_bundle(result.bundle_path, trust=[public_key])
        except BackendError as e:  # not macOS: the backend names the platform and what to ship instead
            print(f"{result.bundle_path.name}: cannot run here: BackendError: {e}")
            continue
        with classifier:
            info = classifier.model.backend_info
            print(f"{result.bundle_path.name}: compute units {info['compute_units']} on {info['platform']}")
            for text, best in zip(TEXTS, classifier(TEXTS).top_k(1), strict=True):
                print(f"  {text!r} -> {best[0]['label']} {best[0]['score']:.4f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="edgeship-coreml-")))
