"""``edgeship fleet serve``: one process with the REST API, the artifact server, MQTT ingest and the rollout driver.

Start-up order is what makes a restart safe: the schema is migrated first (retrying while the database is
unreachable, e.g. PostgreSQL still booting beside us), then the HTTP socket is bound (a taken port fails
before any background work starts), then the components (ingest, rollout driver) start, then uvicorn
serves in the foreground. SIGTERM or SIGINT stops uvicorn, then the components in reverse order, then
the database; uvicorn's own re-raise of the signal after its shutdown lands on our handler, so the
components always get their ``stop()``.

A component is anything with ``start()`` and ``stop()`` (threads owning their own loops); the domains
provide them and ``COMPONENTS`` lists their factories. A factory returns ``None`` when its domain is not
part of this build, so the server runs with whatever is there.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy.engine import make_url

from fleet.app import create_fleet_app
from fleet.db import Database, migrate
from fleet.settings import FleetSettings
from sdk.errors import EdgeshipError, TransportError

__all__ = ["COMPONENTS", "Component", "FleetServer", "migrate_with_retry", "serve", "shown_url"]

log = logging.getLogger(__name__)


class Component(Protocol):
    """A background part of the server: ``start()`` returns once it runs, ``stop()`` once it stopped."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


ComponentFactory = Callable[[Database, FleetSettings], "Component | None"]


def _missing(error: ModuleNotFoundError, package: str) -> bool:
    """True when ``package`` itself is absent (a component not built), not when it fails to import."""
    return error.name is not None and (error.name == package or package.startswith(error.name + "."))


def _ingest(db: Database, settings: FleetSettings) -> Component | None:
    """The MQTT ingest (``fleet.ingest``) with the broker, fleet and session of ``settings``."""
    try:
        from fleet.ingest import Ingest, IngestSettings  # type: ignore[attr-defined]
    except ModuleNotFoundError as e:
        if _missing(e, "fleet.ingest"):
            return None
        raise
    ca, cert, key = settings.broker_tls_files() or (None, None, None)  # the ingest turns TLS on with a CA file
    ingest_settings = IngestSettings(
        host=settings.broker_host, port=settings.broker_port, fleet=settings.fleet,
        share_group=settings.share_group, client_id=settings.mqtt_client_id, protocol=settings.broker_protocol,
        username=settings.broker_username, password=settings.broker_password(),
        tls_ca=ca, tls_cert=cert, tls_key=key,
    )  # fmt: skip
    component: Component = Ingest(db, ingest_settings)
    return component


class _Rollouts:
    """The rollout driver and its command publisher, started and stopped together."""

    def __init__(self, db: Database, settings: FleetSettings) -> None:
        from fleet.wiring import rollout_driver

        self.driver = rollout_driver(db, settings)

    def start(self) -> None:
        self.driver.start()

    def stop(self) -> None:
        self.driver.stop()  # gives its leases up: another fleet process takes over at once
        close = getattr(self.driver.publisher, "close", None)
        if close is not None:
            close()


class _Retention:
    """Deletes telemetry and events older than ``telemetry_retention_s``, at start and every 10 minutes."""

    every_s = 600.0

    def __init__(self, db: Database, settings: FleetSettings) -> None:
        self.db, self.keep_s = db, settings.telemetry_retention_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-retention", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        from fleet.devices.service import prune

        while not self._stop.is_set():
            try:
                with self.db.session() as session:
                    removed = prune(session, time.time(), self.keep_s)
                if any(removed.values()):
                    log.info("retention: removed %s", removed)
            except Exception:  # the database away for a while: try again next round
                log.exception("retention failed")
            self._stop.wait(self.every_s)


def _freshness(db: Database, settings: FleetSettings) -> Component | None:
    """The signed freshness publisher (``fleet.freshness``), when ``timestamp_key`` is set."""
    if settings.timestamp_key is None:
        return None
    from fleet.freshness import PahoFreshness, paho_connect
    from sdk.signing import KeySigner

    signer = KeySigner.from_file(settings.timestamp_key)  # encrypted: $EDGESHIP_KEY_PASSPHRASE
    component: Component = PahoFreshness(
        settings.fleet, signer, paho_connect(settings, f"{settings.mqtt_client_id}-ts"),
        every_s=settings.freshness_interval_s, lifetime_s=settings.freshness_lifetime_s,
    )  # fmt: skip
    return component


# Started in this order, stopped in reverse: ingest first, so the driver's first tick sees fresh events.
COMPONENTS: list[tuple[str, ComponentFactory]] = [
    ("ingest", _ingest),
    ("rollouts", _Rollouts),
    ("retention", _Retention),
    ("freshness", _freshness),
]


def shown_url(url: str) -> str:
    """A database URL with its password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def migrate_with_retry(
    db: Database, wait_s: float, *, stop: threading.Event | None = None, clock: Callable[[], float] = time.monotonic
) -> None:
    """``fleet.db.migrate``, retried (1 s, then doubling up to 5 s apart) until it works or ``wait_s`` has passed.

    Raises:
        TransportError: the database stayed unreachable (or refused the migration) for ``wait_s``, or
            ``stop`` was set while waiting; the message names the URL (password masked) and the last error.
    """
    deadline = clock() + wait_s
    pause = 1.0
    attempt = 0
    while True:
        attempt += 1
        try:
            migrate(db)
            return
        except Exception as e:
            last = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            left = deadline - clock()
            if left <= 0 or (stop is not None and stop.is_set()):
                raise TransportError(
                    f"database {shown_url(db.url)} unreachable after {attempt} attempts: {last}"
                ) from e
            log.warning("database %s not ready (%s); retrying in %.1f s", shown_url(db.url), last, min(pause, left))
            if stop is not None and stop.wait(min(pause, left)):
                raise TransportError(f"stopped while waiting for database {shown_url(db.url)}") from e
            if stop is None:
                time.sleep(min(pause, left))
            pause = min(pause * 2, 5.0)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise TransportError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class FleetServer:
    """The serve process as an object: ``run()`` blocks until ``request_stop()`` or SIGTERM/SIGINT.

    Args:
        settings: the validated settings (``http_port`` 0 picks a free port; ``settings`` is then updated).
        components: factories to start beside the API; default ``COMPONENTS``.
        announce: called with one line once the server listens (default: print it).
    """

    def __init__(
        self,
        settings: FleetSettings,
        components: list[tuple[str, ComponentFactory]] | None = None,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.factories = list(COMPONENTS if components is None else components)
        self.announce = announce or (lambda line: print(line, flush=True))
        self.started: list[tuple[str, Component]] = []
        self._stop = threading.Event()
        self._uvicorn: Any = None

    def request_stop(self) -> None:
        """Ask ``run()`` to return (safe from any thread and from a signal handler)."""
        self._stop.set()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        self.request_stop()

    def run(self) -> None:
        """Migrate, bind, start the components, serve; then stop everything, whatever ended the serving.

        Raises:
            TransportError: the database stayed unreachable or the port cannot be bound.
        """
        import uvicorn

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        settings = self.settings
        if settings.db_url is None:
            settings.state_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.database_url)
        try:
            migrate_with_retry(db, settings.db_wait_s, stop=self._stop)
            sock = _bind(settings.http_host, settings.http_port)
            try:
                self.settings = settings = dataclasses.replace(settings, http_port=sock.getsockname()[1])
                app = create_fleet_app(db, settings)
                self._start_components(db)
                self._wire(app)
                config = uvicorn.Config(app, log_level="warning", lifespan="auto", access_log=False)
                self._uvicorn = uvicorn.Server(config)
                names = ", ".join(name for name, _ in self.started) or "none"
                self.announce(
                    f"edgeship fleet serving {settings.server_url} (API {settings.server_url}/api/v1, "
                    f"database {shown_url(db.url)}, fleet {settings.fleet!r}, components: {names})"
                )
                if not self._stop.is_set():
                    self._uvicorn.run(sockets=[sock])
            finally:
                sock.close()
        finally:
            self._stop_components()
            db.close()

    def _start_components(self, db: Database) -> None:
        for name, factory in self.factories:
            if self._stop.is_set():
                return
            component = factory(db, self.settings)
            if component is None:
                continue
            try:
                component.start()
            except Exception as e:
                raise EdgeshipError(f"{name} failed to start: {e}") from e
            self.started.append((name, component))

    def _wire(self, app: Any) -> None:
        """The rollout routes get the driver's wake-up, and the ingest wakes the driver after each batch."""
        from fleet.wiring import wire_rollouts

        parts = dict(self.started)
        rollouts = parts.get("rollouts")
        driver = rollouts.driver if isinstance(rollouts, _Rollouts) else None
        wire_rollouts(app, self.settings, driver)
        ingest = parts.get("ingest")
        if driver is not None and ingest is not None and hasattr(ingest, "on_stored"):
            ingest.on_stored = driver.wake

    def _stop_components(self) -> None:
        while self.started:
            name, component = self.started.pop()
            try:
                component.stop()
            except Exception:  # stop the others anyway
                log.exception("%s failed to stop", name)


def serve(settings: FleetSettings) -> None:
    """Run the fleet server in the foreground until SIGTERM or SIGINT (the ``edgeship fleet serve`` command)."""
    FleetServer(settings).run()
