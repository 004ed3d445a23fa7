"""The registry's API (mounted under ``/api/v1``): devices, tags, events, telemetry. Reads need a read
token, writes a write token (``fleet.api``)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from fleet.api import DbDep, NotFound, ReadAccess, WriteAccess
from fleet.devices import service, stats
from fleet.devices.schemas import (
    BucketOut,
    DeploymentOut,
    DeviceEvents,
    DeviceList,
    DeviceOut,
    DeviceTelemetry,
    EventOut,
    ModelSeriesOut,
    ModelStatsOut,
    ModelTelemetry,
    SeriesTelemetry,
    StatsOut,
    TagsIn,
    TagsOut,
)

__all__ = ["router"]

router = APIRouter(tags=["devices"])

MAX_WINDOW_S = 90 * 86400  # seconds a telemetry query may span

WindowS = Annotated[float, Query(gt=0, le=MAX_WINDOW_S, description="seconds back from now")]


@router.get("/devices", response_model=DeviceList)
def list_devices(
    db: DbDep,
    _caller: ReadAccess,
    selector: Annotated[str | None, Query(description="all | tag=KEY=VALUE | group=NAME | id=A,B")] = None,
    online: bool | None = None,
) -> DeviceList:
    with db.session() as s:
        devices = service.list_devices(s, selector=selector, online=online)
        tags = service.device_tags(s, [d.device_id for d in devices])
        return DeviceList(devices=[DeviceOut.of(d, tags.get(d.device_id, {})) for d in devices])


@router.get("/devices/{device_id}", response_model=DeviceOut)
def get_device(device_id: str, db: DbDep, _caller: ReadAccess) -> DeviceOut:
    with db.session() as s:
        device = service.get_device(s, device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}")
        return DeviceOut.of(device, service.device_tags(s, [device_id]).get(device_id, {}))


@router.put("/devices/{device_id}/tags", response_model=TagsOut)
def put_tags(device_id: str, body: TagsIn, db: DbDep, _caller: WriteAccess) -> TagsOut:
    with db.session() as s:
        try:
            tags = service.set_tags(s, device_id, body.tags)
        except LookupError as e:
            raise NotFound(str(e).strip("'\"")) from e
        return TagsOut(device_id=device_id, tags=tags)


@router.delete("/devices/{device_id}/tags/{key}", response_model=TagsOut)
def delete_tag(device_id: str, key: str, db: DbDep, _caller: WriteAccess) -> TagsOut:
    with db.session() as s:
        try:
            removed = service.remove_tag(s, device_id, key)
        except LookupError as e:
            raise NotFound(str(e).strip("'\"")) from e
        if not removed:
            raise NotFound(f"device {device_id!r} has no tag {key!r}")
        return TagsOut(device_id=device_id, tags=service.device_tags(s, [device_id]).get(device_id, {}))


def _known(s: Session, device_id: str) -> None:
    if service.get_device(s, device_id) is None:
        raise NotFound(f"no device {device_id!r}")


@router.get("/devices/{device_id}/events", response_model=DeviceEvents)
def device_events(
    device_id: str,
    db: DbDep,
    _caller: ReadAccess,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
    cmd_id: str | None = None,
) -> DeviceEvents:
    with db.session() as s:
        _known(s, device_id)
        events = service.list_events(s, device_id, cmd_id=cmd_id, limit=limit)
        deployments = service.history(s, device_id, limit=limit)
        return DeviceEvents(
            device_id=device_id,
            events=[EventOut.of(e) for e in events],
            deployments=[DeploymentOut.of(d) for d in deployments],
        )


@router.get("/devices/{device_id}/telemetry", response_model=DeviceTelemetry)
def device_telemetry(
    device_id: str,
    db: DbDep,
    _caller: ReadAccess,
    window_s: WindowS = 3600.0,
    bucket_s: Annotated[float | None, Query(gt=0, description="default: window_s / 60")] = None,
) -> DeviceTelemetry:
    until = time.time()
    since = until - window_s
    bucket = bucket_s or window_s / 60
    with db.session() as s:
        _known(s, device_id)
        total = stats.device_stats(s, device_id, since, until)
        models = stats.per_model(s, since, until, device_ids=[device_id])
        buckets = stats.series(s, since, until, bucket, device_ids=[device_id])
    return DeviceTelemetry(
        device_id=device_id, since=since, until=until, bucket_s=bucket, total=StatsOut.of(total),
        models=[ModelStatsOut.of_model(m) for m in models], series=[BucketOut.of_bucket(b) for b in buckets],
    )  # fmt: skip


@router.get("/telemetry/models", response_model=ModelTelemetry)
def model_telemetry(
    db: DbDep,
    _caller: ReadAccess,
    name: str | None = None,
    version: Annotated[int | None, Query(ge=0)] = None,
    window_s: WindowS = 3600.0,
) -> ModelTelemetry:
    until = time.time()
    since = until - window_s
    with db.session() as s:
        models = stats.per_model(s, since, until, name=name, version=version)
    return ModelTelemetry(since=since, until=until, models=[ModelStatsOut.of_model(m) for m in models])


MAX_SERIES_MODELS = 20  # model versions one series query answers (the most requests first)


@router.get("/telemetry/series", response_model=SeriesTelemetry)
def model_series(
    db: DbDep,
    _caller: ReadAccess,
    name: str | None = None,
    version: Annotated[int | None, Query(ge=0)] = None,
    window_s: WindowS = 3600.0,
    bucket_s: Annotated[float | None, Query(gt=0, description="default: window_s / 60")] = None,
    until: Annotated[float | None, Query(gt=0, description="end of the window, unix s; default now")] = None,
) -> SeriesTelemetry:
    """Latency and errors over time per model version (the dashboard's charts): every version with
    telemetry in the window, each as consecutive buckets."""
    end = until if until is not None else time.time()
    since = end - window_s
    bucket = bucket_s or window_s / 60
    with db.session() as s:
        found = stats.per_model(s, since, end, name=name, version=version)
        named = [(m.name, m.version, m.stats) for m in found if m.name is not None and m.version is not None]
        busiest = sorted(named, key=lambda m: -m[2].count)[:MAX_SERIES_MODELS]
        out = []
        for model_name, model_version, total in sorted(busiest, key=lambda m: (m[0], m[1])):
            buckets = stats.series(s, since, end, bucket, name=model_name, version=model_version)
            out.append(ModelSeriesOut(
                name=model_name, version=model_version, total=StatsOut.of(total),
                series=[BucketOut.of_bucket(b) for b in buckets],
            ))  # fmt: skip
    return SeriesTelemetry(since=since, until=end, bucket_s=bucket, models=out)
