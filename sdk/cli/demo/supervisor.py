"""The demo's process supervisor: every process it starts, each in its own process group, ended on exit.

``Supervisor`` starts a command with its output in a log file, waits for a line in that log (or a port),
and ``stop_all()`` ends them in reverse order: SIGTERM to the whole group (the agent's staging and link
helpers, uvicorn's workers), then SIGKILL to what is left after a grace period. ``handle_signals()`` turns
SIGTERM and SIGHUP into ``KeyboardInterrupt``, as Ctrl-C already is, so one ``try/finally`` in the demo
covers a normal end, a failed step, Ctrl-C and ``kill``.

The broker is Mosquitto when it is installed (a config of our own: loopback, a free port, no
persistence), else the embedded broker (``edgeship broker``, MQTT 3.1.1).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from sdk.errors import EdgeshipError

__all__ = ["Broker", "DemoFailed", "Process", "Supervisor", "free_port", "handle_signals", "start_broker"]

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")
TERM_GRACE_S = 10.0  # seconds a process group gets to exit after SIGTERM before SIGKILL


class DemoFailed(EdgeshipError):
    """A demo step did not do what it claims; the message says which and what was seen."""


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Process:
    """One started command: its ``Popen`` (leader of its own process group) and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        """Raises DemoFailed with the end of its log if the process has exited."""
        if not self.alive:
            raise DemoFailed(f"{self.name} exited with status {self.popen.returncode}; log {self.log}:\n{self.tail()}")


class Supervisor:
    """Starts processes in their own process groups and ends every one of them in ``stop_all``."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.env = dict(os.environ if env is None else env)
        self.processes: list[Process] = []

    def start(self, name: str, args: Sequence[str], *, cwd: Path | None = None) -> Process:
        """Start ``args`` with stdout and stderr in ``<log_dir>/<name>.log``, in a new session."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                list(args), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                cwd=cwd, start_new_session=True,
            )  # fmt: skip
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def run(self, name: str, args: Sequence[str], timeout_s: float, env: Mapping[str, str] | None = None) -> None:
        """Run ``args`` to its end in a new session, its output on ours (it is stopped with the others).

        Args:
            env: variables added to the supervisor's environment for this command.

        Raises:
            DemoFailed: it exited non-zero (its own error is printed above) or ran past ``timeout_s``.
        """
        popen = subprocess.Popen(
            list(args), stdin=subprocess.DEVNULL, env={**self.env, **(env or {})}, start_new_session=True
        )
        process = Process(name, popen, Path(os.devnull))
        self.processes.append(process)
        try:
            code = popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise DemoFailed(f"{name} did not finish within {timeout_s:.0f}s") from None
        self.processes.remove(process)
        if code != 0:
            raise DemoFailed(f"{name} exited with status {code} (its message is above)")

    def wait_for_line(self, process: Process, text: str, timeout_s: float) -> str:
        """Wait until ``text`` appears in the process's log; returns that line.

        Raises:
            DemoFailed: the process exited or the line did not come within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            for line in process.tail(200_000).splitlines():
                if text in line:
                    return line
            process.check_alive()
            if time.monotonic() > deadline:
                raise DemoFailed(f"{process.name} did not print {text!r} within {timeout_s:.0f}s:\n{process.tail()}")
            time.sleep(0.1)

    def check_all(self) -> None:
        """Raises DemoFailed if any started process has exited."""
        for process in self.processes:
            process.check_alive()

    def stop_all(self) -> list[str]:
        """End every process group, newest first; returns the names of those that needed SIGKILL."""
        killed: list[str] = []
        for process in reversed(self.processes):
            _signal_group(process.popen, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE_S
        for process in reversed(self.processes):
            try:
                process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append(process.name)
            _signal_group(process.popen, signal.SIGKILL)  # helpers the leader left behind, if any
            try:
                process.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
                killed.append(f"{process.name} (still there)")
        self.processes.clear()
        return killed


def _signal_group(popen: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(popen.pid, signum)  # the leader's pid is its group's id (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def handle_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``KeyboardInterrupt`` in the main thread (as SIGINT does) while inside."""

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@dataclass(frozen=True)
class Broker:
    """The MQTT broker the demo started: its ``kind`` (``mosquitto`` or ``embedded``) and port."""

    kind: str
    port: int
    process: Process

    @property
    def protocol(self) -> str:
        """The MQTT version the fleet server must speak to it (``--broker-protocol``)."""
        return "5" if self.kind == "mosquitto" else "3.1.1"


def find_mosquitto() -> str | None:
    """Mosquitto's path when it is installed (the PATH first, then the usual places), else None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if Path(p).is_file() and os.access(p, os.X_OK)), None)


def _wait_port(process: Process, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            process.check_alive()
            if time.monotonic() > deadline:
                raise DemoFailed(f"{process.name} did not listen on port {port} within {timeout_s:.0f}s") from None
            time.sleep(0.05)


def start_broker(sup: Supervisor, folder: Path, *, embedded: bool = False, say: Callable[[str], None]) -> Broker:
    """Mosquitto on a free loopback port with a config of ours, or the embedded broker.

    Args:
        sup: starts and owns the process.
        folder: for Mosquitto's config file.
        embedded: use the embedded broker even when Mosquitto is installed.
        say: progress lines.

    Raises:
        DemoFailed: the broker exited or did not listen within 15 s.
    """
    port = free_port()
    mosquitto = None if embedded else find_mosquitto()
    if mosquitto is not None:
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "mosquitto.conf"
        lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false", "set_tcp_nodelay true"]
        lines.append(f"user {getpass.getuser()}")  # as root it would drop to "mosquitto" otherwise
        config.write_text("\n".join(lines) + "\n")
        process = sup.start("mosquitto", [mosquitto, "-c", str(config)])
        kind = "mosquitto"
    else:
        cli = [sys.executable, "-m", "sdk.cli", "broker", "--host", "127.0.0.1", "--port", str(port)]
        process = sup.start("broker", cli)
        kind = "embedded"
    _wait_port(process, port, 15.0)
    say(f"MQTT broker: {kind} on 127.0.0.1:{port}" + (f" ({mosquitto})" if mosquitto else " (amqtt)"))
    return Broker(kind, port, process)
