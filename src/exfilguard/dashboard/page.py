"""The dashboard's one HTML page: inline CSS, inline JS and SVG charts; it loads nothing from elsewhere."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>exfilguard dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2430; background: #f6f7f9; }
  h1 { font-size: 1.4em; margin: 0 0 .2em; }
  h2 { font-size: 1.1em; margin: 0 0 .5em; }
  .muted { color: #667; }
  .grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 1em; margin-top: 1em; }
  .card { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: 1em; }
  table { border-collapse: collapse; width: 100%; }
  td { padding: .15em .4em; vertical-align: top; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  .bad { color: #b00020; font-weight: 600; }
  .good { color: #17702f; font-weight: 600; }
  .warn { color: #9a6700; font-weight: 600; }
  #banner { padding: .5em 1em; border-radius: 4px; margin-top: .5em; display: none; background: #fde7ea; color: #b00020; }
  svg { width: 100%; height: auto; max-height: 240px; background: #fbfcfd; border: 1px solid #eef0f3; }
  code { font-size: .9em; word-break: break-all; }
  .bar { height: 10px; background: #e8ebef; border-radius: 5px; overflow: hidden; margin: .4em 0; }
  .bar > div { height: 100%; background: #3d6fd8; }
</style>
</head>
<body>
<h1>exfilguard: egress budgets</h1>
<div class="muted">ledger <code id="ledger-url">…</code> · updated <span id="updated">never</span>
  · refreshes every <span id="refresh">…</span> s · read-only</div>
<div id="banner"></div>
<div class="grid" id="budgets"></div>
<div class="grid">
  <div class="card" id="bpt-card">
    <h2>Bits per token over time</h2>
    <div id="bpt-note" class="muted"></div>
    <svg id="bpt-chart" viewBox="0 0 600 180"></svg>
    <table><tr><td>latest interval</td><td class="num" id="bpt-latest">–</td></tr>
      <tr><td>since the meter and the outside started</td><td class="num" id="bpt-overall">–</td></tr>
      <tr><td>tokens counted</td><td class="num" id="bpt-tokens">–</td></tr>
      <tr><td>bytes from</td><td class="num" id="bpt-source">–</td></tr></table>
  </div>
  <div class="card" id="meter-card">
    <h2>Meter: denials and alerts</h2>
    <div id="meter-body" class="muted">no meter metrics URL given (--meter-metrics)</div>
  </div>
  <div class="card" id="verify-card">
    <h2>Ledger verification</h2>
    <div>status: <span id="verify-state">pending</span> <span class="muted" id="verify-when"></span></div>
    <div id="verify-detail"></div>
  </div>
  <div class="card" id="sth-card">
    <h2>Last signed tree head</h2>
    <div id="sth-body" class="muted">none yet</div>
  </div>
</div>
<script>
"use strict";
const REFRESH_MS = __REFRESH_MS__;
const API_URL = __API_URL__;
const $ = (id) => document.getElementById(id);
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) { if (k === "class") e.className = v; else e.setAttribute(k, v); }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}
function bytes(n) { return Math.round(n).toLocaleString("en-US") + " B"; }
function human(n) {
  const u = [["PB", 1e15], ["TB", 1e12], ["GB", 1e9], ["MB", 1e6], ["kB", 1e3]];
  for (const [s, f] of u) if (Math.abs(n) >= f) return (n / f).toPrecision(4) + " " + s;
  return Math.round(n) + " B";
}
function when(ts) { return ts == null ? "–" : new Date(ts * 1000).toISOString().replace(".000", ""); }
function rateText(r) { return r > 0 ? human(r) + "/s (" + human(r * 86400) + "/day)" : "0 B/s"; }

function chart(svg, series, opts) {
  // series: [{points: [[x, y], ...], color, dash}], drawn in one box with shared scales.
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = 600, H = 180, L = 58, B = 18, T = 8, R = 8;
  const pts = series.flatMap((s) => s.points);
  const NS = "http://www.w3.org/2000/svg";
  const txt = (x, y, s, anchor) => { const t = document.createElementNS(NS, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("font-size", "10"); t.setAttribute("fill", "#667");
    t.setAttribute("text-anchor", anchor || "start"); t.textContent = s; svg.append(t); };
  if (pts.length === 0) { txt(W / 2, H / 2, opts.empty || "no data yet", "middle"); return; }
  let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
  // The top of the axis is the highest point (the cap, when drawn): its label is a figure on the page.
  let y1 = opts.ymax || Math.max(...pts.map((p) => p[1])) || 1;
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), sy = (y) => H - B - y / y1 * (H - B - T);
  for (const s of series) {
    const p = document.createElementNS(NS, "polyline");
    p.setAttribute("fill", "none"); p.setAttribute("stroke", s.color); p.setAttribute("stroke-width", "1.5");
    if (s.dash) p.setAttribute("stroke-dasharray", "4 3");
    p.setAttribute("points", s.points.map((q) => sx(q[0]).toFixed(1) + "," + sy(q[1]).toFixed(1)).join(" "));
    if (s.name) p.setAttribute("data-series", s.name);
    svg.append(p);
  }
  txt(L - 4, T + 8, opts.fmt(y1), "end"); txt(L - 4, H - B, "0", "end");
  txt(L, H - 4, new Date(x0 * 1000).toISOString().slice(11, 19)); txt(W - R, H - 4, new Date(x1 * 1000).toISOString().slice(11, 19), "end");
}

function budgetCard(b, now) {
  const card = el("div", {class: "card budget", "data-budget": b.budget});
  card.append(el("h2", {}, "budget ", el("code", {}, b.budget)));
  const pct = b.cap_bytes > 0 ? Math.min(100, 100 * b.forwarded_bytes / b.cap_bytes) : 100;
  const bar = el("div", {class: "bar"}, el("div", {style: "width:" + pct.toFixed(2) + "%"}));
  card.append(bar);
  const t = el("table");
  const row = (label, field, text, hum) => t.append(el("tr", {},
    el("td", {}, label), el("td", {class: "num", "data-field": field}, text), el("td", {class: "num muted"}, hum || "")));
  row("cap", "cap_bytes", bytes(b.cap_bytes), human(b.cap_bytes));
  row("forwarded (settled)", "forwarded_bytes", bytes(b.forwarded_bytes), pct.toFixed(2) + "% of cap");
  row("reserved, not yet settled", "outstanding_bytes", bytes(b.outstanding_bytes), "part may have left already");
  row("left for new answers", "remaining_bytes", bytes(b.remaining_bytes), "cap - forwarded - reserved");
  row("burn rate (forwarded)", "burn_rate", rateText(b.burn_bytes_per_second), "over the last " + Math.round(b.burn_window_seconds) + " s");
  let ex = b.remaining_bytes <= 0 ? "exhausted" : (b.exhaustion_ts == null ? "never at this rate" : when(b.exhaustion_ts));
  const capped = b.window_ceiling_bytes_per_second != null && b.window_ceiling_bytes_per_second < b.burn_bytes_per_second;
  row("projected exhaustion", "exhaustion", ex, b.exhaustion_ts && b.remaining_bytes > 0 ?
      "in " + ((b.exhaustion_ts - now) / 86400).toPrecision(3) + " days" + (capped ? " (at the windows' limit)" : "") : "");
  for (const w of b.windows) row("window " + w.seconds + " s", "window_" + w.seconds, bytes(w.used_bytes) + " of " + bytes(w.limit_bytes), human(w.remaining_bytes) + " left");
  const den = Object.entries(b.ledger_denials).map(([k, v]) => k + ": " + v).join(", ") || "none";
  row("denials in the ledger", "ledger_denials", den, "");
  row("ledger entries", "tree_size", b.tree_size.toLocaleString("en-US"), "");
  card.append(t);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 600 180");
  svg.setAttribute("class", "used-chart");
  card.append(el("div", {class: "muted"}, "bytes forwarded over time (settled; red: cap)"), svg);
  const pts = (b.forwarded_series || []).concat([[now, b.forwarded_bytes]]);
  const x0 = b.created_ts != null ? Math.min(b.created_ts, pts[0][0]) : pts[0][0];
  chart(svg, [{points: [[x0, 0]].concat(pts), color: "#3d6fd8", name: "forwarded"},
              {points: [[x0, b.cap_bytes], [now, b.cap_bytes]], color: "#b00020", dash: true, name: "cap"}],
        {fmt: human, ymax: Math.max(b.cap_bytes, b.forwarded_bytes)});
  return card;
}

function render(s) {
  $("ledger-url").textContent = s.ledger || "";
  $("updated").textContent = when(s.now);
  $("refresh").textContent = s.refresh_seconds;
  const banner = $("banner");
  if (s.error) { banner.style.display = "block"; banner.textContent = "ledger unavailable: " + s.error + " (figures below are the last read)"; }
  else banner.style.display = "none";
  const box = $("budgets");
  box.replaceChildren(...(s.budgets || []).map((b) => budgetCard(b, s.now)));
  if (!s.budgets || s.budgets.length === 0) box.append(el("div", {class: "card muted"}, "no budgets in this ledger yet"));

  const bpt = s.bits_per_token || {series: []};
  $("bpt-note").textContent = bpt.error || "";
  $("bpt-latest").textContent = bpt.series.length ? bpt.series[bpt.series.length - 1][1].toFixed(3) + " bits/token" : "–";
  $("bpt-overall").textContent = bpt.since_start == null ? "–" : bpt.since_start.toFixed(3) + " bits/token";
  $("bpt-tokens").textContent = bpt.tokens_total == null ? "–" : Math.round(bpt.tokens_total).toLocaleString("en-US");
  $("bpt-source").textContent = bpt.source_bytes || "–";
  // Held flat to now: no answer since the last point means no new figure, not 0 bits per token.
  const bpts = bpt.series.length ? bpt.series.concat([[s.now, bpt.series[bpt.series.length - 1][1]]]) : [];
  chart($("bpt-chart"), [{points: bpts, color: "#6a3dd8", name: "bits-per-token"}],
        {fmt: (v) => v.toPrecision(3), empty: bpt.error ? "no token counter" : "waiting for traffic"});

  const mb = $("meter-body");
  const m = s.meter;
  if (!m) { mb.className = "muted"; mb.textContent = "no meter metrics URL given (--meter-metrics)"; }
  else if (m.error) { mb.className = "bad"; mb.textContent = "meter metrics unavailable: " + m.error; }
  else {
    mb.className = "";
    const t = el("table");
    t.append(el("tr", {}, el("td", {}, "state"), el("td", {class: "num " + (m.state === "ok" ? "good" : "bad"), "data-field": "meter_state"}, m.state || "unknown")));
    t.append(el("tr", {}, el("td", {}, "ledger writable"), el("td", {class: "num", "data-field": "meter_ledger_up"}, m.ledger_up == null ? "?" : (m.ledger_up ? "yes" : "NO"))));
    t.append(el("tr", {}, el("td", {}, "bytes forwarded"), el("td", {class: "num", "data-field": "meter_bytes_out"}, bytes(m.bytes_out))));
    const den = Object.entries(m.denials);
    const total = den.reduce((a, [, v]) => a + v, 0);
    t.append(el("tr", {}, el("td", {}, "denials"), el("td", {class: "num" + (total ? " warn" : ""), "data-field": "meter_denials"}, Math.round(total).toLocaleString("en-US"))));
    for (const [k, v] of den) t.append(el("tr", {}, el("td", {class: "muted"}, "  " + (k || "?")), el("td", {class: "num", "data-denial": k}, Math.round(v))));
    const alerts = m.alerts.filter((a) => a.value);
    t.append(el("tr", {}, el("td", {}, "alerts"), el("td", {class: "num" + (alerts.length ? " bad" : ""), "data-field": "meter_alerts"}, alerts.length ? String(alerts.length) : "none")));
    for (const a of alerts) t.append(el("tr", {}, el("td", {class: "muted"}, a.name + " " + JSON.stringify(a.labels)), el("td", {class: "num"}, a.value)));
    mb.replaceChildren(t);
  }

  const v = s.verify || {state: "pending"};
  const vs = $("verify-state");
  // Red only for findings: entries the meter has not signed yet are its normal state between heads.
  const colour = {"ok": "good", "pending": "muted", "not yet signed": "", "overdue": "warn", "signatures unchecked": "warn"};
  vs.textContent = v.state; vs.className = v.state in colour ? colour[v.state] : "bad";
  $("verify-when").textContent = v.checked_at ? "(checked " + when(v.checked_at) + ")" : "";
  const vd = $("verify-detail"); vd.replaceChildren();
  if (v.tree_size != null) vd.append(el("div", {}, v.tree_size.toLocaleString("en-US") + " entries, " + v.signed_heads + " signed heads verified, " + v.unsigned_tail + " entries after the last signed head"));
  if (v.freshness) vd.append(el("div", {class: v.freshness.overdue ? "warn" : "", "data-field": "freshness"}, v.freshness.text));
  for (const p of v.problems || []) vd.append(el("div", {class: "bad"}, "problem: " + p));
  for (const n of v.notes || []) vd.append(el("div", {class: "muted"}, "note: " + n));

  const h = s.tree_head, sb = $("sth-body");
  if (!h) { sb.className = "muted"; sb.textContent = "no signed tree head in the ledger"; }
  else {
    sb.className = "";
    sb.replaceChildren(el("table", {},
      el("tr", {}, el("td", {}, "tree size"), el("td", {class: "num", "data-field": "sth_size"}, h.tree_size.toLocaleString("en-US"))),
      el("tr", {}, el("td", {}, "signed at"), el("td", {class: "num", "data-field": "sth_ts"}, when(h.ts))),
      el("tr", {}, el("td", {}, "root"), el("td", {}, el("code", {"data-field": "sth_root"}, h.root))),
      el("tr", {}, el("td", {}, "key id"), el("td", {}, el("code", {"data-field": "sth_key"}, h.key_id))),
      el("tr", {}, el("td", {}, "signed heads stored"), el("td", {class: "num"}, h.count))));
  }
}

async function tick() {
  try {
    const r = await fetch(API_URL, {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
  } catch (e) {
    const banner = $("banner"); banner.style.display = "block"; banner.textContent = "dashboard unreachable: " + e.message;
  } finally {
    setTimeout(tick, REFRESH_MS);
  }
}
tick();
</script>
</body>
</html>
"""


def render_page(refresh_seconds: float, api_url: str = "/api/state") -> str:
    """The page with its refresh interval and the URL of its JSON filled in."""
    import json

    # json.dumps makes a JS string literal; "</" is escaped so it cannot close the script element.
    api = json.dumps(api_url).replace("</", "<\\/")
    return PAGE.replace("__REFRESH_MS__", str(max(250, int(refresh_seconds * 1000)))).replace("__API_URL__", api)
