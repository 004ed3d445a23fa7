"""releases: the bundles table (a release is the bundles of one name and version, derived).

Revision ID: releases_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "releases_0001"
down_revision = None
branch_labels = ("releases",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bundles",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("label", sa.String(256), nullable=True),
        sa.Column("target", sa.String(32), nullable=False),
        sa.Column("precision", sa.String(32), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("keyids", sa.JSON(), nullable=False),
        sa.Column("manifest", sa.Text(), nullable=False),
        sa.Column("runtime_facts", sa.JSON(), nullable=False),
        sa.Column("storage_path", sa.String(255), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("uploaded_at", sa.Float(), nullable=False),
        sa.Column("retired_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("sha256", name="pk_bundles"),
    )
    op.create_index("ix_bundles_name_version", "bundles", ["name", "version"])


def downgrade() -> None:
    op.drop_index("ix_bundles_name_version", table_name="bundles")
    op.drop_table("bundles")
