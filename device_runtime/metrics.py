"""In-process metrics for the device: inference count, errors by kind, latency and queue histograms,
process RSS and CPU, device temperature, and the backend in use.

One ``Metrics`` is shared by a ``Model``, the serving endpoint and the MQTT agent. Recording is cheap
(a lock, two comparisons and a bisect into fixed buckets: about a microsecond) so it can run on every
call; reading (``snapshot``, ``prometheus``) does the arithmetic.

Two views of the same counters:

- ``snapshot(reset_window=...)``: the telemetry view, counted over a *window* that starts at creation
  or at the last ``snapshot(reset_window=True)`` (the agent resets it each time it publishes);
- ``prometheus()``: cumulative counters and histograms since creation, as Prometheus expects, never reset.

Quantiles come from the fixed-bucket histogram (ten buckets per decade, 10 us to 100 s), interpolated
inside a bucket and clamped to the window's smallest and largest value, so they are within a bucket's
width (about 25%) of the exact value. Nothing here imports more than the standard library.
"""

from __future__ import annotations

import bisect
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["LATENCY_BUCKETS", "Metrics"]

_MANTISSAS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
# Upper bounds in seconds, 10 us .. 100 s; values above the last fall in an overflow (+Inf) bucket.
LATENCY_BUCKETS: tuple[float, ...] = (*(float(f"{m}e{exp}") for exp in range(-5, 2) for m in _MANTISSAS), 100.0)
# The buckets exposed to Prometheus: the usual 1 / 2.5 / 5 per decade, a subset of LATENCY_BUCKETS.
_PROMETHEUS_BUCKETS: tuple[float, ...] = (
    *(float(f"{m}e{exp}") for exp in range(-5, 2) for m in (1.0, 2.5, 5.0)),
    100.0,
)
_QUANTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
_THERMAL_DIR = Path("/sys/class/thermal")


class _Histogram:
    """Counts per fixed bucket since creation, plus a window baseline to subtract. Not locked itself."""

    __slots__ = ("baseline", "counts", "high", "low", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is the overflow bucket
        self.sum = 0.0  # seconds, since creation
        self.baseline = list(self.counts)  # counts at the start of the window
        self.low = math.inf  # smallest and largest value in the window
        self.high = -math.inf

    def add(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value
        if value < self.low:
            self.low = value
        if value > self.high:
            self.high = value

    def reset_window(self) -> None:
        self.baseline = list(self.counts)
        self.low, self.high = math.inf, -math.inf

    def window_quantiles_ms(self) -> dict[str, float | None]:
        window = [now - then for now, then in zip(self.counts, self.baseline, strict=True)]
        total = sum(window)
        if total == 0:
            return {name: None for name, _ in _QUANTILES}
        return {name: round(self._quantile(window, total, q) * 1000.0, 4) for name, q in _QUANTILES}

    def _quantile(self, window: list[int], total: int, q: float) -> float:
        rank = q * total
        seen = 0
        for index, count in enumerate(window):
            if count and seen + count >= rank:
                lower = LATENCY_BUCKETS[index - 1] if index > 0 else 0.0
                upper = LATENCY_BUCKETS[index] if index < len(LATENCY_BUCKETS) else self.high
                value = lower + (upper - lower) * (rank - seen) / count
                return min(max(value, self.low), self.high)
            seen += count
        return self.high  # not reached: the loop always reaches ``rank``


class Metrics:
    """Thread-safe counters for one model or process.

    Args:
        clock: monotonic seconds, injectable for tests.
        thermal_dir: where the thermal zones live (``/sys/class/thermal``); tests point it elsewhere.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, thermal_dir: str | os.PathLike[str] = _THERMAL_DIR
    ) -> None:
        self._clock = clock
        self._thermal_dir = Path(thermal_dir)
        self._lock = threading.Lock()
        self._latency = _Histogram()
        self._queue = _Histogram()
        self._count = 0  # successful inferences since creation
        self._errors: dict[str, int] = {}
        self._truncated = 0  # texts cut to the bundle's max_length since creation
        self._window_count = 0  # ``_count`` at the start of the window
        self._window_errors: dict[str, int] = {}
        self._window_start = clock()
        self._window_cpu = _cpu_seconds()
        self._backend: dict[str, Any] = {}

    # ---- recording (hot path) ------------------------------------------------------------------
    def observe(self, latency_s: float, queue_s: float = 0.0) -> None:
        """Count one successful inference.

        Args:
            latency_s: seconds the inference took (checks, runtime call and conversion).
            queue_s: seconds the request waited before it ran (0 when it did not wait).
        """
        with self._lock:
            self._count += 1
            self._latency.add(latency_s)
            self._queue.add(queue_s)

    def error(self, kind: str) -> None:
        """Count one failed call; ``kind`` is a short label (``input``, ``backend``, ``closed``, ``http``...)."""
        with self._lock:
            self._errors[kind] = self._errors.get(kind, 0) + 1

    def truncated(self, n: int = 1) -> None:
        """Count ``n`` texts cut to the bundle's ``max_length`` (the model saw only their start)."""
        with self._lock:
            self._truncated += n

    def set_backend(self, info: Mapping[str, Any]) -> None:
        """Record the backend in use (``Model.backend_info``: ``backend``, ``providers``, threads...)."""
        with self._lock:
            self._backend = dict(info)

    # ---- reading -------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Successful inferences since creation."""
        return self._count

    @property
    def truncated_texts(self) -> int:
        """Texts cut to the bundle's ``max_length`` since creation."""
        return self._truncated

    @property
    def errors(self) -> dict[str, int]:
        """Failed calls by kind since creation."""
        with self._lock:
            return dict(self._errors)

    def snapshot(self, reset_window: bool = False) -> dict[str, Any]:
        """The window's numbers, JSON-ready (the MQTT telemetry payload's body).

        Args:
            reset_window: start a new window after reading this one.

        Returns:
            ``{"count", "errors": {kind: n}, "error_count", "latency_ms": {"p50", "p95", "p99"},
            "queue_ms": {...}, "rss_mb", "cpu_pct", "temperature_c", "window_s", "total": {"count",
            "error_count"}}`` plus ``"backend"``, ``"providers"`` and ``"backend_info"`` once
            ``set_backend`` was called. Counts and quantiles cover the window (quantiles are None
            when it saw no inference); ``total`` counts since creation; ``cpu_pct`` is this process's
            CPU time over the window's wall time (100 = one core busy); ``temperature_c`` is the
            hottest thermal zone, None when none is readable.
        """
        now = self._clock()
        cpu = _cpu_seconds()
        with self._lock:
            window_s = max(now - self._window_start, 0.0)
            errors = {
                kind: n - self._window_errors.get(kind, 0)
                for kind, n in self._errors.items()
                if n - self._window_errors.get(kind, 0)
            }
            result: dict[str, Any] = {
                "count": self._count - self._window_count,
                "errors": errors,
                "error_count": sum(errors.values()),
                "latency_ms": self._latency.window_quantiles_ms(),
                "queue_ms": self._queue.window_quantiles_ms(),
                "window_s": round(window_s, 3),
                "cpu_pct": round(100.0 * (cpu - self._window_cpu) / window_s, 2) if window_s > 0 else 0.0,
                "total": {"count": self._count, "error_count": sum(self._errors.values())},
            }
            if self._backend:
                result["backend"] = self._backend.get("backend")
                result["providers"] = list(self._backend.get("providers", []))
                result["backend_info"] = dict(self._backend)
            if reset_window:
                self._window_start, self._window_cpu = now, cpu
                self._window_count = self._count
                self._window_errors = dict(self._errors)
                self._latency.reset_window()
                self._queue.reset_window()
        rss = rss_bytes()
        result["rss_mb"] = round(rss / 2**20, 2) if rss is not None else None
        result["temperature_c"] = self.temperature_c()
        return result

    def temperature_c(self) -> float | None:
        """The hottest readable ``thermal_zone*/temp`` in degrees Celsius, or None."""
        readings = []
        try:
            zones = sorted(self._thermal_dir.glob("thermal_zone*/temp"))
        except OSError:
            return None
        for path in zones:
            try:
                readings.append(int(path.read_text().strip()) / 1000.0)  # millidegrees
            except (OSError, ValueError):
                continue
        return max(readings) if readings else None

    def prometheus(self) -> str:
        """Cumulative metrics in the Prometheus text exposition format 0.0.4."""
        with self._lock:
            count = self._count
            truncated = self._truncated
            errors = dict(self._errors)
            latency = (list(self._latency.counts), self._latency.sum)
            queue = (list(self._queue.counts), self._queue.sum)
            backend = dict(self._backend)
        lines = [
            "# HELP edgeship_inferences_total Successful inferences.",
            "# TYPE edgeship_inferences_total counter",
            f"edgeship_inferences_total {count}",
            "# HELP edgeship_errors_total Failed calls, by kind.",
            "# TYPE edgeship_errors_total counter",
        ]
        lines += [f'edgeship_errors_total{{kind="{_escape(kind)}"}} {n}' for kind, n in sorted(errors.items())]
        lines += [
            "# HELP edgeship_truncated_texts_total Texts cut to the bundle's max_length.",
            "# TYPE edgeship_truncated_texts_total counter",
            f"edgeship_truncated_texts_total {truncated}",
        ]
        lines += _histogram_lines("edgeship_inference_latency_seconds", "Inference latency.", *latency)
        lines += _histogram_lines("edgeship_queue_seconds", "Time a request waited before it ran.", *queue)
        rss = rss_bytes()
        if rss is not None:
            lines += [
                "# HELP edgeship_process_resident_memory_bytes Resident memory of this process.",
                "# TYPE edgeship_process_resident_memory_bytes gauge",
                f"edgeship_process_resident_memory_bytes {rss}",
            ]
        lines += [
            "# HELP edgeship_process_cpu_seconds_total User and system CPU time of this process.",
            "# TYPE edgeship_process_cpu_seconds_total counter",
            f"edgeship_process_cpu_seconds_total {_number(_cpu_seconds())}",
        ]
        temperature = self.temperature_c()
        if temperature is not None:
            lines += [
                "# HELP edgeship_device_temperature_celsius Hottest thermal zone of the device.",
                "# TYPE edgeship_device_temperature_celsius gauge",
                f"edgeship_device_temperature_celsius {_number(temperature)}",
            ]
        if backend:
            labels = {
                "backend": str(backend.get("backend", "")),
                "providers": ",".join(str(p) for p in backend.get("providers", [])),
                "runtime_version": str(backend.get("runtime_version", "")),
            }
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines += [
                "# HELP edgeship_backend_info The backend and execution providers in use.",
                "# TYPE edgeship_backend_info gauge",
                f"edgeship_backend_info{{{text}}} 1",
            ]
        return "\n".join(lines) + "\n"


def _histogram_lines(name: str, help_text: str, counts: list[int], total_s: float) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    cumulative = 0
    exposed = iter(_PROMETHEUS_BUCKETS)
    next_bound = next(exposed, None)
    for bound, n in zip(LATENCY_BUCKETS, counts, strict=False):
        cumulative += n
        if bound == next_bound:
            lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {cumulative}')
            next_bound = next(exposed, None)
    total = sum(counts)
    lines += [f'{name}_bucket{{le="+Inf"}} {total}', f"{name}_sum {_number(total_s)}", f"{name}_count {total}"]
    return lines


def _number(value: float) -> str:
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def rss_bytes() -> int | None:
    """This process's resident memory in bytes: ``/proc/self/statm``, else the peak from ``getrusage``."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource  # not on Windows

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError, ValueError):
        return None
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS says bytes, Linux kilobytes
