"""The device registry: devices from their ``status``, tags and groups, events and deployment history,
telemetry aggregates per device and per model version, and retention.

The rollout engine reads it through ``select_devices``, ``devices_by_id``, ``last_seen``, ``history``,
``command_phases``, ``list_events`` and ``model_stats``; the ingest writes it through ``record_messages``.
"""

from fleet.devices.service import (
    SELECTOR_FORMS,
    Deployment,
    Incoming,
    Recorded,
    command_phases,
    device_tags,
    devices_by_id,
    get_device,
    history,
    last_seen,
    list_devices,
    list_events,
    prune,
    record_messages,
    remove_tag,
    select_devices,
    set_tags,
)
from fleet.devices.stats import Bucket, ModelStats, Stats, device_stats, model_stats, per_model, series
from fleet.devices.tables import Device, DeviceEvent, DeviceTag, Telemetry

__all__ = [
    "SELECTOR_FORMS",
    "Bucket",
    "Deployment",
    "Device",
    "DeviceEvent",
    "DeviceTag",
    "Incoming",
    "ModelStats",
    "Recorded",
    "Stats",
    "Telemetry",
    "device_stats",
    "device_tags",
    "devices_by_id",
    "get_device",
    "command_phases",
    "history",
    "last_seen",
    "list_devices",
    "list_events",
    "model_stats",
    "per_model",
    "prune",
    "record_messages",
    "remove_tag",
    "select_devices",
    "series",
    "set_tags",
]
