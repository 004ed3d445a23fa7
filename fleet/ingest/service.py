"""MQTT ingest: every device's ``status``, ``telemetry`` and ``events`` into the registry, in batches.

Threads: paho's network loop (our own thread, reconnecting with full-jitter backoff) only queues what
arrives; one writer thread takes up to ``batch_max`` messages or ``batch_wait_s`` worth, checks each with
the MQTT contract (``classify``: the topic is the identity), and stores the batch in one transaction
(``fleet.devices.record_messages``).

No message is lost when the server or the database dies, because the broker keeps every message until
we acknowledge it, and we acknowledge (paho ``manual_ack``, PUBACK) only after the batch's commit. A fleet
process killed mid-batch leaves those messages unacknowledged in its persistent session (MQTT 5,
``clean_start`` off, ``session_expiry_s``); the broker sends them again when a process with the same
``client_id`` connects. Storing twice is harmless: telemetry is keyed by ``(device_id, seq)`` and events
by their digest. Acknowledgements of a previous connection are not sent on the next one (a packet id may
have been reused); those messages come again and are de-duplicated.

Memory is bounded: at most ``4 * receive_maximum`` messages wait in the queue between the network thread
and the writer. When it is full (the database is slow or unreachable: the writer keeps its one batch and
retries with full-jitter backoff up to ``retry_cap_s``), the network thread stops reading the socket and
TCP pushes back to the broker, which keeps the rest queued for our session (Mosquitto's
``max_queued_messages``; past that the broker drops new ones and says so in its log). MQTT 5's
``receive_maximum`` asks the broker to send no more than that many unacknowledged messages (Mosquitto
2.0 does not always honour it for a resumed session's backlog, hence the blocking queue). While the
network thread waits, it sends no keepalive: an outage longer than 1.5 x ``keepalive_s`` costs the
connection, and the unacknowledged messages come again on the next one. QoS 0 messages (which the
contract does not use) are dropped and counted (``overflow``) when the queue is full.

Subscriptions: ``telemetry`` and ``events`` through the shared subscription
``$share/<group>/edgeship/v1/<fleet>/+/<leaf>`` (each message goes to one fleet process); ``status`` without
sharing, so that every process gets the retained statuses when it first subscribes (a broker sends no
retained messages on a shared subscription) and applies every device's statuses in order. A status stored by
two processes is the same update written twice.

A message that does not follow the contract is counted (``dropped_<reason>``, see ``DROP_REASONS``),
acknowledged and dropped; ingest goes on. A message the database refuses (it passed the checks, so
this is a bug) is isolated by splitting the batch, counted (``db_rejected``) and dropped.
"""

from __future__ import annotations

import logging
import random
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fleet.db import Database, is_transient
from fleet.devices import Incoming, record_messages
from fleet.devices.service import LEAVES
from fleet.ingest.classify import classify
from fleet.ingest.settings import IngestSettings
from sdk.mqtt_contract import QOS, TOPIC_PREFIX

__all__ = ["Ingest", "backoff_s", "is_transient"]

log = logging.getLogger(__name__)


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)], so a fleet of
    processes that lost the broker or the database together does not come back in one stampede."""
    return rng() * min(cap_s, base_s * 2 ** min(attempt, 30))


class _Raw(NamedTuple):  # a tuple: built once per message on the network thread, so cheap matters
    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int  # the connection it came on; acknowledged only on that one
    received_at: float


def puback_packets(mids: Iterable[int]) -> bytes:
    """PUBACKs (success, no properties: the same 4 bytes in MQTT 3.1.1 and 5) for ``mids``, back to back."""
    return b"".join(_PUBACK.pack(0x40, 2, mid) for mid in mids)


_PUBACK = struct.Struct("!BBH")
_LAST_SEEN_CACHE_SIZE = 1_000_000  # devices whose committed last_seen the writer remembers


class _ReadAheadClient(paho.Client):
    """paho's client, reading its socket up to 64 KiB at a time.

    paho reads each packet with three or more ``recv`` calls (the type byte, the length bytes one by one,
    the rest) and one ``select`` per packet: at thousands of telemetry messages a second that is most of the
    network thread's time. This keeps what one ``recv`` brought and hands it out as paho asks; the network
    loop drains it (``buffered``) before it waits on the socket again. Only the private ``_sock_recv`` is
    overridden (with ``_handle_on_message``, below); a paho without them works as before, only slower.
    """

    _READ_BYTES = 65536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ahead = bytearray()
        self._ahead_of: object = None  # the socket the bytes came from; a new connection starts empty

    @property
    def buffered(self) -> bool:
        return bool(self._ahead) and self._ahead_of is self._sock

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        # The ingest registers no per-topic callbacks (message_callback_add): straight to on_message, without
        # paho's per-message walk of its topic matcher (a tenth of the network thread's time).
        on_message = self.on_message
        if on_message is not None:
            with self._in_callback_mutex:
                on_message(self, self._userdata, message)

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._ahead_of is not self._sock:
            self._ahead, self._ahead_of = bytearray(), self._sock
        if not self._ahead:
            data: bytes = super()._sock_recv(max(bufsize, self._READ_BYTES))  # BlockingIOError when none
            if len(data) <= bufsize:
                return data  # b"" at the end of the stream, as paho expects
            self._ahead += data
        chunk = bytes(self._ahead[:bufsize])
        del self._ahead[:bufsize]  # cheap at the front of a bytearray
        return chunk


class Ingest:
    """Reads the fleet's devices from the broker into ``db``: ``start()``, ``stop()``, ``counters``.

    Args:
        db: the fleet's database (migrated).
        settings: broker, fleet, client id, share group, tuning.
        clock: unix seconds (``received_at`` of each message); injectable for tests.
        on_stored: called on the writer thread after each batch that stored events or telemetry commits
            (the rollout driver's ``wake``, so a gate is judged on fresh data at once); must not block.
    """

    def __init__(
        self,
        db: Database,
        settings: IngestSettings,
        *,
        clock: Callable[[], float] = time.time,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self._clock = clock
        self.on_stored = on_stored
        # Between the network thread and the writer: appends and pops of a deque are atomic; the events only
        # wake a waiting side (the writer when messages came, the network thread when room was made).
        self._queue: deque[_Raw] = deque()
        self._capacity = 4 * settings.receive_maximum
        self._arrived = threading.Event()
        self._room = threading.Event()
        self._counts: Counter[str] = Counter()
        self._last_seen: dict[str, float] = {}  # devices' committed last_seen (writer thread only)
        self._lock = threading.Lock()
        self._generation = 0
        self._connected = threading.Event()
        self._stopping = threading.Event()  # the writer finishes what is queued and ends
        self._closing = threading.Event()  # the network loop ends after the DISCONNECT is sent
        self._client = self._make_client()
        self._network = threading.Thread(target=self._run_network, name="fleet-ingest-mqtt", daemon=True)
        self._writer = threading.Thread(target=self._run_writer, name="fleet-ingest-writer", daemon=True)

    # ---- public ----------------------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot: ``received``, ``stored_status`` / ``stored_telemetry`` / ``stored_events`` (duplicates
        included), ``dropped_<reason>``, ``db_errors`` (failed commits, retried), ``db_rejected``,
        ``batches``, ``connects``, ``overflow``."""
        with self._lock:
            return dict(self._counts)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Connect (in the background: a broker that is down is retried forever) and start writing."""
        s = self.settings
        if s.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = s.session_expiry_s
            properties.ReceiveMaximum = s.receive_maximum
            self._client.connect_async(s.host, s.port, s.keepalive_s, clean_start=False, properties=properties)
        else:
            self._client.connect_async(s.host, s.port, s.keepalive_s)
        self._writer.start()
        self._network.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Store and acknowledge what is queued (one try), then disconnect; the session stays at the
        broker, so what arrives meanwhile waits there for the next start."""
        self._stopping.set()
        if self._writer.is_alive():
            self._writer.join(timeout_s)
        self._closing.set()
        if self._connected.is_set():
            self._client.disconnect()
        if self._network.is_alive():
            self._network.join(timeout_s)

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until connected and subscribed (SUBACK received); False on timeout."""
        return self._connected.wait(timeout_s)

    # ---- MQTT ------------------------------------------------------------------------------------

    def _make_client(self) -> _ReadAheadClient:
        s = self.settings
        if s.protocol == "5":
            client = _ReadAheadClient(
                CallbackAPIVersion.VERSION2, client_id=s.client_id, protocol=paho.MQTTv5, manual_ack=True
            )
        else:
            client = _ReadAheadClient(
                CallbackAPIVersion.VERSION2, client_id=s.client_id, protocol=paho.MQTTv311, clean_session=False,
                manual_ack=True,
            )  # fmt: skip
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls_ca is not None:
            client.tls_set(ca_certs=s.tls_ca, certfile=s.tls_cert, keyfile=s.tls_key)
        client.max_inflight_messages_set(100)  # our own publishes: none; keeps paho's queue small anyway
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _filters(self) -> list[str]:
        s = self.settings
        root = f"{TOPIC_PREFIX}/{s.fleet}/+"
        shared = f"$share/{s.share_group}/" if s.share_group else ""
        return [f"{root}/status"] + [f"{shared}{root}/{leaf}" for leaf in LEAVES if leaf != "status"]

    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the ingest's connection: %s", reason)
            self._count("connect_refused")
            return
        if self.settings.protocol == "5":
            # Retained statuses only for a new subscription: a resumed session already has them.
            options = SubscribeOptions(qos=QOS, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
            client.subscribe([(f, options) for f in self._filters()])
        else:
            client.subscribe([(f, QOS) for f in self._filters()])
        self._count("connects")

    def _on_subscribe(self, _client: paho.Client, _userdata: Any, _mid: int, reasons: Any, _props: Any) -> None:
        if any(getattr(r, "is_failure", False) for r in reasons):
            log.error("broker refused a subscription of the ingest: %s", reasons)
            self._count("subscribe_refused")
        self._connected.set()

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = ""  # not UTF-8: not a topic of the contract
        raw = _Raw(topic, bytes(message.payload), message.mid, message.qos, self._generation, self._clock())
        while len(self._queue) >= self._capacity:
            if raw.qos == 0:
                self._count("overflow")  # nothing keeps a QoS 0 message for us
                return
            if self._closing.is_set():
                return  # not acknowledged: the broker sends it again on our next session
            # A full queue stops this thread from reading the socket: TCP pushes back to the broker,
            # which keeps the rest queued for our session.
            self._room.clear()
            if len(self._queue) >= self._capacity:
                self._room.wait(0.5)
        self._queue.append(raw)
        if not self._arrived.is_set():
            self._arrived.set()

    def _run_network(self) -> None:
        attempt = 0
        s = self.settings
        while not self._closing.is_set():
            try:
                self._client.reconnect()
            except (OSError, ValueError) as e:
                log.debug("broker %s:%s unreachable: %s", s.host, s.port, e)
                self._closing.wait(backoff_s(attempt, s.reconnect_base_s, s.reconnect_cap_s))
                attempt += 1
                continue
            while True:
                rc = self._client.loop(timeout=0.1)  # waits for the socket, reads a packet, pings when due
                while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._client.buffered:
                    rc = self._client.loop_read()  # the packets that recv already brought
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
                if self._connected.is_set():
                    attempt = 0
            with self._lock:
                self._generation += 1  # acknowledgements of the old connection must not be sent
            self._connected.clear()
            if self._closing.is_set():
                break
            log.info("ingest lost the broker (%s); reconnecting", rc)
            self._closing.wait(backoff_s(attempt, s.reconnect_base_s, s.reconnect_cap_s))
            attempt += 1

    # ---- the writer ----------------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _pop(self, most: int) -> list[_Raw]:
        batch: list[_Raw] = []
        try:
            while len(batch) < most:
                batch.append(self._queue.popleft())
        except IndexError:
            pass
        if batch:
            self._room.set()
        return batch

    def _take(self) -> list[_Raw]:
        """The next batch: up to ``batch_max`` messages, waiting at most ``batch_wait_s`` after the first."""
        if not self._queue:
            self._arrived.clear()
            if not self._queue and not self._arrived.wait(0.1):
                return []
        deadline = time.monotonic() + self.settings.batch_wait_s
        while len(self._queue) < self.settings.batch_max and not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(remaining, 0.005))
        return self._pop(self.settings.batch_max)

    def _run_writer(self) -> None:
        while not self._stopping.is_set():
            batch = self._take()
            if batch and not self._handle(batch):
                return
        # Stopping: what is queued now, once (messages still arriving wait at the broker for the next start).
        left = len(self._queue)
        while left > 0:
            batch = self._pop(min(left, self.settings.batch_max))
            if not batch or not self._handle(batch):
                return
            left -= len(batch)

    def _handle(self, batch: list[_Raw]) -> bool:
        """Check, store and acknowledge one batch; False when told to stop while the database is down."""
        self._count("received", len(batch))
        messages: list[Incoming] = []
        for raw in batch:
            checked = classify(raw.topic, raw.payload, self.settings.fleet, raw.received_at)
            if isinstance(checked, str):
                self._count(f"dropped_{checked}")
                log.debug("dropped a message on %r: %s", raw.topic[:300], checked)
            else:
                messages.append(checked)
        if not self._store(messages):
            return False  # not acknowledged: the broker keeps them for our session
        self._ack(batch)
        return True

    def _store(self, messages: list[Incoming]) -> bool:
        """Commit ``messages``, retrying while the database is unreachable; False if told to stop first."""
        attempt = 0
        while True:
            try:
                try:
                    self._commit(messages)
                except Exception as e:
                    if is_transient(e):
                        raise
                    self._isolate(messages)  # may raise a transient error: the whole batch is retried
                self._count("batches")
                return True
            except Exception as e:
                if not is_transient(e):
                    raise
                self._count("db_errors")
                log.warning("database unavailable, batch of %d kept for retry: %s", len(messages), e)
                if self._stopping.is_set():
                    return False
                self._stopping.wait(backoff_s(attempt, self.settings.retry_base_s, self.settings.retry_cap_s))
                attempt += 1

    def _commit(self, messages: list[Incoming]) -> None:
        if not messages:
            return
        with self.db.session() as session:
            done = record_messages(session, messages, self._last_seen)
        if len(self._last_seen) > _LAST_SEEN_CACHE_SIZE:
            self._last_seen.clear()
        self._last_seen.update(done.last_seen)  # committed: safe to skip reading these again
        self._count("stored_status", done.statuses)
        self._count("stored_telemetry", done.telemetry)
        self._count("stored_events", done.events)
        if self.on_stored is not None and (done.telemetry or done.events or done.statuses):
            self.on_stored()

    def _isolate(self, messages: list[Incoming]) -> None:
        """A batch the database refused for its content: commit halves until the refused message is alone."""
        if len(messages) == 1:
            self._count("db_rejected")
            log.error("the database refused a message of %s on %s; dropped", messages[0].device_id, messages[0].leaf)
            return
        middle = len(messages) // 2
        for half in (messages[:middle], messages[middle:]):
            try:
                self._commit(half)
            except Exception as e:
                if is_transient(e):
                    raise
                self._isolate(half)

    def _ack(self, batch: list[_Raw]) -> None:
        """Acknowledge a stored batch: QoS 1 messages of the current connection, all PUBACKs in one write
        (one system call and one TCP segment for the broker to read, instead of one per message)."""
        with self._lock:
            generation = self._generation
        mids = [raw.mid for raw in batch if raw.qos == 1 and raw.generation == generation]
        queue_packet = getattr(self._client, "_packet_queue", None)
        if mids and queue_packet is not None:
            # paho has no public call for several acknowledgements; its own ack() queues each PUBACK like this.
            queue_packet(paho.PUBACK, puback_packets(mids), 0, 0)
        else:
            for mid in mids:
                self._client.ack(mid, 1)
        for raw in batch:
            if raw.qos == 2 and raw.generation == generation:  # not used by the contract; handled as paho does
                self._client.ack(raw.mid, 2)
