"""Shared fixtures of the fleet tests: real databases (SQLite files, a real PostgreSQL) and a real Mosquitto.

- ``sqlite_db``: a migrated SQLite file in the test's tmp_path.
- ``pg``: one PostgreSQL server for the session (Debian's ``postgresql``: ``initdb`` and ``pg_ctl`` run as
  the ``postgres`` user when the tests run as root, in a temp folder, on 127.0.0.1 and a free port, the
  unix socket in that folder); stopped and removed at the end. ``pg.new_database()`` makes a fresh,
  migrated database (a copy of a migrated template, so each test starts on its own schema in a few ms);
  ``pg.new_database(migrated=False)`` an empty one.
- ``pg_url``: the URL of an empty database ``edgeship`` on that server (session-scoped).
- ``db``: parametrized over ``sqlite`` and ``postgresql``: a fresh migrated ``Database`` per test.
- ``pg_proxied``: a fresh migrated database on that server reached through a ``TcpProxy`` of the test's own
  (``.url``, ``.proxy``): ``proxy.stop()`` makes the database unreachable (connections dropped, new ones
  refused) without touching the server the other tests share; ``proxy.start()`` brings it back.
- ``broker`` / ``broker_factory``: the device tests' Mosquitto fixture (``tests/device_runtime/agent/agent_parts.py``),
  reused as it is.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "device_runtime" / "agent"))

from agent_parts import Broker, broker, broker_factory, free_port  # noqa: F401  (shared fixtures)

from fleet.db import Database, migrate


def _pg_bin() -> Path:
    """Where ``initdb`` and ``pg_ctl`` are: ``EDGESHIP_PG_BIN``, Debian's versioned folder, or the PATH."""
    candidates = [os.environ.get("EDGESHIP_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    found = shutil.which("initdb")
    candidates += [str(Path(found).parent)] if found else []
    for folder in candidates:
        if folder and (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    pytest.fail("PostgreSQL is not installed (no initdb/pg_ctl): .ci/run must `apt-get install postgresql`")


class PostgresServer:
    """A throwaway PostgreSQL cluster; fsync off (a test database need not survive a power cut)."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.as_root = os.geteuid() == 0
        self.folder = Path(tempfile.mkdtemp(prefix="edgeship-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.user = "postgres" if self.as_root else os.environ.get("USER", "postgres")
        self._names = itertools.count()
        self._template: str | None = None
        if self.as_root:
            shutil.chown(self.folder, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.folder, timeout=120)
        if done.returncode != 0:
            log = (self.folder / "log").read_text() if (self.folder / "log").exists() else ""
            pytest.fail(f"{' '.join(args[:2])} failed: {done.stdout}\n{done.stderr}\n{log[-2000:]}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "--no-sync", "-E", "UTF8")
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w", "start")

    def stop(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, name: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"

    def _create(self, name: str, template: str | None = None) -> None:
        admin = Database(self.url("postgres"))
        try:
            with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                from sqlalchemy import text

                suffix = f" TEMPLATE {template}" if template else ""
                connection.execute(text(f'CREATE DATABASE "{name}"{suffix}'))
        finally:
            admin.close()

    def new_database(self, *, migrated: bool = True) -> str:
        """The URL of a new database: a copy of a migrated template, or empty."""
        name = f"t{next(self._names)}"
        if not migrated:
            self._create(name)
            return self.url(name)
        if self._template is None:
            self._create("edgeship_template")
            template = Database(self.url("edgeship_template"))
            try:
                migrate(template)
            finally:
                template.close()  # CREATE DATABASE .. TEMPLATE needs no one connected to the template
            self._template = "edgeship_template"
        self._create(name, self._template)
        return self.url(name)


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_url(pg: PostgresServer) -> str:
    """An empty database ``edgeship`` on the session's PostgreSQL."""
    pg._create("edgeship")
    return pg.url("edgeship")


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    migrate(database)
    yield database
    database.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A fresh migrated database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
        migrate(database)
    else:
        database = Database(request.getfixturevalue("pg").new_database())
    yield database
    database.close()


class TcpProxy:
    """A TCP relay from a port of its own to ``target``: ``stop()`` drops every connection and refuses new
    ones (a database host gone from the network, as the client sees it), ``start()`` listens again on the
    same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            doomed, self._open = self._open, set()
        for sock in doomed:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by stop()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    client.close()
                    upstream.close()
                    return
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ProxiedDatabase:
    """``url`` reaches the database through ``proxy``. (Not a dataclass: tests/e2e loads this file as a
    module that is not in ``sys.modules``, where ``@dataclass`` cannot resolve its annotations.)"""

    def __init__(self, url: str, proxy: TcpProxy) -> None:
        self.url, self.proxy = url, proxy


@pytest.fixture
def pg_proxied(pg: PostgresServer) -> Iterator[ProxiedDatabase]:
    """A fresh migrated database on the session's PostgreSQL, reached through a proxy the test can stop."""
    direct = pg.new_database()
    proxy = TcpProxy(pg.port)
    proxy.start()
    try:
        yield ProxiedDatabase(direct.replace(f"127.0.0.1:{pg.port}/", f"127.0.0.1:{proxy.port}/"), proxy)
    finally:
        proxy.stop()
