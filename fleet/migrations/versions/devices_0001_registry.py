"""devices: the registry (devices, device_tags, device_events, telemetry).

Revision ID: devices_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "devices_0001"
down_revision = None
branch_labels = ("devices",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("first_seen", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=True),
        sa.Column("model_version", sa.BigInteger(), nullable=True),
        sa.Column("model_target", sa.String(200), nullable=True),
        sa.Column("model_sha256", sa.String(64), nullable=True),
        sa.Column("slot", sa.String(1), nullable=True),
        sa.Column("capabilities", sa.JSON(), nullable=False),
        sa.Column("runtime", sa.JSON(), nullable=False),
        sa.Column("deployment", sa.JSON(), nullable=True),
        sa.Column("status_ts", sa.Float(), nullable=True),
        sa.Column("status_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("device_id", name="pk_devices"),
    )
    op.create_index("ix_devices_online", "devices", ["online"])

    op.create_table(
        "device_tags",
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("value", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "key", name="pk_device_tags"),
    )
    op.create_index("ix_device_tags_key_value", "device_tags", ["key", "value"])

    op.create_table(
        "device_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("cmd_id", sa.String(200), nullable=True),
        sa.Column("phase", sa.String(20), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("digest", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_device_events"),
    )
    op.create_index("uq_device_events_device_id_digest", "device_events", ["device_id", "digest"], unique=True)
    op.create_index("ix_device_events_device_id_received_at", "device_events", ["device_id", "received_at"])
    op.create_index("ix_device_events_cmd_id", "device_events", ["cmd_id"])
    op.create_index("ix_device_events_received_at", "device_events", ["received_at"])

    op.create_table(
        "telemetry",
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("window_s", sa.Float(), nullable=True),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("p50_ms", sa.Float(), nullable=True),
        sa.Column("p95_ms", sa.Float(), nullable=True),
        sa.Column("p99_ms", sa.Float(), nullable=True),
        sa.Column("model_name", sa.String(200), nullable=True),
        sa.Column("model_version", sa.BigInteger(), nullable=True),
        sa.Column("model_sha256", sa.String(64), nullable=True),
        sa.Column("rss_mb", sa.Float(), nullable=True),
        sa.Column("cpu_pct", sa.Float(), nullable=True),
        sa.Column("temperature_c", sa.Float(), nullable=True),
        sa.Column("dropped", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "seq", name="pk_telemetry"),
    )
    op.create_index("ix_telemetry_received_at", "telemetry", ["received_at"])
    op.create_index("ix_telemetry_model_received_at", "telemetry", ["model_name", "model_version", "received_at"])
    op.create_index("ix_telemetry_device_id_received_at", "telemetry", ["device_id", "received_at"])


def downgrade() -> None:
    op.drop_table("telemetry")
    op.drop_table("device_events")
    op.drop_table("device_tags")
    op.drop_table("devices")
