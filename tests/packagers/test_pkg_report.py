"""The cross-bundle report a ``package`` call writes beside its bundles."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packager_checks import Digits

from packagers import package


def test_report_json_and_html_cover_every_bundle_and_the_original(
    mlp: torch.nn.Module, digits: Digits, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    results = package(
        mlp, name="digits", version=2, key=key, out_dir=tmp_path, precision=["fp32", "int8-dynamic"],
        example_inputs=(torch.from_numpy(digits.x_train[:1]),), calibration={"input": digits.x_val},
        labels=digits.y_val,
    )  # fmt: skip
    doc = json.loads((tmp_path / "report.json").read_text())
    assert (doc["name"], doc["version"], doc["samples"]) == ("digits", 2, len(digits.x_val))
    assert [b["file"] for b in doc["bundles"]] == [r.bundle_path.name for r in results]
    original = doc["original"]
    assert original["reference"].startswith("torch") and original["p50_ms"] > 0
    with torch.no_grad():
        expected = float((mlp(torch.from_numpy(digits.x_val)).argmax(1).numpy() == digits.y_val).mean())
    assert original["accuracy"] == pytest.approx(expected)
    for row, result in zip(doc["bundles"], results, strict=True):
        assert row["precision"] == result.precision and row["passed"] is True
        assert row["p50_ms"] == result.latency_ms["p50"] and row["size_bytes"] == result.size_bytes
        assert 0.99 <= row["cosine_mean"] <= 1.0 and row["accuracy"] == result.validation["accuracy"]["bundle"]

    page = (tmp_path / "report.html").read_text()
    chart = re.search(r'<script type="application/json" id="report-chart-data">(.*?)</script>', page, re.S)
    assert chart, "the report has no chart"
    points = json.loads(chart.group(1))["points"]
    assert [p["label"] for p in points] == ["original"] + [f"onnxruntime {r.precision}" for r in results]
    assert [p["x"] for p in points[1:]] == [r.latency_ms["p50"] for r in results]
    assert '<script src="plotly.min.js">' in page and (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
    for result in results:
        assert result.bundle_path.name in page
