"""The registry's API shapes (pydantic): what ``routes.py`` answers and accepts."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fleet.devices.service import Deployment
from fleet.devices.stats import Bucket, ModelStats, Stats
from fleet.devices.tables import Device, DeviceEvent

__all__ = [
    "BucketOut", "DeploymentOut", "DeviceEvents", "DeviceList", "DeviceOut", "DeviceTelemetry", "EventOut", "ModelOut",
    "ModelSeriesOut", "ModelStatsOut", "ModelTelemetry", "SeriesTelemetry", "StatsOut", "TagsIn", "TagsOut",
]  # fmt: skip


class ModelOut(BaseModel):
    name: str
    version: int
    target: str | None
    sha256: str | None


class DeviceOut(BaseModel):
    device_id: str
    online: bool
    state: str = Field(description="online, offline, or unknown (no status received yet)")
    first_seen: float
    last_seen: float = Field(description="when its last message arrived (unix s, the server's clock; up to 1 s behind)")
    model: ModelOut | None
    slot: str | None
    capabilities: dict[str, Any]
    runtime: dict[str, Any]
    deployment: dict[str, Any] | None
    status_ts: float | None = Field(description="its last status's ts, on the device's clock")
    tags: dict[str, str]

    @classmethod
    def of(cls, device: Device, tags: dict[str, str]) -> DeviceOut:
        model = None
        if device.model_name is not None and device.model_version is not None:
            model = ModelOut(
                name=device.model_name, version=device.model_version, target=device.model_target,
                sha256=device.model_sha256,
            )  # fmt: skip
        return cls(
            device_id=device.device_id, online=device.online, state=device.state, first_seen=device.first_seen,
            last_seen=device.last_seen, model=model, slot=device.slot, capabilities=device.capabilities or {},
            runtime=device.runtime or {}, deployment=device.deployment, status_ts=device.status_ts, tags=tags,
        )  # fmt: skip


class DeviceList(BaseModel):
    devices: list[DeviceOut]


class TagsIn(BaseModel):
    """Every tag of the device (the ones not named are removed); ``group`` is the device's group."""

    model_config = ConfigDict(extra="forbid")
    tags: dict[str, str]


class TagsOut(BaseModel):
    device_id: str
    tags: dict[str, str]


class EventOut(BaseModel):
    cmd_id: str | None
    phase: str
    ts: float
    received_at: float
    detail: dict[str, Any]

    @classmethod
    def of(cls, event: DeviceEvent) -> EventOut:
        return cls(cmd_id=event.cmd_id, phase=event.phase, ts=event.ts, received_at=event.received_at,
                   detail=event.detail)  # fmt: skip


class DeploymentOut(BaseModel):
    cmd_id: str | None
    started: float
    updated: float
    phase: str
    outcome: str = Field(description="active, failed, rolled_back or in_progress")
    model: dict[str, Any] | None
    phases: list[str]

    @classmethod
    def of(cls, d: Deployment) -> DeploymentOut:
        return cls(cmd_id=d.cmd_id, started=d.started, updated=d.updated, phase=d.phase, outcome=d.outcome,
                   model=d.model, phases=list(d.phases))  # fmt: skip


class DeviceEvents(BaseModel):
    device_id: str
    events: list[EventOut] = Field(description="newest first")
    deployments: list[DeploymentOut] = Field(description="newest first, read from the events")


class StatsOut(BaseModel):
    """Telemetry over a window; percentiles are request-weighted means of the devices' windows."""

    messages: int
    count: int
    errors: int
    error_rate: float | None
    devices: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, stats: Stats) -> StatsOut:
        return cls(**stats.as_dict())


class BucketOut(StatsOut):
    start: float

    @classmethod
    def of_bucket(cls, bucket: Bucket) -> BucketOut:
        return cls(start=bucket.start, **bucket.stats.as_dict())


class ModelStatsOut(StatsOut):
    name: str | None
    version: int | None

    @classmethod
    def of_model(cls, m: ModelStats) -> ModelStatsOut:
        return cls(name=m.name, version=m.version, **m.stats.as_dict())


class DeviceTelemetry(BaseModel):
    device_id: str
    since: float
    until: float
    bucket_s: float
    total: StatsOut
    models: list[ModelStatsOut]
    series: list[BucketOut]


class ModelTelemetry(BaseModel):
    since: float
    until: float
    models: list[ModelStatsOut]


class ModelSeriesOut(BaseModel):
    """One model version's telemetry over the window, in total and bucket by bucket."""

    name: str
    version: int
    total: StatsOut
    series: list[BucketOut] = Field(description="every bucket from since, empty ones too (count 0)")


class SeriesTelemetry(BaseModel):
    since: float
    until: float
    bucket_s: float
    models: list[ModelSeriesOut] = Field(description="the model versions with telemetry in the window")
