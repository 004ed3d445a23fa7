"""``/rollouts``: create, list, show (waves, gates vs thresholds), audit log, pause/resume/abort.

The selector and the bundle choice come from other domains: the app wires them once with
``configure(app, resolve=..., bundle_for=..., wake=...)``; ``wake`` lets the driver act on a new or
resumed rollout at once instead of at its next tick.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Request

from fleet.api import DbDep, ReadAccess, WriteAccess
from fleet.rollouts import service
from fleet.rollouts.schemas import CommandBody, RolloutCreate
from fleet.rollouts.spec import parse_spec

__all__ = ["RolloutWiring", "configure", "router"]

router = APIRouter(prefix="/rollouts", tags=["rollouts"])


@dataclass(frozen=True)
class RolloutWiring:
    """What the rollout routes need from the other domains and the driver."""

    resolve: service.ResolveSelector
    bundle_for: service.BundleFor
    wake: Callable[[], None] = lambda: None
    clock: Callable[[], float] = time.time
    resend_s: float = 60.0  # a rollout's resend when its request names none (the server's command_resend_s)


def configure(app: FastAPI, wiring: RolloutWiring) -> None:
    """Give the rollout routes of ``app`` their selector, bundle chooser and driver wake-up."""
    app.state.rollout_wiring = wiring


def _wiring(request: Request) -> RolloutWiring:
    wiring: RolloutWiring | None = getattr(request.app.state, "rollout_wiring", None)
    if wiring is None:
        raise HTTPException(503, "rollouts are not wired in this server (fleet.rollouts.routes.configure)")
    return wiring


WiringDep = Annotated[RolloutWiring, Depends(_wiring)]
OptionalBody = Annotated[CommandBody | None, Body()]


@router.post("", status_code=201)
def create(body: RolloutCreate, db: DbDep, _caller: WriteAccess, wiring: WiringDep) -> dict[str, Any]:
    """Create a rollout: 201 with it; 409 when a selected device is in another active rollout; 422 for a bad
    spec, an unknown device, an empty wave or a device no bundle of the release fits."""
    spec = parse_spec(
        body.release, body.devices, body.waves, soak=body.soak, gates=body.gates, rate_per_s=body.rate_per_s,
        wave_timeout=body.wave_timeout, resend=wiring.resend_s if body.resend is None else body.resend,
        baseline=body.baseline,
    )  # fmt: skip
    with db.session() as session:
        rollout_id = service.create_rollout(session, spec, wiring.resolve, wiring.bundle_for, wiring.clock())
    wiring.wake()
    with db.session() as session:
        return service.rollout_view(session, rollout_id)


@router.get("")
def list_all(db: DbDep, _caller: ReadAccess, state: str | None = None) -> list[dict[str, Any]]:
    with db.session() as session:
        return service.list_rollouts(session, state=state)


@router.get("/{rollout_id}")
def show(rollout_id: int, db: DbDep, _caller: ReadAccess) -> dict[str, Any]:
    with db.session() as session:
        return service.rollout_view(session, rollout_id)


@router.get("/{rollout_id}/audit")
def audit(rollout_id: int, db: DbDep, _caller: ReadAccess, after_id: int = 0, limit: int = 500) -> list[dict[str, Any]]:
    with db.session() as session:
        return service.audit_log(session, rollout_id, after_id=after_id, limit=limit)


def _command(verb: str, rollout_id: int, db: DbDep, wiring: RolloutWiring, body: CommandBody | None) -> dict[str, Any]:
    with db.session() as session:
        service.command(session, rollout_id, verb, wiring.clock(), reason=body.reason if body else "")
    wiring.wake()
    with db.session() as session:
        return service.rollout_view(session, rollout_id)


@router.post("/{rollout_id}/pause")
def pause(
    rollout_id: int, db: DbDep, _caller: WriteAccess, wiring: WiringDep, body: OptionalBody = None
) -> dict[str, Any]:
    return _command("pause", rollout_id, db, wiring, body)


@router.post("/{rollout_id}/resume")
def resume(
    rollout_id: int, db: DbDep, _caller: WriteAccess, wiring: WiringDep, body: OptionalBody = None
) -> dict[str, Any]:
    return _command("resume", rollout_id, db, wiring, body)


@router.post("/{rollout_id}/abort")
def abort(
    rollout_id: int, db: DbDep, _caller: WriteAccess, wiring: WiringDep, body: OptionalBody = None
) -> dict[str, Any]:
    return _command("abort", rollout_id, db, wiring, body)
