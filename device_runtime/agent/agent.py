"""The device agent: serves the active model, talks MQTT to the fleet, and applies OTA updates safely.

The ``Agent`` is the wiring: commands in (de-duplicated, journaled, queued for the OTA thread), events and
telemetry out through its ``Link``, the serving model for local callers. The deployments themselves are
the ``Deployer``'s (``device_runtime.agent.deployer``: the state machine, read top to bottom there).

One ``Agent`` owns one state directory::

    STATE_DIR/pointer.json          which A/B slot is active (device_runtime.agent.slots)
    STATE_DIR/slots/{A,B}/          the installed bundles
    STATE_DIR/deploy.json           the OTA operation in progress (device_runtime.agent.ota.Deployment)
    STATE_DIR/commands.jsonl        command ids seen (de-duplication, replay), OTA commands not yet run
    STATE_DIR/bad.json              sha256 of bundles that failed verification, load or health check
    STATE_DIR/config.json           settings changed by ``config`` commands
    STATE_DIR/downloads/            the bundle being downloaded (``.part`` resumed after a restart)
    STATE_DIR/outbox.sqlite         telemetry and events waiting for the broker (device_runtime.agent.outbox)

Processes and threads: the MQTT link and its outbox run in the link process (``device_runtime.agent.linkproc``;
here its ``edgeship-link`` thread reads it and ``edgeship-cmd`` runs the commands it hands over), or with
``link_process=False`` on ``DeviceLink``'s threads plus ``edgeship-events`` (appends events to the outbox
in order, so no step waits for its fsync). ``edgeship-telemetry``, ``edgeship-ota`` (deployments and
rollbacks, one at a time, in the order they arrived; a deployment's download, verification and
installation run in the staging helper process, ``device_runtime.agent.staging``), ``edgeship-health`` (trial
loads and health checks, under a timeout). Local
callers use ``Agent.predict`` from any thread, or HTTP when ``AgentConfig.serve`` is set (the
``ModelServer``'s threads); a swap never fails one of them (see ``_serving.Serving``).

Test hook: with ``EDGESHIP_AGENT_CRASH_AT=<point>`` in the environment the process SIGKILLs itself at
that point of a deployment; the points are ``CRASH_POINTS`` (``device_runtime.agent.crash``; docs/ota.md
describes each).
"""

from __future__ import annotations

import collections
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime import _sysinfo
from device_runtime.agent._records import Journal, read_json, write_json
from device_runtime.agent._serving import Serving
from device_runtime.agent.config import AgentConfig
from device_runtime.agent.crash import CRASH_ENV, CRASH_POINTS
from device_runtime.agent.deployer import DOWNLOADS, Deployer
from device_runtime.agent.freshness import FreshnessStore
from device_runtime.agent.link import Link
from device_runtime.agent.linkproc import LinkProcess
from device_runtime.agent.mqtt import DeviceLink
from device_runtime.agent.ota import command_refusal, deployment_from_command
from device_runtime.agent.outbox import Outbox
from device_runtime.agent.trust import TrustStore
from device_runtime.errors import StateError
from device_runtime.metrics import Metrics
from device_runtime.model import Model
from device_runtime.serve import ModelServer
from sdk.errors import EdgeshipError, TransportError, TrustRootError
from sdk.fsutil import make_private_dir
from sdk.mqtt_contract import (
    CommandError,
    command_ref,
    event_payload,
    parse_cancel,
    parse_command,
    parse_command_times,
    parse_config,
    parse_freshness,
    parse_trust,
)
from sdk.trustroot import TrustRoot

__all__ = ["CRASH_ENV", "CRASH_POINTS", "Agent", "AgentConfig"]

log = logging.getLogger(__name__)

_COMMANDS_FILE = "commands.json"  # the journal of older agents, migrated to _JOURNAL_FILE
_JOURNAL_FILE = "commands.jsonl"
_CONFIG_FILE = "config.json"
_OUTBOX = "outbox.sqlite"


class Agent:
    """The long-running device agent. ``start()``, then ``predict`` from any thread; ``stop()`` at the end.

    Raises (from the constructor; with ``link_process`` the outbox and TLS errors come from ``start()``):
        StateError: the state directory or its outbox cannot be opened.
        TransportError: the TLS files cannot be read.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: monotonic seconds (intervals, uptime); ``wall_clock``: Unix seconds, the device's
        clock, which may jump (command ``issued_at``/``expires_at`` checks, the journal's horizon, the
        events' ``ts``). No timeout is measured on the wall clock."""
        self.config = config
        self._clock = clock
        self._wall_clock = wall_clock
        self._started_at = clock()
        self.state_dir = Path(config.state_dir).absolute()
        # What keeps the state directory from being written (a full or read-only disk): the agent still
        # serves the model it has and reports this once connected (``start``); deployments fail.
        self._state_problem: str | None = None
        try:
            make_private_dir(self.state_dir)  # slots, outbox, journal: the owner's alone (0700)
            make_private_dir(self.state_dir / DOWNLOADS)
        except OSError as e:
            if not self.state_dir.is_dir():  # nothing installed to serve: nothing to keep going for
                raise StateError(f"cannot create {self.state_dir}: {e.strerror or e}") from e
            self._state_problem = f"cannot create {self.state_dir / DOWNLOADS}: {e.strerror or e}"
        self._journal = Journal(
            self.state_dir / _JOURNAL_FILE,
            legacy=self.state_dir / _COMMANDS_FILE,
            max_done=config.max_remembered_commands,
            max_age_s=config.max_command_age_s,
            clock=wall_clock,
        )
        self._settings: dict[str, Any] = {"telemetry_interval_s": config.telemetry_interval_s, "log_level": None}
        saved = read_json(self.state_dir / _CONFIG_FILE, {})
        if isinstance(saved, dict):
            self._settings.update({k: v for k, v in saved.items() if k in self._settings})
        # One Metrics for every model the agent serves: telemetry counts Agent.predict and HTTP calls
        # alike, across swaps (a health check is not counted).
        self._metrics = Metrics()
        self._serving = Serving()
        self._ota_queue = _OtaQueue()
        self._stop = threading.Event()
        self._wake_telemetry = threading.Event()
        self._threads: list[threading.Thread] = []
        self._events: queue.SimpleQueue[dict[str, Any] | threading.Event | None] = queue.SimpleQueue()
        self._event_writer: threading.Thread | None = None
        self.server: ModelServer | None = None  # the local HTTP endpoint, with ``config.serve``
        self._capabilities = _sysinfo.capabilities(config.runtimes)
        self._outbox: Outbox | None = None
        self.link: Link
        if config.link_process:  # opened by start(), which raises StateError if its outbox is unusable
            self.link = LinkProcess(
                config.mqtt,
                self.state_dir / _OUTBOX,
                config.outbox_max_messages,
                status=self._status,
                on_command=self._on_command,
            )
        else:
            self._use_device_link([])
        self._trust = TrustStore(self.state_dir, config.trust, config.trust_root, datetime.now(timezone.utc))
        self._freshness = FreshnessStore(
            self.state_dir, self._trust.root, datetime.now(timezone.utc), config.freshness_grace_s
        )
        self._deployer = Deployer(
            config,
            self.state_dir,
            journal=self._journal,
            serving=self._serving,
            metrics=self._metrics,
            capabilities=self._capabilities,
            stop=self._stop,
            report=self._event,
            flush_reports=self._flush_events,
            publish_status=lambda: self.link.publish_status(),  # the link may change in start()
            trust=lambda: self._trust.root,
        )
        self._apply_log_level()

    # -- public API --------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the active model (or the initial bundle), connect, and resume an interrupted deployment.

        Returns at once when the broker is down: the link keeps retrying. With ``config.serve`` the HTTP
        endpoint is up (serving the model, or 503 while there is none) before the broker is contacted.

        Raises:
            RuntimeError: already started.
            StateError: the outbox cannot be used (``link_process``).
            TransportError: the TLS files cannot be read (``link_process``), or ``config.serve`` and the
                HTTP address cannot be bound (the agent is stopped).
        """
        if self._threads:
            raise RuntimeError("Agent.start() called twice")
        if isinstance(self.link, LinkProcess):
            try:
                self.link.open()  # events go to it from now on (a pipe write each: no thread of their own)
            except StateError as e:
                log.warning("%s; running the MQTT link on the agent's threads instead", e)
                self._use_device_link(self.link.unconfirmed_events())
        if isinstance(self.link, DeviceLink):  # each event is an outbox transaction: on a thread, in order
            self._event_writer = threading.Thread(target=self._write_events, name="edgeship-events", daemon=True)
            self._event_writer.start()
        self._deployer.start()
        record = self._deployer.read_record()
        self._deployer.boot(record)
        if self.config.serve:
            server = ModelServer(
                self._current_model, self.config.serve_host, self.config.serve_port, token=self.config.serve_token,
                allow_hosts=self.config.serve_allow_hosts, insecure_no_auth=self.config.serve_insecure_no_auth,
                header_timeout_s=self.config.serve_header_timeout_s,
            )  # fmt: skip
            try:
                server.start()
            except TransportError:
                self.stop()
                raise
            self.server = server
        self.link.start()
        self._check_state_dir()
        self._check_freshness()
        self._ota_queue.put(self._deployer.start_stager)  # before any deployment, while the agent comes up
        for name, target in (("edgeship-telemetry", self._run_telemetry), ("edgeship-ota", self._run_ota)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        if record is not None:
            found = record
            self._ota_queue.put(lambda: self._deployer.resume(found))
        for entry in self._journal.unfinished():  # OTA commands received but not started before a restart
            if record is None or entry["id"] != record.cmd_id:
                self._ota_queue.put(functools.partial(self._run_command, entry.get("cmd") or {}), entry["id"])

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the threads, publish ``offline``, and close the model and the outbox.

        A deployment in progress is interrupted at its next step; its record stays in ``deploy.json`` and
        the next start resumes it.
        """
        self._stop.set()
        self._wake_telemetry.set()
        self._ota_queue.put(None)
        self._deployer.stop_staging()  # a staging job in progress ends like after a crash; resumed at start
        for thread in self._threads:
            thread.join(timeout=timeout_s)
        self._deployer.stop_staging()  # (one the OTA thread was starting just then)
        if self._event_writer is not None:  # every event reported so far goes into the outbox
            self._events.put(None)
            self._event_writer.join(timeout=timeout_s)
            self._event_writer = None
        self.link.stop()
        if self.server is not None:
            self.server.stop()
        self._deployer.close(timeout_s)
        self._serving.swap(None)
        if self._outbox is not None:
            self._outbox.close()

    def _check_state_dir(self) -> None:
        """Report (a ``failed`` event without a command) when the state directory cannot be written."""
        probe = self.state_dir / ".write-check"
        try:
            write_json(probe, {}, durable=False)
            probe.unlink(missing_ok=True)
        except (StateError, OSError) as e:
            self._state_problem = self._state_problem or str(e)
        if self._state_problem is not None:
            log.error("the state directory cannot be written: %s", self._state_problem)
            self._event(
                None, "failed", f"the state directory cannot be written ({self._state_problem}); serving the "
                "installed model, commands that need the journal are refused", error="StateError",
                model=self.active_model,
            )  # fmt: skip

    def _use_device_link(self, events: list[dict[str, Any]]) -> None:
        """Run the link on this process's threads: a ``DeviceLink`` over the outbox, ``events`` queued in it
        first (what a link process that could not start had been given).

        Raises:
            StateError: the outbox cannot be used.
        """
        try:
            self._outbox = Outbox(self.state_dir / _OUTBOX, max_messages=self.config.outbox_max_messages)
        except StateError as e:  # a read-only or full state directory: report from memory, keep serving
            log.error("%s; keeping telemetry and events in memory only (lost at a restart)", e)
            self._state_problem = self._state_problem or str(e)
            self._outbox = Outbox(":memory:", max_messages=self.config.outbox_max_messages)
        self.link = DeviceLink(self.config.mqtt, self._outbox, status=self._status, on_command=self._on_command)
        for payload in events:
            self.link.publish_event(payload)

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the active model once; safe from any thread, also during a swap.

        Raises:
            StateError: no model is active yet.
            InputError: inputs do not match the model's declared inputs.
            BackendError: the runtime failed.
        """
        active = self._serving.acquire()
        try:
            return active.model.predict(inputs)  # counted in the shared metrics by the model
        finally:
            self._serving.release(active)

    def _current_model(self) -> Model:
        """The ``ModelServer``'s provider: the model serving now. A request that took the model just
        before a swap finishes on it (``Model.close`` waits for it) or, if it was already closed, the
        server retries it once on the new one."""
        active = self._serving.active
        if active is None:
            raise StateError("no model is active on this device yet")
        return active.model

    @property
    def serve_url(self) -> str | None:
        """``http://host:port`` of the local HTTP endpoint, or None when not serving."""
        return None if self.server is None else self.server.url

    @property
    def active_model(self) -> dict[str, Any] | None:
        """``{"name", "version", "target", "sha256"}`` of the model serving now, or None."""
        active = self._serving.active
        return None if active is None else active.info.model()

    @property
    def active_slot(self) -> str | None:
        active = self._serving.active
        return None if active is None else active.slot

    @property
    def telemetry_interval_s(self) -> float:
        return float(self._settings["telemetry_interval_s"])

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no OTA operation is queued or running; False after ``timeout_s``."""
        done = threading.Event()
        self._ota_queue.put(done.set)
        return done.wait(timeout_s)

    # -- status and telemetry ----------------------------------------------------------------------

    def _status(self) -> dict[str, Any]:
        active = self._serving.active
        runtime: dict[str, Any] = {"agent": _edgeship_version()}
        if active is not None and not active.closed:
            try:
                info = active.model.backend_info
                runtime.update(backend=info.get("backend"), version=info.get("runtime_version"))
            except EdgeshipError:
                pass
        deployment = self._deployer.deployment
        return {
            "model": None if active is None else active.info.model(),
            "slot": None if active is None else active.slot,
            "runtime": runtime,
            "capabilities": self._capabilities,
            "uptime_s": round(self._clock() - self._started_at, 1),
            "system_uptime_s": _sysinfo.system_uptime_s(),
            "deployment": None if deployment is None else {"cmd_id": deployment.cmd_id, "phase": deployment.phase},
            "trust": self.trust_status(),
        }

    @property
    def trust_root(self) -> TrustRoot:
        """The trust root in force (bundle keys, pins, signed downgrades)."""
        return self._trust.root

    def trust_status(self) -> dict[str, Any]:
        """What the status reports about trust and freshness (device clock): the root's version and expiry,
        and whether the model served now is past its bundle's ``expires`` (it keeps serving: a device is
        never left with nothing; the fleet sees it and deploys a fresh bundle)."""
        now = datetime.now(timezone.utc)
        root = self._trust.root
        active = self._serving.active
        expires = None if active is None else active.model.manifest.expires_at()
        status: dict[str, Any] = {
            "root_version": root.version,
            "root_expires": root.expires,
            "root_expired": root.expired(now),
            "model_expired": expires is not None and expires <= now,
        }
        freshness = self._freshness.state(root, now)
        if freshness is not None:  # the root has a timestamp role (device_runtime.agent.freshness)
            status["freshness"] = freshness
        unverified = self._deployer.unverified_slots(root)
        if unverified:  # installed bundles the root in force no longer trusts (see Deployer.recheck)
            status["unverified_slots"] = unverified
        return status

    def _check_freshness(self) -> bool:
        """Report (an event, the status) when the freshness went stale, or fresh again; the model keeps
        serving. True when it reported."""
        state = self._freshness.transition(self._trust.root, datetime.now(timezone.utc))
        if state is None:
            return False
        if state["state"] == "stale":
            log.error("freshness stale since %s: updates may be withheld from this device", state["stale_since"])
            self._event(
                None, "failed", f"freshness stale since {state['stale_since']}: no current signed freshness from "
                "the fleet (updates withheld, or the fleet is away); still serving", error="FreshnessStale",
                freshness=state, model=self.active_model,
            )  # fmt: skip
        else:
            self._event(None, "applied", f"freshness v{state['version']} until {state['expires']}", freshness=state)
        self.link.publish_status()
        return True

    def _run_telemetry(self) -> None:
        next_due = self._clock() + self.telemetry_interval_s
        while not self._stop.is_set():
            self._wake_telemetry.wait(timeout=max(0.0, next_due - self._clock()))
            if self._stop.is_set():
                return
            if self._wake_telemetry.is_set():  # the interval changed: restart the countdown
                self._wake_telemetry.clear()
                next_due = self._clock() + self.telemetry_interval_s
                continue
            next_due += self.telemetry_interval_s
            if next_due < self._clock():  # a long stall: do not fire a burst to catch up
                next_due = self._clock() + self.telemetry_interval_s
            try:
                self.publish_telemetry()
            except EdgeshipError:
                log.exception("telemetry could not be queued")
            self._check_freshness()

    def publish_telemetry(self) -> int:
        """Queue one telemetry message now (the window restarts); return its ``seq``.

        Raises:
            StateError: the outbox cannot store it.
        """
        snap = self._metrics.snapshot(reset_window=True)
        payload = {
            "window_s": snap.get("window_s"),
            "count": snap.get("count", 0),
            "errors": int(snap.get("error_count", 0)),
            "error_kinds": dict(snap.get("errors") or {}),
            "latency_ms": snap.get("latency_ms", {"p50": None, "p95": None, "p99": None}),
            "rss_mb": snap.get("rss_mb"),
            "cpu_pct": snap.get("cpu_pct"),
            "temperature_c": snap.get("temperature_c"),
            "model": self.active_model,
        }
        return self.link.publish_telemetry(payload)

    # -- commands ----------------------------------------------------------------------------------

    def _event(self, cmd_id: str | None, phase: str, message: str, **detail: Any) -> None:
        """Report a step: sent to the link process, or queued for the ``edgeship-events`` thread, which
        appends to the outbox in order.

        The caller does not wait for the outbox's fsync (a deployment's steps overlap with it); what must
        be durable before a state change calls ``_flush_events`` first.
        """
        log.info("event %s %s: %s", cmd_id, phase, message)
        payload = event_payload(cmd_id, phase, message, self._wall_clock(), **detail)
        if self._event_writer is not None:
            self._events.put(payload)
            return
        try:  # the link process, or the outbox directly before start() / after stop()
            self.link.publish_event(payload)
        except Exception:  # a report must not fail the step it reports
            log.exception("event %s %s could not be queued", cmd_id, phase)

    def _flush_events(self, timeout_s: float = 30.0) -> None:
        """Wait until every event reported so far is in the outbox (durable)."""
        if isinstance(self.link, LinkProcess):
            try:
                self.link.flush(timeout_s)
            except StateError as e:
                log.error("events not written to the outbox: %s", e)
            return
        if self._event_writer is None or threading.current_thread() is self._event_writer:
            return
        done = threading.Event()
        self._events.put(done)
        if not done.wait(timeout_s):
            log.error("events not written to the outbox within %s s", timeout_s)

    def _write_events(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self.link.publish_event(item)
            except Exception:  # a full disk must not end the thread; the next event tries again
                log.exception("event %s %s could not be queued", item.get("cmd_id"), item.get("phase"))

    def _on_command(self, cmd: dict[str, Any]) -> None:
        """Runs on the link's dispatcher thread, one command at a time, in arrival order; returns (and the
        link acknowledges the command) whatever the command holds, after one ``failed`` event if it could
        not be handled."""
        try:
            self._handle_command(cmd)
        except Exception as e:  # a command the journal cannot store, a full disk, a bug
            log.exception("command %r could not be handled", command_ref(cmd))
            message = f"the command could not be handled: {type(e).__name__}: {e}"
            self._event(command_ref(cmd), "failed", message, error=type(e).__name__)

    def _handle_command(self, cmd: dict[str, Any]) -> None:
        if cmd.get("type") == "timestamp":  # signed freshness: checked by its signatures, not journaled
            self._accept_freshness(cmd)
            return
        try:
            cmd_id, kind = parse_command(cmd)
            times = parse_command_times(cmd)
        except CommandError as e:
            self._event(command_ref(cmd), "failed", str(e), error="CommandError")  # an invalid id is not echoed
            return
        seen = self._journal.get(cmd_id)
        if seen is not None:  # redelivered (or resent by the fleet): acknowledge, do not run again
            state = "done" if seen.get("state") == "done" else "running"
            self._event(
                cmd_id, "received", f"duplicate command: already {state}",
                duplicate=True, type=seen.get("type"), state=seen.get("state"), outcome=seen.get("outcome"),
            )  # fmt: skip
            return
        why = command_refusal(
            times, self._wall_clock(), horizon=self._journal.horizon, max_age_s=self._journal.max_age_s,
            require_issued_at=self.config.require_issued_at,
        )  # fmt: skip
        if why is not None:  # not recorded: it is refused the same way each time it comes
            self._event(cmd_id, "failed", f"refused: {why}", error="Expired" if "expired" in why else "Replay")
            return
        issued = {"issued_at": times.issued_at}
        if kind == "ping":
            self._record(cmd_id, type=kind, state="done", outcome="pong", **issued)  # answered either way
            self._event(
                cmd_id, "pong", "pong", model=self.active_model, uptime_s=round(self._clock() - self._started_at, 1)
            )
            self.link.publish_status()
            return
        if kind == "config":
            self._configure(cmd_id, cmd, issued)
            return
        if kind == "cancel":
            self._cancel(cmd_id, cmd, issued)
            return
        if kind == "trust":
            self._accept_root(cmd_id, cmd, issued)
            return
        try:
            deployment_from_command(cmd, max_bundle_bytes=self.config.max_bundle_bytes)  # refuse early
        except CommandError as e:
            if self._record(cmd_id, type=kind, state="done", outcome="failed", **issued):
                self._event(cmd_id, "failed", str(e), error="CommandError")
            return
        waiting = self._ota_queue.commands()
        if waiting >= self.config.max_queued_commands:  # not recorded: the fleet may send it again later
            self._event(
                cmd_id, "failed", f"{waiting} deploy/rollback commands are already waiting; send it again later",
                error="QueueFull", bad=False, model=self.active_model,
            )  # fmt: skip
            return
        # Recorded before it is queued (a restart runs it from the journal), flushed before this returns
        # and the link acknowledges it; the OTA worker starts meanwhile (a kill -9 keeps the page cache).
        if not self._record(cmd_id, type=kind, state="queued", cmd=cmd, durable=False, **issued):
            return
        self._event(cmd_id, "received", f"{kind} queued")
        self._ota_queue.put(lambda: self._run_command(cmd), cmd_id)
        try:
            self._journal.flush()
        except StateError as e:
            log.error("command %s is queued but its journal entry is not on disk: %s", cmd_id, e)

    def _record(self, cmd_id: str, **fields: Any) -> bool:
        """Journal a command; on failure report ``failed`` (the command is not run) and return False."""
        try:
            self._journal.record(cmd_id, **fields)
        except StateError as e:
            self._event(
                cmd_id, "failed", f"not run: the command could not be recorded ({e})",
                error="StateError", bad=False, model=self.active_model,
            )  # fmt: skip
            return False
        return True

    def _run_command(self, cmd: Mapping[str, Any]) -> None:
        """On the OTA thread: a queued deploy or rollback, unless it expired while it waited."""
        cmd_id = str(cmd.get("id"))
        try:
            expires = parse_command_times(cmd).expires_at
        except CommandError:
            expires = None
        if expires is not None and expires < self._wall_clock():
            self._event(cmd_id, "failed", "expired while queued", error="Expired", bad=False, model=self.active_model)
            self._record(cmd_id, state="done", outcome="failed", cmd=None)
            return
        self._deployer.run_command(cmd)

    def _cancel(self, cmd_id: str, cmd: Mapping[str, Any], issued: Mapping[str, Any]) -> None:
        """Withdraw a queued deploy or rollback (one that has started runs to its end)."""
        try:
            target = parse_cancel(cmd)
        except CommandError as e:
            if self._record(cmd_id, type="cancel", state="done", outcome="failed", **issued):
                self._event(cmd_id, "failed", str(e), error="CommandError")
            return
        if not self._record(cmd_id, type="cancel", state="done", outcome="applied", **issued):
            return
        if self._ota_queue.cancel(target):
            self._record(target, state="done", outcome="cancelled", cmd=None)
            model = self.active_model
            self._event(target, "failed", f"cancelled by {cmd_id}", error="Cancelled", bad=False, model=model)
            self._event(cmd_id, "applied", f"cancelled {target}", cancelled=target)
            return
        seen = self._journal.get(target)
        why = "unknown" if seen is None else "already started" if seen.get("state") != "done" else "already finished"
        self._record(cmd_id, state="done", outcome="failed")
        self._event(cmd_id, "failed", f"{target} cannot be cancelled: {why}", error="NotCancellable")

    def _accept_root(self, cmd_id: str, cmd: Mapping[str, Any], issued: Mapping[str, Any]) -> None:
        """A new trust root: accepted only by the current root's rule (signed, newer), whoever sent it."""
        try:
            root = self._trust.update(parse_trust(cmd), datetime.now(timezone.utc))
        except (CommandError, TrustRootError, StateError) as e:
            if self._record(cmd_id, type="trust", state="done", outcome="failed", **issued):
                error = "CommandError" if isinstance(e, CommandError) else type(e).__name__
                self._event(cmd_id, "failed", f"trust root refused: {e}", error=error)
            return
        self._record(cmd_id, type="trust", state="done", outcome="applied", **issued)
        log.info("trust root v%d accepted (%s)", root.version, cmd_id)
        self._event(cmd_id, "applied", f"trust root v{root.version}", root_version=root.version)
        self._freshness.root_changed(root)
        # The installed bundles, against the new root (a revoked key's bundle is not served on), in turn
        # with deployments: on the OTA thread.
        self._ota_queue.put(self._deployer.recheck)
        self.link.publish_status()

    def _accept_freshness(self, cmd: Mapping[str, Any]) -> None:
        """The fleet's signed freshness (retained, so also on every reconnect): taken when newer."""
        if self._trust.root.timestamp_keys() is None and command_ref(cmd) is None:
            log.debug("freshness ignored: the trust root asks for none")  # the fleet-wide retained message
            return
        try:
            fresh, new = self._freshness.accept(parse_freshness(cmd), self._trust.root, datetime.now(timezone.utc))
        except (CommandError, TrustRootError, StateError) as e:
            error = "CommandError" if isinstance(e, CommandError) else type(e).__name__
            log.warning("freshness refused: %s", e)
            self._event(command_ref(cmd), "failed", f"freshness refused: {e}", error=error)
            return
        if not self._check_freshness() and new:  # the status carries the new version and expiry
            log.info("freshness v%d accepted, until %s", fresh.version, fresh.expires)
            self.link.publish_status()

    def _configure(self, cmd_id: str, cmd: Mapping[str, Any], issued: Mapping[str, Any]) -> None:
        try:
            changes = parse_config(cmd)
        except CommandError as e:
            if self._record(cmd_id, type="config", state="done", outcome="failed", **issued):
                self._event(cmd_id, "failed", str(e), error="CommandError")
            return
        if not self._record(cmd_id, type="config", state="done", outcome="applied", **issued):
            return
        self._settings.update(changes)
        try:
            write_json(self.state_dir / _CONFIG_FILE, self._settings)
        except StateError as e:  # applied now, lost at the next restart
            log.error("configuration applied but not saved: %s", e)
        self._apply_log_level()
        self._wake_telemetry.set()
        self._event(cmd_id, "applied", "configuration changed", settings=dict(self._settings))

    def _apply_log_level(self) -> None:
        level = self._settings.get("log_level")
        if level:
            logging.getLogger("device_runtime").setLevel(level)

    # -- the OTA worker ----------------------------------------------------------------------------

    def _run_ota(self) -> None:
        while True:
            task = self._ota_queue.get()
            if task is None or self._stop.is_set():
                return
            try:
                task()
            except Exception:  # a bug must not end the worker: the next command still runs
                log.exception("OTA task failed")


class _OtaQueue:
    """The OTA thread's work in arrival order: plain tasks (start-up, resume, ``wait_idle``; None ends
    the thread) and commands by id, which can be counted (the bound) and withdrawn (``cancel``)."""

    def __init__(self) -> None:
        self._items: collections.deque[tuple[str | None, Callable[[], None] | None]] = collections.deque()
        self._cond = threading.Condition()

    def put(self, task: Callable[[], None] | None, cmd_id: str | None = None) -> None:
        with self._cond:
            self._items.append((cmd_id, task))
            self._cond.notify()

    def get(self) -> Callable[[], None] | None:
        with self._cond:
            while not self._items:
                self._cond.wait()
            return self._items.popleft()[1]

    def commands(self) -> int:
        """Commands waiting (not the one running)."""
        with self._cond:
            return sum(1 for cmd_id, _ in self._items if cmd_id is not None)

    def cancel(self, cmd_id: str) -> bool:
        """Remove a waiting command; False when it is not waiting (unknown, running or done)."""
        with self._cond:
            for item in self._items:
                if item[0] == cmd_id:
                    self._items.remove(item)
                    return True
            return False


def _edgeship_version() -> str:
    try:
        return metadata.version("edgeship")
    except metadata.PackageNotFoundError:
        return "unknown"
