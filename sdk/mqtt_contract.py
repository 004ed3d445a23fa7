"""The MQTT contract between a device and the fleet: topics, payload schemas, bounds and validators.

One module that both ends import (the device agent now, the fleet server next), so that a topic name, a
payload key or a bound is written down once. Pure: no I/O, no paho, stdlib and the kernel only. docs/mqtt.md
explains the session (QoS, retain, Last Will, de-duplication) and points here for the exact shapes.

Rules every payload follows:

- a UTF-8 JSON object of at most ``MAX_PAYLOAD_BYTES``, with an integer ``schema`` (``SCHEMA`` today; it
  grows only on a breaking change, so a reader refuses a schema it does not know) and, from the device,
  ``ts`` (Unix seconds, float, on the device's clock);
- readers ignore keys they do not know, and a key this module lists is refused when it has the wrong type
  or is out of its bounds.

The device decodes commands with ``decode_payload`` and ``parse_command`` / ``parse_deploy`` /
``parse_config``; the fleet checks what devices send with ``parse_status``, ``parse_telemetry`` and
``parse_event`` (each returns the payload as a new dict, or raises ``ContractError`` naming the key).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sdk.errors import InputError
from sdk.manifest import ManifestError, strict_json_loads

__all__ = [
    "COMMAND_TYPES",
    "DEPLOYMENT_PHASES",
    "EVENT_PHASES",
    "FRESHNESS_LEAF",
    "LEAVES",
    "LOG_LEVELS",
    "MAX_COMMAND_ID_CHARS",
    "MAX_DEPTH",
    "MAX_EVENT_BYTES",
    "MAX_MESSAGE_CHARS",
    "MAX_PAYLOAD_BYTES",
    "MAX_TEXT_CHARS",
    "MAX_URL_CHARS",
    "QOS",
    "SCHEMA",
    "SLOTS",
    "STATUS_STATES",
    "TELEMETRY_INTERVAL_S",
    "TOPIC_PREFIX",
    "CommandError",
    "CommandTimes",
    "ContractError",
    "DeployCommand",
    "Topics",
    "check_segment",
    "clip",
    "client_id",
    "command_ref",
    "decode_payload",
    "encode_payload",
    "event_payload",
    "freshness_payload",
    "offline_status",
    "parse_cancel",
    "parse_command",
    "parse_command_times",
    "parse_config",
    "parse_trust",
    "parse_deploy",
    "parse_event",
    "parse_freshness",
    "parse_status",
    "parse_telemetry",
    "parse_topic",
    "payload_depth",
]

SCHEMA = 1  # the "schema" integer of every payload
TOPIC_PREFIX = "edgeship/v1"  # topics are TOPIC_PREFIX/<fleet>/<device_id>/<leaf>
LEAVES = ("status", "telemetry", "events", "cmd")  # the four topics of a device
FRESHNESS_LEAF = "timestamp"  # the fleet's signed freshness: TOPIC_PREFIX/<fleet>/timestamp, retained
QOS = 1  # every publish and the cmd subscription; status is also retained
MAX_PAYLOAD_BYTES = 256 * 1024  # bytes of one payload, any topic (real ones are under 4 KiB)
MAX_COMMAND_ID_CHARS = 128  # characters in a command id
MAX_URL_CHARS = 2048  # characters in a deploy URL
MAX_DEPTH = 16  # nesting of objects and arrays in a payload (real ones have 4)
MAX_MESSAGE_CHARS = 1024  # characters of an event's detail.message
MAX_TEXT_CHARS = 256  # characters of any other string in an event's detail (longer ones are clipped)
MAX_EVENT_BYTES = 8 * 1024  # bytes of an encoded event, whatever its detail (see event_payload)
TELEMETRY_INTERVAL_S = (0.1, 86400.0)  # seconds, the range a config command may set
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
COMMAND_TYPES = ("deploy", "rollback", "config", "ping", "cancel", "trust")
STATUS_STATES = ("online", "offline")
SLOTS = ("A", "B")
# Phases of the OTA operation in progress, as the status's ``deployment.phase`` shows them. ``switching``
# is internal (the health check passed, the pointer is being written) and never sent as an event.
DEPLOYMENT_PHASES = (
    "received",
    "downloading",
    "verifying",
    "staged",
    "health_check",
    "switching",
    "active",
    "failed",
    "rolled_back",
)
# The ``phase`` of an event: the deployment's phases a fleet sees, and the answers to ping and config.
EVENT_PHASES = (*(p for p in DEPLOYMENT_PHASES if p != "switching"), "pong", "applied")

_FORBIDDEN_IN_SEGMENT = frozenset("/+#\x00")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONFIG_KEYS = ("telemetry_interval_s", "log_level")
_ENVELOPE_KEYS = ("schema", "id", "type", "ts", "issued_at", "expires_at")


class ContractError(InputError):
    """A message that does not follow the MQTT contract: not a bounded UTF-8 JSON object, a schema this
    reader does not know, or a key missing, ill-typed or out of its bounds."""


class CommandError(ContractError):
    """A command that cannot be carried out as given (missing or ill-typed keys)."""


# ---- topics ------------------------------------------------------------------------------------


def check_segment(name: str, value: str) -> None:
    """Refuse a fleet or device id that is not one MQTT topic segment.

    Raises:
        ValueError: empty, or holding ``/``, ``+``, ``#`` or NUL.
    """
    if not isinstance(value, str) or not value or _FORBIDDEN_IN_SEGMENT & set(value):
        raise ValueError(f"{name} must be a non-empty MQTT topic segment without '/', '+', '#' or NUL: {value!r}")


def client_id(device_id: str) -> str:
    """The device's MQTT client id; stable, since the broker keys the persistent session by it."""
    return f"edgeship-{device_id}"


@dataclass(frozen=True)
class Topics:
    """The four topics of one device: ``edgeship/v1/<fleet>/<device_id>/{status,telemetry,events,cmd}``."""

    fleet: str
    device_id: str

    def __post_init__(self) -> None:
        check_segment("fleet", self.fleet)
        check_segment("device_id", self.device_id)

    @property
    def root(self) -> str:
        return f"{TOPIC_PREFIX}/{self.fleet}/{self.device_id}"

    @property
    def status(self) -> str:
        return f"{self.root}/status"

    @property
    def telemetry(self) -> str:
        return f"{self.root}/telemetry"

    @property
    def cmd(self) -> str:
        return f"{self.root}/cmd"

    @property
    def events(self) -> str:
        return f"{self.root}/events"

    @property
    def freshness(self) -> str:
        """The fleet-wide retained topic of signed freshness (``sdk.freshness``): one level above the
        devices' topics, so ``fleet_filter`` does not match it."""
        return f"{TOPIC_PREFIX}/{self.fleet}/{FRESHNESS_LEAF}"

    @staticmethod
    def fleet_filter(fleet: str) -> str:
        """The subscription a fleet server uses for everything its devices send (and their ``cmd``)."""
        check_segment("fleet", fleet)
        return f"{TOPIC_PREFIX}/{fleet}/+/+"


def parse_topic(topic: str) -> tuple[Topics, str]:
    """Split a topic of the contract into the device's ``Topics`` and its leaf (``"status"``, ...).

    Raises:
        ContractError: not ``edgeship/v1/<fleet>/<device_id>/<leaf>`` with a known leaf.
    """
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_PREFIX or parts[4] not in LEAVES:
        raise ContractError(f"topic {topic!r} is not {TOPIC_PREFIX}/<fleet>/<device_id>/<{'|'.join(LEAVES)}>")
    try:
        return Topics(parts[2], parts[3]), parts[4]
    except ValueError as e:
        raise ContractError(f"topic {topic!r}: {e}") from e


# ---- payload encoding --------------------------------------------------------------------------


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """The bytes of a payload: JSON with sorted keys and no spaces, ASCII (escapes), no NaN or infinity.

    Raises:
        ValueError: not JSON-serialisable (``TypeError`` too), or over ``MAX_PAYLOAD_BYTES``.
    """
    data = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {len(data)} bytes is over the contract's {MAX_PAYLOAD_BYTES}-byte bound")
    return data


def payload_depth(data: bytes | bytearray) -> int:
    """The deepest nesting of ``[``/``{`` outside JSON strings (0 for a scalar)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def decode_payload(data: bytes | bytearray) -> dict[str, Any]:
    """A received payload as a dict: bounded (``MAX_PAYLOAD_BYTES``, ``MAX_DEPTH``), strict UTF-8 JSON (no
    duplicate keys, no NaN or out-of-range number, no lone surrogate), an object.

    The ``schema`` is checked by the parser of each kind (``parse_command`` answers a command of an
    unknown schema with a ``failed`` event instead of dropping it).

    Raises:
        ContractError: any of these fails; nothing else, whatever the bytes.
    """
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ContractError(f"payload of {len(data)} bytes is over the contract's {MAX_PAYLOAD_BYTES}-byte bound")
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and payload_depth(data) > MAX_DEPTH:  # count: cheap
        raise ContractError(f"payload is nested deeper than the contract's {MAX_DEPTH} levels")
    try:
        payload = strict_json_loads(bytes(data), "payload")
        if _SURROGATE_ESCAPE.search(data):  # "\ud800" parses to a string that UTF-8 cannot encode
            json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except ManifestError as e:
        raise ContractError(str(e)) from e
    except Exception as e:  # a reader must never be taken down by a payload (UnicodeEncodeError, MemoryError)
        raise ContractError(f"payload cannot be decoded: {type(e).__name__}") from e
    if not isinstance(payload, dict):
        raise ContractError(f"a payload is a JSON object, got {type(payload).__name__}")
    return payload


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters (``limit`` >= 40), ending in a marker when cut."""
    if len(text) <= limit:
        return text
    marker = f"...[cut: {len(text)} chars]"
    return text[: max(0, limit - len(marker))] + marker


# ---- field checks (shared by the validators) ------------------------------------------------------


def _require(cond: bool, message: str, error: type[ContractError] = ContractError) -> None:
    if not cond:
        raise error(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and _SHA256_RE.fullmatch(value) is not None


def _check_model(value: Any, where: str) -> None:
    """The ``model`` object: ``{"name", "version", "target", "sha256"}`` of the archive, or null."""
    if value is None:
        return
    # Checked first and described only on failure: this runs for every telemetry message a fleet ingests.
    if not isinstance(value, dict):
        raise ContractError(f"{where} must be an object or null")
    name: Any = value.get("name")
    version: Any = value.get("version")
    if not (isinstance(name, str) and name):
        raise ContractError(f"{where}.name must be a non-empty string")
    if not (_is_int(version) and version >= 0):
        raise ContractError(f"{where}.version must be an integer >= 0")
    if not isinstance(value.get("target"), str):
        raise ContractError(f"{where}.target must be a string")
    if not _is_sha256(value.get("sha256")):
        raise ContractError(f"{where}.sha256 must be 64 lowercase hex digits")


def _check_optional(payload: Mapping[str, Any], key: str, check: Any, what: str, where: str) -> None:
    if key in payload:
        _require(check(payload[key]), f"{where}.{key} must be {what}")


def _number_or_null(value: Any) -> bool:
    return value is None or _is_number(value)


def _check_common(payload: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(payload, Mapping):
        raise ContractError(f"{where}: a payload is a JSON object")
    schema = payload.get("schema")
    if not (_is_int(schema) and schema == SCHEMA):
        raise ContractError(f"{where}.schema must be {SCHEMA}, got {schema!r}")
    if not _is_number(payload.get("ts")):
        raise ContractError(f"{where}.ts must be Unix seconds")
    return dict(payload)


# ---- device -> fleet ---------------------------------------------------------------------------


def offline_status(ts: float) -> dict[str, Any]:
    """The retained ``offline`` status: the Last Will, and what a clean stop publishes itself."""
    return {"schema": SCHEMA, "state": "offline", "ts": ts}


def parse_status(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Check a ``status`` payload. ``online`` may carry ``model``, ``slot``, ``runtime``, ``capabilities``,
    ``uptime_s``, ``system_uptime_s`` and ``deployment`` (``{"cmd_id", "phase"}`` or null).

    Raises:
        ContractError: a key missing, ill-typed or out of bounds.
    """
    status = _check_common(payload, "status")
    _require(status.get("state") in STATUS_STATES, f"status.state must be one of {STATUS_STATES}")
    if "model" in status:
        _check_model(status["model"], "status.model")
    _check_optional(status, "slot", lambda v: v is None or v in SLOTS, f"one of {SLOTS} or null", "status")
    for key in ("runtime", "capabilities"):
        _check_optional(status, key, lambda v: isinstance(v, dict), "an object", "status")
    _check_optional(status, "uptime_s", _is_number, "a number of seconds", "status")
    _check_optional(status, "system_uptime_s", _number_or_null, "a number of seconds or null", "status")
    deployment = status.get("deployment")
    if deployment is not None:
        _require(isinstance(deployment, dict), "status.deployment must be an object or null")
        _require(isinstance(deployment.get("cmd_id"), str), "status.deployment.cmd_id must be a string")
        _require(
            deployment.get("phase") in DEPLOYMENT_PHASES, f"status.deployment.phase must be one of {DEPLOYMENT_PHASES}"
        )
    return status


def parse_telemetry(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Check a ``telemetry`` payload: ``seq`` (durable per device, the fleet's de-duplication key),
    ``dropped``, ``dead_letters`` (optional), ``window_s``, ``count``, ``errors``, ``latency_ms``
    (``p50``/``p95``/``p99``, null when nothing ran), ``rss_mb``, ``cpu_pct``, ``temperature_c`` (null where
    unreadable), ``model``.

    Raises:
        ContractError: a key missing, ill-typed or out of bounds.
    """
    telemetry = _check_common(payload, "telemetry")
    # A fleet ingests thousands of these a second: the checks are inlined (``type`` is exact for what JSON
    # decodes to, and keeps bools out of the numbers) and a message is built only for a failure.
    for key in ("seq", "dropped", "count", "errors"):
        value = telemetry.get(key)
        if type(value) is not int or value < 0:
            raise ContractError(f"telemetry.{key} must be an integer >= 0")
    for key in ("window_s", "rss_mb", "cpu_pct", "temperature_c"):
        value = telemetry.get(key)
        if value is not None and type(value) is not int and not (type(value) is float and math.isfinite(value)):
            raise ContractError(f"telemetry.{key} must be a number or null")
    latency = telemetry.get("latency_ms")
    if type(latency) is not dict:
        raise ContractError("telemetry.latency_ms must be an object with p50, p95 and p99 (numbers or null)")
    for key in ("p50", "p95", "p99"):
        value = latency.get(key, latency)  # a missing key reads as the dict itself: not a number
        if value is not None and type(value) is not int and not (type(value) is float and math.isfinite(value)):
            raise ContractError("telemetry.latency_ms must be an object with p50, p95 and p99 (numbers or null)")
    _check_model(telemetry.get("model"), "telemetry.model")
    dead_letters = telemetry.get("dead_letters", 0)  # optional: agents before issue 14 do not send it
    if type(dead_letters) is not int or dead_letters < 0:
        raise ContractError("telemetry.dead_letters must be an integer >= 0")
    if "error_kinds" in telemetry and not isinstance(telemetry["error_kinds"], dict):
        raise ContractError("telemetry.error_kinds must be an object")
    return telemetry


def event_payload(cmd_id: str | None, phase: str, message: str, ts: float, **detail: Any) -> dict[str, Any]:
    """One step of a command (``cmd_id`` null for what the device did by itself), bounded.

    Encoded, an event is at most ``MAX_EVENT_BYTES``: ``cmd_id`` longer than ``MAX_COMMAND_ID_CHARS``
    becomes null, ``message`` is clipped to ``MAX_MESSAGE_CHARS``; if it is still too large, every string
    in ``detail`` is clipped to ``MAX_TEXT_CHARS``, and if even that is too large (or not JSON) ``detail``
    keeps only ``message``, ``error`` and ``truncated: true``. A cut string ends in ``...[cut: N chars]``.

    Raises:
        ValueError: ``phase`` is not one of ``EVENT_PHASES``.
    """
    if phase not in EVENT_PHASES:
        raise ValueError(f"event phase {phase!r} is not one of {EVENT_PHASES}")
    if cmd_id is not None and not (isinstance(cmd_id, str) and len(cmd_id) <= MAX_COMMAND_ID_CHARS):
        cmd_id = None
    full = str(message)
    message = clip(full, MAX_MESSAGE_CHARS)
    event = {"schema": SCHEMA, "cmd_id": cmd_id, "phase": phase, "detail": {"message": message, **detail}, "ts": ts}
    if _encoded_size(event) <= MAX_EVENT_BYTES:
        return event
    event["detail"] = {"message": message, **_clip_strings(detail), "truncated": True}
    if _encoded_size(event) <= MAX_EVENT_BYTES:
        return event
    error = detail.get("error")
    short = {"message": clip(full, MAX_TEXT_CHARS), "truncated": True}
    if isinstance(error, str):
        short["error"] = clip(error, MAX_TEXT_CHARS)
    event["detail"] = short  # two strings of MAX_TEXT_CHARS, 12 bytes a char at worst escaped: under the bound
    return event


def _encoded_size(payload: Mapping[str, Any]) -> int:
    try:
        return len(encode_payload(payload))
    except (ValueError, TypeError, RecursionError):  # not JSON: the smallest form is taken
        return MAX_PAYLOAD_BYTES + 1


def _clip_strings(value: Any, depth: int = 0) -> Any:
    """``value`` with every string (keys too) clipped to ``MAX_TEXT_CHARS``, nested up to ``MAX_DEPTH``."""
    if isinstance(value, str):
        return clip(value, MAX_TEXT_CHARS)
    if depth >= MAX_DEPTH:
        return None
    if isinstance(value, Mapping):
        return {clip(str(k), MAX_TEXT_CHARS): _clip_strings(v, depth + 1) for k, v in list(value.items())[:64]}
    if isinstance(value, (list, tuple)):
        return [_clip_strings(v, depth + 1) for v in value[:64]]
    return value


def parse_event(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Check an ``events`` payload: ``cmd_id`` (string or null), ``phase``, ``detail`` with ``message``.

    Raises:
        ContractError: a key missing, ill-typed or out of bounds.
    """
    event = _check_common(payload, "event")
    cmd_id = event.get("cmd_id", ...)
    _require(cmd_id is None or isinstance(cmd_id, str), "event.cmd_id must be a string or null")
    _require(event.get("phase") in EVENT_PHASES, f"event.phase must be one of {EVENT_PHASES}")
    detail = event.get("detail")
    if not (isinstance(detail, dict) and isinstance(detail.get("message"), str)):
        raise ContractError("event.detail must be an object with a string message")
    if "model" in detail:
        _check_model(detail["model"], "event.detail.model")
    return event


# ---- fleet -> device ---------------------------------------------------------------------------


def parse_command(cmd: Mapping[str, Any]) -> tuple[str, str]:
    """Check a command's envelope; return ``(id, type)``.

    Raises:
        CommandError: no usable ``id``, an unknown ``type`` or ``schema``.
    """
    cmd_id = cmd.get("id")
    ok_id = isinstance(cmd_id, str) and 0 < len(cmd_id) <= MAX_COMMAND_ID_CHARS
    _require(ok_id, f"command id must be 1-{MAX_COMMAND_ID_CHARS} characters", CommandError)
    kind = cmd.get("type")
    got = clip(repr(kind), 64)  # what the fleet sent is echoed bounded, never whole
    _require(kind in COMMAND_TYPES, f"command type must be one of {', '.join(COMMAND_TYPES)}, got {got}", CommandError)
    schema = cmd.get("schema", SCHEMA)
    ok_schema = _is_int(schema) and schema == SCHEMA
    _require(ok_schema, f"command schema {clip(repr(schema), 64)} is not supported", CommandError)
    return str(cmd_id), str(kind)


def command_ref(cmd: Any) -> str | None:
    """The ``cmd_id`` to answer a command with: its ``id`` when that is a valid one, else None (an invalid
    id is never echoed: it may be of any length or type)."""
    cmd_id = cmd.get("id") if isinstance(cmd, Mapping) else None
    return cmd_id if isinstance(cmd_id, str) and 0 < len(cmd_id) <= MAX_COMMAND_ID_CHARS else None


@dataclass(frozen=True)
class CommandTimes:
    """When a command was issued and until when it may run (Unix seconds; the fleet's clock issues, the
    device's clock judges). Optional on every command; a device may refuse commands without
    ``issued_at`` (docs/mqtt.md, "Replay")."""

    issued_at: float | None = None
    expires_at: float | None = None


def parse_command_times(cmd: Mapping[str, Any]) -> CommandTimes:
    """The optional ``issued_at`` and ``expires_at`` of any command.

    Raises:
        CommandError: not a finite number >= 0, or an expiry before the issue time.
    """
    times: dict[str, float | None] = {}
    for key in ("issued_at", "expires_at"):
        value = cmd.get(key)
        ok = value is None or (_is_number(value) and math.isfinite(value) and value >= 0)
        _require(ok, f"command.{key} must be Unix seconds (a number >= 0)", CommandError)
        times[key] = None if value is None else float(value)
    issued, expires = times["issued_at"], times["expires_at"]
    ok_order = issued is None or expires is None or expires >= issued
    _require(ok_order, "command.expires_at is before command.issued_at", CommandError)
    return CommandTimes(issued, expires)


def parse_cancel(cmd: Mapping[str, Any]) -> str:
    """The id of the queued deploy or rollback a ``cancel`` command withdraws (``target``).

    Raises:
        CommandError: not a cancel, or no usable ``target``.
    """
    cmd_id, kind = parse_command(cmd)
    _require(kind == "cancel", f"command {cmd_id} is a {kind}, not a cancel", CommandError)
    target = cmd.get("target")
    ok = isinstance(target, str) and 0 < len(target) <= MAX_COMMAND_ID_CHARS
    _require(ok, f"cancel.target must be a command id of 1-{MAX_COMMAND_ID_CHARS} characters", CommandError)
    return str(target)


@dataclass(frozen=True)
class DeployCommand:
    """A checked ``deploy`` command.

    Attributes:
        id: the command id (de-duplication key).
        url: where the archive is, http(s).
        sha256: of the archive, lowercase hex.
        size: exact bytes of the archive, also the download cap; None: the device's own cap.
        version: the version the fleet announces (informational: the signed manifest decides).
        allow_downgrade: accept a version below the device's floor for the bundle's name.
        retry_bad: try a bundle this device marked bad.
        issued_at: Unix seconds when the fleet issued it (``CommandTimes``).
        expires_at: Unix seconds after which the device must not start it.
    """

    id: str
    url: str
    sha256: str
    size: int | None = None  # bytes
    version: int | None = None
    allow_downgrade: bool = False
    retry_bad: bool = False
    issued_at: float | None = None  # Unix seconds
    expires_at: float | None = None  # Unix seconds

    def to_payload(self) -> dict[str, Any]:
        """The command as the fleet publishes it on ``cmd``."""
        payload: dict[str, Any] = {"schema": SCHEMA, "id": self.id, "type": "deploy", "url": self.url}
        payload.update(sha256=self.sha256, allow_downgrade=self.allow_downgrade, retry_bad=self.retry_bad)
        optional: tuple[tuple[str, float | None], ...] = (("size", self.size), ("version", self.version))
        optional += (("issued_at", self.issued_at), ("expires_at", self.expires_at))
        payload.update({k: v for k, v in optional if v is not None})
        return payload


def parse_deploy(cmd: Mapping[str, Any], *, max_bundle_bytes: int) -> DeployCommand:
    """Check a ``deploy`` command against the device's download cap.

    Raises:
        CommandError: not a deploy, or a missing or ill-typed key (``url``, ``sha256``, ``size``, ...).
    """
    cmd_id, kind = parse_command(cmd)
    _require(kind == "deploy", f"command {cmd_id} is a {kind}, not a deploy", CommandError)
    url = cmd.get("url")
    ok_url = isinstance(url, str) and url.startswith(("http://", "https://")) and len(url) <= MAX_URL_CHARS
    _require(ok_url, f"deploy.url must be an http(s) URL of at most {MAX_URL_CHARS} characters", CommandError)
    sha = cmd.get("sha256")
    _require(isinstance(sha, str) and _is_sha256(sha.lower()), "deploy.sha256 must be 64 hex digits", CommandError)
    size = cmd.get("size")
    ok_size = size is None or (_is_int(size) and 0 < size <= max_bundle_bytes)
    _require(ok_size, f"deploy.size must be an integer from 1 to {max_bundle_bytes} (the device's cap)", CommandError)
    version = cmd.get("version")
    ok_version = version is None or (_is_int(version) and version >= 0)
    _require(ok_version, "deploy.version must be an integer >= 0", CommandError)
    for flag in ("allow_downgrade", "retry_bad"):
        _require(isinstance(cmd.get(flag, False), bool), f"deploy.{flag} must be true or false", CommandError)
    times = parse_command_times(cmd)
    return DeployCommand(
        id=cmd_id,
        url=str(url),
        sha256=str(sha).lower(),
        size=size,
        version=version,
        allow_downgrade=bool(cmd.get("allow_downgrade", False)),
        retry_bad=bool(cmd.get("retry_bad", False)),
        issued_at=times.issued_at,
        expires_at=times.expires_at,
    )


def parse_trust(cmd: Mapping[str, Any]) -> dict[str, Any]:
    """The signed root document a ``trust`` command carries (``root``: ``{"signed", "signatures"}``).

    Only its shape is checked here; the device checks its signatures (``sdk.trustroot.update_root``):
    the transport does not decide, so any sender may carry it.

    Raises:
        CommandError: no ``root`` object, or another key.
    """
    unknown = sorted(set(cmd) - {*_ENVELOPE_KEYS, "root"})
    _require(not unknown, f"trust: unknown keys {clip(repr(unknown), 200)}", CommandError)
    root = cmd.get("root")
    ok = isinstance(root, dict) and set(root) == {"signed", "signatures"}
    _require(ok, 'trust.root must be a signed root document {"signed": {...}, "signatures": [...]}', CommandError)
    return dict(root)  # type: ignore[arg-type]


def freshness_payload(document: Mapping[str, Any]) -> dict[str, Any]:
    """The retained message the fleet publishes on ``Topics.freshness``: a signed freshness document
    (``sdk.freshness``) in the envelope of a command of type ``timestamp`` (it may also be sent on a
    device's ``cmd`` topic; an ``id`` is then optional)."""
    return {"schema": SCHEMA, "type": "timestamp", "timestamp": dict(document)}


def parse_freshness(cmd: Mapping[str, Any]) -> dict[str, Any]:
    """The signed document a ``timestamp`` message carries (``timestamp``: ``{"signed", "signatures"}``).

    Only its shape is checked here; the device checks the signatures (``sdk.freshness``), so whoever
    delivers it decides nothing.

    Raises:
        CommandError: another schema or type, no ``timestamp`` object, or another key.
    """
    _require(cmd.get("schema") == SCHEMA, f"timestamp: schema must be {SCHEMA}", CommandError)
    _require(cmd.get("type") == "timestamp", "timestamp: type must be 'timestamp'", CommandError)
    unknown = sorted(set(cmd) - {*_ENVELOPE_KEYS, "timestamp"})
    _require(not unknown, f"timestamp: unknown keys {clip(repr(unknown), 200)}", CommandError)
    document = cmd.get("timestamp")
    ok = isinstance(document, dict) and set(document) == {"signed", "signatures"}
    _require(ok, 'timestamp must be a signed document {"signed": {...}, "signatures": [...]}', CommandError)
    return dict(document)  # type: ignore[arg-type]


def parse_config(cmd: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a ``config`` command changes: ``telemetry_interval_s`` (``TELEMETRY_INTERVAL_S``) and
    ``log_level`` (``LOG_LEVELS``, any case), normalised (a float, upper case).

    Raises:
        CommandError: an unknown key, a value out of range, or nothing to change.
    """
    settings = {k: v for k, v in cmd.items() if k not in _ENVELOPE_KEYS}
    unknown = sorted(set(settings) - set(_CONFIG_KEYS))
    names = clip(repr(unknown), 200)
    _require(not unknown, f"config: unknown settings {names}; known: {sorted(_CONFIG_KEYS)}", CommandError)
    _require(bool(settings), f"config: nothing to change; known settings: {sorted(_CONFIG_KEYS)}", CommandError)
    if "telemetry_interval_s" in settings:
        value = settings["telemetry_interval_s"]
        low, high = TELEMETRY_INTERVAL_S
        ok = _is_number(value) and low <= value <= high
        _require(ok, f"config.telemetry_interval_s must be a number of seconds from {low:g} to {high:g}", CommandError)
        settings["telemetry_interval_s"] = float(value)
    if "log_level" in settings:
        level = settings["log_level"]
        ok = isinstance(level, str) and level.upper() in LOG_LEVELS
        _require(ok, f"config.log_level must be one of {LOG_LEVELS}", CommandError)
        settings["log_level"] = str(level).upper()
    return settings
