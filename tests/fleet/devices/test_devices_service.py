"""The registry on SQLite and PostgreSQL (the ``db`` fixture runs each test on both)."""

from __future__ import annotations

import pytest
from fleet_parts import event, incoming, offline, status, telemetry
from sqlalchemy import func, select

from fleet.db import Database
from fleet.devices import (
    Device,
    DeviceEvent,
    Telemetry,
    command_phases,
    device_stats,
    device_tags,
    history,
    last_seen,
    list_devices,
    list_events,
    model_stats,
    per_model,
    prune,
    record_messages,
    remove_tag,
    select_devices,
    series,
    set_tags,
)
from sdk.errors import InputError


def _telemetry_rows(db: Database, device_id: str) -> list[int]:
    with db.session() as s:
        return list(s.scalars(select(Telemetry.seq).where(Telemetry.device_id == device_id).order_by(Telemetry.seq)))


def test_status_creates_and_updates_a_device_and_the_will_keeps_what_was_known(db: Database) -> None:
    with db.session() as s:
        record_messages(s, [incoming("d1", "status", status(ts=50.0, version=4), at=100.0)])
    with db.session() as s:
        record_messages(s, [incoming("d1", "status", status(ts=60.0, version=5, slot="B"), at=110.0)])
    with db.session() as s:
        d = s.get(Device, "d1")
        assert d is not None
        assert (d.first_seen, d.last_seen, d.online, d.state) == (100.0, 110.0, True, "online")
        assert (d.model_name, d.model_version, d.slot, d.status_ts) == ("digits", 5, "B", 60.0)
        assert d.capabilities["arch"] == "x86_64" and d.runtime["backend"] == "onnxruntime"
    with db.session() as s:  # the Last Will: the broker speaks, not the device
        record_messages(s, [incoming("d1", "status", offline(ts=50.0), at=200.0)])
    with db.session() as s:
        d = s.get(Device, "d1")
        assert d is not None
        assert (d.online, d.state, d.last_seen, d.model_version, d.status_at) == (False, "offline", 110.0, 5, 200.0)
    with db.session() as s:  # a device first heard of by its will still appears
        record_messages(s, [incoming("d2", "status", offline(), at=300.0)])
    with db.session() as s:
        d2 = s.get(Device, "d2")
        assert d2 is not None and (d2.state, d2.first_seen, d2.last_seen) == ("offline", 300.0, 300.0)


def test_statuses_in_one_batch_apply_in_arrival_order(db: Database) -> None:
    batch = [
        incoming("d1", "status", status(ts=10.0), at=1.0),
        incoming("d1", "status", offline(ts=5.0), at=2.0),
        incoming("d1", "status", status(ts=20.0, version=6), at=3.0),
    ]
    with db.session() as s:
        record_messages(s, batch)
    with db.session() as s:
        d = s.get(Device, "d1")
        assert d is not None and (d.online, d.model_version, d.last_seen) == (True, 6, 3.0)


def test_telemetry_replayed_or_out_of_order_is_stored_once(db: Database) -> None:
    with db.session() as s:
        record_messages(s, [incoming("d1", "telemetry", telemetry(seq), at=10.0) for seq in (1, 2, 3, 2, 5)])
    with db.session() as s:  # a whole batch replayed (after a failed commit), plus a late seq 4
        record_messages(s, [incoming("d1", "telemetry", telemetry(seq), at=11.0) for seq in (5, 4, 1)])
        record_messages(s, [incoming("d2", "telemetry", telemetry(1), at=11.0)])  # same seq, other device
    assert _telemetry_rows(db, "d1") == [1, 2, 3, 4, 5]
    assert _telemetry_rows(db, "d2") == [1]
    with db.session() as s:
        d = s.get(Device, "d1")  # telemetry alone creates the device, state unknown until its status
        assert d is not None and (d.state, d.first_seen, d.last_seen) == ("unknown", 10.0, 11.0)


def test_last_seen_never_moves_back(db: Database) -> None:
    with db.session() as s:
        record_messages(s, [incoming("d1", "telemetry", telemetry(1), at=50.0)])
    with db.session() as s:  # another fleet process commits an older message later
        record_messages(s, [incoming("d1", "telemetry", telemetry(2), at=40.0)])
    with db.session() as s:
        assert last_seen(s, ["d1", "nope"]) == {"d1": 50.0}


def test_events_deduplicated_and_history_read_from_them(db: Database) -> None:
    deploy = [
        event("r1-d1", "received", 1.0),
        event("r1-d1", "downloading", 2.0, url="http://x"),
        event("r1-d1", "active", 3.0, model={"name": "digits", "version": 6, "target": "t", "sha256": "ab" * 32}),
    ]
    failed = [event("r2-d1", "received", 4.0), event("r2-d1", "failed", 5.0), event("r2-d1", "rolled_back", 6.0)]
    with db.session() as s:
        record_messages(s, [incoming("d1", "events", e, at=10.0 + i) for i, e in enumerate(deploy + failed)])
        record_messages(s, [incoming("d1", "events", deploy[1], at=30.0)])  # redelivered: stored once
        record_messages(s, [incoming("d1", "events", event(None, "active", 0.5), at=5.0)])  # first install
        record_messages(s, [incoming("d1", "events", event("p1", "pong", 7.0), at=40.0)])
        record_messages(s, [incoming("d1", "events", event("r3-d1", "downloading", 8.0), at=41.0)])
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(DeviceEvent)) == 9
        h = history(s, "d1")
        assert [(d.cmd_id, d.outcome) for d in h] == [
            ("r3-d1", "in_progress"), ("r2-d1", "rolled_back"), ("r1-d1", "active"), (None, "active"),
        ]  # fmt: skip
        assert h[2].phases == ("received", "downloading", "active") and h[2].model is not None
        assert h[2].model["version"] == 6
        events = list_events(s, "d1")
        assert events[0].phase == "downloading" and events[0].cmd_id == "r3-d1"
        assert [e.phase for e in list_events(s, "d1", cmd_id="r2-d1")] == ["rolled_back", "failed", "received"]


def test_tags_groups_and_selectors(db: Database) -> None:
    with db.session() as s:
        record_messages(s, [incoming(d, "status", status(), at=1.0) for d in ("a", "b", "c")])
        set_tags(s, "a", {"group": "canary", "site": "lab"})
        set_tags(s, "b", {"group": "main", "site": "lab"})
    with db.session() as s:
        assert select_devices(s, "all") == ["a", "b", "c"]
        assert select_devices(s, "group=canary") == ["a"]
        assert select_devices(s, "tag=site=lab") == ["a", "b"]
        assert select_devices(s, "tag=site=mars") == []
        assert select_devices(s, "id=c,a") == ["a", "c"]
        with pytest.raises(InputError, match="unknown devices in selector: ghost, zz"):
            select_devices(s, "id=a,zz,ghost")
        for bad in ("", "tag=site", "group=", "name=a", "id=", "everything"):
            with pytest.raises(InputError, match="a device selector is one of"):
                select_devices(s, bad)
        assert [d.device_id for d in list_devices(s, selector="tag=site=lab")] == ["a", "b"]
    with db.session() as s:  # replace, remove
        assert set_tags(s, "a", {"group": "main"}) == {"group": "main"}
        assert remove_tag(s, "b", "site") is True
        assert remove_tag(s, "b", "site") is False
    with db.session() as s:
        assert device_tags(s) == {"a": {"group": "main"}, "b": {"group": "main"}}
        with pytest.raises(LookupError):
            set_tags(s, "ghost", {"group": "x"})
        for bad_tags in ({"": "x"}, {"k": ""}, {"a=b": "x"}, {"k": "v" * 201}, {"k": "a\x00b"}):
            with pytest.raises(InputError):
                set_tags(s, "a", bad_tags)
    with db.session() as s:
        assert device_tags(s, ["a"]) == {"a": {"group": "main"}}  # a refused update changed nothing


def test_list_devices_by_online(db: Database) -> None:
    with db.session() as s:
        record_messages(s, [incoming("a", "status", status(), at=1.0), incoming("b", "status", offline(), at=1.0)])
    with db.session() as s:
        assert [d.device_id for d in list_devices(s, online=True)] == ["a"]
        assert [d.device_id for d in list_devices(s, online=False)] == ["b"]


def test_model_stats_weighted_percentiles_error_rate_and_windows(db: Database) -> None:
    batch = [
        incoming("a", "telemetry", telemetry(1, count=100, errors=1, p=(1.0, 2.0, 4.0)), at=100.0),
        incoming("a", "telemetry", telemetry(2, count=300, errors=3, p=(3.0, 6.0, 8.0)), at=110.0),
        incoming("b", "telemetry", telemetry(1, count=0, errors=0, p=(None, None, None)), at=105.0),
        incoming("b", "telemetry", telemetry(2, count=100, errors=10, p=(5.0, 5.0, 5.0), version=6), at=106.0),
        incoming("c", "telemetry", telemetry(1, count=50, errors=0, p=(9.0, 9.0, 9.0)), at=200.0),  # outside
    ]
    with db.session() as s:
        record_messages(s, batch)
    with db.session() as s:
        v5 = model_stats(s, ["a", "b"], "digits", 5, 100.0, 150.0)
        assert (v5.messages, v5.count, v5.errors, v5.devices) == (3, 400, 4, 2)
        assert v5.error_rate == pytest.approx(0.01)
        assert (v5.p50_ms, v5.p95_ms, v5.p99_ms) == pytest.approx((2.5, 5.0, 7.0))
        assert model_stats(s, None, "digits", 5, 100.0, 300.0).count == 450
        assert model_stats(s, [], "digits", 5, 100.0, 300.0).messages == 0
        empty = model_stats(s, ["a"], "digits", 7, 100.0, 300.0)
        assert (empty.count, empty.error_rate, empty.p95_ms) == (0, None, None)
        # a long device list is split into chunks whose sums add up exactly
        many = model_stats(s, [f"x{i}" for i in range(1200)] + ["a"], "digits", 5, 0.0, 1000.0)
        assert (many.count, many.devices, many.p95_ms) == (400, 1, pytest.approx(5.0))
        models = per_model(s, 100.0, 150.0)
        assert [(m.name, m.version, m.stats.count) for m in models] == [("digits", 5, 400), ("digits", 6, 100)]
        assert device_stats(s, "b", 0.0, 1000.0).errors == 10
        with pytest.raises(InputError, match="until > since"):
            model_stats(s, None, "digits", 5, 10.0, 10.0)


def test_series_buckets(db: Database) -> None:
    with db.session() as s:
        record_messages(s, [incoming("a", "telemetry", telemetry(i, count=10), at=100.0 + 7 * i) for i in range(10)])
    with db.session() as s:
        buckets = series(s, 100.0, 160.0, 20.0, device_ids=["a"])
        assert [b.start for b in buckets] == [100.0, 120.0, 140.0]
        assert [b.stats.messages for b in buckets] == [3, 3, 3]  # at 100..163: 100,107,114 | 121,128,135 | 142..156
        assert series(s, 100.0, 160.0, 20.0, name="other")[0].stats.messages == 0
        with pytest.raises(InputError, match="bucket_s"):
            series(s, 0.0, 10.0, 0.0)
        with pytest.raises(InputError, match="choose a larger bucket_s"):
            series(s, 0.0, 1e9, 1.0)


def test_prune_deletes_old_telemetry_and_events_only(db: Database) -> None:
    with db.session() as s:
        record_messages(
            s, [incoming("a", "telemetry", telemetry(1), at=10.0), incoming("a", "telemetry", telemetry(2), at=90.0)]
        )
        record_messages(s, [incoming("a", "events", event("c", "received"), at=10.0)])
    with db.session() as s:
        assert prune(s, now=100.0, keep_s=50.0) == {"telemetry": 1, "events": 1}
        with pytest.raises(InputError):
            prune(s, now=100.0, keep_s=-1)
    assert _telemetry_rows(db, "a") == [2]
    with db.session() as s:
        assert s.get(Device, "a") is not None


def test_command_phases_are_what_each_command_reached(db: Database) -> None:
    events = [event("ro1-d1-deploy", "received", 1.0), event("ro1-d1-deploy", "active", 2.0),
              event("ro1-d2-deploy", "failed", 3.0), event(None, "active", 4.0)]  # fmt: skip
    with db.session() as s:
        record_messages(s, [incoming("d1" if "d1" in str(e["cmd_id"]) else "d2", "events", e, 10.0) for e in events])
    with db.session() as s:
        phases = command_phases(s, ["ro1-d1-deploy", "ro1-d2-deploy", "ro1-d3-deploy"])
    assert phases == {"ro1-d1-deploy": frozenset({"received", "active"}), "ro1-d2-deploy": frozenset({"failed"})}


def test_last_seen_moves_at_its_resolution_and_what_the_ingest_remembers_is_not_read_again(db: Database) -> None:
    with db.session() as s:
        first = record_messages(s, [incoming("d1", "telemetry", telemetry(1), at=100.0)])
    assert first.last_seen == {"d1": 100.0}
    with db.session() as s:  # under a second later: not written
        again = record_messages(s, [incoming("d1", "telemetry", telemetry(2), at=100.5)], first.last_seen)
    assert last_seen_of(db, "d1") == 100.0 and again.last_seen == {"d1": 100.0}
    with db.session() as s:  # another process moved it further meanwhile; a stale memory never moves it back
        s.execute(Device.__table__.update().values(last_seen=150.0))  # type: ignore[attr-defined]
    with db.session() as s:
        record_messages(s, [incoming("d1", "telemetry", telemetry(3), at=120.0)], {"d1": 100.0})
    assert last_seen_of(db, "d1") == 150.0
    with db.session() as s:  # a device the memory does not hold is read, and a new one created
        done = record_messages(s, [incoming("d1", "telemetry", telemetry(4), at=151.5),
                                   incoming("d2", "telemetry", telemetry(1), at=151.5)], {})  # fmt: skip
    assert done.last_seen == {"d1": 151.5, "d2": 151.5}
    assert (last_seen_of(db, "d1"), last_seen_of(db, "d2")) == (151.5, 151.5)
    assert _telemetry_rows(db, "d1") == [1, 2, 3, 4]


def last_seen_of(db: Database, device_id: str) -> float:
    with db.session() as s:
        return last_seen(s, [device_id])[device_id]


def test_telemetry_batches_of_nulls_and_integers_in_float_columns_are_stored_as_sent(db: Database) -> None:
    # PostgreSQL gets a batch as one array per column: an all-null column, integers where floats go and
    # the largest integer the contract lets through must all arrive as sent.
    rows = [
        incoming("d1", "telemetry", telemetry(1, p=(None, None, None), model=None, window_s=10, rss_mb=None), at=1.0),
        incoming("d1", "telemetry", telemetry(2, p=(1, 2, 3), model=None, count=2**63 - 1), at=2.0),
    ]
    with db.session() as s:
        assert record_messages(s, rows).telemetry == 2
    with db.session() as s:
        columns = (Telemetry.seq, Telemetry.p50_ms, Telemetry.p99_ms, Telemetry.model_name, Telemetry.window_s,
                   Telemetry.rss_mb, Telemetry.count)  # fmt: skip
        got = s.execute(select(*columns).order_by(Telemetry.seq)).all()
    assert [tuple(r) for r in got] == [
        (1, None, None, None, 10.0, None, 100),
        (2, 1.0, 3.0, None, 10.0, 100.0, 2**63 - 1),
    ]
