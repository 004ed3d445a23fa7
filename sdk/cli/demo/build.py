"""The demo's first stage: train the digits MLP twice (versions 1 and 2), package signed bundles, print the table.

Version 1 is packaged for every target asked (by default all four) at fp32 and int8 (Core ML: int8
weights, its int8 form); each bundle is validated against the PyTorch model on the held-out set and
benchmarked on this CPU, except Core ML off macOS, whose row says that only its structure was checked.
Version 2 (retrained longer, with another seed) is packaged at int8 for the targets the demo's devices run.

The demo runs this stage as a process of its own (``main``: ``python -m sdk.cli.demo.build``): torch,
TensorFlow and OpenVINO stay out of the process that supervises the fleet, and a Ctrl-C there is not
delivered into those libraries' threads.

``break_weights`` makes the bundle the demo's canary fails on: a copy of a genuine OpenVINO bundle whose
weights file is zeroed and which is signed again with the release key, as a broken build pipeline would
sign it. Its signatures and hashes are valid, so the fleet accepts the upload and the device installs it;
only the device's golden health check (the bundle's recorded outputs against what the model computes)
can tell, and it does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdk.cli.demo.quick import digits_split, train_mlp
from sdk.cli.demo.supervisor import DemoFailed
from sdk.cli.tables import table_lines

__all__ = ["ALL_TARGETS", "BUILT_JSON", "Built", "BundleRow", "break_weights", "build_bundles", "main", "table"]

# target -> the precisions "fp32 and int8" mean for it (Core ML quantizes weights only: int8-weights)
ALL_TARGETS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "int8"),
    "tflite": ("fp32", "int8"),
    "coreml": ("fp32", "int8-weights"),
}
BUILT_JSON = "built.json"  # in the bundles folder: what ``main`` hands back to the demo
V2_EPOCHS, V2_SEED = 60, 1  # version 2: retrained longer from another seed (version 1: 40 epochs, seed 0)


@dataclass(frozen=True)
class BundleRow:
    """One packaged bundle as the table shows it."""

    version: int
    target: str
    precision: str
    path: Path
    size_bytes: int
    accuracy: float | None  # on the held-out set through the bundle (None: not run here)
    p50_ms: float | None  # host CPU, batch 1 (None: not run here)
    check: str  # how it was validated


@dataclass(frozen=True)
class Built:
    """What the first stage made: the key pair, the bundles of both versions, the original's accuracy."""

    private_key: Path
    public_key: Path
    rows: tuple[BundleRow, ...]
    original_accuracy: float
    samples: int

    def to_json(self) -> str:
        rows = [{**r.__dict__, "path": str(r.path)} for r in self.rows]
        return json.dumps({"private_key": str(self.private_key), "public_key": str(self.public_key), "rows": rows,
                           "original_accuracy": self.original_accuracy, "samples": self.samples}, indent=1)  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Built:
        d = json.loads(text)
        rows = tuple(BundleRow(**{**r, "path": Path(r["path"])}) for r in d["rows"])
        return cls(Path(d["private_key"]), Path(d["public_key"]), rows, d["original_accuracy"], d["samples"])

    def bundle(self, version: int, target: str, precision: str) -> Path:
        for row in self.rows:
            if (row.version, row.target, row.precision) == (version, target, precision):
                return row.path
        raise DemoFailed(f"no digits v{version} {target}/{precision} bundle was packaged")


def _row(version: int, result: Any) -> BundleRow:
    v = result.validation
    numeric = v.get("numeric") if isinstance(v.get("numeric"), dict) else {}
    if numeric and not numeric.get("ran", True):
        if not (v.get("structure") or {}).get("passed"):
            raise DemoFailed(f"{result.bundle_path.name}: structural check did not pass: {v.get('structure')}")
        check = f"structural check only, passed ({str(numeric.get('reason', 'not run here')).split(';')[0]})"
        return BundleRow(version, result.target, result.precision, result.bundle_path, result.size_bytes, None, None,
                         check)  # fmt: skip
    if not v.get("passed"):
        raise DemoFailed(f"{result.bundle_path.name}: validation did not pass: {v.get('failures')}")
    cosine = min((m.get("cosine_min", 1.0) for m in v.get("metrics", {}).values()), default=1.0)
    accuracy = (v.get("accuracy") or {}).get("bundle")
    p50 = result.latency_ms.get("p50")
    return BundleRow(version, result.target, result.precision, result.bundle_path, result.size_bytes,
                     None if accuracy is None else float(accuracy), None if p50 is None else float(p50),
                     f"numeric: passed, min cosine {cosine:.4f} vs PyTorch")  # fmt: skip


def build_bundles(
    out_dir: Path, targets: Sequence[str], device_targets: Sequence[str], say: Callable[[str], None]
) -> Built:
    """Train versions 1 and 2 and package them (see the module docstring); bundles in ``out_dir/bundles``.

    Raises:
        DemoFailed: a bundle failed its validation, or the trained model is not accurate.
        PackagingError: a target refused the model (names the valid choices).
    """
    import numpy as np

    from packagers import package
    from sdk.signing import generate_keypair

    x_train, x_test, y_train, y_test = digits_split()
    say(f"digits: {len(x_train)} training and {len(x_test)} held-out 8x8 images (scikit-learn's copy: no download)")
    key_dir = out_dir / "keys"
    if not (key_dir / "release.key").exists():
        generate_keypair(key_dir, "release")
    private_key, public_key = key_dir / "release.key", key_dir / "release.pub"
    bundles = out_dir / "bundles"
    shutil.rmtree(bundles, ignore_errors=True)

    rows: list[BundleRow] = []
    accuracy = 0.0
    for version, seed, epochs, plan in (
        (1, 0, 40, {t: ALL_TARGETS[t] for t in targets}),
        (2, V2_SEED, V2_EPOCHS, {t: ("int8",) for t in device_targets}),
    ):
        model = train_mlp(x_train, y_train, seed=seed, epochs=epochs)
        import torch

        with torch.no_grad():
            predicted = model(torch.from_numpy(x_test)).numpy().argmax(axis=1)
        acc = float(np.mean(predicted == y_test))
        if acc < 0.9:
            raise DemoFailed(f"digits v{version} reached only {acc:.3f} held-out accuracy (expected > 0.9)")
        accuracy = acc if version == 1 else accuracy
        say(f"trained digits v{version}: a 64-128-64-10 MLP, {epochs} epochs, held-out accuracy {acc:.4f}")
        for target, precisions in plan.items():
            say(f"packaging digits v{version} for {target} at {', '.join(precisions)}")
            results = package(
                model, name="digits", version=version, key=private_key, out_dir=bundles, target=target,
                precision=list(precisions), example_inputs={"pixels": x_train[:1]}, calibration={"pixels": x_test},
                labels=y_test,
            )  # fmt: skip
            rows += [_row(version, r) for r in results]
    return Built(private_key, public_key, tuple(rows), accuracy, len(x_test))


def table(built: Built) -> list[str]:
    """The validation and benchmark table of every bundle (accuracy and p50 on the held-out set, batch 1)."""
    lines = [f"held-out set: {built.samples} images; PyTorch original (v1) accuracy {built.original_accuracy:.4f}"]
    rows = [
        [f"v{r.version}", r.target, r.precision, f"{r.size_bytes / 1024:.1f}",
         "-" if r.accuracy is None else f"{r.accuracy:.4f}", "-" if r.p50_ms is None else f"{r.p50_ms:.4f}", r.check]
        for r in built.rows
    ]  # fmt: skip
    return lines + table_lines(["version", "target", "precision", "KiB", "accuracy", "p50 ms", "validation"], rows)


def break_weights(bundle: Path, private_key: Path, public_key: Path, out: Path) -> Path:
    """A copy of ``bundle`` with its weights file zeroed, signed again with ``private_key`` (see the module doc).

    Raises:
        DemoFailed: the bundle names no separate weights file (only OpenVINO bundles have one).
    """
    from sdk.bundle import read_bundle, write_bundle
    from sdk.signing import TrustedKeys, load_private_key

    with tempfile.TemporaryDirectory(prefix="edgeship-demo-") as scratch:
        verified = read_bundle(bundle, TrustedKeys.from_files([public_key]), Path(scratch) / "bundle")
        weights = verified.manifest.runtime.get("weights")
        if not isinstance(weights, str):
            raise DemoFailed(f"{bundle.name} has no separate weights file to break")
        members: dict[str, str | Path | bytes] = {f.path: verified.path(f.path) for f in verified.manifest.files}
        members[weights] = bytes(verified.path(weights).stat().st_size)
        write_bundle(out, verified.manifest, members, [load_private_key(private_key)])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sdk.cli.demo.build OUT --targets A,B --device-targets C,D``: build, print the table, and
    write ``OUT/bundles/built.json``; exit 1 with one ``error:`` line on an expected failure, 130 on Ctrl-C."""
    from sdk.errors import EdgeshipError

    p = argparse.ArgumentParser(prog="python -m sdk.cli.demo.build")
    p.add_argument("out", type=Path)
    p.add_argument("--targets", required=True)
    p.add_argument("--device-targets", required=True)
    args = p.parse_args(argv)
    start = time.perf_counter()

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {line}", file=sys.stderr, flush=True)

    try:
        built = build_bundles(args.out, args.targets.split(","), args.device_targets.split(","), say)
    except EdgeshipError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    print("\n".join(table(built)), flush=True)
    (args.out / "bundles" / BUILT_JSON).write_text(built.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
