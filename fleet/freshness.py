"""The fleet's signed freshness: a short-lived document, signed with the timestamp key, kept retained on
``edgeship/v1/<fleet>/timestamp`` (``sdk.freshness``, ``sdk.mqtt_contract.Topics.freshness``).

Devices whose trust root has a ``timestamp`` role check it (TUF's timestamp role, adapted): as long as the
fleet keeps publishing, they are ``fresh``; when the newest one they hold expires (the fleet down, or
someone between the fleet and the device withholding it: a freeze), they report themselves ``stale``.

``FreshnessPublisher`` is a server component (``fleet.server.COMPONENTS``, started when
``timestamp_key`` is set): it signs and publishes at start, on every (re)connect to the broker, and every
``freshness_interval_s``; each document is valid for ``freshness_lifetime_s``. Its version is the Unix
time of issue in seconds (at least one more than the last this process issued), so a restarted server
needs no stored counter: its clock must not go back past what it issued before (a device refuses a
lower version and reports itself stale once its newest one expires; fail-visible, never silent).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from sdk.freshness import make_freshness, sign_freshness
from sdk.mqtt_contract import Topics, encode_payload, freshness_payload
from sdk.signing import Signer

__all__ = ["FreshnessPublisher", "PahoFreshness", "freshness_document", "paho_connect"]

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], bool]  # (topic, payload) -> handed to the broker


def freshness_document(signer: Signer, version: int, issued: float, lifetime_s: float,
                       root_version: int | None = None) -> dict[str, Any]:  # fmt: skip
    """One signed freshness document (``sdk.freshness``), issued at Unix time ``issued``."""
    import json

    fresh = make_freshness(
        version, datetime.fromtimestamp(int(issued), timezone.utc), timedelta(seconds=int(lifetime_s)), root_version
    )
    return dict(json.loads(sign_freshness(fresh, [signer])))


class FreshnessPublisher:
    """Signs and publishes the fleet's freshness; ``start()`` / ``stop()`` (a server component).

    Args:
        fleet: the ``<fleet>`` topic segment.
        signer: the timestamp key (a ``KeySigner``, or any ``Signer``: an HSM).
        publish: hands ``(topic, payload)`` to the broker, retained, QoS 1; False when it could not
            (disconnected): the next tick or connect tries again.
        every_s: seconds between documents.
        lifetime_s: how long each is valid (well above ``every_s``: a missed publish is not a freeze).
        root_version: the root the fleet distributes, put in each document (devices with an older root
            report ``root_behind``); None: not said.
        clock: Unix seconds.
    """

    def __init__(
        self, fleet: str, signer: Signer, publish: Publish, *, every_s: float = 3600.0,
        lifetime_s: float = 86400.0, root_version: int | None = None, clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        if not 0 < every_s < lifetime_s:
            raise ValueError(
                f"the freshness interval ({every_s} s) must be > 0 and below its lifetime ({lifetime_s} s)"
            )
        self.topic = Topics(fleet, "fleet").freshness
        self._signer, self._publish, self._clock = signer, publish, clock
        self.every_s, self.lifetime_s, self.root_version = every_s, lifetime_s, root_version
        self._last_version = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-freshness", daemon=True)

    def publish_now(self) -> dict[str, Any] | None:
        """Sign a new document and publish it; the document, or None when the broker did not take it."""
        with self._lock:
            now = self._clock()
            version = max(int(now), self._last_version + 1)
            document = freshness_document(self._signer, version, now, self.lifetime_s, self.root_version)
            if not self._publish(self.topic, encode_payload(freshness_payload(document))):
                log.warning("freshness v%d not published (broker away); retrying", version)
                return None
            self._last_version = version
        log.info("freshness v%d published, until %s", version, document["signed"]["expires"])
        return document

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                done = self.publish_now() is not None
            except Exception:  # a signer away (an HSM): try again soon
                log.exception("freshness could not be signed")
                done = False
            self._stop.wait(self.every_s if done else min(self.every_s, 5.0))


class PahoFreshness:
    """``FreshnessPublisher`` over its own paho client (connected like the command publisher): retained
    QoS 1 publishes, and one more publish on every (re)connect, so a broker that lost its retained
    messages gets the current document back at once."""

    def __init__(self, fleet: str, signer: Signer, connect: Callable[[Callable[[], None]], Any], **kw: Any) -> None:
        self._client: Any = None
        self.publisher = FreshnessPublisher(fleet, signer, self._publish, **kw)
        self._client = connect(self._on_connect)

    def _publish(self, topic: str, payload: bytes) -> bool:
        if self._client is None or not self._client.is_connected():
            return False
        return int(self._client.publish(topic, payload, qos=1, retain=True).rc) == 0

    def _on_connect(self) -> None:
        threading.Thread(target=self.publisher.publish_now, name="fleet-freshness-connect", daemon=True).start()

    def start(self) -> None:
        self.publisher.start()

    def stop(self) -> None:
        self.publisher.stop()
        if self._client is not None:
            self._client.loop_stop()
            self._client.disconnect()


def paho_connect(settings: Any, client_id: str) -> Callable[[Callable[[], None]], Any]:
    """A ``connect`` for ``PahoFreshness``: a paho client to the broker of ``settings`` (``FleetSettings``),
    with the ingest's credentials, MQTT version and TLS files, connecting in the background."""

    def connect(on_connect: Callable[[], None]) -> Any:
        import paho.mqtt.client as paho

        version = paho.MQTTv5 if settings.broker_protocol == "5" else paho.MQTTv311
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version)
        if settings.broker_username is not None:
            client.username_pw_set(settings.broker_username, settings.broker_password())
        tls = settings.broker_tls_files()
        if tls is not None:
            ca, cert, key = tls
            client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)

        def on_connect_cb(_client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
            if getattr(reason, "is_failure", False):
                log.warning("the broker refused the freshness publisher's connection: %s", reason)
                return
            on_connect()

        client.on_connect = on_connect_cb
        client.reconnect_delay_set(1, 5)
        client.connect_async(settings.broker_host, settings.broker_port, keepalive=30)
        client.loop_start()
        return client

    return connect
