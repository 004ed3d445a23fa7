"""MQTT payloads, both directions: decode_payload and parse_* raise only ``ContractError``; the fleet's
classify never raises (a payload it cannot store is a drop reason)."""

from __future__ import annotations

import json

from conftest import bound, budget
from hypothesis import given
from hypothesis import strategies as st

from fleet.ingest.classify import Incoming, classify
from sdk.mqtt_contract import (
    ContractError,
    decode_payload,
    parse_command,
    parse_command_times,
    parse_config,
    parse_deploy,
    parse_event,
    parse_status,
    parse_telemetry,
)

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=25,
)  # fmt: skip
KEYS = ["schema", "id", "type", "ts", "issued_at", "expires_at", "url", "sha256", "size", "version", "device_id",
        "state", "model", "phase", "cmd_id", "detail", "seq", "count", "errors", "latency_ms", "window_s",
        "telemetry_interval_s", "log_level", "allow_downgrade", "retry_bad", "target", "dropped", "rss_mb"]  # fmt: skip
documents = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=10)
PARSERS = [
    parse_status, parse_telemetry, parse_event, parse_command, parse_command_times, parse_config,
    lambda d: parse_deploy(d, max_bundle_bytes=2**30),
]  # fmt: skip


@budget(400)
@given(st.binary(max_size=3000))
def test_decode_payload_random_bytes(data: bytes) -> None:
    with bound():
        try:
            decode_payload(data)
        except ContractError:
            pass


@budget(500)
@given(documents, st.sampled_from(range(len(PARSERS))))
def test_parsers_any_document(doc: dict[str, object], which: int) -> None:
    with bound():
        try:
            PARSERS[which](doc)
        except ContractError:
            pass


@budget(400)
@given(st.sampled_from(["status", "telemetry", "events", "cmd", "x"]), documents | st.binary(max_size=500))
def test_classify_never_raises(leaf: str, doc: object) -> None:
    payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with bound():
        got = classify(f"edgeship/v1/f1/dev-1/{leaf}", payload, "f1", 1.0e9)
    assert isinstance(got, (Incoming, str))
