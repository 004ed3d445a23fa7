"""The agent's small durable records: JSON files replaced atomically (through ``sdk.fsutil``), the
command journal (``commands.json``) and the bad-bundle list (``bad.json``)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from device_runtime.errors import StateError
from sdk.fsutil import atomic_write_bytes, fsync_dir, fsync_file
from sdk.manifest import canonical_json

__all__ = ["BadBundles", "Journal", "flush_json", "read_json", "write_json"]

log = logging.getLogger(__name__)

_KEEP_COMMANDS = 512  # finished command ids remembered for de-duplication
_KEEP_BAD = 256  # bad bundle hashes remembered


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        log.error("%s is unreadable (%s); starting it afresh", path, e)
        return default


def write_json(path: Path, value: Any, *, durable: bool = True) -> None:
    """Replace ``path`` atomically (``sdk.fsutil.atomic_write_bytes``).

    ``durable=False`` skips the fsyncs: in place for a restart after kill -9, on disk (power loss) only
    after ``flush_json``; see ``atomic_write_bytes``.

    Raises:
        StateError: it cannot be written.
    """
    try:
        atomic_write_bytes(path, canonical_json(value), durable=durable)
    except OSError as e:
        raise StateError(f"cannot write {path}: {e.strerror or e}") from e


def flush_json(path: Path) -> None:
    """Make a file written with ``write_json(durable=False)`` durable (data, then its name).

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


class Journal:
    """Command ids seen (de-duplication) and OTA commands not yet finished, in ``commands.json``."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        raw = read_json(path, {})
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
            # Changed in a copy, kept only once written: an entry the file cannot hold (NaN, a lone
            # surrogate) must not stay in memory and fail every later record.
            entries = dict(self._entries)
            entry = {**entries.pop(cmd_id, {"id": cmd_id}), **fields}
            entries[cmd_id] = entry  # most recent last
            finished = [k for k, e in entries.items() if e.get("state") == "done"]
            for old in finished[: max(0, len(finished) - _KEEP_COMMANDS)]:
                del entries[old]
            write_json(self._path, {"schema": 1, "entries": list(entries.values())}, durable=durable)
            self._entries = entries

    def flush(self) -> None:
        """Put the last ``record(durable=False)`` on disk.

        Raises:
            StateError: it cannot be flushed.
        """
        flush_json(self._path)

    def unfinished(self) -> list[dict[str, Any]]:
        """OTA commands queued or started but not finished, oldest first."""
        with self._lock:
            return [dict(e) for e in self._entries.values() if e.get("state") in ("queued", "running")]


class BadBundles:
    """sha256 of bundles that failed on this device, in ``bad.json``."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        raw = read_json(path, {})
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
            write_json(self._path, self._bad)
