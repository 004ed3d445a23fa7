"""The driver on a real SQLite database: leases between two drivers, takeover after a kill, restarts that
never send a second deploy id, publish failures resent with the same id, a breach acted on within 1 s, and
the paho publisher through a real Mosquitto."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from rollout_parts import SHA, MemoryObserver, RecordingPublisher, bundles, resolver
from sqlalchemy import select

from fleet.db import Database
from fleet.rollouts import service
from fleet.rollouts.driver import PahoPublisher, RolloutDriver
from fleet.rollouts.engine import ModelStats
from fleet.rollouts.spec import parse_spec
from fleet.rollouts.tables import Rollout, RolloutAudit, RolloutDevice
from sdk.errors import TransportError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "device_runtime" / "agent"))
from agent_parts import Broker, BrokerPool, free_port

DEVICES = [f"dev{i}" for i in range(8)]


def create(db: Database, gates: tuple[str, ...] = (), waves: str = "1,50%,100%", soak: str = "10s") -> int:
    spec = parse_spec("m:2", "all", waves, soak=soak, gates=gates, rate_per_s=100, resend="20s")
    with db.session() as s:
        return service.create_rollout(s, spec, resolver(DEVICES), bundles(), 1000.0)


class Devices:
    """Answers every deploy the publisher got with events in the observer (as the ingest would store them)."""

    def __init__(self, publisher: RecordingPublisher, observer: MemoryObserver, fail: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.publisher, self.observer, self.fail, self.seen = publisher, observer, set(fail), 0

    def answer(self) -> None:
        with self.publisher.lock:
            new = self.publisher.sent[self.seen :]
            self.seen = len(self.publisher.sent)
        for device_id, payload in new:
            if payload["type"] == "deploy":
                self.observer.event(payload["id"], "received", "failed" if device_id in self.fail else "active")
            else:
                self.observer.event(payload["id"], "received", "rolled_back")
            self.observer.seen[device_id] = time.time()


def state(db: Database, rollout_id: int) -> str:
    with db.session() as s:
        row = s.get(Rollout, rollout_id)
        assert row is not None
        return row.state


def test_a_driver_takes_a_rollout_to_completion_and_audits_every_decision(db: Database) -> None:
    rollout_id = create(db, gates=("health_failures=0", "p95_latency<=1.2x"))
    publisher, observer = RecordingPublisher(), MemoryObserver()
    observer.models = {d: ("m", 1) for d in DEVICES}
    observer.stats = {("m", 1): ModelStats(100, 0, 10.0), ("m", 2): ModelStats(100, 0, 11.0)}
    devices = Devices(publisher, observer)
    driver = RolloutDriver(db, publisher, observer, "a")
    now = 1000.0
    while state(db, rollout_id) != "completed" and now < 1200:
        now += 1
        driver.tick(now)
        devices.answer()
    assert state(db, rollout_id) == "completed"
    assert sorted(publisher.ids(kind="deploy")) == sorted(f"ro{rollout_id}-{d}-deploy" for d in DEVICES)
    deploy = publisher.sent[0][1]
    assert (deploy["sha256"], deploy["size"], deploy["version"]) == (SHA, 1234, 2)
    with db.session() as s:
        rows = s.scalars(select(RolloutDevice)).all()
        assert {(r.status, r.previous_name, r.previous_version) for r in rows} == {("active", "m", 1)}
        actions = [a.action for a in s.scalars(select(RolloutAudit).order_by(RolloutAudit.id))]
        view = service.rollout_view(s, rollout_id)
    assert actions.count("AdvanceWave") == 3 and actions[-1] == "Complete" and actions.count("SendDeploy") == 8
    assert {g["gate"]: g["ok"] for g in view["gates"]} == {"health_failures=0": True, "p95_latency<=1.2x": True}


def test_two_drivers_one_database_only_the_lease_holder_drives_and_the_other_takes_over(db: Database) -> None:
    create(db)
    publisher, observer = RecordingPublisher(), MemoryObserver()
    a = RolloutDriver(db, publisher, observer, "a", lease_s=5.0)
    b = RolloutDriver(db, publisher, observer, "b", lease_s=5.0)
    assert a.tick(1001.0) == 1
    assert b.tick(1001.5) == 0
    assert a.tick(1002.0) == 1
    assert b.tick(1006.9) == 0  # a renewed at 1002: until 1007
    # a is killed: it stops renewing; b waits for the lease to run out, then drives
    Devices(publisher, observer).answer()
    assert b.tick(1007.1) == 1
    assert a.tick(1007.2) == 0  # and a, back from the dead, does not
    with db.session() as s:
        holders = {r.holder for r in s.scalars(select(RolloutAudit)) if r.holder not in (None, "operator")}
    assert holders == {"a", "b"}
    # a clean stop gives the lease up at once
    b.stop()
    assert a.tick(1007.3) == 1


def test_a_driver_restarted_mid_rollout_never_sends_a_second_deploy_id(db: Database) -> None:
    rollout_id = create(db, waves="2,100%", soak="0s")
    publisher, observer = RecordingPublisher(), MemoryObserver()
    first = RolloutDriver(db, publisher, observer, "host-1")
    first.tick(1001.0)
    first.tick(1002.0)  # 2 deploys sent, no answer yet
    assert len(publisher.ids(kind="deploy")) == 2
    # killed; a new process (another holder id) starts after the lease ran out, devices still silent
    second = RolloutDriver(db, publisher, observer, "host-2", lease_s=10.0)
    now = 1013.0
    for _ in range(40):
        now += 1
        second.tick(now)
    Devices(publisher, observer).answer()
    for _ in range(5):
        now += 1
        second.tick(now)
        Devices(publisher, observer).answer()
    per_device: dict[str, set[str]] = {}
    for device_id, payload in publisher.sent:
        if payload["type"] == "deploy":
            per_device.setdefault(device_id, set()).add(payload["id"])
    assert all(ids == {f"ro{rollout_id}-{d}-deploy"} for d, ids in per_device.items())
    assert len(publisher.ids("dev0", "deploy")) >= 2  # resent after 20 s of silence, same id


def test_a_publish_that_fails_after_the_commit_is_resent_with_the_same_id(db: Database) -> None:
    rollout_id = create(db, waves="1,100%")

    class Flaky(RecordingPublisher):
        fails = 1

        def publish(self, device_id: str, payload: Any) -> None:
            if self.fails:
                self.fails -= 1
                raise TransportError("broker away")
            super().publish(device_id, payload)

    publisher, observer = Flaky(), MemoryObserver()
    driver = RolloutDriver(db, publisher, observer, "a")
    driver.tick(1001.0)
    driver.tick(1002.0)  # the canary's deploy is recorded as sent, the publish failed
    assert publisher.sent == []
    driver.tick(1023.0)
    assert publisher.ids("dev0") == [f"ro{rollout_id}-dev0-deploy"]


def test_a_breach_is_acted_on_within_one_second_by_the_running_thread(db: Database) -> None:
    rollout_id = create(db, gates=("error_rate<=1%",), waves="1,100%", soak="1h")
    publisher, observer = RecordingPublisher(), MemoryObserver()
    devices = Devices(publisher, observer)
    driver = RolloutDriver(db, publisher, observer, "a", tick_s=0.2)
    driver.start()
    try:
        deadline = time.monotonic() + 10
        while not publisher.ids("dev0", "deploy") and time.monotonic() < deadline:
            time.sleep(0.02)
        devices.answer()
        while time.monotonic() < deadline:
            with db.session() as s:
                if s.scalar(select(RolloutDevice.status).where(RolloutDevice.device_id == "dev0")) == "active":
                    break
            time.sleep(0.02)
        observer.stats = {("m", 2): ModelStats(100, 30, 5.0)}  # the breaching telemetry is stored
        t0 = time.monotonic()
        driver.wake()
        while not publisher.ids("dev0", "rollback") and time.monotonic() < t0 + 5:
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
    finally:
        driver.stop()
    assert publisher.ids("dev0", "rollback") == [f"ro{rollout_id}-dev0-rollback"]
    assert elapsed < 1.0
    assert state(db, rollout_id) == "paused"


def test_the_paho_publisher_sends_commands_through_a_real_mosquitto(tmp_path: Path) -> None:
    pool = BrokerPool(tmp_path)
    broker: Broker = pool.make()
    got: list[tuple[str, dict[str, Any]]] = []
    ready = threading.Event()
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="test-sub")
    sub.on_connect = lambda c, *_a: (c.subscribe("edgeship/v1/lab/+/cmd", qos=1), ready.set())
    sub.on_message = lambda _c, _u, m: got.append((m.topic, json.loads(m.payload)))
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    try:
        assert ready.wait(10)
        time.sleep(0.2)
        publisher = PahoPublisher("127.0.0.1", broker.port, "lab", client_id="fleet-test")
        publisher.publish("dev1", {"schema": 1, "id": "ro1-dev1-rollback", "type": "rollback"})
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        publisher.close()
        with pytest.raises(TransportError, match="cannot reach the broker"):
            PahoPublisher("127.0.0.1", free_port(), "lab", timeout_s=1)
    finally:
        sub.loop_stop()
        sub.disconnect()
        pool.stop_all()
    assert got == [("edgeship/v1/lab/dev1/cmd", {"schema": 1, "id": "ro1-dev1-rollback", "type": "rollback"})]


def test_the_paho_publisher_keeps_commands_while_the_broker_restarts_and_sends_them_when_it_is_back(
    tmp_path: Path,
) -> None:
    pool = BrokerPool(tmp_path)
    broker: Broker = pool.make()
    got: list[tuple[str, dict[str, Any]]] = []
    ready = threading.Event()
    # a persistent session (the broker saves it across its restart): what is published while this
    # subscriber is still reconnecting waits for it
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="test-sub-restart", clean_session=False)
    sub.on_connect = lambda c, *_a: (c.subscribe("edgeship/v1/lab/+/cmd", qos=1), ready.set())
    sub.on_message = lambda _c, _u, m: got.append((m.topic, json.loads(m.payload)))
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    publisher = PahoPublisher("127.0.0.1", broker.port, "lab", client_id="fleet-test-restart")
    try:
        assert ready.wait(10)
        time.sleep(0.2)
        broker.stop()
        deadline = time.monotonic() + 10
        while publisher.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not publisher.connected
        first = {"schema": 1, "id": "ro1-dev1-rollback", "type": "rollback"}
        second = {"schema": 1, "id": "ro1-dev2-rollback", "type": "rollback"}
        publisher.publish("dev1", first)  # kept, not raised: the driver need not wait for its resend
        publisher.publish("dev2", second)
        publisher.publish("dev1", first)  # the same id twice is kept once
        assert publisher.kept == 2
        broker.start()
        deadline = time.monotonic() + 15
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert publisher.connected and publisher.kept == 0
        time.sleep(0.3)  # a duplicate would show now
    finally:
        publisher.close()
        sub.loop_stop()
        sub.disconnect()
        pool.stop_all()
    assert got == [("edgeship/v1/lab/dev1/cmd", first), ("edgeship/v1/lab/dev2/cmd", second)]


def test_the_database_unreachable_for_a_while_the_driver_says_so_once_and_carries_on(
    pg_proxied: Any, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(pg_proxied.url)
    publisher, observer = RecordingPublisher(), MemoryObserver()
    devices = Devices(publisher, observer)
    driver = RolloutDriver(db, publisher, observer, "a", tick_s=0.05)
    try:
        rollout_id = create(db, waves="1,100%", soak="1s")
        with caplog.at_level(logging.INFO, logger="fleet.rollouts.driver"):
            driver.start()
            deadline = time.monotonic() + 10
            while not publisher.sent and time.monotonic() < deadline:
                time.sleep(0.02)
            assert publisher.ids(kind="deploy") == [f"ro{rollout_id}-dev0-deploy"]  # the canary
            pg_proxied.proxy.stop()
            devices.answer()  # the canary's events, "stored" while the database is away
            deadline = time.monotonic() + 10
            while driver.errors < 5 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert driver.errors >= 5 and driver._thread is not None and driver._thread.is_alive()
            pg_proxied.proxy.start()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                devices.answer()
                if state(db, rollout_id) == "completed":
                    break
                time.sleep(0.05)
        assert state(db, rollout_id) == "completed"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "database unreachable" in r.message]
        assert len(warnings) == 1 and not any(r.exc_info for r in caplog.records), caplog.text  # once, no traceback
        assert "rollouts resume" in caplog.text
        assert sorted(publisher.ids(kind="deploy")) == sorted(f"ro{rollout_id}-{d}-deploy" for d in DEVICES)
    finally:
        driver.stop()
        db.close()


def test_the_baseline_is_read_once_per_wave_and_set_of_active_devices_not_on_every_tick(db: Database) -> None:
    baseline_reads: list[tuple[float, tuple[str, ...], float, float]] = []  # (tick, devices, since, until)
    clock = [1000.0]

    class Counting(MemoryObserver):
        def model_stats(
            self, session: Any, device_ids: Any, name: str, version: int, since: float, until: float
        ) -> ModelStats:
            if version == 1:
                baseline_reads.append((clock[0], tuple(sorted(device_ids)), since, until))
            return super().model_stats(session, device_ids, name, version, since, until)

    observer = Counting(models=dict.fromkeys(DEVICES, ("m", 1)))
    observer.stats[("m", 1)] = ModelStats(1000, 0, 10.0)
    publisher = RecordingPublisher()
    devices = Devices(publisher, observer)
    rollout_id = create(db, gates=("p95_latency<=1.2x",), waves="1,100%", soak="60s")
    driver = RolloutDriver(db, publisher, observer, "a", lease_s=600, clock=lambda: clock[0])
    while clock[0] < 1200 and state(db, rollout_id) != "completed":
        driver.tick()
        devices.answer()
        clock[0] += 1.0
    assert state(db, rollout_id) == "completed"
    canary = [r for r in baseline_reads if r[1] == ("dev0",)]
    # the canary's wave started at 1000: read on each tick until its start is BASELINE_SETTLE_S (10 s) old,
    # then never again through the 60 s soak
    assert [r[0] for r in canary] == [float(t) for t in range(1003, 1011)]
    assert {(r[2], r[3]) for r in canary} == {(1000.0 - 3600, 1000.0)}
    # the next wave: its own window, read again as its devices become active, then cached as well
    second = [r for r in baseline_reads if r[1] != ("dev0",)]
    start = second[0][3]
    assert start > 1060 and {(r[2], r[3]) for r in second} == {(start - 3600, start)}
    assert second[-1][1] == tuple(DEVICES[1:]) and second[-1][0] <= start + 10
    assert len(second) <= 12, second
