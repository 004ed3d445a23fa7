"""The demo's two rollouts, each step checking through the fleet's API that it did what it says.

1. ``digits:1`` to every device in one wave: each gets the v1 bundle for its runtime; all report v1 active.
2. ``digits:2`` in waves ``1,2,3`` (sorted device ids) with the gates ``health_failures=0`` and
   ``error_rate<=1%``: cam-1 (ONNX Runtime) gets a genuine v2 and runs it; cam-2 (OpenVINO) gets the broken
   bundle, fails its health check and rolls back to v1; the gate pauses the rollout, so cam-3 (LiteRT) is
   never sent v2. The audit trail shows each decision with its reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdk.cli.demo.build import Built, break_weights
from sdk.cli.demo.fleet_stage import DEVICES, Fleet
from sdk.cli.demo.supervisor import DemoFailed

__all__ = ["BROKEN_TARGET", "Uploaded", "rollout_v1", "rollout_v2", "upload_releases"]

BROKEN_TARGET = "openvino"  # the target whose v2 bundle is broken: cam-2's, the second wave
Say = Callable[[str], None]


@dataclass(frozen=True)
class Uploaded:
    """sha256 -> ``v<version> <target>/<precision>`` of every bundle uploaded, and the broken one's sha256."""

    names: dict[str, str]
    broken_sha256: str


def upload_releases(fleet: Fleet, built: Built, work: Path, say: Say) -> Uploaded:
    """Upload every v1 bundle, v2's genuine bundles and, for ``BROKEN_TARGET``, the broken v2 instead."""
    genuine = built.bundle(2, BROKEN_TARGET, "int8")
    broken = break_weights(
        genuine, built.private_key, built.public_key, work / "digits-2-openvino-int8-BROKEN.edgebundle"
    )
    say(f"made {broken.name}: v2's OpenVINO bundle with its weights zeroed and signed again with the release key")
    names: dict[str, str] = {}
    broken_sha = ""
    for row in built.rows:
        path = broken if row.path == genuine else row.path
        body = fleet.upload(path)
        label = f"v{row.version} {row.target}/{row.precision}" + (" (BROKEN)" if path == broken else "")
        names[body["sha256"]] = label
        broken_sha = body["sha256"] if path == broken else broken_sha
    say(f"uploaded {len(names)} bundles; the server verified each signature against the release key")
    return Uploaded(names, broken_sha)


def _events(fleet: Fleet, device_id: str) -> list[dict[str, Any]]:
    body = fleet.client.get(f"/devices/{device_id}/events")
    rows = body.get("events", body) if isinstance(body, dict) else body
    return [e for e in rows if isinstance(e, dict)]


def _device_line(fleet: Fleet, device_id: str, uploaded: Uploaded) -> str:
    d = fleet.client.get(f"/devices/{device_id}")
    model = d.get("model") or {}
    bundle = uploaded.names.get(str(model.get("sha256")), "?")
    return f"{device_id:<6} runs {model.get('name')} v{model.get('version')} from bundle {bundle}"


def rollout_v1(fleet: Fleet, uploaded: Uploaded, say: Say) -> int:
    """``digits:1`` to every device; returns the rollout id.

    Raises:
        DemoFailed: the rollout did not complete, or a device does not report v1 active.
    """
    rollout_id = fleet.rollout("digits:1", waves="100%", soak="1s", gates=["health_failures=0"])
    say(f"rollout {rollout_id}: digits:1 to all devices in one wave, gate health_failures=0")
    fleet.wait_rollout(rollout_id, ("completed",), 120.0, say)
    fleet.wait("every device reporting v1", lambda: all(fleet.version_of(d) == 1 for d, _ in DEVICES), 30.0)
    for device_id, target in DEVICES:
        line = _device_line(fleet, device_id, uploaded)
        if f"v1 {target}/" not in line:
            raise DemoFailed(f"{device_id} should run a v1 {target} bundle: {line}")
        say(line)
    return rollout_id


def rollout_v2(fleet: Fleet, uploaded: Uploaded, say: Say) -> tuple[int, list[str]]:
    """``digits:2`` in waves with gates; returns the rollout id and the audit table's lines.

    Raises:
        DemoFailed: any of the claims in the module docstring does not hold.
    """
    from sdk.cli.fleet_views import audit_table

    (genuine, _), (canary, _), (untouched, _) = DEVICES
    gates = ["health_failures=0", "error_rate<=1%"]
    rollout_id = fleet.rollout("digits:2", waves="1,2,3", soak="2s", gates=gates)
    say(f"rollout {rollout_id}: digits:2 in waves 1,2,3 ({genuine}, then {canary}, then {untouched}), "
        f"soak 2s, gates {', '.join(gates)}")  # fmt: skip
    view = fleet.wait_rollout(rollout_id, ("paused",), 150.0, say)

    fleet.wait(f"{genuine} reporting v2", lambda: fleet.version_of(genuine) == 2, 30.0)
    say(_device_line(fleet, genuine, uploaded) + "  (genuine v2: active)")
    phases = {
        str(e.get("phase")) for e in _events(fleet, canary) if str(e.get("cmd_id", "")).startswith(f"ro{rollout_id}-")
    }
    if not {"failed", "rolled_back"} <= phases:
        raise DemoFailed(f"{canary} should have failed v2's health check and rolled back; its events: {sorted(phases)}")
    failed = [e for e in _events(fleet, canary) if e.get("phase") == "failed"]
    detail = (failed[-1].get("detail") or {}) if failed else {}
    error = f"{detail.get('error', '')}: {detail.get('message', '')}" if detail else ""
    if fleet.version_of(canary) != 1:
        raise DemoFailed(f"{canary} should be back on v1 after its rollback")
    say(_device_line(fleet, canary, uploaded) + "  (v2 failed its health check: rolled back)")
    if error:
        say(f"{canary} reported {error[:300]}")
    if fleet.version_of(untouched) != 1 or any(
        str(e.get("cmd_id", "")).startswith(f"ro{rollout_id}-") for e in _events(fleet, untouched)
    ):
        raise DemoFailed(f"{untouched} should never have been sent v2 (the rollout paused before its wave)")
    say(_device_line(fleet, untouched, uploaded) + "  (never sent v2: the rollout paused first)")

    rows = fleet.client.get(f"/rollouts/{rollout_id}/audit")
    audit = rows.get("audit", rows) if isinstance(rows, dict) else rows
    pauses = [r for r in audit if r.get("action") == "Pause"]
    if not pauses or "health_failures=0" not in str(pauses[0].get("reason")):
        raise DemoFailed(f"the audit trail should hold the pause on health_failures=0: {audit}")
    gate = pauses[0].get("evidence", {}).get("gates", {}).get("health_failures=0", {})
    if gate.get("failed") != [canary]:
        raise DemoFailed(f"the breach should name {canary}: {gate}")
    if view.get("state") != "paused":
        raise DemoFailed(f"rollout {rollout_id} should be paused: {view}")
    return rollout_id, audit_table(audit)
