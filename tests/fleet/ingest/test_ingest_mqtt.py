"""The ingest end to end: paho publishers speaking the contract -> a real Mosquitto -> Ingest -> SQLite/PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
from agent_parts import Broker, wait_for
from fleet_parts import FLEET, event, status, telemetry
from ingest_parts import FakeDevice
from sqlalchemy import func, select, text

from fleet.db import Database, migrate
from fleet.devices import Device, DeviceEvent, Telemetry, history
from fleet.ingest import Ingest
from fleet.ingest.service import puback_packets
from sdk.mqtt_contract import MAX_PAYLOAD_BYTES, SCHEMA

DeviceMaker = Callable[[str], FakeDevice]
IngestMaker = Callable[..., Ingest]


def _count(db: Database, table: type, **where: str) -> int:
    with db.session() as s:
        query = select(func.count()).select_from(table)
        for key, value in where.items():
            query = query.where(getattr(table, key) == value)
        return int(s.scalar(query) or 0)


def test_devices_telemetry_and_events_stored_once_in_order(
    db: Database, broker: Broker, ingest_factory: IngestMaker, device_factory: DeviceMaker
) -> None:
    ingest = ingest_factory(db, broker)
    devices = {name: device_factory(name) for name in ("cam-1", "cam-2", "cam-3")}
    for name, device in devices.items():
        device.send("status", status(ts=1.0, version=5), retain=True)
        for seq in (1, 2, 3, 5, 4, 3, 6, 1):  # out of order, replayed
            device.send("telemetry", telemetry(seq, count=10))
        device.send("events", event(f"r1-{name}", "received"))
        device.send("events", event(f"r1-{name}", "active"))
    # a device naming another in its payload: the topic decides
    devices["cam-1"].send("telemetry", {**telemetry(7), "device_id": "cam-9"})
    wait_for(lambda: ingest.counters.get("received", 0) >= 3 * 11 + 1, 20, "every message taken")
    wait_for(lambda: _count(db, DeviceEvent) == 6 and _count(db, Telemetry) == 19, 10, "events stored")
    for name in devices:
        with db.session() as s:
            seqs = s.scalars(select(Telemetry.seq).where(Telemetry.device_id == name).order_by(Telemetry.seq))
            assert list(seqs) == ([1, 2, 3, 4, 5, 6, 7] if name == "cam-1" else [1, 2, 3, 4, 5, 6])
            d = s.get(Device, name)
            assert d is not None and (d.online, d.model_version, d.capabilities["arch"]) == (True, 5, "x86_64")
            assert [h.outcome for h in history(s, name)] == ["active"]
    assert _count(db, Device) == 3  # no cam-9
    # the Last Will (a device gone): the same retained topic, offline
    devices["cam-2"].send("status", {"schema": SCHEMA, "state": "offline", "ts": 1.0}, retain=True)
    wait_for(lambda: _offline(db, "cam-2"), 10, "cam-2 offline")
    assert not any(k.startswith("dropped") for k in ingest.counters)


def _offline(db: Database, device_id: str) -> bool:
    with db.session() as s:
        d = s.get(Device, device_id)
        return d is not None and not d.online


def test_a_new_fleet_process_learns_devices_from_retained_statuses(
    sqlite_db: Database, broker: Broker, ingest_factory: IngestMaker, device_factory: DeviceMaker
) -> None:
    device_factory("early").send("status", status(version=3), retain=True)  # before any fleet process
    ingest_factory(sqlite_db, broker)
    wait_for(lambda: _count(sqlite_db, Device) == 1, 10, "the retained status")


def test_bad_messages_are_counted_and_dropped_while_good_ones_flow(
    sqlite_db: Database, broker: Broker, ingest_factory: IngestMaker, device_factory: DeviceMaker
) -> None:
    ingest = ingest_factory(sqlite_db, broker)
    device = device_factory("dev")
    nested: dict[str, object] = {"message": "deep"}
    for _ in range(40):
        nested = {"message": "x", "inner": nested}
    bad = [
        ("malformed", "telemetry", b"{not json"),
        ("malformed", "telemetry", b"[1, 2]"),
        ("malformed", "events", b'{"schema": 1, "schema": 1}'),  # duplicate key
        ("oversized", "telemetry", b'{"pad": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}'),
        ("too_deep", "events", json.dumps(event("c", "received", detail=nested)).encode()),
        ("too_deep", "telemetry", b"[" * 5000 + b"]" * 5000),
        ("unknown_schema", "telemetry", json.dumps({**telemetry(99), "schema": 2}).encode()),
        ("unknown_schema", "status", b'{"state": "online", "ts": 1}'),
        ("invalid", "telemetry", json.dumps({k: v for k, v in telemetry(98).items() if k != "seq"}).encode()),
        ("invalid", "telemetry", json.dumps(telemetry(2**64)).encode()),  # past the database's BIGINT
        ("invalid", "events", json.dumps(event("c", "received") | {"cmd_id": "c" * 300}).encode()),  # overlong id
        ("invalid", "status", json.dumps(status(slot="C")).encode()),
    ]
    for seq, (_, leaf, payload) in enumerate(bad, start=1):
        device.send(leaf, payload)
        device.send("telemetry", telemetry(seq))  # a good one after each bad one
    long_id = "d" * 200  # a topic segment longer than a device id may be
    device.send("telemetry", telemetry(1), topic=f"edgeship/v1/{FLEET}/{long_id}/telemetry")
    expected: dict[str, int] = {"dropped_foreign_topic": 1}
    for reason, _, _ in bad:
        expected[f"dropped_{reason}"] = expected.get(f"dropped_{reason}", 0) + 1
    wait_for(lambda: ingest.counters.get("received", 0) >= 2 * len(bad) + 1, 10, "every message taken")
    assert {k: v for k, v in ingest.counters.items() if k.startswith("dropped")} == expected
    wait_for(lambda: _count(sqlite_db, Telemetry, device_id="dev") == len(bad), 10, "good telemetry stored")
    assert _count(sqlite_db, Device) == 1 and _count(sqlite_db, DeviceEvent) == 0


def test_two_fleet_processes_share_the_subscription_and_store_each_message_once(
    pg: object, broker: Broker, ingest_factory: IngestMaker, device_factory: DeviceMaker
) -> None:
    db = Database(pg.new_database())  # type: ignore[attr-defined]
    try:
        first = ingest_factory(db, broker, share_group="pair")
        second = ingest_factory(db, broker, share_group="pair")
        devices = [device_factory(f"d{i}") for i in range(4)]
        for seq in range(1, 51):
            for device in devices:
                device.send("telemetry", telemetry(seq))
        both = (first, second)
        wait_for(lambda: _count(db, Telemetry) == 200, 20, "200 stored")
        assert sum(i.counters.get("received", 0) for i in both) == 200  # each message went to one process
        assert all(i.counters.get("stored_telemetry", 0) > 0 for i in both), [i.counters for i in both]
    finally:
        db.close()


def test_database_outage_is_retried_without_loss(
    pg: object, broker: Broker, ingest_factory: IngestMaker, device_factory: DeviceMaker
) -> None:
    url = pg.new_database()  # type: ignore[attr-defined]
    name = url.rsplit("/", 1)[1]
    db = Database(url)
    admin = Database(pg.url("postgres"))  # type: ignore[attr-defined]
    try:
        ingest = ingest_factory(db, broker)
        device = device_factory("dev")
        device.send("telemetry", telemetry(1))
        wait_for(lambda: _count(db, Telemetry) == 1, 10, "the first message")
        with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:  # the database goes away
            c.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            c.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        for seq in range(2, 52):
            device.send("telemetry", telemetry(seq))
        wait_for(lambda: ingest.counters.get("db_errors", 0) >= 2, 10, "failed commits")
        with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        wait_for(lambda: _count(db, Telemetry) == 51, 20, "every message after the outage")
    finally:
        db.close()
        admin.close()


def test_a_fleet_process_killed_before_its_commit_loses_nothing(
    tmp_path: Path, broker: Broker, device_factory: DeviceMaker, ingest_factory: IngestMaker
) -> None:
    path = tmp_path / "fleet.db"
    db = Database(f"sqlite:///{path}")
    migrate(db)
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("ingest_process.py")), f"sqlite:///{path}", str(broker.port),
         FLEET, "the-one"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )  # fmt: skip
    assert child.stdout is not None
    try:
        _read_until(child.stdout, lambda c: c["connected"], "the child subscribed")
        locker = sqlite3.connect(path, timeout=1)
        locker.execute("BEGIN EXCLUSIVE")  # the database stops taking writes
        device = device_factory("dev")
        for seq in range(1, 31):
            device.send("telemetry", telemetry(seq))
        _read_until(child.stdout, lambda c: c.get("received", 0) >= 30, "the child took all 30")
        child.send_signal(signal.SIGKILL)  # dies holding 30 messages it never committed nor acknowledged
        child.wait(10)
        locker.rollback()
        locker.close()
        assert _count(db, Telemetry) == 0
        ingest_factory(db, broker, client_id="the-one")  # the same session: the broker sends them again
        wait_for(lambda: _count(db, Telemetry) == 30, 20, "the 30 messages after the restart")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        db.close()


def _read_until(stream: IO[str], condition: Callable[[dict[str, Any]], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    for line in stream:
        if condition(json.loads(line)):
            return
        if time.monotonic() > deadline:
            break
    pytest.fail(f"timed out waiting for {what}")


def test_stored_messages_are_acknowledged_so_the_session_does_not_send_them_again(
    sqlite_db: Database, broker: Broker, ingest_factory: IngestMaker, device_factory: DeviceMaker
) -> None:
    # The PUBACKs of a batch go out in one write: the broker must take every one of them, or the next
    # process on the same session gets those messages again.
    first = ingest_factory(sqlite_db, broker, client_id="acks", batch_max=7)  # several batches, several writes
    device = device_factory("dev")
    for seq in range(1, 61):
        device.send("telemetry", telemetry(seq))
    wait_for(lambda: _count(sqlite_db, Telemetry) == 60, 20, "60 messages stored")
    first.stop()
    again = ingest_factory(sqlite_db, broker, client_id="acks")
    device.send("telemetry", telemetry(61))  # a marker: everything the broker had queued for us comes before it
    wait_for(lambda: _count(sqlite_db, Telemetry) == 61, 20, "the marker stored")
    assert again.counters.get("received") == 1, again.counters


def test_puback_packets_are_the_mqtt_acknowledgements_back_to_back() -> None:
    assert puback_packets([1, 258, 65535]) == b"\x40\x02\x00\x01" + b"\x40\x02\x01\x02" + b"\x40\x02\xff\xff"
    assert puback_packets([]) == b""
