"""The ingest's settings: where the broker is, which fleet, and the batching and retry tuning."""

from __future__ import annotations

from dataclasses import dataclass

from sdk.errors import InputError
from sdk.mqtt_contract import check_segment

__all__ = ["IngestSettings"]


@dataclass(frozen=True)
class IngestSettings:
    """How one fleet process reads its devices' messages.

    ``client_id`` must differ between fleet processes (the broker keeps one persistent session per id:
    unacknowledged messages wait there for the process that had them), and stay the same across restarts
    of one process so that it finds its session again. ``share_group`` is the same for every process of
    one fleet; None subscribes without sharing (one fleet process, or a broker without shared
    subscriptions such as the embedded one, which also needs ``protocol="3.1.1"``).
    """

    host: str = "127.0.0.1"
    port: int = 1883
    fleet: str = "default"
    share_group: str | None = "edgeship-fleet"
    client_id: str = "edgeship-fleet-ingest"
    protocol: str = "5"  # "5" or "3.1.1"
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None  # a CA file turns TLS on
    tls_cert: str | None = None  # client certificate and key, for mutual TLS
    tls_key: str | None = None
    keepalive_s: int = 30  # seconds
    session_expiry_s: int = 7 * 86400  # seconds the broker keeps the session (and queues) while we are away
    receive_maximum: int = 8000  # messages the broker may have sent us unacknowledged (MQTT 5): 4 batches
    batch_max: int = 2000  # messages per transaction
    batch_wait_s: float = 0.1  # seconds a batch waits to fill after its first message
    retry_base_s: float = 0.05  # seconds, first retry of a failed commit (full jitter, doubling)
    retry_cap_s: float = 5.0  # seconds, longest wait between commit retries
    reconnect_base_s: float = 0.5  # seconds, first reconnect wait (full jitter, doubling)
    reconnect_cap_s: float = 30.0  # seconds, longest wait between reconnects

    def __post_init__(self) -> None:
        try:
            check_segment("fleet", self.fleet)
            if self.share_group is not None:
                check_segment("share_group", self.share_group)
        except ValueError as e:
            raise InputError(str(e)) from e
        if self.protocol not in ("5", "3.1.1"):
            raise InputError(f"protocol must be '5' or '3.1.1', got {self.protocol!r}")
        if not self.client_id or len(self.client_id) > 128:
            raise InputError("client_id must be 1 to 128 characters")
        if not 1 <= self.receive_maximum <= 65535:
            raise InputError("receive_maximum must be 1 to 65535 (MQTT 5's bound)")
        if self.batch_max < 1 or self.batch_wait_s < 0:
            raise InputError("batch_max must be >= 1 and batch_wait_s >= 0")
