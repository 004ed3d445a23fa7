"""Fixtures of the rollout tests: a migrated SQLite database in tmp_path (the PostgreSQL fixture of
tests/fleet/conftest.py will replace it once the branches are merged)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.db import Database, migrate


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    migrate(database)
    yield database
    database.close()
