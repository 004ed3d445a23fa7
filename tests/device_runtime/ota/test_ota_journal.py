"""Issue 14 item 6: the command journal is append-only and bounded; replay of an old command is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_runtime.agent._records import Journal
from device_runtime.agent.ota import command_refusal
from sdk.mqtt_contract import CommandError, CommandTimes, parse_cancel, parse_command_times

NOW = 1_800_000_000.0


def test_a_record_appends_one_line_instead_of_rewriting_the_file(tmp_path: Path) -> None:
    path = tmp_path / "commands.jsonl"
    journal = Journal(path, clock=lambda: NOW)
    journal.record("a", type="deploy", state="queued", cmd={"id": "a", "url": "x" * 1000})
    inode, size = path.stat().st_ino, path.stat().st_size
    journal.record("b", type="ping", state="done", outcome="pong", issued_at=NOW)
    assert path.stat().st_ino == inode  # the same file, appended to
    assert path.stat().st_size - size < 200  # the new line only, not the 1,000-byte command again
    sizes = []
    for i in range(5000):
        journal.record(f"p{i}", type="ping", state="done", outcome="pong", issued_at=NOW, durable=False)
        sizes.append(path.stat().st_size)
    assert max(sizes) < 4096 * 200 + 100_000  # compacted: bounded by the ids remembered, not the history
    reread = Journal(path, clock=lambda: NOW)
    assert reread.get("a") is not None and reread.get("a")["cmd"]["url"] == "x" * 1000  # type: ignore[index]
    assert reread.get("p4999") is not None and reread.unfinished()[0]["id"] == "a"


def test_finished_ids_are_bounded_and_forgetting_raises_the_horizon(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", max_done=10, max_age_s=3600, clock=lambda: NOW)
    for i in range(30):
        journal.record(f"c{i}", type="ping", state="done", outcome="pong", issued_at=NOW - 100 + i)
    journal.record("q", type="deploy", state="queued", cmd={"id": "q"}, issued_at=NOW - 500)
    assert len(journal) == 11 and journal.get("c19") is None and journal.get("c20") is not None
    assert journal.horizon == NOW - 100 + 19  # c19 was the newest forgotten
    assert journal.get("q") is not None  # unfinished commands are never forgotten
    old = Journal(tmp_path / "k", max_done=10, max_age_s=3600, clock=lambda: NOW)
    old.record("ancient", type="ping", state="done", issued_at=NOW - 7200)
    assert old.get("ancient") is None  # older than the age limit: forgotten, and the horizon keeps it
    assert old.horizon == NOW - 7200  # refused by age, and by the horizon once the clock goes back
    reread = Journal(tmp_path / "j", max_done=10, max_age_s=3600, clock=lambda: NOW)
    assert reread.horizon == journal.horizon and len(reread) == 11


def test_an_id_forgotten_while_the_clock_ran_ahead_is_not_replayable_after_it_is_corrected(tmp_path: Path) -> None:
    """A wall clock set 8 days ahead forgets a fresh id by age; corrected back, the id's command would be
    within the age limit again, with its id forgotten: the horizon must refuse it (it did not)."""
    clock = [NOW]
    journal = Journal(tmp_path / "j", max_age_s=7 * 86400, clock=lambda: clock[0])
    journal.record("d1", type="deploy", state="done", outcome="active", issued_at=NOW)
    clock[0] = NOW + 8 * 86400  # the clock jumps ahead; the next record evicts d1 by age
    journal.record("p", type="ping", state="done", outcome="pong", issued_at=clock[0])
    assert journal.get("d1") is None
    clock[0] = NOW + 60  # corrected
    why = command_refusal(
        CommandTimes(NOW), clock[0], horizon=journal.horizon, max_age_s=7 * 86400, require_issued_at=False
    )
    assert why is not None and "replay" in why


def test_a_torn_line_is_skipped_and_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "j"
    journal = Journal(path)
    journal.record("a", type="ping", state="done")
    with open(path, "ab") as f:
        f.write(b'{"id": "b", "sta')  # a crash (or a full disk) mid-append
    again = Journal(path)
    assert again.get("a") is not None and again.get("b") is None
    again.record("c", type="ping", state="done")
    assert [json.loads(line)["id"] for line in path.read_bytes().splitlines()] == ["a", "c"]


def test_the_journal_of_older_agents_is_migrated(tmp_path: Path) -> None:
    legacy = tmp_path / "commands.json"
    entries = [{"id": "old", "type": "deploy", "state": "queued", "cmd": {"id": "old"}}, {"id": "d", "state": "done"}]
    legacy.write_text(json.dumps({"schema": 1, "entries": entries}))
    journal = Journal(tmp_path / "commands.jsonl", legacy=legacy)
    assert not legacy.exists() and journal.get("d") is not None
    assert [e["id"] for e in Journal(tmp_path / "commands.jsonl").unfinished()] == ["old"]


@pytest.mark.parametrize(
    ("times", "require", "refused"),
    [
        (CommandTimes(), False, None),
        (CommandTimes(), True, "no issued_at"),
        (CommandTimes(NOW - 10), False, None),
        (CommandTimes(NOW - 10, NOW - 1), False, "expired"),
        (CommandTimes(None, NOW + 60), False, None),
        (CommandTimes(NOW - 8 * 86400), False, "replay"),
        (CommandTimes(NOW - 1000), False, "replay"),  # at or before the horizon (NOW - 500)
        (CommandTimes(NOW + 30), False, None),  # the fleet's clock ahead of the device's
    ],
)
def test_command_refusal(times: CommandTimes, require: bool, refused: str | None) -> None:
    why = command_refusal(times, NOW, horizon=NOW - 500, max_age_s=7 * 86400, require_issued_at=require)
    assert (why is None) if refused is None else (why is not None and refused in why), why


def test_contract_times_and_cancel() -> None:
    base = {"schema": 1, "id": "c", "type": "cancel"}
    assert parse_command_times({**base, "issued_at": 5, "expires_at": 6}) == CommandTimes(5.0, 6.0)
    for bad in ({"issued_at": "x"}, {"expires_at": -1}, {"issued_at": 9, "expires_at": 8}, {"issued_at": True}):
        with pytest.raises(CommandError):
            parse_command_times({**base, **bad})
    assert parse_cancel({**base, "target": "d1"}) == "d1"
    with pytest.raises(CommandError, match="target"):
        parse_cancel(base)
