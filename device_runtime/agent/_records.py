"""The agent's small durable records: JSON files replaced atomically (through ``sdk.fsutil``), the
command journal (``commands.jsonl``, append-only) and the bad-bundle list (``bad.json``)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_runtime.errors import StateError
from sdk.fsutil import atomic_write_bytes, fsync_dir, fsync_file, open_private
from sdk.manifest import canonical_json

__all__ = ["BadBundles", "Journal", "flush_json", "read_json", "write_json"]

log = logging.getLogger(__name__)

_KEEP_COMMANDS = 4096  # finished command ids remembered for de-duplication
_COMPACT_SLACK = 1024  # journal lines beyond twice the entries before it is rewritten
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
    """Command ids seen (de-duplication, replay refusal) and OTA commands not yet finished.

    The file (``commands.jsonl``) is append-only: one JSON object per line, the fields an entry changed
    (``{"id": ..., "state": "done", ...}``), so a record costs one small write instead of rewriting every
    entry; it is compacted (rewritten atomically with the live entries only) once it holds more than
    twice as many lines as entries plus ``_COMPACT_SLACK``. A torn last line (a crash or a full disk
    mid-write) is skipped when read, and a failed append is cut off again before the next one.

    Bounds: a full command is kept only while it is queued or running (``cmd`` cleared when done); at
    most ``max_done`` finished ids are remembered, and a finished id whose ``issued_at`` is older than
    ``max_age_s`` is forgotten (a command that old is refused anyway). Forgetting an id issued more
    recently raises the ``horizon``: commands issued at or before it are refused as possible replays
    (``ota.command_refusal``).

    Args:
        path: the journal file.
        legacy: ``commands.json`` of older agents (one JSON object rewritten whole): read once, then
            replaced by ``path``.
        max_done: finished ids remembered.
        max_age_s: the oldest ``issued_at`` accepted, in seconds before now.
        clock: Unix seconds.
    """

    def __init__(
        self,
        path: Path,
        *,
        legacy: Path | None = None,
        max_done: int = _KEEP_COMMANDS,
        max_age_s: float = 7 * 86400.0,  # seconds
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._max_done = max_done
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        self._horizon = 0.0  # issued_at of the newest forgotten id (Unix seconds)
        self._lines = 0
        self._size = 0  # bytes of the file that hold whole lines
        self._read()
        if legacy is not None and legacy.exists():
            raw = read_json(legacy, {})
            for e in raw.get("entries", []) if isinstance(raw, dict) else []:
                if isinstance(e, dict) and isinstance(e.get("id"), str):
                    self._entries.setdefault(e["id"], e)
            try:
                self._compact()
                legacy.unlink()
            except StateError as e:
                log.error("%s not migrated to %s: %s", legacy, path, e)

    @property
    def horizon(self) -> float:
        """Commands issued at or before this (Unix seconds) may have been forgotten: refuse them."""
        return self._horizon

    @property
    def max_age_s(self) -> float:
        return self._max_age_s

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, cmd_id: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._entries.get(cmd_id)
            return dict(entry) if entry else None

    def record(self, cmd_id: str, *, durable: bool = True, **fields: Any) -> None:
        """Add or update an entry (``state``: queued, running or done; ``outcome``; ``cmd``; ``issued_at``).

        ``durable=False``: in place for a restart after kill -9, on disk only after ``flush()``. Nothing
        changes in memory when the write fails.

        Raises:
            StateError: the file cannot be written (full disk, read-only).
        """
        with self._lock:
            self._append({"id": cmd_id, **fields}, durable=durable)
            entry = self._entries.pop(cmd_id, {"id": cmd_id})
            entry.update(fields)
            self._entries[cmd_id] = entry  # most recent last
            self._evict()
            if self._lines > 2 * len(self._entries) + _COMPACT_SLACK:
                try:
                    self._compact()
                except StateError as e:  # the record itself is on disk; compaction can wait
                    log.error("journal not compacted: %s", e)

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

    # -- the file ------------------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            log.error("%s is unreadable (%s); starting it afresh", self._path, e)
            return
        good = 0
        for line in data.split(b"\n"):
            if not line:
                continue
            try:
                fields = json.loads(line)
            except ValueError:
                log.warning("%s: skipping a torn or damaged line", self._path)
                continue
            if not isinstance(fields, dict):
                continue
            good += len(line) + 1
            self._lines += 1
            if isinstance(fields.get("horizon"), (int, float)):
                self._horizon = max(self._horizon, float(fields["horizon"]))
            cmd_id = fields.get("id")
            if isinstance(cmd_id, str):
                entry = self._entries.pop(cmd_id, {"id": cmd_id})
                entry.update(fields)
                self._entries[cmd_id] = entry
        self._size = len(data)
        if not data.endswith(b"\n") and data:  # a torn last line: the next append starts a fresh one
            self._size = len(data) - len(data.rsplit(b"\n", 1)[-1])
        self._evict()

    def _append(self, fields: dict[str, Any], *, durable: bool) -> None:
        line = canonical_json(fields) + b"\n"
        created = not self._path.exists()
        try:
            with open_private(self._path, "ab") as f:  # 0600: commands may hold URL tokens
                if f.tell() != self._size:  # a torn line from a failed append: cut it off
                    f.truncate(self._size)
                    f.seek(self._size)
                try:
                    f.write(line)
                    f.flush()
                except OSError:
                    f.truncate(self._size)
                    raise
                if durable:
                    os.fsync(f.fileno())
            if durable and created:
                fsync_dir(self._path.parent)
        except OSError as e:
            raise StateError(f"cannot write {self._path}: {e.strerror or e}") from e
        self._size += len(line)
        self._lines += 1

    def _evict(self) -> None:
        """Forget finished ids past ``max_done`` or older than ``max_age_s`` (raising the horizon)."""
        oldest_kept = self._clock() - self._max_age_s
        done = [(k, e) for k, e in self._entries.items() if e.get("state") == "done"]
        excess = max(0, len(done) - self._max_done)
        for i, (cmd_id, entry) in enumerate(done):
            issued = entry.get("issued_at")
            old = isinstance(issued, (int, float)) and issued < oldest_kept
            if i < excess or old:
                del self._entries[cmd_id]
                # Also for an id forgotten by age: refused by age only while the wall clock does not go
                # back; a clock set a week ahead, then corrected, would reopen the replay window.
                if isinstance(issued, (int, float)):
                    self._horizon = max(self._horizon, float(issued))

    def _compact(self) -> None:
        lines = [canonical_json({"horizon": self._horizon})]
        lines += [canonical_json({k: v for k, v in e.items() if v is not None}) for e in self._entries.values()]
        data = b"\n".join(lines) + b"\n"
        try:
            atomic_write_bytes(self._path, data)
        except OSError as e:
            raise StateError(f"cannot write {self._path}: {e.strerror or e}") from e
        self._size = len(data)
        self._lines = len(lines)


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
