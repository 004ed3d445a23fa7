"""Int8 bundles of a trained third-party CNN (a text detector) for ONNX Runtime and OpenVINO, against fp32.

    python benchmarks/cnn_int8.py [--size 640] [--images 24] [--rounds 20] [--threads 1] [--cache DIR] [--json out.json]

Model: PaddleOCR's PP-OCRv4 text detector, ``ch_PP-OCRv4_det_infer.onnx``, as shipped inside the PyPI wheel
``rapidocr-onnxruntime==1.4.4`` (``pip download --no-deps`` into ``--cache``, default
``~/.cache/edgeship/bench-models``, once; the ONNX file is read from the wheel). A DBNet-style detector:
convolutions (batch norm folded by graph pre-processing), hard-swish, upsampling, and a sigmoid text
probability map as output, dynamic N/H/W. Data: images rendered here with PIL (lines of real English words
from ``data/sentences.txt`` in several sizes, colours and positions on plain or noisy backgrounds), normalised
as rapidocr's config says for this model (RGB/255, mean 0.5, std 0.5, NCHW). Half calibrate (given to
``package`` as ``calibration``), the other half are held out.

Rows: fp32 and every int8 precision of the ONNX Runtime and OpenVINO targets (those that pass ``package``'s
validation; a refused one is listed with the reason), each loaded with ``device_runtime.load``. Per row: p50/p95
at batch 1 (rows interleaved round by round), on the held-out images: cosine of the probability maps against
the original model (mean and min) and IoU of the text masks thresholded at rapidocr's 0.3 (mean and min),
the layers kept in float where the bundle records them, and the size.

Target (issue 15): an int8 bundle per target that passes validation and runs >= 1.5x faster than that
target's fp32 bundle at batch 1, on a CPU with int8 dot-product instructions (elsewhere the ratio is reported).
The functions are importable (``tests/benchmarks/test_cnn_int8_smoke.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (REPO, HERE):  # run from a checkout without installing it; _machine is a sibling
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _machine import cpu_line, has_int8_dot  # noqa: E402

WHEEL = "rapidocr-onnxruntime==1.4.4"
MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
MEAN, STD = 0.5, 0.5  # rapidocr config.yaml, Det: mean/std [0.5, 0.5, 0.5] on pixels / 255
THRESH = 0.3  # rapidocr config.yaml, Det: thresh (the probability map's binarisation)
TARGET_SPEEDUP = 1.5
SENTENCES = HERE / "data" / "sentences.txt"
DEFAULT_CACHE = Path.home() / ".cache" / "edgeship" / "bench-models"
RunFn = Callable[[Mapping[str, np.ndarray]], np.ndarray]


@dataclass
class Row:
    """One line of the table."""

    name: str
    target: str
    precision: str
    size_bytes: int
    run: RunFn | None = None
    p50: float = float("nan")
    p95: float = float("nan")
    cosine_mean: float = float("nan")
    cosine_min: float = float("nan")
    iou_mean: float = float("nan")
    iou_min: float = float("nan")
    float_layers: list[str] = field(default_factory=list)
    note: str = ""


# ---- model and data --------------------------------------------------------------------------------
def fetch_detector(cache: Path, wheel: Path | None = None) -> Path:
    """``ch_PP-OCRv4_det_infer.onnx`` from the rapidocr wheel (``wheel``, else ``pip download`` into ``cache``).

    Raises:
        RuntimeError: pip could not download the wheel, or it lacks the model.
    """
    target = cache / Path(MEMBER).name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    if wheel is None:
        found = sorted(cache.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
        if not found:
            pip = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), WHEEL],
                                 capture_output=True, text=True)  # fmt: skip
            if pip.returncode != 0:
                raise RuntimeError(f"pip download {WHEEL} failed: {(pip.stdout + pip.stderr)[-800:]}")
            found = sorted(cache.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
        wheel = found[0]
    with zipfile.ZipFile(wheel) as archive:
        if MEMBER not in archive.namelist():
            raise RuntimeError(f"{wheel.name} has no {MEMBER}")
        partial = target.with_suffix(".partial")
        partial.write_bytes(archive.read(MEMBER))
        partial.replace(target)
    return target


def render_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` RGB uint8 images [n, size, size, 3] of printed text lines (real words) on varied backgrounds."""
    from PIL import Image, ImageDraw, ImageFont

    words = " ".join(line.strip() for line in SENTENCES.read_text(encoding="utf-8").splitlines()).split()
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        background = rng.integers(170, 256, size=3)
        pixels = np.clip(background + rng.normal(0, 6 * (i % 3), (size, size, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        y = int(rng.integers(2, max(3, size // 8)))
        while y < size - 16:
            height = int(rng.integers(max(10, size // 40), max(12, size // 12)))
            font = ImageFont.load_default(size=height)
            start = int(rng.integers(0, len(words) - 8))
            text = " ".join(words[start : start + int(rng.integers(2, 7))])
            x = int(rng.integers(0, max(1, size // 3)))
            ink = tuple(int(c) for c in rng.integers(0, 90, size=3))
            draw.text((x, y), text, fill=ink, font=font)
            y += int(height * rng.uniform(1.4, 3.0))
        images[i] = np.asarray(image)
    return images


def normalize(images: np.ndarray) -> np.ndarray:
    """rapidocr's detector input: (pixels / 255 - 0.5) / 0.5, NCHW float32."""
    x = (images.astype(np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# ---- metrics ---------------------------------------------------------------------------------------
def map_metrics(maps: np.ndarray, reference: np.ndarray, thresh: float = THRESH) -> dict[str, float]:
    """Per-image cosine of the probability maps and IoU of the masks thresholded at ``thresh`` (mean, min)."""
    a = maps.reshape(len(maps), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    ma, mb = a > thresh, b > thresh
    union = (ma | mb).sum(1)
    iou = np.where(union > 0, (ma & mb).sum(1) / np.maximum(union, 1), 1.0)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "iou_mean": float(iou.mean()),
            "iou_min": float(iou.min())}  # fmt: skip


def bundle_runner(bundle: Path, trust: Any, threads: int) -> tuple[RunFn, Any]:
    """``device_runtime.load`` of a bundle and a run function returning its single output, and the model."""
    import device_runtime

    model = device_runtime.load(bundle, trust, intra_op_threads=threads)
    output = model.manifest.outputs[0].name

    def run(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(model.predict(dict(feeds))[output])

    return run, model


def reference_runner(path: Path, threads: int) -> RunFn:
    """The original ONNX file on a bare onnxruntime CPU session (the reference maps)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda feeds: np.asarray(session.run(None, dict(feeds))[0])


def time_interleaved(runs: Mapping[str, RunFn], feeds: Mapping[str, np.ndarray], *, rounds: int,
                     warmup: int = 2) -> dict[str, tuple[float, float]]:  # fmt: skip
    """p50 and p95 (ms) of each run on ``feeds``: one call of each per round, in turn."""
    for run in runs.values():
        for _ in range(warmup):
            run(feeds)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run(feeds)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {n: (float(np.percentile(t, 50)), float(np.percentile(t, 95))) for n, t in times.items()}


def package_options() -> Any:
    """``PackageOptions`` for the int8 bundles: the accuracy-aware search where this edgeship has it."""
    from packagers import PackageOptions

    fields = getattr(PackageOptions, "__dataclass_fields__", {})
    return PackageOptions(target_cosine=0.99) if "target_cosine" in fields else PackageOptions()


def float_layers_of(manifest: Any) -> list[str]:
    """The layers a bundle kept in float, where its manifest records them."""
    quant = dict(manifest.runtime.get("quantization", {}) or {})
    return [str(x) for x in quant.get("float_layers", [])]


def build(model: Path, calibration: np.ndarray, key: Path, out: Path, plan: Mapping[str, Sequence[str]],
          say: Callable[[str], None]) -> tuple[list[Any], list[str]]:  # fmt: skip
    """Package ``plan`` ({target: precisions}), one call per (target, precision); refusals are noted."""
    from packagers import available_targets, package
    from sdk.errors import EdgeshipError

    installed = {t.value for t in available_targets()}
    results: list[Any] = []
    failures: list[str] = []
    for target, precisions in plan.items():
        if target not in installed:
            failures.append(f"{target}: not installed here")
            continue
        for precision in precisions:
            start = time.perf_counter()
            try:
                results += package(model, name="ppocr-det", version=1, key=key, out_dir=out, target=target,
                                   precision=[precision], calibration={"x": calibration}, options=package_options(),
                                   progress=say)  # fmt: skip
                say(f"{target} {precision}: built in {time.perf_counter() - start:.1f} s")
            except EdgeshipError as e:
                failures.append(f"{target} {precision}: {type(e).__name__}: {str(e)[:300]}")
    return results, failures


PLAN = {"onnxruntime": ("fp32", "int8", "int8-dynamic"), "openvino": ("fp32", "int8")}


# ---- table -----------------------------------------------------------------------------------------
def format_table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width table."""
    header = ["bundle", "p50 ms", "p95 ms", "x fp32", "cos mean", "cos min", "IoU mean", "IoU min", "MB",
              "float layers"]  # fmt: skip
    fp32 = {r.target: r.p50 for r in rows if r.precision == "fp32"}
    lines = [header]
    for r in rows:
        speed = fp32.get(r.target, float("nan")) / r.p50
        kept = f"{len(r.float_layers)}: {', '.join(r.float_layers[:3])}" if r.float_layers else "0"
        lines.append([r.name, f"{r.p50:.2f}", f"{r.p95:.2f}", f"{speed:.2f}", f"{r.cosine_mean:.4f}",
                      f"{r.cosine_min:.4f}", f"{r.iou_mean:.4f}", f"{r.iou_min:.4f}", f"{r.size_bytes / 1e6:.1f}",
                      kept + (f" ({r.note})" if r.note else "")])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        cells = zip(line, widths, strict=True)
        out.append("  ".join(c.ljust(w) if j in (0, 9) else c.rjust(w) for j, (c, w) in enumerate(cells)))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def judge(rows: Sequence[Row], targets: Sequence[str], dot_product: bool | None = None) -> tuple[list[str], bool]:
    """Per target: its fastest int8 bundle (built, so validated) against its fp32 bundle at batch 1."""
    dot_product = has_int8_dot() if dot_product is None else dot_product
    lines: list[str] = []
    ok = True
    for target in targets:
        fp32 = next((r for r in rows if r.target == target and r.precision == "fp32"), None)
        int8 = [r for r in rows if r.target == target and r.precision.startswith("int8") and np.isfinite(r.p50)]
        if fp32 is None or not int8:
            lines.append(f"FAIL  {target}: no {'fp32' if fp32 is None else 'int8'} bundle passed validation")
            ok = False
            continue
        best = min(int8, key=lambda r: r.p50)
        speedup = fp32.p50 / best.p50
        passed = speedup >= TARGET_SPEEDUP
        verdict = ("PASS" if passed else "FAIL") if dot_product else "info"
        ok = ok and (passed or not dot_product)
        accuracy = f"cosine {best.cosine_mean:.4f}, IoU {best.iou_mean:.4f}"
        lines.append(f"{verdict}  {target}: {best.precision} {speedup:.2f}x faster than fp32 at batch 1 "
                     f"(target >= {TARGET_SPEEDUP}x; {accuracy})")  # fmt: skip
    if not dot_product:
        lines.append("info  no int8 dot-product instructions on this CPU (VNNI, asimddp): speed not judged")
    return lines, ok


# ---- the run ---------------------------------------------------------------------------------------
def run_benchmark(model: Path, *, size: int, images: int, rounds: int, threads: int, workdir: Path,
                  plan: Mapping[str, Sequence[str]] = PLAN, say: Callable[[str], None] = print,
                  ) -> tuple[list[Row], list[str]]:  # fmt: skip
    """Render the data, package ``plan``, load every bundle, measure; the rows and the refusals."""
    from sdk.signing import TrustedKeys, generate_keypair, load_public_key

    x = normalize(render_images(images, size))
    calibration, held_out = x[: images // 2], x[images // 2 :]
    private, public = generate_keypair(workdir / "keys")
    trust = TrustedKeys((load_public_key(public),))
    what = ", ".join(f"{t}: {'/'.join(p)}" for t, p in plan.items())
    say(f"packaging {model.name} ({what}), {len(calibration)} calibration images {size}x{size}")
    results, failures = build(model, calibration, private, workdir / "bundles", plan, say)
    reference = reference_runner(model, threads)
    expected = np.concatenate([reference({"x": held_out[i : i + 1]}) for i in range(len(held_out))])
    rows: list[Row] = []
    models = []
    for result in results:
        row = Row(f"{result.target} {result.precision}", result.target, result.precision, result.size_bytes,
                  float_layers=float_layers_of(result.manifest))  # fmt: skip
        row.run, loaded = bundle_runner(result.bundle_path, trust, threads)
        models.append(loaded)
        maps = np.concatenate([row.run({"x": held_out[i : i + 1]}) for i in range(len(held_out))])
        for k, v in map_metrics(maps, expected).items():
            setattr(row, k, v)
        rows.append(row)
    say(f"latency: batch 1, {size}x{size}, {threads} thread(s), {rounds} interleaved rounds")
    timing = time_interleaved({r.name: r.run for r in rows if r.run is not None}, {"x": held_out[:1]},
                              rounds=rounds)  # fmt: skip
    for row in rows:
        row.p50, row.p95 = timing.get(row.name, (float("nan"), float("nan")))
    for loaded in models:
        loaded.close()
    return rows, failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=640, help="image side, a multiple of 32 (default 640)")
    parser.add_argument("--images", type=int, default=24, help="rendered images, half calibrate (default 24)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for every row (default 1)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the wheel and model are kept")
    parser.add_argument("--wheel", type=Path, help="a local rapidocr-onnxruntime 1.4.4 wheel instead of pip")
    parser.add_argument("--json", type=Path, help="also write the rows and verdicts as JSON")
    args = parser.parse_args(argv)
    if args.size % 32 or args.images < 4:
        parser.error("--size must be a multiple of 32 and --images at least 4")
    model = fetch_detector(args.cache, args.wheel)
    print(cpu_line())
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with tempfile.TemporaryDirectory(prefix="edgeship-cnn-") as tmp:
        rows, failures = run_benchmark(model, size=args.size, images=args.images, rounds=args.rounds,
                                       threads=args.threads, workdir=Path(tmp))  # fmt: skip
    print()
    print(f"PP-OCRv4 text detector ({WHEEL}), batch 1, {args.size}x{args.size}, {args.threads} thread(s); "
          f"metrics vs the original on {args.images - args.images // 2} held-out rendered images "
          f"(IoU of maps > {THRESH})")  # fmt: skip
    print(format_table(rows))
    lines, ok = judge(rows, list(PLAN))
    print()
    print("\n".join(lines + [f"note  refused: {f}" for f in failures]))
    if args.json:
        data = {"rows": [{k: v for k, v in r.__dict__.items() if k != "run"} for r in rows], "verdicts": lines,
                "failures": failures, "cpu": cpu_line()}  # fmt: skip
        args.json.write_text(json.dumps(data, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
