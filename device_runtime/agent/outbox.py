"""A durable outbox: telemetry and events wait here until the broker acknowledges them.

One SQLite file (WAL journal, ``synchronous=FULL``) so a message survives a broker outage, an agent
restart and a power cut once ``append`` has returned. The outbox is bounded: past ``max_messages`` the
oldest messages are dropped and counted in ``dropped``, which persists and is reported to the fleet. A
message the broker refuses (the link finds out, ``DeviceLink``) is moved out of the queue with
``dead_letter``: counted in ``dead_letters`` (reported too), the last ``KEEP_DEAD_LETTERS`` kept for a look.

Sequence numbers (``next_seq``) are durable counters in the same file: a number handed out is committed
before it is returned, so it is never handed out twice, even if the process dies before publishing
(the fleet then sees a gap, never a repeat).

A corrupt database file (power loss on a bad SD card, a stray write) must not put the device in a
crash loop, so by default it is moved aside as ``<name>.corrupt-<unix time>`` and a new outbox is
created. Its counters restart above the **reservation** kept beside it, ``<name>.seq``: before a
sequence number past the reserved ceiling is committed, the next ceiling (``SEQ_BLOCK`` numbers higher)
is written there (atomically, fsynced), so no number the old file handed out is ever above it. The
clock does not decide: a device whose clock jumped back (no RTC, a bad NTP answer) still never repeats a
number. Only where the reservation file is lost too (or unreadable) does the floor fall back to the
current Unix time in milliseconds, as older releases did. Pass ``on_corrupt="raise"`` to get
``OutboxCorruptError`` instead.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from device_runtime.errors import StateError
from sdk.fsutil import PRIVATE_FILE_MODE, atomic_write_bytes

__all__ = ["KEEP_DEAD_LETTERS", "SEQ_BLOCK", "Outbox", "OutboxCorruptError", "OutboxMessage"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    created REAL NOT NULL,
    set_aside REAL NOT NULL
);
"""
_DROPPED = "dropped"
_DEAD = "dead_letters"
KEEP_DEAD_LETTERS = 16  # messages set aside that are kept (the newest); the count covers them all
SEQ_BLOCK = 1024  # sequence numbers reserved at a time in ``<name>.seq`` (one fsynced write per block)


class OutboxCorruptError(StateError):
    """The outbox database file is not a readable SQLite database (or fails its integrity check)."""


@dataclass(frozen=True)
class OutboxMessage:
    """One message waiting for the broker's acknowledgement.

    Attributes:
        id: the outbox's key, passed back to ``Outbox.ack``.
        topic: the MQTT topic.
        payload: the bytes to publish.
        qos: the MQTT QoS (0, 1 or 2).
        created: Unix time (seconds) when it was appended.
    """

    id: int
    topic: str
    payload: bytes
    qos: int
    created: float


class Outbox:
    """A bounded, durable, thread-safe FIFO of MQTT messages in one SQLite file.

    Args:
        path: the database file; its folder must exist.
        max_messages: the most messages kept; appending past it drops the oldest.
        on_corrupt: ``"recreate"`` (default) moves a corrupt file aside and starts empty;
            ``"raise"`` raises ``OutboxCorruptError``.
        clock: returns Unix time in seconds (the ``created`` stamp and the post-corruption seq floor).

    Raises:
        OutboxCorruptError: the file is corrupt and ``on_corrupt="raise"``.
        StateError: the file cannot be opened or created (permissions, missing folder, full disk).
        ValueError: ``max_messages < 1`` or an unknown ``on_corrupt``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_messages: int = 10_000,
        *,
        on_corrupt: Literal["recreate", "raise"] = "recreate",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {max_messages}")
        if on_corrupt not in ("recreate", "raise"):
            raise ValueError(f"on_corrupt must be 'recreate' or 'raise', got {on_corrupt!r}")
        self.path = Path(path)
        self.max_messages = max_messages
        self._clock = clock
        self._lock = threading.Lock()
        self._seq_file = None if str(path) == ":memory:" else self.path.with_name(f"{self.path.name}.seq")
        self._reserved = self._read_reservation()
        try:
            self._db = self._open()
        except OutboxCorruptError:
            if on_corrupt == "raise":
                raise
            self._db = self._recreate()
        self._count = int(self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        self._continue_reservation()

    # -- opening -----------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            _make_private(self.path)
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError) as e:
            raise StateError(f"cannot open outbox {self.path}: {e}") from e
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            db.close()
            if isinstance(e, sqlite3.OperationalError) and not _looks_corrupt(e):
                raise StateError(f"cannot use outbox {self.path}: {e}") from e
            raise OutboxCorruptError(f"outbox {self.path} is corrupt: {e}") from e
        return db

    def _recreate(self) -> sqlite3.Connection:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(self._clock())}")
        log.error("outbox %s is corrupt; moved aside to %s, starting empty", self.path, aside)
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                os.replace(src, f"{aside}{suffix}")
        db = self._open()
        # The old file's counters are lost: restart them above anything it can have handed out (the
        # reservation), and above the clock in milliseconds (older releases' rule, the floor left where the
        # reservation is lost too; a clock that jumped back only makes it lower than the reservation).
        floor = max(self._reserved, int(self._clock() * 1000))
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES ('seq-floor', ?)", (floor,))
        return db

    def _continue_reservation(self) -> None:
        """A database without sequence counters beside a reservation (the file deleted by hand, or lost
        with its ``-wal``): start above the reservation, as after corruption."""
        if self._reserved <= 0:
            return
        with self._lock:
            if self._query("SELECT 1 FROM counters WHERE name = 'seq-floor' OR name LIKE 'seq:%' LIMIT 1"):
                return
            log.warning("outbox %s starts empty; its numbers continue above %d", self.path, self._reserved)
            with self._transaction():
                self._db.execute(
                    "INSERT OR REPLACE INTO counters (name, value) VALUES ('seq-floor', ?)", (self._reserved,)
                )

    # -- writing -----------------------------------------------------------------------------------

    def append(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Store a message durably and return its id; drops the oldest messages past ``max_messages``.

        Raises:
            OutboxCorruptError: the database became unreadable.
            StateError: the write failed (full disk, permissions).
            ValueError: a ``qos`` outside 0..2.
        """
        return self._append(topic, lambda: payload, qos)

    def append_sequenced(
        self, topic: str, build: Callable[[int, int], bytes], qos: int = 1, *, stream: str = "telemetry"
    ) -> tuple[int, int]:
        """Take the next ``seq`` of ``stream`` and append ``build(seq, dropped)`` in one transaction.

        Unlike ``next_seq`` followed by ``append``, no sequence number is lost if the process dies
        between the two. ``dropped`` is the total count dropped so far, to put into the payload.

        Returns:
            ``(message id, seq)``.

        Raises:
            OutboxCorruptError: the database became unreadable.
            StateError: the write failed.
            ValueError: a ``qos`` outside 0..2.
        """
        taken: list[int] = []

        def payload() -> bytes:  # runs inside _append's transaction
            taken.append(self._take_seq(stream))
            return build(taken[0], self._counter(_DROPPED))

        return self._append(topic, payload, qos), taken[0]

    def _append(self, topic: str, payload: Callable[[], bytes], qos: int) -> int:
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        with self._lock, self._transaction():
            body = payload()
            cur = self._db.execute(
                "INSERT INTO messages (topic, payload, qos, created) VALUES (?, ?, ?, ?)",
                (topic, sqlite3.Binary(body), qos, self._clock()),
            )
            msg_id = int(cur.lastrowid or 0)
            excess = self._count + 1 - self.max_messages
            if excess > 0:
                self._db.execute(
                    "DELETE FROM messages WHERE id IN (SELECT id FROM messages ORDER BY id LIMIT ?)", (excess,)
                )
                self._bump(_DROPPED, excess)
            # Update the cached count only once the transaction body has succeeded.
            self._count = self._count + 1 - max(excess, 0)
        return msg_id

    def next_seq(self, stream: str = "telemetry") -> int:
        """Return the next number of ``stream`` (1, 2, ...), committed before it is returned.

        Raises:
            OutboxCorruptError: the database became unreadable.
            StateError: the write failed.
        """
        with self._lock, self._transaction():
            return self._take_seq(stream)

    def ack(self, ids: Iterable[int]) -> None:
        """Forget the messages with these ids (the broker has them); unknown ids are ignored.

        Raises:
            OutboxCorruptError: the database became unreadable.
            StateError: the write failed.
        """
        id_list = list(ids)
        if not id_list:
            return
        with self._lock, self._transaction(durable=False):
            before = self._db.total_changes
            self._db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in id_list])
            self._count -= self._db.total_changes - before

    def dead_letter(self, msg_id: int) -> OutboxMessage | None:
        """Move a message the broker refuses out of the queue, count it, and return it (None if unknown).

        Raises:
            OutboxCorruptError: the database became unreadable.
            StateError: the write failed.
        """
        with self._lock, self._transaction():
            rows = self._query("SELECT id, topic, payload, qos, created FROM messages WHERE id = ?", (msg_id,))
            if not rows:
                return None
            self._db.execute("INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?, ?)", (*rows[0], self._clock()))
            self._db.execute(
                "DELETE FROM dead_letters WHERE id NOT IN (SELECT id FROM dead_letters ORDER BY id DESC LIMIT ?)",
                (KEEP_DEAD_LETTERS,),
            )
            self._db.execute("DELETE FROM messages WHERE id = ?", (msg_id,))
            self._bump(_DEAD, 1)
        with self._lock:
            self._count -= 1
        r = rows[0]
        return OutboxMessage(int(r[0]), str(r[1]), bytes(r[2]), int(r[3]), float(r[4]))

    # -- reading -----------------------------------------------------------------------------------

    def pending(self, limit: int = 100, *, after_id: int = 0) -> list[OutboxMessage]:
        """Return up to ``limit`` messages, oldest first, whose id is greater than ``after_id``.

        Raises:
            OutboxCorruptError: the database became unreadable.
        """
        with self._lock:
            rows = self._query(
                "SELECT id, topic, payload, qos, created FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            )
        return [OutboxMessage(int(r[0]), str(r[1]), bytes(r[2]), int(r[3]), float(r[4])) for r in rows]

    def __len__(self) -> int:
        with self._lock:
            return self._count

    @property
    def dropped(self) -> int:
        """Messages dropped because the outbox was full, in total since the file was created."""
        with self._lock:
            return self._counter(_DROPPED)

    @property
    def dead_letters(self) -> int:
        """Messages set aside with ``dead_letter``, in total since the file was created."""
        with self._lock:
            return self._counter(_DEAD)

    def close(self) -> None:
        """Close the database; later calls raise ``StateError``. Closing twice is harmless."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers (call with the lock held) ----------------------------------------------------------

    def _transaction(self, *, durable: bool = True) -> _Transaction:
        return _Transaction(self._db, self.path, durable=durable)

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise _convert(e, self.path) from e

    def _counter(self, name: str) -> int:
        rows = self._query("SELECT value FROM counters WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else 0

    def _bump(self, name: str, by: int) -> int:
        value = max(self._counter(name), self._counter("seq-floor") if name.startswith("seq:") else 0) + by
        self._db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)", (name, value))
        return value

    def _take_seq(self, stream: str) -> int:
        seq = self._bump(f"seq:{stream}", 1)
        if seq > self._reserved:  # reserve the next block before this number can be committed
            self._reserve(seq + SEQ_BLOCK)
        return seq

    def _read_reservation(self) -> int:
        """The ceiling in ``<name>.seq``, 0 when there is none (or it is unreadable: logged)."""
        if self._seq_file is None:
            return 0
        try:
            text = self._seq_file.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeError) as e:
            log.error("cannot read the outbox's seq reservation %s: %s", self._seq_file, e)
            return 0
        if not text.isdigit():
            log.error("the outbox's seq reservation %s is not a number; ignored", self._seq_file)
            return 0
        return int(text)

    def _reserve(self, ceiling: int) -> None:
        """Write ``ceiling`` to ``<name>.seq`` (durably) before a number up to it is committed.

        Raises:
            StateError: it cannot be written (the transaction rolls back: no number handed out).
        """
        if self._seq_file is not None:
            try:
                atomic_write_bytes(self._seq_file, b"%d\n" % ceiling)
            except OSError as e:
                raise StateError(f"cannot write the outbox's seq reservation {self._seq_file}: {e}") from e
        self._reserved = ceiling


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK``), converting sqlite errors to ours.

    ``durable=False`` commits without waiting for the disk (``synchronous=NORMAL`` for this one
    transaction: in WAL mode it survives a process crash, and a power cut may undo it but never corrupts
    the file; the next durable commit flushes it too). For acknowledgements: an undone delete only means
    the message is published again, a duplicate the contract allows, and it saves one fsync per PUBACK.
    """

    def __init__(self, db: sqlite3.Connection, path: Path, *, durable: bool = True) -> None:
        self._db = db
        self._path = path
        self._durable = durable

    def __enter__(self) -> None:
        try:
            if not self._durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            self._restore()
            raise _convert(e, self._path) from e

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            if exc_type is None:
                try:
                    self._db.execute("COMMIT")
                    return
                except sqlite3.Error as e:
                    self._rollback()
                    raise _convert(e, self._path) from e
            self._rollback()
            if isinstance(exc, sqlite3.Error):
                raise _convert(exc, self._path) from exc
        finally:
            self._restore()

    def _restore(self) -> None:
        if not self._durable:
            try:
                self._db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error:
                pass  # the connection is gone: nothing commits through it any more

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # no transaction open (BEGIN failed) or the connection is gone


def _looks_corrupt(e: sqlite3.Error) -> bool:
    text = str(e).lower()
    return "not a database" in text or "malformed" in text or "corrupt" in text or "quick_check" in text


def _convert(e: sqlite3.Error, path: Path) -> StateError:
    if isinstance(e, sqlite3.DatabaseError) and _looks_corrupt(e):
        return OutboxCorruptError(f"outbox {path} is corrupt: {e}")
    return StateError(f"outbox {path}: {e}")


def _make_private(path: Path) -> None:
    """Create the database file 0600 before SQLite does (its ``-wal`` and ``-shm`` files copy the mode);
    narrow one an older release left readable. Events may repeat what commands said."""
    if str(path) == ":memory:" or os.name != "posix":
        return
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE))
        return
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, PRIVATE_FILE_MODE)
    except OSError as e:  # a read-only disk: SQLite says what it can do with the file
        log.warning("cannot make outbox %s private: %s", path, e)
