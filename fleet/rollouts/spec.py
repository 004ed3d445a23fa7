"""A rollout request, parsed and checked once: release, selector, waves, soak, gates, rate and timeouts.

Everything a user types (``--waves 1,10%,50%,100% --soak 5m --gate error_rate<=1%``) becomes a frozen
``RolloutSpec`` here, or an ``InputError`` that names the valid choices; nothing downstream parses text
again. The spec is stored as JSON with the rollout (``to_json``/``from_json``), so a restarted server
drives the rollout by exactly the rules it was created with.

Waves are cumulative: ``1,10%,100%`` means "1 device, then up to 10% of the selected devices, then all".
They are resolved against the selected devices by ``wave_sizes`` when the rollout is created; a wave that
would add no device is refused there (with the sizes), never silently merged.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sdk.errors import InputError

__all__ = [
    "GATE_METRICS",
    "NO_FAILURES",
    "Gate",
    "RolloutSpec",
    "Wave",
    "parse_duration",
    "parse_gate",
    "parse_release",
    "parse_spec",
    "parse_waves",
]

# metric -> (operators it accepts, what its number means)
GATE_METRICS: Mapping[str, tuple[tuple[str, ...], str]] = {
    "health_failures": (("=", "<="), "the most failed deploys in the rollout so far (default =0), e.g. <=2"),
    "error_rate": (("<=", "<"), "the new version's error rate on the wave's devices, e.g. <=1% or <=0.01"),
    "p95_latency": (("<=", "<"), "p95 vs the previous version (<=1.2x) or absolute (<=50ms)"),
    "silence": (("=",), "how long an updated device may send nothing, e.g. =5m"),
}
_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_GATE_RE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|<|>|=)\s*(.*?)\s*")
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")
MAX_WAVES = 20
MAX_RATE_PER_S = 10_000.0  # deploy commands per second
MAX_BASELINE_S = 7 * 86400.0  # seconds: a longer baseline is stale data, and a slow query every wave


def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds from ``"30s"``, ``"5m"``, ``"1h"``, ``"250ms"``, ``"2d"`` or a bare number of seconds.

    Raises:
        InputError: anything else, or a negative value.
    """
    match = _DURATION_RE.fullmatch(str(text))
    if match is None:
        units = ", ".join(_UNITS_S)
        raise InputError(f"{what} {text!r} is not a duration: write a number with one of {units}, e.g. 5m")
    return float(match.group(1)) * _UNITS_S[match.group(2) or "s"]


def parse_release(text: str) -> tuple[str, int]:
    """``"NAME:VERSION"`` -> ``(name, version)``.

    Raises:
        InputError: no colon, an empty name, or a version that is not an integer >= 0.
    """
    name, sep, version = str(text).rpartition(":")
    if not sep or not name.strip() or not version.strip().isdigit():
        raise InputError(f"release {text!r} must be NAME:VERSION with an integer version, e.g. digits:5")
    return name.strip(), int(version)


@dataclass(frozen=True)
class Wave:
    """One cumulative wave: ``count`` devices in all, or ``percent`` of the selected devices in all."""

    text: str
    count: int | None = None
    percent: float | None = None

    def size(self, total: int) -> int:
        """Devices reached by the end of this wave, out of ``total`` selected (a percentage rounds up)."""
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return max(1, math.ceil(total * self.percent / 100.0 - 1e-9))


def parse_waves(text: str) -> tuple[Wave, ...]:
    """``"1,10%,50%,100%"`` -> waves; counts and percentages, cumulative and increasing, ending at 100%.

    Raises:
        InputError: an empty wave, a bad number, waves that do not increase, or a last wave below 100%.
    """
    items = [item.strip() for item in str(text).split(",")]
    if len(items) > MAX_WAVES:
        raise InputError(f"{len(items)} waves: at most {MAX_WAVES}")
    waves: list[Wave] = []
    for i, item in enumerate(items, 1):
        if not item:
            raise InputError(f"wave {i} of {text!r} is empty: write counts or percentages, e.g. 1,10%,50%,100%")
        if item.endswith("%") and _NUMBER_RE.fullmatch(item[:-1].strip()):
            percent = float(item[:-1])
            if not 0 < percent <= 100:
                raise InputError(f"wave {i} ({item}) must be a percentage above 0% and at most 100%")
            waves.append(Wave(item, percent=percent))
        elif item.isdigit() and int(item) > 0:
            waves.append(Wave(item, count=int(item)))
        else:
            raise InputError(f"wave {i} ({item!r}) must be a device count >= 1 or a percentage such as 10%")
    for previous, wave in itertools.pairwise(waves):
        same_kind = (previous.count is None) == (wave.count is None)
        if same_kind and (wave.count or wave.percent or 0) <= (previous.count or previous.percent or 0):
            raise InputError(f"waves are cumulative and must increase: {previous.text} then {wave.text}")
    if waves[-1].percent != 100.0 and waves[-1].count is None:
        raise InputError(f"the last wave must reach 100% of the selected devices, got {waves[-1].text}")
    return tuple(waves)


@dataclass(frozen=True)
class Gate:
    """A health gate. ``relative`` is true for ``p95_latency<=1.2x`` (a ratio to the previous version)."""

    metric: str
    op: str
    threshold: float
    text: str
    relative: bool = False

    def holds(self, value: float) -> bool:
        """Whether a measured ``value`` is within this gate (``=`` on counts and silences means "at most")."""
        return value < self.threshold if self.op == "<" else value <= self.threshold


# The gate of every rollout that names no health_failures gate of its own: without it, a wave whose devices
# all failed to deploy would soak and advance as if they had succeeded.
NO_FAILURES = Gate("health_failures", "=", 0.0, "health_failures=0")


def _gate_number(metric: str, raw: str, text: str) -> tuple[float, bool]:
    if metric == "silence":
        return parse_duration(raw, f"gate {text!r}"), False
    if metric == "health_failures":
        if not raw.isdigit():
            raise InputError(f"gate {text!r}: health_failures takes a whole number of deploys, e.g. health_failures=0")
        return float(raw), False
    if metric == "error_rate":
        number, percent = (raw[:-1].strip(), True) if raw.endswith("%") else (raw, False)
        if not _NUMBER_RE.fullmatch(number):
            raise InputError(f"gate {text!r}: error_rate takes a percentage (1%) or a fraction (0.01)")
        value = float(number) / 100.0 if percent else float(number)
        if value > 1:
            raise InputError(f"gate {text!r}: an error rate is at most 100% (1.0)")
        return value, False
    # p95_latency
    for suffix, relative, scale in (("x", True, 1.0), ("ms", False, 1.0), ("s", False, 1000.0)):
        number = raw[: -len(suffix)].strip() if raw.endswith(suffix) else ""
        if _NUMBER_RE.fullmatch(number):
            return float(number) * scale, relative
    raise InputError(f"gate {text!r}: p95_latency takes a ratio to the previous version (1.2x) or a time (50ms)")


def parse_gate(text: str) -> Gate:
    """``"error_rate<=1%"`` -> ``Gate``.

    Raises:
        InputError: an unknown metric, an operator the metric does not take, or a bad number; the message
            lists the valid choices.
    """
    match = _GATE_RE.fullmatch(str(text))
    if match is None:
        raise InputError(f"gate {text!r} must be METRIC<=VALUE or METRIC=VALUE; metrics: {', '.join(GATE_METRICS)}")
    metric, op, raw = match.groups()
    if metric not in GATE_METRICS:
        choices = "; ".join(f"{m} ({doc})" for m, (_ops, doc) in GATE_METRICS.items())
        raise InputError(f"gate {text!r}: unknown metric {metric!r}; known: {choices}")
    ops, doc = GATE_METRICS[metric]
    if op not in ops:
        raise InputError(f"gate {text!r}: {metric} takes {' or '.join(ops)} ({doc}), not {op}")
    threshold, relative = _gate_number(metric, raw, text)
    return Gate(metric, op, threshold, text.strip(), relative)


@dataclass(frozen=True)
class RolloutSpec:
    """A checked rollout request.

    Attributes:
        release_name, release_version: the release to roll out.
        selector: the devices, as the devices domain reads it (opaque here).
        waves: cumulative waves, the last at 100%.
        soak_s: seconds every gate must hold after a wave's last device is done, before the next wave.
        gates: the health gates. Without a ``health_failures`` gate the spec gets ``health_failures=0``
            (``NO_FAILURES``): a failed deploy never counts as success; ``health_failures<=N`` allows N.
        rate_per_s: deploy commands per second, resends included.
        wave_timeout_s: a device that is not ``active`` this long after its deploy was sent counts as failed.
        resend_s: a deploy or rollback with no event at all after this long is sent again, with the same id.
        baseline_s: the window before a wave starts whose telemetry is the previous version's baseline.
    """

    release_name: str
    release_version: int
    selector: str
    waves: tuple[Wave, ...]
    soak_s: float = 300.0
    gates: tuple[Gate, ...] = field(default_factory=tuple)
    rate_per_s: float = 10.0
    wave_timeout_s: float = 1800.0
    resend_s: float = 60.0
    baseline_s: float = 3600.0

    def __post_init__(self) -> None:
        if not any(g.metric == "health_failures" for g in self.gates):
            object.__setattr__(self, "gates", (NO_FAILURES, *self.gates))

    @property
    def release(self) -> str:
        return f"{self.release_name}:{self.release_version}"

    def wave_sizes(self, total: int) -> list[int]:
        """The cumulative number of devices at the end of each wave, for ``total`` selected devices.

        Raises:
            InputError: no device selected, a count above ``total``, the last wave short of all devices, or
                a wave that adds no device (its size is named, with the sizes of all waves).
        """
        if total <= 0:
            raise InputError(f"the selector {self.selector!r} matches no device")
        sizes = [wave.size(total) for wave in self.waves]
        for wave, size in zip(self.waves, sizes, strict=True):
            if size > total:
                raise InputError(f"wave {wave.text} asks for {size} devices; the selector matches {total}")
        if sizes[-1] != total:
            last = self.waves[-1].text
            raise InputError(f"the last wave ({last}) reaches {sizes[-1]} of {total} devices; end at 100%")
        for i in range(1, len(sizes)):
            if sizes[i] <= sizes[i - 1]:
                plan = ", ".join(f"{w.text}={s}" for w, s in zip(self.waves, sizes, strict=True))
                raise InputError(
                    f"wave {i + 1} ({self.waves[i].text}) adds no device: of {total} devices the waves reach {plan}; "
                    "use fewer waves"
                )
        return sizes

    def to_json(self) -> dict[str, Any]:
        """The stored form: the user's own words, parsed again by ``from_json``."""
        return {
            "release": self.release,
            "selector": self.selector,
            "waves": ",".join(w.text for w in self.waves),
            "soak_s": self.soak_s,
            "gates": [g.text for g in self.gates],
            "rate_per_s": self.rate_per_s,
            "wave_timeout_s": self.wave_timeout_s,
            "resend_s": self.resend_s,
            "baseline_s": self.baseline_s,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RolloutSpec:
        """The spec stored by ``to_json``.

        Raises:
            InputError: a stored spec that no longer parses.
        """
        name, version = parse_release(data["release"])
        return cls(
            name,
            version,
            str(data["selector"]),
            parse_waves(data["waves"]),
            float(data["soak_s"]),
            tuple(parse_gate(g) for g in data["gates"]),
            float(data["rate_per_s"]),
            float(data["wave_timeout_s"]),
            float(data["resend_s"]),
            float(data["baseline_s"]),
        )

    def gate(self, metric: str) -> tuple[Gate, ...]:
        """The gates on ``metric`` (p95_latency may have a relative and an absolute one)."""
        return tuple(g for g in self.gates if g.metric == metric)


def parse_spec(
    release: str,
    devices: str,
    waves: str,
    *,
    soak: str | float = "5m",
    gates: Sequence[str] = (),
    rate_per_s: float = 10.0,
    wave_timeout: str | float = "30m",
    resend: str | float = "60s",
    baseline: str | float = "1h",
) -> RolloutSpec:
    """Check a rollout request as the CLI and the API give it.

    Raises:
        InputError: the first thing wrong, with the valid choices.
    """
    name, version = parse_release(release)
    selector = str(devices).strip()
    if not selector:
        raise InputError("a device selector is required, e.g. tag=site=lab, group=canary, id=a,b or all")
    rate = float(rate_per_s)
    if not (math.isfinite(rate) and 0 < rate <= MAX_RATE_PER_S):
        raise InputError(f"rate_per_s must be above 0 and at most {MAX_RATE_PER_S:g} deploy commands per second")
    timeout = parse_duration(str(wave_timeout), "wave timeout")
    resend_s = parse_duration(str(resend), "resend")
    if timeout <= 0 or resend_s <= 0:
        raise InputError("the wave timeout and the resend delay must be above 0 s")
    baseline_s = parse_duration(str(baseline), "baseline")
    if not 0 < baseline_s <= MAX_BASELINE_S:
        raise InputError(f"the baseline must be above 0 s and at most {MAX_BASELINE_S / 86400:g}d, got {baseline}")
    parsed_gates = tuple(parse_gate(g) for g in gates)
    seen: set[tuple[str, bool]] = set()
    for gate in parsed_gates:
        key = (gate.metric, gate.relative)
        if key in seen:
            raise InputError(f"gate {gate.text!r}: {gate.metric} is gated twice")
        seen.add(key)
    return RolloutSpec(
        name, version, selector, parse_waves(waves), parse_duration(str(soak), "soak"), parsed_gates, rate, timeout,
        resend_s, baseline_s,
    )  # fmt: skip
