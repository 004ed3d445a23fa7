"""The engine's actions: what ``decide`` returns and ``apply`` folds into the state; each is one audit row.

Every action carries its reason and evidence (gate values vs thresholds, phases seen, timeouts), so the
audit log says why, not only what.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Abort", "Action", "AdvanceWave", "Complete", "DeviceDone", "Fail", "Pause", "Resume", "RollbackDone",
    "SendDeploy", "SendRollback", "SoakStarted",
]  # fmt: skip


@dataclass(frozen=True)
class Action:
    """Base of every action; ``audit()`` is its row in the audit log."""

    def audit(self) -> tuple[str, str | None, str, dict[str, Any]]:
        """``(action, device_id, reason, evidence)``."""
        data = dataclasses.asdict(self)
        device = data.pop("device_id", None)
        reason = str(data.pop("reason", ""))
        evidence = data.pop("evidence", None) or {}
        return type(self).__name__, device, reason, {**data, **evidence}


@dataclass(frozen=True)
class SendDeploy(Action):
    device_id: str
    cmd_id: str
    resend: bool = False


@dataclass(frozen=True)
class SendRollback(Action):
    device_id: str
    cmd_id: str
    resend: bool = False


@dataclass(frozen=True)
class DeviceDone(Action):
    device_id: str
    status: str  # active | failed
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RollbackDone(Action):
    device_id: str
    ok: bool
    reason: str


@dataclass(frozen=True)
class SoakStarted(Action):
    wave: int
    reason: str = "every device of the wave is done"


@dataclass(frozen=True)
class AdvanceWave(Action):
    wave: int
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pause(Action):
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    rollback: tuple[str, ...] = ()  # devices whose rollback is owed


@dataclass(frozen=True)
class Resume(Action):
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Abort(Action):
    reason: str


@dataclass(frozen=True)
class Complete(Action):
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Fail(Action):
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
