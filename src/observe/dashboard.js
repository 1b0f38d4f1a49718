"use strict";
const $ = (id) => document.getElementById(id);
const units = ["B", "kB", "MB", "GB", "TB"];
function bytes(n) {
  if (n === null || n === undefined) return "–";
  let i = 0; while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
}
function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
}
function when(t) { return new Date(t * 1000).toLocaleString(); }

function renderStatus(s) {
  $("phase").textContent = s.phase;
  $("slot").textContent = s.slot ? "slot " + s.slot : "";
  const v = $("verdict");
  v.textContent = s.verdict;
  v.className = s.verdict.startsWith("ready") ? "ready" : s.verdict.startsWith("stopped") ? "stopped" : "";
  $("lag").textContent = s.lag_seconds === null ? "–" : seconds(s.lag_seconds) + " · " + bytes(s.lag_bytes);
  $("rate").textContent = s.apply_changes_per_second === null ? "–"
    : Math.round(s.apply_changes_per_second) + " changes/s";
  $("wal").textContent = bytes(s.slot_retained_bytes);
  const limit = s.slot_wal_limit_bytes;
  if (limit !== null && limit >= 0 && s.slot_retained_bytes !== null) {
    $("wal-bar").style.width = Math.min(100, 100 * s.slot_retained_bytes / limit) + "%";
    $("wal-limit").textContent = "of " + bytes(limit) + " (max_slot_wal_keep_size)";
  } else {
    $("wal-limit").textContent = "no limit (max_slot_wal_keep_size = -1)";
  }
  $("spool").textContent = bytes(s.spool_bytes);
  // Copied bytes (COPY's text) are an estimate against the tables' size on disk: a finished
  // copy is 100% whatever they say.
  const finished = s.tables_total > 0 && s.tables_done === s.tables_total;
  const pct = finished ? 100 : s.bytes_total > 0 ? Math.min(99, 100 * s.bytes_copied / s.bytes_total) : 0;
  $("copy").textContent = s.tables_done + "/" + s.tables_total + " tables · " + s.indexes_done + "/" + s.indexes_total + " indexes";
  $("copy-bar").style.width = pct + "%";
  $("copy-eta").textContent = s.clone_eta_seconds ? "about " + seconds(s.clone_eta_seconds) + " left" : (pct >= 100 ? "copied" : "");
  const rows = (s.in_flight || []).map((t) => {
    const share = t.expected_bytes > 0 ? Math.min(1, t.bytes / t.expected_bytes) : 0;
    const eta = share > 0 && share < 1 ? seconds(t.seconds * (1 - share) / share) : "–";
    return "<tr><td>" + esc(t.table) + "</td><td>" + (t.part + 1) + "/" + t.parts + "</td><td>" + bytes(t.bytes)
      + "</td><td>" + Math.round(100 * share) + "%</td><td>" + eta + "</td></tr>";
  });
  $("tables-card").hidden = rows.length === 0;
  $("tables").innerHTML = rows.join("");
  $("error-card").hidden = !s.error;
  $("error").textContent = s.error || "";
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}
function esc(t) { return String(t).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]); }

function renderHistory(h) {
  const pts = h.points || [];
  // From the first point in the window (a young migration fills the chart), to now.
  const t0 = pts.length ? Math.max(h.since, pts[0].at) : h.since, t1 = h.now;
  const span = Math.max(1, t1 - t0);
  const maxS = Math.max(1, ...pts.map((p) => p.lag_seconds || 0));
  const maxB = Math.max(1, ...pts.map((p) => p.lag_bytes || 0));
  const x = (t) => (800 * (t - t0) / span).toFixed(1);
  const line = (key, max) => pts.filter((p) => p[key] !== null)
    .map((p) => x(p.at) + "," + (210 - 200 * p[key] / max).toFixed(1)).join(" ");
  $("lag-seconds").setAttribute("points", line("lag_seconds", maxS));
  $("lag-bytes").setAttribute("points", line("lag_bytes", maxB));
  $("max-seconds").textContent = "top " + seconds(maxS);
  $("max-bytes").textContent = "top " + bytes(maxB);
  let grid = "";
  for (let i = 0; i <= 4; i++) {
    const y = 10 + 50 * i;
    grid += '<line x1="0" x2="800" y1="' + y + '" y2="' + y + '" stroke="var(--grid)"/>';
  }
  $("grid").innerHTML = grid;
  $("chart-from").textContent = new Date(t0 * 1000).toLocaleString();
  // The timeline: where the recorded phase changed.
  const steps = [];
  for (const p of pts) if (!steps.length || steps[steps.length - 1].phase !== p.phase) steps.push(p);
  $("timeline").innerHTML = steps.map((p) => "<tr><td>" + esc(when(p.at)) + "</td><td>" + esc(p.phase) + "</td></tr>").join("");
}

// A whole server: the totals in the same cards, and a line per database.
function serverAsOne(s) {
  const dbs = s.databases;
  const sum = (k) => dbs.reduce((a, d) => a + (d[k] || 0), 0);
  $("databases-card").hidden = false;
  $("databases").innerHTML = dbs.map((d) => "<tr><td>" + esc(d.database) + "</td><td>" + esc(d.phase)
    + "</td><td>" + (d.lag_seconds === null ? "–" : seconds(d.lag_seconds)) + "</td><td>" + esc(d.verdict) + "</td></tr>").join("");
  return {
    phase: [...new Set(dbs.map((d) => d.phase))].join(" / "),
    slot: null,
    verdict: s.total.verdict,
    lag_seconds: s.total.max_lag_seconds, lag_bytes: s.total.max_lag_bytes,
    apply_changes_per_second: dbs.some((d) => d.apply_changes_per_second !== null) ? sum("apply_changes_per_second") : null,
    slot_retained_bytes: s.total.slot_retained_bytes,
    slot_wal_limit_bytes: dbs.length ? dbs[0].slot_wal_limit_bytes : null,
    spool_bytes: s.total.spool_bytes,
    bytes_copied: s.total.bytes_copied, bytes_total: s.total.bytes_total,
    tables_done: s.total.tables_done, tables_total: s.total.tables_total,
    indexes_done: sum("indexes_done"), indexes_total: sum("indexes_total"),
    clone_eta_seconds: null,
    in_flight: dbs.flatMap((d) => (d.in_flight || []).map((t) => Object.assign({}, t, { table: d.database + ": " + t.table }))),
    error: dbs.filter((d) => d.error).map((d) => d.database + ": " + d.error).join("\n") || null,
  };
}

// A whole server's history: at each instant (every database is recorded at the same one),
// the largest lag of any database, what the cutover waits for.
function serverHistory(h) {
  const at = new Map();
  for (const db of h.databases) for (const p of db.points) {
    const q = at.get(p.at);
    if (!q) { at.set(p.at, Object.assign({}, p)); continue; }
    for (const k of ["lag_seconds", "lag_bytes"]) if (p[k] !== null && (q[k] === null || p[k] > q[k])) q[k] = p[k];
    (q.phases = q.phases || new Set([q.phase])).add(p.phase);
    q.phase = [...q.phases].join(" / ");
  }
  return { now: h.now, since: h.since, points: [...at.values()].sort((a, b) => a.at - b.at) };
}

async function refresh() {
  try {
    const s = await (await fetch("api/status")).json();
    if (s.error && !s.phase && !s.databases) throw new Error(s.error);
    if (s.databases) {
      renderStatus(serverAsOne(s));
      $("slot").textContent = s.databases.length + " databases";
    } else {
      renderStatus(s);
    }
    const w = Number($("window").value);
    const h = await (await fetch("api/history?since=" + (w > 0 ? -w : 0))).json();
    if (h.error) throw new Error(h.error);
    renderHistory(h.databases ? serverHistory(h) : h);
  } catch (e) {
    $("verdict").textContent = "cannot reach pgtide: " + e.message;
    $("verdict").className = "stopped";
  }
}
$("window").addEventListener("change", refresh);
refresh();
setInterval(refresh, 5000);
