"""The device's MQTT link to the fleet, on paho-mqtt 2.x (``CallbackAPIVersion.VERSION2``).

Topics, payloads and their bounds are the MQTT contract, ``sdk.mqtt_contract`` (docs/mqtt.md): this module
is its device end over a real broker, and validates nothing the contract does not say.

What ``DeviceLink`` guarantees:

- **Status.** Each connection sets a retained Last Will (``mqtt_contract.offline_status``)
  on ``status`` (QoS 1; ``ts`` is the time of that connection, the broker sends the will when the
  connection dies) and, once connected, publishes the retained ``online`` status the agent builds.
  ``stop()`` publishes the same ``offline`` status itself, since a clean disconnect suppresses the will.
- **Telemetry and events are at-least-once.** ``publish_telemetry`` / ``publish_event`` only append to
  the durable ``Outbox`` and return. A drain thread publishes at QoS 1 while connected and deletes a
  message from the outbox only when its PUBACK arrives, so a broker restart, a dropped link or an agent
  restart loses nothing; the fleet removes duplicates by ``(device, seq)``.
- **Commands.** ``cmd`` is subscribed at QoS 1 on a persistent session (MQTT 3.1.1, ``clean_session=False``,
  fixed client id), so commands sent while the device was offline arrive on reconnect. Only messages on
  the device's own ``cmd`` topic are commands (a broker may hand out others: counted in ``foreign_msgs``);
  the fleet's retained freshness (``Topics.freshness``, signed: ``sdk.freshness``) is subscribed too and
  handed over the same way (a ``timestamp`` message).
  Each payload that ``mqtt_contract.decode_payload`` accepts (a bounded, strict JSON object) is handed to
  ``on_command`` on a dispatcher thread, in order; anything else is logged and counted in
  ``malformed_cmds``. A command's PUBACK is sent only after ``on_command`` returned (paho's
  ``manual_ack``), so a handler that records the command durably closes the window in which a crash
  after the PUBACK loses it: a command killed before its PUBACK is redelivered by the broker, and the
  agent de-duplicates by ``id``. An ack for a connection that has since dropped is not sent (the broker
  redelivers on the new session). Every message is acknowledged, whatever it holds: one that cannot be
  handled must not come back on every reconnect; a handler that raises is answered with one bounded
  ``failed`` event.
- **A message the broker refuses is set aside.** A broker closes the connection on a packet it will not
  take (Mosquitto's ``max_packet_size``), on every try. When a connection drops with outbox messages
  unacknowledged, the oldest of them is suspect: it is sent alone on the next connections; if the
  connection drops with it alone in flight ``dead_letter_after`` times in a row, it is moved out of the
  queue (``Outbox.dead_letter``, counted in ``dead_letters`` and in telemetry) and the rest flows.
- **Reconnects** run forever with full-jitter exponential backoff (``_backoff.Backoff``), from this
  module's own network thread; paho's un-jittered automatic reconnect is never used. A broker that is
  down at start is fine.

Threads: ``edgeship-mqtt`` (network I/O and reconnects; every paho callback runs here),
``edgeship-outbox`` (drain) and ``edgeship-cmd`` (command dispatch).
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from device_runtime.agent._backoff import Backoff
from device_runtime.agent.outbox import Outbox
from sdk.errors import TransportError
from sdk.mqtt_contract import (
    SCHEMA,
    ContractError,
    Topics,
    check_segment,
    client_id,
    clip,
    command_ref,
    decode_payload,
    encode_payload,
    event_payload,
    offline_status,
)

# SCHEMA and Topics are the contract's (sdk.mqtt_contract), named here too for the link's users.
__all__ = ["SCHEMA", "DeviceLink", "LinkCounters", "MqttSettings", "Topics"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MqttSettings:
    """How to reach the broker, and the link's tuning values.

    Attributes:
        host: broker host name or address.
        port: broker port (1883 plain, 8883 TLS by convention).
        device_id: this device's id; one MQTT topic segment (no ``/``, ``+``, ``#``).
        fleet: the fleet name, one topic segment.
        client_id: MQTT client id; ``edgeship-<device_id>`` when empty. Must be stable: the persistent
            session (queued commands) is keyed by it.
        ca_file: CA bundle to verify the broker with; setting it turns TLS on.
        cert_file: client certificate (PEM) for mutual TLS.
        key_file: the client certificate's private key (PEM).
        username: MQTT user name (with Mosquitto's ACL example: the device id).
        password: MQTT password.
        keepalive_s: MQTT keepalive; the broker declares the device dead after 1.5x this.
        connect_timeout_s: how long a TCP connect plus CONNACK may take.
        backoff_base_s: ceiling of the first reconnect delay.
        backoff_cap_s: largest reconnect delay ceiling.
        max_inflight: outbox messages published and not yet acknowledged, at most.
        stop_timeout_s: how long ``stop()`` waits for the offline status's PUBACK and for threads.
        persistent_session: keep the MQTT session (``clean_session=False``) so the broker queues QoS 1
            commands while the device is offline. Turn off only for throw-away test clients.
        dead_letter_after: connections lost in a row with one outbox message alone in flight before it is
            set aside as one the broker refuses.
    """

    host: str
    port: int
    device_id: str
    fleet: str = "default"
    client_id: str = ""
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30  # seconds
    connect_timeout_s: float = 10.0  # seconds
    backoff_base_s: float = 0.5  # seconds
    backoff_cap_s: float = 60.0  # seconds
    max_inflight: int = 20  # messages
    stop_timeout_s: float = 5.0  # seconds
    persistent_session: bool = True
    dead_letter_after: int = 3  # connections lost

    def __post_init__(self) -> None:
        check_segment("device_id", self.device_id)
        check_segment("fleet", self.fleet)
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {self.max_inflight}")
        if self.dead_letter_after < 1:
            raise ValueError(f"dead_letter_after must be >= 1, got {self.dead_letter_after}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")

    @property
    def effective_client_id(self) -> str:
        """The client id actually sent to the broker."""
        return self.client_id or client_id(self.device_id)


@dataclass(frozen=True)
class LinkCounters:
    """A snapshot of what a ``DeviceLink`` has done since it was created.

    Attributes:
        published: outbox messages handed to the broker (retransmissions after a restart count again).
        acked: outbox messages whose PUBACK arrived (and were deleted from the outbox).
        connects: successful connections (CONNACK accepted).
        reconnects: successful connections after the first.
        connect_failures: connection attempts that failed (refused, timed out, rejected CONNACK).
        commands: valid commands received.
        malformed_cmds: ``cmd`` payloads that ``mqtt_contract.decode_payload`` refused (not a bounded UTF-8
            JSON object).
        command_errors: commands whose ``on_command`` raised (each answered with a ``failed`` event).
        foreign_msgs: messages on a topic other than the device's ``cmd`` (acknowledged, not handled).
        dead_letters: outbox messages set aside because the broker refused them (``Outbox.dead_letter``).
    """

    published: int = 0
    acked: int = 0
    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    commands: int = 0
    malformed_cmds: int = 0
    command_errors: int = 0
    foreign_msgs: int = 0
    dead_letters: int = 0


StatusBuilder = Callable[[], Mapping[str, Any]]
CommandHandler = Callable[[dict[str, Any]], None]


class DeviceLink:
    """The device end of the MQTT contract: status, durable telemetry/events, and commands.

    Args:
        settings: broker address, identity, TLS and tuning.
        outbox: where telemetry and events wait for their PUBACK; the link does not close it.
        status: builds the ``online`` status payload (``model``, ``runtime``, ``capabilities``, ...);
            called on every connect and by ``publish_status``. ``schema``, ``state`` and ``ts`` are set
            by the link.
        on_command: called with each valid command dict on the ``edgeship-cmd`` thread.
        clock: monotonic seconds (connect timeouts).
        wall_clock: Unix seconds (``ts`` fields).
        rng: randomness for the backoff jitter.

    Use as a context manager or call ``start()`` and ``stop()``.
    """

    def __init__(
        self,
        settings: MqttSettings,
        outbox: Outbox,
        *,
        status: StatusBuilder,
        on_command: CommandHandler | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.topics = Topics(settings.fleet, settings.device_id)
        self._outbox = outbox
        self._status = status
        self._on_command = on_command
        self._clock = clock
        self._wall_clock = wall_clock
        self._backoff = Backoff(settings.backoff_base_s, settings.backoff_cap_s, rng or random.Random())

        self._stop = threading.Event()
        self._connected = threading.Event()
        self._wake_drain = threading.Event()
        self._acked_mids: queue.SimpleQueue[int] = queue.SimpleQueue()
        # command, then (paho mid, qos, connection number) for its PUBACK
        self._commands: queue.SimpleQueue[tuple[dict[str, Any], tuple[int, int, int]] | None] = queue.SimpleQueue()
        self._connection = 0  # bumped on every CONNACK: acks of older connections are not sent
        self._subscribe_mid: int | None = None
        # paho mid -> outbox id, under _inflight_lock: the drain publishes, the network thread forgets them
        # when a connection ends (with _suspect, the message sent alone until it is acknowledged)
        self._inflight: dict[int, int] = {}
        self._inflight_lock = threading.Lock()
        self._suspect: int | None = None  # outbox id of a message that may be one the broker refuses
        self._strikes = 0  # connections lost in a row with _suspect alone in flight
        self._counters = LinkCounters()
        self._counter_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._client = self._make_client()

    # -- public API --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the network, drain and command threads; returns at once (the broker may be down).

        Raises:
            RuntimeError: already started.
        """
        if self._threads:
            raise RuntimeError("DeviceLink.start() called twice")
        for name, target in (
            ("edgeship-outbox", self._run_drain),
            ("edgeship-cmd", self._run_commands),
            ("edgeship-mqtt", self._run_network),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        """Publish the ``offline`` status if connected, disconnect and join the threads.

        Waits at most about ``settings.stop_timeout_s`` in all. Messages still in the outbox stay there
        for the next link on the same outbox. Safe to call twice or without ``start()``; a stopped link
        cannot be started again (make a new one).
        """
        self._stop.set()
        self._wake_drain.set()
        self._commands.put(None)
        deadline = self._clock() + self.settings.stop_timeout_s
        for thread in self._threads:
            if thread is threading.current_thread():  # stop() called from on_command
                continue
            thread.join(timeout=max(0.1, deadline - self._clock()))
            if thread.is_alive():
                log.warning("thread %s did not stop within %.1f s", thread.name, self.settings.stop_timeout_s)

    def __enter__(self) -> DeviceLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        """True while a session is established and the ``cmd`` subscription acknowledged (SUBACK)."""
        return self._connected.is_set()

    @property
    def counters(self) -> LinkCounters:
        """A consistent snapshot of the counters."""
        with self._counter_lock:
            return self._counters

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until connected; return False after ``timeout_s`` seconds."""
        return self._connected.wait(timeout_s)

    def wait_drained(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty (everything acknowledged); return False after ``timeout_s``."""
        deadline = self._clock() + timeout_s
        while len(self._outbox) > 0:
            if self._clock() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def publish_telemetry(self, payload: Mapping[str, Any]) -> int:
        """Queue a telemetry message durably and return its ``seq``.

        Sets ``schema`` and ``ts`` unless given, and always ``seq`` (from the outbox's durable counter),
        ``dropped`` (messages the full outbox has dropped so far, in total) and ``dead_letters`` (messages
        set aside because the broker refused them, in total).

        Raises:
            ValueError: the payload is not JSON-serialisable (NaN and infinity included) or over the
                contract's ``MAX_PAYLOAD_BYTES``.
            StateError: the outbox could not store it (``OutboxCorruptError`` if its file is corrupt).
        """
        base = self._stamp(payload)

        dead_letters = self._outbox.dead_letters

        def build(seq: int, dropped: int) -> bytes:
            return encode_payload({**base, "seq": seq, "dropped": dropped, "dead_letters": dead_letters})

        encode_payload(base)  # fail on bad payloads before a seq is taken
        _, seq = self._outbox.append_sequenced(self.topics.telemetry, build, qos=1, stream="telemetry")
        self._wake_drain.set()
        return seq

    def publish_event(self, payload: Mapping[str, Any]) -> int:
        """Queue an event (``cmd_id``, ``phase``, ``detail``) durably; return its outbox id.

        Sets ``schema`` and ``ts`` unless given.

        Raises:
            ValueError: the payload is not JSON-serialisable or over the contract's ``MAX_PAYLOAD_BYTES``.
            StateError: the outbox could not store it.
        """
        msg_id = self._outbox.append(self.topics.events, encode_payload(self._stamp(payload)), qos=1)
        self._wake_drain.set()
        return msg_id

    def publish_status(self) -> None:
        """Publish the retained ``online`` status now (after a deploy), if connected.

        Not queued: if the link is down, the next connect publishes a fresh status anyway.
        """
        if self.connected:
            self._publish_online()

    # -- paho client and callbacks (network thread) -----------------------------------------------

    def _make_client(self) -> paho.Client:
        s = self.settings
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.effective_client_id,
            clean_session=not s.persistent_session,
            protocol=paho.MQTTv311,
            reconnect_on_failure=False,
            manual_ack=True,  # PUBACK a command once on_command has recorded it (_run_commands)
        )
        client.connect_timeout = s.connect_timeout_s
        client.max_inflight_messages_set(s.max_inflight + 2)  # room for the status publishes
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.ca_file is not None:
            try:
                client.tls_set(ca_certs=s.ca_file, certfile=s.cert_file, keyfile=s.key_file)
            except (OSError, ValueError) as e:
                raise TransportError(f"cannot set up TLS with {s.ca_file}: {e}") from e
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _on_connect(self, client: paho.Client, userdata: object, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("broker %s:%d refused the connection: %s", self.settings.host, self.settings.port, reason)
            self._count(connect_failures=1)
            return
        log.info(
            "connected to %s:%d (session present: %s)", self.settings.host, self.settings.port, flags.session_present
        )
        first = self.counters.connects == 0
        self._count(connects=1, reconnects=0 if first else 1)
        self._connection += 1
        self._backoff.reset()
        # cmd, and the fleet's retained signed freshness (a broker whose ACL refuses it: logged below)
        _, self._subscribe_mid = client.subscribe([(self.topics.cmd, 1), (self.topics.freshness, 1)])
        self._publish_online()

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int, reasons: Any, props: Any) -> None:
        if mid != self._subscribe_mid:
            return
        if any(reason.is_failure for reason in reasons):
            topics = f"{self.topics.cmd}, {self.topics.freshness}"
            log.error("the broker refused a subscription of %s: %s (check its ACL)", topics, reasons)
        # "connected" means ready: commands sent from now on reach us, and the drain may start.
        self._connected.set()
        self._wake_drain.set()

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: Any, reason: Any, props: Any) -> None:
        if self._connected.is_set():
            log.warning("disconnected from %s:%d: %s", self.settings.host, self.settings.port, reason)
        self._connected.clear()

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, reason: Any, props: Any) -> None:
        self._acked_mids.put(mid)
        self._wake_drain.set()

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        # Nothing a message holds may escape: paho would end the loop, the link reconnect, and the broker
        # send the same message again, forever. What is not handed over is acknowledged here.
        try:
            # The freshness message goes the same way: the agent tells it by its type and checks its
            # signatures (whoever delivers it decides nothing).
            if message.topic in (self.topics.cmd, self.topics.freshness):
                command = decode_payload(message.payload)
                self._count(commands=1)
                self._commands.put((command, (message.mid, message.qos, self._connection)))
                return
            # A broker that hands out other devices' messages (amqtt's retained ones did): never acted on.
            log.warning("ignoring a message on %s: not this device's cmd topic", clip(message.topic, 300))
            self._count(foreign_msgs=1)
        except ContractError as e:
            log.warning("malformed command (%d bytes): %s", len(message.payload), clip(str(e), 300))
            self._count(malformed_cmds=1)
        except Exception:
            log.exception("unreadable message (%d bytes)", len(message.payload))
            self._count(malformed_cmds=1)
        client.ack(message.mid, message.qos)  # never useful: a redelivery would be just as bad

    def _publish_online(self) -> None:
        try:
            status = dict(self._status())
            status.update(schema=status.get("schema", SCHEMA), state="online", ts=self._wall_clock())
            payload = encode_payload(status)
        except Exception:  # the agent's builder must not take the link down
            log.exception("the status builder failed; publishing a minimal online status")
            payload = encode_payload({"schema": SCHEMA, "state": "online", "ts": self._wall_clock()})
        self._client.publish(self.topics.status, payload, qos=1, retain=True)

    def _offline_payload(self) -> bytes:
        return encode_payload(offline_status(self._wall_clock()))

    # -- threads -------------------------------------------------------------------------------------

    def _run_network(self) -> None:
        """Connect, run paho's loop while connected, back off with jitter, repeat until stopped."""
        while not self._stop.is_set():
            try:
                self._connect()
            except TransportError as e:
                log.info("%s; retrying", e)
                self._count(connect_failures=1)
                self._sleep_backoff()
                continue
            try:
                self._loop_while_connected()
            except Exception:  # a bug in a callback must not end the link for good
                log.exception("MQTT network loop failed; reconnecting")
                self._connected.clear()
                self._client.disconnect()
            if not self._stop.is_set():
                self._connection_lost()
                self._sleep_backoff()
        self._shutdown()

    def _connect(self) -> None:
        s = self.settings
        self._client.will_set(self.topics.status, self._offline_payload(), qos=1, retain=True)
        try:
            rc = self._client.connect(s.host, s.port, keepalive=s.keepalive_s)
        except (OSError, ValueError) as e:  # refused, unreachable, DNS, TLS handshake
            raise TransportError(f"cannot connect to {s.host}:{s.port}: {e}") from e
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"cannot connect to {s.host}:{s.port}: {paho.error_string(rc)}")
        # No Nagle: the link writes small packets back to back (a command's PUBACK, then its first event);
        # with Nagle the second waits for the broker's delayed ACK of the first, ~40 ms on Linux.
        sock = self._client.socket()
        if isinstance(sock, socket.socket):  # ssl.SSLSocket too
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as e:  # not TCP: keep Nagle
                log.debug("cannot set TCP_NODELAY: %s", e)

    def _loop_while_connected(self) -> None:
        connack_deadline = self._clock() + self.settings.connect_timeout_s
        while not self._stop.is_set():
            rc = self._client.loop(timeout=0.1)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._connected.clear()
                return
            if not self._connected.is_set() and self._clock() > connack_deadline:
                log.warning("no CONNACK/SUBACK in %.1f s; dropping the connection", self.settings.connect_timeout_s)
                self._count(connect_failures=1)
                self._client.disconnect()
                return

    def _sleep_backoff(self) -> None:
        delay = self._backoff.next_delay()
        log.debug("reconnecting in %.2f s (attempt %d)", delay, self._backoff.attempt)
        self._stop.wait(delay)

    def _shutdown(self) -> None:
        """Runs on the network thread once stopped: offline status, DISCONNECT, socket closed."""
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=self.settings.stop_timeout_s / 2)  # no drain publish may race the goodbye
        if self._connected.is_set():
            info = self._client.publish(self.topics.status, self._offline_payload(), qos=1, retain=True)
            deadline = self._clock() + self.settings.stop_timeout_s / 2
            while not info.is_published() and self._clock() < deadline:
                if self._client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            self._connected.clear()  # a goodbye, not a lost connection: no warning from _on_disconnect
            self._client.disconnect()
            self._client.loop(timeout=0.05)
        self._connected.clear()

    def _run_drain(self) -> None:
        """Publish outbox messages while connected; delete each when its PUBACK arrives."""
        while not self._stop.is_set():
            self._wake_drain.wait(timeout=0.5)
            self._wake_drain.clear()
            try:
                with self._inflight_lock:
                    self._ack_arrived()
                    if self.connected and not self._stop.is_set():
                        self._publish_pending()
            except Exception:  # a full disk must not kill the thread; retry on the next wake
                log.exception("outbox drain failed")
                self._stop.wait(1.0)

    def _ack_arrived(self) -> None:
        ids: list[int] = []
        while True:
            try:
                mid = self._acked_mids.get_nowait()
            except queue.Empty:
                break
            msg_id = self._inflight.pop(mid, None)
            if msg_id is not None:  # otherwise a status publish or a subscription
                ids.append(msg_id)
        if ids:
            self._outbox.ack(ids)
            self._count(acked=len(ids))
            if self._suspect in ids:
                self._suspect, self._strikes = None, 0

    def _publish_pending(self) -> None:
        window = 1 if self._suspect is not None else self.settings.max_inflight
        room = window - len(self._inflight)
        if room <= 0:
            return
        # Messages in flight stay in paho's queue while connected (it resends them); skip them here.
        sent = set(self._inflight.values())
        for msg in self._outbox.pending(limit=room + len(sent)):
            if msg.id in sent:
                continue
            if self._suspect is not None and msg.id != self._suspect:  # it went (acked, or dropped when full)
                self._suspect, self._strikes = None, 0
            if not self.connected or self._stop.is_set():
                return
            try:
                info = self._client.publish(msg.topic, msg.payload, qos=msg.qos)
            except ValueError as e:  # a topic or payload paho rejects will never succeed: set it aside
                log.error("setting aside outbox message %d that cannot be published: %s", msg.id, e)
                self._set_aside(msg.id)
                continue
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                # NO_CONN still queues the message in paho, which sends it on reconnect.
                log.warning("publish of outbox message %d failed: %s", msg.id, paho.error_string(info.rc))
                return
            self._inflight[info.mid] = msg.id
            self._count(published=1)
            if msg.qos == 0:  # no PUBACK will come
                self._acked_mids.put(info.mid)

    def _connection_lost(self) -> None:
        """On the network thread once a connection has ended: find a message the broker refuses, and
        forget what was in flight (the drain publishes it again from the outbox, in order).

        A broker closes the connection on a packet it will not take, on every try: the oldest message
        unacknowledged is suspect, sent alone from then on; lost connections with it alone in flight
        count, and ``dead_letter_after`` of them in a row set it aside so the rest flows.
        """
        with self._inflight_lock:
            self._ack_arrived()  # the PUBACKs that did arrive
            if self._inflight:
                head = min(self._inflight.values())
                if head != self._suspect:
                    self._suspect, self._strikes = head, 0
                elif len(self._inflight) == 1:
                    self._strikes += 1
                    if self._strikes >= self.settings.dead_letter_after:
                        log.error(
                            "the connection was lost %d times in a row with outbox message %d alone in flight: "
                            "the broker refuses it (over its maximum packet size?)",
                            self._strikes,
                            head,
                        )
                        self._set_aside(head)
                        self._suspect, self._strikes = None, 0
            # paho would resend its own copies on the next connection, all at once and before the drain
            # can hold back the suspect: the outbox is the one queue. (paho has no public way to do this.)
            with self._client._out_message_mutex:
                self._client._out_messages.clear()
            self._inflight.clear()
            while True:  # PUBACKs of this connection's mids are void now
                try:
                    self._acked_mids.get_nowait()
                except queue.Empty:
                    break

    def _set_aside(self, msg_id: int) -> None:
        msg = self._outbox.dead_letter(msg_id)
        if msg is not None:
            log.error(
                "outbox message %d (%s, %d bytes) set aside; %d in all", msg.id, msg.topic, len(msg.payload),
                self._outbox.dead_letters,
            )  # fmt: skip
            self._count(dead_letters=1)

    def _run_commands(self) -> None:
        while True:
            item = self._commands.get()
            if item is None:
                return
            command, (mid, qos, connection) = item
            try:
                if self._on_command is not None:
                    self._on_command(command)
            except Exception as e:
                log.exception("command handler failed on command %r", command_ref(command))
                self._count(command_errors=1)
                self._answer_failed(command, e)
            # Acked even when the handler failed: the broker would hold it (and block its in-flight
            # window) until the next session, to fail the same way.
            if connection == self._connection:
                self._client.ack(mid, qos)

    def _answer_failed(self, command: Mapping[str, Any], error: Exception) -> None:
        """One bounded ``failed`` event for a command whose handler raised."""
        message = f"the command could not be handled: {type(error).__name__}: {error}"
        try:
            self.publish_event(
                event_payload(command_ref(command), "failed", message, self._wall_clock(), error=type(error).__name__)
            )
        except Exception:  # the outbox cannot take it (full disk): logged, the command is acknowledged anyway
            log.exception("the failed event of command %r could not be queued", command_ref(command))

    # -- helpers ---------------------------------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        with self._counter_lock:
            values = {name: getattr(self._counters, name) + delta for name, delta in deltas.items()}
            self._counters = replace(self._counters, **values)

    def _stamp(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        stamped = dict(payload)
        stamped.setdefault("schema", SCHEMA)
        stamped.setdefault("ts", self._wall_clock())
        return stamped
