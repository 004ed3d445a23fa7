"""How the CLI shows each fleet resource: one small function per resource, from the API's JSON to text.

The field names are the API's (``fleet.devices.schemas``, ``fleet.releases.schemas``, the read views of
``fleet.rollouts.service``); a field a response lacks shows as ``-`` instead of a traceback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sdk.cli.tables import ago, table_lines

__all__ = [
    "TERMINAL_STATES",
    "audit_table",
    "bundle_lines",
    "device_lines",
    "devices_table",
    "items",
    "releases_table",
    "rollout_lines",
    "rollout_summary",
    "rollouts_table",
]

TERMINAL_STATES = frozenset({"completed", "aborted", "failed"})
DEVICE_STATUSES = ("pending", "sent", "active", "failed", "rolled_back")


def items(data: Any, *keys: str) -> list[dict[str, Any]]:
    """The list in a list response, bare or wrapped as ``{"<key>": [...]}`` / ``{"items": [...]}``."""
    if isinstance(data, list):
        return [d for d in data if isinstance(d, dict)]
    if isinstance(data, Mapping):
        for key in (*keys, "items"):
            if isinstance(data.get(key), list):
                return [d for d in data[key] if isinstance(d, dict)]
    return []


def _pick(d: Mapping[str, Any], *names: str, default: Any = "-") -> Any:
    for name in names:
        value = d.get(name)
        if value is not None:
            return value
    return default


def _model(d: Mapping[str, Any]) -> str:
    """``name v<version>`` of a device's active model, from a nested ``model`` or flat ``model_*`` fields."""
    nested = _pick(d, "model", "active_model", default=None)
    m = nested if isinstance(nested, Mapping) else d
    name = _pick(m, "name" if m is nested else "model_name", default=None)
    version = _pick(m, "version" if m is nested else "model_version", default=None)
    if name is None:
        return "-"
    return f"{name} v{version}" if version is not None else str(name)


def _tags(d: Mapping[str, Any]) -> str:
    tags = d.get("tags")
    if isinstance(tags, Mapping):
        return ",".join(f"{k}={v}" for k, v in sorted(tags.items())) or "-"
    if isinstance(tags, list):
        return ",".join(f"{t.get('key')}={t.get('value')}" if isinstance(t, Mapping) else str(t) for t in tags) or "-"
    return "-"


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "-"


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return f"{value:.4g}"


# ---- devices -----------------------------------------------------------------------------------
def devices_table(data: Any, now: float | None = None) -> list[str]:
    rows = [
        [
            _pick(d, "device_id", "id"),
            "online" if d.get("online") else "offline",
            ago(_pick(d, "last_seen", default=None), now),
            _model(d),
            _pick(d, "slot"),
            _pick(d, "state"),
            _tags(d),
        ]
        for d in items(data, "devices")
    ]
    return table_lines(["device", "online", "last seen", "model", "slot", "state", "tags"], rows)


def device_lines(d: Mapping[str, Any], now: float | None = None) -> list[str]:
    lines = [
        f"device:       {_pick(d, 'device_id', 'id')}  ({'online' if d.get('online') else 'offline'})",
        f"seen:         first {ago(_pick(d, 'first_seen', default=None), now)}, "
        f"last {ago(_pick(d, 'last_seen', default=None), now)}",
        f"model:        {_model(d)}  slot {_pick(d, 'slot')}  state {_pick(d, 'state')}",
        f"tags:         {_tags(d)}",
    ]
    for key in ("capabilities", "runtime", "deployment"):
        if isinstance(d.get(key), Mapping) and d[key]:
            lines.append(f"{key + ':':<13} {json.dumps(d[key], sort_keys=True)}")
    history = items(d, "deployments")  # GET /devices/{id}/events, newest first
    if history:
        lines.append("deployments:")
        rows = [[ago(_pick(e, "started", default=None), now), _pick(e, "cmd_id"), _model(e), _pick(e, "outcome"),
                 _pick(e, "phase")] for e in history[:10]]  # fmt: skip
        lines += ["  " + line for line in table_lines(["started", "command", "model", "outcome", "last phase"], rows)]
    return lines


# ---- bundles and releases ----------------------------------------------------------------------
def bundle_lines(b: Mapping[str, Any]) -> list[str]:
    size = b.get("size", b.get("size_bytes"))
    size_text = f"{size / 1e6:.1f} MB" if isinstance(size, (int, float)) else "-"
    keys = b.get("keyids") or b.get("key_ids") or []
    label = f" ({b['label']})" if b.get("label") else ""
    return [
        f"bundle:     {_pick(b, 'name')} v{_pick(b, 'version')}{label}  {_pick(b, 'target')}/{_pick(b, 'precision')}",
        f"sha256:     {_pick(b, 'sha256')}",
        f"size:       {size_text}  signed by {', '.join(str(k)[:16] for k in keys) or '-'}",
        f"url:        {_pick(b, 'url')}",
    ]


def releases_table(data: Any, now: float | None = None) -> list[str]:
    """``GET /releases``: one row per (name, version); ``bundles`` is a count there, a list in a detail."""
    rows = []
    for r in items(data, "releases"):
        bundles = r.get("bundles")
        count = len(bundles) if isinstance(bundles, list) else _pick(r, "bundles", "bundle_count")
        targets = r.get("targets")
        if isinstance(bundles, list):
            shown = ", ".join(sorted({f"{_pick(b, 'target')}/{_pick(b, 'precision')}" for b in items(bundles)}))
        elif isinstance(targets, Mapping):
            shown = ", ".join(f"{t}/{p}" for t, ps in sorted(targets.items()) for p in ps)
        else:
            shown = "-"
        rows.append([_pick(r, "name"), _pick(r, "version"), count, _pick(r, "active"), shown or "-",
                     ago(_pick(r, "first_uploaded_at", default=None), now)])  # fmt: skip
    return table_lines(["name", "version", "bundles", "active", "targets", "uploaded"], rows)


# ---- rollouts ----------------------------------------------------------------------------------
def _release(r: Mapping[str, Any]) -> str:
    release = r.get("release")
    if isinstance(release, Mapping):
        return f"{_pick(release, 'name')}:{_pick(release, 'version')}"
    return "-:-" if release is None else str(release)


def rollouts_table(data: Any, now: float | None = None) -> list[str]:
    """``GET /rollouts``: one row per rollout, newest first."""
    rows = [
        [_pick(r, "id"), _release(r), _pick(r, "state"), _wave_text(r), _pick(r, "selector"),
         ago(_pick(r, "updated_at", "created_at", default=None), now)]
        for r in items(data, "rollouts")
    ]  # fmt: skip
    return table_lines(["id", "release", "state", "wave", "devices", "updated"], rows)


def _wave_text(r: Mapping[str, Any]) -> str:
    """``current/total``: the API's ``wave`` is 1-based and ``waves`` is how many the rollout has."""
    current, total = r.get("wave"), r.get("waves")
    if current is None:
        return "-"
    return f"{current}/{total if isinstance(total, int) else '?'}"


def _counts(w: Mapping[str, Any]) -> dict[str, int]:
    """A wave's devices by status (the API gives each status as a key of the wave)."""
    return {s: int(w[s]) for s in DEVICE_STATUSES if isinstance(w.get(s), int)}


def _gate_value(gate: Mapping[str, Any], value: Any) -> str:
    """A gate's number in the words of its spec: a percentage, a ratio to the previous version, ms or s."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    metric, text = gate.get("metric"), str(gate.get("gate", ""))
    if metric == "error_rate":
        return _pct(value)
    if metric == "p95_latency":
        return f"{value:.3g}x" if text.rstrip().endswith("x") else f"{value:.4g} ms"
    if metric == "silence":
        return f"{value:.0f} s"
    return _num(value)


def _gates(r: Mapping[str, Any]) -> list[list[str]]:
    """``[gate, value, threshold, verdict]`` per gate; a gate with no data (yet) holds and shows ``no data``."""
    rows = []
    for g in items(r, "gates"):
        ok, value = g.get("ok"), g.get("value")
        verdict = "BREACH" if ok is False else "no data" if value is None else "ok"
        rows.append([str(_pick(g, "gate")), _gate_value(g, value), _gate_value(g, g.get("threshold")), verdict])
    return rows


def _soak_left(r: Mapping[str, Any], now: float) -> float | None:
    since, spec = r.get("soak_since"), r.get("spec")
    soak = spec.get("soak_s") if isinstance(spec, Mapping) else None
    if r.get("state") != "running" or not isinstance(since, (int, float)) or not isinstance(soak, (int, float)):
        return None
    return max(0.0, since + soak - now)


def rollout_lines(r: Mapping[str, Any], now: float | None = None) -> list[str]:
    """The progress display of ``edgeship rollout status``: header, waves with device counts, gates."""
    now = time.time() if now is None else now
    lines = [f"rollout {_pick(r, 'id')}  {_release(r)}  state {_pick(r, 'state')}  wave {_wave_text(r)}  "
             f"devices {_pick(r, 'selector')}"]  # fmt: skip
    if r.get("paused_reason"):
        lines.append(f"reason: {r['paused_reason']}")
    waves = items(r, "waves_detail")
    if waves:
        rows: list[Sequence[Any]] = []
        for n, w in enumerate(waves, 1):
            c = _counts(w)
            rows.append([_pick(w, "wave", default=n), _pick(w, "text"), _pick(w, "devices"),
                         *(c.get(s, 0) for s in DEVICE_STATUSES)])  # fmt: skip
        lines += table_lines(["wave", "size", "devices", *DEVICE_STATUSES], rows)
    gates = _gates(r)
    if gates:
        lines += table_lines(["gate", "value", "threshold", "verdict"], gates)
    left = _soak_left(r, now)
    if left is not None:
        lines.append(f"soak: every gate has held for {max(0.0, now - r['soak_since']):.0f}s, {left:.0f}s to go")
    return lines


def rollout_summary(r: Mapping[str, Any]) -> str:
    """One line per change, for ``--follow`` when stdout is not a terminal (logs, CI)."""
    totals: dict[str, int] = {}
    for w in items(r, "waves_detail"):
        for status, n in _counts(w).items():
            totals[status] = totals.get(status, 0) + n
    counts = " ".join(f"{s}={n}" for s, n in totals.items() if n) or "-"
    breaches = [g[0] for g in _gates(r) if g[3] == "BREACH"]
    gates = f"breached: {', '.join(breaches)}" if breaches else "gates ok"
    return f"rollout {_pick(r, 'id')} {_pick(r, 'state')} wave {_wave_text(r)} {counts} {gates}"


def audit_table(data: Any, now: float | None = None) -> list[str]:
    """``GET /rollouts/{id}/audit``: every decision in order, with its reason (evidence: ``--json``)."""
    rows = [
        [_pick(e, "id"), time.strftime("%H:%M:%S", time.localtime(e["ts"])) if isinstance(e.get("ts"), (int, float))
         else "-", _pick(e, "action"), _pick(e, "device_id"), str(_pick(e, "reason", default=""))[:80] or "-"]
        for e in items(data, "audit")
    ]  # fmt: skip
    return table_lines(["#", "time", "action", "device", "reason"], rows)
