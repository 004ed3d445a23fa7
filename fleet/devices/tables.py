"""The registry's tables (migration branch ``devices``): devices, their tags, their events and telemetry.

A device is keyed by the device segment of its topic (``edgeship/v1/<fleet>/<device_id>/...``): the
topic is the identity, whatever the payload says. Other domains refer to a device by that key; there
are no foreign keys across domains (each migrates on its own), and none inside this one either, so the
ingest can store a device's telemetry in the same batch that first creates the device, in any order.

Times are unix seconds (float). ``received_at`` is the server's clock when the ingest took the message;
``ts`` is the device's clock, kept for display (a device's clock may be wrong, so windows and retention
use ``received_at``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from fleet.db import Base

__all__ = ["MAX_DEVICE_ID_CHARS", "MAX_NAME_CHARS", "Device", "DeviceEvent", "DeviceTag", "Telemetry"]

MAX_DEVICE_ID_CHARS = 128  # characters of a device id (a topic segment); longer topics are dropped at ingest
MAX_NAME_CHARS = 200  # characters of a model name, target, tag key or value, command id


class Device(Base):
    """One device, created by the first message seen from it and updated by its ``status``."""

    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(MAX_DEVICE_ID_CHARS), primary_key=True)
    first_seen: Mapped[float] = mapped_column(Float)  # received_at of its first message
    last_seen: Mapped[float] = mapped_column(Float)  # received_at of its last message (the Last Will excepted), to 1 s
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(10), default="unknown")  # online | offline | unknown (no status yet)
    model_name: Mapped[str | None] = mapped_column(String(MAX_NAME_CHARS), nullable=True)
    model_version: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    model_target: Mapped[str | None] = mapped_column(String(MAX_NAME_CHARS), nullable=True)
    model_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    slot: Mapped[str | None] = mapped_column(String(1), nullable=True)
    capabilities: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    runtime: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    deployment: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    status_ts: Mapped[float | None] = mapped_column(Float, nullable=True)  # device clock of its last status
    status_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # received_at of its last status

    __table_args__ = (Index("ix_devices_online", "online"),)


class DeviceTag(Base):
    """A ``key=value`` label on a device; a device's group is its tag ``group``."""

    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(String(MAX_DEVICE_ID_CHARS), primary_key=True)
    key: Mapped[str] = mapped_column(String(MAX_NAME_CHARS), primary_key=True)
    value: Mapped[str] = mapped_column(String(MAX_NAME_CHARS))

    __table_args__ = (Index("ix_device_tags_key_value", "key", "value"),)


class DeviceEvent(Base):
    """One ``events`` message: a step of a command on a device (``cmd_id`` null: the device acted alone).

    ``digest`` (the payload's SHA-256, first 32 hex digits) is unique per device, so a message the
    broker delivers twice (QoS 1 is at least once) is stored once; a phase the device reports again after
    a restart is a new message (another ``ts``, ``detail.restarted``) and is kept.
    """

    __tablename__ = "device_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(MAX_DEVICE_ID_CHARS))
    cmd_id: Mapped[str | None] = mapped_column(String(MAX_NAME_CHARS), nullable=True)
    phase: Mapped[str] = mapped_column(String(20))
    ts: Mapped[float] = mapped_column(Float)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    received_at: Mapped[float] = mapped_column(Float)
    digest: Mapped[str] = mapped_column(String(32))

    __table_args__ = (
        Index("uq_device_events_device_id_digest", "device_id", "digest", unique=True),
        Index("ix_device_events_device_id_received_at", "device_id", "received_at"),
        Index("ix_device_events_cmd_id", "cmd_id"),
        Index("ix_device_events_received_at", "received_at"),
    )


class Telemetry(Base):
    """One ``telemetry`` window of one device; ``(device_id, seq)`` is the key, so a replay is stored once."""

    __tablename__ = "telemetry"

    device_id: Mapped[str] = mapped_column(String(MAX_DEVICE_ID_CHARS), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ts: Mapped[float] = mapped_column(Float)
    window_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    count: Mapped[int] = mapped_column(BigInteger)  # requests in the window
    errors: Mapped[int] = mapped_column(BigInteger)
    p50_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    p99_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    model_name: Mapped[str | None] = mapped_column(String(MAX_NAME_CHARS), nullable=True)
    model_version: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    model_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    rss_mb: Mapped[float | None] = mapped_column(Float, nullable=True)
    cpu_pct: Mapped[float | None] = mapped_column(Float, nullable=True)
    temperature_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    dropped: Mapped[int] = mapped_column(BigInteger, default=0)  # the device outbox's total drops so far
    received_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        Index("ix_telemetry_received_at", "received_at"),
        Index("ix_telemetry_model_received_at", "model_name", "model_version", "received_at"),
        Index("ix_telemetry_device_id_received_at", "device_id", "received_at"),
    )
