"""The rollout state machine: pure, no I/O, the clock passed in (tuf's ``TrustedMetadataSet`` lesson).

``decide(state, observations, now)`` looks at a rollout as stored and at what the devices reported, and
returns the actions to take; ``apply(state, actions, now)`` is the state those actions lead to. The driver
(``fleet.rollouts.driver``) stores that state and the actions (the audit log) in one transaction, then
publishes the commands, so every decision here can be replayed and tested with a fake clock.

Rules, in the order ``decide`` applies them each tick:

1. Progress: a sent deploy whose command id has an ``active`` event is ``active``; ``failed`` or
   ``rolled_back`` (the device kept its previous model) is ``failed``; no ``active`` within the wave
   timeout is ``failed`` too. A rollback we sent is done on ``rolled_back``.
2. Rollbacks owed after a breach are sent as each of those devices becomes ``active``; a deploy or
   rollback with no event at all after ``resend_s`` is sent again with the same id (the agent
   de-duplicates by id), so a device never sees two different deploy ids from one rollout.
3. Gates (running rollouts only). ``health_failures`` counts every failed device since the last resume,
   at any moment; every spec has one (``health_failures=0`` unless the user allowed more), so a failed
   deploy never counts as success and a wave whose devices all failed never soaks or advances. The
   metric gates (``error_rate``, ``p95_latency``, ``silence``) look at the current wave's ``active``
   devices. A gate with no data yet holds (no requests, no baseline): a device that sends nothing is the
   ``silence`` gate's business. A breach pauses the rollout and rolls back the wave's updated devices.
4. Sending: the wave's pending devices get their deploy, at most ``rate_per_s`` per second (a token
   bucket of one second's worth, resends included).
5. When every device of the wave is done, the soak starts; when it has lasted ``soak_s`` with every
   gate holding, the next wave starts, or the rollout completes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet.rollouts.actions import (
    Abort,
    Action,
    AdvanceWave,
    Complete,
    DeviceDone,
    Fail,
    Pause,
    Resume,
    RollbackDone,
    SendDeploy,
    SendRollback,
    SoakStarted,
)
from fleet.rollouts.spec import Gate, RolloutSpec

__all__ = [
    "ACTIVE_STATES",
    "DEVICE_STATUSES",
    "ROLLOUT_STATES",
    "Abort",
    "Action",
    "AdvanceWave",
    "Complete",
    "DeviceDone",
    "DeviceState",
    "Fail",
    "ModelStats",
    "Observations",
    "Pause",
    "Resume",
    "RollbackDone",
    "RolloutState",
    "SendDeploy",
    "SendRollback",
    "SoakStarted",
    "TransitionError",
    "apply",
    "decide",
    "deploy_cmd_id",
    "evaluate_gates",
    "operator",
    "rollback_cmd_id",
]

ROLLOUT_STATES = ("pending", "running", "paused", "completed", "aborted", "failed")
ACTIVE_STATES = ("pending", "running", "paused")  # a device in one of these rollouts is taken
DEVICE_STATUSES = ("pending", "sent", "active", "failed", "rolled_back")
DONE = ("active", "failed", "rolled_back")
TERMINAL_PHASES_FAILED = frozenset({"failed", "rolled_back"})


def deploy_cmd_id(rollout_id: int, device_id: str) -> str:
    """The one deploy command id of a device in a rollout (the agent de-duplicates by it)."""
    return f"ro{rollout_id}-{device_id}-deploy"


def rollback_cmd_id(rollout_id: int, device_id: str) -> str:
    """The one rollback command id of a device in a rollout."""
    return f"ro{rollout_id}-{device_id}-rollback"


class TransitionError(ValueError):
    """An operator command that does not apply to the rollout's state (resume a running one, ...)."""


# ---- state and observations -------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceState:
    """One device of a rollout. ``rollback``: None, ``wanted`` (owed once active), ``sent``, ``done``, ``failed``."""

    device_id: str
    wave: int
    status: str = "pending"
    sent_at: float | None = None  # first deploy sent, unix s
    last_sent_at: float | None = None
    sends: int = 0
    done_at: float | None = None
    rollback: str | None = None
    rollback_sent_at: float | None = None


@dataclass(frozen=True)
class RolloutState:
    """A rollout as stored: its spec, state, current wave (0-based) and devices."""

    id: int
    spec: RolloutSpec
    state: str
    devices: tuple[DeviceState, ...]
    wave: int = 0
    wave_started_at: float | None = None
    soak_since: float | None = None
    rate_anchor: float = 0.0  # token bucket: the time at which it was empty
    failures_ack: int = 0  # failures acknowledged by the last resume
    paused_reason: str | None = None

    @property
    def waves(self) -> int:
        return len(self.spec.waves)

    def in_wave(self, wave: int | None = None) -> list[DeviceState]:
        n = self.wave if wave is None else wave
        return [d for d in self.devices if d.wave == n]

    def failures(self) -> int:
        return sum(d.status == "failed" for d in self.devices)


@dataclass(frozen=True)
class ModelStats:
    """Telemetry of one model version on some devices over a window."""

    requests: int = 0
    errors: int = 0
    p95_ms: float | None = None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass(frozen=True)
class Observations:
    """What the devices reported, as the driver read it for one tick.

    Attributes:
        phases: event phases seen per command id (deploys and rollbacks of this rollout).
        last_seen: the last time each device sent anything (unix s).
        new: the release's version on the current wave's ``active`` devices since they switched.
        previous: their previous versions on the same devices, before the wave started.
        serving: devices sent a deploy whose own ``status`` reports the rollout's bundle active.
        reverted: devices sent a rollback whose ``status``, received after it was sent, reports another
            model. Statuses reach every fleet process (they are not shared out), so these two decide
            when a device's ``active`` / ``rolled_back`` event went to a fleet process that died.
    """

    phases: Mapping[str, frozenset[str]] = field(default_factory=dict)
    last_seen: Mapping[str, float] = field(default_factory=dict)
    new: ModelStats = field(default_factory=ModelStats)
    previous: ModelStats = field(default_factory=ModelStats)
    serving: frozenset[str] = frozenset()
    reverted: frozenset[str] = frozenset()


# ---- gates ------------------------------------------------------------------------------------


def _gate_value(gate: Gate, state: RolloutState, devices: Sequence[DeviceState], obs: Observations, now: float) -> Any:
    """The measured value of ``gate`` (None: no data yet), and details for the evidence."""
    if gate.metric == "health_failures":
        failed = [d.device_id for d in state.devices if d.status == "failed"]
        return float(len(failed) - state.failures_ack), {"failed": failed[:20]}
    active = [d for d in devices if d.status == "active"]
    if gate.metric == "silence":
        silent = {d.device_id: now - max(obs.last_seen.get(d.device_id, 0.0), d.done_at or 0.0) for d in active}
        worst = max(silent.values(), default=None)
        return worst, {"silent": sorted(k for k, v in silent.items() if not gate.holds(v))[:20]}
    if not active:  # telemetry of the new version means nothing before a device of the wave runs it
        return None, {}
    if gate.metric == "error_rate":
        return obs.new.error_rate, {"requests": obs.new.requests, "errors": obs.new.errors}
    # p95_latency
    details = {"new_p95_ms": obs.new.p95_ms, "previous_p95_ms": obs.previous.p95_ms}
    if not gate.relative:
        return obs.new.p95_ms, details
    if obs.new.p95_ms is None or not obs.previous.p95_ms:
        return None, details
    return obs.new.p95_ms / obs.previous.p95_ms, details


def evaluate_gates(
    state: RolloutState, obs: Observations, now: float, devices: Sequence[DeviceState] | None = None
) -> tuple[list[Gate], dict[str, Any]]:
    """Every gate of the rollout against the current wave: ``(breached gates, evidence)``.

    The evidence maps each gate's text to ``{"value", "threshold", "ok", ...details}``; a gate with no data
    has ``value`` None and holds.
    """
    wave_devices = state.in_wave() if devices is None else devices
    breached: list[Gate] = []
    evidence: dict[str, Any] = {}
    for gate in state.spec.gates:
        value, details = _gate_value(gate, state, wave_devices, obs, now)
        ok = value is None or gate.holds(float(value))
        if not ok:
            breached.append(gate)
        evidence[gate.text] = {"value": value, "threshold": gate.threshold, "ok": ok, **details}
    return breached, evidence


# ---- decide -----------------------------------------------------------------------------------


def _progress(state: RolloutState, obs: Observations, now: float) -> list[Action]:
    actions: list[Action] = []
    for d in state.devices:
        if d.status == "sent":
            phases = obs.phases.get(deploy_cmd_id(state.id, d.device_id), frozenset())
            if "active" in phases:
                actions.append(DeviceDone(d.device_id, "active", "the device reported active"))
            elif d.device_id in obs.serving:
                actions.append(DeviceDone(d.device_id, "active", "the device's status reports the bundle active"))
            elif phases & TERMINAL_PHASES_FAILED:
                actions.append(
                    DeviceDone(d.device_id, "failed", "the deploy failed on the device", {"phases": sorted(phases)})
                )
            elif d.sent_at is not None and now - d.sent_at >= state.spec.wave_timeout_s:
                evidence = {"sent_at": d.sent_at, "timeout_s": state.spec.wave_timeout_s, "phases": sorted(phases)}
                actions.append(DeviceDone(d.device_id, "failed", "not active within the wave timeout", evidence))
        if d.rollback == "sent":
            phases = obs.phases.get(rollback_cmd_id(state.id, d.device_id), frozenset())
            if "rolled_back" in phases:
                actions.append(RollbackDone(d.device_id, True, "the device reported rolled_back"))
            elif d.device_id in obs.reverted:
                actions.append(RollbackDone(d.device_id, True, "the device's status reports the previous model"))
            elif "failed" in phases:
                actions.append(RollbackDone(d.device_id, False, "the rollback failed on the device"))
    return actions


def _rollbacks(state: RolloutState, obs: Observations, now: float) -> list[Action]:
    actions: list[Action] = []
    for d in state.devices:
        cmd_id = rollback_cmd_id(state.id, d.device_id)
        if d.rollback == "wanted" and d.status == "active":
            actions.append(SendRollback(d.device_id, cmd_id))
        elif d.rollback == "sent" and not obs.phases.get(cmd_id):
            if d.rollback_sent_at is not None and now - d.rollback_sent_at >= state.spec.resend_s:
                actions.append(SendRollback(d.device_id, cmd_id, resend=True))
    return actions


def _tokens(state: RolloutState, now: float) -> float:
    rate = state.spec.rate_per_s
    return min(max(1.0, rate), max(0.0, now - state.rate_anchor) * rate)


def _sends(state: RolloutState, obs: Observations, now: float) -> list[Action]:
    budget = int(_tokens(state, now) + 1e-9)
    actions: list[Action] = []
    resend_s = state.spec.resend_s
    for d in state.devices:  # resends first: they have waited longest
        if len(actions) >= budget:
            return actions
        cmd_id = deploy_cmd_id(state.id, d.device_id)
        due = d.last_sent_at is not None and now - d.last_sent_at >= resend_s
        if d.status == "sent" and due and not obs.phases.get(cmd_id):
            actions.append(SendDeploy(d.device_id, cmd_id, resend=True))
    for d in state.in_wave():
        if len(actions) >= budget:
            break
        if d.status == "pending":
            actions.append(SendDeploy(d.device_id, deploy_cmd_id(state.id, d.device_id)))
    return actions


def decide(state: RolloutState, observations: Observations, now: float) -> list[Action]:
    """The actions for this tick (see the module docstring for the rules); pure."""
    if state.state == "pending":
        sizes = [len(state.in_wave(w)) for w in range(state.waves)]
        return [AdvanceWave(0, "rollout started", {"devices": len(state.devices), "devices_per_wave": sizes})]
    if state.state not in ("running", "paused"):
        return []
    actions = _progress(state, observations, now)
    view = apply(state, actions, now)  # the state with this tick's news, for the rules below
    actions += _rollbacks(view, observations, now)
    if state.state == "paused":
        return actions
    breached, evidence = evaluate_gates(view, observations, now)
    if breached:
        owed = tuple(d.device_id for d in view.in_wave() if d.status in ("sent", "active") and d.rollback is None)
        reason = "; ".join(f"gate {g.text} breached: {evidence[g.text]['value']!r}" for g in breached)
        pause = Pause(reason, {"wave": state.wave, "gates": evidence}, owed)
        actions.append(pause)
        return actions + _rollbacks(apply(view, [pause], now), observations, now)
    actions += _sends(view, observations, now)
    wave = view.in_wave()
    if not all(d.status in DONE for d in wave):
        return actions
    if view.soak_since is None:
        return [*actions, SoakStarted(state.wave)]
    soaked = now - view.soak_since
    if soaked < state.spec.soak_s:
        return actions
    # "soaked_wave", not "wave": the audit row merges this evidence over the action's own fields, and
    # AdvanceWave's ``wave`` (the wave it starts) must not be overwritten by the one that soaked
    done = {"soaked_wave": state.wave, "soaked_s": soaked, "gates": evidence, "statuses": _counts(wave)}
    if state.wave + 1 >= state.waves:
        return [*actions, Complete("every wave done and every gate held through its soak", done)]
    return [*actions, AdvanceWave(state.wave + 1, f"wave {state.wave + 1} soaked {soaked:.0f} s, gates held", done)]


def _counts(devices: Sequence[DeviceState]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in devices:
        counts[d.status] = counts.get(d.status, 0) + 1
    return counts


# ---- operator commands ------------------------------------------------------------------------


def operator(state: RolloutState, verb: str, reason: str = "") -> Action:
    """The action of an operator's ``pause``, ``resume`` or ``abort``.

    Raises:
        TransitionError: the verb does not apply to the rollout's state, or is unknown.
    """
    who = reason or f"{verb} by operator"
    if verb == "pause" and state.state in ("pending", "running"):
        return Pause(who)
    if verb == "resume" and state.state == "paused":
        return Resume(who, {"failures_acknowledged": state.failures(), "paused_reason": state.paused_reason})
    if verb == "abort" and state.state in ACTIVE_STATES:
        return Abort(who)
    if verb not in ("pause", "resume", "abort"):
        raise TransitionError(f"unknown command {verb!r}; known: pause, resume, abort")
    raise TransitionError(f"rollout {state.id} is {state.state}: cannot {verb} it")


# ---- apply ------------------------------------------------------------------------------------


def _replace_device(devices: dict[str, DeviceState], device_id: str, **changes: Any) -> None:
    devices[device_id] = dataclasses.replace(devices[device_id], **changes)


def apply(state: RolloutState, actions: Sequence[Action], now: float) -> RolloutState:
    """The state after ``actions`` at ``now``; pure (``state`` is not changed)."""
    devices = {d.device_id: d for d in state.devices}
    changes: dict[str, Any] = {}
    sent = 0
    for a in actions:
        if isinstance(a, SendDeploy):
            d = devices[a.device_id]
            _replace_device(devices, a.device_id, status="sent", sent_at=d.sent_at or now, last_sent_at=now)
            _replace_device(devices, a.device_id, sends=d.sends + 1)
            sent += 1
        elif isinstance(a, SendRollback):
            _replace_device(devices, a.device_id, rollback="sent", rollback_sent_at=now)
        elif isinstance(a, DeviceDone):
            d = devices[a.device_id]
            owed = d.rollback if a.status == "active" else None  # a failed deploy needs no rollback
            _replace_device(devices, a.device_id, status=a.status, done_at=now, rollback=owed)
        elif isinstance(a, RollbackDone):
            status = "rolled_back" if a.ok else devices[a.device_id].status
            _replace_device(devices, a.device_id, rollback="done" if a.ok else "failed", status=status)
        elif isinstance(a, Pause):
            for device_id in a.rollback:
                _replace_device(devices, device_id, rollback="wanted")
            changes.update(state="paused", paused_reason=a.reason)
        elif isinstance(a, Resume):
            changes.update(state="running", paused_reason=None, soak_since=None, failures_ack=state.failures())
        elif isinstance(a, Abort):
            changes.update(state="aborted")
        elif isinstance(a, Complete):
            changes.update(state="completed")
        elif isinstance(a, Fail):
            changes.update(state="failed", paused_reason=a.reason)
        elif isinstance(a, SoakStarted):
            changes.update(soak_since=now)
        elif isinstance(a, AdvanceWave):
            changes.update(state="running", wave=a.wave, wave_started_at=now, soak_since=None)
            if state.state == "pending":
                changes.update(rate_anchor=now - max(1.0, state.spec.rate_per_s) / state.spec.rate_per_s)
    if sent:
        base = dataclasses.replace(state, **{k: v for k, v in changes.items() if k == "rate_anchor"})
        tokens = _tokens(base, now)
        changes["rate_anchor"] = now - (tokens - sent) / state.spec.rate_per_s
    return dataclasses.replace(state, devices=tuple(devices[d.device_id] for d in state.devices), **changes)
