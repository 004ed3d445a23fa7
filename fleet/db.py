"""The fleet's database: one SQLAlchemy 2 engine per process, SQLite by default, PostgreSQL to scale out.

Every domain (``fleet/devices``, ``fleet/releases``, ``fleet/rollouts``, ``fleet/auth``) declares its tables
on ``Base`` and ships its own Alembic revision under ``fleet/migrations/versions`` (one independent
branch per domain, labelled with its name; tables refer to other domains' rows by key, not by foreign
key, so each domain migrates on its own). ``migrate`` runs every branch to its head at start-up, on
SQLite and PostgreSQL alike.

SQLite runs in WAL mode with ``synchronous=NORMAL`` and a busy timeout, so readers never block the
ingest writer and a crash loses at most the last transactions (never corrupts); PostgreSQL is reached
through psycopg 3 (``postgresql+psycopg://``; a plain ``postgresql://`` URL is read as that).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

__all__ = ["Base", "Database", "is_transient", "migrate", "normalise_url"]

MIGRATIONS = Path(__file__).with_name("migrations")

# Constraint names that are the same on every backend, so migrations can refer to them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """The declarative base of every fleet table."""

    metadata = MetaData(naming_convention=NAMING)


def normalise_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` mean psycopg 3; everything else is passed as it is."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


_SQLITE_TRANSIENT = ("locked", "busy", "unable to open", "disk i/o")
_TRANSIENT = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError)


def is_transient(error: BaseException) -> bool:
    """A database error worth retrying (unreachable, locked, a dropped connection, a deadlock, a full pool),
    as opposed to one a given row or query will always cause.

    The one rule for "the database is away for a while": the ingest retries its batch on it, the API
    answers 503 ``unavailable`` on it, the rollout driver waits for its next tick on it.
    """
    if isinstance(error, sa_exc.OperationalError) and isinstance(error.orig, sqlite3.Error):
        # sqlite3 raises OperationalError for a missing table or a syntax error too: only these are outages
        return any(word in str(error.orig).lower() for word in _SQLITE_TRANSIENT)
    if isinstance(error, _TRANSIENT):
        return True
    return isinstance(error, sa_exc.DBAPIError) and bool(error.connection_invalidated)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Database:
    """The engine and a session factory for one database URL.

    Args:
        url: ``sqlite:///path/fleet.db`` (default layout of ``edgeship fleet serve``) or
            ``postgresql://user@host:port/dbname``.
        echo: log every statement (debugging).
    """

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = normalise_url(url)
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
        else:
            kwargs["pool_pre_ping"] = True  # a database restarted under us: reconnect instead of failing once
            kwargs["connect_args"] = {"connect_timeout": 5}  # s: a host gone silent answers 503, not a hung request
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed when the block ends, rolled back when it raises."""
        with self.sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()


def migrate(db: Database, *, attempts: int = 1, wait_s: float = 1.0) -> None:
    """Bring the schema to the head of every domain's migration branch (``alembic upgrade heads``).

    Safe to run from several fleet processes at once on PostgreSQL: Alembic's version table update and
    each revision run in one transaction, and a process that lost the race sees the tables already there.
    ``attempts`` > 1 retries a database that is not reachable yet (``wait_s`` apart).
    """
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(MIGRATIONS / "versions"))
    for attempt in range(attempts):
        try:
            with db.engine.begin() as connection:
                config.attributes["connection"] = connection
                command.upgrade(config, "heads")
            return
        except Exception:
            if attempt + 1 >= attempts:
                raise
            time.sleep(wait_s)
