"""An embedded MQTT 3.1.1 broker (amqtt) for laptops, ``make demo`` and tests: ``edgeship broker``.

It keeps sessions, retained messages and QoS 1 queues in memory only, allows anonymous clients and has
no ACL: it is for one machine. Production fleets run Mosquitto (docs/mosquitto/) or another clustered
broker; the device agent speaks the same MQTT to both.

``amqtt`` is imported inside the functions, so ``import fleet`` never needs it. It lives with the fleet side: the
device and the kernel never start a broker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from sdk.errors import TransportError

__all__ = ["EmbeddedBroker", "run_broker", "start_broker_thread"]

log = logging.getLogger(__name__)


def _config(host: str, port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # No packet/event logger plugins: they log every packet at INFO.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def _import_broker() -> Any:
    try:
        from amqtt.broker import Broker
        from amqtt.session import Session
    except ImportError as e:
        raise TransportError("the embedded broker needs amqtt: pip install amqtt") from e

    class _Broker(Broker):  # type: ignore[misc]  # amqtt is untyped
        """amqtt 0.12 sends a connecting client the retained messages of every subscription on the broker,
        anyone's (``client_connected`` loops over all of them): device pi-19 got pi-17's retained ``cmd``
        and every device every retained ``status``. MQTT sends a retained message to a subscription that
        matches it, of the session that holds it: that is checked here."""

        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Session
        ) -> None:
            holders = self._subscriptions.get(subscription[0], ())
            if any(held.client_id == session.client_id for held, _ in holders):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return _Broker


class EmbeddedBroker:
    """An amqtt broker running on its own event loop in a daemon thread; ``stop()`` shuts it down.

    Build it with ``start_broker_thread``.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._broker: Any = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="edgeship-broker", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            broker_class = _import_broker()
            self._broker = broker_class(_config(self.host, self.port), loop=self._loop)
            self._loop.run_until_complete(self._broker.start())
        except BaseException as e:  # reported to start() by the event below
            self._error = e
            self._started.set()
            self._loop.close()
            return
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the thread and wait until the broker listens (``Broker.start`` opened its socket).

        Raises:
            TransportError: amqtt is missing, the port is taken, or the broker did not listen in time.
        """
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TransportError(f"embedded broker did not start within {timeout_s} s")
        if self._error is not None:
            raise TransportError(f"embedded broker failed to start on {self.host}:{self.port}: {self._error}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut the broker down (clients are disconnected) and join its thread; idempotent."""
        if self._broker is None or not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            future.result(timeout_s)
        except Exception:  # shutting down anyway
            log.exception("embedded broker shutdown failed")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)

    def __enter__(self) -> EmbeddedBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_broker_thread(host: str = "127.0.0.1", port: int = 1883) -> EmbeddedBroker:
    """Start an embedded broker in a background thread and return once it listens.

    Raises:
        TransportError: amqtt is missing, the port is taken, or it did not start in time.
    """
    broker = EmbeddedBroker(host, port)
    broker.start()
    return broker


def run_broker(host: str = "127.0.0.1", port: int = 1883, on_ready: Callable[[], None] | None = None) -> None:
    """Run an embedded broker in the foreground until interrupted (Ctrl-C or SIGTERM).

    Args:
        host: address to listen on.
        port: TCP port.
        on_ready: called once the broker listens.

    Raises:
        TransportError: amqtt is missing or the broker cannot listen on ``host:port``.
    """
    with start_broker_thread(host, port) as broker:
        if on_ready is not None:
            on_ready()
        try:
            while broker._thread.is_alive():
                broker._thread.join(0.5)
        except KeyboardInterrupt:
            pass
