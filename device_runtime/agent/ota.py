"""The OTA deployment state machine: commands, the durable deployment record, and restart decisions.

Pure data and pure functions; the agent (``device_runtime.agent``) does all the I/O. See docs/ota.md. The
commands themselves (their keys and bounds) are the MQTT contract's, ``sdk.mqtt_contract``.

A deployment moves through these phases (reported in events and the status)::

    received -> downloading -> verifying -> staged -> health_check -> switching -> active
                     |              |           |           |
                     +--------------+-----------+-----------+---> failed (-> rolled_back after a trial)

``switching`` is internal (the health check passed and the pointer is about to be written); the MQTT
``events`` carry the phases of the contract. ``deploy.json`` is written only where recovery needs it:
``downloading`` when a run starts (it counts ``resumes``), ``health_check`` before each trial load (it
counts ``attempts``) and a terminal ``failed``/``rolled_back`` record; a success is committed by the
pointer alone. After a crash, ``recover`` decides what the restarted agent does with the record it finds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from sdk.mqtt_contract import DEPLOYMENT_PHASES, CommandTimes, parse_command, parse_deploy

__all__ = [
    "PHASES",
    "Deployment",
    "Limits",
    "Recovery",
    "command_refusal",
    "deployment_from_command",
    "recover",
]

PHASES = DEPLOYMENT_PHASES  # the status shows the record's phase: the contract names them
TERMINAL = ("active", "failed", "rolled_back")


@dataclass(frozen=True)
class Limits:
    """How often an interrupted deployment is resumed before it is abandoned."""

    max_trial_attempts: int = 2  # trial loads/health checks started (a crash there counts)
    max_resumes: int = 3  # restarts that resumed a download or verification


@dataclass(frozen=True)
class Deployment:
    """The durable record of the one OTA operation in progress (``deploy`` or ``rollback``)."""

    cmd_id: str
    kind: Literal["deploy", "rollback"]
    phase: str = "received"
    url: str = ""
    sha256: str = ""  # expected sha256 of the bundle archive (deploy) or of the slot rolled back to
    size: int | None = None  # exact size in bytes, when the command gave it
    version: int | None = None  # the version the fleet announced (informational; the manifest decides)
    allow_downgrade: bool = False
    retry_bad: bool = False
    slot: str | None = None  # the slot being written / switched to
    folder: str | None = None  # its new folder under slots/ (device_runtime.agent.slots)
    attempts: int = 0  # trial loads started
    resumes: int = 0  # restarts that resumed this deployment
    previous: Mapping[str, Any] | None = None  # the active model when it started

    def at(self, phase: str, **changes: Any) -> Deployment:
        """This record in ``phase`` (with other fields changed)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        return replace(self, phase=phase, **changes)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Deployment:
        """Parse a record written by ``to_bytes``.

        Raises:
            ValueError: not such a record.
        """
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("a deployment record is a JSON object")
        try:
            record = cls(**raw)
        except TypeError as e:
            raise ValueError(f"deployment record: {e}") from e
        if record.phase not in PHASES or record.kind not in ("deploy", "rollback"):
            raise ValueError(f"deployment record with phase {record.phase!r}, kind {record.kind!r}")
        return record


def deployment_from_command(cmd: Mapping[str, Any], *, max_bundle_bytes: int) -> Deployment:
    """The initial record of a ``deploy`` or ``rollback`` command, checked by the contract's parsers.

    Raises:
        CommandError (``sdk.mqtt_contract``): not a deploy or rollback, or a missing or ill-typed key
            (``url``, ``sha256``, ``size``, ``version``, ...).
    """
    cmd_id, kind = parse_command(cmd)
    if kind == "rollback":
        return Deployment(cmd_id=cmd_id, kind="rollback")
    deploy = parse_deploy(cmd, max_bundle_bytes=max_bundle_bytes)
    return Deployment(
        cmd_id=deploy.id,
        kind="deploy",
        url=deploy.url,
        sha256=deploy.sha256,
        size=deploy.size,
        version=deploy.version,
        allow_downgrade=deploy.allow_downgrade,
        retry_bad=deploy.retry_bad,
    )


def command_refusal(
    times: CommandTimes, now: float, *, horizon: float, max_age_s: float, require_issued_at: bool
) -> str | None:
    """Why a command not seen before (its id unknown to the journal) must not run, or None. Pure.

    - ``expires_at`` passed (the device's clock decides);
    - no ``issued_at`` when the device requires one;
    - ``issued_at`` more than ``max_age_s`` before now: the journal no longer remembers ids that old, so
      an old command captured and sent again would look new;
    - ``issued_at`` at or before the journal's ``horizon`` (the issue time of the newest id it forgot to
      stay bounded): the same, for ids forgotten because there were too many.

    A command without ``issued_at`` (fleets before it, hand-written ones) is de-duplicated by id only,
    while the journal remembers the id.
    """
    if times.expires_at is not None and times.expires_at < now:
        return f"the command expired at {times.expires_at:.0f} (device clock {now:.0f})"
    if times.issued_at is None:
        return "the command has no issued_at, which this device requires" if require_issued_at else None
    if times.issued_at < now - max_age_s:
        return f"the command was issued more than {max_age_s:.0f} s ago (a possible replay)"
    if times.issued_at <= horizon:
        return "the command was issued before the oldest command this device remembers (a possible replay)"
    return None


@dataclass(frozen=True)
class Recovery:
    """What a restarted agent does with the deployment record it found.

    Attributes:
        action: ``"resume"`` (continue from ``resume_at``), ``"committed"`` (the pointer already names
            the new bundle: report it active), ``"abandon"`` (report ``failed``; ``rolled_back`` too when
            a trial had started; mark the bundle bad when ``bad``) or ``"report"`` (the record is terminal:
            report its phase again and forget it).
        resume_at: the phase to continue from.
        reason: for the event's detail.
        bad: the bundle itself is to blame (mark its sha256 bad).
    """

    action: Literal["resume", "committed", "abandon", "report"]
    resume_at: str | None = None
    reason: str = ""
    bad: bool = False


def recover(record: Deployment, active_sha256: str | None, limits: Limits = Limits()) -> Recovery:
    """Decide what to do with a deployment record found at start, given the pointer's active sha256.

    Pure. The rules (docs/ota.md, "Crash at each step"):

    - a terminal record is reported again (its event may not have reached the outbox);
    - a rollback is committed if the pointer names its slot's bundle, else abandoned (nothing changed);
    - ``health_check`` (or ``switching``, written by older agents) with the pointer on the new bundle is
      committed: the pointer write is the commit, no record follows it;
    - a crash during the trial load or health check (``health_check``, or ``switching`` not yet
      committed) is retried until ``max_trial_attempts`` trials have started, then abandoned and the
      bundle marked bad: a bundle that kills the process is not retried forever;
    - a crash while downloading, verifying or staging resumes (the download from its part file, the
      verification from scratch) up to ``max_resumes`` times.
    """
    if record.terminal:
        return Recovery("report", reason=f"the agent restarted after the deployment ended ({record.phase})")
    if record.kind == "rollback":
        if record.sha256 and active_sha256 == record.sha256:
            return Recovery("committed", reason="the rollback was committed before the restart")
        return Recovery("abandon", reason="the agent restarted before the rollback was committed; nothing changed")
    if record.phase in ("health_check", "switching") and active_sha256 == record.sha256:
        # The agent writes no record after the trial: the pointer naming the new bundle is the commit.
        return Recovery("committed", reason="the switch was committed before the restart")
    if record.phase in ("health_check", "switching"):
        if record.attempts >= limits.max_trial_attempts:
            return Recovery(
                "abandon",
                reason=f"the agent died during the trial load or health check {record.attempts} times",
                bad=True,
            )
        return Recovery("resume", resume_at="health_check", reason="the agent restarted during the health check")
    if record.resumes >= limits.max_resumes:
        return Recovery("abandon", reason=f"the deployment was interrupted by {record.resumes + 1} restarts")
    resume_at = "downloading" if record.phase in ("received", "downloading") else "verifying"
    return Recovery("resume", resume_at=resume_at, reason=f"the agent restarted while {record.phase}")
