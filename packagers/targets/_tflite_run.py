"""Running a built .tflite on the host, as the device feeds it (tensor map, int8 I/O scales, fixed batch)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from packagers.registry import Runner
from sdk.errors import PackagingError

__all__ = ["INT_RANGES", "interpreter", "run_rows", "signature_runner"]

INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}


def interpreter(model: Path | bytes) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(model, Path):
        return Interpreter(model_path=str(model))
    return Interpreter(model_content=model)


def _quantize(arr: np.ndarray, q: Mapping[str, Any]) -> np.ndarray:
    low, high = INT_RANGES[q["dtype"]]
    scaled = np.round(arr.astype(np.float32) / np.float32(q["scale"])) + q["zero_point"]
    return np.clip(scaled, low, high).astype(q["dtype"])


def signature_runner(path: Path, runtime: Mapping[str, Any], signature: str) -> Runner:
    """Run one signature of a .tflite; rows beyond its fixed batch run in chunks (the last one padded).

    Raises:
        PackagingError: the interpreter cannot load the model.
    """
    try:
        loaded = interpreter(path)
        runner = loaded.get_signature_runner(signature)
    except Exception as e:  # a broken flatbuffer
        raise PackagingError(f"ai-edge-litert cannot load {path.name}: {str(e)[:300]}") from e
    tmap = runtime["tensor_map"]
    quant = runtime.get("quantization", {})
    details = {**runner.get_input_details()}
    first = next(iter(details.values()))
    fixed = int(first["shape_signature"][0]) if int(first["shape_signature"][0]) > 0 else None

    def run_once(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {}
        for user, conv in tmap["inputs"].items():
            arr = np.asarray(inputs[user])
            q = quant.get("inputs", {}).get(user)
            feeds[conv] = _quantize(arr, q) if q else arr.astype(np.dtype(details[conv]["dtype"]))
        raw = runner(**feeds)
        result = {}
        for user, conv in tmap["outputs"].items():
            q = quant.get("outputs", {}).get(user)
            value = np.asarray(raw[conv])
            result[user] = (value.astype(np.float32) - q["zero_point"]) * np.float32(q["scale"]) if q else value
        return result

    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(inputs.values())))
        if fixed is None or n == fixed:
            return run_once(inputs)
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, n, fixed):
            chunk = {k: np.asarray(v)[start : start + fixed] for k, v in inputs.items()}
            rows = len(next(iter(chunk.values())))
            if rows < fixed:  # pad with the last row, drop its outputs
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], fixed - rows, axis=0)]) for k, v in chunk.items()}
            for k, v in run_once(chunk).items():
                parts.setdefault(k, []).append(v[:rows])
        return {k: np.concatenate(v) for k, v in parts.items()}

    return run


def run_rows(run: Runner, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``run`` on each row (a bucketed model takes one sequence at a time), outputs stacked."""
    n = len(next(iter(inputs.values())))
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(n):
        for k, v in run({name: np.asarray(value)[i : i + 1] for name, value in inputs.items()}).items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}
