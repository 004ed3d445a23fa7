"""Quick start, ONNX Runtime: a PyTorch CNN to a signed int8 bundle to a verified prediction.

    python examples/quickstart/quickstart_onnxruntime.py [OUT_DIR]

Host side: `edgeship.package` exports, quantizes, validates against the original and signs.
Device side: `device_runtime.load` verifies the bundle against the trusted public key before
anything is loaded, then `predict` checks input names, dtypes and shapes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import device_runtime
import sdk
from sdk.signing import generate_keypair


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image).flatten(1))


def main(out_dir: Path) -> None:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    images = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)

    private_key, public_key = generate_keypair(out_dir / "keys", "quickstart")
    results = sdk.package(
        model,
        name="tiny-cnn",
        version=1,
        key=private_key,
        out_dir=out_dir / "bundles",
        target="onnxruntime",
        precision=["fp32", "int8-dynamic"],
        example_inputs={"image": images[:1]},
        calibration={"image": images},
    )
    for result in results:
        metrics = result.validation["metrics"]
        print(
            f"{result.bundle_path.name}: {result.size_bytes} bytes, p50 {result.latency_ms['p50']:.3f} ms, "
            f"validation {metrics}"
        )

    # On the device: only edgeship[device,onnxruntime] is needed from here on.
    with device_runtime.load(results[-1].bundle_path, trust=[public_key]) as bundle_model:
        outputs = bundle_model.predict({"image": images[:4]})
    with torch.no_grad():
        reference = model(torch.from_numpy(images[:4])).numpy()
    ((name, logits),) = outputs.items()
    print(f"{name}: shape {logits.shape}, argmax {logits.argmax(1).tolist()} (PyTorch: {reference.argmax(1).tolist()})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="edgeship-quickstart-")))
