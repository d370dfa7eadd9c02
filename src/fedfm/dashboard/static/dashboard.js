// fedfm dashboard: polls api/state and redraws in place (no reload). Everything in the state comes from the run
// directory, and client ids and error strings from clients: it is shown with textContent and DOM nodes only, and
// strings handed to plotly (which reads a little HTML in its labels) are escaped first.
"use strict";

const POLL_MS = 1000;
const PLOT_CONFIG = { displaylogo: false, responsive: true };
const CURVES = {
  "chart-accuracy": [["eval_accuracy", "global (server's held-out set)"], ["fed_accuracy", "federated mean"],
                     ["client_acc_worst10", "worst 10% of clients"]],
  "chart-loss": [["eval_loss", "global (server's held-out set)"], ["fed_loss", "federated mean"],
                 ["train_loss", "train (clients' own)"]],
};

let lastBody = null;
let lastState = null;
let fetchedAt = 0;

function $(id) { return document.getElementById(id); }

function plotlyText(s) {  // plotly renders <b>, <a href>, &entities; in labels: show the characters as they are
  return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return i === 0 ? `${n.toFixed(0)} B` : `${n.toFixed(1)} ${units[i]}`;
}

function fmtNum(v, digits) {
  return v === null || v === undefined ? "–" : Number(v).toFixed(digits);
}

function fmtDuration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.max(0, Math.floor(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  const two = (x) => String(x).padStart(2, "0");
  return h ? `${h}:${two(m)}:${two(sec)}` : `${m}:${two(sec)}`;
}

function setList(ul, items, empty) {
  ul.replaceChildren();
  if (!items.length) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = empty;
    ul.append(li);
    return;
  }
  for (const item of items) {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = String(item.href).split("/").map(encodeURIComponent).join("/");  // relative: files/<folder>/<name>
    a.textContent = item.name;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    li.append(a, ` (${fmtBytes(item.bytes)})`);
    ul.append(li);
  }
}

function maxOf(values, start) {  // Math.max(...values) overflows the call stack on a long run
  return values.reduce((m, v) => (v > m ? v : m), start);
}

function roundAxis(state) {  // whole rounds only
  const last = maxOf(state.series.round, Math.max(1, state.rounds || 0));
  return { title: { text: "round" }, rangemode: "tozero", dtick: Math.max(1, Math.ceil(last / 10)) };
}

function layout(state, extra) {
  return Object.assign({
    margin: { l: 50, r: 10, t: 30, b: 40 }, legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom" },
    xaxis: roundAxis(state), hovermode: "x unified",
  }, extra || {});
}

function drawCurves(id, state) {
  const rounds = state.series.round;
  const traces = [];
  for (const [key, label] of CURVES[id]) {
    const ys = state.series[key] || [];
    const x = [], y = [];
    ys.forEach((v, i) => { if (v !== null) { x.push(rounds[i]); y.push(v); } });
    if (x.length) traces.push({ x, y, name: plotlyText(label), mode: "lines+markers", type: "scatter" });
  }
  Plotly.react($(id), traces, layout(state, id === "chart-accuracy" ? { yaxis: { range: [0, 1.02] } } : {}), PLOT_CONFIG);
}

function drawPrivacy(state) {
  const p = state.privacy, text = $("privacy-text"), chart = $("chart-privacy");
  if (!p.mode || p.mode === "none") {
    text.textContent = "no DP (privacy.mode none): this run gives no differential-privacy guarantee";
    chart.hidden = true;
    return;
  }
  const what = p.mode === "client" ? "client-level DP (one client's whole data)"
    : "sample-level DP (one example of a client; ε of the most exposed client)";
  const spent = p.epsilon === null ? "no round accounted yet" : `ε spent ${fmtNum(p.epsilon, 3)}`;
  const target = p.target_epsilon === null ? "no target ε set" : `target ε ${fmtNum(p.target_epsilon, 3)}`;
  text.textContent = `${what}: ${spent}, ${target}, at δ = ${p.delta === null ? "–" : p.delta}`;
  chart.hidden = false;
  const rounds = state.series.round, eps = state.series.epsilon;
  const x = [], y = [];
  eps.forEach((v, i) => { if (v !== null) { x.push(rounds[i]); y.push(v); } });
  const traces = [{ x, y, name: "ε spent", mode: "lines+markers", type: "scatter" }];
  if (p.target_epsilon !== null) {
    const end = maxOf(x, Math.max(1, state.rounds || 0));
    traces.push({ x: [0, end], y: [p.target_epsilon, p.target_epsilon], name: "target ε", mode: "lines",
                  line: { dash: "dash" }, type: "scatter" });
  }
  Plotly.react(chart, traces, layout(state, { yaxis: { title: { text: "ε" }, rangemode: "tozero" } }), PLOT_CONFIG);
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.append(td);
}

function drawClients(state) {
  const body = $("clients").tBodies[0];
  const rows = [];
  for (const c of state.clients) {
    const tr = document.createElement("tr");
    if (c.dropped) tr.className = "dropped";
    cell(tr, c.id);
    cell(tr, c.last_round === null ? "–" : String(c.last_round));
    cell(tr, c.examples === null ? "–" : String(c.examples));
    cell(tr, fmtBytes(c.bytes_up));
    cell(tr, fmtBytes(c.bytes_down));
    cell(tr, fmtNum(c.seconds, 2));
    cell(tr, fmtNum(c.accuracy, 3));
    cell(tr, String(c.dropped));
    cell(tr, c.last_error === null ? "" : c.last_error, "reason");
    cell(tr, fmtNum(c.epsilon, 3));
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  const more = state.clients_total - state.clients.length;
  $("clients-count").textContent = `(${state.clients_total} seen${more > 0 ? `; the first ${state.clients.length} shown` : ""})`;
}

function drawPartition(state) {
  const p = state.partition;
  if (!p) {
    $("partition-method").textContent = "(partition.json not written yet)";
    Plotly.react($("chart-partition"), [], layout(state, { xaxis: { title: { text: "client" } } }), PLOT_CONFIG);
    return;
  }
  $("partition-method").textContent = `(${p.method}, ${p.num_clients} clients)`;
  const names = p.clients.map((c) => plotlyText(c.name));
  const labels = p.label_names || [];
  const traces = labels.map((label, j) => ({
    type: "bar", name: plotlyText(label), x: names, y: p.clients.map((c) => (c.label_counts ? c.label_counts[j] : 0)),
  }));
  if (!labels.length) traces.push({ type: "bar", name: "examples", x: names, y: p.clients.map((c) => c.n_train) });
  Plotly.react($("chart-partition"), traces,
               layout(state, { barmode: "stack", hovermode: "closest", xaxis: { title: { text: "client" }, type: "category" },
                        yaxis: { title: { text: "training examples" } } }), PLOT_CONFIG);
}

function drawHeader(state) {
  $("name").textContent = state.name || "";
  $("run-dir").textContent = state.run_dir;
  document.title = `fedfm ${state.name || ""} – round ${state.round === null ? "–" : state.round}`;
  const status = $("status");
  status.textContent = state.status;
  status.className = `badge ${state.status}`;
  $("round").textContent = `round ${state.round === null ? "–" : state.round} of ${state.rounds === null ? "?" : state.rounds}`;
  $("waiting").hidden = state.status !== "waiting";
  const notes = $("notes");
  notes.replaceChildren(...state.notes.map((n) => { const li = document.createElement("li"); li.textContent = n; return li; }));
  setList($("links-report"), state.links.report, "not drawn yet");
  setList($("links-adapter"), state.links.adapter, "not written yet");
}

function tick() {  // the clocks move between polls while the run runs
  if (!lastState) return;
  const since = (Date.now() - fetchedAt) / 1000;
  const running = lastState.status === "running";
  $("elapsed").textContent = fmtDuration(lastState.elapsed_s === null ? null : lastState.elapsed_s + (running ? since : 0));
  $("updated").textContent = lastState.since_update_s === null ? "–" : `${fmtDuration(lastState.since_update_s + since)} ago`;
}

function render(state) {
  drawHeader(state);
  drawCurves("chart-accuracy", state);
  drawCurves("chart-loss", state);
  drawPrivacy(state);
  drawClients(state);
  drawPartition(state);
}

async function poll() {
  try {
    const response = await fetch("api/state", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const body = await response.text();
    const state = JSON.parse(body);
    lastState = state;
    fetchedAt = Date.now();
    $("offline").hidden = true;
    const shape = JSON.stringify([state.series, state.clients, state.partition, state.links, state.status, state.notes,
                                  state.privacy, state.rounds, state.name]);
    if (shape !== lastBody) {  // redraw only what changed since the last poll
      lastBody = shape;
      render(state);
    }
    tick();
  } catch (err) {
    $("offline").hidden = false;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setInterval(tick, 1000);
  poll();
});
