"""The crash test hook: with ``EDGESHIP_AGENT_CRASH_AT=<point>`` in the environment the agent SIGKILLs
itself at that point of a deployment (the points are ``CRASH_POINTS``; docs/ota.md describes each).

Tests use it to prove that every step of a deployment is crash-safe. Production code calls
``crash_point`` at each point (a dictionary lookup when the variable is unset); the download gets the
mid-body hook only when the variable asks for it (``download_hook``), so a production download goes
through the plain ``HttpDownloader``.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from device_runtime.agent.download import FetchResponse

__all__ = [
    "CRASH_ENV",
    "CRASH_POINTS",
    "DEPLOY_CRASH_POINTS",
    "FAILURE_CRASH_POINTS",
    "ROLLBACK_CRASH_POINTS",
    "crash_point",
    "download_hook",
    "kill_agent_too",
]

log = logging.getLogger(__name__)

CRASH_ENV = "EDGESHIP_AGENT_CRASH_AT"
# The steps a successful deployment passes, in order.
DEPLOY_CRASH_POINTS = ("downloading", "verifying", "slot_write", "load", "health_check", "pointer_written")
# The steps a ``rollback`` command passes (its trial of the other slot, then its commit).
ROLLBACK_CRASH_POINTS = ("load", "health_check", "pointer_written")
# A failed deployment (the automatic rollback after a failed trial, among others): its terminal record
# (``failed`` / ``rolled_back``) written, before it is reported.
FAILURE_CRASH_POINTS = ("failure_recorded",)
CRASH_POINTS = (*DEPLOY_CRASH_POINTS, *FAILURE_CRASH_POINTS)

_agent_pid: int | None = None  # set in a helper process: the agent it serves, killed with it


def kill_agent_too(agent_pid: int) -> None:
    """In a helper process: a crash point also kills the agent that started it (first)."""
    global _agent_pid
    _agent_pid = agent_pid


def crash_point(name: str) -> None:
    """SIGKILL the agent if the test hook names ``name`` (see ``CRASH_ENV``); in the helper process, the
    agent that started it first, then the helper: a kill -9 of the device agent at that step."""
    if os.environ.get(CRASH_ENV) != name:
        return
    log.warning("test hook %s=%s: killing the agent", CRASH_ENV, name)
    logging.shutdown()
    if _agent_pid is not None:
        os.kill(_agent_pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def download_hook() -> Callable[[FetchResponse], FetchResponse] | None:
    """The downloader's response hook for ``CRASH_ENV=downloading`` (a kill half-way through the body), or
    None (production: no hook)."""
    return _crash_mid_body if os.environ.get(CRASH_ENV) == "downloading" else None


def _crash_mid_body(response: FetchResponse) -> FetchResponse:
    length = int(response.headers.get("content-length", "0") or 0)
    response.body = _CrashingBody(response.body, length)  # type: ignore[assignment]
    return response


class _CrashingBody:
    """A response body that SIGKILLs the agent once half of ``total`` bytes were read."""

    def __init__(self, body: Any, total: int) -> None:
        self._body = body
        self._left = max(1, total // 2)

    def read1(self, n: int) -> bytes:
        chunk: bytes = getattr(self._body, "read1", self._body.read)(min(n, self._left))
        self._left -= len(chunk)
        if self._left <= 0:
            crash_point("downloading")
        return chunk

    read = read1

    def close(self) -> None:
        self._body.close()
