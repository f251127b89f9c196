// The dashboard's only script (shipped in the package; docs/daemons.md, "Metrics and
// dashboard"). Reads /api/status (the document `fedcoe status --json` prints) and
// /api/refusals every 5 s and draws the tables and two inline SVG charts. Every value is
// written with textContent, never as HTML: refusal reasons and device ids come from
// devices, and must not be able to inject markup.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg"; // a namespace name, not a URL that is fetched
const REFRESH_MS = 5000;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function pct(v) { return v === null || v === undefined ? "-" : (100 * v).toFixed(1) + "%"; }

function bytes(n) {
  if (!n) return "0";
  const units = [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]];
  for (const [u, s] of units) if (n >= s) return (n / s).toFixed(1) + " " + u;
  return n + " B";
}

function fillTable(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  const fresh = document.createElement("tbody");
  for (const r of rows) fresh.appendChild(r);
  body.replaceWith(fresh);
}

function row(cells, cls) {
  const tr = document.createElement("tr");
  if (cls) tr.className = cls;
  for (const c of cells) {
    if (c instanceof Node) tr.appendChild(c); else tr.appendChild(el("td", c));
  }
  return tr;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

// A line chart of series {name: [[x, y], ...]} into <svg id=id> (viewBox 480x200).
function chart(id, series, yMax, yLabel) {
  const box = document.getElementById(id);
  while (box.firstChild) box.removeChild(box.firstChild);
  const W = 480, H = 200, L = 48, R = 10, T = 10, B = 24;
  const xs = [];
  for (const pts of Object.values(series)) for (const p of pts) xs.push(p[0]);
  if (!xs.length) {
    const t = svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle"});
    t.textContent = "no data yet";
    box.appendChild(t);
    return;
  }
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  const top = yMax > 0 ? yMax : 1;
  const px = (x) => L + (x1 === x0 ? (W - L - R) / 2 : (x - x0) / (x1 - x0) * (W - L - R));
  const py = (y) => H - B - y / top * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = top * i / 4;
    box.appendChild(svg("line", {x1: L, x2: W - R, y1: py(y), y2: py(y), class: "grid"}));
    const t = svg("text", {x: L - 4, y: py(y) + 3, "text-anchor": "end"});
    t.textContent = yLabel(y);
    box.appendChild(t);
  }
  box.appendChild(svg("line", {x1: L, x2: L, y1: T, y2: H - B, class: "axis"}));
  box.appendChild(svg("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}));
  for (const [x, anchor] of x0 === x1 ? [[x0, "middle"]] : [[x0, "start"], [x1, "end"]]) {
    const t = svg("text", {x: px(x), y: H - 8, "text-anchor": anchor});
    t.textContent = "round " + x;
    box.appendChild(t);
  }
  for (const [name, pts] of Object.entries(series)) {
    if (!pts.length) continue;
    box.appendChild(svg("polyline", {
      class: name, points: pts.map((p) => px(p[0]) + "," + py(p[1])).join(" ")}));
    for (const p of pts) box.appendChild(svg("circle", {class: name, cx: px(p[0]), cy: py(p[1]), r: 2.5}));
  }
}

function render(doc, refusals) {
  const fed = doc.federation ? "federation " + doc.federation : "fedcoe federation";
  document.getElementById("title").textContent = fed;
  const c = doc.coordinator;
  const who = c.running === true ? "coordinator running (pid " + c.pid + " on " + c.host + ")"
    : c.running === false ? "coordinator not running" : "coordinator on host " + c.host;
  let line = "round " + doc.round + (doc.rounds !== null ? " of " + doc.rounds : "") + ": " +
    doc.state + " · " + doc.devices_online + " of " + doc.devices.length + " devices online · " + who;
  if (doc.deadline) line += " · deadline " + doc.deadline;
  document.getElementById("summary").textContent = line;

  fillTable("rounds", doc.round_log.map((r) => {
    const tr = row([r.round, el("td", r.state, "text"), r.selected, r.accepted, r.failed, r.rejected,
      pct(r.global_acc), pct(r.personalized_acc), bytes(r.bytes_up), bytes(r.bytes_down),
      r.wall_s === null ? "-" : r.wall_s.toFixed(1), el("td", r.note, "text")],
      r.state === "open" ? "open" : "");
    tr.dataset.round = r.round;
    return tr;
  }));
  fillTable("devices", doc.devices.map((d) => {
    const tr = row([el("td", d.id, "text"), el("td", d.role, "text"),
      el("td", d.online ? "online" : "offline", d.online ? "online" : "offline"),
      el("td", d.last_seen || "-", "text"), d.last_round === null ? "-" : d.last_round,
      bytes(d.bytes_up), bytes(d.bytes_down),
      d.accuracy === null ? "-" : pct(d.accuracy) + " (" + d.accuracy_kind + ", r" + d.accuracy_round + ")"]);
    tr.dataset.device = d.id;
    return tr;
  }));
  fillTable("refusals", refusals.refusals.map((e) => row([
    el("td", e.time, "text"), e.round, el("td", e.device, "text"), el("td", e.kind, "text"),
    el("td", e.reason_class, "text"), e.count, el("td", e.reason, "reason")])));

  const acc = {global: [], personal: []};
  const traffic = {up: [], down: []};
  let most = 0;
  for (const r of doc.round_log) {
    if (r.global_acc !== null) acc.global.push([r.round, r.global_acc]);
    if (r.personalized_acc !== null) acc.personal.push([r.round, r.personalized_acc]);
    traffic.up.push([r.round, r.bytes_up]);
    traffic.down.push([r.round, r.bytes_down]);
    most = Math.max(most, r.bytes_up, r.bytes_down);
  }
  chart("acc-chart", acc, 1, (y) => Math.round(100 * y) + "%");
  chart("bytes-chart", traffic, most, bytes);
}

async function getJSON(path) {
  const r = await fetch(path, {cache: "no-store"});
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

async function refresh() {
  const err = document.getElementById("error");
  try {
    const [doc, refusals] = await Promise.all([getJSON("/api/status"), getJSON("/api/refusals")]);
    render(doc, refusals);
    err.hidden = true;
    document.body.dataset.loaded = "1";
  } catch (e) {
    err.textContent = "cannot read the coordinator's state: " + e.message;
    err.hidden = false;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
