"""Helpers for the serving tests: bundles with an input policy, a gated backend, an HTTP client."""

from __future__ import annotations

import http.client
import io
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from runtime_bundles import (
    CREATED,
    GOLDEN_X,
    LINEAR_SPECS,
    MASKED_SPECS,
    Keys,
    linear_onnx,
    linear_reference,
    masked_sum_onnx,
    npy_bytes,
)

from device_runtime.backends import BackendOptions
from device_runtime.backends.onnxruntime import OnnxRuntimeBackend
from device_runtime.model import Model
from sdk.bundle import read_bundle, write_bundle
from sdk.manifest import Manifest, format_time
from sdk.signing import TrustedKeys

__all__ = [
    "GatedBackend",
    "Response",
    "gated_model",
    "linear_reference",
    "masked_reference",
    "npy_body",
    "npz_body",
    "policy_bundle",
    "parse_prometheus",
    "request",
]


def masked_reference(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (np.asarray(ids) * np.asarray(mask)).sum(axis=1).astype(np.float32)


def policy_bundle(
    out: Path, keys: Keys, *, model: str = "linear", input_policy: Mapping[str, Any] | None = None, version: int = 1
) -> Path:
    """A signed bundle of the linear or masked-sum model with the given ``input_policy``."""
    if model == "linear":
        specs, onnx_bytes = LINEAR_SPECS, linear_onnx()
        golden_in = {"x": GOLDEN_X}
        golden_out = {"y": linear_reference(GOLDEN_X)}
    else:
        specs, onnx_bytes = MASKED_SPECS, masked_sum_onnx()
        ids = np.array([[3, 4, 5], [6, 7, 8]], dtype=np.int64)
        mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.int32)
        golden_in = {"input_ids": ids, "attention_mask": mask}
        golden_out = {"total": masked_reference(ids, mask)}
    members: dict[str, bytes] = {"model.onnx": onnx_bytes}
    golden: dict[str, Any] = {"inputs": {}, "outputs": {}, "tolerance": {"atol": 1e-5, "rtol": 1e-4}}
    for side, arrays in (("inputs", golden_in), ("outputs", golden_out)):
        for key, array in arrays.items():
            members[f"golden/{side}/{key}.npy"] = npy_bytes(array)
            golden[side][key] = f"golden/{side}/{key}.npy"
    manifest = Manifest(
        name=model,
        version=version,
        target="onnxruntime",
        precision="fp32",
        model="model.onnx",
        inputs=tuple(specs["inputs"]),
        outputs=tuple(specs["outputs"]),
        created=format_time(CREATED),
        runtime={"package": "onnxruntime", "providers": ["CPUExecutionProvider"]},
        golden=golden,
        input_policy=dict(input_policy or {}),
    )
    write_bundle(out, manifest, members, [keys.private])
    return out


class GatedBackend(OnnxRuntimeBackend):
    """The real ONNX Runtime backend whose runs wait for ``release`` (set by default) and are counted.

    A run takes hold of the session before it waits, as a run inside the runtime would.
    """

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.runs = 0
        self.fail_with: Exception | None = None

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        session = self._session
        self.runs += 1
        self.started.set()
        if not self.release.wait(30):
            raise TimeoutError("gate never released")
        if self.fail_with is not None:
            raise self.fail_with
        values = session.run(self._output_names, feeds)
        return dict(zip(self._output_names, values, strict=True))


def gated_model(bundle: Path, keys: Keys, folder: Path) -> tuple[Model, GatedBackend]:
    """A ``Model`` over ``GatedBackend``, built the way ``load_verified`` builds one."""
    verified = read_bundle(bundle, TrustedKeys.from_files([keys.public]), folder)
    backend = GatedBackend()
    backend.load(verified.path(verified.manifest.model), verified.manifest, BackendOptions())
    return Model(verified, verified.root, backend, None), backend


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Response:
    """One HTTP request to 127.0.0.1:port (on ``conn`` when given, else a fresh connection)."""
    own = conn is None
    connection = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        data = response.read()
        return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        if own:
            connection.close()


def npy_body(array: np.ndarray) -> bytes:
    return npy_bytes(array)


def npz_body(arrays: Mapping[str, np.ndarray], compressed: bool = False) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse_prometheus(text: str) -> dict[str, Any]:
    """Parse (and check) text format 0.0.4: ``{"types": {family: type}, "samples": {(name, labels): value}}``.

    Raises AssertionError on a malformed line, a sample of an undeclared family, or a histogram whose
    buckets are not cumulative or disagree with its ``_count``.
    """
    types: dict[str, str] = {}
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    assert text.endswith("\n"), "the exposition ends with a newline"
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert len(line.split(" ", 3)) == 4, line
            continue
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert family not in types, f"family {family} declared twice"
            types[family] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, f"malformed sample line {line!r}"
        name, _, label_text, value = match.groups()
        labels: list[tuple[str, str]] = []
        if label_text:
            consumed = 0
            for label in _LABEL.finditer(label_text):
                assert label.start() == consumed, f"malformed labels in {line!r}"
                labels.append((label.group(1), label.group(2)))
                consumed = label.end()
            assert consumed == len(label_text), f"malformed labels in {line!r}"
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample {name} has no # TYPE"
        samples[(name, tuple(labels))] = float(value)
    for family, kind in types.items():
        if kind != "histogram":
            continue
        buckets = [(float(dict(k[1])["le"]), v) for k, v in samples.items() if k[0] == f"{family}_bucket"]
        values = [v for _, v in sorted(buckets)]
        assert values == sorted(values), f"{family} buckets are not cumulative"
        assert buckets and max(buckets)[0] == float("inf"), f"{family} has no +Inf bucket"
        assert values[-1] == samples[(f"{family}_count", ())], f"{family}: +Inf bucket != _count"
        assert (f"{family}_sum", ()) in samples
    return {"types": types, "samples": samples}
