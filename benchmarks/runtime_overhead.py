"""How much the device runtime adds on top of each runtime it wraps: predict, import, memory, HTTP serving.

    python benchmarks/runtime_overhead.py [--iterations N] [--threads T]

Builds a small signed bundle (an MLP, 64 -> 128 -> 10) for every CPU target whose runtime is installed
here (ONNX Runtime always; OpenVINO; TFLite when tensorflow is there to convert the model; building
needs the host tools, the measurements use only the device runtime), then prints one table, every row
measured in this run:

- ``Model.predict`` vs the runtime's own call with the same settings, batch 1, per backend
  (``InferenceSession.run``, ``InferRequest.infer``, a TFLite ``SignatureRunner``; target: <= 1.05x, or
  <= +30 us, whichever is larger);
- ``import device_runtime`` in fresh interpreters, median of several: after ``import onnxruntime`` (what
  the device runtime adds to the runtime it needs; target <= 150 ms), and cold, for reference;
- resident memory added by ``import device_runtime`` (with ``metrics`` and ``serve``) beyond ``import
  onnxruntime`` (target <= 25 MB);
- ``POST /v1/predict`` p50 over loopback (keep-alive connection, JSON and .npy bodies) vs ``predict`` p50
  (target <= +1 ms).

Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing it
    sys.path.insert(0, str(REPO))

from _machine import cpu_line  # noqa: E402  (benchmarks/, on sys.path as the script's folder)
from _mlp import mlp_onnx, mlp_weights  # noqa: E402

IN, HIDDEN, OUT = 64, 128, 10


def _weights() -> tuple[np.ndarray, np.ndarray]:
    return mlp_weights(HIDDEN, seed=0, inputs=IN, outputs=OUT)


def _onnx() -> bytes:
    return mlp_onnx(*_weights(), output="logits")


def mlp_openvino(folder: Path) -> dict[str, bytes]:
    """The MLP as an OpenVINO IR (``model.xml`` and ``model.bin``), converted from the ONNX model."""
    import openvino as ov

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mlp.onnx").write_bytes(_onnx())
    ov.save_model(ov.convert_model(str(folder / "mlp.onnx")), str(folder / "model.xml"), compress_to_fp16=False)
    return {name: (folder / name).read_bytes() for name in ("model.xml", "model.bin")}


def mlp_tflite() -> bytes:
    """The MLP as a TFLite flatbuffer with a ``serving_default`` signature (needs ``tensorflow``)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    w1, w2 = _weights()

    class Mlp(tf.Module):  # type: ignore[misc]  # tensorflow is untyped
        @tf.function(input_signature=[tf.TensorSpec([None, IN], tf.float32, name="x")])  # type: ignore[untyped-decorator]
        def serve(self, x: Any) -> Any:
            return {"logits": tf.matmul(tf.nn.relu(tf.matmul(x, w1)), w2)}

    module = Mlp()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
    return bytes(converter.convert())


def build_bundle(folder: Path, target: str = "onnxruntime") -> tuple[Path, Path]:
    """A signed bundle of the MLP for ``target``, and its public key."""
    from sdk.bundle import write_bundle
    from sdk.manifest import Manifest, TensorSpec
    from sdk.signing import generate_keypair, load_private_key

    members: dict[str, bytes]
    if target == "onnxruntime":
        model, members = "model.onnx", {"model.onnx": _onnx()}
        runtime: dict[str, Any] = {"package": "onnxruntime", "providers": ["CPUExecutionProvider"]}
    elif target == "openvino":
        model, members = "model.xml", mlp_openvino(folder / "ir")
        runtime = {"package": "openvino", "devices": ["CPU"], "performance_hint": "LATENCY",
                   "inference_precision_hint": "f32", "weights": "model.bin"}  # fmt: skip
    elif target == "tflite":
        model, members = "model.tflite", {"model.tflite": mlp_tflite()}
        runtime = {"package": "ai-edge-litert", "signature": "serving_default"}
    else:
        raise ValueError(f"no benchmark bundle for target {target!r}")
    private, public = generate_keypair(folder, f"bench-{target}")
    manifest = Manifest(
        name="mlp",
        version=1,
        target=target,
        precision="fp32",
        model=model,
        inputs=(TensorSpec("x", "float32", ("batch", IN)),),
        outputs=(TensorSpec("logits", "float32", ("batch", OUT)),),
        created="2026-01-01T00:00:00Z",
        runtime=runtime,
    )
    out = folder / f"mlp-1-{target}-fp32.edgebundle"
    write_bundle(out, manifest, members, [load_private_key(private)])
    return out, public


def bare_call(target: str, root: Path, threads: int, x: np.ndarray) -> tuple[str, Callable[[], object]]:
    """The runtime's own call for the bundle extracted at ``root``, set up as the backend sets it up."""
    if target == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        session = ort.InferenceSession(str(root / "model.onnx"), so, providers=["CPUExecutionProvider"])
        return "InferenceSession.run", lambda: session.run(["logits"], {"x": x})[0]
    if target == "openvino":
        import openvino as ov

        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
        compiled = core.compile_model(core.read_model(str(root / "model.xml"), str(root / "model.bin")), "CPU", config)
        request, output = compiled.create_infer_request(), compiled.output(0)
        return "InferRequest.infer", lambda: request.infer({"x": x}, share_inputs=True)[output]
    if target == "tflite":
        from device_runtime.backends.tflite import import_interpreter

        module, _, _ = import_interpreter()
        interpreter = module.Interpreter(model_path=str(root / "model.tflite"), num_threads=threads)
        runner = interpreter.get_signature_runner("serving_default")
        return "SignatureRunner", lambda: runner(x=x)["logits"]
    raise ValueError(f"no bare call for target {target!r}")


def available_targets() -> list[str]:
    """The CPU targets whose runtime is installed here (as the agent reports it) and whose model we can build."""
    import importlib.util

    from device_runtime._sysinfo import RUNTIME_PACKAGES, runtime_versions

    installed = {RUNTIME_PACKAGES[package] for package in runtime_versions()}
    builders = {"onnxruntime": "onnx", "openvino": "openvino", "tflite": "tensorflow"}  # host tools that build it
    return [t for t, tool in builders.items() if t in installed and importlib.util.find_spec(tool) is not None]


def per_call_us(fn: Callable[[], object], iterations: int, clock: Callable[[], float]) -> float:
    """Mean time of one call over ``iterations`` calls, in microseconds of ``clock``."""
    start = clock()
    for _ in range(iterations):
        fn()
    return (clock() - start) / iterations * 1e6


def compare_us(a: Callable[[], object], b: Callable[[], object], iterations: int, blocks: int = 15) -> dict[str, float]:
    """Per-call times of ``a`` and ``b`` in alternating blocks; the fastest block of each.

    On CPU time of this thread (``time.thread_time``: ONNX Runtime with one intra-op thread runs in the
    caller's thread) and on wall time. The fastest block is the one least disturbed by other processes.
    """
    for _ in range(min(200, iterations)):  # warm up
        a()
        b()
    result = {"a_cpu": float("inf"), "b_cpu": float("inf"), "a_wall": float("inf"), "b_wall": float("inf")}
    per_block = max(1, iterations // blocks)
    for _ in range(blocks):
        for name, fn in (("a", a), ("b", b)):
            result[f"{name}_cpu"] = min(result[f"{name}_cpu"], per_call_us(fn, per_block, time.thread_time))
            result[f"{name}_wall"] = min(result[f"{name}_wall"], per_call_us(fn, per_block, time.perf_counter))
    return result


def p50_us(fn: Callable[[], object], iterations: int) -> float:
    for _ in range(min(100, iterations)):
        fn()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


_PYCACHE = tempfile.mkdtemp(prefix="edgeship-bench-pycache-")
atexit.register(shutil.rmtree, _PYCACHE, True)


def in_fresh_interpreter(code: str) -> str:
    """Run ``code`` in a new interpreter and return its stdout.

    Bytecode is written and read (under a private ``PYTHONPYCACHEPREFIX``), as on a device where pip
    compiled the installed wheel, even when this shell sets ``PYTHONDONTWRITEBYTECODE``: without .pyc
    files every import would include compiling the source.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = _PYCACHE
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO, timeout=120, env=env
    )
    return result.stdout.strip()


def import_ms(statement: str, before: str = "pass", runs: int = 7) -> float:
    """Median seconds (as ms) of ``statement`` in fresh interpreters after ``before``; a first run fills the cache."""
    code = f"import time\n{before}\nt = time.perf_counter()\n{statement}\nprint(time.perf_counter() - t)"
    in_fresh_interpreter(code)
    return statistics.median(float(in_fresh_interpreter(code)) for _ in range(runs)) * 1000


RSS_CODE = textwrap.dedent(
    """
    import gc
    from device_runtime.metrics import rss_bytes  # stdlib only, a few kB
    import onnxruntime
    gc.collect()
    before = rss_bytes()
    import device_runtime, device_runtime.metrics, device_runtime.serve
    gc.collect()
    print((rss_bytes() - before) / 2**20)
    """
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000, help="predict calls timed per backend (15 blocks)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both sessions")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    import device_runtime
    from device_runtime.metrics import Metrics
    from device_runtime.serve import ModelServer

    rows: list[tuple[str, str, str, str, bool]] = []  # what, measured, reference, target, passed
    x = np.random.default_rng(1).standard_normal((1, IN)).astype(np.float32)
    feeds = {"x": x}
    built: dict[str, tuple[Path, Path]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for target in available_targets():
            (Path(tmp) / target).mkdir()
            bundle, public = built[target] = build_bundle(Path(tmp) / target, target)
            with device_runtime.load(bundle, [public], intra_op_threads=args.threads) as model:
                label, bare = bare_call(target, model.root, args.threads, x)
                np.testing.assert_allclose(model.predict(feeds)["logits"], np.asarray(bare()), rtol=1e-5, atol=1e-6)
                times = compare_us(bare, lambda: model.predict(feeds), args.iterations)
            for clock in ("cpu", "wall"):
                bare_us, predict_us = times[f"a_{clock}"], times[f"b_{clock}"]
                added = predict_us - bare_us
                rows.append((
                    f"Model.predict, batch 1, {target} ({'CPU' if clock == 'cpu' else 'wall'} time per call)",
                    f"{predict_us:.1f} us",
                    f"{label} {bare_us:.1f} us ({predict_us / bare_us:.2f}x, {added:+.1f} us)",
                    "<= 1.05x or <= +30 us",
                    predict_us <= max(1.05 * bare_us, bare_us + 30),
                ))  # fmt: skip

        bundle, public = built["onnxruntime"]
        with device_runtime.load(bundle, [public], intra_op_threads=args.threads) as model:
            metrics = Metrics()
            observe_us = min(per_call_us(lambda: metrics.observe(0.001), 20000, time.perf_counter) for _ in range(5))
            rows.append(("Metrics.observe", f"{observe_us:.2f} us", "", "< 5 us", observe_us < 5))

            with ModelServer(model) as server:
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
                json_body = json.dumps({"inputs": {"x": x.tolist()}}).encode()
                buffer = io.BytesIO()
                np.save(buffer, x)
                npy_body = buffer.getvalue()

                def post(body: bytes, content_type: str) -> None:
                    conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": content_type})
                    response = conn.getresponse()
                    response.read()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}")

                n = max(300, args.iterations // 4)
                predict_p50 = p50_us(lambda: model.predict({"x": x}), n)
                json_p50 = p50_us(lambda: post(json_body, "application/json"), n)
                npy_p50 = p50_us(lambda: post(npy_body, "application/x-npy"), n)
                conn.close()
            for label, value in (("JSON", json_p50), (".npy", npy_p50)):
                rows.append((
                    f"POST /v1/predict p50, {label} body, loopback",
                    f"{value / 1000:.3f} ms",
                    f"predict p50 {predict_p50 / 1000:.3f} ms (+{(value - predict_p50) / 1000:.3f} ms)",
                    "<= +1 ms p50",
                    value - predict_p50 <= 1000,
                ))  # fmt: skip

    after_ort = import_ms("import device_runtime", "import onnxruntime")
    cold = import_ms("import device_runtime")
    ort_ms = import_ms("import onnxruntime")
    numpy_ms = import_ms("import numpy")
    rows.append((
        "import device_runtime, after import onnxruntime (median of 7)",
        f"{after_ort:.0f} ms",
        f"import onnxruntime alone {ort_ms:.0f} ms",
        "<= 150 ms",
        after_ort <= 150,
    ))  # fmt: skip
    rows.append((
        "import device_runtime, cold (numpy included)",
        f"{cold:.0f} ms",
        f"import numpy alone {numpy_ms:.0f} ms",
        "(reference)",
        True,
    ))  # fmt: skip
    rss_mb = statistics.median(float(in_fresh_interpreter(RSS_CODE)) for _ in range(3))
    rows.append((
        "RSS added by import device_runtime (+metrics, serve)",
        f"{rss_mb:.1f} MB",
        "beyond import onnxruntime",
        "<= 25 MB",
        rss_mb <= 25,
    ))  # fmt: skip

    headers = ("measure", "value", "against", "target", "ok")
    table = [headers, *((w, v, a, t, "yes" if ok else "NO") for w, v, a, t, ok in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    print(cpu_line())
    print(f"onnxruntime {ort.__version__}, python {sys.version.split()[0]}, intra-op threads {args.threads}")
    for index, row in enumerate(table):
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("-+-".join("-" * width for width in widths))
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
