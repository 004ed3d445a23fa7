"""The rollout tables (migration branch ``rollouts``): rollouts, their devices, the audit log, leases, claims.

Devices and releases are referred to by key (device id, bundle sha256), never by foreign key: each domain
migrates on its own. ``rollout_claims`` holds one row per device taken by a pending, running or paused
rollout; its primary key is what makes "at most one active rollout per device" hold even when two
servers create rollouts at the same moment (the second insert fails, on SQLite and PostgreSQL alike).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from fleet.db import Base

__all__ = ["Rollout", "RolloutAudit", "RolloutClaim", "RolloutDevice", "RolloutLease"]


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    release_name: Mapped[str] = mapped_column(String(200))
    release_version: Mapped[int] = mapped_column(Integer)
    selector: Mapped[str] = mapped_column(String(1000))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # RolloutSpec.to_json()
    state: Mapped[str] = mapped_column(String(12), index=True)  # pending|running|paused|completed|aborted|failed
    wave: Mapped[int] = mapped_column(Integer, default=0)  # current wave, 0-based
    wave_started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    soak_since: Mapped[float | None] = mapped_column(Float, nullable=True)
    rate_anchor: Mapped[float] = mapped_column(Float, default=0.0)  # token bucket, see engine
    failures_ack: Mapped[int] = mapped_column(Integer, default=0)
    paused_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    gates: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # last evaluation, for status
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class RolloutDevice(Base):
    __tablename__ = "rollout_devices"

    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer)
    bundle_sha256: Mapped[str] = mapped_column(String(64))
    bundle_url: Mapped[str] = mapped_column(String(2000))
    bundle_size: Mapped[int | None] = mapped_column(Integer, nullable=True)  # bytes
    status: Mapped[str] = mapped_column(String(12))  # pending|sent|active|failed|rolled_back
    deploy_cmd_id: Mapped[str] = mapped_column(String(128))
    rollback_cmd_id: Mapped[str] = mapped_column(String(128))
    sends: Mapped[int] = mapped_column(Integer, default=0)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    done_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    rollback: Mapped[str | None] = mapped_column(String(8), nullable=True)  # wanted|sent|done|failed
    rollback_sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    previous_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    previous_version: Mapped[int | None] = mapped_column(Integer, nullable=True)

    __table_args__ = (Index("ix_rollout_devices_device_id", "device_id"),)


class RolloutAudit(Base):
    __tablename__ = "rollout_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), index=True)
    ts: Mapped[float] = mapped_column(Float)
    action: Mapped[str] = mapped_column(String(40))
    device_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON)
    holder: Mapped[str | None] = mapped_column(String(200), nullable=True)  # which process decided


class RolloutLease(Base):
    __tablename__ = "rollout_leases"

    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200), default="")
    expires_at: Mapped[float] = mapped_column(Float, default=0.0)  # unix s


class RolloutClaim(Base):
    __tablename__ = "rollout_claims"

    device_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), index=True)
