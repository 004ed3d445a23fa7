"""The local HTTP API under many concurrent clients, and its memory for one large JSON body.

Starts ``edgeship-device serve`` (a small MLP bundle) as a subprocess, then:

1. connect waits: for each client count, that many threads each open ``--requests`` fresh connections
   in a row and POST one ``.npy`` each; reported per count: the connect wait (p50, p99, max; how many over
   0.9 s), requests that failed (at a 10 s client timeout or refused), and the kernel's listen overflows
   (``TcpExt ListenOverflows``, machine-wide, read before and after);
2. memory: the server's peak RSS (``VmHWM``) after a 16 MiB JSON body and after the largest JSON body it
   accepts (``--json-mib``), over its RSS at rest.

``--code DIR`` runs the server from another checkout (e.g. an older commit, ``git archive REV | tar -x
-C DIR``) to compare before and after; the client side is the same.

    python benchmarks/serve_concurrency.py [--clients 16 64 150] [--requests 2] [--code DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _machine import cpu_line  # benchmarks/, on sys.path as the script's folder
from _mlp import mlp_onnx, mlp_weights

from sdk.bundle import write_bundle
from sdk.manifest import Manifest, TensorSpec
from sdk.signing import generate_keypair, load_private_key

ROOT = Path(__file__).resolve().parents[1]
_TIMEOUT_S = 10.0  # seconds a client waits for connect and for its answer


def _npy(a: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, a, allow_pickle=False)
    return buffer.getvalue()


def _bundle(folder: Path) -> tuple[Path, Path]:
    private, public = generate_keypair(folder, "bench")
    w1, w2 = mlp_weights(64, seed=1)
    x = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)
    manifest = Manifest(
        name="mlp", version=1, target="onnxruntime", precision="fp32", model="model.onnx",
        inputs=(TensorSpec("x", "float32", ("batch", 64)),), outputs=(TensorSpec("y", "float32", ("batch", 10)),),
        created="2026-01-01T00:00:00Z", runtime={"package": "onnxruntime", "providers": ["CPUExecutionProvider"]},
        golden={"inputs": {"x": "golden/x.npy"}, "outputs": {"y": "golden/y.npy"},
                "tolerance": {"atol": 1e-3, "rtol": 1e-3}},
    )  # fmt: skip
    members = {
        "model.onnx": mlp_onnx(w1, w2),
        "golden/x.npy": _npy(x),
        "golden/y.npy": _npy((np.maximum(x @ w1, 0) @ w2).astype(np.float32)),
    }
    out = folder / "mlp.edgebundle"
    write_bundle(out, manifest, members, [load_private_key(private)])
    return out, public


def _listen_overflows() -> int | None:
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return None


def _post(port: int, body: bytes, content_type: str) -> tuple[float, int | None]:
    """(connect wait in seconds, status or None when it failed)."""
    started = time.perf_counter()
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=_TIMEOUT_S)
    except OSError:
        return time.perf_counter() - started, None
    waited = time.perf_counter() - started
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    try:
        with sock:
            sock.sendall(head.encode() + body)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        return waited, int(reply.split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return waited, None


def _burst(port: int, clients: int, requests: int) -> dict[str, object]:
    body = _npy(np.ones((1, 64), np.float32))
    waits: list[float] = []
    statuses: list[int | None] = []
    lock = threading.Lock()
    gate = threading.Barrier(clients)

    def client() -> None:
        gate.wait()
        for _ in range(requests):
            waited, status = _post(port, body, "application/x-npy")
            with lock:
                waits.append(waited)
                statuses.append(status)

    before = _listen_overflows()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    after = _listen_overflows()
    waits.sort()
    return {
        "clients": clients,
        "requests": len(statuses),
        "ok": statuses.count(200),
        "failed": sum(1 for s in statuses if s != 200),
        "connect_p50_ms": round(statistics.median(waits) * 1000, 1),
        "connect_p99_ms": round(waits[int(0.99 * (len(waits) - 1))] * 1000, 1),
        "connect_max_ms": round(waits[-1] * 1000, 1),
        "connects_over_0.9s": sum(1 for w in waits if w > 0.9),
        "listen_overflows": None if before is None or after is None else after - before,
        "wall_s": round(elapsed, 2),
    }


def _memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _json_body(mib: float) -> bytes:
    """``{"inputs": {"x": [[0.0, ...]]}}`` of about ``mib`` MiB: the cheapest bytes per Python float."""
    n = (int(mib * 2**20) - 64) // 5  # under the cap with the braces
    return b'{"inputs": {"x": [[' + b"0.0, " * (n - 1) + b"0.0]]}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64, 150])
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one connection each")
    parser.add_argument("--json-mib", type=float, default=3.9, help="the accepted JSON body to measure")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout the server runs from")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle, public = _bundle(Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(args.code.resolve())}
        command = [sys.executable, "-m", "device_runtime.cli", "serve", "--bundle", str(bundle), "--trust",
                   str(public), "--port", "0", "--threads", "1"]  # fmt: skip
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=tmp)
        try:
            assert server.stdout is not None
            port = int(json.loads(server.stdout.readline())["url"].rsplit(":", 1)[1])
            print(json.dumps({"machine": cpu_line(), "code": str(args.code)}))
            for clients in args.clients:
                print(json.dumps(_burst(port, clients, args.requests)), flush=True)
            rest = _memory_kib(server.pid)
            bodies = {"json_16mib": _json_body(16), f"json_{args.json_mib}mib": _json_body(args.json_mib)}
            for label, body in bodies.items():
                _, status = _post(port, body, "application/json")
                peak = _memory_kib(server.pid)["VmHWM"]
                report = {
                    "body": label,
                    "bytes": len(body),
                    "status": status,
                    "rss_at_rest_mib": round(rest["VmRSS"] / 1024, 1),
                    "peak_rss_mib": round(peak / 1024, 1),
                    "peak_over_rest_mib": round((peak - rest["VmRSS"]) / 1024, 1),
                }
                print(json.dumps(report), flush=True)
        finally:
            server.terminate()
            server.wait(20)


if __name__ == "__main__":
    main()
