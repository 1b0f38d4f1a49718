//! Status: what an operator (or a monitoring system) needs to decide when to cut over, read
//! from state.db — written every second by the running clone / follow — and, where they can
//! be reached, from the servers themselves (the source's WAL position and slot, the target's
//! replication origin). Used by `pgtide status` and by the Prometheus endpoint, so both tell
//! the same story. Lag in seconds is the age of the oldest spooled commit not yet applied:
//! 0 when everything received is applied, whether or not the source is busy.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use super::slot_wal::{self, SlotWal};
use crate::conninfo::ConnInfo;
use crate::pg::{self, Lsn, Side};
use crate::spool::{self, SpoolView};
use crate::state::{Phase, StateDb, Step, SyncKind, SyncStage, now};

/// Lag (seconds) under which a follower is "ready to cut over" rather than "catching up".
pub const READY_LAG_SECONDS: f64 = 5.0;

/// One table part being copied.
#[derive(Debug, Clone, Serialize)]
pub struct InFlight {
    pub table: String,
    pub part: i64,
    pub parts: i64,
    pub seconds: f64,
    pub bytes: u64,
    /// The part's share of the table's on-disk size (COPY bytes differ from it).
    pub expected_bytes: u64,
}

/// The schema change apply stopped on.
#[derive(Debug, Clone, Serialize)]
pub struct DdlStopped {
    /// Commit LSN of its source transaction and its rank in it ("0/1A2B3C#1").
    pub id: String,
    pub statement: String,
    pub reason: String,
}

/// A table sync in progress.
#[derive(Debug, Clone, Serialize)]
pub struct TableSyncInFlight {
    pub table: String,
    /// add | resync
    pub kind: String,
    /// pending (no snapshot yet) | copying
    pub stage: String,
    /// The copy's snapshot LSN, once taken.
    pub at: Option<String>,
}

/// Everything `pgtide status --json` prints; the field names are a stable interface (README,
/// "Watching a migration"). LSNs are "X/Y" strings, null where unknown.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Status {
    pub phase: Phase,
    /// Seconds since the epoch when the phase began.
    pub phase_since: Option<f64>,
    pub phase_seconds: Option<f64>,
    pub error: Option<String>,
    pub slot: Option<String>,
    pub source_lsn: Option<String>,
    pub received_lsn: Option<String>,
    pub spooled_lsn: Option<String>,
    pub applied_lsn: Option<String>,
    pub endpos: Option<String>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub tables_done: u64,
    pub tables_total: u64,
    pub bytes_copied: u64,
    pub bytes_total: u64,
    pub rows_copied: u64,
    pub indexes_done: u64,
    pub indexes_total: u64,
    pub in_flight: Vec<InFlight>,
    pub clone_eta_seconds: Option<f64>,
    pub apply_changes_per_second: Option<f64>,
    pub apply_transactions_per_second: Option<f64>,
    pub catch_up_eta_seconds: Option<f64>,
    pub spool_bytes: Option<u64>,
    /// Transactions the source is streaming before their commit (pgoutput, 14+), staged in
    /// the spool: they count in no lag until they commit.
    pub streamed_in_progress: Option<u64>,
    /// Their staged bytes.
    pub streamed_in_progress_bytes: Option<u64>,
    pub slot_retained_bytes: Option<u64>,
    /// The slot's `wal_status` on the source (13+): reserved, extended, unreserved, lost.
    pub slot_wal_status: Option<String>,
    /// `safe_wal_size` (13+, with a limit): WAL the source may still write before the slot is
    /// in danger.
    pub slot_safe_wal_bytes: Option<i64>,
    /// `max_slot_wal_keep_size` in bytes; -1 = unlimited (a stopped pgtide then retains WAL
    /// until the source's disk fills); null before 13 (no limit exists).
    pub slot_wal_limit_bytes: Option<i64>,
    /// The source's WAL rate, measured by status (over one second, or since the previous
    /// scrape of the metrics endpoint).
    pub source_wal_bytes_per_second: Option<f64>,
    /// At that rate, seconds until the slot reaches the limit if pgtide stops acknowledging.
    pub slot_seconds_to_limit: Option<f64>,
    /// Why the slot is lost or invalidated (then only a new clone helps); null while usable.
    pub slot_lost: Option<String>,
    /// DDL capture is installed on the source for this stream.
    pub ddl_capture: bool,
    /// The schema change apply stopped on (`pgtide ddl show|skip|retry`), if undecided.
    pub ddl_stopped: Option<DdlStopped>,
    /// Tables being added or copied again (`follow --add-table / --resync`), not yet done.
    pub table_syncs: Vec<TableSyncInFlight>,
    /// Servers status could not ask, with why (the figures above then come from state.db).
    pub unreachable: Vec<String>,
    pub verdict: String,
}

/// How status reaches the servers: explicit connection strings, or the ones the work dir
/// recorded (their password then comes from PGPASSWORD or ~/.pgpass).
#[derive(Clone)]
pub struct Servers {
    pub source: Option<ConnInfo>,
    pub target: Option<ConnInfo>,
}

impl Servers {
    pub fn from_state(state: &StateDb, source: Option<ConnInfo>, target: Option<ConnInfo>) -> Self {
        let recorded = |uri: Result<Option<String>>| {
            uri.ok()
                .flatten()
                .and_then(|uri| ConnInfo::parse_recorded(&uri).ok())
        };
        let stream_source = || state.stream().map(|s| s.and_then(|s| s.source_uri));
        Servers {
            source: source
                .or_else(|| recorded(stream_source()))
                .or_else(|| recorded(state.server_uri(Side::Source))),
            target: target.or_else(|| recorded(state.server_uri(Side::Target))),
        }
    }
}

/// Reads the work dir and asks the servers; never fails because a server is down.
pub async fn collect(dir: &Path, state: &StateDb, servers: &Servers) -> Result<Status> {
    let phase = state.phase()?;
    let stream = state.stream()?;
    let startpos = stream.as_ref().and_then(|s| s.startpos);
    let mut status = Status {
        phase: phase.phase,
        error: phase.error,
        slot: stream.map(|s| s.slot),
        ..Default::default()
    };
    status.phase_since = phase.since;
    status.ddl_capture = state.ddl_capture()?.is_some();
    status.ddl_stopped = state.ddl_stop()?.map(|stop| DdlStopped {
        id: stop.id.to_string(),
        statement: stop.statement.trim().to_string(),
        reason: stop.reason,
    });
    status.table_syncs = state
        .table_syncs()?
        .1
        .into_iter()
        .filter_map(|sync| {
            let kind = match sync.kind {
                SyncKind::Add => "add",
                SyncKind::Resync => "resync",
                SyncKind::Remove => return None,
            };
            let (stage, at) = match sync.stage {
                SyncStage::Pending => ("pending", None),
                SyncStage::CopyingAt(lsn) => ("copying", Some(lsn.to_string())),
                SyncStage::Done(_) => return None,
            };
            Some(TableSyncInFlight {
                table: sync.table,
                kind: kind.into(),
                stage: stage.into(),
                at,
            })
        })
        .collect();
    status.phase_seconds = status.phase_since.map(|t| (now() - t).max(0.0));

    // Clone progress.
    let tables = state.tables()?;
    let parts = state.parts()?;
    status.tables_total = tables.len() as u64;
    status.tables_done = tables
        .iter()
        .filter(|t| {
            parts
                .iter()
                .filter(|p| p.table_oid == t.oid)
                .all(|p| p.status == "done")
        })
        .count() as u64;
    status.bytes_total = tables
        .iter()
        .filter(|t| t.copy_data)
        .map(|t| (t.heap_bytes + t.toast_bytes).max(0) as u64)
        .sum();
    let (done_bytes, done_rows) = state.copied_so_far()?;
    let live = state.clone_progress()?;
    status.bytes_copied = live.bytes_copied.max(done_bytes);
    status.rows_copied = live.rows_copied.max(done_rows);
    let indexes = state.indexes()?;
    status.indexes_total = indexes.len() as u64;
    status.indexes_done = indexes.iter().filter(|i| i.status == "done").count() as u64;
    status.in_flight = state
        .parts_in_flight()?
        .into_iter()
        .map(|p| InFlight {
            table: format!("{}.{}", p.schema, p.table),
            part: p.part,
            parts: p.nparts,
            seconds: (now() - p.started_at).max(0.0),
            bytes: p.bytes,
            expected_bytes: p.expected_bytes,
        })
        .collect();
    if status.phase == Phase::Copying
        && let Some(started) = state.step_started_at(Step::Copy)?
    {
        let rate = status.bytes_copied as f64 / (now() - started).max(1.0);
        if rate > 0.0 {
            let left = status.bytes_total.saturating_sub(status.bytes_copied) as f64;
            status.clone_eta_seconds = Some(left / rate);
        }
    }

    // Stream and apply positions as the running processes recorded them.
    let positions = state.stream_positions()?;
    let (received, spooled) = (positions.received, positions.flushed);
    let mut applied = state.durable_lsn()?;
    let endpos = state.endpos()?;
    status.endpos = endpos.map(|e| e.to_string());
    if let Some(rates) = state.apply_rates(60.0)? {
        status.apply_changes_per_second = Some(rates.changes);
        status.apply_transactions_per_second = Some(rates.transactions);
    }
    status.spool_bytes = spool::disk_bytes(dir);
    if let Some(staged) = SpoolView::open(dir).ok().flatten().and_then(|v| v.staged()) {
        status.streamed_in_progress = Some(staged.transactions);
        status.streamed_in_progress_bytes = Some(staged.bytes);
    }

    // The servers' own view, where they answer.
    let mut source_lsn = None;
    if let (Some(source), Some(slot)) = (&servers.source, &status.slot) {
        match ask_source(source, slot).await {
            Ok(answer) => {
                source_lsn = Some(answer.lsn);
                let wal = &answer.slot;
                status.slot_retained_bytes = wal.retained_bytes;
                status.slot_wal_status = wal.wal_status.clone();
                status.slot_safe_wal_bytes = wal.safe_wal_bytes;
                status.slot_wal_limit_bytes = answer.limit;
                status.source_wal_bytes_per_second = answer.rate;
                status.slot_seconds_to_limit =
                    slot_wal::seconds_to_limit(wal, answer.limit, answer.rate);
                status.slot_lost = if wal.exists {
                    wal.lost.clone()
                } else {
                    Some("missing: it no longer exists on the source".into())
                };
            }
            Err(e) => status.unreachable.push(format!("source: {e:#}")),
        }
    }
    if let (Some(target), Some(slot)) = (&servers.target, &status.slot) {
        match ask_target(target, &crate::apply::origin_name(slot)).await {
            Ok(Some(lsn)) => applied = Some(applied.map_or(lsn, |a| a.max(lsn))),
            Ok(None) => {}
            Err(e) => status.unreachable.push(format!("target: {e:#}")),
        }
    }
    // The copy holds everything up to the slot's start: until apply commits something, that
    // is where the target stands.
    if let Some(start) = startpos {
        applied = Some(applied.map_or(start, |a| a.max(start)));
    }
    // Each figure was recorded at its own moment: what is applied was spooled and received.
    let spooled = match (spooled, applied) {
        (Some(s), Some(a)) => Some(s.max(a)),
        (s, a) => s.or(a),
    };
    let received = match (received, spooled) {
        (Some(r), Some(s)) => Some(r.max(s)),
        (r, s) => r.or(s),
    };
    status.source_lsn = source_lsn.map(|l| l.to_string());
    status.received_lsn = received.map(|l| l.to_string());
    status.spooled_lsn = spooled.map(|l| l.to_string());
    status.applied_lsn = applied.map(|l| l.to_string());
    if let Some(source_lsn) = source_lsn {
        let from = applied.or(startpos);
        status.lag_bytes = from.map(|a| source_lsn.0.saturating_sub(a.0));
    }
    if status.slot.is_some() {
        status.lag_seconds =
            oldest_unapplied_commit_age(dir, state, applied.unwrap_or(Lsn(0)), endpos);
        if let (Some(lag), Some(rates)) = (status.lag_bytes, state.apply_rates(60.0)?)
            && rates.wal_bytes > 0.0
        {
            status.catch_up_eta_seconds = Some(lag as f64 / rates.wal_bytes);
        }
    }
    status.verdict = verdict(&status);
    Ok(status)
}

/// What the source says about its WAL and the slot.
struct SourceAnswer {
    lsn: Lsn,
    slot: SlotWal,
    limit: Option<i64>,
    rate: Option<f64>,
}

async fn ask_source(source: &ConnInfo, slot: &str) -> Result<SourceAnswer> {
    let client = tokio::time::timeout(
        Duration::from_secs(5),
        pg::connect(source, Side::Source, "status"),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no answer within 5 s"))??;
    let wal = slot_wal::ask(&client, slot).await?;
    let limit = slot_wal::keep_limit(&client).await?;
    let rate = slot_wal::wal_rate(&client).await.ok();
    let lsn: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    Ok(SourceAnswer {
        lsn: lsn.parse().map_err(|e: String| anyhow::anyhow!(e))?,
        slot: wal,
        limit,
        rate,
    })
}

async fn ask_target(target: &ConnInfo, origin: &str) -> Result<Option<Lsn>> {
    let client = tokio::time::timeout(
        Duration::from_secs(5),
        pg::connect(target, Side::Target, "status"),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no answer within 5 s"))??;
    let row = client
        .query_one(crate::apply::FURTHEST_ORIGIN_SQL, &[&origin])
        .await?;
    let lsn: Option<String> = row.get(0);
    Ok(lsn.and_then(|l| l.parse().ok()))
}

/// Seconds since the oldest spooled commit after `applied` (and not past `endpos`: those are
/// not to be applied) was committed on the source; 0 when none is waiting. None when the spool
/// cannot be read.
fn oldest_unapplied_commit_age(
    dir: &Path,
    state: &StateDb,
    applied: Lsn,
    endpos: Option<Lsn>,
) -> Option<f64> {
    let Some(spool) = SpoolView::open(dir).ok()? else {
        return Some(0.0);
    };
    match spool.oldest_pending_commit_time(applied, endpos, || state.stream_plugin()) {
        Ok(Some(commit)) => Some((now() - commit).max(0.0)),
        Ok(None) => Some(0.0),
        Err(_) => None,
    }
}

/// The one line an operator reads first.
pub fn verdict(s: &Status) -> String {
    if let (Some(lost), Some(slot)) = (&s.slot_lost, &s.slot)
        && !matches!(s.phase, Phase::Done | Phase::StoppedAtEndpos)
    {
        return format!(
            "stopped: the slot \"{slot}\" is {lost}. {}",
            crate::replication::slot::LOST_SLOT_FIX
        );
    }
    if let Some(stop) = &s.ddl_stopped
        && !matches!(s.phase, Phase::Done | Phase::StoppedAtEndpos)
    {
        return format!(
            "stopped at schema change {}: {}. Decide with `pgtide ddl skip` or `pgtide ddl retry`, then start the follow again",
            stop.id, stop.reason
        );
    }
    match s.phase {
        Phase::Failed => format!("stopped: {}", s.error.as_deref().unwrap_or("unknown error")),
        Phase::StoppedAtEndpos => format!(
            "stopped at endpos {}: every transaction up to it is applied; point the application at the target, then `pgtide cleanup`",
            s.endpos.as_deref().unwrap_or("?")
        ),
        Phase::Done => "done".into(),
        Phase::NotStarted => "not started".into(),
        Phase::Following => match (s.lag_seconds, s.lag_bytes) {
            (Some(lag), _) if lag <= READY_LAG_SECONDS => {
                format!("ready to cut over: lag {lag:.1} s")
            }
            (lag, bytes) => format!(
                "catching up: {} behind{}{}",
                bytes.map_or("?".into(), crate::units::human_bytes),
                lag.map_or(String::new(), |l| format!(
                    ", oldest pending commit {l:.0} s old"
                )),
                s.catch_up_eta_seconds
                    .map_or(String::new(), |e| format!(", est. {}", human_seconds(e)))
            ),
        },
        phase @ (Phase::Snapshot
        | Phase::Schema
        | Phase::Copying
        | Phase::Constraints
        | Phase::Vacuum
        | Phase::Cloned) => {
            let pct = if s.bytes_total > 0 {
                format!(
                    "{:.0}% of {} copied",
                    100.0 * (s.bytes_copied as f64 / s.bytes_total as f64).min(1.0),
                    crate::units::human_bytes(s.bytes_total)
                )
            } else {
                String::new()
            };
            format!(
                "cloning ({phase}): {}/{} tables, {}/{} indexes{}{}",
                s.tables_done,
                s.tables_total,
                s.indexes_done,
                s.indexes_total,
                if pct.is_empty() {
                    String::new()
                } else {
                    format!(", {pct}")
                },
                s.clone_eta_seconds.map_or(String::new(), |e| format!(
                    ", est. {} left",
                    human_seconds(e)
                ))
            )
        }
    }
}

pub fn human_seconds(seconds: f64) -> String {
    humantime::format_duration(Duration::from_secs(seconds.max(0.0).round() as u64)).to_string()
}

/// The slot's cost to the source in one line: retained WAL, the limit (or that there is
/// none), the WAL rate and the time to the limit at that rate; or that the slot is lost.
fn slot_wal_line(s: &Status) -> String {
    use crate::units::human_bytes;
    if let Some(lost) = &s.slot_lost {
        return format!("nothing: the slot is {lost}");
    }
    let mut out = s.slot_retained_bytes.map_or_else(
        || "—".to_string(),
        |b| format!("{} of WAL on the source", human_bytes(b)),
    );
    if let Some(w) = &s.slot_wal_status {
        out.push_str(&format!(" ({w})"));
    }
    match s.slot_wal_limit_bytes {
        Some(l) if l >= 0 => out.push_str(&format!(
            "; limit max_slot_wal_keep_size = {}",
            human_bytes(l as u64)
        )),
        Some(_) => out.push_str(
            "; no limit (max_slot_wal_keep_size = -1): a stopped pgtide makes the source keep WAL until its disk fills",
        ),
        None => {}
    }
    if let Some(rate) = s.source_wal_bytes_per_second {
        out.push_str(&format!("; source writes {}/s", human_bytes(rate as u64)));
        if let Some(t) = s.slot_seconds_to_limit {
            out.push_str(&format!(
                ", at that rate a stopped pgtide loses its slot in about {}",
                human_seconds(t)
            ));
        }
    }
    out
}

/// The human-readable report.
pub fn render(dir: &Path, s: &Status) -> String {
    let mut out = String::new();
    let none = || "—".to_string();
    let mut line = |label: &str, value: String| {
        out.push_str(&format!("{label:<13}{value}\n"));
    };
    line("work dir", dir.display().to_string());
    line(
        "phase",
        format!(
            "{}{}",
            s.phase,
            s.phase_seconds
                .map_or(String::new(), |t| format!(" (for {})", human_seconds(t)))
        ),
    );
    if let Some(e) = &s.error {
        line("error", e.clone());
    }
    if s.tables_total > 0 {
        line(
            "clone",
            format!(
                "{}/{} tables, {} copied of ~{} on disk, {} rows, {}/{} indexes{}",
                s.tables_done,
                s.tables_total,
                crate::units::human_bytes(s.bytes_copied),
                crate::units::human_bytes(s.bytes_total),
                s.rows_copied,
                s.indexes_done,
                s.indexes_total,
                s.clone_eta_seconds.map_or(String::new(), |e| format!(
                    ", est. {} left",
                    human_seconds(e)
                ))
            ),
        );
        for f in &s.in_flight {
            line(
                "  copying",
                format!(
                    "{} part {}/{} ({:.0} s)",
                    f.table,
                    f.part + 1,
                    f.parts,
                    f.seconds
                ),
            );
        }
    }
    if let Some(stop) = &s.ddl_stopped {
        line(
            "DDL stopped",
            format!("{}: {} ({})", stop.id, stop.statement, stop.reason),
        );
    }
    for sync in &s.table_syncs {
        line(
            "  table sync",
            format!(
                "{} {} {}{}",
                sync.kind,
                sync.table,
                sync.stage,
                sync.at
                    .as_ref()
                    .map_or(String::new(), |at| format!(" at {at}"))
            ),
        );
    }
    if let Some(slot) = &s.slot {
        line(
            "slot",
            format!(
                "{slot}{}",
                if s.ddl_capture {
                    " (schema changes captured)"
                } else {
                    ""
                }
            ),
        );
        line(
            "positions",
            format!(
                "source {}  received {}  spooled {}  applied {}  endpos {}",
                s.source_lsn.clone().unwrap_or_else(none),
                s.received_lsn.clone().unwrap_or_else(none),
                s.spooled_lsn.clone().unwrap_or_else(none),
                s.applied_lsn.clone().unwrap_or_else(none),
                s.endpos.clone().unwrap_or_else(none)
            ),
        );
        line(
            "lag",
            format!(
                "{} of WAL, {}",
                s.lag_bytes.map_or_else(none, crate::units::human_bytes),
                s.lag_seconds.map_or_else(none, |l| format!("{l:.1} s"))
            ),
        );
        line(
            "apply rate",
            match (s.apply_changes_per_second, s.apply_transactions_per_second) {
                (Some(c), Some(t)) => {
                    format!("{c:.0} changes/s, {t:.0} transactions/s (last minute)")
                }
                _ => none(),
            },
        );
        line(
            "spool",
            s.spool_bytes.map_or_else(none, crate::units::human_bytes),
        );
        if let (Some(n), Some(bytes)) = (s.streamed_in_progress, s.streamed_in_progress_bytes)
            && n > 0
        {
            line(
                "in progress",
                format!(
                    "{n} transaction(s) still running on the source, {} received ahead of their commit",
                    crate::units::human_bytes(bytes)
                ),
            );
        }
        line("slot retains", slot_wal_line(s));
    }
    for u in &s.unreachable {
        line("not asked", u.clone());
    }
    line("verdict", s.verdict.clone());
    out
}

/// One database of a whole-server migration, as `status --json` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseStatus {
    pub database: String,
    #[serde(flatten)]
    pub status: Status,
}

/// A whole-server migration: a status per database and the sums.
#[derive(Debug, Clone, Serialize)]
pub struct ServerStatus {
    pub databases: Vec<DatabaseStatus>,
    pub total: ServerTotal,
}

/// The server's figures: what an operator compares against the cutover window.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ServerTotal {
    pub databases: usize,
    pub bytes_copied: u64,
    pub bytes_total: u64,
    pub tables_done: u64,
    pub tables_total: u64,
    /// The largest lag of any database (the cutover waits for the slowest).
    pub max_lag_seconds: Option<f64>,
    pub max_lag_bytes: Option<u64>,
    pub spool_bytes: u64,
    pub slot_retained_bytes: u64,
    pub verdict: String,
}

/// Collects each database's status of a whole-server work dir (`server` lists them with their
/// work dirs); `servers` names the server, each database is reached in its own.
pub async fn collect_server(
    databases: &[(crate::state::ServerDatabase, std::path::PathBuf)],
    servers: &Servers,
) -> Result<ServerStatus> {
    let mut out = Vec::new();
    for (db, dir) in databases {
        let status = match StateDb::open_in_dir(dir) {
            Ok(state) => {
                let explicit = Servers {
                    source: servers
                        .source
                        .as_ref()
                        .map(|s| crate::server::in_database(s, &db.name)),
                    target: servers
                        .target
                        .as_ref()
                        .map(|t| crate::server::in_database(t, &db.name)),
                };
                let servers = Servers::from_state(&state, explicit.source, explicit.target);
                collect(dir, &state, &servers).await?
            }
            // Its pipeline has not started yet.
            Err(_) => Status {
                verdict: verdict(&Status::default()),
                ..Default::default()
            },
        };
        out.push(DatabaseStatus {
            database: db.name.clone(),
            status,
        });
    }
    let mut total = ServerTotal {
        databases: out.len(),
        ..Default::default()
    };
    for d in &out {
        let s = &d.status;
        total.bytes_copied += s.bytes_copied;
        total.bytes_total += s.bytes_total;
        total.tables_done += s.tables_done;
        total.tables_total += s.tables_total;
        total.spool_bytes += s.spool_bytes.unwrap_or(0);
        total.slot_retained_bytes += s.slot_retained_bytes.unwrap_or(0);
        total.max_lag_seconds = match (total.max_lag_seconds, s.lag_seconds) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        total.max_lag_bytes = match (total.max_lag_bytes, s.lag_bytes) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    total.verdict = server_verdict(&out, total.max_lag_seconds);
    Ok(ServerStatus {
        databases: out,
        total,
    })
}

/// The server's verdict: ready only when every database is; otherwise the first that is not.
fn server_verdict(databases: &[DatabaseStatus], max_lag: Option<f64>) -> String {
    let ready = |s: &Status| s.verdict.starts_with("ready to cut over");
    if databases.iter().all(|d| ready(&d.status)) {
        return format!(
            "ready to cut over: every database's lag is at most {:.1} s",
            max_lag.unwrap_or(0.0)
        );
    }
    let stopped_at_endpos = |s: &Status| matches!(s.phase, Phase::StoppedAtEndpos | Phase::Done);
    if databases.iter().all(|d| stopped_at_endpos(&d.status)) {
        return "every database stopped at its endpos: point the application at the target, then `pgtide cleanup`".into();
    }
    let waiting: Vec<String> = databases
        .iter()
        .filter(|d| !ready(&d.status) && !stopped_at_endpos(&d.status))
        .map(|d| format!("{}: {}", d.database, d.status.verdict))
        .collect();
    format!("not ready: {}", waiting.join("; "))
}

/// `status` of a whole-server work dir: a line per database, then the total.
pub fn render_server(dir: &Path, s: &ServerStatus) -> String {
    let mut out = format!(
        "work dir     {} (whole server: {} databases)\n",
        dir.display(),
        s.total.databases
    );
    let width = s
        .databases
        .iter()
        .map(|d| d.database.chars().count())
        .max()
        .unwrap_or(8)
        .max(8);
    out.push_str(&format!(
        "{:<width$}  {:<18} {:<26} {:<18} {}\n",
        "database", "phase", "copied", "lag", "verdict"
    ));
    let lag = |seconds: Option<f64>, bytes: Option<u64>| match (seconds, bytes) {
        (Some(s), Some(b)) => format!("{s:.1} s, {}", crate::units::human_bytes(b)),
        (Some(s), None) => format!("{s:.1} s"),
        (None, Some(b)) => crate::units::human_bytes(b),
        (None, None) => "—".into(),
    };
    for d in &s.databases {
        let st = &d.status;
        out.push_str(&format!(
            "{:<width$}  {:<18} {:<26} {:<18} {}\n",
            d.database,
            st.phase.to_string(),
            format!(
                "{} of {}",
                crate::units::human_bytes(st.bytes_copied),
                crate::units::human_bytes(st.bytes_total)
            ),
            lag(st.lag_seconds, st.lag_bytes),
            st.verdict
        ));
    }
    let t = &s.total;
    out.push_str(&format!(
        "{:<width$}  {:<18} {:<26} {:<18} {}\n",
        "total",
        format!("{}/{} tables", t.tables_done, t.tables_total),
        format!(
            "{} of {}",
            crate::units::human_bytes(t.bytes_copied),
            crate::units::human_bytes(t.bytes_total)
        ),
        lag(t.max_lag_seconds, t.max_lag_bytes),
        t.verdict
    ));
    out.push_str(&format!(
        "spool {} in all; slots retain {} of WAL in all. Details of one database: pgtide status --dir {}/databases/<oid>\n",
        crate::units::human_bytes(t.spool_bytes),
        crate::units::human_bytes(t.slot_retained_bytes),
        dir.display()
    ));
    out
}
