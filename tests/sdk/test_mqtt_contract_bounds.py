"""Issue 14: no payload can take a reader down, and nothing taken from a command makes an event unbounded."""

from __future__ import annotations

import json

import pytest

from sdk.mqtt_contract import (
    MAX_COMMAND_ID_CHARS,
    MAX_DEPTH,
    MAX_EVENT_BYTES,
    MAX_MESSAGE_CHARS,
    MAX_URL_CHARS,
    CommandError,
    ContractError,
    clip,
    command_ref,
    decode_payload,
    encode_payload,
    event_payload,
    parse_command,
    parse_config,
    parse_deploy,
    parse_event,
)

SHA = "ab" * 32

# Payloads that once escaped decode_payload with something other than ContractError, or decoded into a
# value nothing downstream can store (infinity, a lone surrogate).
HOSTILE = [
    b'{"id": "x", "type": "ping", "n": 1' + b"0" * 5000 + b"}",  # int over Python's 4300-digit limit
    b'{"id": "x", "type": "ping", "n": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # deep nesting
    b'{"id": "x", "type": "ping", "n": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}",
    b'{"id": "x", "type": "ping", "n": 1e400}',  # infinity
    b'{"id": "x", "type": "ping", "n": -1e400}',
    b'{"id": "x", "type": "ping", "n": NaN}',
    b'{"id": "\\ud800", "type": "ping"}',  # a lone surrogate: no UTF-8 for it
    b'{"id": "x", "type": "ping", "\\udfff": 1}',
]


@pytest.mark.parametrize("data", HOSTILE, ids=range(len(HOSTILE)))
def test_decode_payload_raises_only_contract_error(data: bytes) -> None:
    with pytest.raises(ContractError):
        decode_payload(data)


def test_decode_payload_keeps_what_is_fine() -> None:
    ok = b'{"a": [[{"b": "\\ud83d\\ude00 \\u00e9"}]], "n": 1e300, "s": "[[[[[[[[[[[[[[[[[[[[[[[["}'
    assert decode_payload(ok)["a"][0][0]["b"] == "\U0001f600 \u00e9"
    nested = b'{"a": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    assert decode_payload(nested)


def test_an_invalid_command_id_is_never_echoed() -> None:
    long_id = "x" * 100_000
    with pytest.raises(CommandError) as e:
        parse_command({"id": long_id, "type": "ping"})
    assert len(str(e.value)) < 200
    assert command_ref({"id": long_id}) is None and command_ref({"id": 7}) is None and command_ref([1]) is None
    assert command_ref({"id": "a" * MAX_COMMAND_ID_CHARS}) == "a" * MAX_COMMAND_ID_CHARS
    for bad in ({"id": "c", "type": "t" * 100_000}, {"id": "c", "type": "ping", "schema": "s" * 100_000}):
        with pytest.raises(CommandError) as e:
            parse_command(bad)
        assert len(str(e.value)) < 300
    with pytest.raises(CommandError) as e:
        parse_config({"id": "c", "type": "config", **{f"k{i}" * 50: 1 for i in range(2000)}})
    assert len(str(e.value)) < 400


def test_a_deploy_url_is_bounded() -> None:
    url = "https://fleet/" + "a" * (MAX_URL_CHARS - len("https://fleet/"))
    assert parse_deploy({"id": "d", "type": "deploy", "url": url, "sha256": SHA}, max_bundle_bytes=10).url == url
    with pytest.raises(CommandError, match=f"at most {MAX_URL_CHARS}"):
        parse_deploy({"id": "d", "type": "deploy", "url": url + "a", "sha256": SHA}, max_bundle_bytes=10)


@pytest.mark.parametrize("char", ["a", "\u00e9", "\U0001f600", '"', "\x00"])
def test_no_event_exceeds_max_event_bytes(char: str) -> None:
    huge = char * 300_000
    cases = [
        event_payload("c", "failed", huge, 1.0, error="CommandError"),
        event_payload("c", "downloading", "downloading", 1.0, url=huge, size=1),
        event_payload("c", "failed", "m", 1.0, error=huge, nested={"k": [huge, {huge: huge}]}),
        event_payload("c", "failed", huge, 1.0, **{f"k{i}": huge[:1000] for i in range(500)}),
        event_payload(huge, "failed", huge, 1.0, error="E", not_json=object()),
        event_payload("c", "failed", "m", 1.0, inf=float("inf")),
    ]
    for event in cases:
        data = encode_payload(event)
        assert len(data) <= MAX_EVENT_BYTES, len(data)
        parse_event(json.loads(data) | {"ts": 1.0})
    assert cases[0]["detail"]["message"].endswith(f"...[cut: {len(huge)} chars]")
    assert len(cases[0]["detail"]["message"]) <= MAX_MESSAGE_CHARS
    assert cases[4]["cmd_id"] is None and cases[4]["detail"]["error"] == "E" and cases[4]["detail"]["truncated"]


def test_a_small_event_is_unchanged() -> None:
    event = event_payload("c", "active", "ok", 1.0, model=None, health={"latency_ms": 1.5})
    assert event["detail"] == {"message": "ok", "model": None, "health": {"latency_ms": 1.5}}


def test_clip() -> None:
    assert clip("abc", 40) == "abc"
    cut = clip("x" * 1000, 100)
    assert len(cut) == 100 and cut.endswith("...[cut: 1000 chars]")
