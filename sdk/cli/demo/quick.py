"""``edgeship demo --quick``: train, package for ONNX Runtime and print the table, without a fleet.

Trains a small PyTorch classifier (no download), packages it for ONNX Runtime at fp32 and
int8-dynamic, verifies each bundle, runs the held-out set through the device runtime one sample
at a time, and prints accuracy, latency p50 and size for the original model and each bundle.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DemoRow", "digits_split", "run_demo", "train_mlp"]

SEED = 0


@dataclass(frozen=True)
class DemoRow:
    model: str
    accuracy: float
    p50_ms: float
    size_bytes: int


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=SEED, stratify=y)
    return x_train, x_test, y_train, y_test


def train_mlp(x: np.ndarray, y: np.ndarray, *, seed: int = SEED, epochs: int = 40) -> Any:
    """A 64-128-64-10 MLP trained with Adam on ``x``, ``y``; deterministic for a ``seed``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-128-64-10 MLP: thread hand-offs cost more than they bring
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    torch.set_num_threads(threads)
    return model.eval()


def _p50_ms(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> tuple[float, np.ndarray]:
    """Run ``fn`` on each row at batch 1; returns the median latency and the predicted classes."""
    for row in x[:10]:  # warm up
        fn(row[None])
    times, preds = [], []
    for row in x:
        t0 = time.perf_counter()
        out = fn(row[None])
        times.append((time.perf_counter() - t0) * 1e3)
        preds.append(int(np.argmax(out)))
    return statistics.median(times), np.asarray(preds)


def run_demo(out_dir: Path, progress: Callable[[str], None] = print) -> list[DemoRow]:
    """Run the demo in ``out_dir`` (keys, bundles, installed state) and print the table.

    Returns:
        One row for the original model and one for each bundle.
    """
    import torch

    from device_runtime import load
    from packagers import PackageOptions, package
    from sdk.signing import generate_keypair

    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, x_test, y_train, y_test = digits_split()
    progress(f"digits: {len(x_train)} training and {len(x_test)} held-out images of 8x8 pixels")
    model = train_mlp(x_train, y_train)
    progress("trained a 64-128-64-10 MLP in PyTorch")

    key_dir = out_dir / "keys"
    if not (key_dir / "demo.key").exists():
        generate_keypair(key_dir, "demo")
    private_key, public_key = key_dir / "demo.key", key_dir / "demo.pub"

    results = package(
        model,
        name="digits",
        version=1,
        key=private_key,
        out_dir=out_dir / "bundles",
        precision=["fp32", "int8-dynamic"],
        example_inputs={"pixels": x_train[:1]},
        calibration={"pixels": x_test},
        labels=y_test,
        options=PackageOptions(overwrite=True),  # the demo rebuilds its own v1 on every run
        progress=progress,
    )

    with torch.no_grad():

        def torch_predict(row: np.ndarray) -> np.ndarray:
            return model(torch.from_numpy(row)).numpy()

        p50, preds = _p50_ms(torch_predict, x_test)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    rows = [DemoRow("original (PyTorch eager)", float(np.mean(preds == y_test)), p50, buf.getbuffer().nbytes)]

    for r in results:
        progress(f"device runtime: verifying and loading {r.bundle_path.name}")
        with load(r.bundle_path, [public_key], state_dir=out_dir / "device-state") as m:
            output = m.manifest.outputs[0].name

            def bundle_predict(row: np.ndarray, m: Any = m, output: str = output) -> np.ndarray:
                return m.predict({"pixels": row})[output]

            p50, preds = _p50_ms(bundle_predict, x_test)
        accuracy = float(np.mean(preds == y_test))
        rows.append(DemoRow(f"{r.target} {r.precision}", accuracy, p50, r.bundle_path.stat().st_size))

    print()
    print(f"digits held-out set: {len(x_test)} images, batch 1, CPU")
    print(f"{'model':<28}{'accuracy':>10}{'p50 ms':>10}{'size KiB':>10}")
    print("-" * 58)
    for row in rows:
        print(f"{row.model:<28}{row.accuracy:>10.4f}{row.p50_ms:>10.4f}{row.size_bytes / 1024:>10.1f}")
    print(f"\nbundles in {out_dir / 'bundles'}; public key {public_key}")
    return rows
