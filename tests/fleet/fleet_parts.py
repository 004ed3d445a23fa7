"""Payloads a device sends, built with the MQTT contract's own helpers, for the registry and ingest tests."""

from __future__ import annotations

import hashlib
from typing import Any

from fleet.devices import Incoming
from sdk.mqtt_contract import SCHEMA, encode_payload, event_payload, offline_status

FLEET = "testfleet"
SHA = "ab" * 32


def model(name: str = "digits", version: int = 5) -> dict[str, Any]:
    return {"name": name, "version": version, "target": "onnxruntime", "sha256": SHA}


def status(ts: float = 1000.0, *, name: str = "digits", version: int | None = 5, **extra: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "schema": SCHEMA, "state": "online", "ts": ts, "model": model(name, version) if version is not None else None,
        "slot": "A", "runtime": {"agent": "0.1.0", "backend": "onnxruntime"},
        "capabilities": {"arch": "x86_64", "runtimes": {"onnxruntime": "1.20.1"}, "accelerators": []},
        "uptime_s": 1.0, "deployment": None,
    }  # fmt: skip
    payload.update(extra)
    return payload


def offline(ts: float = 1000.0) -> dict[str, Any]:
    return offline_status(ts)


def telemetry(
    seq: int, *, ts: float = 1000.0, count: int = 100, errors: int = 0, p: tuple[float | None, ...] = (1.0, 2.0, 3.0),
    name: str = "digits", version: int = 5, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    payload: dict[str, Any] = {
        "schema": SCHEMA, "seq": seq, "ts": ts, "window_s": 10.0, "count": count, "errors": errors,
        "latency_ms": {"p50": p[0], "p95": p[1], "p99": p[2]}, "rss_mb": 100.0, "cpu_pct": 5.0,
        "temperature_c": None, "model": model(name, version), "dropped": 0,
    }  # fmt: skip
    payload.update(extra)
    return payload


def event(cmd_id: str | None, phase: str, ts: float = 1000.0, **detail: Any) -> dict[str, Any]:
    return event_payload(cmd_id, phase, f"{phase} step", ts, **detail)


def digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(encode_payload(payload)).hexdigest()[:32]


def incoming(device_id: str, leaf: str, payload: dict[str, Any], at: float) -> Incoming:
    """What the ingest hands the registry for one message (the payload as the contract's parser returns it)."""
    return Incoming(device_id, leaf, payload, at, digest(payload))
