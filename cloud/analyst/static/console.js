// The slmops console: reads the cloud's JSON API (same origin, read-only) and renders it.
// Plain DOM, no library, nothing fetched from elsewhere. Plots are SVG the server renders.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => (token ? path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : path);

async function api(path) {
  const r = await fetch(withToken(path), { headers: token ? { Authorization: "Bearer " + token } : {} });
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (cls) td.className = cls;
  return td;
}

function fill(tableId, rows) {
  const body = document.querySelector("#" + tableId + " tbody");
  body.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    tr.append(...cells);
    return tr;
  }));
}

const short = (iso) => (iso ? iso.replace("T", " ").slice(0, 19) : null);

async function renderFleet() {
  const data = await api("/api/fleet");
  document.getElementById("status").textContent =
    (data.active ? "active instance " : "standby ") + data.holder + " · " + data.nodes.length + " nodes";
  fill("fleet", data.nodes.map((n) => [
    cell(n.fleet), cell(n.node), cell(n.online ? "online" : "offline", n.online ? "on" : "off"),
    cell(n.model ? n.model + " v" + n.version + " " + n.variant : null), cell(short(n.last_window_end)),
    cell(n.outbox_depth), cell(n.inferences), cell(n.missing_seqs),
    cell(n.loss_receipts.inferences + " / " + n.loss_receipts.aggregates), cell(n.skew, n.skew ? "skew" : ""),
  ]));
}

let groups = [];

async function renderGroups() {
  groups = (await api("/api/groups")).groups;
  const select = document.getElementById("group");
  const keep = select.value;
  select.replaceChildren(...groups.map((g) => {
    const o = document.createElement("option");
    o.value = g.group;
    o.textContent = g.group;
    return o;
  }));
  if (keep && groups.some((g) => g.group === keep)) select.value = keep;
  renderPlots();
}

function renderPlots() {
  const key = document.getElementById("group").value;
  const g = groups.find((x) => x.group === key);
  const plots = document.getElementById("plots");
  if (!g) { plots.replaceChildren(); return; }
  const ref = Object.values(g.references).find((r) => r.source.startsWith("baseline:"));
  document.getElementById("baseline").textContent = g.baseline
    ? g.baseline + (ref && ref.start ? " (" + short(ref.start) + " – " + short(ref.end) + ")" : "")
    : "baseline: not yet established";
  const signals = Object.keys(g.references).sort();
  plots.replaceChildren(...signals.map((s) => {
    const img = document.createElement("img");
    img.alt = s + " over time";
    img.dataset.signal = s;
    img.src = withToken("/api/plot.svg?group=" + encodeURIComponent(key) + "&signal=" + encodeURIComponent(s) + "&t=" + Date.now());
    return img;
  }));
}

async function renderEvents() {
  const events = (await api("/api/events")).events.slice().reverse();
  fill("events", events.map((e) => [
    cell(short(e.time)), cell(e.kind, e.kind), cell(e.state, e.state), cell(e.scope === "node" ? e.node : "fleet"),
    cell(e.signal), cell(e.reference), cell(e.summary), cell(e.id),
  ]));
}

async function renderRollouts() {
  const rollouts = (await api("/api/rollouts")).rollouts;
  fill("rollouts", rollouts.map((r) => [
    cell(r.id), cell(r.fleet), cell(r.model + " v" + (r.previous_version ?? "–") + " → v" + r.version),
    cell(r.status + " (" + r.phase + ")"),
    cell(r.stages.map((p, i) => (i < r.stage ? "✓" : i === r.stage && r.status === "running" ? "▶" : "·") + p + "%").join(" ")),
    cell(JSON.stringify(r.gates)),
  ]));
}

async function renderVersions() {
  const versions = (await api("/api/versions")).versions;
  fill("versions", versions.map((v) => [
    cell(v.name), cell(v.version), cell(v.variant), cell(v.parent_version),
    cell(v.accuracy === null ? null : v.accuracy.toFixed(3)), cell(v.notes),
  ]));
}

async function renderLineage() {
  const steps = (await api("/api/lineage")).lineage;
  const v = (n) => (n === null || n === undefined ? null : "v" + n);
  fill("lineage", steps.map((s) => [
    cell(s.model), cell(v(s.from_version)), cell(v(s.to_version)), cell(s.kind), cell(s.fleet),
    cell(s.event), cell(s.rollout), cell(s.outcome), cell(s.reason), cell(short(s.time)),
  ]));
}

async function refresh() {
  const parts = [renderFleet, renderGroups, renderEvents, renderRollouts, renderVersions, renderLineage];
  const results = await Promise.allSettled(parts.map((f) => f()));
  const failed = results.filter((r) => r.status === "rejected");
  if (failed.length) document.getElementById("status").textContent += " · " + failed.map((f) => f.reason.message).join("; ");
  document.body.dataset.loaded = "1";
}

document.getElementById("group").addEventListener("change", renderPlots);
refresh();
setInterval(refresh, 10000);
