"""The MQTT contract: topics, payload bounds, and validators that accept good payloads and name what is wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from sdk.mqtt_contract import (
    EVENT_PHASES,
    MAX_COMMAND_ID_CHARS,
    MAX_PAYLOAD_BYTES,
    SCHEMA,
    CommandError,
    ContractError,
    DeployCommand,
    Topics,
    client_id,
    decode_payload,
    encode_payload,
    event_payload,
    offline_status,
    parse_command,
    parse_config,
    parse_deploy,
    parse_event,
    parse_status,
    parse_telemetry,
    parse_topic,
)

SHA = "ab" * 32
MODEL = {"name": "digits", "version": 5, "target": "onnxruntime", "sha256": SHA}


def test_the_contract_is_pure_kernel_code() -> None:
    script = "import sys, sdk.mqtt_contract\nprint(sorted(m for m in sys.modules if m.split('.')[0] in "
    script += "('paho', 'device_runtime', 'packagers', 'fleet', 'numpy')))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_topics_and_their_parsing() -> None:
    topics = Topics("plant-7", "pi-01")
    assert topics.status == "edgeship/v1/plant-7/pi-01/status"
    assert (topics.telemetry, topics.events, topics.cmd) == tuple(
        f"edgeship/v1/plant-7/pi-01/{leaf}" for leaf in ("telemetry", "events", "cmd")
    )
    assert parse_topic(topics.events) == (topics, "events")
    assert Topics.fleet_filter("plant-7") == "edgeship/v1/plant-7/+/+"
    assert client_id("pi-01") == "edgeship-pi-01"
    for bad in ("edgeship/v1/plant-7/pi-01/other", "edgeship/v2/f/d/status", "edgeship/v1/f/status"):
        with pytest.raises(ContractError, match="is not edgeship/v1"):
            parse_topic(bad)
    for segment in ("", "a/b", "a+", "#", "a\x00"):
        with pytest.raises(ValueError, match="topic segment"):
            Topics("default", segment)


def test_payloads_are_bounded_strict_json_objects() -> None:
    data = encode_payload({"b": 1, "a": "é"})
    assert data == b'{"a":"\\u00e9","b":1}'  # sorted, compact, ASCII
    assert decode_payload(data) == {"a": "é", "b": 1}
    with pytest.raises(ValueError, match="JSON compliant"):
        encode_payload({"x": float("nan")})
    with pytest.raises(ValueError, match="byte bound"):
        encode_payload({"x": "a" * MAX_PAYLOAD_BYTES})
    for bad, why in (
        (b'{"id": "a", "id": "b"}', "duplicate"),
        (b'{"x": NaN}', "NaN"),
        (b"[1, 2]", "JSON object"),
        (b"\xff{}", "UTF-8"),
        (b"{" + b" " * MAX_PAYLOAD_BYTES + b"}", "byte bound"),
    ):
        with pytest.raises(ContractError, match=why):
            decode_payload(bad)


def test_command_envelope() -> None:
    assert parse_command({"schema": 1, "id": "c-1", "type": "ping"}) == ("c-1", "ping")
    assert parse_command({"id": "c-1", "type": "rollback"}) == ("c-1", "rollback")  # schema may be left out
    for bad, why in (
        ({"type": "ping"}, "command id"),
        ({"id": "x" * (MAX_COMMAND_ID_CHARS + 1), "type": "ping"}, "command id"),
        ({"id": 7, "type": "ping"}, "command id"),
        ({"id": "c", "type": "reboot"}, "command type must be one of"),
        ({"id": "c", "type": "ping", "schema": 2}, "schema 2"),
        ({"id": "c", "type": "ping", "schema": True}, "schema True"),
    ):
        with pytest.raises(CommandError, match=why):
            parse_command(bad)
    assert issubclass(CommandError, ContractError)


def test_deploy_command() -> None:
    raw = {"id": "d", "type": "deploy", "url": "https://h/b", "sha256": SHA.upper(), "size": 10, "version": 2}
    deploy = parse_deploy(raw, max_bundle_bytes=100)
    assert deploy == DeployCommand("d", "https://h/b", SHA, size=10, version=2)
    assert parse_deploy(decode_payload(encode_payload(deploy.to_payload())), max_bundle_bytes=100) == deploy
    assert parse_deploy({**raw, "size": None, "version": None}, max_bundle_bytes=100).size is None
    for bad, why in (
        ({"url": "file:///etc/passwd"}, "deploy.url"),
        ({"sha256": "xyz"}, "deploy.sha256"),
        ({"size": 101}, "deploy.size must be an integer from 1 to 100"),
        ({"size": 0}, "deploy.size"),
        ({"size": True}, "deploy.size"),
        ({"version": -1}, "deploy.version"),
        ({"allow_downgrade": "yes"}, "deploy.allow_downgrade"),
        ({"retry_bad": 1}, "deploy.retry_bad"),
        ({"type": "rollback"}, "not a deploy"),
    ):
        with pytest.raises(CommandError, match=why):
            parse_deploy({**raw, **bad}, max_bundle_bytes=100)


def test_config_command() -> None:
    cmd = {"schema": 1, "id": "c", "type": "config", "ts": 1.0, "telemetry_interval_s": 5, "log_level": "debug"}
    assert parse_config(cmd) == {"telemetry_interval_s": 5.0, "log_level": "DEBUG"}
    for bad, why in (
        ({"telemetry_interval_s": 0}, "from 0.1 to 86400"),
        ({"telemetry_interval_s": 86401}, "from 0.1 to 86400"),
        ({"telemetry_interval_s": True}, "telemetry_interval_s"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"colour": "red"}, "unknown settings"),
        ({}, "nothing to change"),
    ):
        with pytest.raises(CommandError, match=why):
            parse_config({"id": "c", "type": "config", **bad})


def _online(**changes: Any) -> dict[str, Any]:
    status = {
        "schema": SCHEMA,
        "state": "online",
        "ts": 1767225600.1,
        "model": MODEL,
        "slot": "B",
        "runtime": {"agent": "0.1.0", "backend": "onnxruntime", "version": "1.20.1"},
        "capabilities": {"arch": "aarch64", "runtimes": {}, "accelerators": []},
        "uptime_s": 812.4,
        "system_uptime_s": None,
        "deployment": {"cmd_id": "rollout-7", "phase": "switching"},
        "future_key": "ignored",
    }
    return {**status, **changes}


def test_status() -> None:
    assert parse_status(_online()) == _online()
    assert parse_status(_online(model=None, slot=None, deployment=None))["model"] is None
    assert parse_status(offline_status(5.0)) == {"schema": 1, "state": "offline", "ts": 5.0}
    assert parse_status({"schema": 1, "state": "online", "ts": 1.0})  # the minimal status of a failed builder
    for bad, why in (
        ({"state": "asleep"}, "status.state"),
        ({"schema": 2}, "status.schema must be 1"),
        ({"ts": "now"}, "status.ts"),
        ({"model": {**MODEL, "sha256": "short"}}, "status.model.sha256"),
        ({"model": {**MODEL, "version": "5"}}, "status.model.version"),
        ({"slot": "C"}, "status.slot"),
        ({"uptime_s": float("inf")}, "status.uptime_s"),
        ({"deployment": {"cmd_id": "x", "phase": "dancing"}}, "status.deployment.phase"),
    ):
        with pytest.raises(ContractError, match=why):
            parse_status(_online(**bad))


def test_telemetry() -> None:
    good = {
        "schema": 1,
        "seq": 4812,
        "ts": 1767225610.0,
        "window_s": 10.0,
        "count": 5210,
        "errors": 0,
        "error_kinds": {},
        "latency_ms": {"p50": 1.9, "p95": 3.1, "p99": None},
        "rss_mb": 182.5,
        "cpu_pct": 37.0,
        "temperature_c": None,
        "model": MODEL,
        "dropped": 0,
    }
    assert parse_telemetry(good) == good
    for bad, why in (
        ({"seq": -1}, "telemetry.seq"),
        ({"seq": None}, "telemetry.seq"),
        ({"dropped": 1.5}, "telemetry.dropped"),
        ({"count": True}, "telemetry.count"),
        ({"rss_mb": "big"}, "telemetry.rss_mb"),
        ({"latency_ms": {"p50": 1.0}}, "telemetry.latency_ms"),
        ({"model": {"name": "digits"}}, "telemetry.model"),
        ({"error_kinds": []}, "telemetry.error_kinds"),
    ):
        with pytest.raises(ContractError, match=why):
            parse_telemetry({**good, **bad})


def test_events() -> None:
    event = event_payload("rollout-7", "failed", "verification failed", 2.0, error="SignatureError", model=MODEL)
    assert event == {
        "schema": 1,
        "cmd_id": "rollout-7",
        "phase": "failed",
        "ts": 2.0,
        "detail": {"message": "verification failed", "error": "SignatureError", "model": MODEL},
    }
    assert parse_event(json.loads(encode_payload(event))) == event
    assert parse_event(event_payload(None, "active", "initial bundle", 1.0))["cmd_id"] is None
    assert "switching" not in EVENT_PHASES and {"pong", "applied"} <= set(EVENT_PHASES)
    with pytest.raises(ValueError, match="event phase 'switching'"):
        event_payload("c", "switching", "internal", 1.0)
    for bad, why in (
        ({"phase": "switching"}, "event.phase"),
        ({"cmd_id": 3}, "event.cmd_id"),
        ({"detail": {"error": "X"}}, "event.detail"),
        ({"detail": "oops"}, "event.detail"),
        ({"detail": {"message": "m", "model": {"name": 1}}}, "event.detail.model"),
    ):
        with pytest.raises(ContractError, match=why):
            parse_event({**event, **bad})
