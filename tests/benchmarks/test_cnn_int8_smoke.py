"""``benchmarks/cnn_int8.py``'s functions on a tiny detector-shaped CNN (seconds, nothing downloaded).

The benchmark itself downloads the rapidocr wheel and takes minutes; this keeps its pieces from rotting:
reading the model out of a wheel, rendering and normalising text images, packaging fp32 and int8 through
the same calls, loading on the device runtime, the map metrics (cosine, IoU), timing, table and verdicts.
"""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("edgeship_bench_cnn_int8", ROOT / "benchmarks" / "cnn_int8.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class TinyDetector(torch.nn.Module):
    """Conv-BN-ReLU, a strided conv, upsampling back, a sigmoid probability map: the detector's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Upsample(scale_factor=2.0), torch.nn.Conv2d(8, 1, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(x))


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = TinyDetector().eval()
    path = tmp_path_factory.mktemp("det") / "det.onnx"
    axes = {"x": {0: "n", 2: "h", 3: "w"}, "maps": {0: "n", 2: "h", 3: "w"}}
    torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), str(path), input_names=["x"], output_names=["maps"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
    return path


def test_detector_is_read_from_the_wheel_once(bench: ModuleType, tmp_path: Path) -> None:
    wheel = tmp_path / "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(bench.MEMBER, b"onnx bytes")
    model = bench.fetch_detector(tmp_path / "cache", wheel)
    assert model.read_bytes() == b"onnx bytes" and model.parent == tmp_path / "cache"
    wheel.unlink()
    assert bench.fetch_detector(tmp_path / "cache") == model  # cached: no wheel, no pip
    empty = tmp_path / "other.whl"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(RuntimeError, match="has no"):
        bench.fetch_detector(tmp_path / "cache2", empty)


def test_rendered_images_and_metrics(bench: ModuleType) -> None:
    images = bench.render_images(3, 64, seed=1)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    assert (images < 100).any() and (images > 170).any()  # dark ink on light backgrounds
    assert not np.array_equal(images[0], images[1])
    x = bench.normalize(images)
    assert x.shape == (3, 3, 64, 64) and x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0
    ref = np.zeros((2, 1, 4, 4), np.float32)
    ref[:, :, :2] = 0.9
    same = bench.map_metrics(ref, ref)
    assert same["cosine_min"] == pytest.approx(1.0) and same["iou_min"] == 1.0
    half = ref.copy()
    half[:, :, 1] = 0.1  # one of the two text rows lost
    assert bench.map_metrics(half, ref)["iou_mean"] == pytest.approx(0.5)


def test_cnn_benchmark_smallest_run(bench: ModuleType, detector: Path, tmp_path: Path) -> None:
    rows, failures = bench.run_benchmark(detector, size=32, images=6, rounds=2, threads=1, workdir=tmp_path,
                                         plan={"onnxruntime": ("fp32", "int8")}, say=lambda _line: None)  # fmt: skip
    assert failures == [] and [r.name for r in rows] == ["onnxruntime fp32", "onnxruntime int8"]
    assert rows[0].cosine_min > 0.9999 and rows[0].iou_min == 1.0
    assert rows[1].cosine_mean > 0.98 and all(0 < r.p50 <= r.p95 for r in rows)
    table = bench.format_table(rows)
    assert "onnxruntime int8" in table and "IoU mean" in table
    rows[1].p50 = rows[0].p50 / 2
    lines, ok = bench.judge(rows, ["onnxruntime", "openvino"], dot_product=True)
    assert lines[0].startswith("PASS  onnxruntime: int8 2.00x") and lines[1].startswith("FAIL  openvino")
    assert not ok
    rows[1].p50 = rows[0].p50
    lines, ok = bench.judge(rows, ["onnxruntime"], dot_product=False)
    assert ok and lines[0].startswith("info  onnxruntime") and "no int8 dot-product" in lines[-1]
