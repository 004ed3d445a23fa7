"""The agent's MQTT link in its own process, so that the broker traffic leaves the callers' GIL alone.

``DeviceLink`` (paho's network loop, the SQLite outbox, the drain that publishes and deletes, the PUBACKs)
is Python work on several threads. In the serving process every wake-up of those threads takes the GIL
from the local callers' ``predict`` calls; during a deployment (a command, six events, their PUBACKs and
deletes, the status) that showed in the callers' p99 (``benchmarks/ota_swap.py``, docs/ota.md). Here the
link runs in ``python -m device_runtime.agent.linkproc AGENT_PID``, started by ``LinkProcess``, which offers the
agent the same methods as ``DeviceLink``; what is left in the serving process is one JSON line per event.

The two speak JSON lines. Agent to link: ``start``, ``stop``, ``event`` (numbered), ``telemetry``,
``flush``, ``length``, ``counters`` (these three answered by ``reply``), ``status`` (the agent's status,
answering ``status?`` or with ``publish``), ``done`` (a command handled). Link to agent: ``ready`` or
``error`` once the outbox is open, ``appended`` (an event is in the outbox), ``reply``, ``connected``,
``cmd`` (a command to handle; the link PUBACKs it after ``done``), ``status?`` (on each connect).

Guarantees are those of ``DeviceLink``: an event is durable once ``flush()`` returned (before that it is
in the agent's memory or the pipe, as it was in the agent's event queue before); a command is PUBACKed
only after the agent handled it. The link process dies with the agent (``PR_SET_PDEATHSIG``; the broker
then publishes the Last Will). A link process that dies alone is restarted, and the events it had not
confirmed are sent to the new one (a duplicate at worst); commands it had not PUBACKed are redelivered
by the broker (persistent session).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import IO, Any

from device_runtime.agent._child import die_with_parent, spawn
from device_runtime.agent.mqtt import CommandHandler, DeviceLink, LinkCounters, MqttSettings, StatusBuilder
from device_runtime.agent.outbox import Outbox
from device_runtime.errors import StateError
from sdk.errors import EdgeshipError

__all__ = ["LinkProcess"]

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0  # imports and opening the outbox on a slow device
_REPLY_TIMEOUT_S = 30.0  # a request the link process does not answer: it is stuck or gone
_COMMAND_TIMEOUT_S = 300.0  # the agent handling a command (a journal write and its fsync)
_STATUS_TIMEOUT_S = 2.0  # the agent's status on connect; the last one known after that
_RESTART_DELAY_S = 1.0  # before starting a link process that died again


def _dumps(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"


class LinkProcess:
    """The agent's side: ``DeviceLink``'s methods, carried out by the link process.

    Args:
        settings: as for ``DeviceLink``.
        outbox_path: the SQLite outbox, opened by the link process.
        max_messages: the outbox's bound.
        status: builds the ``online`` status; called when the link (re)connects and by ``publish_status``.
        on_command: called with each valid command, one at a time, on the ``edgeship-cmd`` thread.

    ``open()`` starts the process (events can be queued from then on), ``start()`` connects, ``stop()``
    says goodbye and ends it.
    """

    def __init__(
        self,
        settings: MqttSettings,
        outbox_path: Path,
        max_messages: int,
        *,
        status: StatusBuilder,
        on_command: CommandHandler | None = None,
    ) -> None:
        self.settings = settings
        self._init = {
            "settings": dataclasses.asdict(settings),
            "outbox": str(outbox_path),
            "max_messages": max_messages,
        }
        self._status = status
        self._on_command = on_command
        # Two locks, so that the thread reading the process never waits for one writing to it (both pipes
        # full would deadlock): _lock for writing to the process and its state, _table_lock (taken inside
        # _lock, never the other way) for the tables the reader updates.
        self._lock = threading.Lock()
        self._table_lock = threading.Lock()
        self._proc: Any = None
        self._numbers = itertools.count(1)
        self._unconfirmed: dict[int, bytes] = {}  # event number -> its line, until ``appended``
        self._replies: dict[int, Future[Any]] = {}
        self._connected = threading.Event()
        self._ready: Future[None] = Future()
        self._started = False
        self._stopping = False
        # for edgeship-cmd: (number, command) to handle, or (0, None) for a status the process asked for
        self._commands: queue.SimpleQueue[tuple[int, dict[str, Any] | None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    # -- life cycle --------------------------------------------------------------------------------

    def open(self) -> None:
        """Start the link process (not yet connecting) and wait until its outbox is open.

        Raises:
            StateError: it could not start, or the outbox cannot be used.
        """
        if self._threads:
            raise RuntimeError("LinkProcess.open() called twice")
        for name, target in (("edgeship-link", self._supervise), ("edgeship-cmd", self._run_commands)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        try:
            self._ready.result(_START_TIMEOUT_S)
        except FutureTimeout:
            self._close()
            raise StateError(f"the MQTT link process did not start within {_START_TIMEOUT_S:g} s") from None
        except EdgeshipError:
            self._close()
            raise

    def start(self) -> None:
        """Connect (the process keeps retrying while the broker is down); ``open()`` first if needed."""
        if not self._threads:
            self.open()
        with self._lock:
            self._started = True
            self._send_locked({"op": "start"})

    def stop(self) -> None:
        """Publish ``offline`` if connected, disconnect and end the process (``settings.stop_timeout_s``).

        Events not yet in the outbox are lost only if the process cannot take them any more; ``flush()``
        first to be sure."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._send_locked({"op": "stop"})
            proc = self._proc
        if proc is not None:
            try:
                proc.wait(self.settings.stop_timeout_s + 5)
            except Exception:
                log.warning("the MQTT link process did not stop; killing it")
        self._close()

    def _close(self) -> None:
        with self._lock:
            self._stopping = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._commands.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        self._connected.clear()

    def __enter__(self) -> LinkProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The link process's id while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    # -- DeviceLink's API ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a session is established and the ``cmd`` subscription acknowledged."""
        return self._connected.is_set()

    @property
    def counters(self) -> LinkCounters:
        return LinkCounters(**self._request("counters"))

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def wait_drained(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty (everything acknowledged); return False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self._request("length") > 0 or self._unconfirmed:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def publish_event(self, payload: Mapping[str, Any]) -> None:
        """Send an event to the outbox without waiting (``flush()`` waits until it is durable).

        Raises:
            ValueError: the payload is not JSON-serialisable.
        """
        with self._lock:
            number = next(self._numbers)
            line = _dumps({"op": "event", "n": number, "payload": payload})
            with self._table_lock:
                self._unconfirmed[number] = line
            self._write_locked(line)

    def publish_telemetry(self, payload: Mapping[str, Any]) -> int:
        """Queue a telemetry message durably; return its ``seq`` (see ``DeviceLink.publish_telemetry``).

        Raises:
            ValueError: the payload is not JSON-serialisable.
            StateError: the outbox could not store it, or the link process did not answer.
        """
        return int(self._request("telemetry", payload=payload))

    def flush(self, timeout_s: float = _REPLY_TIMEOUT_S) -> None:
        """Wait until every event sent so far is in the outbox (durable).

        Raises:
            StateError: the link process did not confirm them within ``timeout_s``.
        """
        self._request("flush", timeout_s=timeout_s)

    def unconfirmed_events(self) -> list[dict[str, Any]]:
        """The events sent but not confirmed in the outbox, oldest first (to hand them elsewhere)."""
        with self._table_lock:
            return [json.loads(self._unconfirmed[n])["payload"] for n in sorted(self._unconfirmed)]

    def publish_status(self) -> None:
        """Publish the retained ``online`` status now, if connected."""
        status = dict(self._status())
        with self._lock:
            self._send_locked({"op": "status", "status": status, "publish": True})

    # -- the pipe --------------------------------------------------------------------------------------

    def _request(self, op: str, timeout_s: float = _REPLY_TIMEOUT_S, **fields: Any) -> Any:
        future: Future[Any] = Future()
        with self._lock:
            number = next(self._numbers)
            line = _dumps({"op": op, "n": number, **fields})
            with self._table_lock:
                self._replies[number] = future
            if not self._write_locked(line):
                with self._table_lock:
                    del self._replies[number]
                raise StateError(f"no MQTT link process to take {op!r} (it is starting again)")
        try:
            return future.result(timeout_s)
        except FutureTimeout:
            raise StateError(f"the MQTT link process did not answer {op!r} within {timeout_s:g} s") from None
        finally:
            with self._table_lock:
                self._replies.pop(number, None)

    def _send_locked(self, message: Mapping[str, Any]) -> None:
        self._write_locked(_dumps(message))

    def _write_locked(self, line: bytes) -> bool:
        """Write one line to the process; False when none runs (events are resent to the next one)."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.poll() is not None:
            return False
        try:
            proc.stdin.write(line)
            proc.stdin.flush()
        except (OSError, ValueError):  # it died: the supervisor starts another
            return False
        return True

    # -- the supervisor: starts the process, reads it, restarts it ----------------------------------

    def _supervise(self) -> None:
        """Runs on ``edgeship-link``: on Linux the process dies when the thread that started it ends,
        so this thread starts it and lives as long as the link."""
        first = True
        generation = 0
        while True:
            with self._lock:
                if self._stopping:
                    return
            try:
                proc = spawn("device_runtime.agent.linkproc")
            except OSError as e:
                if first:
                    self._ready.set_exception(StateError(f"cannot start the MQTT link process: {e}"))
                    return
                log.error("cannot restart the MQTT link process: %s", e)
                time.sleep(_RESTART_DELAY_S)
                continue
            assert proc.stdin is not None and proc.stdout is not None
            generation += 1  # its command numbers start at generation * 10**9: a late "done" never matches
            try:
                proc.stdin.write(_dumps({**self._init, "generation": generation}))
                proc.stdin.flush()
            except OSError:  # it died at once: reading it below ends at once too
                pass
            with self._lock:
                if self._stopping:  # stop() ran while it was starting: it must not outlive the agent's link
                    proc.kill()
                    proc.wait()
                    return
                self._proc = proc
                # Events sent before it started or to the one that died, not confirmed: in order.
                with self._table_lock:
                    lines = [self._unconfirmed[n] for n in sorted(self._unconfirmed)]
                for line in lines:
                    self._write_locked(line)
                if not first and self._started and not self._stopping:  # connect again
                    self._send_locked({"op": "start"})
            error = self._read(proc.stdout, first)
            proc.wait()
            self._connected.clear()
            with self._table_lock:
                failed = list(self._replies.values())
            with self._lock:
                stopping = self._stopping
            for future in failed:
                if not future.done():
                    future.set_exception(StateError("the MQTT link process ended"))
            if first and not self._ready.done():
                self._ready.set_exception(error or StateError("the MQTT link process ended at start"))
                return
            if stopping:
                return
            log.error("the MQTT link process ended (exit code %s); starting a new one", proc.returncode)
            first = False
            time.sleep(_RESTART_DELAY_S)

    def _read(self, stdout: IO[bytes], first: bool) -> StateError | None:
        """Handle the process's lines until it ends; the error it reported at start, if any."""
        for line in stdout:
            try:
                message = json.loads(line)
            except ValueError:
                log.error("the MQTT link process wrote %r", line[:200])
                continue
            if "appended" in message:
                with self._table_lock:
                    self._unconfirmed.pop(message["appended"], None)
            elif "reply" in message:
                with self._table_lock:
                    future = self._replies.get(message["reply"])
                if future is not None and not future.done():
                    if "error" in message:
                        future.set_exception(StateError(message["error"]))
                    else:
                        future.set_result(message.get("value"))
            elif "connected" in message:
                (self._connected.set if message["connected"] else self._connected.clear)()
            elif "cmd" in message:
                self._commands.put((message["n"], message["cmd"]))
            elif "status?" in message:  # answered by edgeship-cmd: this thread never writes to the process
                self._commands.put((0, None))
            elif "ready" in message:
                if first:
                    self._ready.set_result(None)
            elif "error" in message:
                return StateError(str(message["error"]))
        return None

    def _send_status(self) -> None:
        try:
            status = dict(self._status())
        except Exception:  # the agent's builder must not take the link down
            log.exception("the status builder failed")
            return
        with self._lock:
            self._send_locked({"op": "status", "status": status})

    def _run_commands(self) -> None:
        """Runs on ``edgeship-cmd``: the agent's handler, one command at a time, then ``done``; and the
        status when the process asks for it."""
        while True:
            item = self._commands.get()
            if item is None:
                return
            number, command = item
            if command is None:
                self._send_status()
                continue
            error = None
            try:
                if self._on_command is not None:
                    self._on_command(command)
            except Exception as e:
                log.exception("command handler failed on command %r", command.get("id"))
                error = repr(e)
            with self._lock:
                self._send_locked({"op": "done", "n": number, "error": error})


# ---- the link process --------------------------------------------------------------------------


class _Child:
    """The link process: a ``DeviceLink`` and its outbox, driven by the agent's lines on stdin."""

    def __init__(self, out: IO[bytes], init: Mapping[str, Any]) -> None:
        self._out = out
        self._out_lock = threading.Lock()
        self._status: dict[str, Any] = {}
        self._status_arrived = threading.Event()
        self._status_fresh = False  # the agent just sent it to be published: no need to ask
        self._done: dict[int, threading.Event] = {}
        self._errors: dict[int, str | None] = {}
        self._numbers = itertools.count(int(init.get("generation", 0)) * 10**9 + 1)
        self._outbox = Outbox(init["outbox"], max_messages=int(init["max_messages"]))
        settings = MqttSettings(**init["settings"])
        self.link = DeviceLink(settings, self._outbox, status=self._ask_status, on_command=self._forward)

    def send(self, message: Mapping[str, Any]) -> None:
        with self._out_lock:
            self._out.write(_dumps(message))
            self._out.flush()

    def _ask_status(self) -> Mapping[str, Any]:
        """On connect (network thread): the agent's current status; the last known after a timeout."""
        if self._status_fresh:
            self._status_fresh = False
            return self._status
        self._status_arrived.clear()
        self.send({"status?": True})
        if not self._status_arrived.wait(_STATUS_TIMEOUT_S):
            log.warning("the agent did not send its status within %s s; using the last one", _STATUS_TIMEOUT_S)
        return self._status

    def _forward(self, command: dict[str, Any]) -> None:
        """On the link's command thread: the agent handles it; the link PUBACKs it after this returns."""
        number = next(self._numbers)
        done = self._done[number] = threading.Event()
        self.send({"cmd": command, "n": number})
        try:
            if not done.wait(_COMMAND_TIMEOUT_S):
                raise StateError(f"the agent did not handle command {command.get('id')!r}")
            error = self._errors.pop(number, None)
            if error is not None:
                raise StateError(f"the agent failed on command {command.get('id')!r}: {error}")
        finally:
            self._done.pop(number, None)

    def watch_connection(self) -> None:
        """Tell the agent when the link is connected or not (polled: every path that drops it counts)."""
        known = None
        while True:
            now = self.link.connected
            if now != known:
                self.send({"connected": now})
                known = now
            time.sleep(0.02)

    def handle(self, message: Mapping[str, Any]) -> bool:
        """One line from the agent; False once it said ``stop``."""
        op = message.get("op")
        if op == "event":
            try:
                self.link.publish_event(message["payload"])
            except Exception:  # a full disk: logged; the event stays unconfirmed and is resent on restart
                log.exception("event could not be queued")
                return True
            self.send({"appended": message["n"]})
        elif op == "status":
            self._status = message["status"]
            self._status_arrived.set()
            if message.get("publish"):
                self._status_fresh = True
                self.link.publish_status()
                self._status_fresh = False
        elif op == "done":
            number = int(message["n"])
            event = self._done.get(number)
            if event is not None:  # else the command of a link process that has died since
                self._errors[number] = message.get("error")
                event.set()
        elif op == "start":
            self.link.start()
        elif op == "stop":
            self.link.stop()
            self._outbox.close()
            return False
        else:
            self._answer(message)
        return True

    def _answer(self, message: Mapping[str, Any]) -> None:
        op, number = message.get("op"), message.get("n")
        try:
            if op == "telemetry":
                value: Any = self.link.publish_telemetry(message["payload"])
            elif op == "flush":  # every event before this line has been handled
                value = None
            elif op == "length":
                value = len(self._outbox)
            elif op == "counters":
                value = dataclasses.asdict(self.link.counters)
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:
            self.send({"reply": number, "error": f"{type(e).__name__}: {e}"})
            return
        self.send({"reply": number, "value": value})


def main() -> None:
    """``python -m device_runtime.agent.linkproc AGENT_PID``: the link process (started by ``LinkProcess``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s link %(levelname)s %(name)s: %(message)s")
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # the protocol owns stdout; anything printed goes to the log
    die_with_parent(int(sys.argv[1]))
    inbox = sys.stdin.buffer
    init = json.loads(inbox.readline())
    try:
        child = _Child(out, init)
    except (EdgeshipError, ValueError, TypeError, KeyError) as e:
        out.write(_dumps({"error": f"cannot open the outbox or the link: {e}"}))
        out.flush()
        return
    child.send({"ready": True})
    threading.Thread(target=child.watch_connection, name="edgeship-link-watch", daemon=True).start()
    for line in inbox:
        if not child.handle(json.loads(line)):
            return
    child.handle({"op": "stop"})  # the agent closed the pipe without a stop: it is gone


if __name__ == "__main__":
    main()
