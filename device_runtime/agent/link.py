"""``Link``: what the agent needs from its connection to the fleet, whichever process runs it.

``DeviceLink`` (``mqtt.py``: paho on the agent's threads) and ``LinkProcess`` (``linkproc.py``: the same
link in a helper process) both satisfy it structurally; the agent is typed against it and asks for the
concrete class only where the two differ (opening the process, flushing its events).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from device_runtime.agent.mqtt import LinkCounters

__all__ = ["Link"]


class Link(Protocol):
    """The agent's side of the MQTT link: commands come in through the ``on_command`` callback it was
    built with, status through its ``status`` callback; everything else goes out through these."""

    def start(self) -> None:
        """Connect in the background (returns at once; reconnects with backoff)."""

    def stop(self) -> None:
        """Publish ``offline``, disconnect and release the link's threads or process."""

    @property
    def connected(self) -> bool:
        """True while a session is established and the ``cmd`` subscription acknowledged."""

    @property
    def counters(self) -> LinkCounters:
        """A snapshot of the link's counters."""

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until connected; False after ``timeout_s`` seconds."""

    def wait_drained(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty (everything acknowledged); False after ``timeout_s``."""

    def publish_event(self, payload: Mapping[str, Any]) -> int | None:
        """Queue an event durably (in order); its ``seq`` where the link knows it at once.

        Raises:
            StateError: the outbox cannot store it.
        """

    def publish_telemetry(self, payload: Mapping[str, Any]) -> int:
        """Queue a telemetry message durably and return its ``seq``.

        Raises:
            StateError: the outbox cannot store it.
        """

    def publish_status(self) -> None:
        """Publish the retained status message (built by the ``status`` callback) now."""
