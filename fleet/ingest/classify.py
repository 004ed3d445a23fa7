"""What the ingest does to one message before the database: pure, no I/O, testable with bytes alone.

``classify(topic, payload, fleet, received_at)`` returns the checked ``Incoming`` or the reason it is
dropped. The topic is the identity: the device id comes from the topic, never from the payload, and a
topic outside ``edgeship/v1/<fleet>/<device_id>/{status,telemetry,events}`` is dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

from fleet.devices import Incoming
from fleet.devices.tables import MAX_DEVICE_ID_CHARS, MAX_NAME_CHARS
from sdk.mqtt_contract import (
    MAX_DEPTH,
    MAX_PAYLOAD_BYTES,
    SCHEMA,
    ContractError,
    decode_payload,
    parse_event,
    parse_status,
    parse_telemetry,
    parse_topic,
    payload_depth,
)

__all__ = ["DROP_REASONS", "MAX_DEPTH", "classify"]  # MAX_DEPTH: the contract's, named here too

_MAX_INT = 2**63 - 1  # the database's BIGINT
# Why a message is dropped (each is a counter ``dropped_<reason>``):
DROP_REASONS = (
    "foreign_topic",  # not edgeship/v1/<our fleet>/<device>/{status,telemetry,events}, or an overlong device id
    "oversized",  # over the contract's MAX_PAYLOAD_BYTES
    "too_deep",  # nested deeper than MAX_DEPTH
    "malformed",  # not a strict UTF-8 JSON object
    "unknown_schema",  # a "schema" this server does not know
    "invalid",  # a key missing, ill-typed or out of the contract's (or the database's) bounds
)
_PARSERS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "status": parse_status,
    "telemetry": parse_telemetry,
    "events": parse_event,
}


def _fits_database(leaf: str, payload: Mapping[str, Any]) -> bool:
    """The contract bounds types; the database bounds sizes: a 64-bit integer, 200-character names, no NUL
    in a text column (PostgreSQL refuses it). Anything else would fail the whole batch's commit."""
    if leaf == "telemetry":  # the common case, checked without building lists
        if max(payload["seq"], payload["count"], payload["errors"], payload["dropped"]) > _MAX_INT:
            return False
        models: list[Any] = [payload.get("model")]
        texts: list[Any] = []
    else:
        ints = [payload.get(k) for k in ("seq", "count", "errors", "dropped")]
        if any(isinstance(i, int) and i > _MAX_INT for i in ints):
            return False
        models = [payload.get("model"), (payload.get("detail") or {}).get("model") if leaf == "events" else None]
        texts = [payload.get("cmd_id")]
    for model in models:
        if isinstance(model, dict):
            version = model.get("version")
            if isinstance(version, int) and version > _MAX_INT:
                return False
            texts += [model.get("name"), model.get("target")]
    return not any(isinstance(t, str) and (len(t) > MAX_NAME_CHARS or "\x00" in t) for t in texts)


_TOPIC_CACHE_SIZE = 65536  # topics remembered (a fleet's devices x 3 leaves); the cache starts over when full
_topics: dict[tuple[str, str], tuple[str, str] | None] = {}


def _device_and_leaf(topic: str, fleet: str) -> tuple[str, str] | None:
    """``(device_id, leaf)`` of a topic of ``fleet``'s devices, or None; remembered, since every device sends
    on the same three topics all its life."""
    key = (topic, fleet)
    try:
        return _topics[key]
    except KeyError:
        pass
    try:
        topics, leaf = parse_topic(topic)
    except ContractError:
        found = None
    else:
        ok = topics.fleet == fleet and leaf in _PARSERS and len(topics.device_id) <= MAX_DEVICE_ID_CHARS
        found = (topics.device_id, leaf) if ok else None
    if len(_topics) >= _TOPIC_CACHE_SIZE:
        _topics.clear()
    _topics[key] = found
    return found


def classify(topic: str, payload: bytes, fleet: str, received_at: float) -> Incoming | str:
    """Check one message; return what to store, or the reason (one of ``DROP_REASONS``) to drop it."""
    found = _device_and_leaf(topic, fleet)
    if found is None:
        return "foreign_topic"
    device_id, leaf = found
    if len(payload) > MAX_PAYLOAD_BYTES:
        return "oversized"
    if payload.count(b"[") + payload.count(b"{") > MAX_DEPTH and payload_depth(payload) > MAX_DEPTH:
        return "too_deep"
    try:
        document = decode_payload(payload)
    except ContractError:
        return "malformed"
    schema = document.get("schema")
    if not (isinstance(schema, int) and not isinstance(schema, bool) and schema == SCHEMA):
        return "unknown_schema"
    try:
        checked = _PARSERS[leaf](document)
    except ContractError:
        return "invalid"
    if not _fits_database(leaf, checked):
        return "invalid"
    digest = hashlib.sha256(payload).hexdigest()[:32] if leaf == "events" else ""
    return Incoming(device_id, leaf, checked, received_at, digest)
