"""``report.html`` opened from ``file://`` in headless Chromium (Debian's ``chromium``, driven by Playwright).

The crowded case that broke the hand-drawn chart: seven points close together (bundles of about the same
latency and accuracy) and long axis numbers. The page must draw every point from the data written into it,
with no console error and no network, name each point once in a legend whose entries do not overlap, and
keep every axis number inside the figure. The screenshot goes to ``test-artifacts/report/report.png``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from packagers.options import PackageResult
from packagers.report import PLOTLY_JS, write_reports

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("EDGESHIP_CHROMIUM", "/usr/bin/chromium")


def _result(folder: Path, target: str, precision: str, p50: float, accuracy: float) -> PackageResult:
    metrics = {"y": {"cosine_mean": 0.999912, "cosine_min": 0.9981, "top1_agreement": 0.995}}
    validation = {"passed": True, "accuracy": {"bundle": accuracy}, "metrics": metrics}
    return PackageResult(
        bundle_path=folder / f"digits-3-{target}-{precision}.edgebundle", manifest=None,  # type: ignore[arg-type]
        target=target, precision=precision, validation=validation, size_bytes=123_456,
        latency_ms={"p50": p50, "p95": p50 * 1.3, "runs": 200},
    )  # fmt: skip


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return (
        a["left"] < b["right"] - 1
        and b["left"] < a["right"] - 1
        and a["top"] < b["bottom"] - 1
        and (b["top"] < a["bottom"] - 1)
    )


def test_report_chart_draws_every_point_without_overlap_or_cut_off_numbers(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: .ci/run must `apt-get install chromium` (or set EDGESHIP_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    results = [
        _result(tmp_path, "onnxruntime", "fp32", 0.01234, 0.953333),
        _result(tmp_path, "onnxruntime", "fp16", 0.01251, 0.953331),
        _result(tmp_path, "onnxruntime", "int8-dynamic", 0.01198, 0.951111),
        _result(tmp_path, "openvino", "fp32", 0.01302, 0.953333),
        _result(tmp_path, "openvino", "int8", 0.01277, 0.948889),
        _result(tmp_path, "tflite", "fp32", 0.01311, 0.953332),
    ]
    original = {"reference": "torch 2.13.0", "p50_ms": 0.0352, "p95_ms": 0.041, "accuracy": 0.953333}
    _json_path, html_path = write_reports(tmp_path, name="digits", version=3, samples=450, results=results,
                                          original=original)  # fmt: skip
    assert (tmp_path / PLOTLY_JS).is_file()
    labels = ["original"] + [f"{r.target} {r.precision}" for r in results]

    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html_path.as_uri())
            page.wait_for_function("() => document.querySelector('#report-chart .main-svg') !== null")
            drawn: list[dict[str, Any]] = page.evaluate(
                "Array.from(document.getElementById('report-chart').data, t => ({name: t.name, x: t.x[0], y: t.y[0],"
                " mode: t.mode}))"
            )
            legend: list[dict[str, float]] = page.evaluate(
                "Array.from(document.querySelectorAll('#report-chart .legend .traces'), e => e.getBoundingClientRect())"
                ".map(r => ({left: r.left, right: r.right, top: r.top, bottom: r.bottom}))"
            )
            ticks: list[dict[str, float]] = page.evaluate(
                "Array.from(document.querySelectorAll('#report-chart .xtick text, #report-chart .ytick text'), e =>"
                " e.getBoundingClientRect()).map(r => ({left: r.left, right: r.right, top: r.top, bottom: r.bottom}))"
            )
            figure = page.evaluate(
                "(r => ({left: r.left, right: r.right, top: r.top, bottom: r.bottom}))"
                "(document.querySelector('#report-chart .main-svg').getBoundingClientRect())"
            )
            out = ROOT / "test-artifacts" / "report"
            out.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out / "report.png"), full_page=True)
            print(f"screenshot: {out / 'report.png'}")
        finally:
            browser.close()

    assert errors == []
    assert all(url.startswith("file://") for url in requests), requests  # offline: nothing but the folder
    data = json.loads((tmp_path / "report.json").read_text())
    expected = [(original["p50_ms"], original["accuracy"])] + [(b["p50_ms"], b["accuracy"]) for b in data["bundles"]]
    assert [d["name"] for d in drawn] == labels
    assert [(d["x"], d["y"]) for d in drawn] == expected  # JSON both ways: the very numbers
    assert all(d["mode"] == "markers" for d in drawn)  # named in the legend, no text beside the points
    assert len(legend) == len(labels)
    clashes = [(i, j) for i in range(len(legend)) for j in range(i) if _overlap(legend[i], legend[j])]
    assert clashes == [], clashes
    assert len(ticks) >= 4
    cut = [t for t in ticks if t["left"] < figure["left"] or t["right"] > figure["right"] or t["top"] < figure["top"]]
    assert cut == [], (cut, figure)
