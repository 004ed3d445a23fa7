"""``sdk.fsutil.atomic_write_bytes``: the one temp-and-replace, durable or not."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdk import fsutil


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_write_replaces_whole_and_leaves_no_temp_file(tmp_path: Path, durable: bool) -> None:
    target = tmp_path / "record.json"
    target.write_bytes(b"old")
    fsutil.atomic_write_bytes(target, b"new", durable=durable)
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_not_durable_skips_the_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: calls.append("file"))
    monkeypatch.setattr(fsutil, "fsync_dir", lambda folder: calls.append("dir"))
    fsutil.atomic_write_bytes(tmp_path / "a", b"1", durable=False)
    assert calls == []
    fsutil.atomic_write_bytes(tmp_path / "b", b"2")
    assert calls == ["file", "dir"]


def test_a_failed_write_removes_its_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: str, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil.os, "replace", refuse)
    with pytest.raises(OSError):
        fsutil.atomic_write_bytes(tmp_path / "c", b"3", durable=False)
    assert list(tmp_path.iterdir()) == []
