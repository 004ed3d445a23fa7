"""Private files and folders: 0600 and 0700 whatever the umask."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sdk.fsutil import atomic_write_bytes, make_private_dir, open_private

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX modes")


@pytest.fixture(autouse=True)
def open_umask():
    old = os.umask(0o000)  # the worst case: everything would be world-writable
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_private_dir_created_and_narrowed(tmp_path: Path) -> None:
    assert mode(make_private_dir(tmp_path / "a" / "b")) == 0o700
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    os.chmod(old, 0o755)
    assert mode(make_private_dir(old)) == 0o700


@pytest.mark.parametrize("how", ["xb", "wb", "ab"])
def test_open_private_creates_0600(tmp_path: Path, how: str) -> None:
    with open_private(tmp_path / "f", how) as f:
        f.write(b"x")
    assert mode(tmp_path / "f") == 0o600


def test_atomic_write_is_0600(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "f", b"x")
    assert mode(tmp_path / "f") == 0o600


def test_open_private_refuses_other_modes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        open_private(tmp_path / "f", "w")
