//! `state.db`: the work dir's SQLite database. It holds the source catalog as seen under the
//! snapshot, one progress row per step, table part and index (with start/end times and attempt
//! counts), and the identity of the migration the work dir belongs to.
//!
//! Everything else a migration records is a typed record with its own methods: the stream
//! (`StreamRecord`, written and cleared as one), its positions, the `Sentinel`, the `Phase`,
//! clone `Step`s, resync positions, the fence, the filters (invariant 9). They are stored in
//! the `meta` table under the keys earlier versions wrote (see `key`), so an older work dir
//! opens and resumes as it is; no string key is used outside this file.
//!
//! Resume correctness depends on this file: a part or index is only marked `done` after the
//! target committed it, so a crash can leave a row `running` (redone or checked on resume) but
//! never `done` for work the target does not have.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};

use crate::pg::Lsn;
use crate::pg::catalog::{ConstraintRow, IndexRow, PartRow, SequenceRow, TableRow};
use rusqlite::{Connection, OptionalExtension, params};

/// Bumped whenever the schema below changes; `open` migrates older files forward.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA_V1: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (
    name       TEXT PRIMARY KEY,
    status     TEXT NOT NULL,          -- running | done | failed
    started_at REAL,
    done_at    REAL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    error      TEXT
);
CREATE TABLE IF NOT EXISTS tables (
    oid          INTEGER PRIMARY KEY,
    schema_name  TEXT NOT NULL,
    table_name   TEXT NOT NULL,
    heap_bytes   INTEGER NOT NULL,
    toast_bytes  INTEGER NOT NULL,
    pages        INTEGER NOT NULL,
    est_rows     INTEGER NOT NULL,
    has_pk       INTEGER NOT NULL,
    columns_json TEXT NOT NULL,        -- copied columns (generated ones left out)
    binary_copy  INTEGER NOT NULL,     -- every column type has a portable binary form
    copy_data    INTEGER NOT NULL,     -- 0 for --filters exclude-table-data
    vacuumed_at  REAL                  -- VACUUM ANALYZE done on the target
);
CREATE TABLE IF NOT EXISTS parts (
    table_oid  INTEGER NOT NULL,
    part       INTEGER NOT NULL,
    nparts     INTEGER NOT NULL,
    first_page INTEGER NOT NULL,
    end_page   INTEGER,                -- NULL: up to the end of the table
    status     TEXT NOT NULL DEFAULT 'pending',
    rows       INTEGER,
    bytes      INTEGER,
    snapshot   TEXT,
    started_at REAL,
    done_at    REAL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (table_oid, part)
);
CREATE TABLE IF NOT EXISTS indexes (
    oid             INTEGER PRIMARY KEY,
    table_oid       INTEGER NOT NULL,
    schema_name     TEXT NOT NULL,
    index_name      TEXT NOT NULL,
    definition      TEXT NOT NULL,
    constraint_oid  INTEGER,
    constraint_name TEXT,
    constraint_type TEXT,              -- p | u | x
    constraint_def  TEXT,
    is_deferrable   INTEGER NOT NULL DEFAULT 0,
    is_deferred     INTEGER NOT NULL DEFAULT 0,
    replica_identity INTEGER NOT NULL DEFAULT 0,
    status          TEXT NOT NULL DEFAULT 'pending',
    started_at      REAL,
    done_at         REAL,
    attempts        INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sequences (
    oid         INTEGER PRIMARY KEY,
    schema_name TEXT NOT NULL,
    seq_name    TEXT NOT NULL,
    last_value  INTEGER NOT NULL,
    is_called   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS constraints (
    oid        INTEGER PRIMARY KEY,
    table_oid  INTEGER NOT NULL,
    name       TEXT NOT NULL,
    kind       TEXT NOT NULL,              -- p u x f c t (pg_constraint.contype)
    definition TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS large_objects (
    oid INTEGER PRIMARY KEY
);
"#;

/// The `meta` keys the typed records below are stored under: the keys earlier pgtide versions
/// wrote, so that a work dir they created opens and resumes as it is. No key leaves this file.
mod key {
    /// The target server (system identifier) whose settings `--fast-restore` recorded.
    pub const FAST_RESTORE_SERVER: &str = "fast_restore.server";
    pub const STREAM_SLOT: &str = "stream.slot";
    pub const STREAM_PLUGIN: &str = "stream.plugin";
    pub const STREAM_WAL2JSON_NAN_AS_NULL: &str = "stream.wal2json_nan_as_null";
    pub const STREAM_STARTPOS: &str = "stream.startpos";
    pub const STREAM_SOURCE_URI: &str = "stream.source.uri";
    pub const STREAM_TABLES: &str = "stream.tables";
    pub const STREAM_PUBLICATIONS: &str = "stream.publications";
    pub const STREAM_SYSTEM_ID: &str = "stream.system_id";
    /// Every key of the stream record: written and cleared together.
    pub const STREAM_RECORD: [&str; 8] = [
        STREAM_SLOT,
        STREAM_PLUGIN,
        STREAM_WAL2JSON_NAN_AS_NULL,
        STREAM_STARTPOS,
        STREAM_SOURCE_URI,
        STREAM_TABLES,
        STREAM_PUBLICATIONS,
        STREAM_SYSTEM_ID,
    ];
    pub const STREAM_RECEIVED_LSN: &str = "stream.received_lsn";
    pub const STREAM_FLUSHED_LSN: &str = "stream.flushed_lsn";
    /// JSON {"schema.table": "X/Y"}.
    pub const STREAM_RESYNCED: &str = "stream.resynced";
    pub const SENTINEL_ENDPOS: &str = "sentinel.endpos";
    /// "on" once apply is switched on.
    pub const SENTINEL_APPLY: &str = "sentinel.apply";
    pub const SENTINEL_REACHED_ENDPOS: &str = "sentinel.reached_endpos";
    pub const SENTINEL_APPLIED_LSN: &str = "sentinel.applied_lsn";
    pub const APPLY_APPLIED_LSN: &str = "apply.applied_lsn";
    pub const APPLY_DURABLE_LSN: &str = "apply.durable_lsn";
    pub const PHASE: &str = "phase";
    pub const PHASE_SINCE: &str = "phase.since";
    pub const PHASE_ERROR: &str = "phase.error";
    /// JSON of `Filters`.
    pub const MIGRATION_FILTERS: &str = "migration.filters";
    pub const MIGRATION_SEQUENCE_OFFSET: &str = "migration.sequence_offset";
    pub const APPLY_JOBS: &str = "apply.jobs";
    /// "cleaned up" once `pgtide cleanup` ran.
    pub const MIGRATION_STATUS: &str = "migration.status";
    pub const MIGRATION_CLEANED_UP: &str = "cleaned up";
    pub const CLONE_STATUS: &str = "clone.status";
    pub const CLONE_BYTES_COPIED: &str = "clone.bytes_copied";
    pub const CLONE_ROWS_COPIED: &str = "clone.rows_copied";
    pub const SNAPSHOT: &str = "snapshot";
    pub const SPOOL_BYTES: &str = "spool.bytes";
    /// JSON list of `FencedRole`.
    pub const CUTOVER_FENCE: &str = "cutover.fence";
    /// A reverse stream's echo filter: the replication origin (and its lanes) of the forward
    /// apply, whose transactions on the target are not sent back to the source.
    pub const REVERSE_ECHO_ORIGIN: &str = "reverse.echo_origin";
    /// JSON of `CompletedSwitch`: the switch-over of this work dir completed (a cutover, or in
    /// the reverse work dir a rollback's switch); forgotten when its fence is lifted.
    pub const CUTOVER_COMPLETED: &str = "cutover.completed";
    /// JSON of `CompletedSwitch`: the rollback's switch is done (the source's fence is lifted,
    /// or being lifted).
    pub const REVERSE_ROLLED_BACK: &str = "reverse.rolled_back";
    /// The roles a whole-server migration left out (`--exclude-role`), for verify.
    pub const SERVER_EXCLUDED_ROLES: &str = "server.excluded_roles";
    /// JSON of `replication::ddl_capture::Capture`.
    pub const DDL_CAPTURE: &str = "ddl.capture";
    /// JSON of `DdlStop`.
    pub const DDL_STOPPED: &str = "ddl.stopped";
    /// JSON list of (`DdlId`, `DdlDecision`).
    pub const DDL_DECISIONS: &str = "ddl.decisions";
    /// The generation of the `table_sync` table: bumped by every change of it.
    pub const TABLE_SYNC_GENERATION: &str = "table_sync.generation";
    /// The generation the running apply has loaded (its acknowledgement).
    pub const TABLE_SYNC_SEEN: &str = "table_sync.seen";

    /// The key of a server's identity (system identifier / database).
    pub fn identity(side: crate::pg::Side) -> &'static str {
        match side {
            crate::pg::Side::Source => "source.identity",
            crate::pg::Side::Target => "target.identity",
        }
    }

    /// The key of a server's connection string, password removed.
    pub fn uri(side: crate::pg::Side) -> &'static str {
        match side {
            crate::pg::Side::Source => "source.uri",
            crate::pg::Side::Target => "target.uri",
        }
    }
}

/// A target setting as it was before `--fast-restore` changed it: its line in
/// postgresql.auto.conf (None: it had none, `ALTER SYSTEM RESET` restores it) and the value in
/// effect (what the restore is checked against).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedSetting {
    pub name: String,
    pub auto_conf: Option<String>,
    pub value_before: String,
}

/// The work dir's change stream as `stream setup` or `clone --follow` created it (or `stream
/// receive --slot-name` adopted it): what every later stage (receive, follow, cutover,
/// status, cleanup, a resume) reads back. Written and cleared as one.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamRecord {
    pub slot: String,
    /// The output plugin the slot was created with: the spool holds its messages.
    pub plugin: crate::replication::Plugin,
    /// The operator accepted (`--wal2json-nan-as-null`) that wal2json turns NaN / ±Infinity
    /// of nullable numeric and float columns into NULL.
    pub wal2json_nan_as_null: bool,
    /// The slot's consistent point: where the copy ends and the stream begins (None for an
    /// adopted slot).
    pub startpos: Option<Lsn>,
    /// The source's connection string, password removed (invariant 7).
    pub source_uri: Option<String>,
    /// The published tables (schema, name), as the stream decodes and status shows them.
    pub tables: Option<Vec<(String, String)>>,
    /// The publications a pgoutput stream reads (None: the slot's default one).
    pub publications: Option<Vec<String>>,
    /// The source's system identifier, so that a stream from another server is refused.
    pub system_id: Option<String>,
}

/// One captured schema change in the stream: the commit LSN of its source transaction and
/// its rank among that transaction's schema changes (a transaction can hold several).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct DdlId {
    pub commit: Lsn,
    pub ordinal: u32,
}

impl std::fmt::Display for DdlId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.commit, self.ordinal)
    }
}

/// What the operator decided for a schema change apply stopped on (`pgtide ddl skip|retry`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DdlDecision {
    /// Go past it without running it on the target (the operator ran it, or it is unwanted).
    Skip,
    /// Run it on the target although pgtide judged it unsafe.
    Replay,
}

/// The schema change apply stopped on, for `pgtide ddl` and status.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DdlStop {
    pub id: DdlId,
    pub statement: String,
    pub reason: String,
}

/// Where the receiver stands (recorded about every second): what it received and what is
/// durable in the spool (and acknowledged to the source as flushed).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StreamPositions {
    pub received: Option<Lsn>,
    pub flushed: Option<Lsn>,
}

/// The operator's handle on a running follow (`pgtide sentinel`) and how it ended: follow
/// re-reads `endpos` every half second; cutover waits for `reached_endpos`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sentinel {
    /// Apply stops after the last transaction committed at or before it.
    pub endpos: Option<Lsn>,
    /// Apply was switched on.
    pub apply: bool,
    /// The endpos a follow stopped at, once everything up to it was applied.
    pub reached_endpos: Option<Lsn>,
    /// The position apply stopped at when it reached endpos.
    pub applied_lsn: Option<Lsn>,
}

/// The phase of the migration, as `pgtide status` and the metrics show it. The text of each
/// (`as_str`) is what state.db stores and status prints: a stable interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// Nothing recorded yet (never stored).
    #[default]
    NotStarted,
    Snapshot,
    Schema,
    Copying,
    Constraints,
    Vacuum,
    Cloned,
    Following,
    StoppedAtEndpos,
    Done,
    Failed,
}

impl Phase {
    const ALL: [Phase; 11] = [
        Phase::NotStarted,
        Phase::Snapshot,
        Phase::Schema,
        Phase::Copying,
        Phase::Constraints,
        Phase::Vacuum,
        Phase::Cloned,
        Phase::Following,
        Phase::StoppedAtEndpos,
        Phase::Done,
        Phase::Failed,
    ];

    /// The phase's text in state.db and in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::NotStarted => "not started",
            Phase::Snapshot => "snapshot",
            Phase::Schema => "schema",
            Phase::Copying => "copying",
            Phase::Constraints => "constraints",
            Phase::Vacuum => "vacuum",
            Phase::Cloned => "cloned",
            Phase::Following => "following",
            Phase::StoppedAtEndpos => "stopped at endpos",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }

    /// The phase `as_str` wrote, if `text` is one.
    pub fn parse(text: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == text)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `pgtide status --json` prints the phase as its text.
impl serde::Serialize for Phase {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The phase with when it began and, for `Failed`, the error it stopped on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PhaseRecord {
    pub phase: Phase,
    /// Seconds since the epoch.
    pub since: Option<f64>,
    pub error: Option<String>,
}

/// A clone step: each is recorded in the `steps` table with its times, so `--resume` skips
/// the ones done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Catalog,
    Dump,
    PreData,
    Copy,
    Indexes,
    LargeObjects,
    PostData,
    Sequences,
    Vacuum,
}

impl Step {
    const ALL: [Step; 9] = [
        Step::Catalog,
        Step::Dump,
        Step::PreData,
        Step::Copy,
        Step::Indexes,
        Step::LargeObjects,
        Step::PostData,
        Step::Sequences,
        Step::Vacuum,
    ];

    /// The step's name in state.db, the logs and the clone summary.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Catalog => "catalog",
            Step::Dump => "dump",
            Step::PreData => "pre-data",
            Step::Copy => "copy",
            Step::Indexes => "indexes",
            Step::LargeObjects => "large-objects",
            Step::PostData => "post-data",
            Step::Sequences => "sequences",
            Step::Vacuum => "vacuum",
        }
    }

    /// The step `as_str` named, if `name` is one.
    pub fn parse(name: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The migration phase status shows while this step runs.
    pub fn phase(self) -> Phase {
        match self {
            Step::Catalog => Phase::Snapshot,
            Step::Dump | Step::PreData => Phase::Schema,
            Step::Copy | Step::Indexes | Step::LargeObjects => Phase::Copying,
            Step::PostData | Step::Sequences => Phase::Constraints,
            Step::Vacuum => Phase::Vacuum,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a step stands: `Done` only once its work is committed on the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepStatus {
    Running,
    Done,
    Failed,
}

impl StepStatus {
    /// The status's text in state.db and the clone summary.
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Running => "running",
            StepStatus::Done => "done",
            StepStatus::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Option<StepStatus> {
        [StepStatus::Running, StepStatus::Done, StepStatus::Failed]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// One line of the clone summary's step table.
#[derive(Clone, Copy, Debug)]
pub struct StepRecord {
    pub step: Step,
    pub status: StepStatus,
    /// From start to end, None while it runs.
    pub seconds: Option<f64>,
}

/// Whether the work dir's clone finished: a fresh `clone` refuses a dir holding either, and
/// cutover one whose clone is still running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloneStatus {
    Running,
    Done,
}

impl CloneStatus {
    /// The status's text in state.db and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            CloneStatus::Running => "running",
            CloneStatus::Done => "done",
        }
    }
}

impl std::fmt::Display for CloneStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The running clone's live counters (every second), for `pgtide status` in another shell.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CloneProgress {
    pub bytes_copied: u64,
    pub rows_copied: u64,
}

/// The server a work dir is tied to, so that a resume against other servers is refused.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerIdentity {
    /// The system identifier and the database name.
    pub identity: String,
    /// Its connection string, password removed, for messages and status.
    pub uri: Option<String>,
}

/// One role a cutover fenced and its own `default_transaction_read_only` in the database
/// before, so that the fence can be lifted exactly (also after a crash, with `--unfence`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FencedRole {
    pub role: String,
    pub previous: Option<String>,
}

/// One point of the recorded time series: what the dashboard's charts and `/api/history`
/// show, kept across restarts.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HistoryPoint {
    /// Unix seconds.
    pub at: f64,
    pub phase: String,
    pub lag_bytes: Option<i64>,
    pub lag_seconds: Option<f64>,
    pub apply_changes_per_second: Option<f64>,
    /// WAL the slot keeps on the source, and the limit it may reach (max_slot_wal_keep_size).
    pub retained_wal_bytes: Option<i64>,
    pub wal_limit_bytes: Option<i64>,
    pub spool_bytes: Option<i64>,
    pub bytes_copied: i64,
    pub bytes_total: i64,
}

/// A completed switch-over (a cutover, or a rollback), so that a rerun reports it instead of
/// switching again under an application already moved.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CompletedSwitch {
    /// The endpos the switch-over reached.
    pub endpos: Lsn,
    /// When it completed (unix seconds).
    pub at: i64,
}

/// Per table ("schema"."table", quoted) copied again under a later snapshot: the LSN of that
/// snapshot. Apply skips the table's changes from transactions that commit before it (they
/// are in its copy).
pub type ResyncPositions = std::collections::HashMap<String, Lsn>;

/// Why a table's rows are (or were) copied while the follow runs: `follow --add-table`,
/// `follow --resync`; or, `follow --remove-table`, why its changes are no longer applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    /// A table the migration did not follow joins it: created on the target if missing,
    /// published, copied.
    Add,
    /// A followed table is copied again (it diverged, or an unsafe DDL changed it).
    Resync,
    /// The table leaves the migration: unpublished, its changes ignored, its target table kept.
    Remove,
}

impl SyncKind {
    fn as_str(self) -> &'static str {
        match self {
            SyncKind::Add => "add",
            SyncKind::Resync => "resync",
            SyncKind::Remove => "remove",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [SyncKind::Add, SyncKind::Resync, SyncKind::Remove]
            .into_iter()
            .find(|k| k.as_str() == text)
    }
}

/// Where a table's copy stands. Apply's rule for a change committing at C (apply/joins.rs):
/// Pending: wait (the LSN is not known); CopyingAt(L): skip when C < L, else wait; Done(L):
/// skip when C < L, else apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncStage {
    /// Recorded; no snapshot yet.
    Pending,
    /// Being copied under a snapshot at this LSN: every transaction committing before it is in
    /// the copy, every later one in the stream.
    CopyingAt(Lsn),
    /// Copied (committed on the target) under a snapshot at this LSN; for a removal, the
    /// source position when it was recorded.
    Done(Lsn),
}

/// One table's sync record (the `table_sync` table): `table` is the quoted qualified name
/// (`pg::qualified`), as apply names tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSync {
    pub table: String,
    pub kind: SyncKind,
    pub stage: SyncStage,
    /// The generation that recorded this state.
    pub generation: u64,
}

/// What the filters and the stream's table list become when a table sync finishes, written
/// in the same SQLite transaction as its `Done` (invariant 9: every stage agrees at once).
pub struct FollowedTables<'a> {
    pub filters: &'a crate::clone::filters::Filters,
    pub stream_tables: &'a [(String, String)],
}

/// What the work dir knows of the follow process (the one applying the stream): written by it
/// every second, so that cutover can tell at once when apply is no longer running.
#[derive(Clone, Debug)]
pub struct FollowLiveness {
    pub pid: u32,
    /// The follow's latest heartbeat (seconds since the epoch).
    pub heartbeat_at: f64,
    /// Set when it stopped (reached endpos or failed); `last_error` says why when it failed.
    pub stopped_at: Option<f64>,
    pub last_error: Option<String>,
}

impl FollowLiveness {
    /// Why this follow is not running at `now` (seconds since the epoch), or None while it
    /// has not recorded a stop and its heartbeat is younger than `timeout`.
    pub fn not_running(&self, now: f64, timeout: std::time::Duration) -> Option<String> {
        if let Some(stopped) = self.stopped_at {
            let ago = (now - stopped).max(0.0);
            return Some(match &self.last_error {
                Some(error) => format!(
                    "the follow process (pid {}) stopped {ago:.0} s ago on an error: {error}",
                    self.pid
                ),
                None => format!(
                    "the follow process (pid {}) stopped {ago:.0} s ago at an earlier endpos",
                    self.pid
                ),
            });
        }
        let silent = now - self.heartbeat_at;
        (silent > timeout.as_secs_f64()).then(|| {
            format!(
                "the follow process (pid {}) has not recorded a heartbeat for {silent:.0} s: it died or hangs",
                self.pid
            )
        })
    }
}

/// A table part being copied, for status.
#[derive(Clone, Debug)]
pub struct PartInFlight {
    pub schema: String,
    pub table: String,
    pub part: i64,
    pub nparts: i64,
    pub started_at: f64,
    /// Streamed so far (updated every second).
    pub bytes: u64,
    /// The part's share of the table's on-disk size.
    pub expected_bytes: u64,
}

/// Apply throughput over a recent window.
#[derive(Clone, Copy, Debug)]
pub struct ApplyRates {
    pub changes: f64,
    pub transactions: f64,
    /// Source WAL applied per second: what a backlog in bytes drains at.
    pub wal_bytes: f64,
}

/// Seconds since the epoch, as stored in every `*_at` column.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One line of the end-of-clone summary.
#[derive(Clone, Debug)]
pub struct TableSummary {
    pub table: String,
    pub rows: i64,
    pub bytes: i64,
    pub seconds: f64,
    pub parts: i64,
}

/// One database of a whole-server migration (`clone --all-databases`): the work dir of its own
/// pipeline (a sub-directory of the server's) and the slot that pipeline follows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServerDatabase {
    pub name: String,
    pub source_oid: u32,
    /// Its size on the source when the migration started (largest first).
    pub bytes: i64,
    /// Its work dir, relative to the server's.
    pub subdir: String,
    pub slot: String,
    /// pgtide created it on the target (so its properties were copied).
    pub created_on_target: bool,
}

/// Handle shared by every worker; SQLite calls are short, so one mutex-guarded connection is
/// enough and keeps writes serialised.
#[derive(Clone)]
pub struct StateDb {
    conn: Arc<Mutex<Connection>>,
}

impl StateDb {
    /// Opens a migration's state.db in its work dir without the work dir lock (a follow may be
    /// running): what status, sentinel, verify, copy and cutover read and write.
    pub fn open_in_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("state.db");
        if !path.exists() {
            anyhow::bail!(
                "{} has no state.db: give the --dir of the migration",
                dir.display()
            );
        }
        Self::open(&path)
    }

    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the state database {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            anyhow::bail!(
                "{} was written by a newer pgtide (state schema {version}, this one knows {SCHEMA_VERSION}); use that pgtide or a new --dir",
                path.display()
            );
        }
        if version < 1 {
            conn.execute_batch(SCHEMA_V1)
                .context("cannot create the state database schema")?;
        }
        // Added without a version bump: created wherever it is missing.
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS apply_samples (at REAL NOT NULL, pid INTEGER NOT NULL, changes INTEGER NOT NULL, transactions INTEGER NOT NULL, lsn INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS follow_process (id INTEGER PRIMARY KEY CHECK (id = 1), pid INTEGER NOT NULL, started_at REAL NOT NULL, heartbeat_at REAL NOT NULL, stopped_at REAL, last_error TEXT);
             CREATE TABLE IF NOT EXISTS table_sync (table_name TEXT PRIMARY KEY, kind TEXT NOT NULL, stage TEXT NOT NULL, lsn TEXT, generation INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS target_settings (name TEXT PRIMARY KEY, auto_conf TEXT, value_before TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS server_databases (name TEXT PRIMARY KEY, source_oid INTEGER NOT NULL, bytes INTEGER NOT NULL, subdir TEXT NOT NULL, slot TEXT NOT NULL, created_on_target INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE IF NOT EXISTS history (at REAL PRIMARY KEY, phase TEXT NOT NULL, lag_bytes INTEGER, lag_seconds REAL, apply_changes_per_second REAL, retained_wal_bytes INTEGER, wal_limit_bytes INTEGER, spool_bytes INTEGER, bytes_copied INTEGER NOT NULL, bytes_total INTEGER NOT NULL);",
        )
        .context("cannot create the state database schema")?;
        let has_replica_identity: bool = conn.query_row(
            "SELECT count(*) > 0 FROM pragma_table_info('indexes') WHERE name = 'replica_identity'",
            [],
            |r| r.get(0),
        )?;
        if !has_replica_identity {
            conn.execute_batch(
                "ALTER TABLE indexes ADD COLUMN replica_identity INTEGER NOT NULL DEFAULT 0",
            )
            .context("cannot add indexes.replica_identity to the state database")?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(StateDb {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("state database lock poisoned"))?;
        f(&conn).context("state database error")
    }

    fn get_meta(&self, key: &str) -> Result<Option<String>> {
        self.with(|c| meta_get(c, key))
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.with(|c| meta_set(c, key, value))
    }

    fn delete_meta(&self, key: &str) -> Result<()> {
        self.with(|c| meta_delete(c, key))
    }

    /// A meta value parsed; an unreadable one is an error naming the key.
    fn get_parsed<T>(&self, key: &str) -> Result<Option<T>>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        self.get_meta(key)?
            .map(|text| {
                text.parse::<T>()
                    .map_err(|e| anyhow!("state.db holds an unreadable {key} \"{text}\": {e}"))
            })
            .transpose()
    }

    /// A meta value holding JSON; an unreadable one is an error naming the key.
    fn get_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.get_meta(key)?
            .map(|json| {
                serde_json::from_str(&json)
                    .with_context(|| format!("state.db holds an unreadable {key}"))
            })
            .transpose()
    }

    /// Several meta writes in one SQLite transaction: a crash leaves all or none of them.
    fn write_meta(&self, write: impl FnOnce(&Connection) -> rusqlite::Result<()>) -> Result<()> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            write(&tx)?;
            tx.commit()
        })
    }

    /// Records the work dir's stream (`stream setup`, `clone --follow`, an adopted slot) in
    /// one transaction; a field that is None is removed, so nothing of an earlier stream stays.
    pub fn record_stream(&self, stream: &StreamRecord) -> Result<()> {
        let tables = stream
            .tables
            .as_ref()
            .map(serde_json::to_string)
            .transpose()?;
        let publications = stream
            .publications
            .as_ref()
            .map(serde_json::to_string)
            .transpose()?;
        let startpos = stream.startpos.map(|l| l.to_string());
        let fields: [(&str, Option<&str>); 8] = [
            (key::STREAM_SLOT, Some(&stream.slot)),
            (key::STREAM_PLUGIN, Some(stream.plugin.name())),
            (
                key::STREAM_WAL2JSON_NAN_AS_NULL,
                stream.wal2json_nan_as_null.then_some("accepted"),
            ),
            (key::STREAM_STARTPOS, startpos.as_deref()),
            (key::STREAM_SOURCE_URI, stream.source_uri.as_deref()),
            (key::STREAM_TABLES, tables.as_deref()),
            (key::STREAM_PUBLICATIONS, publications.as_deref()),
            (key::STREAM_SYSTEM_ID, stream.system_id.as_deref()),
        ];
        self.write_meta(|c| {
            for (key, value) in fields {
                match value {
                    Some(value) => meta_set(c, key, value)?,
                    None => meta_delete(c, key)?,
                }
            }
            Ok(())
        })
    }

    /// The work dir's stream, None when it has none (never set up, or cleaned up).
    pub fn stream(&self) -> Result<Option<StreamRecord>> {
        let Some(slot) = self.stream_slot()? else {
            return Ok(None);
        };
        Ok(Some(StreamRecord {
            slot,
            plugin: self.stream_plugin()?,
            wal2json_nan_as_null: self.wal2json_nan_as_null()?,
            startpos: self.get_parsed(key::STREAM_STARTPOS)?,
            source_uri: self.get_meta(key::STREAM_SOURCE_URI)?,
            tables: self.get_json(key::STREAM_TABLES)?,
            publications: self.get_json(key::STREAM_PUBLICATIONS)?,
            system_id: self.get_meta(key::STREAM_SYSTEM_ID)?,
        }))
    }

    /// The slot of the work dir's stream, if it has one.
    pub fn stream_slot(&self) -> Result<Option<String>> {
        self.get_meta(key::STREAM_SLOT)
    }

    /// The published tables, found later for an adopted slot (`stream receive`).
    pub fn record_stream_tables(&self, tables: &[(String, String)]) -> Result<()> {
        self.set_meta(key::STREAM_TABLES, &serde_json::to_string(tables)?)
    }

    /// Forgets the whole stream record (the slot was dropped): a later `stream setup` starts
    /// from nothing.
    pub fn forget_stream(&self) -> Result<()> {
        self.write_meta(|c| {
            key::STREAM_RECORD
                .iter()
                .try_for_each(|k| meta_delete(c, k))
        })
    }

    /// The receiver's positions, recorded about every second and when it stops.
    pub fn record_stream_positions(&self, received: Lsn, flushed: Lsn) -> Result<()> {
        self.write_meta(|c| {
            meta_set(c, key::STREAM_RECEIVED_LSN, &received.to_string())?;
            meta_set(c, key::STREAM_FLUSHED_LSN, &flushed.to_string())
        })
    }

    /// The receiver's positions as last recorded.
    pub fn stream_positions(&self) -> Result<StreamPositions> {
        Ok(StreamPositions {
            received: self.get_parsed(key::STREAM_RECEIVED_LSN)?,
            flushed: self.get_parsed(key::STREAM_FLUSHED_LSN)?,
        })
    }

    /// Records the tables copied again under a later snapshot, with that snapshot's LSN
    /// (before their target rows are removed, so a crash in between only resyncs again).
    pub fn record_resync_positions(&self, positions: &ResyncPositions) -> Result<()> {
        let text: std::collections::HashMap<&str, String> = positions
            .iter()
            .map(|(table, lsn)| (table.as_str(), lsn.to_string()))
            .collect();
        self.set_meta(key::STREAM_RESYNCED, &serde_json::to_string(&text)?)
    }

    /// The per-table resync LSNs (empty when every table was copied under the slot's own
    /// snapshot).
    pub fn resync_positions(&self) -> Result<ResyncPositions> {
        let text: std::collections::HashMap<String, String> =
            self.get_json(key::STREAM_RESYNCED)?.unwrap_or_default();
        text.into_iter()
            .map(|(table, lsn)| {
                lsn.parse().map(|lsn| (table, lsn)).map_err(|e: String| {
                    anyhow!("state.db holds an unreadable {}: {e}", key::STREAM_RESYNCED)
                })
            })
            .collect()
    }

    /// The sentinel as recorded.
    pub fn sentinel(&self) -> Result<Sentinel> {
        Ok(Sentinel {
            endpos: self.endpos()?,
            apply: self.get_meta(key::SENTINEL_APPLY)?.as_deref() == Some("on"),
            reached_endpos: self.get_parsed(key::SENTINEL_REACHED_ENDPOS)?,
            applied_lsn: self.get_parsed(key::SENTINEL_APPLIED_LSN)?,
        })
    }

    /// The endpos apply stops at, if one is pinned (follow re-reads it every half second).
    pub fn endpos(&self) -> Result<Option<Lsn>> {
        self.get_parsed(key::SENTINEL_ENDPOS)
    }

    /// Pins endpos (the caller checked it is not behind what the target applied).
    pub fn set_endpos(&self, endpos: Lsn) -> Result<()> {
        self.set_meta(key::SENTINEL_ENDPOS, &endpos.to_string())
    }

    /// Clears endpos: a follow keeps following until one is set again.
    pub fn clear_endpos(&self) -> Result<()> {
        self.delete_meta(key::SENTINEL_ENDPOS)
    }

    /// Switches apply on (`sentinel set apply`, and every follow that applies).
    pub fn switch_apply_on(&self) -> Result<()> {
        self.set_meta(key::SENTINEL_APPLY, "on")
    }

    /// A follow applied everything up to `endpos` and stopped there (cutover waits for it).
    pub fn record_reached_endpos(&self, endpos: Lsn) -> Result<()> {
        self.set_meta(key::SENTINEL_REACHED_ENDPOS, &endpos.to_string())
    }

    /// Every table sync record and the generation they are at, read together.
    pub fn table_syncs(&self) -> Result<(u64, Vec<TableSync>)> {
        let (generation, rows) = self.with(|c| {
            // One read transaction: the rows and their generation from the same commit.
            let tx = c.unchecked_transaction()?;
            let c = &*tx;
            let generation = meta_get(c, key::TABLE_SYNC_GENERATION)?;
            let mut stmt = c.prepare(
                "SELECT table_name, kind, stage, lsn, generation FROM table_sync ORDER BY table_name",
            )?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((generation, rows))
        })?;
        let generation = parse_generation(generation)?;
        let syncs = rows
            .into_iter()
            .map(|(table, kind, stage, lsn, generation)| {
                let unreadable =
                    || anyhow!("state.db holds an unreadable table_sync row for {table}");
                let kind = SyncKind::parse(&kind).ok_or_else(unreadable)?;
                let lsn: Option<Lsn> = lsn
                    .map(|l| l.parse().map_err(|e: String| anyhow!("{e}")))
                    .transpose()
                    .map_err(|_| unreadable())?;
                let stage = match (stage.as_str(), lsn) {
                    ("pending", _) => SyncStage::Pending,
                    ("copying", Some(l)) => SyncStage::CopyingAt(l),
                    ("done", Some(l)) => SyncStage::Done(l),
                    _ => return Err(unreadable()),
                };
                Ok(TableSync {
                    table,
                    kind,
                    stage,
                    generation: generation as u64,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((generation, syncs))
    }

    /// The generation of the table sync records (0 when none was ever written).
    pub fn table_sync_generation(&self) -> Result<u64> {
        parse_generation(self.get_meta(key::TABLE_SYNC_GENERATION)?)
    }

    /// Records a table's sync state under a new generation, returned.
    pub fn record_table_sync(&self, table: &str, kind: SyncKind, stage: SyncStage) -> Result<u64> {
        self.write_table_sync(|c, generation| upsert_table_sync(c, table, kind, stage, generation))
    }

    /// Forgets a table's sync record (a request given up before anything was done).
    pub fn cancel_table_sync(&self, table: &str) -> Result<u64> {
        self.write_table_sync(|c, _| {
            c.execute(
                "DELETE FROM table_sync WHERE table_name = ?1",
                params![table],
            )
            .map(|_| ())
        })
    }

    /// Records the end of a table sync with what the migration follows from now on: the stage
    /// (`Done`), the filters and the stream's tables, in one SQLite transaction.
    pub fn finish_table_sync(
        &self,
        table: &str,
        kind: SyncKind,
        stage: SyncStage,
        followed: &FollowedTables<'_>,
    ) -> Result<u64> {
        let filters = serde_json::to_string(followed.filters)?;
        let tables = serde_json::to_string(followed.stream_tables)?;
        self.write_table_sync(|c, generation| {
            upsert_table_sync(c, table, kind, stage, generation)?;
            meta_set(c, key::MIGRATION_FILTERS, &filters)?;
            meta_set(c, key::STREAM_TABLES, &tables)
        })
    }

    /// Apply has loaded the table sync records of this generation.
    pub fn record_table_sync_seen(&self, generation: u64) -> Result<()> {
        self.set_meta(key::TABLE_SYNC_SEEN, &generation.to_string())
    }

    /// The generation the running apply last acknowledged.
    pub fn table_sync_seen(&self) -> Result<u64> {
        parse_generation(self.get_meta(key::TABLE_SYNC_SEEN)?)
    }

    /// Bumps the generation and runs `write` with it, in one SQLite transaction; returns the
    /// new generation.
    fn write_table_sync(
        &self,
        write: impl FnOnce(&Connection, u64) -> rusqlite::Result<()>,
    ) -> Result<u64> {
        self.with(|c| {
            // IMMEDIATE: the write lock is taken (waiting under busy_timeout) before the
            // generation is read. A deferred transaction that reads, then writes, fails at
            // once with SQLITE_BUSY when another connection (apply, the heartbeat) wrote
            // in between.
            let tx =
                rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)?;
            let generation = meta_get(&tx, key::TABLE_SYNC_GENERATION)?
                .and_then(|g| g.parse::<u64>().ok())
                .unwrap_or_default()
                + 1;
            meta_set(&tx, key::TABLE_SYNC_GENERATION, &generation.to_string())?;
            write(&tx, generation)?;
            tx.commit()?;
            Ok(generation)
        })
    }

    /// Records the migration's filters (invariant 9): every later stage reads them back with
    /// `recorded_filters`.
    pub fn record_filters(&self, filters: &crate::clone::filters::Filters) -> Result<()> {
        self.set_meta(key::MIGRATION_FILTERS, &serde_json::to_string(filters)?)
    }

    /// The DDL capture installed on the source for this work dir's stream.
    pub fn record_ddl_capture(
        &self,
        capture: Option<&crate::replication::ddl_capture::Capture>,
    ) -> Result<()> {
        match capture {
            Some(capture) => self.set_meta(key::DDL_CAPTURE, &serde_json::to_string(capture)?),
            None => self.delete_meta(key::DDL_CAPTURE),
        }
    }

    /// The DDL capture of this work dir's stream (None: not installed, --no-ddl-capture).
    pub fn ddl_capture(&self) -> Result<Option<crate::replication::ddl_capture::Capture>> {
        self.get_json(key::DDL_CAPTURE)
    }

    /// Records (or clears) the schema change apply stopped on.
    pub fn record_ddl_stop(&self, stop: Option<&DdlStop>) -> Result<()> {
        match stop {
            Some(stop) => self.set_meta(key::DDL_STOPPED, &serde_json::to_string(stop)?),
            None => self.delete_meta(key::DDL_STOPPED),
        }
    }

    /// The schema change apply last stopped on, if it has not been decided since.
    pub fn ddl_stop(&self) -> Result<Option<DdlStop>> {
        self.get_json(key::DDL_STOPPED)
    }

    /// Records the operator's decision for a schema change and clears the stop.
    pub fn decide_ddl(&self, id: DdlId, decision: DdlDecision) -> Result<()> {
        let mut decisions = self.ddl_decisions()?;
        decisions.retain(|(d, _)| *d != id);
        decisions.push((id, decision));
        self.set_meta(key::DDL_DECISIONS, &serde_json::to_string(&decisions)?)?;
        self.record_ddl_stop(None)
    }

    /// Every decision the operator took on schema changes.
    pub fn ddl_decisions(&self) -> Result<Vec<(DdlId, DdlDecision)>> {
        Ok(self.get_json(key::DDL_DECISIONS)?.unwrap_or_default())
    }

    /// The filters the migration recorded when it started; None for a work dir that has none
    /// recorded (it was started by an older pgtide, or nothing started yet).
    pub fn recorded_filters(&self) -> Result<Option<crate::clone::filters::Filters>> {
        match self.get_meta(key::MIGRATION_FILTERS)? {
            Some(json) => Ok(Some(serde_json::from_str(&json).context(
                "the filters recorded in state.db cannot be read: use the pgtide that started this migration",
            )?)),
            None => Ok(None),
        }
    }

    /// The recorded output plugin; pgoutput for a work dir that recorded none (an earlier
    /// pgtide only streamed pgoutput into apply).
    pub fn stream_plugin(&self) -> Result<crate::replication::Plugin> {
        match self.get_meta(key::STREAM_PLUGIN)? {
            Some(name) => crate::replication::Plugin::parse(&name)
                .context("the plugin recorded in state.db is unknown: use the pgtide that started this migration"),
            None => Ok(crate::replication::Plugin::Pgoutput),
        }
    }

    /// Records that the operator accepted (`--wal2json-nan-as-null`) that wal2json turns NaN /
    /// ±Infinity of nullable numeric and float columns into NULL: apply checks it before it
    /// applies a wal2json stream.
    pub fn record_wal2json_nan_as_null(&self) -> Result<()> {
        self.set_meta(key::STREAM_WAL2JSON_NAN_AS_NULL, "accepted")
    }

    /// Whether `--wal2json-nan-as-null` was accepted for this work dir.
    pub fn wal2json_nan_as_null(&self) -> Result<bool> {
        Ok(self.get_meta(key::STREAM_WAL2JSON_NAN_AS_NULL)?.is_some())
    }

    /// The number of apply lanes (`--apply-jobs`): every later follow of this work dir (a
    /// restart, a cutover's follow) applies with as many.
    pub fn record_apply_jobs(&self, jobs: usize) -> Result<()> {
        self.set_meta(key::APPLY_JOBS, &jobs.to_string())
    }

    /// The recorded number of apply lanes, if one was given.
    pub fn apply_jobs(&self) -> Result<Option<usize>> {
        Ok(self.get_meta(key::APPLY_JOBS)?.and_then(|v| v.parse().ok()))
    }

    /// The offset the target's sequences were set with (`--sequence-offset`, `--offset`).
    pub fn record_sequence_offset(&self, offset: i64) -> Result<()> {
        self.set_meta(key::MIGRATION_SEQUENCE_OFFSET, &offset.to_string())
    }

    /// The recorded sequence offset (0 when none was recorded).
    pub fn sequence_offset(&self) -> Result<i64> {
        Ok(self
            .get_meta(key::MIGRATION_SEQUENCE_OFFSET)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// `pgtide cleanup` removed everything the migration created on both servers.
    pub fn record_cleaned_up(&self) -> Result<()> {
        self.set_meta(key::MIGRATION_STATUS, key::MIGRATION_CLEANED_UP)
    }

    /// Records the target settings `--fast-restore` is about to change, as they are before
    /// it: a setting already recorded keeps its first record (a resumed run must restore what
    /// the target had before the first one, not what an interrupted run left).
    pub fn record_target_settings(&self, server: &str, settings: &[SavedSetting]) -> Result<()> {
        self.set_meta(key::FAST_RESTORE_SERVER, server)?;
        self.with(|c| {
            for s in settings {
                c.execute(
                    "INSERT INTO target_settings (name, auto_conf, value_before) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO NOTHING",
                    params![s.name, s.auto_conf, s.value_before],
                )?;
            }
            Ok(())
        })
    }

    /// The target settings recorded before `--fast-restore` changed them (empty: none are
    /// changed, or they were restored).
    pub fn saved_target_settings(&self) -> Result<Vec<SavedSetting>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT name, auto_conf, value_before FROM target_settings ORDER BY name",
            )?;
            stmt.query_map([], |r| {
                Ok(SavedSetting {
                    name: r.get(0)?,
                    auto_conf: r.get(1)?,
                    value_before: r.get(2)?,
                })
            })?
            .collect()
        })
    }

    /// The target server whose settings are recorded (its system identifier).
    pub fn target_settings_server(&self) -> Result<Option<String>> {
        self.get_meta(key::FAST_RESTORE_SERVER)
    }

    /// Forgets the recorded target settings once they are restored.
    pub fn forget_target_settings(&self) -> Result<()> {
        self.with(|c| c.execute("DELETE FROM target_settings", []).map(|_| ()))?;
        self.delete_meta(key::FAST_RESTORE_SERVER)
    }

    /// Records the databases of a whole-server migration, once, when it starts: a resume
    /// continues exactly these, whatever was created or dropped on the source since.
    pub fn record_server_databases(&self, databases: &[ServerDatabase]) -> Result<()> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            for d in databases {
                tx.execute(
                    "INSERT INTO server_databases (name, source_oid, bytes, subdir, slot, created_on_target)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (name) DO NOTHING",
                    params![d.name, d.source_oid, d.bytes, d.subdir, d.slot, d.created_on_target],
                )?;
            }
            tx.commit()
        })
    }

    /// The databases of a whole-server migration, largest first (empty: a one-database work dir).
    pub fn server_databases(&self) -> Result<Vec<ServerDatabase>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT name, source_oid, bytes, subdir, slot, created_on_target FROM server_databases ORDER BY bytes DESC, name",
            )?;
            stmt.query_map([], |r| {
                Ok(ServerDatabase {
                    name: r.get(0)?,
                    source_oid: r.get(1)?,
                    bytes: r.get(2)?,
                    subdir: r.get(3)?,
                    slot: r.get(4)?,
                    created_on_target: r.get(5)?,
                })
            })?
            .collect()
        })
    }

    /// The roles a whole-server migration leaves out (`--exclude-role`): verify does not
    /// report them missing.
    pub fn record_excluded_roles(&self, roles: &[String]) -> Result<()> {
        self.set_meta(key::SERVER_EXCLUDED_ROLES, &serde_json::to_string(roles)?)
    }

    /// See `record_excluded_roles`.
    pub fn excluded_roles(&self) -> Result<Vec<String>> {
        Ok(self
            .get_json(key::SERVER_EXCLUDED_ROLES)?
            .unwrap_or_default())
    }

    /// pgtide created this database on the target.
    pub fn record_database_created(&self, name: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE server_databases SET created_on_target = 1 WHERE name = ?1",
                params![name],
            )
            .map(|_| ())
        })
    }

    /// Whether `pgtide cleanup` ran for this work dir.
    pub fn cleaned_up(&self) -> Result<bool> {
        Ok(self.get_meta(key::MIGRATION_STATUS)?.as_deref() == Some(key::MIGRATION_CLEANED_UP))
    }

    /// Where the work dir's clone stands.
    pub fn set_clone_status(&self, status: CloneStatus) -> Result<()> {
        self.set_meta(key::CLONE_STATUS, status.as_str())
    }

    /// Where the work dir's clone stands; None before one started.
    pub fn clone_status(&self) -> Result<Option<CloneStatus>> {
        match self.get_meta(key::CLONE_STATUS)?.as_deref() {
            None => Ok(None),
            Some("running") => Ok(Some(CloneStatus::Running)),
            Some("done") => Ok(Some(CloneStatus::Done)),
            Some(other) => bail!(
                "state.db holds an unknown clone status \"{other}\": use the pgtide that started this migration"
            ),
        }
    }

    /// The running clone's live counters.
    pub fn record_clone_progress(&self, progress: CloneProgress) -> Result<()> {
        self.write_meta(|c| {
            meta_set(
                c,
                key::CLONE_BYTES_COPIED,
                &progress.bytes_copied.to_string(),
            )?;
            meta_set(c, key::CLONE_ROWS_COPIED, &progress.rows_copied.to_string())
        })
    }

    /// The clone's live counters as last recorded (0 before any).
    pub fn clone_progress(&self) -> Result<CloneProgress> {
        Ok(CloneProgress {
            bytes_copied: self.get_parsed(key::CLONE_BYTES_COPIED)?.unwrap_or(0),
            rows_copied: self.get_parsed(key::CLONE_ROWS_COPIED)?.unwrap_or(0),
        })
    }

    /// The snapshot the clone copies under (for the operator reading state.db).
    pub fn record_snapshot_name(&self, name: &str) -> Result<()> {
        self.set_meta(key::SNAPSHOT, name)
    }

    /// The spool's size on disk, after each group commit.
    pub fn record_spool_bytes(&self, bytes: u64) -> Result<()> {
        self.set_meta(key::SPOOL_BYTES, &bytes.to_string())
    }

    /// Ties the work dir to a server: its identity and redacted connection string, together.
    pub fn record_server_identity(
        &self,
        side: crate::pg::Side,
        server: &ServerIdentity,
    ) -> Result<()> {
        self.write_meta(|c| {
            meta_set(c, key::identity(side), &server.identity)?;
            match &server.uri {
                Some(uri) => meta_set(c, key::uri(side), uri),
                None => meta_delete(c, key::uri(side)),
            }
        })
    }

    /// The server the work dir is tied to on `side`, if any yet.
    pub fn server_identity(&self, side: crate::pg::Side) -> Result<Option<ServerIdentity>> {
        let Some(identity) = self.get_meta(key::identity(side))? else {
            return Ok(None);
        };
        Ok(Some(ServerIdentity {
            identity,
            uri: self.get_meta(key::uri(side))?,
        }))
    }

    /// The redacted connection string recorded for `side` (by clone), if any.
    pub fn server_uri(&self, side: crate::pg::Side) -> Result<Option<String>> {
        self.get_meta(key::uri(side))
    }

    /// Records the fence before it is put in force, so that it can always be lifted.
    pub fn record_fence(&self, fenced: &[FencedRole]) -> Result<()> {
        self.set_meta(key::CUTOVER_FENCE, &serde_json::to_string(fenced)?)
    }

    /// The fence in force, if any.
    pub fn fence(&self) -> Result<Option<Vec<FencedRole>>> {
        self.get_json(key::CUTOVER_FENCE)
    }

    /// The fence was lifted.
    pub fn forget_fence(&self) -> Result<()> {
        self.delete_meta(key::CUTOVER_FENCE)
    }

    /// Records that this (reverse) stream must skip the target's transactions applied by the
    /// forward apply under `origin` or one of its lanes (`<origin>_<n>`): they came from the
    /// source and must not be echoed back to it.
    pub fn record_echo_origin(&self, origin: &str) -> Result<()> {
        self.set_meta(key::REVERSE_ECHO_ORIGIN, origin)
    }

    /// The forward apply's origin this stream skips, if it is a reverse stream.
    pub fn echo_origin(&self) -> Result<Option<String>> {
        self.get_meta(key::REVERSE_ECHO_ORIGIN)
    }

    /// A rollback completed: the reverse stream reached its endpos and the source's fence was
    /// lifted.
    pub fn record_rolled_back(&self, record: &CompletedSwitch) -> Result<()> {
        self.set_meta(key::REVERSE_ROLLED_BACK, &serde_json::to_string(record)?)
    }

    /// The switch-over completed: the application may be on the other side now.
    pub fn record_completed_switch(&self, record: &CompletedSwitch) -> Result<()> {
        self.set_meta(key::CUTOVER_COMPLETED, &serde_json::to_string(record)?)
    }

    /// The completed switch-over, if any (until its fence is lifted with --unfence).
    pub fn completed_switch(&self) -> Result<Option<CompletedSwitch>> {
        self.get_json(key::CUTOVER_COMPLETED)
    }

    /// The fence of a completed switch-over was lifted: the application stays where it was,
    /// and a later cutover switches again.
    pub fn forget_completed_switch(&self) -> Result<()> {
        self.delete_meta(key::CUTOVER_COMPLETED)
    }

    /// The completed rollback, if any.
    pub fn rolled_back(&self) -> Result<Option<CompletedSwitch>> {
        self.get_json(key::REVERSE_ROLLED_BACK)
    }

    /// Apply's latest applied position (recorded every second while apply runs).
    pub fn record_applied_lsn(&self, lsn: Lsn) -> Result<()> {
        self.set_meta(key::APPLY_APPLIED_LSN, &lsn.to_string())
    }

    /// Apply's position durable on the target (recorded every second while apply runs).
    pub fn record_durable_lsn(&self, lsn: Lsn) -> Result<()> {
        self.set_meta(key::APPLY_DURABLE_LSN, &lsn.to_string())
    }

    /// Apply's position durable on the target as last recorded.
    pub fn durable_lsn(&self) -> Result<Option<Lsn>> {
        self.get_parsed(key::APPLY_DURABLE_LSN)
    }

    /// The position apply stopped at when it reached endpos.
    pub fn record_applied_at_endpos(&self, lsn: Lsn) -> Result<()> {
        self.set_meta(key::SENTINEL_APPLIED_LSN, &lsn.to_string())
    }

    /// The furthest position the target is known to have applied, if any.
    pub fn applied_lsn(&self) -> Result<Option<Lsn>> {
        let mut best: Option<Lsn> = None;
        for key in [key::APPLY_DURABLE_LSN, key::SENTINEL_APPLIED_LSN] {
            if let Some(lsn) = self.get_meta(key)?.and_then(|v| v.parse::<Lsn>().ok()) {
                best = Some(best.map_or(lsn, |b| b.max(lsn)));
            }
        }
        Ok(best.filter(|l| l.0 > 0))
    }

    /// The phase of the migration for `pgtide status`, with the time it began (kept when the
    /// phase does not change).
    pub fn set_phase(&self, phase: Phase) -> Result<()> {
        self.with(|c| {
            if meta_get(c, key::PHASE)?.as_deref() == Some(phase.as_str()) {
                return Ok(());
            }
            let tx = c.unchecked_transaction()?;
            meta_set(&tx, key::PHASE, phase.as_str())?;
            meta_set(&tx, key::PHASE_SINCE, &format!("{:.3}", now()))?;
            meta_delete(&tx, key::PHASE_ERROR)?;
            tx.commit()
        })
    }

    /// The migration stopped on an error: status shows it until the next run changes phase.
    pub fn set_failed(&self, error: &str) -> Result<()> {
        self.set_phase(Phase::Failed)?;
        self.set_meta(key::PHASE_ERROR, error)
    }

    /// The phase as recorded (`NotStarted` before any), when it began, and its error.
    pub fn phase(&self) -> Result<PhaseRecord> {
        let phase = match self.get_meta(key::PHASE)? {
            None => Phase::NotStarted,
            Some(text) => Phase::parse(&text).ok_or_else(|| {
                anyhow!("state.db holds an unknown phase \"{text}\": use the pgtide that started this migration")
            })?,
        };
        Ok(PhaseRecord {
            phase,
            since: self.get_parsed(key::PHASE_SINCE)?,
            error: self.get_meta(key::PHASE_ERROR)?,
        })
    }

    /// The error the migration last stopped on (`set_failed`), while its phase is `failed`.
    pub fn failure(&self) -> Result<Option<String>> {
        if self.get_meta(key::PHASE)?.as_deref() != Some(Phase::Failed.as_str()) {
            return Ok(None);
        }
        self.get_meta(key::PHASE_ERROR)
    }

    /// A follow process starts applying (or spooling for) this work dir.
    pub fn follow_started(&self, pid: u32) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO follow_process (id, pid, started_at, heartbeat_at) VALUES (1, ?1, ?2, ?2)
                 ON CONFLICT(id) DO UPDATE SET pid = ?1, started_at = ?2, heartbeat_at = ?2, stopped_at = NULL, last_error = NULL",
                params![pid, now()],
            )
            .map(|_| ())
        })
    }

    /// The follow process `pid` is alive.
    pub fn follow_heartbeat(&self, pid: u32) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE follow_process SET heartbeat_at = ?2 WHERE pid = ?1 AND stopped_at IS NULL",
                params![pid, now()],
            )
            .map(|_| ())
        })
    }

    /// The follow process `pid` stopped, on `error` or (None) at endpos.
    pub fn follow_stopped(&self, pid: u32, error: Option<&str>) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE follow_process SET stopped_at = ?2, last_error = ?3 WHERE pid = ?1",
                params![pid, now(), error],
            )
            .map(|_| ())
        })
    }

    /// The latest follow process's liveness record, if one ever ran here.
    pub fn follow_liveness(&self) -> Result<Option<FollowLiveness>> {
        self.with(|c| {
            c.query_row(
                "SELECT pid, heartbeat_at, stopped_at, last_error FROM follow_process WHERE id = 1",
                [],
                |r| {
                    Ok(FollowLiveness {
                        pid: r.get(0)?,
                        heartbeat_at: r.get(1)?,
                        stopped_at: r.get(2)?,
                        last_error: r.get(3)?,
                    })
                },
            )
            .optional()
        })
    }

    /// Empties every table: used when the operator starts over in the same work dir.
    pub fn reset(&self) -> Result<()> {
        self.with(|c| {
            c.execute_batch(
                "DELETE FROM meta; DELETE FROM steps; DELETE FROM tables; DELETE FROM parts;
                 DELETE FROM indexes; DELETE FROM sequences; DELETE FROM large_objects;
                 DELETE FROM constraints; DELETE FROM follow_process; DELETE FROM table_sync;",
            )
        })
    }

    /// Where a clone step stands, None before it first started.
    pub fn step_status(&self, step: Step) -> Result<Option<StepStatus>> {
        let text: Option<String> = self.with(|c| {
            c.query_row(
                "SELECT status FROM steps WHERE name = ?1",
                [step.as_str()],
                |r| r.get(0),
            )
            .optional()
        })?;
        text.map(|text| {
            StepStatus::parse(&text).ok_or_else(|| {
                anyhow!("state.db holds an unknown status \"{text}\" for step {step}")
            })
        })
        .transpose()
    }

    /// Whether a clone step is done (`--resume` skips it).
    pub fn step_is_done(&self, step: Step) -> Result<bool> {
        Ok(self.step_status(step)? == Some(StepStatus::Done))
    }

    /// A clone step starts (again).
    pub fn step_started(&self, step: Step) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO steps(name, status, started_at, attempts) VALUES (?1, 'running', ?2, 1)
                 ON CONFLICT(name) DO UPDATE SET status = 'running', started_at = ?2, done_at = NULL,
                 error = NULL, attempts = attempts + 1",
                params![step.as_str(), now()],
            )
            .map(|_| ())
        })
    }

    /// A clone step's work is committed on the target.
    pub fn step_done(&self, step: Step) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE steps SET status = 'done', done_at = ?2 WHERE name = ?1",
                params![step.as_str(), now()],
            )
            .map(|_| ())
        })
    }

    /// A clone step stopped on `error`.
    pub fn step_failed(&self, step: Step, error: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE steps SET status = 'failed', done_at = ?2, error = ?3 WHERE name = ?1",
                params![step.as_str(), now(), error],
            )
            .map(|_| ())
        })
    }

    /// Every step in the order they started, for the clone summary.
    pub fn steps(&self) -> Result<Vec<StepRecord>> {
        let rows: Vec<(String, String, Option<f64>)> = self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT name, status, done_at - started_at FROM steps ORDER BY started_at",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })?;
        rows.into_iter()
            .map(|(name, status, seconds)| {
                let step = Step::parse(&name)
                    .ok_or_else(|| anyhow!("state.db holds an unknown step \"{name}\""))?;
                let status = StepStatus::parse(&status).ok_or_else(|| {
                    anyhow!("state.db holds an unknown status \"{status}\" for step {step}")
                })?;
                Ok(StepRecord {
                    step,
                    status,
                    seconds,
                })
            })
            .collect()
    }

    /// Whether the catalog read under the snapshot is stored (its step is done).
    pub fn has_catalog(&self) -> Result<bool> {
        self.step_is_done(Step::Catalog)
    }

    /// Stores the catalog in one SQLite transaction, so a crash never leaves half of it.
    pub fn save_catalog(&self, catalog: &crate::pg::catalog::Catalog) -> Result<()> {
        let crate::pg::catalog::Catalog {
            tables,
            parts,
            indexes,
            sequences,
            large_objects,
            constraints,
        } = catalog;
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("state database lock poisoned"))?;
        let tx = conn.transaction()?;
        tx.execute_batch(
            "DELETE FROM tables; DELETE FROM parts; DELETE FROM indexes; DELETE FROM sequences; DELETE FROM large_objects; DELETE FROM constraints;",
        )?;
        for k in constraints {
            tx.execute(
                "INSERT INTO constraints VALUES (?1, ?2, ?3, ?4, ?5)",
                params![k.oid, k.table_oid, k.name, k.kind, k.definition],
            )?;
        }
        for t in tables {
            tx.execute(
                "INSERT INTO tables VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, NULL)",
                params![
                    t.oid,
                    t.schema,
                    t.name,
                    t.heap_bytes,
                    t.toast_bytes,
                    t.pages,
                    t.est_rows,
                    t.has_pk,
                    serde_json::to_string(&t.columns)?,
                    t.binary_copy,
                    t.copy_data
                ],
            )?;
        }
        for p in parts {
            tx.execute(
                "INSERT INTO parts(table_oid, part, nparts, first_page, end_page) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![p.table_oid, p.part, p.nparts, p.first_page, p.end_page],
            )?;
        }
        for i in indexes {
            let c = i.constraint.as_ref();
            tx.execute(
                "INSERT INTO indexes(oid, table_oid, schema_name, index_name, definition, constraint_oid,
                   constraint_name, constraint_type, constraint_def, is_deferrable, is_deferred,
                   replica_identity)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    i.oid,
                    i.table_oid,
                    i.schema,
                    i.name,
                    i.definition,
                    c.map(|c| c.oid),
                    c.map(|c| c.name.clone()),
                    c.map(|c| c.kind.clone()),
                    c.map(|c| c.definition.clone()),
                    c.is_some_and(|c| c.deferrable),
                    c.is_some_and(|c| c.deferred),
                    i.replica_identity
                ],
            )?;
        }
        for (n, s) in sequences.iter().enumerate() {
            tx.execute(
                "INSERT INTO sequences VALUES (?1, ?2, ?3, ?4, ?5)",
                params![n as i64, s.schema, s.name, s.last_value, s.is_called],
            )?;
        }
        for oid in large_objects {
            tx.execute("INSERT INTO large_objects VALUES (?1)", [oid])?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn tables(&self) -> Result<Vec<TableRow>> {
        self.tables_where("true")
    }

    pub fn tables_not_vacuumed(&self) -> Result<Vec<TableRow>> {
        self.tables_where("vacuumed_at IS NULL")
    }

    pub fn table_vacuumed(&self, oid: u32) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE tables SET vacuumed_at = ?2 WHERE oid = ?1",
                params![oid, now()],
            )
            .map(|_| ())
        })
    }

    fn tables_where(&self, condition: &str) -> Result<Vec<TableRow>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT oid, schema_name, table_name, heap_bytes, toast_bytes, pages, est_rows, has_pk,
                        columns_json, binary_copy, copy_data
                 FROM tables WHERE {condition} ORDER BY heap_bytes + toast_bytes DESC, oid"
            ))?;
            let rows = stmt.query_map([], |r| {
                let columns_json: String = r.get(8)?;
                Ok(TableRow {
                    oid: r.get(0)?,
                    schema: r.get(1)?,
                    name: r.get(2)?,
                    heap_bytes: r.get(3)?,
                    toast_bytes: r.get(4)?,
                    pages: r.get(5)?,
                    est_rows: r.get(6)?,
                    has_pk: r.get(7)?,
                    columns: serde_json::from_str(&columns_json).unwrap_or_default(),
                    binary_copy: r.get(9)?,
                    copy_data: r.get(10)?,
                })
            })?;
            rows.collect()
        })
    }

    pub fn parts(&self) -> Result<Vec<PartRow>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT table_oid, part, nparts, first_page, end_page, status FROM parts ORDER BY table_oid, part",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(PartRow {
                    table_oid: r.get(0)?,
                    part: r.get(1)?,
                    nparts: r.get(2)?,
                    first_page: r.get(3)?,
                    end_page: r.get(4)?,
                    status: r.get(5)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Bytes of a part streamed so far (replaced by the final figure when it is done).
    pub fn part_progress(&self, table_oid: u32, part: i64, bytes: u64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE parts SET bytes = ?3 WHERE table_oid = ?1 AND part = ?2 AND status = 'running'",
                params![table_oid, part, bytes as i64],
            )
            .map(|_| ())
        })
    }

    /// Bytes and rows of the parts already loaded.
    pub fn copied_so_far(&self) -> Result<(u64, u64)> {
        self.with(|c| {
            c.query_row(
                "SELECT coalesce(sum(bytes), 0), coalesce(sum(rows), 0) FROM parts WHERE status = 'done'",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
        })
    }

    /// One point of the migration's recorded time series (`observe/history.rs`).
    pub fn record_history(&self, p: &HistoryPoint) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO history (at, phase, lag_bytes, lag_seconds, apply_changes_per_second, retained_wal_bytes, wal_limit_bytes, spool_bytes, bytes_copied, bytes_total)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    p.at,
                    p.phase,
                    p.lag_bytes,
                    p.lag_seconds,
                    p.apply_changes_per_second,
                    p.retained_wal_bytes,
                    p.wal_limit_bytes,
                    p.spool_bytes,
                    p.bytes_copied,
                    p.bytes_total
                ],
            )
            .map(|_| ())
        })
    }

    /// The recorded points at or after `since` (unix seconds), oldest first.
    pub fn history_since(&self, since: f64) -> Result<Vec<HistoryPoint>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT at, phase, lag_bytes, lag_seconds, apply_changes_per_second, retained_wal_bytes, wal_limit_bytes, spool_bytes, bytes_copied, bytes_total
                 FROM history WHERE at >= ?1 ORDER BY at",
            )?;
            let rows = stmt.query_map([since], |r| {
                Ok(HistoryPoint {
                    at: r.get(0)?,
                    phase: r.get(1)?,
                    lag_bytes: r.get(2)?,
                    lag_seconds: r.get(3)?,
                    apply_changes_per_second: r.get(4)?,
                    retained_wal_bytes: r.get(5)?,
                    wal_limit_bytes: r.get(6)?,
                    spool_bytes: r.get(7)?,
                    bytes_copied: r.get(8)?,
                    bytes_total: r.get(9)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Keeps one point per `bucket` seconds (the first) among those older than `before`:
    /// the history stays bounded over weeks and detailed over the last hour.
    pub fn downsample_history(&self, before: f64, bucket: f64) -> Result<usize> {
        self.with(|c| {
            c.execute(
                "DELETE FROM history WHERE at < ?1 AND at NOT IN
                   (SELECT min(at) FROM history WHERE at < ?1 GROUP BY CAST(at / ?2 AS INTEGER))",
                params![before, bucket],
            )
        })
    }

    /// One apply progress sample (cumulative counters of process `pid`), for rates over the
    /// last minute; samples older than ten minutes are dropped.
    pub fn apply_sample(&self, pid: u32, changes: u64, transactions: u64, lsn: u64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO apply_samples (at, pid, changes, transactions, lsn) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![now(), pid, changes as i64, transactions as i64, lsn as i64],
            )?;
            c.execute(
                "DELETE FROM apply_samples WHERE at < ?1",
                params![now() - 600.0],
            )
            .map(|_| ())
        })
    }

    /// Changes/s, transactions/s and applied WAL bytes/s over the last `window` seconds of the
    /// newest apply process.
    pub fn apply_rates(&self, window: f64) -> Result<Option<ApplyRates>> {
        self.with(|c| {
            c.query_row(
                "WITH newest AS (SELECT pid FROM apply_samples ORDER BY at DESC LIMIT 1),
                      s AS (SELECT * FROM apply_samples WHERE pid = (SELECT pid FROM newest) AND at >= (SELECT max(at) FROM apply_samples) - ?1)
                 SELECT max(at) - min(at), max(changes) - min(changes), max(transactions) - min(transactions), max(lsn) - min(lsn) FROM s",
                params![window],
                |r| {
                    let span: Option<f64> = r.get(0)?;
                    Ok(match span {
                        Some(span) if span > 0.5 => Some(ApplyRates {
                            changes: r.get::<_, i64>(1)? as f64 / span,
                            transactions: r.get::<_, i64>(2)? as f64 / span,
                            wal_bytes: r.get::<_, i64>(3)? as f64 / span,
                        }),
                        _ => None,
                    })
                },
            )
        })
    }

    /// Parts being copied now, oldest first.
    pub fn parts_in_flight(&self) -> Result<Vec<PartInFlight>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT t.schema_name, t.table_name, p.part, p.nparts, coalesce(p.started_at, 0),
                        coalesce(p.bytes, 0), (t.heap_bytes + t.toast_bytes) / p.nparts
                 FROM parts p JOIN tables t ON t.oid = p.table_oid
                 WHERE p.status = 'running' ORDER BY p.started_at",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(PartInFlight {
                    schema: r.get(0)?,
                    table: r.get(1)?,
                    part: r.get(2)?,
                    nparts: r.get(3)?,
                    started_at: r.get(4)?,
                    bytes: r.get::<_, i64>(5)?.max(0) as u64,
                    expected_bytes: r.get::<_, i64>(6)?.max(0) as u64,
                })
            })?;
            rows.collect()
        })
    }

    /// When a step started (seconds since the epoch), if it did.
    pub fn step_started_at(&self, step: Step) -> Result<Option<f64>> {
        self.with(|c| {
            c.query_row(
                "SELECT started_at FROM steps WHERE name = ?1",
                [step.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map(Option::flatten)
        })
    }

    /// Every part of a table is to be copied again (a resync under a new snapshot).
    pub fn table_parts_pending(&self, table_oid: u32) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE parts SET status = 'pending' WHERE table_oid = ?1",
                params![table_oid],
            )
            .map(|_| ())
        })
    }

    pub fn part_started(&self, table_oid: u32, part: i64, snapshot: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE parts SET status = 'running', started_at = ?3, snapshot = ?4, attempts = attempts + 1
                 WHERE table_oid = ?1 AND part = ?2",
                params![table_oid, part, now(), snapshot],
            )
            .map(|_| ())
        })
    }

    pub fn part_done(&self, table_oid: u32, part: i64, rows: u64, bytes: u64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE parts SET status = 'done', done_at = ?3, rows = ?4, bytes = ?5
                 WHERE table_oid = ?1 AND part = ?2",
                params![table_oid, part, now(), rows as i64, bytes as i64],
            )
            .map(|_| ())
        })
    }

    /// Marks a part done that the target already holds (found on resume); keeps its counters.
    pub fn part_found_done(&self, table_oid: u32, part: i64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE parts SET status = 'done', done_at = coalesce(done_at, ?3) WHERE table_oid = ?1 AND part = ?2",
                params![table_oid, part, now()],
            )
            .map(|_| ())
        })
    }

    pub fn indexes(&self) -> Result<Vec<IndexRow>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT oid, table_oid, schema_name, index_name, definition, constraint_oid, constraint_name,
                        constraint_type, constraint_def, is_deferrable, is_deferred, status,
                        replica_identity
                 FROM indexes ORDER BY table_oid, oid",
            )?;
            let rows = stmt.query_map([], |r| {
                let constraint_oid: Option<u32> = r.get(5)?;
                let constraint = match constraint_oid {
                    Some(oid) => Some(ConstraintRow {
                        oid,
                        name: r.get(6)?,
                        kind: r.get(7)?,
                        definition: r.get(8)?,
                        deferrable: r.get(9)?,
                        deferred: r.get(10)?,
                    }),
                    None => None,
                };
                Ok(IndexRow {
                    oid: r.get(0)?,
                    table_oid: r.get(1)?,
                    schema: r.get(2)?,
                    name: r.get(3)?,
                    definition: r.get(4)?,
                    constraint,
                    replica_identity: r.get(12)?,
                    status: r.get(11)?,
                })
            })?;
            rows.collect()
        })
    }

    pub fn index_started(&self, oid: u32) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE indexes SET status = 'running', started_at = ?2, attempts = attempts + 1 WHERE oid = ?1",
                params![oid, now()],
            )
            .map(|_| ())
        })
    }

    pub fn index_done(&self, oid: u32) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE indexes SET status = 'done', done_at = ?2 WHERE oid = ?1",
                params![oid, now()],
            )
            .map(|_| ())
        })
    }

    pub fn sequences(&self) -> Result<Vec<SequenceRow>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT schema_name, seq_name, last_value, is_called FROM sequences ORDER BY oid",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(SequenceRow {
                    schema: r.get(0)?,
                    name: r.get(1)?,
                    last_value: r.get(2)?,
                    is_called: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    pub fn large_objects(&self) -> Result<Vec<u32>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT oid FROM large_objects ORDER BY oid")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        })
    }

    /// Per-table rows, bytes and wall time (first part start to last part end), for the summary.
    pub fn table_summary(&self) -> Result<Vec<TableSummary>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT t.schema_name || '.' || t.table_name, coalesce(sum(p.rows), 0), coalesce(sum(p.bytes), 0),
                        coalesce(max(p.done_at) - min(p.started_at), 0), count(p.part)
                 FROM tables t LEFT JOIN parts p ON p.table_oid = t.oid
                 GROUP BY t.oid ORDER BY t.heap_bytes + t.toast_bytes DESC, t.oid",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(TableSummary {
                    table: r.get(0)?,
                    rows: r.get(1)?,
                    bytes: r.get(2)?,
                    seconds: r.get(3)?,
                    parts: r.get(4)?,
                })
            })?;
            rows.collect()
        })
    }
}

fn parse_generation(text: Option<String>) -> Result<u64> {
    text.map(|g| {
        g.parse::<u64>()
            .map_err(|e| anyhow!("state.db holds an unreadable table sync generation \"{g}\": {e}"))
    })
    .transpose()
    .map(Option::unwrap_or_default)
}

fn upsert_table_sync(
    c: &Connection,
    table: &str,
    kind: SyncKind,
    stage: SyncStage,
    generation: u64,
) -> rusqlite::Result<()> {
    let (stage, lsn) = match stage {
        SyncStage::Pending => ("pending", None),
        SyncStage::CopyingAt(l) => ("copying", Some(l.to_string())),
        SyncStage::Done(l) => ("done", Some(l.to_string())),
    };
    c.execute(
        "INSERT INTO table_sync (table_name, kind, stage, lsn, generation) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(table_name) DO UPDATE SET kind = ?2, stage = ?3, lsn = ?4, generation = ?5",
        params![table, kind.as_str(), stage, lsn, generation as i64],
    )
    .map(|_| ())
}

fn meta_get(c: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

fn meta_set(c: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )
    .map(|_| ())
}

fn meta_delete(c: &Connection, key: &str) -> rusqlite::Result<()> {
    c.execute("DELETE FROM meta WHERE key = ?1", [key])
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::Side;
    use crate::replication::Plugin;
    use std::time::Duration;

    /// A directory of its own for one test's state.db, removed when the test ends.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("pgtide-state-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            Scratch(dir)
        }

        fn db(&self) -> std::path::PathBuf {
            self.0.join("state.db")
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn table_sync_records_bump_their_generation_and_finish_with_the_filters() {
        let scratch = Scratch::new("table-sync");
        let db = StateDb::open(&scratch.db()).unwrap();
        assert_eq!(db.table_syncs().unwrap(), (0, Vec::new()));
        let t = "\"public\".\"x\"";
        assert_eq!(
            db.record_table_sync(t, SyncKind::Add, SyncStage::Pending)
                .unwrap(),
            1
        );
        let at = lsn("0/3000060");
        assert_eq!(
            db.record_table_sync(t, SyncKind::Add, SyncStage::CopyingAt(at))
                .unwrap(),
            2
        );
        let filters = crate::clone::filters::Filters::default()
            .with_table_added(&crate::clone::filters::parse_table_name("scratch.x").unwrap());
        let tables = vec![("public".to_string(), "x".to_string())];
        let generation = db
            .finish_table_sync(
                t,
                SyncKind::Add,
                SyncStage::Done(at),
                &FollowedTables {
                    filters: &filters,
                    stream_tables: &tables,
                },
            )
            .unwrap();
        assert_eq!(generation, 3);
        let (generation, syncs) = db.table_syncs().unwrap();
        assert_eq!(generation, 3);
        assert_eq!(syncs.len(), 1);
        assert_eq!(
            (syncs[0].kind, syncs[0].stage),
            (SyncKind::Add, SyncStage::Done(at))
        );
        assert_eq!(db.recorded_filters().unwrap(), Some(filters));
        assert_eq!(db.cancel_table_sync(t).unwrap(), 4);
        assert_eq!(db.table_syncs().unwrap(), (4, Vec::new()));
        db.record_table_sync_seen(4).unwrap();
        assert_eq!(db.table_sync_seen().unwrap(), 4);
    }

    fn lsn(text: &str) -> Lsn {
        text.parse().expect("test LSN")
    }

    #[test]
    fn a_state_db_written_with_the_earlier_string_keys_opens_and_resumes() {
        let scratch = Scratch::new("old-keys");
        let path = scratch.db();
        {
            // What the earlier pgtide (string keys through set_meta) left behind.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            for (k, v) in [
                ("stream.slot", "pgtide_old"),
                ("stream.plugin", "wal2json"),
                ("stream.wal2json_nan_as_null", "accepted"),
                ("stream.startpos", "0/1A2B3C8"),
                ("stream.source.uri", "postgresql://app@src:5432/shop"),
                ("stream.tables", r#"[["public","orders"],["s","t"]]"#),
                ("stream.publications", r#"["pgtide_old_pub"]"#),
                ("stream.system_id", "7312345678901234567"),
                ("stream.received_lsn", "0/3000100"),
                ("stream.flushed_lsn", "0/30000D8"),
                (
                    "stream.resynced",
                    r#"{"\"public\".\"orders\"":"0/2000060"}"#,
                ),
                ("sentinel.endpos", "0/3000060"),
                ("sentinel.apply", "on"),
                ("sentinel.reached_endpos", "0/3000060"),
                ("sentinel.applied_lsn", "0/3000028"),
                ("apply.durable_lsn", "0/3000010"),
                ("phase", "stopped at endpos"),
                ("phase.since", "1764130000.125"),
                ("clone.status", "done"),
                ("clone.bytes_copied", "123456"),
                ("clone.rows_copied", "789"),
                ("source.identity", "7312345678901234567/shop"),
                ("source.uri", "postgresql://app@src:5432/shop"),
                ("target.identity", "7398765432109876543/shop"),
                (
                    "cutover.fence",
                    r#"[{"role":"app","previous":null},{"role":"batch","previous":"off"}]"#,
                ),
                ("migration.status", "cleaned up"),
                ("migration.sequence_offset", "1000"),
            ] {
                c.execute("INSERT INTO meta VALUES (?1, ?2)", [k, v])
                    .unwrap();
            }
            c.execute_batch(
                "INSERT INTO steps(name, status, started_at, done_at) VALUES ('catalog', 'done', 1, 2), ('pre-data', 'done', 3, 5), ('copy', 'running', 6, NULL);",
            )
            .unwrap();
        }
        let state = StateDb::open(&path).unwrap();
        assert_eq!(
            state.stream().unwrap(),
            Some(StreamRecord {
                slot: "pgtide_old".into(),
                plugin: Plugin::Wal2json,
                wal2json_nan_as_null: true,
                startpos: Some(lsn("0/1A2B3C8")),
                source_uri: Some("postgresql://app@src:5432/shop".into()),
                tables: Some(vec![
                    ("public".into(), "orders".into()),
                    ("s".into(), "t".into())
                ]),
                publications: Some(vec!["pgtide_old_pub".into()]),
                system_id: Some("7312345678901234567".into()),
            })
        );
        assert_eq!(
            state.stream_positions().unwrap(),
            StreamPositions {
                received: Some(lsn("0/3000100")),
                flushed: Some(lsn("0/30000D8")),
            }
        );
        assert_eq!(
            state.resync_positions().unwrap(),
            ResyncPositions::from([("\"public\".\"orders\"".to_string(), lsn("0/2000060"))])
        );
        assert_eq!(
            state.sentinel().unwrap(),
            Sentinel {
                endpos: Some(lsn("0/3000060")),
                apply: true,
                reached_endpos: Some(lsn("0/3000060")),
                applied_lsn: Some(lsn("0/3000028")),
            }
        );
        assert_eq!(state.applied_lsn().unwrap(), Some(lsn("0/3000028")));
        assert_eq!(state.durable_lsn().unwrap(), Some(lsn("0/3000010")));
        assert_eq!(
            state.phase().unwrap(),
            PhaseRecord {
                phase: Phase::StoppedAtEndpos,
                since: Some(1764130000.125),
                error: None,
            }
        );
        assert_eq!(state.clone_status().unwrap(), Some(CloneStatus::Done));
        assert_eq!(
            state.clone_progress().unwrap(),
            CloneProgress {
                bytes_copied: 123456,
                rows_copied: 789,
            }
        );
        assert_eq!(
            state.server_identity(Side::Source).unwrap(),
            Some(ServerIdentity {
                identity: "7312345678901234567/shop".into(),
                uri: Some("postgresql://app@src:5432/shop".into()),
            })
        );
        assert_eq!(
            state.server_identity(Side::Target).unwrap().map(|t| t.uri),
            Some(None)
        );
        assert_eq!(
            state.fence().unwrap(),
            Some(vec![
                FencedRole {
                    role: "app".into(),
                    previous: None
                },
                FencedRole {
                    role: "batch".into(),
                    previous: Some("off".into())
                },
            ])
        );
        assert!(state.cleaned_up().unwrap());
        assert_eq!(state.sequence_offset().unwrap(), 1000);
        assert!(state.has_catalog().unwrap());
        assert!(state.step_is_done(Step::PreData).unwrap());
        assert_eq!(
            state.step_status(Step::Copy).unwrap(),
            Some(StepStatus::Running)
        );
        assert_eq!(state.step_status(Step::Dump).unwrap(), None);
        let steps: Vec<(Step, StepStatus)> = state
            .steps()
            .unwrap()
            .into_iter()
            .map(|s| (s.step, s.status))
            .collect();
        assert_eq!(
            steps,
            [
                (Step::Catalog, StepStatus::Done),
                (Step::PreData, StepStatus::Done),
                (Step::Copy, StepStatus::Running)
            ]
        );
    }

    #[test]
    fn stream_cleanup_forgets_the_whole_stream_record() {
        let scratch = Scratch::new("forget-stream");
        let state = StateDb::open(&scratch.db()).unwrap();
        assert_eq!(state.stream().unwrap(), None);
        state
            .record_stream(&StreamRecord {
                slot: "pgtide_x".into(),
                plugin: Plugin::Pgoutput,
                wal2json_nan_as_null: true,
                startpos: Some(lsn("0/10")),
                source_uri: Some("postgresql://u@h/db".into()),
                tables: Some(vec![("public".into(), "t".into())]),
                publications: Some(vec!["pgtide_x_pub".into()]),
                system_id: Some("42".into()),
            })
            .unwrap();
        assert_eq!(state.stream_slot().unwrap().as_deref(), Some("pgtide_x"));
        state.forget_stream().unwrap();
        assert_eq!(state.stream().unwrap(), None);
        assert!(!state.wal2json_nan_as_null().unwrap());
        let left: i64 = state
            .with(|c| {
                c.query_row(
                    "SELECT count(*) FROM meta WHERE key LIKE 'stream.%'",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert_eq!(left, 0);
        // An adopted slot records what it knows and nothing of an earlier stream.
        state
            .record_stream(&StreamRecord {
                slot: "pgtide_y".into(),
                plugin: Plugin::Wal2json,
                wal2json_nan_as_null: false,
                startpos: None,
                source_uri: None,
                tables: None,
                publications: None,
                system_id: None,
            })
            .unwrap();
        let adopted = state.stream().unwrap().unwrap();
        assert_eq!(
            (adopted.plugin, adopted.startpos, adopted.tables),
            (Plugin::Wal2json, None, None)
        );
    }

    #[test]
    fn phases_and_steps_keep_their_text() {
        for phase in Phase::ALL {
            assert_eq!(Phase::parse(phase.as_str()), Some(phase));
        }
        assert_eq!(Phase::StoppedAtEndpos.as_str(), "stopped at endpos");
        assert_eq!(
            serde_json::to_string(&Phase::NotStarted).unwrap(),
            "\"not started\""
        );
        for step in Step::ALL {
            assert_eq!(Step::parse(step.as_str()), Some(step));
        }
        assert_eq!(Step::PreData.as_str(), "pre-data");
        assert_eq!(Step::LargeObjects.phase(), Phase::Copying);
        assert_eq!(Phase::parse("copy"), None);
    }

    #[test]
    fn a_phase_keeps_its_start_and_a_new_one_clears_the_error() {
        let scratch = Scratch::new("phase");
        let state = StateDb::open(&scratch.db()).unwrap();
        assert_eq!(state.phase().unwrap(), PhaseRecord::default());
        state.set_phase(Phase::Copying).unwrap();
        let since = state.phase().unwrap().since;
        assert!(since.is_some());
        state.set_phase(Phase::Copying).unwrap();
        assert_eq!(state.phase().unwrap().since, since);
        state.set_failed("boom").unwrap();
        assert_eq!(state.failure().unwrap().as_deref(), Some("boom"));
        state.set_phase(Phase::Following).unwrap();
        let now = state.phase().unwrap();
        assert_eq!((now.phase, now.error), (Phase::Following, None));
        assert_eq!(state.failure().unwrap(), None);
    }

    #[test]
    fn a_follow_is_running_until_it_stops_or_its_heartbeat_ages() {
        let live = FollowLiveness {
            pid: 42,
            heartbeat_at: 100.0,
            stopped_at: None,
            last_error: None,
        };
        let timeout = Duration::from_secs(5);
        assert_eq!(live.not_running(104.0, timeout), None);
        let dead = live.not_running(106.0, timeout).unwrap();
        assert!(
            dead.contains("pid 42") && dead.contains("heartbeat"),
            "{dead}"
        );
        let failed = FollowLiveness {
            stopped_at: Some(101.0),
            last_error: Some("found no matching row".into()),
            ..live.clone()
        };
        let why = failed.not_running(101.5, timeout).unwrap();
        assert!(why.contains("found no matching row"), "{why}");
        let done = FollowLiveness {
            stopped_at: Some(101.0),
            ..live
        };
        assert!(done.not_running(101.5, timeout).unwrap().contains("endpos"));
    }
}
