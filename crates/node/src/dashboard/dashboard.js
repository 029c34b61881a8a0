// MendFS dashboard: polls the node's /api once a second and draws what it answers. Every
// value is put into the page as text (never as HTML). When the node the page came from stops
// answering, the page asks the other nodes whose HTTP addresses the last status named.
"use strict";

const POLL_MS = 1000;
const REQUESTS_POLL_MS = 5000;
const FETCH_TIMEOUT_MS = 4500;
const PHI_HISTORY = 30;
const TOKEN_KEY = "mendfs-dashboard-token";

// A login link carries a one-time code in the fragment (never sent to a server, nor logged):
// the page takes it out of the address bar and history at once and trades it, once, for a
// session token kept in this tab's sessionStorage; the link is worth nothing afterwards. A
// fragment may also carry a token itself (`#token=`), kept the same way.
// (A link opened in a tab already showing the page changes only the fragment: hashchange.)
let loggingIn = null;
function takeCredentialFromFragment() {
  const match = /(?:^#|&)(token|login)=([^&]+)/.exec(location.hash);
  if (!match) return false;
  let value = match[2];
  try { value = decodeURIComponent(value); } catch (_) { /* a mangled link: try it as it is */ }
  history.replaceState(null, "", location.pathname + location.search);
  if (match[1] === "token") {
    sessionStorage.setItem(TOKEN_KEY, value);
    return true;
  }
  loggingIn = redeemLogin(value);
  return true;
}

async function redeemLogin(code) {
  try {
    const response = await fetch(location.origin + "/api/login", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ code }), cache: "no-store",
    });
    let body = null;
    try { body = await response.json(); } catch (_) { /* reported below */ }
    if (!response.ok) throw new ApiError(response.status, (body && body.error) || "HTTP " + response.status);
    sessionStorage.setItem(TOKEN_KEY, body.token);
    $("session").textContent = "signed in (" + body.role + ") until " + new Date(body.expires_unix_ms).toLocaleString();
  } catch (error) {
    showLogin("The login link did not work: " + error.message);
    $("login").dataset.loginFailed = "true";
  } finally {
    loggingIn = null;
  }
}
takeCredentialFromFragment();
window.addEventListener("hashchange", () => { if (takeCredentialFromFragment()) poll(); });

const home = location.origin;
let current = home; // the node the page reads from now
let known = []; // every node's base URL, from the last status
let nodeNames = new Map(); // base URL -> node id
const phiHistory = new Map(); // node id -> recent phi values
let lastStatus = null;

const $ = (id) => document.getElementById(id);

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function micros(us) {
  if (us < 1000) return us + "µs";
  if (us < 999950) return (us / 1000).toFixed(1) + "ms";
  return (us / 1e6).toFixed(2) + "s";
}

function clock(ms) {
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function fetchJson(base, path) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
  try {
    const response = await fetch(base + path, { headers, signal: controller.signal, cache: "no-store" });
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON: reported below */ }
    if (!response.ok) {
      throw new ApiError(response.status, (body && body.error) || "HTTP " + response.status);
    }
    return body;
  } finally {
    clearTimeout(timer);
  }
}

// Asks the current node, then the others; an answer (even an error the node gives) ends the
// search, a node that does not answer at all moves it on.
async function api(path) {
  const order = [current, ...known.filter((base) => base !== current)];
  if (!order.includes(home)) order.push(home);
  let lastError = null;
  for (const base of order) {
    try {
      const body = await fetchJson(base, path);
      if (base !== current) current = base;
      showConnection(null);
      return body;
    } catch (error) {
      if (error instanceof ApiError) { if (base !== current) current = base; throw error; }
      lastError = error;
    }
  }
  showConnection(lastError);
  throw lastError;
}

function showConnection(error) {
  const banner = $("banner");
  const name = (base) => (nodeNames.has(base) ? "node " + nodeNames.get(base) + " (" + base + ")" : base);
  if (error) {
    banner.hidden = false;
    banner.className = "banner gone";
    banner.textContent = known.length > 1
      ? "No node answers: " + name(home) + ", which served this page, and the " + (known.length - 1) +
        " other nodes it knew are all unreachable."
      : "The node this page came from (" + home + ") is gone, and no other node's address is known.";
    $("connection").textContent = "disconnected";
    return;
  }
  if (current !== home) {
    banner.hidden = false;
    banner.className = "banner";
    banner.textContent = "The node this page came from, " + name(home) + ", does not answer; now reading from " +
      name(current) + ".";
  } else {
    banner.hidden = true;
  }
}

function showLogin(reason) {
  // A failed login link's reason stays until the person signs in another way.
  if (!$("login").hidden && $("login").dataset.loginFailed) return;
  $("login").hidden = false;
  $("login-reason").textContent = reason;
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token-input").value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  $("token-input").value = "";
  $("login").hidden = true;
  delete $("login").dataset.loginFailed;
  poll();
});

// --- cluster ---------------------------------------------------------------------------------

function trend(id, phi) {
  const history = phiHistory.get(id) || [];
  history.push(phi);
  if (history.length > PHI_HISTORY) history.shift();
  phiHistory.set(id, history);
  const before = history[Math.max(0, history.length - 6)];
  const arrow = phi > before + 0.5 ? "↑" : phi < before - 0.5 ? "↓" : "→";
  const width = 60, height = 16;
  const max = Math.max(8, ...history);
  const points = history.map((value, i) =>
    (i * width / (PHI_HISTORY - 1)).toFixed(1) + "," + (height - (value / max) * height).toFixed(1)).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("aria-hidden", "true");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points);
  svg.append(line);
  return [arrow, svg];
}

function meter(fraction, label, full) {
  const percent = Math.max(0, Math.min(100, fraction * 100));
  const bar = el("span");
  bar.style.width = percent.toFixed(1) + "%";
  return el("div", {
    class: "meter" + (full ? " full" : ""), role: "progressbar", "aria-label": label,
    "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": percent.toFixed(0),
  }, bar);
}

function nodeCard(node, leader) {
  const role = node.id === leader ? "leader" : node.role === "unreachable" ? "unreachable" : node.voter ? node.role : "learner";
  const state = node.state || "unknown";
  const health = node.health;
  const [arrow, spark] = trend(node.id, node.phi || 0);
  const details = el("dl");
  const row = (term, ...value) => details.append(el("dt", null, term), el("dd", null, ...value));
  row("phi", el("span", { class: "phi" }, (node.phi || 0).toFixed(2)), " ", el("span", { "aria-label": "trend" }, arrow), " ", spark);
  row("heartbeat", node.heartbeat_age_ms == null ? "none yet" : (node.heartbeat_age_ms / 1000).toFixed(1) + " s ago");
  if (health) {
    const capacity = health.disk_capacity_bytes;
    const used = health.disk_used_bytes;
    row("disk", capacity ? meter(used / capacity, "disk fullness of node " + node.id, used / capacity > 0.9) : "?",
      capacity ? bytes(used) + " of " + bytes(capacity) : bytes(used));
    row("chunks", health.chunk_count + " (" + bytes(health.chunk_bytes) + ")");
    row("cpu", health.cpu_percent.toFixed(0) + " %");
    row("memory", bytes(health.rss_bytes) + " rss, host " + bytes(health.memory_used_bytes) + " of " + bytes(health.memory_total_bytes));
  } else if (node.storage) {
    row("chunks", String(node.chunks_listed));
  }
  if (node.draining) row("draining", "yes");
  return el("li", { class: "node", "data-node-id": node.id, "data-state": state, "data-role": role, "aria-label": "node " + node.id + " " + state },
    el("header", null,
      el("h4", null, "node " + node.id),
      el("span", { class: "badge role " + role }, role),
      el("span", { class: "badge state " + state }, state),
      node.storage ? null : el("span", { class: "badge" }, "metadata only")),
    el("div", { class: "muted mono" }, node.addr),
    details,
    node.state_reason && state !== "up" ? el("p", { class: "reason" }, node.state_reason) : null,
    node.error ? el("p", { class: "reason error" }, node.error) : null);
}

function drawStatus(status) {
  lastStatus = status;
  $("leader").textContent = status.leader == null ? "none" : "node " + status.leader;
  $("term").textContent = status.term;
  $("cluster-id").textContent = status.cluster_id ? "cluster " + status.cluster_id : "";
  $("connection").textContent = "live from node " + status.served_by.node + " · " + clock(Date.now());
  const healthError = $("health-error");
  healthError.hidden = !status.health_error;
  healthError.textContent = status.health_error ? "No liveness view: " + status.health_error : "";

  const under = status.under_replicated_chunks, lost = status.lost_chunks;
  $("chunks").textContent = status.chunks;
  $("chunks-healthy").textContent = Math.max(0, status.chunks - under - lost);
  $("chunks-under").textContent = under;
  $("chunks-under").className = under ? "bad" : "";
  $("chunks-lost").textContent = lost;
  $("chunks-lost").className = lost ? "bad" : "";
  $("copies-unplaceable").textContent = status.unplaceable_copies;
  $("copies-unplaceable").className = status.unplaceable_copies ? "bad" : "";
  // Stripes by live shards, e.g. "12 × 6/6, 1 × 5/6": any short of its total is not whole.
  const stripes = status.stripes || [];
  $("stripes-box").hidden = stripes.length === 0;
  $("stripes").textContent = stripes.map((s) => s.stripes + " × " + s.live_shards + "/" + s.total_shards).join(", ");
  $("stripes").className = stripes.some((s) => s.live_shards < s.total_shards) ? "bad" : "";

  $("nodes").replaceChildren(...status.nodes.map((node) => nodeCard(node, status.leader)));

  // Every node's HTTP address, for when this one dies.
  const bases = [];
  nodeNames = new Map();
  for (const node of status.nodes) {
    if (!node.http_addr) continue;
    const base = location.protocol + "//" + node.http_addr;
    bases.push(base);
    nodeNames.set(base, node.id);
  }
  if (bases.length) known = bases;

  const select = $("logs-node");
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "" }, "all"),
    ...status.nodes.map((node) => el("option", { value: node.id, selected: String(node.id) === chosen }, "node " + node.id)));

  drawRepair(status.repair);
  drawRecentRepairs(status.recent_repairs || []);
  drawTimeline(status.events || []);
}

// The jobs before the current one (kept in the metadata, so every node and every new leader
// shows the same), newest first, each with how far it got.
function drawRecentRepairs(jobs) {
  const list = $("recent-repairs");
  list.replaceChildren(...jobs.map((job) => {
    const finished = job.finished_unix_ms != null;
    const fraction = finished ? 1 : job.total_bytes ? job.done_bytes / job.total_bytes : 0;
    const took = finished ? ((job.finished_unix_ms - job.started_unix_ms) / 1000).toFixed(1) + " s" : null;
    const bar = meter(fraction, "repair job " + job.job_id + " progress");
    if (finished) bar.classList.add("done");
    return el("li", { "data-job": job.job_id, "data-finished": String(finished) },
      el("p", null, el("strong", null, "job " + job.job_id), " · " + job.reason + " · started " + clock(job.started_unix_ms) +
        " · " + bytes(job.done_bytes) + " of " + bytes(job.total_bytes) + ", " + job.done_copies + " copies · " +
        (finished ? "finished in " + took + " (" + bytes(job.bytes_per_sec) + "/s)" : "superseded at " + Math.floor(fraction * 100) + " %")),
      bar);
  }));
  if (!jobs.length) list.append(el("li", { class: "muted" }, "No earlier repair jobs."));
}

function drawRepair(job) {
  const box = $("repair");
  if (!job) { box.replaceChildren(el("p", { class: "muted" }, "No repair job yet.")); return; }
  const fraction = job.total_bytes ? job.done_bytes / job.total_bytes : job.total_copies ? job.done_copies / job.total_copies : 1;
  const finished = job.finished_unix_ms != null;
  const percent = finished ? 100 : Math.floor(fraction * 100);
  const details = el("dl");
  const row = (term, value) => details.append(el("dt", null, term), el("dd", null, value));
  row("bytes", bytes(job.done_bytes) + " of " + bytes(job.total_bytes));
  row("copies", job.done_copies + " of " + job.total_copies);
  row("rate", bytes(job.bytes_per_sec) + "/s" + (finished ? " (average)" : ""));
  row("ETA", finished ? "done at " + clock(job.finished_unix_ms) : job.eta_secs == null ? "–" : job.eta_secs.toFixed(0) + " s");
  row("throttle", job.throttle_bytes_per_sec ? bytes(job.throttle_bytes_per_sec) + "/s" : "none");
  row("started", clock(job.started_unix_ms));
  const bar = meter(finished ? 1 : fraction, "repair job " + job.job_id + " progress");
  if (finished) bar.classList.add("done");
  box.replaceChildren(
    el("p", null, el("strong", null, "job " + job.job_id), " · " + job.reason + " · ",
      el("strong", { id: "repair-percent", "data-finished": String(finished) }, percent + " %"),
      finished ? " · finished" : " · running"),
    bar, details);
}

function drawTimeline(events) {
  $("timeline").replaceChildren(...events.slice().reverse().map((event) =>
    el("li", { "data-kind": event.kind, "data-state": event.state || null, "data-node": event.node },
      el("time", { datetime: new Date(event.unix_ms).toISOString() }, clock(event.unix_ms)), event.detail)));
  if (!events.length) $("timeline").append(el("li", { class: "muted" }, "Nothing has happened yet."));
}

let polling = false;
async function poll() {
  // A tab nobody looks at asks nothing; it catches up when shown again.
  if (polling || document.hidden) return;
  polling = true;
  try {
    if (loggingIn) await loggingIn;
    drawStatus(await api("/api/status"));
    $("login").hidden = true;
  } catch (error) {
    if (error.status === 401 || error.status === 403) showLogin(error.message);
    else if (error instanceof ApiError) $("connection").textContent = "error: " + error.message;
  } finally {
    polling = false;
  }
}

// --- fault localization --------------------------------------------------------------------

function openTrace(id) {
  $("trace-id").value = id;
  $("trace").replaceChildren(el("p", { class: "muted" }, "asking every node for trace " + id + "…"));
  api("/api/trace/" + encodeURIComponent(id.trim())).then(drawTrace, (error) => {
    $("trace").replaceChildren(el("p", { class: "error", role: "alert" }, error.message));
  });
}

function drawTrace(trace) {
  const spans = trace.spans;
  const total = Math.max(1, ...spans.map((s) => s.start_us + s.duration_us));
  const nodes = [...new Set(spans.map((s) => s.node))].sort((a, b) => a - b);
  const failing = spans.filter((s) => s.status === "error");
  const rows = spans.map((span) => {
    const slowest = span.span_id === trace.slowest;
    const failed = span.status === "error";
    const bar = el("span", { class: "span-bar", title: span.name + " on node " + span.node + ": " + micros(span.duration_us) });
    bar.style.left = (span.start_us / total * 100).toFixed(2) + "%";
    bar.style.width = Math.max(0.3, span.duration_us / total * 100).toFixed(2) + "%";
    const label = el("span", { class: "span-label" }, "\u00a0".repeat(span.depth * 2) + span.name,
      el("span", { class: "muted" }, " · node " + span.node + (span.attributes && span.attributes.peer ? " → " + span.attributes.peer : "")),
      " " + micros(span.duration_us),
      slowest ? el("span", { class: "slowest-mark" }, " ★ slowest") : null,
      failed ? el("span", { class: "error" }, " ✗ " + (span.error || "failed")) : null);
    label.title = label.textContent;
    return el("li", { class: "span-row" + (failed ? " failed" : "") + (slowest ? " slowest" : ""), "data-node": span.node },
      label, el("span", { class: "span-track" }, bar));
  });
  $("trace").replaceChildren(
    el("p", null, el("strong", null, "trace " + trace.trace_id),
      " · " + spans.length + (spans.length === 1 ? " span on node " : " spans on nodes ") + nodes.join(", ") +
      " · " + micros(total) + (failing.length ? " · " : ""),
      failing.length ? el("span", { class: "error" }, failing.length + " failed (red)") : null,
      trace.truncated ? " · truncated" : ""),
    el("ol", { class: "waterfall", "aria-label": "spans of trace " + trace.trace_id }, ...rows),
    // The labels are cut to fit; each failure's whole reason is spelled out below.
    ...failing.map((span) => el("p", { class: "error" }, "✗ " + span.name + " on node " + span.node +
      (span.attributes && span.attributes.peer ? " → " + span.attributes.peer : "") + ": " + (span.error || "failed"))),
    ...(trace.unreachable || []).map((u) => el("p", { class: "error" }, "node " + u.node + " could not be asked: " + u.error)));
}

$("trace-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const id = $("trace-id").value.trim();
  if (id) openTrace(id);
});

async function pollRequests() {
  if (document.hidden) return;
  const bases = known.length ? known : [current];
  const answers = await Promise.all(bases.map((base) => fetchJson(base, "/api/requests").catch(() => null)));
  const requests = answers.filter(Boolean).flatMap((answer) => answer.requests)
    .sort((a, b) => b.start_unix_us - a.start_unix_us).slice(0, 50);
  $("requests-empty").hidden = requests.length > 0;
  $("requests").querySelector("tbody").replaceChildren(...requests.map((request) => el("tr", null,
    el("td", null, clock(request.start_unix_us / 1000)),
    el("td", null, request.node),
    el("td", null, request.name),
    el("td", null, micros(request.duration_us)),
    el("td", { class: request.failed ? "error" : "" }, request.failed ? "failed: " + (request.error || "") : "slow"),
    el("td", null, el("button", { type: "button", class: "link", "aria-label": "open trace " + request.trace_id,
      onclick: () => openTrace(request.trace_id) }, request.trace_id.slice(0, 12) + "…")))));
}

$("logs-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const query = new URLSearchParams();
  for (const name of ["node", "level", "trace", "limit"]) {
    const value = event.target.elements[name].value.trim();
    if (value) query.set(name, value);
  }
  $("logs-status").textContent = "asking…";
  try {
    const answer = await api("/api/logs?" + query.toString());
    $("logs").querySelector("tbody").replaceChildren(...answer.lines.slice().reverse().map((line) => {
      const fields = Object.entries(line.fields || {}).map(([k, v]) => " " + k + "=" + v).join("");
      return el("tr", null,
        el("td", null, clock(line.time_unix_us / 1000)),
        el("td", null, line.node),
        el("td", { class: "level-" + line.level }, line.level),
        el("td", null, line.target + ": " + line.message + fields + " ",
          line.trace_id ? el("button", { type: "button", class: "link", onclick: () => openTrace(line.trace_id) }, "trace") : null));
    }));
    const missing = answer.unreachable.map((u) => "node " + u.node).join(", ");
    $("logs-status").textContent = answer.lines.length + " lines, newest first" + (missing ? "; unreachable: " + missing : "");
  } catch (error) {
    $("logs-status").textContent = error.message;
  }
});

poll();
setInterval(poll, POLL_MS);
document.addEventListener("visibilitychange", poll);
pollRequests();
setInterval(pollRequests, REQUESTS_POLL_MS);
