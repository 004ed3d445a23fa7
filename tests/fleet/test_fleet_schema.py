"""The migrations, all domains' branches together, create exactly the schema the ORM declares."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from fleet.db import Database, migrate
from fleet.schema import METADATA

DOMAIN_TABLES = {
    "api_tokens",
    "devices", "device_tags", "device_events", "telemetry",
    "bundles",
    "rollouts", "rollout_devices", "rollout_audit", "rollout_leases", "rollout_claims",
}  # fmt: skip


def _diff(db: Database) -> list[object]:
    with db.engine.connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), METADATA))


def test_migrations_create_exactly_the_orm_schema(db: Database) -> None:
    """Tables, columns, types, indexes and unique constraints, on SQLite and PostgreSQL."""
    assert set(METADATA.tables) == DOMAIN_TABLES
    assert _diff(db) == []
    migrate(db)  # a second start (or a second process) changes nothing
    assert _diff(db) == []


def test_the_comparison_sees_a_missing_schema(tmp_path: Path) -> None:
    empty = Database(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        added = {entry[1].name for entry in _diff(empty) if entry[0] == "add_table"}  # type: ignore[index]
    finally:
        empty.close()
    assert added == DOMAIN_TABLES
