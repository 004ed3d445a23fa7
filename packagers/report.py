"""One report across every bundle a ``package`` call wrote: ``report.json`` and ``report.html``.

The HTML page is self-contained (no scripts, no network): a table and an SVG chart of host latency
(p50, batch 1) against accuracy (with labels) or mean cosine to the original (without), one point
per bundle and one for the original model.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from packagers.options import PackageResult
from sdk.fsutil import atomic_write_bytes

__all__ = ["bundle_row", "write_reports"]

_W, _H, _PAD = 640, 360, 56  # chart size and margin, pixels


def _worst(validation: Mapping[str, Any], key: str) -> float | None:
    values = [m[key] for m in validation.get("metrics", {}).values() if isinstance(m.get(key), (int, float))]
    return min(values) if values else None


def bundle_row(result: PackageResult) -> dict[str, Any]:
    """The report's numbers for one bundle (worst output where a model has several)."""
    v = result.validation
    accuracy = v.get("accuracy", {})
    return {
        "file": result.bundle_path.name,
        "target": result.target,
        "precision": result.precision,
        "size_bytes": result.size_bytes,
        "p50_ms": result.latency_ms.get("p50"),
        "p95_ms": result.latency_ms.get("p95"),
        "cosine_mean": _worst(v, "cosine_mean"),
        "cosine_min": _worst(v, "cosine_min"),
        "top1_agreement": _worst(v, "top1_agreement"),
        "accuracy": accuracy.get("bundle"),
        "passed": bool(v.get("passed")),
        "accepted_drift": bool(v.get("accepted_drift")),
    }


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _chart(points: Sequence[tuple[str, float, float, bool]], y_label: str) -> str:
    """An SVG scatter plot of (label, latency ms, quality, is_original)."""
    if not points:
        return "<p>No latency was measured on this host, so there is nothing to plot.</p>"
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x_max = max(xs) * 1.1 or 1.0
    y_lo, y_hi = min(ys), max(ys)
    if math.isclose(y_lo, y_hi):
        y_lo, y_hi = y_lo - 0.01, y_hi + 0.01
    span = y_hi - y_lo

    def sx(x: float) -> float:
        return _PAD + x / x_max * (_W - 2 * _PAD)

    def sy(y: float) -> float:
        return _H - _PAD - (y - y_lo) / span * (_H - 2 * _PAD)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img" '
        f'aria-label="latency against {html.escape(y_label)}">',
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#444"/>',
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="#444"/>',
        f'<text x="{_W / 2}" y="{_H - 12}" text-anchor="middle">p50 latency, ms (batch 1, host CPU)</text>',
        f'<text x="14" y="{_H / 2}" transform="rotate(-90 14 {_H / 2})" text-anchor="middle">'
        f"{html.escape(y_label)}</text>",
        f'<text x="{_PAD}" y="{_H - _PAD + 16}" text-anchor="middle">0</text>',
        f'<text x="{_W - _PAD}" y="{_H - _PAD + 16}" text-anchor="middle">{x_max:.3g}</text>',
        f'<text x="{_PAD - 6}" y="{sy(y_lo) + 4}" text-anchor="end">{y_lo:.4g}</text>',
        f'<text x="{_PAD - 6}" y="{sy(y_hi) + 4}" text-anchor="end">{y_hi:.4g}</text>',
    ]
    for label, x, y, original in points:
        colour = "#c0392b" if original else "#2e6da4"
        parts.append(f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{colour}"/>')
        parts.append(f'<text x="{sx(x) + 8:.1f}" y="{sy(y) - 6:.1f}" font-size="11">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _html(doc: Mapping[str, Any]) -> str:
    rows, original = doc["bundles"], doc["original"]
    with_accuracy = original.get("accuracy") is not None
    y_key, y_label = ("accuracy", "task accuracy") if with_accuracy else ("cosine_mean", "mean cosine to the original")
    points: list[tuple[str, float, float, bool]] = []
    if with_accuracy and original.get("p50_ms") is not None:
        points.append(("original", original["p50_ms"], original["accuracy"], True))
    if not with_accuracy and original.get("p50_ms") is not None:
        points.append(("original", original["p50_ms"], 1.0, True))
    for row in rows:
        if row["p50_ms"] is not None and row[y_key] is not None:
            points.append((f"{row['target']} {row['precision']}", row["p50_ms"], row[y_key], False))

    head = ["bundle", "target", "precision", "size KiB", "p50 ms", "p95 ms", "cosine mean", "cosine min",
            "top-1", "accuracy", "validation"]  # fmt: skip
    body = [
        "<tr><td>original ({})</td><td>-</td><td>-</td><td>-</td><td>{}</td><td>{}</td>"
        "<td>1</td><td>1</td><td>1</td><td>{}</td><td>reference</td></tr>".format(
            html.escape(str(original.get("reference"))), _fmt(original.get("p50_ms")),
            _fmt(original.get("p95_ms")), _fmt(original.get("accuracy")),
        )
    ]  # fmt: skip
    for row in rows:
        status = "passed" if row["passed"] else ("drift accepted" if row["accepted_drift"] else "failed")
        cells = [row["file"], row["target"], row["precision"], f"{row['size_bytes'] / 1024:.1f}", _fmt(row["p50_ms"]),
                 _fmt(row["p95_ms"]), _fmt(row["cosine_mean"], 6), _fmt(row["cosine_min"], 6),
                 _fmt(row["top1_agreement"]), _fmt(row["accuracy"]), status]  # fmt: skip
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    title = f"{doc['name']} v{doc['version']}: edgeship bundles"
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>"
        f"<p>Validated on {doc['samples']} samples against {html.escape(str(original.get('reference')))}; "
        "latency is the host CPU at batch 1.</p>"
        "<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
        + "\n".join(body) + "</tbody></table>\n<h2>Latency against " + html.escape(y_label) + "</h2>\n"
        + _chart(points, y_label) + "\n</body></html>\n"
    )  # fmt: skip


def write_reports(
    out_dir: Path, *, name: str, version: int, samples: int, results: Sequence[PackageResult],
    original: Mapping[str, Any],
) -> tuple[Path, Path]:  # fmt: skip
    """Write ``report.json`` and ``report.html`` into ``out_dir``.

    Args:
        out_dir: where the bundles were written.
        name, version: the release.
        samples: validation samples.
        results: the bundles written.
        original: {"reference": str, "p50_ms", "p95_ms", "accuracy"} of the original model.

    Returns:
        The paths of the JSON and HTML reports.
    """
    doc = {
        "name": name,
        "version": version,
        "samples": samples,
        "original": dict(original),
        "bundles": [bundle_row(r) for r in results],
    }
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    atomic_write_bytes(json_path, json.dumps(doc, indent=2, sort_keys=True, allow_nan=False).encode("utf-8"))
    atomic_write_bytes(html_path, _html(doc).encode("utf-8"))
    return json_path, html_path
