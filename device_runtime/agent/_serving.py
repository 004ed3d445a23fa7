"""The model the agent serves and the atomic swap: callers never see a half-swapped model."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from device_runtime.agent.slots import SlotInfo
from device_runtime.errors import StateError
from device_runtime.model import Model

__all__ = ["Active", "Serving"]


@dataclass
class Active:
    """A loaded model and the calls running on it."""

    model: Model
    slot: str | None
    info: SlotInfo
    inflight: int = 0
    retired: bool = False
    closed: bool = False


class Serving:
    """Holds the active model. ``swap`` is atomic for callers: a call started before it finishes on
    the old model, every call after it uses the new one, and the old one is closed by whichever of
    ``swap`` or the last in-flight call comes last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: Active | None = None

    @property
    def active(self) -> Active | None:
        with self._lock:
            return self._active

    def acquire(self) -> Active:
        with self._lock:
            active = self._active
            if active is None:
                raise StateError("no model is active on this device yet")
            active.inflight += 1
            return active

    def release(self, active: Active) -> None:
        with self._lock:
            active.inflight -= 1
            close = active.retired and active.inflight == 0 and not active.closed
            active.closed = active.closed or close
        if close:
            active.model.close()

    def swap(self, new: Active | None, *, close_old: bool = True) -> Active | None:
        """Serve ``new`` from now on; return the old one. ``close_old=False``: the caller ``retire``s it later
        (the old model is then still open, but no new call reaches it)."""
        with self._lock:
            old, self._active = self._active, new
        if old is not None and close_old:
            self.retire(old)
        return old

    def retire(self, old: Active) -> None:
        """Close a swapped-out model now, or when its last call returns."""
        with self._lock:
            close = old.inflight == 0 and not old.closed
            old.retired = True
            old.closed = old.closed or close
        if close:
            old.model.close()
