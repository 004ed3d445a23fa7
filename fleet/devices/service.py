"""The registry: what the ingest writes (devices, events, telemetry) and what the API and the rollout engine read.

Writes come in batches from the ingest's one writer thread (``record_messages``): one transaction per
batch, idempotent, so a batch the database refused can be replayed whole and a message the broker
delivers twice is stored once (telemetry by ``(device_id, seq)``, events by the payload's digest).
Everything takes a SQLAlchemy ``Session`` already in a transaction (``Database.session()``) and works
on SQLite and PostgreSQL alike (``INSERT .. ON CONFLICT`` through each dialect's ``insert``).

Rows of several devices are always written in device id order, so two fleet processes writing
overlapping batches on PostgreSQL wait for each other instead of deadlocking.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, bindparam, delete, select, update
from sqlalchemy.orm import Session

from fleet.devices.tables import MAX_NAME_CHARS, Device, DeviceEvent, DeviceTag, Telemetry
from sdk.errors import InputError

__all__ = [
    "LAST_SEEN_RESOLUTION_S",
    "LEAVES",
    "SELECTOR_FORMS",
    "command_phases",
    "Deployment",
    "Incoming",
    "Recorded",
    "device_tags",
    "devices_by_id",
    "get_device",
    "history",
    "last_seen",
    "list_devices",
    "list_events",
    "prune",
    "record_messages",
    "remove_tag",
    "select_devices",
    "set_tags",
]

LEAVES = ("status", "telemetry", "events")  # what a device sends, the ingest's subscriptions
SELECTOR_FORMS = ("all", "tag=KEY=VALUE", "group=NAME", "id=A,B,...")
LAST_SEEN_RESOLUTION_S = 1.0  # last_seen moves when a message is this much later: not one UPDATE per message
_CHUNK = 500  # ids per IN (...) list: well under SQLite's and PostgreSQL's bound-parameter limits
_FINAL = ("active", "failed", "rolled_back")  # phases that end a deploy or rollback


@dataclass(frozen=True)
class Incoming:
    """One message the ingest checked against the contract.

    Attributes:
        device_id: from the topic (never from the payload).
        leaf: ``status``, ``telemetry`` or ``events``.
        payload: what ``parse_status`` / ``parse_telemetry`` / ``parse_event`` returned.
        received_at: the server's clock when the message arrived, unix seconds.
        digest: the payload's SHA-256 (hex, 32 digits kept): de-duplicates redelivered events.
    """

    device_id: str
    leaf: str
    payload: Mapping[str, Any]
    received_at: float
    digest: str = ""


@dataclass
class Recorded:
    """What one ``record_messages`` call handed to the database (duplicates included: they cost nothing)."""

    statuses: int = 0
    telemetry: int = 0
    events: int = 0
    devices: set[str] = field(default_factory=set)
    last_seen: dict[str, float] = field(default_factory=dict)  # devices' last_seen in the database after it


def _insert(session: Session, table: Table) -> Any:
    """The dialect's ``insert`` (it has ``on_conflict_do_nothing`` / ``on_conflict_do_update``)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


# ---- writes from the ingest ----------------------------------------------------------------------


def _touch(
    session: Session, seen: Mapping[str, float], created: Mapping[str, float], known: Mapping[str, float]
) -> dict[str, float]:
    """Create the devices not yet known and move ``last_seen`` forward (never back: two fleet processes
    may commit out of order); return the ``last_seen`` values the database holds at least afterwards.

    Args:
        seen: device -> latest received_at of a message the device itself sent.
        created: devices heard of through their Last Will (the broker speaking): created if new, with
            that time as first and last seen, but an existing device's ``last_seen`` stays.
        known: existing devices' ``last_seen`` as the caller last saw it committed (never ahead of the
            database: devices are never deleted and ``last_seen`` never moves back); those are not read again.
    """
    table = Device.__table__
    assert isinstance(table, Table)

    def rows(times: Mapping[str, float]) -> list[dict[str, Any]]:
        return [
            {
                "device_id": d,
                "first_seen": times[d],
                "last_seen": times[d],
                "online": False,
                "state": "unknown",
                "capabilities": {},
                "runtime": {},
            }
            for d in sorted(times)
        ]

    if seen:
        # Insert only the devices not known yet (rare: the JSON defaults cost ~10x a plain update), then
        # move last_seen forward with one executemany of a plain UPDATE: half the cost of an upsert of
        # every device of the batch. A device another process creates between the two is caught by the
        # ON CONFLICT and then updated like the others.
        cached = {d: known[d] for d in seen if d in known}
        known = {**last_seen(session, [d for d in seen if d not in cached]), **cached}
        new = {d: at for d, at in seen.items() if d not in known}
        if new:
            session.execute(_insert(session, table).on_conflict_do_nothing(index_elements=["device_id"]), rows(new))
        moved = {d: at for d, at in sorted(seen.items()) if d in new or at >= known[d] + LAST_SEEN_RESOLUTION_S}
        later = [{"d": d, "t": at} for d, at in moved.items()]
        if later and session.get_bind().dialect.name == "postgresql":
            # One statement for the batch (a per-row UPDATE costs the server a plan and an executor each).
            session.connection().exec_driver_sql(
                f"UPDATE {table.name} AS d SET last_seen = v.t FROM unnest(%s::text[], %s::float8[]) AS v(id, t) "
                "WHERE d.device_id = v.id AND d.last_seen < v.t",
                ([row["d"] for row in later], [row["t"] for row in later]),
            )
        elif later:
            stmt = (
                update(table)
                .where(table.c.device_id == bindparam("d"), table.c.last_seen < bindparam("t"))
                .values(last_seen=bindparam("t"))
            )
            session.execute(stmt, later)
        after = {**known, **moved}
    else:
        after = {}
    only_will = {d: at for d, at in created.items() if d not in seen}
    if only_will:
        stmt = _insert(session, table).on_conflict_do_nothing(index_elements=["device_id"])
        session.execute(stmt, rows(only_will))
    return after


def _apply_status(device: Device, status: Mapping[str, Any], received_at: float) -> None:
    """A status replaces what the device reported before; the Last Will (``offline``) only says it left,
    so the last known model, slot and capabilities are kept."""
    device.status_at = received_at
    if status["state"] == "offline":
        device.online = False
        device.state = "offline"
        return
    device.online = True
    device.state = "online"
    device.status_ts = float(status["ts"])
    if "model" in status:
        model = status["model"] or {}
        device.model_name = model.get("name")
        device.model_version = model.get("version")
        device.model_target = model.get("target")
        device.model_sha256 = model.get("sha256")
    if "slot" in status:
        device.slot = status["slot"]
    if "capabilities" in status:
        device.capabilities = dict(status["capabilities"])
    if "runtime" in status:
        device.runtime = dict(status["runtime"])
    device.deployment = dict(status["deployment"]) if status.get("deployment") else None


# Telemetry is most of what the ingest writes: its rows go to the driver as tuples through one prepared
# INSERT per dialect (SQLAlchemy's per-row parameter processing cost as much as the insert itself).
_TELEMETRY_COLUMNS = (
    "device_id", "seq", "ts", "window_s", "count", "errors", "p50_ms", "p95_ms", "p99_ms", "model_name",
    "model_version", "model_sha256", "rss_mb", "cpu_pct", "temperature_c", "dropped", "received_at",
)  # fmt: skip


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _telemetry_row(message: Incoming) -> tuple[Any, ...]:
    """One telemetry row, in ``_TELEMETRY_COLUMNS`` order, each value of its column's Python type (JSON
    gives ``3`` where a float column wants ``3.0``; PostgreSQL's binary arrays below need one type)."""
    t = message.payload
    latency = t["latency_ms"]
    model = t.get("model") or {}
    return (
        message.device_id, t["seq"], float(t["ts"]), _float(t.get("window_s")), t["count"], t["errors"],
        _float(latency["p50"]), _float(latency["p95"]), _float(latency["p99"]), model.get("name"),
        model.get("version"), model.get("sha256"), _float(t.get("rss_mb")), _float(t.get("cpu_pct")),
        _float(t.get("temperature_c")), t["dropped"], float(message.received_at),
    )  # fmt: skip


_ON_CONFLICT = "ON CONFLICT (device_id, seq) DO NOTHING"


def _insert_telemetry(session: Session, rows: list[tuple[Any, ...]]) -> None:
    """``INSERT .. ON CONFLICT (device_id, seq) DO NOTHING`` of ``rows``: on SQLite one driver
    ``executemany``; on PostgreSQL one statement over a column array each (``unnest``, sent in binary), so
    the server plans and runs one insert for the batch instead of one per row."""
    table = Telemetry.__table__
    assert isinstance(table, Table) and tuple(table.columns.keys()) == _TELEMETRY_COLUMNS, "schema and rows differ"
    dialect = session.get_bind().dialect
    columns = ", ".join(_TELEMETRY_COLUMNS)
    if dialect.name == "postgresql":
        arrays = ", ".join(f"%b::{table.c[c].type.compile(dialect=dialect)}[]" for c in _TELEMETRY_COLUMNS)
        sql = f"INSERT INTO {table.name} ({columns}) SELECT * FROM unnest({arrays}) {_ON_CONFLICT}"
        session.connection().exec_driver_sql(sql, tuple(list(column) for column in zip(*rows, strict=True)))
    else:
        values = ", ".join("?" * len(_TELEMETRY_COLUMNS))
        sql = f"INSERT INTO {table.name} ({columns}) VALUES ({values}) {_ON_CONFLICT}"
        session.connection().exec_driver_sql(sql, rows)


def _event_row(message: Incoming) -> dict[str, Any]:
    e = message.payload
    return {
        "device_id": message.device_id, "cmd_id": e.get("cmd_id"), "phase": e["phase"], "ts": float(e["ts"]),
        "detail": dict(e["detail"]), "received_at": message.received_at, "digest": message.digest,
    }  # fmt: skip


def record_messages(
    session: Session, messages: Sequence[Incoming], known_last_seen: Mapping[str, float] | None = None
) -> Recorded:
    """Store one batch of checked messages, in arrival order where order matters (a device's statuses).

    Every message but the Last Will moves its device's ``last_seen``; statuses update the device;
    telemetry and events are inserted once (a replayed ``seq`` or a redelivered event is skipped by the
    database, so replaying a whole batch after a failed commit is harmless). ``known_last_seen``: what an
    earlier committed call returned as ``Recorded.last_seen`` (the ingest keeps it, so a batch of known
    devices does not read their ``last_seen`` again); pass it only once that call's transaction committed.
    """
    done = Recorded()
    seen: dict[str, float] = {}
    created: dict[str, float] = {}
    telemetry: dict[tuple[str, int], tuple[Any, ...]] = {}
    events: dict[tuple[str, str], dict[str, Any]] = {}
    statuses: list[Incoming] = []
    for m in messages:
        done.devices.add(m.device_id)
        if m.leaf == "status" and m.payload["state"] == "offline":
            created.setdefault(m.device_id, m.received_at)
        else:
            seen[m.device_id] = max(seen.get(m.device_id, m.received_at), m.received_at)
        if m.leaf == "status":
            statuses.append(m)
        elif m.leaf == "telemetry":
            telemetry.setdefault((m.device_id, int(m.payload["seq"])), _telemetry_row(m))
        elif m.leaf == "events":
            events.setdefault((m.device_id, m.digest), _event_row(m))
        else:
            raise ValueError(f"unknown leaf {m.leaf!r}")
    done.last_seen = _touch(session, seen, created, known_last_seen or {})
    if statuses:
        ids = sorted({m.device_id for m in statuses})
        devices = devices_by_id(session, ids)
        for m in statuses:
            _apply_status(devices[m.device_id], m.payload, m.received_at)
        session.flush()
        done.statuses = len(statuses)
    if telemetry:
        _insert_telemetry(session, [telemetry[k] for k in sorted(telemetry)])
        done.telemetry = len(telemetry)
    if events:
        table = DeviceEvent.__table__
        stmt = _insert(session, table).on_conflict_do_nothing(index_elements=["device_id", "digest"])  # type: ignore[arg-type]
        session.execute(stmt, [events[k] for k in sorted(events)])
        done.events = len(events)
    return done


# ---- devices and tags -----------------------------------------------------------------------------


def devices_by_id(session: Session, device_ids: Collection[str]) -> dict[str, Device]:
    """The known devices among ``device_ids`` (unknown ids are left out)."""
    found: dict[str, Device] = {}
    for chunk in _chunks(sorted(set(device_ids))):
        for device in session.scalars(select(Device).where(Device.device_id.in_(chunk))):
            found[device.device_id] = device
    return found


def get_device(session: Session, device_id: str) -> Device | None:
    """One device, or None."""
    return session.get(Device, device_id)


def last_seen(session: Session, device_ids: Collection[str]) -> dict[str, float]:
    """``received_at`` of each device's last message (its Last Will excepted); unknown devices are absent.

    The rollout engine's silence gate reads this: a device whose value is older than ``now - silence``
    has sent nothing (no status, telemetry or event) for that long.
    """
    found: dict[str, float] = {}
    for chunk in _chunks(sorted(set(device_ids))):
        table = Device.__table__  # Core, not ORM: the ingest asks this for every batch
        assert isinstance(table, Table)
        query = select(table.c.device_id, table.c.last_seen).where(table.c.device_id.in_(chunk))
        found.update({d: float(at) for d, at in session.connection().execute(query)})
    return found


def device_tags(session: Session, device_ids: Collection[str] | None = None) -> dict[str, dict[str, str]]:
    """Tags per device (devices without tags are absent); None: every device."""
    query = select(DeviceTag).order_by(DeviceTag.device_id, DeviceTag.key)
    rows: list[DeviceTag] = []
    if device_ids is None:
        rows = list(session.scalars(query))
    else:
        for chunk in _chunks(sorted(set(device_ids))):
            rows.extend(session.scalars(query.where(DeviceTag.device_id.in_(chunk))))
    tags: dict[str, dict[str, str]] = {}
    for row in rows:
        tags.setdefault(row.device_id, {})[row.key] = row.value
    return tags


def _check_tag(key: str, value: str) -> None:
    for what, text in (("tag key", key), ("tag value", value)):
        if not isinstance(text, str) or not text or len(text) > MAX_NAME_CHARS or "\x00" in text:
            raise InputError(f"a {what} is 1 to {MAX_NAME_CHARS} characters without NUL, got {text!r}")
    if "=" in key or "," in key:
        raise InputError(f"a tag key cannot hold '=' or ',' (selectors read tag=KEY=VALUE), got {key!r}")


def set_tags(session: Session, device_id: str, tags: Mapping[str, str]) -> dict[str, str]:
    """Replace every tag of a known device with ``tags``; the device's group is the tag ``group``.

    Raises:
        LookupError: no such device (the API answers 404).
        InputError: an empty, overlong or ill-formed key or value (nothing is changed).
    """
    for key, value in tags.items():
        _check_tag(key, value)
    if session.get(Device, device_id) is None:
        raise LookupError(f"no device {device_id!r}")
    session.execute(delete(DeviceTag).where(DeviceTag.device_id == device_id))
    session.add_all(DeviceTag(device_id=device_id, key=k, value=v) for k, v in sorted(tags.items()))
    session.flush()
    return dict(sorted(tags.items()))


def remove_tag(session: Session, device_id: str, key: str) -> bool:
    """Remove one tag; False when the device has no such tag.

    Raises:
        LookupError: no such device.
    """
    if session.get(Device, device_id) is None:
        raise LookupError(f"no device {device_id!r}")
    result = session.execute(delete(DeviceTag).where(DeviceTag.device_id == device_id, DeviceTag.key == key))
    return bool(getattr(result, "rowcount", 0))


def select_devices(session: Session, selector: str) -> list[str]:
    """The ids (sorted) a selector names: ``all``, ``tag=KEY=VALUE``, ``group=NAME`` or ``id=A,B,...``.

    A tag or group that matches nothing gives an empty list (the caller decides whether that is an error).

    Raises:
        InputError: a selector of another form, or ``id=`` naming devices the registry does not know
            (all of them are named).
    """
    kind, _, rest = selector.strip().partition("=")
    if kind == "all" and not rest:
        return list(session.scalars(select(Device.device_id).order_by(Device.device_id)))
    if kind == "tag" and "=" in rest:
        key, _, value = rest.partition("=")
        if key and value:
            return _tagged(session, key, value)
    if kind == "group" and rest:
        return _tagged(session, "group", rest)
    if kind == "id" and rest:
        wanted = [i.strip() for i in rest.split(",") if i.strip()]
        if wanted:
            known = devices_by_id(session, wanted)
            unknown = sorted(set(wanted) - set(known))
            if unknown:
                raise InputError(f"unknown devices in selector: {', '.join(unknown)}")
            return sorted(known)
    raise InputError(f"a device selector is one of {', '.join(SELECTOR_FORMS)}; got {selector!r}")


def _tagged(session: Session, key: str, value: str) -> list[str]:
    query = select(DeviceTag.device_id).where(DeviceTag.key == key, DeviceTag.value == value)
    return list(session.scalars(query.order_by(DeviceTag.device_id)))


def list_devices(session: Session, *, selector: str | None = None, online: bool | None = None) -> list[Device]:
    """Devices by id, narrowed by a selector (see ``select_devices``) and by being online or not.

    Raises:
        InputError: a bad selector or unknown ids in it.
    """
    query = select(Device).order_by(Device.device_id)
    if online is not None:
        query = query.where(Device.online.is_(online))
    if selector is None or selector.strip() == "all":
        return list(session.scalars(query))
    ids = select_devices(session, selector)
    found: list[Device] = []
    for chunk in _chunks(ids):
        found.extend(session.scalars(query.where(Device.device_id.in_(chunk))))
    return sorted(found, key=lambda d: d.device_id)


# ---- events and deployment history -----------------------------------------------------------------


def command_phases(session: Session, cmd_ids: Collection[str]) -> dict[str, frozenset[str]]:
    """The event phases each command id reached on its device (ids with no event are left out)."""
    seen: dict[str, set[str]] = {}
    for chunk in _chunks(sorted(set(cmd_ids))):
        for cmd_id, phase in session.execute(
            select(DeviceEvent.cmd_id, DeviceEvent.phase).where(DeviceEvent.cmd_id.in_(chunk))
        ):
            if cmd_id is not None:  # the IN excludes them; the column is nullable
                seen.setdefault(cmd_id, set()).add(phase)
    return {cmd_id: frozenset(phases) for cmd_id, phases in seen.items()}


def list_events(
    session: Session, device_id: str, *, since: float | None = None, cmd_id: str | None = None, limit: int = 200
) -> list[DeviceEvent]:
    """A device's events, newest first (``since``: received at or after; ``cmd_id``: of one command)."""
    query = select(DeviceEvent).where(DeviceEvent.device_id == device_id)
    if since is not None:
        query = query.where(DeviceEvent.received_at >= since)
    if cmd_id is not None:
        query = query.where(DeviceEvent.cmd_id == cmd_id)
    query = query.order_by(DeviceEvent.received_at.desc(), DeviceEvent.id.desc()).limit(max(1, min(limit, 10_000)))
    return list(session.scalars(query))


@dataclass(frozen=True)
class Deployment:
    """One deploy or rollback on a device, read from its events.

    Attributes:
        cmd_id: the command (None: something the device did alone, e.g. its first install).
        started, updated: received_at of its first and last event.
        phase: the last phase reported.
        outcome: ``active``, ``failed``, ``rolled_back`` (a final phase was reported) or ``in_progress``.
        model: the ``detail.model`` of the last event that named one.
        phases: every phase in the order received.
    """

    cmd_id: str | None
    started: float
    updated: float
    phase: str
    outcome: str
    model: dict[str, Any] | None
    phases: tuple[str, ...]


def history(session: Session, device_id: str, *, limit: int = 100) -> list[Deployment]:
    """A device's deployments, newest first. Answers to ``ping`` and ``config`` are not deployments."""
    query = (
        select(DeviceEvent)
        .where(DeviceEvent.device_id == device_id, DeviceEvent.phase.not_in(("pong", "applied")))
        .order_by(DeviceEvent.received_at, DeviceEvent.id)
    )
    groups: dict[object, list[DeviceEvent]] = {}
    for event in session.scalars(query):
        groups.setdefault(event.cmd_id if event.cmd_id is not None else ("alone", event.id), []).append(event)
    found = []
    for events in groups.values():
        phases = tuple(e.phase for e in events)
        models = [e.detail["model"] for e in events if isinstance(e.detail.get("model"), dict)]
        last = phases[-1]
        found.append(
            Deployment(
                cmd_id=events[0].cmd_id,
                started=events[0].received_at,
                updated=events[-1].received_at,
                phase=last,
                outcome=last if last in _FINAL else "in_progress",
                model=models[-1] if models else None,
                phases=phases,
            )
        )
    found.sort(key=lambda d: (d.started, d.updated), reverse=True)
    return found[:limit]


# ---- retention ------------------------------------------------------------------------------------------


def prune(session: Session, now: float, keep_s: float, *, events_keep_s: float | None = None) -> dict[str, int]:
    """Delete telemetry older than ``keep_s`` and events older than ``events_keep_s`` (default ``keep_s``),
    by ``received_at``; devices and tags are kept. Returns the rows deleted per table.

    Raises:
        InputError: a negative retention.
    """
    events_keep_s = keep_s if events_keep_s is None else events_keep_s
    if keep_s < 0 or events_keep_s < 0:
        raise InputError("a retention is a number of seconds >= 0")
    t = session.execute(delete(Telemetry).where(Telemetry.received_at < now - keep_s))
    e = session.execute(delete(DeviceEvent).where(DeviceEvent.received_at < now - events_keep_s))
    return {"telemetry": int(getattr(t, "rowcount", 0)), "events": int(getattr(e, "rowcount", 0))}
