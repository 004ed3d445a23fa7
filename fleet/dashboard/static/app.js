/* edgeship fleet dashboard.
 *
 * Reads the fleet's REST API (/api/v1) with the token the user entered (kept in localStorage), redraws the
 * current view every POLL_MS, and draws its charts with Plotly (served by the fleet server). Every text
 * that comes from the fleet (device ids, tags, reasons) goes into the page as text, never as HTML.
 * Views, chosen by the URL's hash: #/ (overview), #/devices/ID, #/rollouts, #/rollouts/ID.
 * window.dashboard holds what was last drawn, for the tests (tests/fleet/test_dashboard.py).
 */
"use strict";

const TOKEN_KEY = "edgeship.fleet.token";
const WINDOW_KEY = "edgeship.fleet.window_s";
const POLL_MS = 2000;
const API = new URL("../api/v1", window.location.href).pathname;
const WINDOWS = [[300, "5 min"], [900, "15 min"], [3600, "1 h"], [21600, "6 h"], [86400, "24 h"]];
const COLOURS = ["#2e6da4", "#c0392b", "#1e7e34", "#8e44ad", "#d35400", "#16a085", "#7f8c8d", "#b9770e"];

const dashboard = (window.dashboard = { view: null, series: {}, errors: [], renders: 0, ready: false });

class ApiError extends Error {
  constructor(status, kind, detail) {
    super(`${detail} (HTTP ${status} ${kind})`);
    this.status = status;
    this.kind = kind;
    this.detail = detail;
  }
}

/* -- small helpers ------------------------------------------------------------------------------ */

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function fill(id, ...children) {
  const el = document.getElementById(id);
  if (el) el.replaceChildren(...children.flat(Infinity));
}

function token() {
  return window.localStorage.getItem(TOKEN_KEY) || "";
}

function windowS() {
  const stored = Number(window.localStorage.getItem(WINDOW_KEY));
  return WINDOWS.some(([s]) => s === stored) ? stored : 900;
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", Authorization: `Bearer ${token()}` };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(API + path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
    cache: "no-store",
  });
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = null;
  }
  if (!response.ok) {
    const kind = (body && body.error) || "error";
    const detail = (body && body.detail) || response.statusText || "request failed";
    throw new ApiError(response.status, kind, typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return body;
}

function when(ts) {
  if (ts === null || ts === undefined) return "-";
  const d = new Date(ts * 1000);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

function ago(ts) {
  if (!ts) return "-";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function num(v, digits = 4) {
  if (v === null || v === undefined) return "-";
  if (typeof v !== "number") return String(v);
  return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(digits)));
}

/* A gate's value or threshold in the unit its text uses: 1.5% for error_rate, 120 ms, 1.2x, 300 s. */
function gateNumber(gate, v) {
  if (v === null || v === undefined) return "-";
  if (gate.metric === "error_rate") return `${num(v * 100)}%`;
  if (gate.metric === "p95_latency") return gate.gate.trim().endsWith("x") ? `${num(v)}x` : `${num(v)} ms`;
  if (gate.metric === "silence") return `${num(v)} s`;
  return num(v);
}

function pill(state) {
  return h("span", { class: `pill state-${state}` }, state);
}

function modelText(model) {
  return model ? `${model.name} v${model.version}` : "-";
}

function table(head, rows, empty = "none") {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h(
    "div",
    { class: "scroll" },
    h("table", {}, h("thead", {}, h("tr", {}, head.map((c) => h("th", {}, c)))), h("tbody", {}, rows)),
  );
}

function banner(message) {
  const el = document.getElementById("banner");
  el.hidden = !message;
  el.textContent = message || "";
}

/* -- charts ------------------------------------------------------------------------------------ */

const PLOT_CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"] };

function layout(yTitle, range, extra = {}) {
  return {
    margin: { l: 56, r: 12, t: 8, b: 40 },
    xaxis: { type: "date", automargin: true, range },
    yaxis: { title: { text: yTitle }, automargin: true, rangemode: "tozero", fixedrange: true },
    legend: { orientation: "h", y: -0.22 },
    hovermode: "x unified",
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)",
    ...extra,
  };
}

function draw(id, traces, yTitle, range, extra) {
  const el = document.getElementById(id);
  if (!el) return;
  if (!window.Plotly) {
    el.replaceChildren(h("p", { class: "muted" }, "The chart library did not load (plotly.min.js)."));
    return;
  }
  if (!traces.length) {
    window.Plotly.purge(el);
    el.replaceChildren(h("p", { class: "muted" }, "No telemetry with requests in this window."));
    el.dataset.empty = "1";
    return;
  }
  if (el.dataset.empty) {
    el.replaceChildren();
    delete el.dataset.empty;
  }
  window.Plotly.react(el, traces, layout(yTitle, range, extra), PLOT_CONFIG);
}

/* Buckets that served requests, as chart points: x in ms since the epoch, y from ``pick``. */
function points(buckets, pick) {
  const busy = buckets.filter((b) => b.count > 0 && pick(b) !== null && pick(b) !== undefined);
  return { x: busy.map((b) => b.start * 1000), y: busy.map(pick) };
}

function thresholdShapes(gates, metric) {
  return gates
    .filter((g) => g.metric === metric && !(metric === "p95_latency" && g.gate.trim().endsWith("x")))
    .map((g) => ({
      type: "line", xref: "paper", x0: 0, x1: 1, yref: "y",
      y0: metric === "error_rate" ? g.threshold * 100 : g.threshold,
      y1: metric === "error_rate" ? g.threshold * 100 : g.threshold,
      line: { color: "#c0392b", dash: "dot", width: 1.5 },
    }));
}

/* Latency p50 (solid) and p95 (dashed), and error rate, one colour per model version. */
function drawSeries(prefix, series, gates = []) {
  dashboard.series[prefix] = series;
  const latency = [];
  const errors = [];
  series.models.forEach((m, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const label = m.version === "" ? m.name : `${m.name} v${m.version}`;
    const p50 = points(m.series, (b) => b.p50_ms);
    const p95 = points(m.series, (b) => b.p95_ms);
    const rate = points(m.series, (b) => (b.error_rate === null ? null : b.error_rate * 100));
    const common = { type: "scatter", mode: "lines+markers", marker: { size: 5 }, legendgroup: label };
    latency.push({ ...common, ...p50, name: `${label} p50`, line: { color: colour } });
    latency.push({ ...common, ...p95, name: `${label} p95`, line: { color: colour, dash: "dash" } });
    errors.push({ ...common, ...rate, name: label, line: { color: colour } });
  });
  const some = (t) => t.x.length > 0;
  const range = [series.since * 1000, series.until * 1000]; // the whole window, however little data is in it
  draw(`${prefix}-latency`, latency.filter(some), "latency, ms", range, {
    shapes: thresholdShapes(gates, "p95_latency"),
  });
  draw(`${prefix}-errors`, errors.filter(some), "error rate, %", range, {
    shapes: thresholdShapes(gates, "error_rate"),
  });
}

function windowPicker() {
  const select = h(
    "select",
    { "aria-label": "time window", id: "window-select", onchange: (e) => {
      window.localStorage.setItem(WINDOW_KEY, e.target.value);
      refresh();
    } },
    WINDOWS.map(([s, label]) => h("option", { value: s, selected: s === windowS() }, `last ${label}`)),
  );
  return select;
}

function chartsSection(prefix, title) {
  return h(
    "section",
    {},
    h("div", { class: "row" }, h("h2", {}, title), windowPicker()),
    h("div", { class: "grid" },
      h("div", {}, h("h3", { class: "muted" }, "Latency p50 / p95 (ms)"), h("div", { class: "chart", id: `${prefix}-latency` })),
      h("div", {}, h("h3", { class: "muted" }, "Error rate (%)"), h("div", { class: "chart", id: `${prefix}-errors` }))),
  );
}

function seriesQuery(extra = "") {
  const w = windowS();
  return `/telemetry/series?window_s=${w}&bucket_s=${w / 60}${extra}`;
}

/* -- views ------------------------------------------------------------------------------------- */

const overview = {
  skeleton() {
    return [
      h("h1", {}, "Fleet overview"),
      h("div", { class: "cards", id: "summary" }),
      h("div", { style: "height:1rem" }),
      chartsSection("fleet", "Telemetry per model version"),
      h("section", {}, h("h2", {}, "Active rollouts"), h("div", { id: "active-rollouts" })),
      h("section", {}, h("h2", {}, "Devices"), h("div", { id: "devices" })),
    ];
  },
  async load() {
    const [devices, rollouts, series] = await Promise.all([
      api("/devices"), api("/rollouts"), api(seriesQuery()),
    ]);
    return { devices: devices.devices, rollouts, series };
  },
  update({ devices, rollouts, series }) {
    const count = (key) => {
      const tally = new Map();
      for (const d of devices) {
        const k = key(d);
        if (k) tally.set(k, (tally.get(k) || 0) + 1);
      }
      return [...tally.entries()].sort((a, b) => b[1] - a[1]);
    };
    const versions = count((d) => (d.model ? modelText(d.model) : null));
    const targets = count((d) => (d.model && d.model.target) || null);
    const card = (id, n, what, list) =>
      h("div", { class: "card", id }, h("div", { class: "n" }, n), h("div", { class: "what" }, what),
        list ? h("ul", {}, list.map(([k, v]) => h("li", {}, `${k}: ${v}`))) : null);
    fill("summary",
      card("card-devices", devices.length, "devices"),
      card("card-online", devices.filter((d) => d.online).length, "online"),
      card("card-versions", versions.length, "model versions in use", versions),
      card("card-targets", targets.length, "targets in use", targets));
    drawSeries("fleet", series);
    const active = rollouts.filter((r) => r.state === "running" || r.state === "paused");
    fill("active-rollouts", rolloutRows(active, "no rollout is running or paused"));
    fill("devices", table(
      ["device", "state", "model", "target", "slot", "tags", "last seen"],
      devices.map((d) => h("tr", { "data-device": d.device_id },
        h("td", {}, h("a", { href: `#/devices/${encodeURIComponent(d.device_id)}` }, d.device_id)),
        h("td", {}, pill(d.state)),
        h("td", {}, modelText(d.model)),
        h("td", {}, (d.model && d.model.target) || "-"),
        h("td", {}, d.slot || "-"),
        h("td", {}, Object.entries(d.tags).map(([k, v]) => `${k}=${v}`).join(", ") || "-"),
        h("td", { title: when(d.last_seen) }, ago(d.last_seen)))),
      "no device has reported yet",
    ));
  },
};

function rolloutRows(rollouts, empty) {
  return table(
    ["#", "release", "state", "wave", "devices", "updated", "reason"],
    rollouts.map((r) => h("tr", { "data-rollout": r.id },
      h("td", {}, h("a", { href: `#/rollouts/${r.id}` }, `#${r.id}`)),
      h("td", {}, r.release),
      h("td", {}, pill(r.state)),
      h("td", { class: "num" }, `${r.wave}/${r.waves}`),
      h("td", {}, r.selector),
      h("td", { title: when(r.updated_at) }, ago(r.updated_at)),
      h("td", {}, r.paused_reason || ""))),
    empty,
  );
}

const rolloutList = {
  skeleton() {
    return [h("h1", {}, "Rollouts"), h("section", {}, h("div", { id: "rollouts" }))];
  },
  async load() {
    return { rollouts: await api("/rollouts") };
  },
  update({ rollouts }) {
    fill("rollouts", rolloutRows(rollouts, "no rollout yet"));
  },
};

function deviceView(deviceId) {
  const id = encodeURIComponent(deviceId);
  return {
    skeleton() {
      return [
        h("h1", {}, "Device ", h("code", {}, deviceId)),
        h("div", { class: "grid" },
          h("section", {}, h("h2", {}, "Status"), h("div", { id: "device-status" })),
          h("section", {}, h("h2", {}, "Capabilities"), h("div", { id: "device-capabilities" }))),
        chartsSection("device", "Telemetry"),
        h("section", {}, h("h2", {}, "Deployment history"), h("div", { id: "device-deployments" })),
        h("section", {}, h("h2", {}, "Recent events"), h("div", { id: "device-events" })),
      ];
    },
    async load() {
      const w = windowS();
      const [device, events, telemetry] = await Promise.all([
        api(`/devices/${id}`), api(`/devices/${id}/events?limit=50`),
        api(`/devices/${id}/telemetry?window_s=${w}&bucket_s=${w / 60}`),
      ]);
      return { device, events, telemetry };
    },
    update({ device, events, telemetry }) {
      const kv = (pairs) => h("dl", { class: "kv" }, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
      fill("device-status", kv([
        ["state", pill(device.state)],
        ["model", modelText(device.model)],
        ["target", (device.model && device.model.target) || "-"],
        ["slot", device.slot || "-"],
        ["deployment", device.deployment ? JSON.stringify(device.deployment) : "-"],
        ["tags", Object.entries(device.tags).map(([k, v]) => `${k}=${v}`).join(", ") || "-"],
        ["last seen", `${ago(device.last_seen)} (${when(device.last_seen)})`],
        ["first seen", when(device.first_seen)],
        ["runtime", Object.entries(device.runtime).map(([k, v]) => `${k} ${v}`).join(", ") || "-"],
      ]));
      const caps = Object.entries(device.capabilities);
      fill("device-capabilities", caps.length
        ? kv(caps.map(([k, v]) => [k, typeof v === "string" ? v : JSON.stringify(v)]))
        : h("p", { class: "muted" }, "none reported"));
      // the device's own series, whatever model served each request (the overview splits by version)
      const name = "this device";
      drawSeries("device", {
        since: telemetry.since, until: telemetry.until, bucket_s: telemetry.bucket_s,
        models: [{ name, version: "", series: telemetry.series, total: telemetry.total }],
      });
      fill("device-deployments", table(
        ["started", "command", "model", "outcome", "phases"],
        events.deployments.map((d) => h("tr", {},
          h("td", {}, when(d.started)), h("td", {}, h("code", {}, d.cmd_id || "-")),
          h("td", {}, d.model ? modelText(d.model) : "-"), h("td", {}, pill(d.outcome)),
          h("td", {}, d.phases.join(" → ")))),
        "no deployment yet",
      ));
      fill("device-events", table(
        ["received", "phase", "command", "detail"],
        events.events.map((e) => h("tr", {},
          h("td", {}, when(e.received_at)), h("td", {}, e.phase), h("td", {}, h("code", {}, e.cmd_id || "-")),
          h("td", {}, h("code", {}, JSON.stringify(e.detail))))),
        "no event yet",
      ));
    },
  };
}

function rolloutView(rolloutId) {
  let auditAfter = 0;
  const auditRows = [];
  async function act(verb) {
    if (verb === "abort" && !window.confirm(`Abort rollout #${rolloutId}? Devices keep what they run now.`)) return;
    const out = document.getElementById("action-result");
    out.className = "muted";
    out.textContent = `${verb}…`;
    try {
      const view = await api(`/rollouts/${rolloutId}/${verb}`, { method: "POST", body: { reason: `${verb} from the dashboard` } });
      out.className = "ok";
      out.textContent = `${verb}: the rollout is ${view.state}`;
    } catch (e) {
      out.className = "action-error";
      out.textContent = `${verb} refused: ${e.message}`;
    }
    refresh();
  }
  return {
    skeleton() {
      return [
        h("h1", {}, `Rollout #${rolloutId}`),
        h("section", {},
          h("div", { id: "rollout-summary" }),
          h("div", { class: "actions" },
            h("button", { id: "btn-pause", type: "button", onclick: () => act("pause") }, "Pause"),
            h("button", { id: "btn-resume", type: "button", onclick: () => act("resume") }, "Resume"),
            h("button", { id: "btn-abort", type: "button", class: "danger", onclick: () => act("abort") }, "Abort")),
          h("div", { id: "action-result", role: "status" })),
        h("div", { class: "grid" },
          h("section", {}, h("h2", {}, "Gates"), h("div", { id: "rollout-gates" })),
          h("section", {}, h("h2", {}, "Waves"), h("div", { id: "rollout-waves" }))),
        chartsSection("rollout", "Telemetry of the release's model, per version"),
        h("section", {}, h("h2", {}, "Audit trail"), h("div", { id: "rollout-audit" })),
      ];
    },
    async load() {
      const view = await api(`/rollouts/${rolloutId}`);
      const name = view.release.split(":")[0];
      const [rows, series] = await Promise.all([
        api(`/rollouts/${rolloutId}/audit?after_id=${auditAfter}`),
        api(seriesQuery(`&name=${encodeURIComponent(name)}`)),
      ]);
      return { view, rows, series };
    },
    update({ view, rows, series }) {
      for (const r of rows) {
        auditRows.push(r);
        auditAfter = Math.max(auditAfter, r.id);
      }
      const active = view.state === "running" || view.state === "paused";
      document.getElementById("btn-pause").disabled = view.state !== "running";
      document.getElementById("btn-resume").disabled = view.state !== "paused";
      document.getElementById("btn-abort").disabled = !active;
      fill("rollout-summary", h("dl", { class: "kv" },
        h("dt", {}, "state"), h("dd", { id: "rollout-state", "data-state": view.state }, pill(view.state)),
        view.paused_reason ? [h("dt", {}, "reason"), h("dd", { class: "warn" }, view.paused_reason)] : null,
        h("dt", {}, "release"), h("dd", {}, view.release),
        h("dt", {}, "devices"), h("dd", {}, view.selector),
        h("dt", {}, "wave"), h("dd", {}, `${view.wave} of ${view.waves}`),
        h("dt", {}, "soak"), h("dd", {}, `${num(view.spec.soak_s)} s`),
        h("dt", {}, "updated"), h("dd", {}, `${ago(view.updated_at)} (${when(view.updated_at)})`)));
      fill("rollout-gates", table(
        ["gate", "value", "threshold", ""],
        view.gates.map((g) => h("tr", { class: g.ok === false ? "breach" : "", "data-gate": g.gate },
          h("td", {}, h("code", {}, g.gate)),
          h("td", { class: "num", "data-value": g.value ?? "" }, gateNumber(g, g.value)),
          h("td", { class: "num", "data-threshold": g.threshold }, gateNumber(g, g.threshold)),
          h("td", {}, g.ok === null || g.ok === undefined ? h("span", { class: "muted" }, "no data yet")
            : g.ok ? h("span", { class: "ok" }, "within") : h("span", { class: "bad" }, "BREACH")))),
        "no gates",
      ));
      const statuses = Object.keys(view.waves_detail[0] || {}).filter((k) => !["wave", "text", "devices"].includes(k));
      fill("rollout-waves", table(
        ["wave", "size", "devices", ...statuses],
        view.waves_detail.map((w) => h("tr", { class: w.wave === view.wave && active ? "current" : "" },
          h("td", {}, w.wave === view.wave && active ? `▶ ${w.wave}` : String(w.wave)), h("td", {}, w.text),
          h("td", { class: "num" }, w.devices), statuses.map((s) => h("td", { class: "num" }, w[s] || 0)))),
      ));
      drawSeries("rollout", series, view.gates);
      fill("rollout-audit", table(
        ["time", "action", "device", "reason", "holder"],
        auditRows.slice().reverse().slice(0, 200).map((r) => h("tr", { "data-action": r.action },
          h("td", {}, when(r.ts)), h("td", {}, r.action), h("td", {}, r.device_id || ""),
          h("td", {}, r.reason || ""), h("td", { class: "muted" }, r.holder || ""))),
        "no decision yet",
      ));
    },
  };
}

/* -- routing, polling, token ------------------------------------------------------------------- */

function route() {
  const parts = window.location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "devices" && parts[1]) return deviceView(parts[1]);
  if (parts[0] === "rollouts" && parts[1] && /^\d+$/.test(parts[1])) return rolloutView(Number(parts[1]));
  if (parts[0] === "rollouts") return rolloutList;
  return overview;
}

let current = null;
let busy = false;
let timer = null;

function show() {
  current = route();
  dashboard.view = window.location.hash || "#/";
  dashboard.ready = false;
  dashboard.series = {};
  if (!token()) {
    fill("main", h("p", {}, "Enter an API token above (read scope to look; write scope to pause, resume or abort)."));
    document.getElementById("token-input").focus();
    return;
  }
  fill("main", current.skeleton());
  refresh();
}

async function refresh() {
  if (busy || !current || !token()) return;
  busy = true;
  const view = current;
  try {
    const data = await view.load();
    if (view !== current) return; // the user moved on meanwhile
    view.update(data);
    banner("");
    dashboard.renders += 1;
    dashboard.ready = true;
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    dashboard.errors.push(String(e.message || e));
    const hint = e.status === 401 ? " Enter a valid token above." : "";
    banner(`${e.message || e}${hint}`);
  } finally {
    busy = false;
  }
}

function start() {
  const form = document.getElementById("token-form");
  const input = document.getElementById("token-input");
  input.value = token();
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    window.localStorage.setItem(TOKEN_KEY, input.value.trim());
    banner("");
    show();
  });
  document.getElementById("token-forget").addEventListener("click", () => {
    window.localStorage.removeItem(TOKEN_KEY);
    input.value = "";
    show();
  });
  window.addEventListener("hashchange", show);
  timer = window.setInterval(() => {
    if (!document.hidden) refresh();
  }, POLL_MS);
  dashboard.timer = timer;
  show();
}

start();
