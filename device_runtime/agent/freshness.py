"""The device's signed freshness (``STATE_DIR/timestamp.json``): what it last heard from the fleet, and when
that went stale.

A root with a ``timestamp`` role (``sdk.trustroot``) asks the device to hear regularly from the fleet:
signed, short-lived freshness metadata (``sdk.freshness``), a retained message on the fleet's freshness
topic. ``FreshnessStore.accept`` takes a newer one by TUF's rules (signed by a threshold of the root's
timestamp keys, unexpired, a version not below the one held: a replayed older one is refused). The one
accepted is written before it is used, so the version floor survives restarts.

``state(now)`` says what the status reports (``trust.freshness``): ``fresh`` until the newest valid
freshness expires, then ``stale`` since its expiry: updates are being withheld (a freeze), or the fleet
is down. A device that never got one is ``missing`` for ``grace_s`` after it started, then stale since
then. The device keeps serving its model either way; ``transition`` tells the agent when to report the
change with an event. When the root changes (``root_changed``), a held freshness that the new root's
timestamp keys did not sign is dropped (TUF deletes its timestamp on a timestamp-key rotation, so a
revoked key's high version cannot block the new key's documents).

A root without a ``timestamp`` role asks for nothing: no state, no events, as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from device_runtime.errors import StateError
from sdk.errors import EdgeshipError, FreshnessError
from sdk.freshness import MAX_FRESHNESS_BYTES, Freshness, check_signed, verify_freshness
from sdk.fsutil import atomic_write_bytes
from sdk.manifest import canonical_json, format_time
from sdk.trustroot import TrustRoot

__all__ = ["FRESHNESS_FILE", "FreshnessStore"]

log = logging.getLogger(__name__)

FRESHNESS_FILE = "timestamp.json"


class FreshnessStore:
    """The freshness a device holds (thread-safe).

    Args:
        state_dir: the agent's folder.
        root: the trust root in force at start.
        started: when the agent started (device clock, UTC): the start of ``missing``'s grace.
        grace_s: how long a device may run without any freshness before it reports itself stale.
    """

    def __init__(self, state_dir: Path, root: TrustRoot, started: datetime, grace_s: float) -> None:
        self._path = state_dir / FRESHNESS_FILE
        self._lock = threading.Lock()
        self._started = started
        self._grace = timedelta(seconds=grace_s)
        self._current: Freshness | None = None
        self._reported: str | None = None  # the state last reported by ``transition``
        if self._path.exists():
            try:
                data = self._path.read_bytes()[: MAX_FRESHNESS_BYTES + 1]
                self._current = check_signed(data, root) if root.timestamp_keys() is not None else None
            except (OSError, EdgeshipError) as e:  # a bad file only costs the floor until the next one
                log.error("%s is not usable freshness (%s); waiting for the fleet's next one", self._path, e)

    @property
    def current(self) -> Freshness | None:
        return self._current

    def accept(self, document: Mapping[str, Any], root: TrustRoot, now: datetime) -> tuple[Freshness, bool]:
        """Take ``document`` if it may replace the one held; ``(freshness held now, whether it is new)``.

        Raises:
            FreshnessError: refused (the one held stays): the root asks for none, bad signatures,
                expired, or older than the one held (a replay).
            StateError: it could not be written (the one held stays).
        """
        with self._lock:
            if check_signed(document, root) == self._current:
                return self._current, False  # the retained message again, on a reconnect (expired or not)
            fresh = verify_freshness(document, root, now=now, current=self._current)
            try:
                atomic_write_bytes(self._path, canonical_json(document))
            except OSError as e:
                raise StateError(f"cannot write {self._path}: {e.strerror or e}") from e
            self._current = fresh
            return fresh, True

    def root_changed(self, root: TrustRoot) -> None:
        """Drop the freshness held when the new root's timestamp keys did not sign it (or it has none)."""
        with self._lock:
            if self._current is None:
                return
            try:
                check_signed(self._path.read_bytes()[: MAX_FRESHNESS_BYTES + 1], root)
                return
            except (OSError, FreshnessError) as e:
                log.warning("freshness v%d dropped under root v%d: %s", self._current.version, root.version, e)
            self._current = None
            self._path.unlink(missing_ok=True)

    def state(self, root: TrustRoot, now: datetime) -> dict[str, Any] | None:
        """The status's ``trust.freshness`` (None: the root asks for none)::

        {"state": "fresh"|"stale"|"missing", "version", "expires", "stale_since", "root_behind"}

        ``root_behind``: the fleet distributes a newer root than the one in force here.
        """
        if root.timestamp_keys() is None:
            return None
        current = self._current
        if current is None:
            since = self._started + self._grace
            state = "stale" if now >= since else "missing"
            return {"state": state, "version": None, "expires": None,
                    "stale_since": format_time(since) if state == "stale" else None, "root_behind": False}  # fmt: skip
        stale = current.expired(now)
        return {
            "state": "stale" if stale else "fresh",
            "version": current.version,
            "expires": current.expires,
            "stale_since": current.expires if stale else None,
            "root_behind": current.root_version is not None and current.root_version > root.version,
        }

    def transition(self, root: TrustRoot, now: datetime) -> dict[str, Any] | None:
        """The state, when it changed to ``stale`` or back since the last call (to report as an event)."""
        state = self.state(root, now)
        name = None if state is None else state["state"]
        with self._lock:
            previous, self._reported = self._reported, name
        if name == previous or name == "missing" or (name == "fresh" and previous in (None, "missing")):
            return None
        return state
