"""MQTT ingest of every device's ``status``, ``telemetry`` and ``events`` into the registry (``fleet.devices``)."""

from fleet.ingest.classify import DROP_REASONS, MAX_DEPTH, classify
from fleet.ingest.service import Ingest
from fleet.ingest.settings import IngestSettings

__all__ = ["DROP_REASONS", "MAX_DEPTH", "Ingest", "IngestSettings", "classify"]
