"""Creating, checking and revoking API tokens."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.auth.tables import ApiToken
from sdk.errors import InputError

__all__ = ["PREFIX", "SCOPES", "Principal", "create_token", "list_tokens", "revoke_token", "verify_token"]

SCOPES = ("read", "write")
PREFIX = "esf_"  # recognisable in logs and secret scanners


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's row id, name and scope."""

    token_id: int
    name: str
    scope: str

    def allows(self, scope: str) -> bool:
        """``write`` allows everything, ``read`` only reads."""
        return self.scope == "write" or scope == "read"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, name: str, scope: str, *, now: float | None = None) -> str:
    """Store a new token and return its secret (shown once; only its hash is kept).

    Raises:
        InputError: an unknown scope or an empty name.
    """
    if scope not in SCOPES:
        raise InputError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if not name.strip() or len(name) > 100:
        raise InputError("a token needs a name of 1 to 100 characters")
    secret = PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, token_sha256=_digest(secret), scope=scope, created_at=now or time.time()))
    session.flush()
    return secret


def verify_token(session: Session, token: str) -> Principal | None:
    """The token's principal, or None for an unknown or revoked token."""
    if not token.startswith(PREFIX) or len(token) > 200:
        return None
    digest = _digest(token)
    row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == digest))
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.token_sha256, digest):
        return None
    return Principal(row.id, row.name, row.scope)


def list_tokens(session: Session) -> list[ApiToken]:
    """Every token, newest first (hashes only)."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id.desc())))


def revoke_token(session: Session, token_id: int, *, now: float | None = None) -> bool:
    """Revoke a token by id; False when there is no such token."""
    row = session.get(ApiToken, token_id)
    if row is None:
        return False
    if row.revoked_at is None:
        row.revoked_at = now or time.time()
    return True
