"""optimum's side of ``text_throughput.py``, run by that script inside its own virtual environment.

optimum-onnx pins an older transformers (< 4.58) than edgeship uses, so it cannot share edgeship's
interpreter: ``text_throughput.py`` makes a virtual environment, installs ``optimum[onnxruntime]`` there
and runs this file with its Python. It writes one JSON file (and the embeddings as ``.npy`` files):
optimum's ``ORTModelForFeatureExtraction`` export at fp32 and its dynamic int8 quantization for this CPU
(``AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)``, what optimum's docs give for
an AVX512-VNNI CPU), each timed end to end (tokenize, run, mean pool) at each batch size.

    python _optimum_text.py --folder MODEL --sentences FILE --out DIR [--threads 1] [--repeats 3] [--batches 1 32]

Only numpy, the standard library and what the venv installs are imported: not edgeship.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAX_LENGTH = 256  # all-MiniLM-L6-v2's sentence_bert_config max_seq_length, as sentence-transformers truncates


def _embedder(model: Any, tokenizer: Any) -> Callable[[Sequence[str]], np.ndarray]:
    """Tokenize (padded to the longest text), run, mean-pool over the attention mask."""

    def embed(texts: Sequence[str]) -> np.ndarray:
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
        hidden = np.asarray(model(**enc).last_hidden_state)
        mask = enc["attention_mask"][..., None].astype(np.float32)
        return np.asarray((hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9))

    return embed


def _pass(
    embed: Callable[[Sequence[str]], np.ndarray], sentences: Sequence[str], batch: int
) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    parts = [embed(sentences[i : i + batch]) for i in range(0, len(sentences), batch)]
    return time.perf_counter() - start, np.concatenate(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, required=True, help="the transformers model folder")
    parser.add_argument("--sentences", type=Path, required=True, help="one sentence a line")
    parser.add_argument("--out", type=Path, required=True, help="where the exports, JSON and embeddings go")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from importlib.metadata import version

    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig
    from transformers import AutoTokenizer

    sentences = [s.strip() for s in args.sentences.read_text(encoding="utf-8").splitlines() if s.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3

    fp32_dir, int8_dir = args.out / "fp32", args.out / "int8"
    start = time.perf_counter()
    ORTModelForFeatureExtraction.from_pretrained(args.folder, export=True).save_pretrained(fp32_dir)
    export_s = time.perf_counter() - start
    quantizer = ORTQuantizer.from_pretrained(fp32_dir)
    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
    quantizer.quantize(save_dir=int8_dir, quantization_config=config)
    models = {
        "optimum fp32": ORTModelForFeatureExtraction.from_pretrained(fp32_dir, session_options=options),
        "optimum int8 (avx512_vnni dynamic)": ORTModelForFeatureExtraction.from_pretrained(
            int8_dir, file_name="model_quantized.onnx", session_options=options
        ),
    }
    embedders = {name: _embedder(model, tokenizer) for name, model in models.items()}
    for embed in embedders.values():  # warm-up
        embed(sentences[:4])
    sizes = {"fp32": fp32_dir / "model.onnx", "int8": int8_dir / "model_quantized.onnx"}
    ready = {"rows": {name: {"size_bytes": sizes[name.split()[1]].stat().st_size} for name in embedders},
             "versions": {p: version(p) for p in ("optimum", "optimum-onnx", "transformers", "onnxruntime", "torch")},
             "export_s": round(export_s, 2)}  # fmt: skip
    print(json.dumps(ready), flush=True)
    # Serve passes on request (one JSON line each), so the caller interleaves them with its own rows.
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        name, batch = str(request["row"]), int(request["batch"])
        seconds, vectors = _pass(embedders[name], sentences, batch)
        path = args.out / f"{name.split()[1]}-b{batch}.npy"
        np.save(path, vectors)
        print(json.dumps({"seconds": seconds, "embeddings": str(path)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
