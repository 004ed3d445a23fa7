"""One report across every bundle a ``package`` call wrote: ``report.json`` and ``report.html``.

The HTML page works offline, also from ``file://``: a table and a Plotly chart of host latency (p50, batch
1) against accuracy (with labels) or mean cosine to the original (without), one point per bundle and one
for the original model, each named in the legend. Its library, ``plotly.min.js`` from the ``plotly``
package (the fleet dashboard's charts use the same), is written next to it; the numbers are inlined.
"""

from __future__ import annotations

import html
import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from packagers.options import PackageResult
from packagers.requests import is_generated
from sdk.fsutil import atomic_write_bytes

__all__ = ["PLOTLY_JS", "bundle_row", "plotly_js", "write_reports"]

PLOTLY_JS = "plotly.min.js"  # the chart library's file, written next to report.html


def _worst(validation: Mapping[str, Any], key: str) -> float | None:
    values = [m[key] for m in validation.get("metrics", {}).values() if isinstance(m.get(key), (int, float))]
    return min(values) if values else None


def _float_layer_count(result: PackageResult) -> int:
    """How many layers an int8 bundle kept in float (the manifest's ``runtime.quantization``)."""
    runtime = result.manifest.runtime if result.manifest is not None else None
    quantization = (runtime.quantization if runtime is not None else None) or {}
    return len(quantization.get("float_layers", []))


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
        "iou_mean": _worst(v, "iou_mean"),  # dense probability maps only
        "float_layers": _float_layer_count(result),
        "accuracy": accuracy.get("bundle"),
        "passed": bool(v.get("passed")),
        "accepted_drift": bool(v.get("accepted_drift")),
        "data": v.get("data"),
        "generated_data": is_generated(v.get("data")),
    }


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def plotly_js() -> Path | None:
    """Plotly's JavaScript as the installed ``plotly`` package ships it (found without importing it), or None."""
    spec = importlib.util.find_spec("plotly")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "package_data" / PLOTLY_JS
        if path.is_file():
            return path
    return None


def _script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element (no ``</script>`` can end it early)."""
    text = json.dumps(value, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# One trace per point, named in the legend (never as text beside the point, where close points' labels
# overlap); automargin keeps the axis numbers inside the figure whatever their width.
_DRAW = """
(function () {
  var el = document.getElementById("report-chart");
  var data = JSON.parse(document.getElementById("report-chart-data").textContent);
  if (!window.Plotly) {
    el.textContent = "The chart needs plotly.min.js next to this file.";
    return;
  }
  // the original is the red star; the bundles take these
  var symbols = ["circle", "square", "diamond", "triangle-up", "cross", "x", "triangle-down", "hexagon"];
  var colours = ["#2e6da4", "#1e7e34", "#8e44ad", "#d35400", "#16a085", "#7f8c8d", "#b9770e", "#2c3e50"];
  var traces = data.points.map(function (p, i) {
    return {
      type: "scatter", mode: "markers", name: p.label, x: [p.x], y: [p.y],
      marker: {size: p.original ? 14 : 11, symbol: p.original ? "star" : symbols[i % symbols.length],
               color: p.original ? "#c0392b" : colours[i % colours.length], line: {width: 1, color: "#fff"}},
      hovertemplate: p.label + "<br>%{x:.4g} ms<br>" + data.y_label + " %{y:.5g}<extra></extra>"
    };
  });
  var layout = {
    margin: {l: 16, r: 16, t: 16, b: 16},
    xaxis: {title: {text: data.x_label}, rangemode: "tozero", automargin: true, zeroline: true},
    yaxis: {title: {text: data.y_label}, automargin: true, tickformat: ".4~g"},
    legend: {orientation: "h", yanchor: "bottom", y: 1.02, x: 0},
    showlegend: true
  };
  Plotly.newPlot(el, traces, layout, {displaylogo: false, responsive: true});
})();
"""


def _chart(points: Sequence[tuple[str, float, float, bool]], y_label: str, *, with_library: bool) -> str:
    """A Plotly scatter of (label, latency ms, quality, is_original), drawn by ``plotly.min.js`` beside the page."""
    if not points:
        return "<p>No latency was measured on this host, so there is nothing to plot.</p>"
    if not with_library:
        return "<p>No chart: the plotly package is not installed (pip install 'edgeship[host]').</p>"
    data = {
        "x_label": "p50 latency, ms (batch 1, host CPU)",
        "y_label": y_label,
        "points": [{"label": label, "x": x, "y": y, "original": original} for label, x, y, original in points],
    }
    return (
        '<div id="report-chart" class="chart" role="img" aria-label="latency against '
        f'{html.escape(y_label)}"></div>\n'
        f'<script type="application/json" id="report-chart-data">{_script_json(data)}</script>\n'
        f'<script src="{PLOTLY_JS}"></script>\n<script>{_DRAW}</script>'
    )


def _html(doc: Mapping[str, Any], *, with_library: bool) -> str:
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
        status += " (on generated data)" if row.get("generated_data") else ""
        cells = [row["file"], row["target"], row["precision"], f"{row['size_bytes'] / 1024:.1f}", _fmt(row["p50_ms"]),
                 _fmt(row["p95_ms"]), _fmt(row["cosine_mean"], 6), _fmt(row["cosine_min"], 6),
                 _fmt(row["top1_agreement"]), _fmt(row["accuracy"]), status]  # fmt: skip
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    title = f"{doc['name']} v{doc['version']}: edgeship bundles"
    notes = ""
    if any(r.get("generated_data") for r in rows):
        notes += (f"<p><strong>Validated on generated data</strong> ({html.escape(str(rows[0].get('data')))}), "
                  "not yours: the numbers say the bundles match the model on made-up inputs. Pass --calibration "
                  "with real inputs.</p>")  # fmt: skip
    if doc.get("skipped"):
        notes += "<p>Skipped: " + html.escape(" | ".join(doc["skipped"])) + "</p>"
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
        ".chart{width:100%;max-width:760px;height:460px}.scroll{overflow-x:auto}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>"
        f"<p>Validated on {doc['samples']} samples against {html.escape(str(original.get('reference')))}; "
        "latency is the host CPU at batch 1.</p>" + notes +
        "<div class=\"scroll\"><table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
        + "\n".join(body) + "</tbody></table></div>\n<h2>Latency against " + html.escape(y_label) + "</h2>\n"
        + _chart(points, y_label, with_library=with_library) + "\n</body></html>\n"
    )  # fmt: skip


def write_reports(
    out_dir: Path, *, name: str, version: int, samples: int, results: Sequence[PackageResult],
    original: Mapping[str, Any], skipped: Sequence[str] = (),
) -> tuple[Path, Path]:  # fmt: skip
    """Write ``report.json`` and ``report.html`` into ``out_dir``, with ``plotly.min.js`` (the chart's library,
    from the ``plotly`` package) beside them; without that package the page has the table and no chart.

    Args:
        out_dir: where the bundles were written.
        name, version: the release.
        samples: validation samples.
        results: the bundles written.
        original: {"reference": str, "p50_ms", "p95_ms", "accuracy"} of the original model.
        skipped: (target, precision) pairs that no candidate could be built for, with the reasons.

    Returns:
        The paths of the JSON and HTML reports.
    """
    doc = {
        "name": name,
        "version": version,
        "samples": samples,
        "original": dict(original),
        "bundles": [bundle_row(r) for r in results],
        "skipped": list(skipped),
    }
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    atomic_write_bytes(json_path, json.dumps(doc, indent=2, sort_keys=True, allow_nan=False).encode("utf-8"))
    library = plotly_js()
    if library is not None:  # beside the page, so it works offline and from file://
        atomic_write_bytes(out_dir / PLOTLY_JS, library.read_bytes())
    atomic_write_bytes(html_path, _html(doc, with_library=library is not None).encode("utf-8"))
    return json_path, html_path
