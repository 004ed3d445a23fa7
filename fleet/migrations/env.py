"""Alembic environment: migrations run on the connection ``fleet.db.migrate`` hands over (online only)."""

from __future__ import annotations

from alembic import context

from fleet.schema import METADATA as BaseMetadata  # every domain's tables

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=BaseMetadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
