"""The thin I/O shell around the engine: one thread per fleet process that drives the rollouts it holds.

Every tick (``tick_s``, or at once after ``wake()``), for each pending/running/paused rollout, in ONE
transaction: take or renew its lease (``service.acquire_lease``: a conditional UPDATE, so a process that
died stops renewing and another takes over once ``lease_s`` has passed), load the stored state, read the
observations, ``decide``, ``apply``, and write the new state with one audit row per action. Only after the
commit are the commands published. A crash between the two loses nothing: the device is recorded as
``sent``, and a deploy with no event after ``resend_s`` is sent again with the same id, which the agent
de-duplicates; ids are deterministic per rollout and device, so a restarted server never sends a second
deploy id for one rollout.

Why a lease row and not PostgreSQL advisory locks: a session-level advisory lock belongs to one
connection, so it would pin a pooled connection per rollout and vanish silently with a reconnect; a
lease row works on SQLite too, and its expiry is visible in the database for an operator.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy.orm import Session

from fleet.db import Database, is_transient
from fleet.rollouts import service
from fleet.rollouts.engine import (
    ModelStats,
    Observations,
    RolloutState,
    SendDeploy,
    SendRollback,
    apply,
    decide,
    deploy_cmd_id,
    evaluate_gates,
    rollback_cmd_id,
)
from sdk.errors import InputError, TransportError
from sdk.mqtt_contract import SCHEMA, DeployCommand, Topics, encode_payload, parse_command

__all__ = ["Observer", "PahoPublisher", "Publisher", "RolloutDriver", "combine_stats", "deploy_payload"]

log = logging.getLogger(__name__)

# seconds after a wave starts before its baseline is cached: telemetry received just before the start may
# still sit in an ingest batch (``batch_wait_s``, 0.1 s) or a database retry
BASELINE_SETTLE_S = 10.0


class Publisher(Protocol):
    """Sends one command to one device (on its ``cmd`` topic, QoS 1)."""

    def publish(self, device_id: str, payload: Mapping[str, Any]) -> None:
        """Raises: TransportError when the command could not be handed to the broker."""


class Observer(Protocol):
    """What the rollout engine reads from the devices domain (events, telemetry, status)."""

    def phases(self, session: Session, cmd_ids: Sequence[str]) -> Mapping[str, frozenset[str]]:
        """The event phases seen for each command id (ids with no event may be left out)."""

    def last_seen(self, session: Session, device_ids: Sequence[str]) -> Mapping[str, float]:
        """When each device last sent anything (unix s); unknown devices left out."""

    def model_stats(
        self, session: Session, device_ids: Sequence[str], name: str, version: int, since: float, until: float
    ) -> ModelStats:
        """Requests, errors and p95 latency of model ``name`` ``version`` on those devices in ``[since, until)``."""

    def active_models(self, session: Session, device_ids: Sequence[str]) -> Mapping[str, tuple[str, int]]:
        """Each device's active model ``(name, version)``, from its last status; unknown left out."""

    def active_bundles(self, session: Session, device_ids: Sequence[str]) -> Mapping[str, tuple[str | None, float]]:
        """Each device's active bundle sha256 (None: no model) and when its last status arrived (unix s)."""


def combine_stats(parts: Sequence[ModelStats]) -> ModelStats:
    """Several stats as one: counts added, p95 as the request-weighted mean (an approximation)."""
    requests = sum(p.requests for p in parts)
    weighted = [(p.p95_ms, p.requests) for p in parts if p.p95_ms is not None and p.requests]
    total = sum(w for _, w in weighted)
    p95 = sum(v * w for v, w in weighted) / total if total else None
    return ModelStats(requests, sum(p.errors for p in parts), p95)


def deploy_payload(
    cmd_id: str,
    url: str,
    sha256: str,
    size: int | None,
    version: int,
    *,
    allow_downgrade: bool = False,
    issued_at: float | None = None,
) -> dict[str, Any]:
    """The ``deploy`` command a device gets, through the contract's ``DeployCommand``.

    ``size`` is exact (the device's download cap for it), ``sha256`` the archive's (the device checks the
    download against it), ``version`` informational (the signed manifest decides). ``issued_at`` (Unix
    seconds, now when None) lets the device refuse a replay of an old command (docs/mqtt.md, "Replay").
    """
    command = DeployCommand(
        id=cmd_id, url=url, sha256=sha256, size=size, version=version, allow_downgrade=allow_downgrade,
        issued_at=time.time() if issued_at is None else issued_at,
    )  # fmt: skip
    return command.to_payload()


def rollback_payload(cmd_id: str, issued_at: float | None = None) -> dict[str, Any]:
    issued = time.time() if issued_at is None else issued_at
    payload = {"schema": SCHEMA, "id": cmd_id, "type": "rollback", "issued_at": issued}
    parse_command(payload)  # the contract's bounds on the id
    return payload


class PahoPublisher:
    """Publishes commands with paho-mqtt 2 on ``edgeship/v1/<fleet>/<device>/cmd``, QoS 1, not retained.

    TLS is on with ``tls`` or any of the files: the broker is verified against ``ca_file`` (None: the
    system's CAs), and ``cert_file``/``key_file`` are presented for mutual TLS. The fleet server gives it the
    ingest's own CA, certificate, key and MQTT version (``fleet.wiring.rollout_driver``).

    A command to an offline device waits in its persistent session on Mosquitto; where the broker keeps
    none, the driver's resend covers it. ``wait=False`` connects in the background (a server that starts
    while its broker is down keeps serving).

    The broker away (restarting, unreachable): paho reconnects every 1 s, doubling up to 5 s (a broker back
    after a minute is reached within seconds, not paho's default 2 minutes). A command published meanwhile
    is kept, one per command id, and sent as soon as the connection is back, instead of waiting for the
    driver's resend (``resend_s``, typically a minute or more) to notice; the resend still covers a process
    that dies first. Command ids are idempotent on the device, so a kept command that also gets resent is
    harmless.
    """

    def __init__(
        self,
        host: str,
        port: int,
        fleet: str,
        *,
        client_id: str = "",
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        protocol: str = "3.1.1",
        timeout_s: float = 10.0,  # s to connect
        wait: bool = True,  # False: connect in the background, never raise here
    ) -> None:
        import paho.mqtt.client as paho

        if protocol not in ("5", "3.1.1"):
            raise InputError(f"protocol must be '5' or '3.1.1', got {protocol!r}")
        if (cert_file is None) != (key_file is None):
            raise InputError("a client certificate needs its key, and a key its certificate")
        self.fleet = fleet
        self._connected = threading.Event()
        self._lock = threading.Lock()  # ``_connected`` and ``_kept`` change together
        self._kept: dict[str, tuple[str, bytes]] = {}  # command id -> (topic, payload), in publish order
        version = paho.MQTTv5 if protocol == "5" else paho.MQTTv311
        self._client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version)
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls or ca_file is not None or cert_file is not None:
            try:  # ca_file None: the system's CAs
                self._client.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file)
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                raise InputError(f"broker TLS: cannot load {ca_file}, {cert_file}, {key_file}: {e}") from e
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.reconnect_delay_set(1, 5)
        if not wait:
            self._client.connect_async(host, port, keepalive=30)
            self._client.loop_start()
            return
        try:
            self._client.connect(host, port, keepalive=30)
        except OSError as e:
            raise TransportError(f"cannot reach the broker at {host}:{port}: {e}") from e
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self.close()
            raise TransportError(f"the broker at {host}:{port} did not accept the connection in {timeout_s} s")

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def kept(self) -> int:
        """Commands waiting for the broker to come back."""
        with self._lock:
            return len(self._kept)

    def publish(self, device_id: str, payload: Mapping[str, Any]) -> None:
        """Hand the command to the broker, or keep it until the connection is back (sent then, in order).

        Raises:
            TransportError: connected, yet paho refused the message (the driver's resend covers it).
        """
        topic, body = Topics(self.fleet, device_id).cmd, encode_payload(payload)
        with self._lock:
            if not self._connected.is_set():
                self._kept[str(payload.get("id"))] = (topic, body)  # a resend keeps its first place
                log.warning("broker unreachable: command %s to %s kept until it is back", payload.get("id"), device_id)
                return
        info = self._client.publish(topic, body, qos=1)
        if info.rc != 0:
            raise TransportError(f"publish to {device_id} failed (paho rc {info.rc}); it will be resent")

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("the broker refused the command publisher's connection: %s", reason)
            return
        with self._lock:
            self._connected.set()
            kept, self._kept = list(self._kept.items()), {}
        for cmd_id, (topic, body) in kept:
            if client.publish(topic, body, qos=1).rc != 0:
                log.warning("sending kept command %s failed; the driver's resend covers it", cmd_id)
        if kept:
            log.info("broker back: sent %d kept command(s)", len(kept))

    def _on_disconnect(self, *_args: Any) -> None:
        with self._lock:
            self._connected.clear()

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


class RolloutDriver:
    """Drives every active rollout whose lease it holds; ``start()``, ``wake()``, ``stop()``.

    Args:
        db: the fleet database.
        publisher: sends commands to devices.
        observer: reads events, telemetry and status (the devices domain).
        holder_id: this process's name in the leases (e.g. ``hostname-pid``); unique per process.
        lease_s: how long a lease lasts without renewal; another process takes over after that.
        tick_s: seconds between ticks (a breach is acted on within one tick of its data being stored).
        clock: unix seconds (tests pass a fake one).
    """

    def __init__(
        self,
        db: Database,
        publisher: Publisher,
        observer: Observer,
        holder_id: str,
        *,
        lease_s: float = 10.0,
        tick_s: float = 0.2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.publisher = publisher
        self.observer = observer
        self.holder_id = holder_id
        self.lease_s = lease_s
        self.tick_s = tick_s
        self.clock = clock
        self.errors = 0  # ticks that raised (logged); the next tick retries
        # rollout id -> ((wave, its start, baseline_s, active devices), the baseline): see ``_baseline``
        self._baselines: dict[int, tuple[tuple[Any, ...], ModelStats]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"rollouts-{self.holder_id}", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Tick now (ingest calls this after storing events or telemetry a rollout may be waiting for)."""
        self._wake.set()

    def stop(self, *, release: bool = True, timeout_s: float = 10.0) -> None:
        """Stop the thread; ``release`` gives the leases up so another process takes over at once
        (``release=False`` behaves as a process that died: the others wait for the leases to expire)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        if release:
            try:
                with self.db.session() as session:
                    service.release_leases(session, self.holder_id)
            except Exception as e:
                if not is_transient(e):
                    raise
                log.warning("database unreachable: leases of %s not given up; they expire in %.0f s", self.holder_id,
                            self.lease_s)  # fmt: skip

    def _run(self) -> None:
        away = False  # the database unreachable since the last tick that worked: said once, not every tick
        while not self._stop.is_set():
            try:
                self.tick()
                if away:
                    log.info("database reachable again: rollouts resume")
                away = False
            except Exception as e:
                self.errors += 1
                if not is_transient(e):
                    log.exception("rollout tick failed; retrying")
                elif not away:  # nothing was committed: the next tick retries the same decision
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    log.warning("database unreachable (%s); rollouts wait, retrying every tick", first[:300])
                    away = True
            self._wake.wait(self.tick_s)
            self._wake.clear()

    def tick(self, now: float | None = None) -> int:
        """Drive every active rollout once; returns how many this process held."""
        with self.db.session() as session:
            ids = service.active_rollout_ids(session)
        for gone in self._baselines.keys() - set(ids):  # ended rollouts
            del self._baselines[gone]
        held = 0
        for rollout_id in ids:
            if self._stop.is_set():
                break
            held += self.drive(rollout_id, self.clock() if now is None else now)
        return held

    def drive(self, rollout_id: int, now: float) -> bool:
        """One decision for one rollout, if this process holds (or takes) its lease; then publish."""
        with self.db.session() as session:
            if not service.acquire_lease(session, rollout_id, self.holder_id, now, self.lease_s):
                return False
            state = service.load_state(session, rollout_id)
            observations = self.observe(session, state, now)
            actions = decide(state, observations, now)
            new = apply(state, actions, now)
            first_sends = [a.device_id for a in actions if isinstance(a, SendDeploy) and not a.resend]
            previous = dict(self.observer.active_models(session, first_sends)) if first_sends else {}
            _, gates = evaluate_gates(new, observations, now)
            service.save_state(session, state, new, actions, now, holder=self.holder_id, gates=gates, previous=previous)
            sends = [a for a in actions if isinstance(a, (SendDeploy, SendRollback))]
            rows = service.device_rows(session, rollout_id, [a.device_id for a in sends]) if sends else {}
            commands = []
            for a in sends:
                row = rows[a.device_id]
                if isinstance(a, SendDeploy):
                    payload = deploy_payload(
                        row.deploy_cmd_id, row.bundle_url, row.bundle_sha256, row.bundle_size,
                        state.spec.release_version,
                    )  # fmt: skip
                else:
                    payload = rollback_payload(row.rollback_cmd_id)
                commands.append((a.device_id, payload))
        for device_id, payload in commands:  # after the commit: a crash here is covered by the resend
            try:
                self.publisher.publish(device_id, payload)
            except TransportError as e:
                log.warning("publishing %s to %s failed (%s); it will be resent", payload.get("id"), device_id, e)
            except Exception:
                log.exception("publishing %s to %s failed; it will be resent", payload.get("id"), device_id)
        return True

    def observe(self, session: Session, state: RolloutState, now: float) -> Observations:
        """Read what ``decide`` needs for this tick: phases of outstanding commands, and the current wave's
        last-seen times and telemetry (new version since each device switched, previous before the wave)."""
        cmd_ids = [deploy_cmd_id(state.id, d.device_id) for d in state.devices if d.status == "sent"]
        cmd_ids += [rollback_cmd_id(state.id, d.device_id) for d in state.devices if d.rollback == "sent"]
        phases = dict(self.observer.phases(session, cmd_ids)) if cmd_ids else {}
        serving, reverted = self._statuses(session, state)
        if state.state != "running":
            return Observations(phases=phases, serving=serving, reverted=reverted)
        active = [d for d in state.in_wave() if d.status == "active"]
        ids = [d.device_id for d in active]
        if not ids:
            return Observations(phases=phases, serving=serving, reverted=reverted)
        spec = state.spec
        since = min(d.done_at or now for d in active)
        new = self.observer.model_stats(session, ids, spec.release_name, spec.release_version, since, now + 1e-6)
        previous = self._baseline(session, state, ids, now)
        return Observations(phases, self.observer.last_seen(session, ids), new, previous, serving, reverted)

    def _baseline(self, session: Session, state: RolloutState, ids: list[str], now: float) -> ModelStats:
        """The previous versions' telemetry on ``ids`` in the ``baseline_s`` before the wave started.

        Its window ends when the wave started, so once that moment is ``BASELINE_SETTLE_S`` in the past (the
        ingest has committed what it received before it) the answer cannot change for the same devices: it
        is computed once per rollout, wave and set of active devices, not on every tick of the soak.
        """
        start = state.wave_started_at or now
        key = (state.wave, start, state.spec.baseline_s, tuple(ids))
        cached = self._baselines.get(state.id)
        if cached is not None and cached[0] == key:
            return cached[1]
        rows = service.device_rows(session, state.id, ids)
        by_version: dict[tuple[str, int], list[str]] = {}
        for device_id, row in rows.items():
            if row.previous_name is not None and row.previous_version is not None:
                by_version.setdefault((row.previous_name, row.previous_version), []).append(device_id)
        since = start - state.spec.baseline_s
        previous = combine_stats(
            [
                self.observer.model_stats(session, devices, name, version, since, start)
                for (name, version), devices in by_version.items()
            ]
        )
        if now - start >= BASELINE_SETTLE_S:
            self._baselines[state.id] = (key, previous)
        return previous

    def _statuses(self, session: Session, state: RolloutState) -> tuple[frozenset[str], frozenset[str]]:
        """``Observations.serving`` and ``.reverted``: what the devices' own statuses say of outstanding commands."""
        waiting = [d for d in state.devices if d.status == "sent" or d.rollback == "sent"]
        if not waiting:
            return frozenset(), frozenset()
        ids = [d.device_id for d in waiting]
        rows = service.device_rows(session, state.id, ids)
        bundles = self.observer.active_bundles(session, ids)
        serving, reverted = set(), set()
        for d in waiting:
            row, (sha, status_at) = rows.get(d.device_id), bundles.get(d.device_id, (None, 0.0))
            if row is None:
                continue
            if d.status == "sent" and sha == row.bundle_sha256:
                serving.add(d.device_id)
            if (
                d.rollback == "sent"
                and sha != row.bundle_sha256
                and d.rollback_sent_at is not None
                and status_at > d.rollback_sent_at
            ):
                reverted.add(d.device_id)
        return frozenset(serving), frozenset(reverted)
