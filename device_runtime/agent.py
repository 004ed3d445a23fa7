"""The device agent: serves the active model, talks MQTT to the fleet, and applies OTA updates safely.

One ``Agent`` owns one state directory::

    STATE_DIR/pointer.json          which A/B slot is active (device_runtime.slots)
    STATE_DIR/slots/{A,B}/          the installed bundles
    STATE_DIR/deploy.json           the OTA operation in progress (device_runtime.ota.Deployment)
    STATE_DIR/commands.json         command ids seen, for de-duplication, and OTA commands not yet run
    STATE_DIR/bad.json              sha256 of bundles that failed verification, load or health check
    STATE_DIR/config.json           settings changed by ``config`` commands
    STATE_DIR/downloads/            the bundle being downloaded (``.part`` resumed after a restart)
    STATE_DIR/outbox.sqlite         telemetry and events waiting for the broker (device_runtime.outbox)

Processes and threads: the MQTT link and its outbox run in the link process (``device_runtime.linkproc``;
here its ``edgeship-link`` thread reads it and ``edgeship-cmd`` runs the commands it hands over), or with
``link_process=False`` on ``DeviceLink``'s threads plus ``edgeship-events`` (appends events to the outbox
in order, so no step waits for its fsync). ``edgeship-telemetry``, ``edgeship-ota`` (deployments and
rollbacks, one at a time, in the order they arrived; a deployment's download, verification and
installation run in the staging helper process, ``device_runtime.staging``), ``edgeship-health`` (trial
loads and health checks, under a timeout). Local
callers use ``Agent.predict`` from any thread, or HTTP when ``AgentConfig.serve`` is set (the
``ModelServer``'s threads); a swap never fails one of them (see ``_Serving``).

Test hook: with ``EDGESHIP_AGENT_CRASH_AT=<point>`` in the environment the process SIGKILLs itself at
that point of a deployment; the points are ``CRASH_POINTS`` (docs/ota.md describes each).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from device_runtime import _sysinfo
from device_runtime.errors import HealthCheckError, StateError
from device_runtime.linkproc import LinkProcess
from device_runtime.metrics import Metrics
from device_runtime.model import Model, load_verified
from device_runtime.mqtt import DeviceLink, MqttSettings
from device_runtime.ota import (
    CommandError,
    Deployment,
    Limits,
    deployment_from_command,
    parse_command,
    parse_config,
    recover,
)
from device_runtime.outbox import Outbox
from device_runtime.serve import ModelServer
from device_runtime.slots import Pointer, SlotInfo, SlotStore, other_slot
from device_runtime.staging import (
    CRASH_ENV,
    CRASH_POINTS,
    Flush,
    Staged,
    StageFailure,
    StageJob,
    StagingDied,
    StagingProcess,
    check_compatible,
    crash_point,
    stage,
)
from sdk.bundle import VerifiedBundle, read_bundle
from sdk.errors import EdgeshipError, TransportError
from sdk.fsutil import atomic_write_bytes, fsync_dir, fsync_file
from sdk.manifest import canonical_json
from sdk.signing import TrustedKeys

__all__ = ["CRASH_ENV", "CRASH_POINTS", "Agent", "AgentConfig"]

log = logging.getLogger(__name__)

_DEPLOY_FILE = "deploy.json"
_COMMANDS_FILE = "commands.json"
_BAD_FILE = "bad.json"
_CONFIG_FILE = "config.json"
_DOWNLOADS = "downloads"
_OUTBOX = "outbox.sqlite"
_KEEP_COMMANDS = 512  # finished command ids remembered for de-duplication
_KEEP_BAD = 256  # bad bundle hashes remembered
_T = TypeVar("_T")
_IO_THREADS = 8  # fsyncs a deployment issues at once (the slot's files and folders, its record)


@dataclass(frozen=True)
class AgentConfig:
    """Everything an ``Agent`` needs; tuning values carry their units.

    Attributes:
        state_dir: the agent's folder (created if missing).
        mqtt: broker address, identity and TLS.
        trust: public keys (and threshold) bundles must be signed with.
        initial_bundle: installed into slot A when no slot is active yet (a factory image).
        telemetry_interval_s: seconds between telemetry messages (a ``config`` command may change it).
        max_bundle_bytes: the download cap when a deploy command gives no ``size``.
        download_deadline_s: a whole download, retries included, must finish within this.
        download_read_timeout_s: the longest silence tolerated on the connection (also the connect timeout).
        download_attempts: tries in a row without progress before a download fails.
        health_timeout_s: a trial health check that has not returned by then fails (the check "hangs").
        health_latency_budget_ms: the golden run must take at most this, unless the bundle's
            ``golden.latency_budget_ms`` says otherwise.
        check_slots_on_start: re-hash the active slot's files at start (catches on-disk corruption).
        limits: how often an interrupted deployment is resumed before it is abandoned.
        outbox_max_messages: telemetry and events kept while the broker is unreachable.
        intra_op_threads: threads inside one operator (None: the runtime's choice).
        providers: execution providers to use instead of the bundle's.
        serve: also serve the active model over HTTP (``device_runtime.serve.ModelServer``: predict,
            model, healthz, metrics) to local callers; OTA swaps happen under it without failing a request.
        serve_host: address the HTTP server binds (loopback: this machine only).
        serve_port: its TCP port (0 picks a free one; read ``Agent.server.port``).
        staging_process: download, verify and install new bundles in a helper process
            (``device_runtime.staging``), away from the serving process's GIL; False: on the agent's
            OTA thread (also the fallback when the helper cannot be started).
        link_process: run the MQTT link and the outbox in their own process (``device_runtime.linkproc``),
            away from the serving process's GIL; False: on the agent's threads.
    """

    state_dir: Path
    mqtt: MqttSettings
    trust: TrustedKeys
    initial_bundle: Path | None = None
    telemetry_interval_s: float = 10.0  # seconds
    max_bundle_bytes: int = 2 * 2**30  # bytes
    download_deadline_s: float = 600.0  # seconds
    download_read_timeout_s: float = 30.0  # seconds
    download_attempts: int = 5
    health_timeout_s: float = 30.0  # seconds
    health_latency_budget_ms: float = 2000.0  # milliseconds
    check_slots_on_start: bool = True
    limits: Limits = field(default_factory=Limits)
    outbox_max_messages: int = 10_000  # messages
    intra_op_threads: int | None = None
    providers: tuple[str, ...] | None = None
    serve: bool = False
    serve_host: str = "127.0.0.1"
    serve_port: int = 8080
    staging_process: bool = True
    link_process: bool = True


# ---- small durable records ---------------------------------------------------------------------


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        log.error("%s is unreadable (%s); starting it afresh", path, e)
        return default


def _write_json(path: Path, value: Any, *, durable: bool = True) -> None:
    """Replace ``path`` atomically: temp file, fsync, ``os.replace``, fsync of the folder.

    ``durable=False`` skips both fsyncs: the new file is whole and in place for any process that reads it
    after this returns (a kill -9 does not lose the page cache), but a power cut may leave the previous
    file or, where the rename reached the disk before the data, an unreadable one. The caller flushes it
    with ``_fsync_file_and_folder`` before anything that relies on it surviving power loss.

    Raises:
        StateError: it cannot be written.
    """
    try:
        if durable:
            atomic_write_bytes(path, canonical_json(value))
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(canonical_json(value))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise StateError(f"cannot write {path}: {e.strerror or e}") from e


def _fsync_file_and_folder(path: Path) -> None:
    """Make a file written with ``_write_json(durable=False)`` durable (data, then its name).

    Raises:
        StateError: it cannot be flushed (a file that is gone already needs nothing).
    """
    try:
        fsync_file(path)
        fsync_dir(path.parent)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StateError(f"cannot flush {path}: {e.strerror or e}") from e


class _Journal:
    """Command ids seen (de-duplication) and OTA commands not yet finished, in ``commands.json``."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        raw = _read_json(path, {})
        entries = raw.get("entries", []) if isinstance(raw, dict) else []
        self._entries: dict[str, dict[str, Any]] = {
            e["id"]: e for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)
        }

    def get(self, cmd_id: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._entries.get(cmd_id)
            return dict(entry) if entry else None

    def record(self, cmd_id: str, *, durable: bool = True, **fields: Any) -> None:
        """Add or update an entry (``state``: queued, running or done; ``outcome``; ``cmd``).

        ``durable=False``: in place for a restart after kill -9, on disk only after ``flush()``.

        Raises:
            StateError: the file cannot be written.
        """
        with self._lock:
            entry = self._entries.pop(cmd_id, {"id": cmd_id})
            entry.update(fields)
            self._entries[cmd_id] = entry  # most recent last
            finished = [k for k, e in self._entries.items() if e.get("state") == "done"]
            for old in finished[: max(0, len(finished) - _KEEP_COMMANDS)]:
                del self._entries[old]
            _write_json(self._path, {"schema": 1, "entries": list(self._entries.values())}, durable=durable)

    def flush(self) -> None:
        """Put the last ``record(durable=False)`` on disk.

        Raises:
            StateError: it cannot be flushed.
        """
        _fsync_file_and_folder(self._path)

    def unfinished(self) -> list[dict[str, Any]]:
        """OTA commands queued or started but not finished, oldest first."""
        with self._lock:
            return [dict(e) for e in self._entries.values() if e.get("state") in ("queued", "running")]


class _BadBundles:
    """sha256 of bundles that failed on this device, in ``bad.json``."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        raw = _read_json(path, {})
        self._bad: dict[str, Any] = raw if isinstance(raw, dict) else {}

    def get(self, sha256: str) -> Any:
        with self._lock:
            return self._bad.get(sha256)

    def add(self, sha256: str, cmd_id: str, reason: str) -> None:
        with self._lock:
            self._bad.pop(sha256, None)
            self._bad[sha256] = {"cmd_id": cmd_id, "reason": reason[:500], "ts": time.time()}
            for old in list(self._bad)[: max(0, len(self._bad) - _KEEP_BAD)]:
                del self._bad[old]
            _write_json(self._path, self._bad)


# ---- metrics -----------------------------------------------------------------------------------


# ---- serving and the atomic swap ---------------------------------------------------------------


@dataclass
class _Active:
    """A loaded model and the calls running on it."""

    model: Model
    slot: str | None
    info: SlotInfo
    inflight: int = 0
    retired: bool = False
    closed: bool = False


class _Serving:
    """Holds the active model. ``swap`` is atomic for callers: a call started before it finishes on
    the old model, every call after it uses the new one, and the old one is closed by whichever of
    ``swap`` or the last in-flight call comes last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: _Active | None = None

    @property
    def active(self) -> _Active | None:
        with self._lock:
            return self._active

    def acquire(self) -> _Active:
        with self._lock:
            active = self._active
            if active is None:
                raise StateError("no model is active on this device yet")
            active.inflight += 1
            return active

    def release(self, active: _Active) -> None:
        with self._lock:
            active.inflight -= 1
            close = active.retired and active.inflight == 0 and not active.closed
            active.closed = active.closed or close
        if close:
            active.model.close()

    def swap(self, new: _Active | None, *, close_old: bool = True) -> _Active | None:
        """Serve ``new`` from now on; return the old one. ``close_old=False``: the caller ``retire``s it later
        (the old model is then still open, but no new call reaches it)."""
        with self._lock:
            old, self._active = self._active, new
        if old is not None and close_old:
            self.retire(old)
        return old

    def retire(self, old: _Active) -> None:
        """Close a swapped-out model now, or when its last call returns."""
        with self._lock:
            close = old.inflight == 0 and not old.closed
            old.retired = True
            old.closed = old.closed or close
        if close:
            old.model.close()


class _Worker:
    """One daemon thread that runs submitted calls in order, started once: a thread start costs a GIL
    hand-over, milliseconds when predict threads keep the GIL busy. Abandoned (not joined) when a call
    hangs: the process may still exit."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def close(self, timeout_s: float) -> None:
        """End the thread once the calls submitted so far are done (waits up to ``timeout_s``)."""
        self._calls.put(None)
        self._thread.join(timeout_s)

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._calls.put((fn, future))
        return future

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, future = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)


class _Failed(Exception):
    """A deployment step failed: report ``failed`` (and ``rolled_back`` when a trial had started)."""

    def __init__(self, message: str, *, bad: bool = False, trial: bool = False, error: str = "") -> None:
        super().__init__(message)
        self.bad = bad
        self.trial = trial
        self.error = error


# ---- the agent ---------------------------------------------------------------------------------


class Agent:
    """The long-running device agent. ``start()``, then ``predict`` from any thread; ``stop()`` at the end.

    Raises (from the constructor; with ``link_process`` the outbox and TLS errors come from ``start()``):
        StateError: the state directory or its outbox cannot be opened.
        TransportError: the TLS files cannot be read.
    """

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._started_at = clock()
        self.state_dir = Path(config.state_dir).absolute()
        try:
            (self.state_dir / _DOWNLOADS).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StateError(f"cannot create {self.state_dir}: {e.strerror or e}") from e
        self._slots = SlotStore(self.state_dir)
        self._journal = _Journal(self.state_dir / _COMMANDS_FILE)
        self._bad = _BadBundles(self.state_dir / _BAD_FILE)
        self._settings: dict[str, Any] = {"telemetry_interval_s": config.telemetry_interval_s, "log_level": None}
        saved = _read_json(self.state_dir / _CONFIG_FILE, {})
        if isinstance(saved, dict):
            self._settings.update({k: v for k, v in saved.items() if k in self._settings})
        # One Metrics for every model the agent serves: telemetry counts Agent.predict and HTTP calls
        # alike, across swaps (a health check is not counted).
        self._metrics = Metrics()
        self._serving = _Serving()
        self._deployment: Deployment | None = None  # what deploy.json holds, for the status
        # Threads for fsyncs that run beside a deployment's other steps (started in start(): a thread
        # start costs a GIL hand-over, several milliseconds when predict threads keep the GIL busy).
        self._io = ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="edgeship-io")
        self._record_flush: Future[None] | None = None  # the fsyncs of the last deploy.json (see _save)
        self._health_worker = _Worker("edgeship-health")  # runs health checks under a timeout
        self._ota_queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._wake_telemetry = threading.Event()
        self._threads: list[threading.Thread] = []
        self._events: queue.SimpleQueue[dict[str, Any] | threading.Event | None] = queue.SimpleQueue()
        self._event_writer: threading.Thread | None = None
        self.server: ModelServer | None = None  # the local HTTP endpoint, with ``config.serve``
        self._capabilities = _sysinfo.capabilities()
        self._outbox: Outbox | None = None
        self.link: DeviceLink | LinkProcess
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
        # Started by the OTA thread (on Linux the helper dies with the thread that started it).
        self._stager: StagingProcess | None = None
        if config.staging_process:
            self._stager = StagingProcess(
                download_attempts=config.download_attempts, download_read_timeout_s=config.download_read_timeout_s
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
        ready = threading.Barrier(_IO_THREADS + 1)  # every I/O thread started now, not during a deployment
        for _ in range(_IO_THREADS):
            self._io.submit(ready.wait)
        ready.wait()
        record = self._read_deployment()
        self._boot(record)
        if self.config.serve:
            server = ModelServer(self._current_model, self.config.serve_host, self.config.serve_port)
            try:
                server.start()
            except TransportError:
                self.stop()
                raise
            self.server = server
        self.link.start()
        self._ota_queue.put(self._start_stager)  # before any deployment, while the agent comes up
        for name, target in (("edgeship-telemetry", self._run_telemetry), ("edgeship-ota", self._run_ota)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        if record is not None:
            found = record
            self._ota_queue.put(lambda: self._recover(found))
        for entry in self._journal.unfinished():  # OTA commands received but not started before a restart
            if record is None or entry["id"] != record.cmd_id:
                self._ota_queue.put(functools.partial(self._run_ota_command, entry.get("cmd") or {}))

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the threads, publish ``offline``, and close the model and the outbox.

        A deployment in progress is interrupted at its next step; its record stays in ``deploy.json`` and
        the next start resumes it.
        """
        self._stop.set()
        self._wake_telemetry.set()
        self._ota_queue.put(None)
        if self._stager is not None:  # a staging job in progress ends like after a crash; resumed at start
            self._stager.shutdown()
        for thread in self._threads:
            thread.join(timeout=timeout_s)
        if self._stager is not None:  # (one the OTA thread was starting just then)
            self._stager.shutdown()
        if self._event_writer is not None:  # every event reported so far goes into the outbox
            self._events.put(None)
            self._event_writer.join(timeout=timeout_s)
            self._event_writer = None
        self.link.stop()
        if self.server is not None:
            self.server.stop()
        self._io.shutdown(wait=True)
        self._health_worker.close(timeout_s)
        self._serving.swap(None)
        if self._outbox is not None:
            self._outbox.close()

    def _use_device_link(self, events: list[dict[str, Any]]) -> None:
        """Run the link on this process's threads: a ``DeviceLink`` over the outbox, ``events`` queued in it
        first (what a link process that could not start had been given).

        Raises:
            StateError: the outbox cannot be used.
        """
        self._outbox = Outbox(self.state_dir / _OUTBOX, max_messages=self.config.outbox_max_messages)
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
        deployment = self._deployment
        return {
            "model": None if active is None else active.info.model(),
            "slot": None if active is None else active.slot,
            "runtime": runtime,
            "capabilities": self._capabilities,
            "uptime_s": round(self._clock() - self._started_at, 1),
            "system_uptime_s": _sysinfo.system_uptime_s(),
            "deployment": None if deployment is None else {"cmd_id": deployment.cmd_id, "phase": deployment.phase},
        }

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
        payload = {"cmd_id": cmd_id, "phase": phase, "detail": {"message": message, **detail}, "ts": time.time()}
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
        """Runs on the link's dispatcher thread, one command at a time, in arrival order."""
        try:
            cmd_id, kind = parse_command(cmd)
        except CommandError as e:
            raw_id = cmd.get("id")
            self._event(raw_id if isinstance(raw_id, str) else None, "failed", str(e), error="CommandError")
            return
        seen = self._journal.get(cmd_id)
        if seen is not None:  # redelivered (or resent by the fleet): acknowledge, do not run again
            state = "done" if seen.get("state") == "done" else "running"
            self._event(
                cmd_id, "received", f"duplicate command: already {state}",
                duplicate=True, type=seen.get("type"), state=seen.get("state"), outcome=seen.get("outcome"),
            )  # fmt: skip
            return
        if kind == "ping":
            self._journal.record(cmd_id, type=kind, state="done", outcome="pong")
            self._event(
                cmd_id, "pong", "pong", model=self.active_model, uptime_s=round(self._clock() - self._started_at, 1)
            )
            self.link.publish_status()
            return
        if kind == "config":
            self._configure(cmd_id, cmd)
            return
        try:
            deployment_from_command(cmd, max_bundle_bytes=self.config.max_bundle_bytes)  # refuse early
        except CommandError as e:
            self._journal.record(cmd_id, type=kind, state="done", outcome="failed")
            self._event(cmd_id, "failed", str(e), error="CommandError")
            return
        # Recorded before it is queued (a restart runs it from the journal), flushed before this returns
        # and the link acknowledges it; the OTA worker starts meanwhile (a kill -9 keeps the page cache).
        self._journal.record(cmd_id, type=kind, state="queued", cmd=cmd, durable=False)
        self._event(cmd_id, "received", f"{kind} queued")
        self._ota_queue.put(lambda: self._run_ota_command(cmd))
        self._journal.flush()

    def _configure(self, cmd_id: str, cmd: Mapping[str, Any]) -> None:
        try:
            changes = parse_config(cmd)
        except CommandError as e:
            self._journal.record(cmd_id, type="config", state="done", outcome="failed")
            self._event(cmd_id, "failed", str(e), error="CommandError")
            return
        self._settings.update(changes)
        _write_json(self.state_dir / _CONFIG_FILE, self._settings)
        self._apply_log_level()
        self._wake_telemetry.set()
        self._journal.record(cmd_id, type="config", state="done", outcome="applied")
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

    def _start_stager(self) -> None:
        if self._stager is None or self._stop.is_set():
            return
        try:
            self._stager.start()
        except StagingDied as e:
            log.warning("%s; staging deployments on the agent's own thread instead", e)
            self._stager = None

    def _run_ota_command(self, cmd: Mapping[str, Any]) -> None:
        dep = deployment_from_command(cmd, max_bundle_bytes=self.config.max_bundle_bytes)
        # The journal entry stays "queued" while deploy.json exists: a restart recovers it from there.
        self._run_deployment(dep.at("received", previous=self.active_model), resume_at=None)

    def _run_deployment(self, dep: Deployment, resume_at: str | None) -> None:
        try:
            if dep.kind == "rollback":
                self._rollback(dep)
            else:
                self._deploy(dep, resume_at)
        except _Failed as f:
            self._finish_failed(self._deployment or dep, str(f), bad=f.bad, trial=f.trial, error=f.error)
        except _Interrupted:
            log.info("deployment %s interrupted by stop(); the next start resumes it", dep.cmd_id)

    def _save(self, dep: Deployment) -> Deployment:
        """Write ``deploy.json`` (a step recovery needs) and note it; ``_Interrupted`` after ``stop()``.

        The record is in place when this returns (what a restart after kill -9 reads); its fsyncs run on
        a background thread while the step it guards goes on, and ``_record_flushed`` waits for them
        before the next pointer write. A power cut before that leaves the previous record or an
        unreadable one; recovery is safe from either (docs/ota.md, "Durable state").
        """
        if self._stop.is_set():
            raise _Interrupted
        self._record_flushed()
        path = self.state_dir / _DEPLOY_FILE
        _write_json(path, json.loads(dep.to_bytes()), durable=False)
        self._record_flush = self._io.submit(_fsync_file_and_folder, path)
        self._deployment = dep
        return dep

    def _record_flushed(self) -> None:
        """Wait for the background flush of the last ``_save``.

        Raises:
            StateError: it failed.
        """
        flush, self._record_flush = self._record_flush, None
        if flush is not None:
            flush.result()

    def _note(self, dep: Deployment) -> Deployment:
        """A phase that is only reported (status, events), not written: recovery does not need it."""
        if self._stop.is_set():
            raise _Interrupted
        self._deployment = dep
        return dep

    def _read_deployment(self) -> Deployment | None:
        path = self.state_dir / _DEPLOY_FILE
        try:
            return Deployment.from_bytes(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.error("%s is unreadable (%s); the deployment it held is abandoned", path, e)
            path.unlink(missing_ok=True)
            return None

    def _forget(self, dep: Deployment, outcome: str) -> None:
        """The deployment is over and reported: clear its record and its downloads.

        Its final events must be in the outbox first: after the record is gone nothing reports them again.
        """
        self._flush_events()
        self._record_flushed()
        self._journal.record(dep.cmd_id, type=dep.kind, state="done", outcome=outcome, cmd=None)
        (self.state_dir / _DEPLOY_FILE).unlink(missing_ok=True)
        self._deployment = None
        shutil.rmtree(self.state_dir / _DOWNLOADS, ignore_errors=True)
        (self.state_dir / _DOWNLOADS).mkdir(exist_ok=True)
        self._slots.clean_incoming()
        try:  # the folder a commit replaced, or the one a failed deployment staged
            self._slots.clean_unlisted(self._slots.read_pointer())
        except StateError as e:
            log.error("slot folders not cleaned: %s", e)

    def _finish_failed(self, dep: Deployment, message: str, *, bad: bool, trial: bool, error: str = "") -> None:
        if bad and dep.sha256:
            self._bad.add(dep.sha256, dep.cmd_id, message)
        final = "rolled_back" if trial else "failed"
        dep = self._save_final(dep.at(final))
        self._event(dep.cmd_id, "failed", message, error=error, bad=bad, model=self.active_model)
        if trial:
            self._event(dep.cmd_id, "rolled_back", "kept the previous model", model=self.active_model)
        self._slots.clean_unlisted(self._slots.read_pointer())
        self._forget(dep, final)
        self.link.publish_status()

    def _save_final(self, dep: Deployment) -> Deployment:
        self._record_flushed()
        _write_json(self.state_dir / _DEPLOY_FILE, json.loads(dep.to_bytes()))
        self._deployment = dep
        return dep

    # -- deploy ------------------------------------------------------------------------------------

    def _deploy(self, dep: Deployment, resume_at: str | None) -> None:
        phase = resume_at or "received"
        if phase == "received":
            bad = self._bad.get(dep.sha256)
            if bad is not None and not dep.retry_bad:
                raise _Failed(
                    f"bundle {dep.sha256[:12]} failed on this device before ({bad.get('reason')}); "
                    "send retry_bad to try it again",
                    error="BadBundle",
                )
            phase = "downloading"
        bundle_path = self.state_dir / _DOWNLOADS / f"{dep.sha256}.edgebundle"
        verified: VerifiedBundle | None = None
        flush: Flush | None = None
        if phase in ("downloading", "verifying"):
            # The one record before the health check: it counts this run (``resumes``). A crash while
            # downloading, verifying or staging resumes from here; a complete download (renamed only
            # after its sha256 matched, flushed by the downloader) is not fetched again.
            dep = self._save(dep.at("downloading"))
            if not bundle_path.exists():
                self._event(dep.cmd_id, "downloading", f"downloading {dep.url}", url=dep.url, size=dep.size)
            staged, flush = self._stage(dep, bundle_path)
            verified = staged.verified
            dep = self._note(dep.at("staged", slot=staged.slot, folder=staged.folder))
            m = verified.manifest
            self._event(
                dep.cmd_id, "staged", f"{m.name} v{m.version} verified into slot {staged.slot}",
                slot=staged.slot, version=m.version,
            )  # fmt: skip
        if verified is None:  # resumed at the health check: the staged slot must still be intact
            try:
                if dep.slot is None or dep.folder is None:
                    raise StateError("no staged slot recorded")
                verified = self._slots.open_staged(dep.slot, dep.folder, dep.sha256)
            except EdgeshipError as e:
                log.warning("staged slot of %s unusable (%s); verifying again", dep.cmd_id, e)
                self._deploy(dep, "verifying")
                return
        # Counted before the trial load, so a bundle that kills the process is not retried forever.
        dep = self._save(dep.at("health_check", attempts=dep.attempts + 1))
        self._event(dep.cmd_id, "health_check", "loading and checking the new model", attempt=dep.attempts)
        assert dep.slot is not None and dep.folder is not None
        # The slot's fsyncs (I/O, started by staging right after verification) run on while the trial
        # loads and checks the model (CPU); both must be done before the pointer names the slot.
        if flush is None:  # resumed: flushed from scratch
            try:
                flush = self._slots.start_flush(dep.folder, self._io)
            except StateError as e:
                raise _Failed(f"cannot stage: {e}", error="StateError") from e
        try:
            trial, metrics = self._trial(verified, dep.slot)
        finally:
            try:
                flush.wait()
                flushed: OSError | None = None
            except OSError as e:
                flushed = e
        if flushed is not None:
            trial.model.close()
            if self._stop.is_set():  # the helper was stopped with the agent: resumed at the next start
                raise _Interrupted
            raise _Failed(f"cannot stage: {flushed.strerror or flushed}", trial=True, error="StateError")
        self._commit(self._note(dep.at("switching")), trial, metrics)

    def _stage(self, dep: Deployment, bundle_path: Path) -> tuple[Staged, Flush]:
        """Download (unless done), verify and install the bundle into the inactive slot.

        Raises:
            _Failed: it was refused or could not be staged.
            _Interrupted: ``stop()`` was called meanwhile.
        """
        keys, threshold = StageJob.encode_trust(self.config.trust)
        job = StageJob(
            cmd_id=dep.cmd_id,
            url=dep.url,
            sha256=dep.sha256,
            size=dep.size,
            max_bytes=dep.size or self.config.max_bundle_bytes,
            allow_downgrade=dep.allow_downgrade,
            state_dir=str(self.state_dir),
            bundle_path=str(bundle_path),
            trusted_keys=keys,
            threshold=threshold,
            capabilities=self._capabilities,
            deadline_s=self.config.download_deadline_s,
            read_timeout_s=self.config.download_read_timeout_s,
            attempts=self.config.download_attempts,
        )

        def report(phase: str) -> None:  # "verifying": the download is complete
            self._note(dep.at(phase))
            self._event(dep.cmd_id, phase, "verifying the bundle")

        if self._stop.is_set():
            raise _Interrupted
        self._start_stager()  # (a helper that died earlier is replaced; one that cannot start: this thread)
        try:
            if self._stager is not None:
                return self._stager.run(job, report)
            return stage(job, trust=self.config.trust, executor=self._io, report=report)
        except StageFailure as e:
            raise _Failed(str(e), bad=e.bad, error=e.error) from e
        except StagingDied as e:
            if self._stop.is_set():
                raise _Interrupted from e
            raise _Failed(f"{e}; the next deployment starts a new one", error="StagingDied") from e

    def _trial(self, verified: VerifiedBundle, slot: str, *, hooks: bool = True) -> tuple[_Active, dict[str, Any]]:
        """Load a bundle beside the serving model and health-check it.

        ``hooks``: a deployment's trial (crash hook and latency budget); False for the initial bundle.

        Raises:
            _Failed: it did not load or did not pass (``trial=True``, ``bad=True``).
        """
        if hooks:
            crash_point("load")

        def load() -> Model:
            return load_verified(
                verified,
                providers=self.config.providers,
                intra_op_threads=self.config.intra_op_threads,
                metrics=self._metrics,
            )

        try:
            model = self._bounded(load, lambda late: late.close(), "loading the model")
        except _TimedOut as e:
            raise _Failed(str(e), bad=True, trial=True, error="HealthCheckError") from e
        except EdgeshipError as e:
            raise _Failed(f"load failed: {e}", bad=True, trial=True, error=type(e).__name__) from e
        try:
            metrics = self._health_check(model, hooks=hooks)
        except HealthCheckError as e:
            raise _Failed(str(e), bad=True, trial=True, error="HealthCheckError") from e
        except EdgeshipError as e:
            model.close()
            raise _Failed(f"health check failed: {e}", bad=True, trial=True, error=type(e).__name__) from e
        return _Active(model, slot, SlotInfo.of(verified)), metrics

    def _health_check(self, model: Model, *, hooks: bool = True) -> dict[str, Any]:
        """``model.health_check()`` under a timeout; closes the model if it fails.

        ``hooks``: also the crash hook and the latency budget (a deployment's trial; at start the process
        is busy loading and the latency says little).

        Raises:
            HealthCheckError: it failed, hung past ``health_timeout_s`` or ran over the latency budget.
        """

        def run() -> dict[str, Any]:
            if hooks:
                crash_point("health_check")
            return model.health_check()

        try:
            metrics = self._bounded(run, lambda _: model.close(), "health check")
        except _TimedOut:  # closed when the stuck call returns (closing now would wait for it)
            raise
        except BaseException:
            model.close()
            raise
        budget = model.manifest.golden.latency_budget_ms or self.config.health_latency_budget_ms
        if hooks and isinstance(budget, (int, float)) and metrics["latency_ms"] > budget:
            model.close()
            raise HealthCheckError(
                f"health check took {metrics['latency_ms']} ms, over the {budget} ms budget", metrics
            )
        return metrics

    def _bounded(self, fn: Callable[[], _T], late: Callable[[_T], None], what: str) -> _T:
        """``fn()`` on the health-check thread, for at most ``health_timeout_s``.

        A runtime call cannot be interrupted: past the timeout ``late`` gets its result when it finally
        returns (to close a model), and the next call gets a fresh thread.

        Raises:
            _TimedOut: it did not return in time (a ``HealthCheckError``).
            Exception: what ``fn`` raised.
        """
        future = self._health_worker.submit(fn)
        try:
            return future.result(self.config.health_timeout_s)
        except FutureTimeout:
            future.add_done_callback(lambda done: None if done.exception() else late(done.result()))
            stuck, self._health_worker = self._health_worker, _Worker("edgeship-health")
            stuck.close(0)  # its thread ends when the call returns
            raise _TimedOut(f"{what} did not finish within {self.config.health_timeout_s:g} s") from None

    def _commit(self, dep: Deployment, trial: _Active, metrics: Mapping[str, Any]) -> None:
        """Write the pointer (the commit point), swap the serving model, report."""
        assert trial.slot is not None
        pointer = self._slots.read_pointer()
        pointer = pointer.with_slot(trial.slot, trial.info).activate(trial.slot, raise_floor=dep.kind == "deploy")
        try:
            self._record_flushed()  # the health_check record is durable before the pointer moves
            self._slots.write_pointer(pointer)
        except StateError as e:
            trial.model.close()
            raise _Failed(f"cannot commit: {e}", trial=True, error="StateError") from e
        crash_point("pointer_written")
        previous = self._serving.swap(trial, close_old=False)  # closed once reported (below)
        final = "active" if dep.kind == "deploy" else "rolled_back"
        # No terminal record: deploy.json still says health_check, and after a crash from here on
        # ``recover`` sees the pointer on this bundle and reports it again ("committed").
        dep = self._note(dep.at(final))
        self._event(
            dep.cmd_id, final, f"serving {trial.info.name} v{trial.info.version} from slot {trial.slot}",
            model=trial.info.model(), previous=None if previous is None else previous.info.model(),
            health=_health_summary(metrics),
        )  # fmt: skip
        if previous is not None:
            self._serving.retire(previous)
        self._forget(dep, final)
        self.link.publish_status()

    # -- rollback ----------------------------------------------------------------------------------

    def _rollback(self, dep: Deployment) -> None:
        pointer = self._slots.read_pointer()
        if pointer.active is None:
            raise _Failed("no model is active; nothing to roll back", error="NothingToRollBack")
        slot = other_slot(pointer.active)
        info = pointer.slots.get(slot)
        if info is None:
            raise _Failed(f"slot {slot} holds no previous model to roll back to", error="NothingToRollBack")
        dep = self._save(
            dep.at("health_check", slot=slot, folder=info.folder or slot, sha256=info.sha256, attempts=dep.attempts + 1)
        )
        self._event(dep.cmd_id, "health_check", f"loading {info.name} v{info.version} from slot {slot}")
        try:
            verified = self._slots.open_slot(slot, info)
        except EdgeshipError as e:
            raise _Failed(f"slot {slot} is damaged: {e}", error=type(e).__name__) from e
        try:
            trial, metrics = self._trial(verified, slot)
        except _Failed as f:
            raise _Failed(f"the previous model failed its check: {f}", error=f.error) from f
        self._commit(self._note(dep.at("switching")), trial, metrics)

    # -- start and recovery ------------------------------------------------------------------------

    def _boot(self, record: Deployment | None) -> None:
        """Serve the pointer's active slot (or its other slot, or the initial bundle) before connecting."""
        try:
            pointer = self._slots.read_pointer()
        except StateError as e:
            log.error("%s; starting without a model", e)
            self._event(None, "failed", f"pointer unreadable: {e}")
            pointer = Pointer()
        keep = record.folder if record is not None and record.phase in ("health_check", "switching") else None
        self._slots.clean_incoming()
        self._slots.clean_unlisted(pointer, keep=keep)
        for slot in [pointer.active, *([other_slot(pointer.active)] if pointer.active else [])]:
            info = pointer.slots.get(slot) if slot else None
            if slot is None or info is None:
                continue
            try:
                verified = self._slots.open_slot(slot, info, check_hashes=self.config.check_slots_on_start)
                model = load_verified(
                    verified,
                    providers=self.config.providers,
                    intra_op_threads=self.config.intra_op_threads,
                    metrics=self._metrics,
                )
                self._health_check(model, hooks=False)
            except EdgeshipError as e:
                log.error("slot %s (%s v%s) cannot be served: %s", slot, info.name, info.version, e)
                self._event(None, "failed", f"slot {slot} cannot be served: {e}", slot=slot)
                continue
            if slot != pointer.active:  # the active slot broke: fall back to the other, durably
                self._slots.write_pointer(pointer.activate(slot, raise_floor=False))
                self._event(
                    None, "rolled_back", f"serving {info.name} v{info.version} from slot {slot}", model=info.model()
                )
            self._serving.swap(_Active(model, slot, info))
            return
        if self.config.initial_bundle is not None and self._serving.active is None:
            self._install_initial(self.config.initial_bundle)

    def _install_initial(self, path: Path) -> None:
        """Verify, check and activate the factory bundle into slot A."""
        try:
            self._slots.clean_incoming()
            verified = read_bundle(path, self.config.trust, self._slots.incoming / "bundle")
            check_compatible(verified.manifest, self._capabilities)
            self._slots.write_pointer(Pointer())
            staged = self._slots.install("A", verified)
            trial, _ = self._trial(staged, "A", hooks=False)
        except (EdgeshipError, _Failed) as e:
            self._slots.clean_incoming()
            log.error("initial bundle %s refused: %s", path, e)
            self._event(None, "failed", f"initial bundle refused: {e}")
            return
        self._slots.write_pointer(Pointer().with_slot("A", trial.info).activate("A"))
        self._serving.swap(trial)
        self._event(None, "active", f"initial bundle {trial.info.name} v{trial.info.version}", model=trial.info.model())

    def _recover(self, record: Deployment) -> None:
        """Runs first on the OTA worker after a restart that found ``deploy.json``."""
        active = self._serving.active
        decision = recover(record, None if active is None else active.info.sha256, self.config.limits)
        log.warning(
            "deployment %s found in phase %s: %s (%s)", record.cmd_id, record.phase, decision.action, decision.reason
        )
        self._deployment = record
        detail = {"restarted": True, "found_phase": record.phase, "reason": decision.reason}
        if decision.action == "report":
            self._event(record.cmd_id, record.phase, f"reported again after a restart: {decision.reason}", **detail)
            self._forget(record, record.phase)
        elif decision.action == "committed":
            final = "active" if record.kind == "deploy" else "rolled_back"
            self._save_final(record.at(final))
            self._event(record.cmd_id, final, decision.reason, model=self.active_model, **detail)
            self._forget(record, final)
            self.link.publish_status()
        elif decision.action == "abandon":
            trial = record.kind == "deploy" and record.phase in ("health_check", "switching")
            self._finish_failed(
                record, f"abandoned: {decision.reason}", bad=decision.bad, trial=trial, error="Interrupted"
            )
        else:
            assert decision.resume_at is not None
            resumed = record if decision.resume_at == "health_check" else replace(record, resumes=record.resumes + 1)
            self._event(record.cmd_id, "received", f"resuming at {decision.resume_at}: {decision.reason}", **detail)
            self._run_deployment(resumed, resume_at=decision.resume_at)


class _TimedOut(HealthCheckError):
    """A trial load or health check that did not return within ``health_timeout_s``."""


class _Interrupted(Exception):
    """``stop()`` was called during a deployment; its record stays for the next start."""


def _health_summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {"latency_ms": metrics.get("latency_ms"), "tolerance": metrics.get("tolerance")}


def _edgeship_version() -> str:
    try:
        return metadata.version("edgeship")
    except metadata.PackageNotFoundError:
        return "unknown"
