// Status page of the backup cluster: polls /api/status and redraws.
//
// Everything shown comes from the master's JSON (docs/JSON.md).  Text from
// the cluster (file and node names, messages) is only ever set with
// textContent, never parsed as HTML.  The token (protected mode) comes from
// the URL fragment (#token=...) or the form, and is kept for this tab only.
// ?refresh=SECONDS changes the poll interval (default 2).
"use strict";

const params = new URLSearchParams(location.search);
const REFRESH_MS = Math.max(200, 1000 * (parseFloat(params.get("refresh")) || 2));
const TOKEN_KEY = "backup-status-token";
let token = sessionStorage.getItem(TOKEN_KEY) || "";
let prefix = "";
let lastOk = 0;

(function takeTokenFromFragment() {
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (match) {
    token = decodeURIComponent(match[1]);
    sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", location.pathname + location.search);  // not left in the address bar
  }
})();

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "data") for (const [k, v] of Object.entries(value)) node.dataset[k] = v;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function duration(s) {
  if (s === null || s === undefined) return "unknown";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  const mm = String(m).padStart(h ? 2 : 1, "0"), ss = String(sec).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

function ago(s) {
  if (s === null || s === undefined) return "never";
  if (s < 60) return `${s.toFixed(1)} s ago`;
  return `${duration(s)} ago`;
}

function localTime(unix) {
  return new Date(unix * 1000).toLocaleString();
}

function bar(fraction, cls) {
  const fill = el("div", {class: "fill" + (cls ? " " + cls : "")});
  fill.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
  return el("div", {class: "bar"}, fill);
}

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

async function getJson(path) {
  const headers = token ? {"Authorization": "Bearer " + token} : {};
  const response = await fetch(path, {headers, cache: "no-store"});
  if (response.status === 401) {
    const error = new Error("token required");
    error.unauthorized = true;
    throw error;
  }
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

// --- drawing -------------------------------------------------------------------------------
function drawHealth(health) {
  const cls = {HEALTH_OK: "ok", HEALTH_WARN: "warn", HEALTH_ERR: "err"}[health.status] || "unknown";
  $("banner").className = "banner " + cls;
  $("health-status").textContent = health.status;
  $("health-line").textContent = health.checks.map((c) => `${c.code}: ${c.summary}`).join(" · ");
  $("checks-empty").hidden = health.checks.length > 0;
  $("checks").replaceChildren(...health.checks.map((c) => el("li",
    {class: c.severity === "HEALTH_ERR" ? "err" : "warn", data: {code: c.code}},
    el("span", {class: "code"}, c.code),
    el("span", {class: "badge " + (c.severity === "HEALTH_ERR" ? "err" : "warn")}, c.severity.slice(7)),
    " ", el("span", {class: "summary"}, c.summary),
    c.detail.length ? el("ul", {}, ...c.detail.map((line) => el("li", {}, line))) : null)));
}

function drawMasters(masters) {
  // A replicated group: every master as the serving one sees it; "contact": since it last heard from it.
  replaceRows($("masters").tBodies[0], masters.map((m) => el("tr", {},
    el("td", {}, m.address), el("td", {}, el("span", {class: "badge " + m.role}, m.role)),
    el("td", {}, el("span", {class: "badge " + m.state}, m.state)),
    el("td", {}, m.term === undefined ? "" : String(m.term)),
    el("td", {}, m.uptime_s !== undefined ? "up " + duration(m.uptime_s)
      : m.last_contact_s === undefined ? "" : "heard " + duration(m.last_contact_s) + " ago"))));
}

function drawNodes(nodes, totals) {
  replaceRows($("nodes").tBodies[0], nodes.map((n) => {
    // usable_bytes: used + free, less than capacity_bytes on a smaller disk.
    const used = n.used_bytes || 0, capacity = n.usable_bytes || n.capacity_bytes || 0;
    const share = capacity ? used / capacity : 0;
    const usage = el("div", {class: "usage"},
      bar(share, n.full || share >= 0.95 ? "err" : share >= 0.85 ? "warn" : ""),
      `${bytes(used)} / ${bytes(capacity)}` + (capacity ? ` (${Math.round(share * 100)}%)` : ""));
    return el("tr", {class: n.state, data: {node: n.id, state: n.state}},
      el("td", {}, el("code", {}, n.id)),
      el("td", {}, n.address),
      el("td", {}, el("span", {class: "badge state " + n.state}, n.state.toUpperCase()),
        n.full ? el("span", {class: "badge full"}, "FULL") : null),
      el("td", {}, ago(n.last_heard_s)),
      el("td", {}, usage),
      el("td", {class: "num"}, n.chunks),
      el("td", {class: "num"}, n.scrub_errors || 0));
  }));
  const alive = nodes.filter((n) => n.state === "alive").length;
  $("totals").textContent = `${alive} of ${nodes.length} node(s) alive · ${totals.files} file(s), ` +
    `${bytes(totals.file_bytes)} · ${bytes(totals.used_bytes)} stored in ${totals.chunks} chunk(s) · ` +
    `replication ${totals.replication}`;
}

function drawRefused(refused) {
  $("refused").replaceChildren(...refused.map((r) => el("li", {data: {node: r.id}},
    el("span", {class: "badge refused"}, "REFUSED"), " ", el("code", {}, r.id), ` at ${r.address}: ${r.reason}`)));
}

function drawRepair(repair, byCopies) {
  $("repair-summary").textContent = repair.summary;
  const fill = $("repair-bar");
  fill.style.width = `${Math.round(repair.progress * 100)}%`;
  fill.className = "fill" + (repair.degraded_chunks ? " warn" : "");
  const figures = [
    ["Chunks below replication", `${repair.degraded_chunks} (${bytes(repair.degraded_bytes)})`],
    ["Repair rate", repair.rate_chunks_per_s ? `${repair.rate_chunks_per_s.toFixed(0)} chunks/s` : "idle"],
    ["ETA", repair.degraded_chunks ? duration(repair.eta_s) : "—"],
    ["Re-replicated since start", `${repair.repaired_chunks} chunks, ${bytes(repair.repaired_bytes)}`],
    ["Chunks by live copies", Object.entries(byCopies).map(([k, v]) => `${k}: ${v}`).join(", ") || "—"],
    ["Safe mode", repair.safe_mode ? `on (${Math.round(repair.safe_mode_left_s)} s left)` : "off"],
  ];
  $("repair-figures").replaceChildren(...figures.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function drawDamaged(files, count) {
  $("damaged-empty").hidden = count > 0;
  const items = files.map((f) => el("li", {data: {reason: f.reason}},
    el("span", {class: "badge " + (f.reason === "lost" ? "err" : "warn")}, f.reason), " ", f.name));
  if (count > files.length) items.push(el("li", {class: "muted"}, `and ${count - files.length} more`));
  $("damaged").replaceChildren(...items);
}

function drawEvents(events) {
  $("events-empty").hidden = events.length > 0;
  $("events").replaceChildren(...events.map((e) => el("li", {class: e.severity, data: {kind: e.kind}},
    el("time", {datetime: e.time_iso}, localTime(e.time)), el("span", {class: e.severity}, e.message))));
}

function drawStatus(doc) {
  drawHealth(doc.health);
  drawMasters(doc.masters);
  drawNodes(doc.nodes, doc.totals);
  drawRefused(doc.refused || []);
  drawRepair(doc.repair, doc.chunks_by_copies);
  drawDamaged(doc.damaged_files, doc.damaged_file_count);
  drawEvents(doc.events);
}

// --- file browser --------------------------------------------------------------------------
function drawCrumbs() {
  const parts = prefix.split("/").filter((p) => p);
  const crumbs = [el("button", {type: "button", data: {prefix: ""}}, "(all files)")];
  let path = "";
  for (const part of parts) {
    path += part + "/";
    crumbs.push(el("span", {class: "sep"}, "/"), el("button", {type: "button", data: {prefix: path}}, part));
  }
  $("crumbs").replaceChildren(...crumbs);
}

async function loadFiles() {
  drawCrumbs();
  let doc;
  try {
    doc = await getJson("api/files?prefix=" + encodeURIComponent(prefix));
  } catch (error) {
    $("files-note").textContent = error.unauthorized ? "" : `cannot list files: ${error.message}`;
    return;
  }
  const rows = doc.directories.map((d) => el("tr", {class: "dir"},
    el("td", {}, el("button", {type: "button", data: {prefix: d.name}}, d.name.slice(prefix.length))),
    el("td", {class: "num"}, bytes(d.size)), el("td", {}, localTime(d.mtime)),
    el("td", {class: "muted"}, `${d.files} file(s)`)));
  for (const f of doc.files) {
    rows.push(el("tr", {class: "file"}, el("td", {}, f.name.slice(prefix.length)),
      el("td", {class: "num", title: `${f.size} bytes`}, bytes(f.size)), el("td", {}, localTime(f.mtime)),
      el("td", {title: `blob ${f.version}`}, `v${f.version_id}`,
        f.versions > 1 ? el("span", {class: "muted"}, ` (${f.versions} kept)`) : null)));
  }
  replaceRows($("files").tBodies[0], rows);
  $("files-note").textContent = rows.length === 0 ? "No files here." :
    doc.truncated ? "Only the first entries are shown; narrow the prefix." : "";
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-prefix]");
  if (!button) return;
  prefix = button.dataset.prefix;
  loadFiles();
});

// --- polling -------------------------------------------------------------------------------
async function refresh() {
  try {
    const doc = await getJson("api/status");
    lastOk = Date.now();
    $("token-box").hidden = true;
    drawStatus(doc);
    $("updated").textContent = "updated " + new Date(doc.time * 1000).toLocaleTimeString();
  } catch (error) {
    if (error.unauthorized) {
      $("token-box").hidden = false;
      $("health-status").textContent = "token required";
      $("banner").className = "banner unknown";
    } else {
      $("banner").className = "banner stale";
      $("updated").textContent = lastOk
        ? `cannot reach the master (last update ${Math.round((Date.now() - lastOk) / 1000)} s ago)`
        : "cannot reach the master";
    }
  }
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token-input").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  refresh().then(loadFiles);
});

function loop() {
  refresh().finally(() => setTimeout(loop, REFRESH_MS));
}

loop();
loadFiles();
