"""A single-thread worker that can be abandoned: the deployer's trial loads and health checks run on it
under a timeout (a runtime call cannot be interrupted, so a stuck one is left behind, not joined)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["Worker"]


class Worker:
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
