"""``classify``: the checks every message passes before the database (pure: bytes in, verdict out)."""

from __future__ import annotations

import json

import pytest
from fleet_parts import FLEET, event, status, telemetry

from fleet.devices import Incoming
from fleet.ingest import MAX_DEPTH, IngestSettings, classify
from sdk.errors import InputError
from sdk.mqtt_contract import encode_payload

NUL_MODEL = {"name": "a\u0000b", "version": 1, "target": "t", "sha256": "ab" * 32}  # PostgreSQL refuses NUL


def _topic(device: str, leaf: str, fleet: str = FLEET) -> str:
    return f"edgeship/v1/{fleet}/{device}/{leaf}"


@pytest.mark.parametrize(
    "topic",
    [
        _topic("d", "telemetry", fleet="another"),  # another fleet's device
        _topic("d", "cmd"),  # what the fleet sends, not what it reads
        "edgeship/v2/testfleet/d/telemetry",
        "edgeship/v1/testfleet/d/telemetry/extra",
        "",
        _topic("x" * 129, "telemetry"),
    ],
)
def test_foreign_topics_are_dropped(topic: str) -> None:
    assert classify(topic, encode_payload(telemetry(1)), FLEET, 1.0) == "foreign_topic"


def test_the_topic_is_the_identity_and_events_get_a_digest() -> None:
    checked = classify(_topic("cam-1", "telemetry"), encode_payload({**telemetry(3), "device_id": "x"}), FLEET, 5.0)
    assert isinstance(checked, Incoming) and (checked.device_id, checked.received_at) == ("cam-1", 5.0)
    one = classify(_topic("cam-1", "events"), encode_payload(event("c", "received")), FLEET, 1.0)
    again = classify(_topic("cam-1", "events"), encode_payload(event("c", "received")), FLEET, 2.0)
    assert isinstance(one, Incoming) and isinstance(again, Incoming) and one.digest == again.digest != ""
    assert isinstance(classify(_topic("cam-1", "status"), encode_payload(status()), FLEET, 1.0), Incoming)


def test_depth_counts_brackets_outside_strings_only() -> None:
    brackets_in_text = event("c", "received", note="[[[[{{{{" * 20)
    assert isinstance(classify(_topic("d", "events"), encode_payload(brackets_in_text), FLEET, 1.0), Incoming)
    nested: object = {"message": "x"}
    for _ in range(MAX_DEPTH):
        nested = {"message": "x", "n": nested}
    assert classify(_topic("d", "events"), json.dumps(event("c", "received", n=nested)).encode(), FLEET, 1.0) == (
        "too_deep"
    )


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe", "malformed"),
        (b"null", "malformed"),
        (b'{"schema": true}', "unknown_schema"),
        (b'{"schema": "1"}', "unknown_schema"),
        (json.dumps({**telemetry(1), "count": -1}).encode(), "invalid"),
        (json.dumps({**telemetry(1), "model": {**NUL_MODEL}}).encode(), "invalid"),
    ],
)  # fmt: skip
def test_bad_payloads(payload: bytes, reason: str) -> None:
    assert classify(_topic("d", "telemetry"), payload, FLEET, 1.0) == reason


@pytest.mark.parametrize(
    "bad",
    [{"fleet": "a/b"}, {"share_group": "g+"}, {"protocol": "4"}, {"client_id": ""}, {"receive_maximum": 0},
     {"batch_max": 0}],
)  # fmt: skip
def test_settings_refuse_what_cannot_work(bad: dict[str, object]) -> None:
    with pytest.raises(InputError):
        IngestSettings(**bad)  # type: ignore[arg-type]
