"""The durable outbox: persistence, the cap, durable sequence numbers, corruption."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from device_runtime.agent.outbox import SEQ_BLOCK, Outbox, OutboxCorruptError
from device_runtime.errors import StateError


def test_messages_survive_reopen_in_order(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        ids = [box.append(f"t/{i}", f"m{i}".encode(), qos=1) for i in range(5)]
        box.ack(ids[:2])
    with Outbox(path) as box:
        assert len(box) == 3
        pending = box.pending()
        assert [m.payload for m in pending] == [b"m2", b"m3", b"m4"]
        assert [m.topic for m in pending] == ["t/2", "t/3", "t/4"]
        assert all(m.qos == 1 for m in pending)
        assert box.pending(limit=2, after_id=pending[0].id) == pending[1:3]


def test_ack_ignores_unknown_ids_and_keeps_the_count_right(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        a = box.append("t", b"a")
        box.ack([a, a, 999])
        assert len(box) == 0
        box.ack([])


def test_cap_drops_oldest_first_and_counts_persistently(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, max_messages=3) as box:
        for i in range(10):
            box.append("t", str(i).encode())
        assert len(box) == 3
        assert [m.payload for m in box.pending()] == [b"7", b"8", b"9"]
        assert box.dropped == 7
    with Outbox(path, max_messages=3) as box:
        assert box.dropped == 7
        box.append("t", b"10")
        assert box.dropped == 8


def test_seq_is_monotonic_per_stream_and_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        assert [box.next_seq() for _ in range(3)] == [1, 2, 3]
        assert box.next_seq("events") == 1
        _, seq = box.append_sequenced("t", lambda s, d: f"{s}:{d}".encode())
        assert seq == 4
        assert box.pending()[-1].payload == b"4:0"
    with Outbox(path) as box:
        assert box.next_seq() == 5
        assert box.next_seq("events") == 2


def _run_until_killed(script: str, path: Path) -> str:
    """Run ``script`` (which ends with a SIGKILL of itself) on the outbox at ``path``; its stdout."""
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    return done.stdout.decode()


def test_seq_never_repeats_after_the_process_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    script = (
        "import os, signal, sys\n"
        "from device_runtime.agent.outbox import Outbox\n"
        "box = Outbox(sys.argv[1])\n"
        "seqs = [box.next_seq() for _ in range(25)]\n"
        "print(seqs[-1], flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)  # no close(), no clean shutdown\n"
    )
    last = int(_run_until_killed(script, path))
    assert last == 25
    with Outbox(path) as box:
        assert box.next_seq() == last + 1


def test_an_ack_survives_kill_9_and_appends_stay_fully_synchronous(tmp_path: Path) -> None:
    """Acks commit without an fsync (a power cut may only bring a message back: a duplicate), but they
    are in the file once ``ack`` returns, and the connection is back on ``synchronous=FULL`` for the
    appends that follow."""
    path = tmp_path / "outbox.db"
    script = (
        "import os, signal, sys\n"
        "from device_runtime.agent.outbox import Outbox\n"
        "box = Outbox(sys.argv[1])\n"
        "ids = [box.append('t', b'%d' % i) for i in range(4)]\n"
        "box.ack(ids[:3])\n"
        "print(box._db.execute('PRAGMA synchronous').fetchone()[0], flush=True)\n"
        "box.append('t', b'after')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert int(_run_until_killed(script, path)) == 2  # FULL
    with Outbox(path) as box:
        assert [m.payload for m in box.pending()] == [b"3", b"after"]


def test_concurrent_appends_from_threads(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        seqs: list[int] = []
        lock = threading.Lock()

        def work() -> None:
            for _ in range(25):
                _, seq = box.append_sequenced("t", lambda s, d: str(s).encode())
                with lock:
                    seqs.append(seq)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(seqs) == list(range(1, 101))
        assert len(box) == 100


def test_corrupt_file_is_moved_aside_and_seq_stays_above_old_values(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        for _ in range(10):
            box.next_seq()
    path.write_bytes(b"this is not sqlite" * 500)
    for extra in ("-wal", "-shm"):
        Path(f"{path}{extra}").unlink(missing_ok=True)
    with Outbox(path, clock=lambda: 1_700_000_000.0) as box:
        assert len(box) == 0
        assert box.next_seq() == 1_700_000_000_001  # Unix ms: above any seq the lost file handed out
        assert box.next_seq("events") == 1_700_000_000_001
    aside = [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert aside == ["outbox.db.corrupt-1700000000"]
    with Outbox(path) as box:  # the new file is healthy
        assert box.next_seq() == 1_700_000_000_002


def test_corrupt_file_raises_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(OutboxCorruptError, match="corrupt"):
        Outbox(path, on_corrupt="raise")
    assert issubclass(OutboxCorruptError, StateError)
    assert path.read_bytes().startswith(b"\x00garbage")  # left alone for inspection


def test_unwritable_location_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError):
        Outbox(tmp_path / "missing-folder" / "o.db")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Outbox(tmp_path / "o.db", max_messages=0)
    with Outbox(tmp_path / "o.db") as box, pytest.raises(ValueError):
        box.append("t", b"x", qos=3)


def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is not sqlite" * 500)
    for extra in ("-wal", "-shm"):
        Path(f"{path}{extra}").unlink(missing_ok=True)


def test_rebuilt_outbox_never_reuses_a_seq_after_the_clock_jumped_back(tmp_path: Path) -> None:
    """A device without an RTC boots in 1970 (or NTP sets it back): the clock floor of a rebuild would
    fall below the numbers the lost file handed out. The reservation beside it (``outbox.db.seq``) keeps
    every rebuilt outbox above them, however often it is rebuilt and whatever the clock says."""
    path = tmp_path / "outbox.db"
    with Outbox(path, clock=lambda: 1_800_000_000.0) as box:  # a first rebuild far in the "future"
        last = max(box.next_seq() for _ in range(10))
    _corrupt(path)
    with Outbox(path, clock=lambda: 1_800_000_000.0) as box:
        high = [box.next_seq() for _ in range(SEQ_BLOCK + 5)]  # crosses one reservation block
        assert high[0] > last
        last = high[-1]
    _corrupt(path)
    with Outbox(path, clock=lambda: 1_600_000_000.0) as box:  # the clock jumped back by ~6 years
        assert box.next_seq() > last
        _, seq = box.append_sequenced("t", lambda s, d: b"x")
        assert seq > last
        last = seq
    _corrupt(path)
    with Outbox(path, clock=lambda: 0.0) as box:  # 1970
        assert box.next_seq() > last


def test_a_deleted_outbox_continues_above_the_reservation(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        last = max(box.next_seq() for _ in range(5))
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with Outbox(path, clock=lambda: 0.0) as box:
        assert box.next_seq() > last
        assert box.next_seq("events") > last
    reserved = int((tmp_path / "outbox.db.seq").read_text())
    assert reserved >= last + SEQ_BLOCK // 2
    assert (tmp_path / "outbox.db.seq").stat().st_mode & 0o077 == 0


def test_unusable_reservation_falls_back_to_the_clock(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        box.next_seq()
    (tmp_path / "outbox.db.seq").write_text("garbage")
    _corrupt(path)
    with Outbox(path, clock=lambda: 1_700_000_000.0) as box:
        assert box.next_seq() == 1_700_000_000_001


def test_a_reservation_that_cannot_be_written_hands_out_no_number(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        (tmp_path / "outbox.db.seq").mkdir()  # os.replace onto a folder fails (the file is not there yet)
        box._reserved = 0  # force a reservation on the next number
        with pytest.raises(StateError, match="reservation"):
            box.next_seq()
        (tmp_path / "outbox.db.seq").rmdir()
        assert box.next_seq() == 1  # the failed take was rolled back
