"""Test parts for the rollout engine and driver: an in-memory Observer, a recording Publisher, a fake world.

The ``Observer`` here is what fleet/devices implements over its events, telemetry and status tables; this
one keeps the same facts in dicts, so the engine and driver are tested without an ingest.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from fleet.rollouts.engine import ModelStats
from fleet.rollouts.service import BundleRef

SHA = "ab" * 32


@dataclass
class MemoryObserver:
    """Events, last-seen times, telemetry stats and active models, set by the test."""

    events: dict[str, set[str]] = field(default_factory=dict)  # cmd_id -> phases
    seen: dict[str, float] = field(default_factory=dict)
    stats: dict[tuple[str, int], ModelStats] = field(default_factory=dict)  # (name, version) -> stats
    models: dict[str, tuple[str, int]] = field(default_factory=dict)
    bundles: dict[str, tuple[str | None, float]] = field(default_factory=dict)  # device -> (sha256, status at)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def event(self, cmd_id: str, *phases: str) -> None:
        with self.lock:
            self.events.setdefault(cmd_id, set()).update(phases)

    def phases(self, session: Session, cmd_ids: Sequence[str]) -> Mapping[str, frozenset[str]]:
        with self.lock:
            return {c: frozenset(self.events[c]) for c in cmd_ids if c in self.events}

    def last_seen(self, session: Session, device_ids: Sequence[str]) -> Mapping[str, float]:
        return {d: self.seen[d] for d in device_ids if d in self.seen}

    def model_stats(
        self, session: Session, device_ids: Sequence[str], name: str, version: int, since: float, until: float
    ) -> ModelStats:
        return self.stats.get((name, version), ModelStats())

    def active_models(self, session: Session, device_ids: Sequence[str]) -> Mapping[str, tuple[str, int]]:
        return {d: self.models[d] for d in device_ids if d in self.models}

    def active_bundles(self, session: Session, device_ids: Sequence[str]) -> Mapping[str, tuple[str | None, float]]:
        return {d: self.bundles[d] for d in device_ids if d in self.bundles}


@dataclass
class RecordingPublisher:
    """Keeps every command published, per device."""

    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, device_id: str, payload: Mapping[str, Any]) -> None:
        with self.lock:
            self.sent.append((device_id, dict(payload)))

    def ids(self, device_id: str | None = None, kind: str | None = None) -> list[str]:
        with self.lock:
            return [
                p["id"]
                for d, p in self.sent
                if (device_id is None or d == device_id) and (kind is None or p["type"] == kind)
            ]


def resolver(devices: Sequence[str]) -> Any:
    """A selector resolver over a fixed fleet: ``all`` or ``id=a,b`` (unknown ids refused)."""
    from sdk.errors import InputError

    def resolve(session: Session, selector: str) -> list[str]:
        if selector == "all":
            return list(devices)
        if selector.startswith("id="):
            wanted = selector[3:].split(",")
            unknown = [d for d in wanted if d not in devices]
            if unknown:
                raise InputError(f"unknown devices: {', '.join(unknown)}")
            return wanted
        raise InputError(f"selector {selector!r}: use all or id=a,b")

    return resolve


def bundles(misfits: Mapping[str, str] | None = None) -> Any:
    """A bundle chooser: one bundle for every device except ``misfits`` (device -> reason)."""

    def bundle_for(session: Session, name: str, version: int, device_id: str) -> BundleRef | str:
        if misfits and device_id in misfits:
            return misfits[device_id]
        return BundleRef(SHA, f"http://fleet.test/artifacts/{SHA}.edgebundle", 1234)

    return bundle_for
