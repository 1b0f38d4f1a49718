//! `state.db`: the work dir's SQLite database. It holds the source catalog as seen under the
//! snapshot, one progress row per step, table part and index (with start/end times and attempt
//! counts), and the identity of the migration the work dir belongs to.
//!
//! Resume correctness depends on this file: a part or index is only marked `done` after the
//! target committed it, so a crash can leave a row `running` (redone or checked on resume) but
//! never `done` for work the target does not have.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
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

/// meta key of the migration's filters (JSON of `Filters`), recorded when it starts.
/// The output plugin of the work dir's slot (see `record_stream_plugin`).
const STREAM_PLUGIN_KEY: &str = "stream.plugin";
/// The operator's --wal2json-nan-as-null (see `record_wal2json_nan_as_null`).
const WAL2JSON_NAN_AS_NULL_KEY: &str = "stream.wal2json_nan_as_null";
const FILTERS_KEY: &str = "migration.filters";
/// meta key of the offset the last sequence copy added (verify expects the target ahead).
const SEQUENCE_OFFSET_KEY: &str = "migration.sequence_offset";
/// meta keys of apply's positions: durable on the target (every second) and at endpos.
const DURABLE_LSN_KEY: &str = "apply.durable_lsn";
const APPLIED_AT_ENDPOS_KEY: &str = "sentinel.applied_lsn";

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

/// One table as the catalog saw it under the snapshot.
#[derive(Clone, Debug)]
pub struct TableRow {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub heap_bytes: i64,
    pub toast_bytes: i64,
    pub pages: i64,
    pub est_rows: i64,
    pub has_pk: bool,
    pub columns: Vec<String>,
    pub binary_copy: bool,
    pub copy_data: bool,
}

impl TableRow {
    pub fn total_bytes(&self) -> i64 {
        self.heap_bytes + self.toast_bytes
    }
    pub fn qualified(&self) -> String {
        crate::pg::qualified(&self.schema, &self.name)
    }
    pub fn display_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// One index (and the constraint it backs, if any) to build on the target.
#[derive(Clone, Debug)]
pub struct IndexRow {
    pub oid: u32,
    pub table_oid: u32,
    pub schema: String,
    pub name: String,
    pub definition: String,
    pub constraint: Option<ConstraintRow>,
    /// The index is the table's REPLICA IDENTITY (USING INDEX): pg_dump says so in the index's
    /// own entry, which the index workers replace, so they must say it again.
    pub replica_identity: bool,
    pub status: String,
}

/// A primary key, unique or exclusion constraint backed by an index.
#[derive(Clone, Debug)]
pub struct ConstraintRow {
    pub oid: u32,
    pub name: String,
    pub kind: String,
    pub definition: String,
    pub deferrable: bool,
    pub deferred: bool,
}

/// One ctid range of a table.
#[derive(Clone, Debug)]
pub struct PartRow {
    pub table_oid: u32,
    pub part: i64,
    pub nparts: i64,
    pub first_page: i64,
    pub end_page: Option<i64>,
    pub status: String,
}

#[derive(Clone, Debug)]
pub struct SequenceRow {
    pub schema: String,
    pub name: String,
    pub last_value: i64,
    pub is_called: bool,
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

/// Handle shared by every worker; SQLite calls are short, so one mutex-guarded connection is
/// enough and keeps writes serialised.
#[derive(Clone)]
pub struct StateDb {
    conn: Arc<Mutex<Connection>>,
}

impl StateDb {
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
             CREATE TABLE IF NOT EXISTS follow_process (id INTEGER PRIMARY KEY CHECK (id = 1), pid INTEGER NOT NULL, started_at REAL NOT NULL, heartbeat_at REAL NOT NULL, stopped_at REAL, last_error TEXT);",
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

    pub fn get_meta(&self, key: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        })
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map(|_| ())
        })
    }

    pub fn delete_meta(&self, key: &str) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM meta WHERE key = ?1", [key])
                .map(|_| ())
        })
    }

    /// Records the migration's filters (invariant 9): every later stage reads them back with
    /// `recorded_filters`.
    pub fn record_filters(&self, filters: &crate::clone::filters::Filters) -> Result<()> {
        self.set_meta(FILTERS_KEY, &serde_json::to_string(filters)?)
    }

    /// The filters the migration recorded when it started; None for a work dir that has none
    /// recorded (it was started by an older pgtide, or nothing started yet).
    pub fn recorded_filters(&self) -> Result<Option<crate::clone::filters::Filters>> {
        match self.get_meta(FILTERS_KEY)? {
            Some(json) => Ok(Some(serde_json::from_str(&json).context(
                "the filters recorded in state.db cannot be read: use the pgtide that started this migration",
            )?)),
            None => Ok(None),
        }
    }

    /// Records the output plugin the work dir's slot was created with: every later stage
    /// (follow, cutover, status, cleanup, a resume) decodes the stream with it.
    pub fn record_stream_plugin(&self, plugin: crate::replication::Plugin) -> Result<()> {
        self.set_meta(STREAM_PLUGIN_KEY, plugin.name())
    }

    /// The recorded output plugin; pgoutput for a work dir that recorded none (an earlier
    /// pgtide only streamed pgoutput into apply).
    pub fn stream_plugin(&self) -> Result<crate::replication::Plugin> {
        match self.get_meta(STREAM_PLUGIN_KEY)? {
            Some(name) => crate::replication::Plugin::parse(&name)
                .context("the plugin recorded in state.db is unknown: use the pgtide that started this migration"),
            None => Ok(crate::replication::Plugin::Pgoutput),
        }
    }

    /// Records that the operator accepted (`--wal2json-nan-as-null`) that wal2json turns NaN /
    /// ±Infinity of nullable numeric and float columns into NULL: apply checks it before it
    /// applies a wal2json stream.
    pub fn record_wal2json_nan_as_null(&self) -> Result<()> {
        self.set_meta(WAL2JSON_NAN_AS_NULL_KEY, "accepted")
    }

    /// Whether `--wal2json-nan-as-null` was accepted for this work dir.
    pub fn wal2json_nan_as_null(&self) -> Result<bool> {
        Ok(self.get_meta(WAL2JSON_NAN_AS_NULL_KEY)?.is_some())
    }

    /// Forgets the recorded plugin (the stream was dropped).
    pub fn forget_stream_plugin(&self) -> Result<()> {
        self.delete_meta(STREAM_PLUGIN_KEY)
    }

    /// The offset the target's sequences were set with (`--sequence-offset`, `--offset`).
    pub fn record_sequence_offset(&self, offset: i64) -> Result<()> {
        self.set_meta(SEQUENCE_OFFSET_KEY, &offset.to_string())
    }

    /// The recorded sequence offset (0 when none was recorded).
    pub fn sequence_offset(&self) -> Result<i64> {
        Ok(self
            .get_meta(SEQUENCE_OFFSET_KEY)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// Apply's position durable on the target (recorded every second while apply runs).
    pub fn record_durable_lsn(&self, lsn: crate::pg::Lsn) -> Result<()> {
        self.set_meta(DURABLE_LSN_KEY, &lsn.to_string())
    }

    /// The position apply stopped at when it reached endpos.
    pub fn record_applied_at_endpos(&self, lsn: crate::pg::Lsn) -> Result<()> {
        self.set_meta(APPLIED_AT_ENDPOS_KEY, &lsn.to_string())
    }

    /// The furthest position the target is known to have applied, if any.
    pub fn applied_lsn(&self) -> Result<Option<crate::pg::Lsn>> {
        let mut best: Option<crate::pg::Lsn> = None;
        for key in [DURABLE_LSN_KEY, APPLIED_AT_ENDPOS_KEY] {
            if let Some(lsn) = self
                .get_meta(key)?
                .and_then(|v| v.parse::<crate::pg::Lsn>().ok())
            {
                best = Some(best.map_or(lsn, |b| b.max(lsn)));
            }
        }
        Ok(best.filter(|l| l.0 > 0))
    }

    /// The error the migration last stopped on (`set_failed`), while its phase is `failed`.
    pub fn failure(&self) -> Result<Option<String>> {
        if self.get_meta("phase")?.as_deref() != Some("failed") {
            return Ok(None);
        }
        self.get_meta("phase.error")
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
                 DELETE FROM constraints; DELETE FROM follow_process;",
            )
        })
    }

    pub fn step_status(&self, name: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row("SELECT status FROM steps WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
        })
    }

    pub fn step_started(&self, name: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO steps(name, status, started_at, attempts) VALUES (?1, 'running', ?2, 1)
                 ON CONFLICT(name) DO UPDATE SET status = 'running', started_at = ?2, done_at = NULL,
                 error = NULL, attempts = attempts + 1",
                params![name, now()],
            )
            .map(|_| ())
        })
    }

    pub fn step_done(&self, name: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE steps SET status = 'done', done_at = ?2 WHERE name = ?1",
                params![name, now()],
            )
            .map(|_| ())
        })
    }

    pub fn step_failed(&self, name: &str, error: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE steps SET status = 'failed', done_at = ?2, error = ?3 WHERE name = ?1",
                params![name, now(), error],
            )
            .map(|_| ())
        })
    }

    /// (name, status, seconds) of every step in the order they started.
    pub fn steps(&self) -> Result<Vec<(String, String, Option<f64>)>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT name, status, done_at - started_at FROM steps ORDER BY started_at",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
    }

    pub fn has_catalog(&self) -> Result<bool> {
        Ok(self.step_status("catalog")?.as_deref() == Some("done"))
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

    /// The phase of the migration for `pgtide status`, with the time it began (kept when the
    /// phase does not change).
    pub fn set_phase(&self, phase: &str) -> Result<()> {
        if self.get_meta("phase")?.as_deref() != Some(phase) {
            self.set_meta("phase", phase)?;
            self.set_meta("phase.since", &format!("{:.3}", now()))?;
            self.delete_meta("phase.error")?;
        }
        Ok(())
    }

    /// The migration stopped on an error: status shows it until the next run changes phase.
    pub fn set_failed(&self, error: &str) -> Result<()> {
        self.set_phase("failed")?;
        self.set_meta("phase.error", error)
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
    pub fn step_started_at(&self, name: &str) -> Result<Option<f64>> {
        self.with(|c| {
            c.query_row(
                "SELECT started_at FROM steps WHERE name = ?1",
                [name],
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

#[cfg(test)]
mod tests {
    use super::FollowLiveness;
    use std::time::Duration;

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
