"""The ``bundles`` table (migration branch ``releases``).

A release is not a table: it is the set of bundles sharing one ``(name, version)``, derived by a query.
A release has nothing of its own to store (its name and version are its bundles', it appears with its
first upload and grows with each target or precision), so a second table would only be a second
truth to keep in step; the ``(name, version)`` index makes the grouping as cheap as a lookup.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from fleet.db import Base

__all__ = ["Bundle"]


class Bundle(Base):
    """One verified bundle, stored as ``<store>/<sha256>.edgebundle``; rows are never deleted, only retired."""

    __tablename__ = "bundles"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)  # of the whole archive: its identity
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(BigInteger)
    label: Mapped[str | None] = mapped_column(String(256), nullable=True)
    target: Mapped[str] = mapped_column(String(32))
    precision: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(BigInteger)  # bytes of the archive
    keyids: Mapped[list[str]] = mapped_column(JSON)  # trusted keys whose signatures were valid at upload
    manifest: Mapped[str] = mapped_column(Text)  # the canonical manifest (the signed bytes, as text)
    runtime_facts: Mapped[dict[str, Any]] = mapped_column(JSON)  # sdk.compat.RuntimeFacts.to_dict()
    storage_path: Mapped[str] = mapped_column(String(255))  # relative to the artifact store's folder
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # the manifest's expires (unix s)
    uploaded_at: Mapped[float] = mapped_column(Float)  # unix seconds
    retired_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # never chosen again from then on

    __table_args__ = (Index("ix_bundles_name_version", "name", "version"),)
