"""Rollouts as stored rows: create (every refusal before anything is sent), load and save the engine's state,
operator commands, leases, and the read views of the API.

Functions take a SQLAlchemy ``Session`` (one transaction, the caller's) and the clock as ``now``.
The selector and the per-device bundle choice belong to other domains; they come in as callables
(``ResolveSelector``, ``BundleFor``) that the app wires.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleet.api import Conflict, NotFound
from fleet.rollouts.engine import (
    ACTIVE_STATES,
    DEVICE_STATUSES,
    Action,
    DeviceState,
    RolloutState,
    TransitionError,
    apply,
    deploy_cmd_id,
    operator,
    rollback_cmd_id,
)
from fleet.rollouts.spec import RolloutSpec
from fleet.rollouts.tables import Rollout, RolloutAudit, RolloutClaim, RolloutDevice, RolloutLease
from sdk.errors import InputError
from sdk.mqtt_contract import MAX_COMMAND_ID_CHARS

__all__ = [
    "BundleFor",
    "BundleRef",
    "ResolveSelector",
    "acquire_lease",
    "active_rollout_ids",
    "audit_log",
    "command",
    "create_rollout",
    "device_rows",
    "list_rollouts",
    "load_state",
    "release_leases",
    "rollout_view",
    "save_state",
]


@dataclass(frozen=True)
class BundleRef:
    """The bundle a device gets: what goes into its deploy command."""

    sha256: str
    url: str
    size: int | None = None  # bytes


# (session, release name, release version, device id) -> the bundle, or the reason none fits that device
BundleFor = Callable[[Session, str, int, str], "BundleRef | str"]
# (session, selector) -> device ids; raises InputError for an unknown device or a bad selector
ResolveSelector = Callable[[Session, str], Sequence[str]]

_MAX_LISTED = 10  # devices named in one error message


def _listed(items: Sequence[str]) -> str:
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def create_rollout(
    session: Session,
    spec: RolloutSpec,
    resolve: ResolveSelector,
    bundle_for: BundleFor,
    now: float,
    *,
    holder: str | None = None,
) -> int:
    """Store a new ``pending`` rollout; the driver starts it on its next tick.

    Devices are taken in sorted id order, so the canary is predictable. Nothing is stored when a check fails.

    Raises:
        InputError: the selector fails or matches no device, the waves do not fit the devices, a device has
            no bundle it can run, or a command id would be over the contract's bound.
        Conflict: a selected device is already in a pending, running or paused rollout.
    """
    device_ids = sorted(set(resolve(session, spec.selector)))
    sizes = spec.wave_sizes(len(device_ids))
    taken = session.execute(
        select(RolloutClaim.device_id, RolloutClaim.rollout_id).where(RolloutClaim.device_id.in_(device_ids))
    ).all()
    if taken:
        pairs = [f"{d} (rollout {r})" for d, r in taken]
        raise Conflict(f"{len(taken)} selected devices are already in an active rollout: {_listed(pairs)}")
    bundles: dict[str, BundleRef] = {}
    misfits: list[str] = []
    for device_id in device_ids:
        choice = bundle_for(session, spec.release_name, spec.release_version, device_id)
        if isinstance(choice, BundleRef):
            bundles[device_id] = choice
        else:
            misfits.append(f"{device_id}: {choice}")
    if misfits:
        raise InputError(f"no bundle of {spec.release} fits {len(misfits)} selected devices: {'; '.join(misfits[:10])}")
    row = Rollout(
        release_name=spec.release_name, release_version=spec.release_version, selector=spec.selector,
        spec=spec.to_json(), state="pending", wave=0, rate_anchor=0.0, failures_ack=0, created_at=now, updated_at=now,
    )  # fmt: skip
    session.add(row)
    session.flush()
    too_long = [d for d in device_ids if len(rollback_cmd_id(row.id, d)) > MAX_COMMAND_ID_CHARS]
    if too_long:
        raise InputError(f"device ids too long for a {MAX_COMMAND_ID_CHARS}-character command id: {_listed(too_long)}")
    wave = 0
    for i, device_id in enumerate(device_ids):
        while i >= sizes[wave]:
            wave += 1
        bundle = bundles[device_id]
        session.add(
            RolloutDevice(
                rollout_id=row.id,
                device_id=device_id,
                wave=wave,
                bundle_sha256=bundle.sha256,
                bundle_url=bundle.url,
                bundle_size=bundle.size,
                status="pending",
                deploy_cmd_id=deploy_cmd_id(row.id, device_id),
                rollback_cmd_id=rollback_cmd_id(row.id, device_id),
                sends=0,
            )
        )
        session.add(RolloutClaim(device_id=device_id, rollout_id=row.id))
    session.add(RolloutLease(rollout_id=row.id, holder="", expires_at=0.0))
    evidence = {"spec": spec.to_json(), "devices": len(device_ids), "devices_per_wave": sizes}
    session.add(RolloutAudit(rollout_id=row.id, ts=now, action="Create", reason="created", evidence=evidence))
    try:
        session.flush()
    except IntegrityError as e:  # another server claimed one of the devices since the check above
        raise Conflict("a selected device was taken by a rollout created at the same moment; try again") from e
    return row.id


def _device_state(row: RolloutDevice) -> DeviceState:
    return DeviceState(
        row.device_id, row.wave, row.status, row.sent_at, row.last_sent_at, row.sends, row.done_at, row.rollback,
        row.rollback_sent_at,
    )  # fmt: skip


def _rollout(session: Session, rollout_id: int) -> Rollout:
    row = session.get(Rollout, rollout_id)
    if row is None:
        raise NotFound(f"rollout {rollout_id} does not exist")
    return row


def load_state(session: Session, rollout_id: int) -> RolloutState:
    """The engine's view of a stored rollout.

    Raises:
        NotFound: no such rollout.
    """
    row = _rollout(session, rollout_id)
    devices = session.scalars(
        select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id).order_by(RolloutDevice.device_id)
    ).all()
    return RolloutState(
        row.id, RolloutSpec.from_json(row.spec), row.state, tuple(_device_state(d) for d in devices), row.wave,
        row.wave_started_at, row.soak_since, row.rate_anchor, row.failures_ack, row.paused_reason,
    )  # fmt: skip


def save_state(
    session: Session,
    old: RolloutState,
    new: RolloutState,
    actions: Sequence[Action],
    now: float,
    *,
    holder: str | None = None,
    gates: Mapping[str, Any] | None = None,
    previous: Mapping[str, tuple[str, int]] | None = None,
) -> None:
    """Write what changed from ``old`` to ``new``, one audit row per action, and free the devices of a
    rollout that ended; all in the caller's transaction (the state change and its evidence commit together).

    ``previous`` records each newly sent device's model before the update (the latency gate's baseline).
    """
    row = _rollout(session, old.id)
    for key in ("state", "wave", "wave_started_at", "soak_since", "rate_anchor", "failures_ack", "paused_reason"):
        setattr(row, key, getattr(new, key))
    if gates is not None and gates != row.gates:
        row.gates = dict(gates)
    row.updated_at = now
    before = {d.device_id: d for d in old.devices}
    for d in new.devices:
        if d == before[d.device_id]:
            continue
        values: dict[str, Any] = {
            "status": d.status, "sent_at": d.sent_at, "last_sent_at": d.last_sent_at, "sends": d.sends,
            "done_at": d.done_at, "rollback": d.rollback, "rollback_sent_at": d.rollback_sent_at,
        }  # fmt: skip
        if previous and d.device_id in previous:
            values["previous_name"], values["previous_version"] = previous[d.device_id]
        session.execute(
            update(RolloutDevice)
            .where(RolloutDevice.rollout_id == old.id, RolloutDevice.device_id == d.device_id)
            .values(**values)
        )
    for action in actions:
        name, device_id, reason, evidence = action.audit()
        session.add(
            RolloutAudit(
                rollout_id=old.id,
                ts=now,
                action=name,
                device_id=device_id,
                reason=reason,
                evidence=evidence,
                holder=holder,
            )
        )
    if new.state not in ACTIVE_STATES:
        session.execute(delete(RolloutClaim).where(RolloutClaim.rollout_id == old.id))


def command(session: Session, rollout_id: int, verb: str, now: float, *, reason: str = "") -> RolloutState:
    """Carry out an operator's ``pause``, ``resume`` or ``abort``; returns the new state.

    Raises:
        NotFound: no such rollout.
        Conflict: the command does not apply to the rollout's state.
    """
    state = load_state(session, rollout_id)
    try:
        action = operator(state, verb, reason)
    except TransitionError as e:
        raise Conflict(str(e)) from e
    new = apply(state, [action], now)
    save_state(session, state, new, [action], now, holder="operator")
    return new


def acquire_lease(session: Session, rollout_id: int, holder: str, now: float, lease_s: float) -> bool:
    """Take or renew the lease on a rollout: true when ``holder`` now drives it until ``now + lease_s``.

    One conditional UPDATE, portable to SQLite and PostgreSQL: it succeeds when the lease expired or is
    already ours. On PostgreSQL the row lock it takes lasts until the caller's transaction ends, so two
    processes can never both commit decisions for one rollout in overlapping transactions; on SQLite the
    database's write lock does the same. Clocks of the fleet processes must agree to well under ``lease_s``.
    """
    result = session.execute(
        update(RolloutLease)
        .where(
            RolloutLease.rollout_id == rollout_id,
            or_(RolloutLease.expires_at < now, RolloutLease.holder == holder),
        )
        .values(holder=holder, expires_at=now + lease_s)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def release_leases(session: Session, holder: str) -> None:
    """Give up every lease of ``holder`` (a clean stop), so another process takes over at once."""
    session.execute(
        update(RolloutLease)
        .where(RolloutLease.holder == holder)
        .values(expires_at=0.0)
        .execution_options(synchronize_session=False)
    )


def active_rollout_ids(session: Session) -> list[int]:
    """Rollouts a driver has to drive (pending, running, paused)."""
    return list(session.scalars(select(Rollout.id).where(Rollout.state.in_(ACTIVE_STATES)).order_by(Rollout.id)))


def _summary(row: Rollout) -> dict[str, Any]:
    return {
        "id": row.id, "release": f"{row.release_name}:{row.release_version}", "selector": row.selector,
        "state": row.state, "wave": row.wave + 1, "waves": len(str(row.spec["waves"]).split(",")),
        "paused_reason": row.paused_reason, "created_at": row.created_at, "updated_at": row.updated_at,
    }  # fmt: skip


def list_rollouts(session: Session, *, state: str | None = None) -> list[dict[str, Any]]:
    """Every rollout, newest first (optionally in one state)."""
    query = select(Rollout).order_by(Rollout.id.desc())
    if state is not None:
        query = query.where(Rollout.state == state)
    return [_summary(row) for row in session.scalars(query)]


def rollout_view(session: Session, rollout_id: int) -> dict[str, Any]:
    """A rollout with its waves (device counts by status), its gates (last values vs thresholds) and state.

    Raises:
        NotFound: no such rollout.
    """
    row = _rollout(session, rollout_id)
    spec = RolloutSpec.from_json(row.spec)
    counts = session.execute(
        select(RolloutDevice.wave, RolloutDevice.status, func.count())
        .where(RolloutDevice.rollout_id == rollout_id)
        .group_by(RolloutDevice.wave, RolloutDevice.status)
    ).all()
    waves: list[dict[str, Any]] = [
        {"wave": i + 1, "text": w.text, "devices": 0, **dict.fromkeys(DEVICE_STATUSES, 0)}
        for i, w in enumerate(spec.waves)
    ]
    for wave, status, n in counts:
        waves[wave][status] = n
        waves[wave]["devices"] += n
    last = row.gates or {}
    gates = [
        {"gate": g.text, "metric": g.metric, "threshold": g.threshold, **last.get(g.text, {"value": None, "ok": None})}
        for g in spec.gates
    ]
    return {**_summary(row), "spec": row.spec, "soak_since": row.soak_since, "waves_detail": waves, "gates": gates}


def audit_log(session: Session, rollout_id: int, *, after_id: int = 0, limit: int = 500) -> list[dict[str, Any]]:
    """The rollout's audit rows in order, from ``after_id`` on (for following a rollout).

    Raises:
        NotFound: no such rollout.
    """
    _rollout(session, rollout_id)
    rows = session.scalars(
        select(RolloutAudit)
        .where(RolloutAudit.rollout_id == rollout_id, RolloutAudit.id > after_id)
        .order_by(RolloutAudit.id)
        .limit(max(1, min(limit, 5000)))
    )
    return [
        {"id": r.id, "ts": r.ts, "action": r.action, "device_id": r.device_id, "reason": r.reason,
         "evidence": r.evidence, "holder": r.holder}
        for r in rows
    ]  # fmt: skip


def device_rows(session: Session, rollout_id: int, device_ids: Sequence[str]) -> dict[str, RolloutDevice]:
    """The stored rows of some devices of a rollout (the driver reads their bundle and command ids)."""
    rows = session.scalars(
        select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id, RolloutDevice.device_id.in_(device_ids))
    )
    return {r.device_id: r for r in rows}
