"""Telemetry aggregates: per device, per model version, over a time window, and in buckets for charts.

Windows are on ``received_at`` (the server's clock, the one the rollout engine's ``now`` reads), from
``since`` included to ``until`` excluded.

Percentiles are an approximation: a device reports p50/p95/p99 per window, and percentiles do not add
up, so several windows are combined by the mean of each percentile weighted by the window's request
count. It is exact when every window has the same latency distribution and close when they are alike;
it understates a tail that only a few windows have. That is what a gate comparing two versions on the
same devices needs (both sides are averaged the same way), and it costs a sum in SQL.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Integer, Select, case, cast, func, select
from sqlalchemy.orm import Session

from fleet.devices.tables import Telemetry
from sdk.errors import InputError

__all__ = ["MAX_BUCKETS", "Bucket", "ModelStats", "Stats", "device_stats", "model_stats", "per_model", "series"]

MAX_BUCKETS = 10_000  # buckets of one series
_CHUNK = 500  # device ids per IN (...) list
_PERCENTILES = ("p50", "p95", "p99")


@dataclass(frozen=True)
class Stats:
    """Telemetry summed over a window.

    Attributes:
        messages: telemetry messages (device windows).
        count: requests served.
        errors: requests that failed.
        devices: distinct devices that reported.
        p50_ms, p95_ms, p99_ms: latency percentiles, request-weighted means (None: no request).
    """

    messages: int = 0
    count: int = 0
    errors: int = 0
    devices: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None

    @property
    def error_rate(self) -> float | None:
        """errors / count, None when nothing ran."""
        return self.errors / self.count if self.count else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages, "count": self.count, "errors": self.errors, "error_rate": self.error_rate,
            "devices": self.devices, "p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "p99_ms": self.p99_ms,
        }  # fmt: skip


@dataclass(frozen=True)
class ModelStats:
    """``Stats`` of one model version (``name`` None: telemetry of a device with no active model)."""

    name: str | None
    version: int | None
    stats: Stats


@dataclass(frozen=True)
class Bucket:
    """``Stats`` of ``[start, start + bucket_s)``."""

    start: float
    stats: Stats


@dataclass
class _Sums:
    """Running sums, so chunks of a long device list combine exactly."""

    messages: int = 0
    count: int = 0
    errors: int = 0
    devices: int = 0
    weighted: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_PERCENTILES, 0.0))
    weights: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_PERCENTILES, 0))

    def add(self, row: Any) -> None:
        self.messages += int(row.messages or 0)
        self.count += int(row.count or 0)
        self.errors += int(row.errors or 0)
        self.devices += int(row.devices or 0)
        for p in _PERCENTILES:
            self.weighted[p] += float(getattr(row, f"{p}_sum") or 0.0)
            self.weights[p] += int(getattr(row, f"{p}_weight") or 0)

    def stats(self) -> Stats:
        pct = {p: (self.weighted[p] / self.weights[p] if self.weights[p] else None) for p in _PERCENTILES}
        return Stats(self.messages, self.count, self.errors, self.devices, pct["p50"], pct["p95"], pct["p99"])


def _sum_columns() -> list[ColumnElement[Any]]:
    t = Telemetry
    columns: list[ColumnElement[Any]] = [
        func.count().label("messages"),
        func.sum(t.count).label("count"),
        func.sum(t.errors).label("errors"),
        func.count(func.distinct(t.device_id)).label("devices"),
    ]
    for p in _PERCENTILES:
        column = getattr(t, f"{p}_ms")
        columns.append(func.sum(column * t.count).label(f"{p}_sum"))
        columns.append(func.sum(case((column.is_not(None), t.count), else_=0)).label(f"{p}_weight"))
    return columns


def _window(since: float, until: float) -> None:
    if not until > since:
        raise InputError(f"a window needs until > since, got since={since} until={until}")


def _by_devices(query: Select[Any], device_ids: Collection[str] | None) -> list[Select[Any]]:
    """One query, or one per chunk of ``device_ids`` (they partition the devices, so sums add up)."""
    if device_ids is None:
        return [query]
    ids = sorted(set(device_ids))
    return [query.where(Telemetry.device_id.in_(ids[i : i + _CHUNK])) for i in range(0, len(ids), _CHUNK)]


def _filtered(query: Select[Any], since: float, until: float, name: str | None, version: int | None) -> Select[Any]:
    query = query.where(Telemetry.received_at >= since, Telemetry.received_at < until)
    if name is not None:
        query = query.where(Telemetry.model_name == name)
    if version is not None:
        query = query.where(Telemetry.model_version == version)
    return query


def model_stats(
    session: Session, device_ids: Collection[str] | None, name: str, version: int, since: float, until: float
) -> Stats:
    """Telemetry of model ``name`` version ``version`` on ``device_ids`` (None: every device) in the window.

    What a rollout gate compares: the new version on a wave's devices against the previous version on
    the same devices. An empty ``device_ids`` gives empty ``Stats``.

    Raises:
        InputError: ``until`` <= ``since``.
    """
    _window(since, until)
    sums = _Sums()
    for query in _by_devices(_filtered(select(*_sum_columns()), since, until, name, version), device_ids):
        sums.add(session.execute(query).one())
    return sums.stats()


def device_stats(session: Session, device_id: str, since: float, until: float) -> Stats:
    """All telemetry of one device in the window, whatever model it ran.

    Raises:
        InputError: ``until`` <= ``since``.
    """
    _window(since, until)
    query = _filtered(select(*_sum_columns()), since, until, None, None).where(Telemetry.device_id == device_id)
    sums = _Sums()
    sums.add(session.execute(query).one())
    return sums.stats()


def per_model(
    session: Session,
    since: float,
    until: float,
    *,
    name: str | None = None,
    version: int | None = None,
    device_ids: Collection[str] | None = None,
) -> list[ModelStats]:
    """``Stats`` per (model name, version) in the window, by name then version.

    Raises:
        InputError: ``until`` <= ``since``.
    """
    _window(since, until)
    key = (Telemetry.model_name, Telemetry.model_version)
    base = _filtered(select(*key, *_sum_columns()), since, until, name, version).group_by(*key)
    sums: dict[tuple[str | None, int | None], _Sums] = {}
    for query in _by_devices(base, device_ids):
        for row in session.execute(query):
            sums.setdefault((row.model_name, row.model_version), _Sums()).add(row)
    order = sorted(sums, key=lambda k: (k[0] is None, k[0] or "", k[1] if k[1] is not None else -1))
    return [ModelStats(n, v, sums[(n, v)].stats()) for n, v in order]


def _bucket_index(session: Session, since: float, bucket_s: float) -> ColumnElement[Any]:
    """floor((received_at - since) / bucket_s), portable: the value is >= 0, where SQLite's CAST truncates
    (= floor); PostgreSQL's CAST rounds, so it gets an explicit floor."""
    offset = (Telemetry.received_at - since) / bucket_s
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.floor(offset), BigInteger)
    return cast(offset, Integer)


def series(
    session: Session,
    since: float,
    until: float,
    bucket_s: float,
    *,
    device_ids: Collection[str] | None = None,
    name: str | None = None,
    version: int | None = None,
) -> list[Bucket]:
    """``Stats`` in consecutive buckets of ``bucket_s`` from ``since`` (every bucket, empty ones too).

    Raises:
        InputError: ``until`` <= ``since``, ``bucket_s`` <= 0, or more than ``MAX_BUCKETS`` buckets.
    """
    _window(since, until)
    if not bucket_s > 0:
        raise InputError(f"bucket_s must be > 0, got {bucket_s}")
    n = int(-(-(until - since) // bucket_s))
    if n > MAX_BUCKETS:
        raise InputError(f"{n} buckets of {bucket_s} s is over {MAX_BUCKETS}: choose a larger bucket_s")
    index = _bucket_index(session, since, bucket_s).label("bucket")
    base = _filtered(select(index, *_sum_columns()), since, until, name, version).group_by(index)
    sums = [_Sums() for _ in range(n)]
    for query in _by_devices(base, device_ids):
        for row in session.execute(query):
            if 0 <= row.bucket < n:
                sums[row.bucket].add(row)
    return [Bucket(since + i * bucket_s, s.stats()) for i, s in enumerate(sums)]
