"""Helpers for the agent's child processes (the staging helper, the MQTT link process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["die_with_parent", "spawn"]


def spawn(module: str, *args: str) -> subprocess.Popen[bytes]:
    """``python -m module PARENT_PID args...`` with pipes on stdin and stdout (stderr inherited: its log).

    On Linux the child is killed when the *thread* that spawned it ends (``PR_SET_PDEATHSIG``): spawn it
    from a thread that lives as long as the child should. It runs in its own process group, so a Ctrl-C at
    the terminal (SIGINT to the foreground group) reaches the agent alone, which then stops its children in
    order: the link publishes its clean ``offline`` status instead of dying with a traceback.

    Raises:
        OSError: it cannot be started.
    """
    root = str(Path(__file__).resolve().parents[2])  # the folder holding device_runtime/ and sdk/
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, "-m", module, str(os.getpid()), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group (3.10 has no process_group=0)
    )


def die_with_parent(parent_pid: int) -> None:
    """End this process when its parent ends: at once on Linux, within half a second elsewhere.

    SIGINT and SIGTERM are ignored from here on: the parent decides when a helper stops (it says so on the
    pipe), also when a signal reached every process of the group or of the service (systemd's SIGTERM).
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent_pid:  # it died before prctl
        os._exit(1)
    threading.Thread(target=watch, name="edgeship-parent-watch", daemon=True).start()
