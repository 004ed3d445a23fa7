"""rollouts: rollouts, rollout_devices, rollout_audit, rollout_leases, rollout_claims.

Revision ID: rollouts_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "rollouts_0001"
down_revision = None
branch_labels = ("rollouts",)
depends_on = None


def _fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], name=f"fk_{table}_rollout_id_rollouts")


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("release_name", sa.String(200), nullable=False),
        sa.Column("release_version", sa.Integer(), nullable=False),
        sa.Column("selector", sa.String(1000), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("wave_started_at", sa.Float(), nullable=True),
        sa.Column("soak_since", sa.Float(), nullable=True),
        sa.Column("rate_anchor", sa.Float(), nullable=False),
        sa.Column("failures_ack", sa.Integer(), nullable=False),
        sa.Column("paused_reason", sa.Text(), nullable=True),
        sa.Column("gates", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rollouts"),
    )
    op.create_index("ix_rollouts_state", "rollouts", ["state"])
    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(200), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("bundle_sha256", sa.String(64), nullable=False),
        sa.Column("bundle_url", sa.String(2000), nullable=False),
        sa.Column("bundle_size", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("deploy_cmd_id", sa.String(128), nullable=False),
        sa.Column("rollback_cmd_id", sa.String(128), nullable=False),
        sa.Column("sends", sa.Integer(), nullable=False),
        sa.Column("sent_at", sa.Float(), nullable=True),
        sa.Column("last_sent_at", sa.Float(), nullable=True),
        sa.Column("done_at", sa.Float(), nullable=True),
        sa.Column("rollback", sa.String(8), nullable=True),
        sa.Column("rollback_sent_at", sa.Float(), nullable=True),
        sa.Column("previous_name", sa.String(200), nullable=True),
        sa.Column("previous_version", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("rollout_id", "device_id", name="pk_rollout_devices"),
        _fk("rollout_devices"),
    )
    op.create_index("ix_rollout_devices_device_id", "rollout_devices", ["device_id"])
    op.create_table(
        "rollout_audit",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("device_id", sa.String(200), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("holder", sa.String(200), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_rollout_audit"),
        _fk("rollout_audit"),
    )
    op.create_index("ix_rollout_audit_rollout_id", "rollout_audit", ["rollout_id"])
    op.create_table(
        "rollout_leases",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("rollout_id", name="pk_rollout_leases"),
        _fk("rollout_leases"),
    )
    op.create_table(
        "rollout_claims",
        sa.Column("device_id", sa.String(200), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name="pk_rollout_claims"),
        _fk("rollout_claims"),
    )
    op.create_index("ix_rollout_claims_rollout_id", "rollout_claims", ["rollout_id"])


def downgrade() -> None:
    for table in ("rollout_claims", "rollout_leases", "rollout_audit", "rollout_devices", "rollouts"):
        op.drop_table(table)
