"""The dashboard in headless Chromium against a live fleet: ``edgeship fleet serve``, two ``edgeship-device run``
agents under load, Mosquitto, and a rollout of v2 that stays in its first wave's soak.

One fleet for the module (set up once, ~15 s): the agents serve v1 and get predicts from a ``Loader`` each,
the canary is deployed v2 by the rollout, so the fleet has telemetry of two versions. The browser is
Debian's ``chromium`` driven by Playwright (no browser download). Every page is checked for console errors;
the charts' data is read back from Plotly (``element.data``) and compared with what the API answers;
screenshots go to ``test-artifacts/dashboard/`` at the repository root.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from fleet_e2e_parts import (
    Broker,
    BrokerPool,
    FleetProcess,
    Loader,
    Owned,
    make_bundles,
    start_agents,
    wait_for,
    wait_registered,
)

from fleet.auth import create_token
from fleet.db import Database

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
CHROMIUM = os.environ.get("EDGESHIP_CHROMIUM", "/usr/bin/chromium")
IDS = ["dash-a", "dash-b"]
GATES = ["health_failures=0", "error_rate<=5%", "p95_latency<=100ms"]
# Chromium logs every non-2xx fetch as a console error; a read token's refused pause is one, and expected.
REFUSED = "the server responded with a status of 403"


@dataclass
class LiveFleet:
    url: str
    api: httpx.Client  # write token
    read_token: str
    write_token: str
    rollout_id: int
    canary: str


def _token(db_url: str, scope: str) -> str:
    db = Database(db_url)
    try:
        with db.session() as session:
            return create_token(session, f"dash-{scope}-{uuid.uuid4().hex[:6]}", scope)
    finally:
        db.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveFleet]:
    root = tmp_path_factory.mktemp("dashboard")
    owned = Owned()
    pool = BrokerPool(root)
    try:
        broker: Broker = pool.make()
        bundles = make_bundles(root)
        tag = f"dash-{uuid.uuid4().hex[:8]}"
        env = {"EDGESHIP_FLEET_SHARE_GROUP": tag, "EDGESHIP_FLEET_MQTT_CLIENT_ID": tag}
        fleet = owned.add(FleetProcess(root / "fleet", broker.port, bundles.public_key, env=env))
        fleet.start()
        db_url = f"sqlite:///{root / 'fleet' / 'fleet.db'}"
        write, read = _token(db_url, "write"), _token(db_url, "read")
        api = owned.add(fleet.client(write))
        agents, ports = start_agents(root, broker.port, bundles.public_key, bundles.v1, IDS, serve=True)
        for agent in agents:
            owned.add(agent)
        for device_id in IDS:
            owned.add(Loader(ports[device_id], rate_per_s=10).start())
        octets = {"Content-Type": "application/octet-stream"}
        upload = api.post("/bundles", content=bundles.v2.read_bytes(), headers=octets)
        assert upload.status_code == 201, upload.text
        wait_registered(api, IDS, 1)

        def served(version: int, devices: int) -> bool:
            models = api.get("/telemetry/models", params={"name": "linear", "version": version}).json()["models"]
            return bool(models) and models[0]["devices"] >= devices and models[0]["count"] > 0

        wait_for(lambda: served(1, 2), 60, "v1 telemetry with requests from both devices", interval_s=0.3)
        body = {"release": "linear:2", "devices": "id=" + ",".join(IDS), "waves": "1,100%", "soak": "30m",
                "gates": GATES, "rate_per_s": 100}  # fmt: skip
        created = api.post("/rollouts", json=body)
        assert created.status_code == 201, created.text
        rollout_id = int(created.json()["id"])
        wait_for(lambda: served(2, 1), 60, "v2 telemetry with requests from the canary", interval_s=0.3)
        (canary,) = [d for d in IDS if (api.get(f"/devices/{d}").json()["model"] or {}).get("version") == 2]
        yield LiveFleet(fleet.url, api, read, write, rollout_id, canary)
    finally:
        owned.close_all()
        pool.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: .ci/run must `apt-get install chromium` (or set EDGESHIP_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """A browser tab on the dashboard with its console errors and uncaught exceptions collected."""

    def __init__(self, browser: Any, live: LiveFleet, **context: Any) -> None:
        self.live = live
        self.context = browser.new_context(**context)
        self.tab = self.context.new_page()
        self.errors: list[str] = []
        self.tab.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.tab.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def open(self, token: str, hash_: str = "#/") -> None:
        self.tab.goto(f"{self.live.url}/dashboard/{hash_}")
        self.tab.fill("#token-input", token)
        self.tab.click("#token-form button[type=submit]")
        self.wait_ready()

    def go(self, hash_: str) -> None:
        self.tab.evaluate("h => { window.location.hash = h; }", hash_)
        self.wait_ready()

    def wait_ready(self, renders: int = 1) -> None:
        """Until the view drew from the API ``renders`` times since now."""
        start = self.tab.evaluate("window.dashboard.renders")
        self.wait(f"window.dashboard.ready && window.dashboard.renders >= {start + renders}")

    def wait(self, condition: str, timeout_ms: float = 15_000) -> None:
        """Until ``condition`` (JavaScript) holds; an arrow function, which the page's CSP lets Playwright run
        (a bare expression would be ``eval``-ed in the page, which the CSP forbids)."""
        self.tab.wait_for_function(f"() => {condition}", timeout=timeout_ms)

    def js(self, expression: str) -> Any:
        return self.tab.evaluate(expression)

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.tab.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    def unexpected_errors(self, *allowed: str) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in allowed)]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser: Any, live: LiveFleet) -> Iterator[Page]:
    tab = Page(browser, live, viewport={"width": 1280, "height": 900})
    try:
        yield tab
    finally:
        tab.close()


def _traces(page: Page, element_id: str) -> dict[str, dict[str, list[Any]]]:
    data: list[dict[str, Any]] = page.js(
        f"Array.from(document.getElementById('{element_id}').data || [], t => ({{name: t.name, x: Array.from(t.x), "
        "y: Array.from(t.y)}))"
    )
    return {t["name"]: {"x": t["x"], "y": t["y"]} for t in data}


def _expected_traces(series: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the charts must show for a /telemetry/series answer: every bucket that served requests."""
    latency: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    for m in series["models"]:
        label = f"{m['name']} v{m['version']}" if m["version"] != "" else m["name"]
        busy = [b for b in m["series"] if b["count"] > 0]
        x = [b["start"] * 1000 for b in busy]
        latency[f"{label} p50"] = {"x": x, "y": [b["p50_ms"] for b in busy]}
        latency[f"{label} p95"] = {"x": x, "y": [b["p95_ms"] for b in busy]}
        errors[label] = {"x": x, "y": [b["error_rate"] * 100 for b in busy]}
    return latency, errors


def _same(drawn: dict[str, dict[str, list[Any]]], expected: dict[str, dict[str, list[Any]]]) -> None:
    assert set(drawn) == set(expected), (set(drawn), set(expected))
    for name, trace in expected.items():
        assert drawn[name]["x"] == pytest.approx(trace["x"]), name
        assert drawn[name]["y"] == pytest.approx(trace["y"]), name


def test_the_page_and_its_library_are_served_without_a_token_and_root_redirects(live: LiveFleet) -> None:
    with httpx.Client(base_url=live.url, timeout=30) as client:
        root = client.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/dashboard/"
        page = client.get("/dashboard/")
        assert page.status_code == 200 and "static/plotly.min.js" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        plotly = client.get("/dashboard/static/plotly.min.js", headers={"Accept-Encoding": "gzip"})
        assert plotly.status_code == 200 and plotly.headers["content-encoding"] == "gzip"
        assert len(plotly.content) > 1_000_000 and b"plotly" in plotly.content[:2000].lower()  # httpx decoded it
        for name in ("nope.js", "index.html", "..%2Fapp.py"):
            assert client.get(f"/dashboard/static/{name}").status_code == 404, name
        assert client.get("/api/v1/devices").status_code == 401  # the data still needs a token


def test_the_overview_charts_the_ingested_telemetry_per_model_version(page: Page, live: LiveFleet) -> None:
    page.open(live.read_token)
    page.tab.select_option("#window-select", "300")
    page.wait_ready()
    assert page.js("document.querySelector('#card-devices .n').textContent") == "2"
    assert page.js("document.querySelector('#card-online .n').textContent") == "2"
    versions = page.js("document.querySelector('#card-versions').textContent")
    assert "linear v1: 1" in versions and "linear v2: 1" in versions, versions
    assert "onnxruntime: 2" in page.js("document.querySelector('#card-targets').textContent")
    assert page.js("Array.from(document.querySelectorAll('#devices tr[data-device]'), r => r.dataset.device)") == IDS
    assert page.js("document.querySelectorAll('#active-rollouts tr[data-rollout]').length") == 1

    series = page.js("window.dashboard.series.fleet")
    assert [(m["name"], m["version"]) for m in series["models"]] == [("linear", 1), ("linear", 2)]
    latency, errors = _expected_traces(series)
    _same(_traces(page, "fleet-latency"), latency)
    _same(_traces(page, "fleet-errors"), errors)
    assert all(len(t["x"]) >= 1 for t in latency.values()), latency
    # the page's numbers are the API's: the same window asked again (buckets that had closed by then)
    again = live.api.get(
        "/telemetry/series",
        params={"window_s": 300, "bucket_s": series["bucket_s"], "until": series["until"]},
    ).json()
    closed = series["until"] - 2  # a message received just before until may be stored a moment later
    for mine, theirs in zip(series["models"], again["models"], strict=True):
        done = [b for b in mine["series"] if b["start"] + series["bucket_s"] < closed]
        assert done == [b for b in theirs["series"] if b["start"] + series["bucket_s"] < closed]
        assert sum(b["count"] for b in mine["series"]) == mine["total"]["count"] > 0
    page.shot("overview.png")
    assert page.unexpected_errors() == []


def test_the_device_page_shows_status_capabilities_history_and_telemetry(page: Page, live: LiveFleet) -> None:
    page.open(live.read_token, f"#/devices/{live.canary}")
    status = page.js("document.getElementById('device-status').textContent")
    assert "linear v2" in status and "onnxruntime" in status, status
    assert page.js("document.querySelectorAll('#device-capabilities dt').length") >= 3
    history = page.js("document.getElementById('device-deployments').textContent")
    assert f"ro{live.rollout_id}-{live.canary}-deploy" in history and "active" in history, history
    telemetry = page.js("window.dashboard.series.device")
    latency, _errors = _expected_traces(telemetry)
    _same(_traces(page, "device-latency"), latency)
    assert sum(len(t["x"]) for t in latency.values()) >= 2
    page.shot("device.png")
    assert page.unexpected_errors() == []


def test_the_rollout_page_shows_gates_and_a_read_token_cannot_pause(page: Page, live: LiveFleet) -> None:
    page.open(live.read_token, f"#/rollouts/{live.rollout_id}")
    assert page.js("document.getElementById('rollout-state').dataset.state") == "running"
    gates = page.js("Array.from(document.querySelectorAll('#rollout-gates tr[data-gate]'), r => r.dataset.gate)")
    assert gates == GATES
    view = live.api.get(f"/rollouts/{live.rollout_id}").json()
    thresholds = page.js(
        "Array.from(document.querySelectorAll('#rollout-gates tr[data-gate]'), r => [r.cells[2].dataset.threshold, "
        "r.cells[2].textContent])"
    )
    assert [float(t[0]) for t in thresholds] == [g["threshold"] for g in view["gates"]]
    assert [t[1] for t in thresholds] == ["0", "5%", "100 ms"]
    assert "Create" in page.js("document.getElementById('rollout-audit').textContent")
    # the release's versions, with the error-rate gate drawn as a line at 5 %
    drawn = _traces(page, "rollout-latency")
    assert {"linear v1 p50", "linear v2 p50"} <= set(drawn), set(drawn)
    shapes = page.js("document.getElementById('rollout-errors').layout.shapes.map(s => s.y0)")
    assert shapes == [pytest.approx(5.0)]

    page.tab.click("#btn-pause")
    page.wait("document.getElementById('action-result').className === 'action-error'")
    refused = page.js("document.getElementById('action-result').textContent")
    assert "403" in refused and "read scope" in refused, refused
    time.sleep(0.5)
    assert live.api.get(f"/rollouts/{live.rollout_id}").json()["state"] == "running"
    page.shot("rollout-read-token.png")
    assert page.unexpected_errors(REFUSED) == []


def test_a_write_token_pauses_and_resumes_the_rollout(page: Page, live: LiveFleet) -> None:
    page.open(live.write_token, f"#/rollouts/{live.rollout_id}")
    assert page.js("document.getElementById('btn-resume').disabled") is True
    page.tab.click("#btn-pause")
    wait_for(lambda: live.api.get(f"/rollouts/{live.rollout_id}").json()["state"] == "paused", 10, "paused")
    page.wait("document.getElementById('rollout-state').dataset.state === 'paused'")
    page.wait_ready()  # the audit trail caught up
    assert "pause from the dashboard" in page.js("document.getElementById('rollout-audit').textContent")
    assert page.js("document.getElementById('btn-pause').disabled") is True
    page.shot("rollout-paused.png")

    page.tab.click("#btn-resume")
    wait_for(lambda: live.api.get(f"/rollouts/{live.rollout_id}").json()["state"] == "running", 10, "running")
    page.wait("document.getElementById('rollout-state').dataset.state === 'running'")
    page.wait_ready()
    page.shot("rollout.png")
    assert page.unexpected_errors() == []


def test_a_phone_sized_screen_has_no_horizontal_overflow(browser: Any, live: LiveFleet) -> None:
    phone = Page(browser, live, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                 has_touch=True)  # fmt: skip
    try:
        for hash_ in ("#/", f"#/rollouts/{live.rollout_id}", f"#/devices/{live.canary}"):
            if hash_ == "#/":
                phone.open(live.read_token)
            else:
                phone.go(hash_)
            width = phone.js("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            assert width[0] <= width[1], (hash_, width)
            assert phone.js("document.querySelector('.chart .main-svg') !== null"), hash_
        phone.go("#/")
        phone.shot("phone-overview.png")
        assert phone.unexpected_errors() == []
    finally:
        phone.close()
