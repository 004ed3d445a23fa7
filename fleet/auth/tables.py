"""The ``api_tokens`` table (migration branch ``auth``)."""

from __future__ import annotations

from sqlalchemy import Float, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from fleet.db import Base

__all__ = ["ApiToken"]


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(10))  # read | write
    created_at: Mapped[float] = mapped_column(Float)  # unix seconds
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
