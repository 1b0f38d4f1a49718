//! Table data: one part (a whole table, or a ctid range of a split table) streamed from
//! `COPY … TO STDOUT` on the source straight into `COPY … FROM STDIN` on the target. The bytes
//! are passed through untouched (binary format when every column type allows it, text
//! otherwise), regrouped into large CopyData messages, never decoded and never on disk.
//!
//! Exactly-once on resume: the target transaction that loads a part also records the part in
//! `pgtide.copied_parts`; on resume, a part found there is done, any other part is copied again
//! (its earlier attempt rolled back with its transaction).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::Client;

use crate::clone::snapshot;
use crate::pg::catalog::{PartRow, TableRow};
use crate::pg::{self, describe, quote_ident};

/// Bytes gathered before one CopyData message is sent to the target.
const CHUNK_BYTES: usize = 256 * 1024;

/// The target-side record of loaded parts; lives in the `pgtide` schema that clone removes at
/// the end.
pub const MARKER_DDL: &str = "CREATE SCHEMA IF NOT EXISTS pgtide;
     CREATE TABLE IF NOT EXISTS pgtide.copied_parts (table_oid oid NOT NULL, part int NOT NULL, PRIMARY KEY (table_oid, part))";

/// Counters shared with progress reporting.
#[derive(Default)]
pub struct CopyCounters {
    pub bytes: AtomicU64,
    pub rows: AtomicU64,
}

/// Source and target sessions of one copy worker.
pub struct CopyWorker {
    pub source: Client,
    pub target: Client,
    pub snapshot: String,
    pub counters: Arc<CopyCounters>,
    /// Where the bytes of the part in flight are recorded every second, for status.
    pub state: crate::state::StateDb,
}

/// Rows and bytes of one loaded part.
pub struct PartResult {
    pub rows: u64,
    pub bytes: u64,
}

/// The copied columns, quoted, as both COPY statements name them.
fn column_list(table: &TableRow) -> String {
    table
        .columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ")
}

impl CopyWorker {
    /// Copies one part in one source transaction (importing the snapshot) and one target
    /// transaction (that also records the part as loaded).
    pub async fn copy_part(&self, table: &TableRow, part: &PartRow) -> Result<PartResult> {
        let columns = column_list(table);
        let format = if table.binary_copy { "binary" } else { "text" };
        let whole_table = part.nparts == 1;
        let source_sql = if table.columns.is_empty() {
            // A table without columns still has rows; COPY of zero columns keeps their count.
            format!("COPY {} TO STDOUT (FORMAT {format})", table.qualified())
        } else if whole_table {
            format!(
                "COPY {} ({columns}) TO STDOUT (FORMAT {format})",
                table.qualified()
            )
        } else {
            let mut filter = format!("ctid >= '({},0)'::tid", part.first_page);
            if let Some(end) = part.end_page {
                filter.push_str(&format!(" AND ctid < '({end},0)'::tid"));
            }
            format!(
                "COPY (SELECT {columns} FROM ONLY {} WHERE {filter}) TO STDOUT (FORMAT {format})",
                table.qualified()
            )
        };
        let column_list = if table.columns.is_empty() {
            String::new()
        } else {
            format!(" ({columns})")
        };
        let target_sql = format!(
            "COPY {}{column_list} FROM STDIN (FORMAT {format}{})",
            table.qualified(),
            if whole_table { ", FREEZE" } else { "" }
        );

        snapshot::import(&self.source, &self.snapshot).await?;
        let result = self
            .stream(table, part, whole_table, &source_sql, &target_sql)
            .await;
        // The source transaction is read-only; end it whatever happened.
        let _ = self.source.batch_execute("ROLLBACK").await;
        if result.is_err() {
            let _ = self.target.batch_execute("ROLLBACK").await;
        }
        result
    }

    async fn stream(
        &self,
        table: &TableRow,
        part: &PartRow,
        whole_table: bool,
        source_sql: &str,
        target_sql: &str,
    ) -> Result<PartResult> {
        let name = table.display_name();
        let mut begin = String::from("BEGIN;");
        if whole_table {
            // TRUNCATE in the same transaction lets COPY FREEZE skip hint-bit and vacuum work.
            begin.push_str(&format!("TRUNCATE ONLY {};", table.qualified()));
        }
        self.target.batch_execute(&begin).await.map_err(|e| {
            anyhow!(
                "cannot start loading {name} on the target: {}",
                describe(&e)
            )
        })?;
        let mut recorded = std::time::Instant::now();
        let (rows, bytes) = pump(
            &self.source,
            &self.target,
            &name,
            source_sql,
            target_sql,
            |chunk, bytes| {
                if recorded.elapsed() >= std::time::Duration::from_secs(1) {
                    let _ = self.state.part_progress(table.oid, part.part, bytes);
                    recorded = std::time::Instant::now();
                }
                self.counters.bytes.fetch_add(chunk, Ordering::Relaxed);
            },
        )
        .await?;
        self.counters.rows.fetch_add(rows, Ordering::Relaxed);
        check_not_rewritten(&self.source, table).await?;
        fail::fail_point!(crate::failpoints::COPY_BEFORE_COMMIT);
        self.target
            .execute(
                "INSERT INTO pgtide.copied_parts VALUES ($1, $2)",
                &[&table.oid, &(part.part as i32)],
            )
            .await
            .map_err(|e| anyhow!("cannot record the loaded part of {name}: {}", describe(&e)))?;
        self.target
            .batch_execute("COMMIT")
            .await
            .map_err(|e| anyhow!("cannot commit {name} on the target: {}", describe(&e)))?;
        fail::fail_point!(crate::failpoints::COPY_AFTER_COMMIT);
        Ok(PartResult { rows, bytes })
    }
}

/// Streams `COPY … TO STDOUT` on the source into `COPY … FROM STDIN` on the target (both
/// sessions already in their transactions), regrouped into large CopyData messages;
/// `on_chunk(chunk bytes, bytes so far)` after each source chunk. Returns rows and bytes.
pub(crate) async fn pump(
    source: &Client,
    target: &Client,
    name: &str,
    source_sql: &str,
    target_sql: &str,
    mut on_chunk: impl FnMut(u64, u64),
) -> Result<(u64, u64)> {
    let out = source
        .copy_out(source_sql)
        .await
        .map_err(|e| {
            // A column or the table itself renamed or dropped since the snapshot: the
            // statement is parsed against the source's current catalog.
            let changed = matches!(
                e.code(),
                Some(c) if *c == tokio_postgres::error::SqlState::UNDEFINED_COLUMN
                    || *c == tokio_postgres::error::SqlState::UNDEFINED_TABLE
            );
            if changed {
                anyhow!(
                    "cannot read {name} from the source: {}. Its definition changed on the source during the copy (a schema change after the snapshot), so it cannot be copied under the snapshot. Start over (`pgtide cleanup`, then `pgtide clone --follow`) and make schema changes once `pgtide status` shows the copy done: from then on they are replayed in order",
                    describe(&e)
                )
            } else {
                anyhow!("cannot read {name} from the source: {}", describe(&e))
            }
        })?;
    let sink = target
        .copy_in::<_, Bytes>(target_sql)
        .await
        .map_err(|e| anyhow!("cannot load {name} on the target: {}", describe(&e)))?;
    futures_util::pin_mut!(out);
    futures_util::pin_mut!(sink);
    let mut buffer = BytesMut::with_capacity(CHUNK_BYTES * 2);
    let mut bytes = 0u64;
    while let Some(chunk) = out.next().await {
        let chunk = chunk
            .map_err(|e| anyhow!("reading {name} from the source failed: {}", describe(&e)))?;
        bytes += chunk.len() as u64;
        on_chunk(chunk.len() as u64, bytes);
        buffer.put(chunk);
        if buffer.len() >= CHUNK_BYTES {
            sink.send(buffer.split().freeze())
                .await
                .map_err(|e| anyhow!("loading {name} on the target failed: {}", describe(&e)))?;
        }
    }
    if !buffer.is_empty() {
        sink.send(buffer.split().freeze())
            .await
            .map_err(|e| anyhow!("loading {name} on the target failed: {}", describe(&e)))?;
    }
    let rows = sink
        .as_mut()
        .finish()
        .await
        .map_err(|e| anyhow!("loading {name} on the target failed: {}", describe(&e)))?;
    Ok((rows, bytes))
}

/// The COPY holds its lock on the source table from its start: a rewrite committed before
/// that is seen now, as pg_class under the snapshot naming another file than the table has
/// (TRUNCATE and table rewrites are not MVCC-safe: the snapshot saw the new, empty file, while
/// the stream still carries changes to the rows it lost).
async fn check_not_rewritten(source: &Client, table: &TableRow) -> Result<()> {
    let name = table.display_name();
    let rewritten: bool = source
        .query_one(
            "SELECT relfilenode IS DISTINCT FROM pg_relation_filenode(oid) FROM pg_class WHERE oid = $1",
            &[&table.oid],
        )
        .await
        .map_err(|e| anyhow!("cannot check {name} on the source: {}", describe(&e)))?
        .get(0);
    if rewritten {
        return Err(anyhow::Error::new(TableRewritten(name)));
    }
    Ok(())
}

/// Replaces every row of `table` on the target with its rows under `snapshot`, in one target
/// transaction (`follow --add-table` / `--resync`): emptied (TRUNCATE, or DELETE when another
/// table's foreign key refers to it, which TRUNCATE refuses) and loaded as the clone loads a
/// whole table, in `session_replication_role = replica` like apply (no trigger fires, foreign
/// keys are not checked: the rows are the source's). Returns the rows loaded; a table rewritten
/// on the source after the snapshot is a `TableRewritten` error with nothing committed.
pub async fn replace_table(
    source: &Client,
    target: &Client,
    table: &TableRow,
    snapshot_name: &str,
) -> Result<u64> {
    let name = table.display_name();
    let columns = column_list(table);
    let format = if table.binary_copy { "binary" } else { "text" };
    let (source_sql, target_sql) = if table.columns.is_empty() {
        (
            format!("COPY {} TO STDOUT (FORMAT {format})", table.qualified()),
            format!("COPY {} FROM STDIN (FORMAT {format})", table.qualified()),
        )
    } else {
        (
            format!(
                "COPY {} ({columns}) TO STDOUT (FORMAT {format})",
                table.qualified()
            ),
            format!(
                "COPY {} ({columns}) FROM STDIN (FORMAT {format})",
                table.qualified()
            ),
        )
    };
    let referenced: bool = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE contype = 'f' AND confrelid = $1::text::regclass AND conrelid <> confrelid)",
            &[&table.qualified()],
        )
        .await
        .map_err(|e| anyhow!("cannot find {name} on the target: {}", describe(&e)))?
        .get(0);
    let empty = if referenced {
        "DELETE FROM ONLY"
    } else {
        "TRUNCATE ONLY"
    };
    snapshot::import(source, snapshot_name).await?;
    let result = async {
        target
            .batch_execute(&format!(
                "BEGIN; SET LOCAL session_replication_role = replica; {empty} {}",
                table.qualified()
            ))
            .await
            .map_err(|e| anyhow!("cannot empty {name} on the target: {}", describe(&e)))?;
        let (rows, _) = pump(source, target, &name, &source_sql, &target_sql, |_, _| {}).await?;
        check_not_rewritten(source, table).await?;
        target
            .batch_execute("COMMIT")
            .await
            .map_err(|e| anyhow!("cannot commit {name} on the target: {}", describe(&e)))?;
        Ok(rows)
    }
    .await;
    let _ = source.batch_execute("ROLLBACK").await;
    if result.is_err() {
        let _ = target.batch_execute("ROLLBACK").await;
    }
    result
}

/// A table truncated or rewritten (ALTER TABLE … TYPE, VACUUM FULL, CLUSTER) on the source
/// after the copy's snapshot was taken: its copy would be empty or stale. Nothing of the part
/// was committed on the target.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0} was truncated or rewritten on the source after the copy's snapshot was taken, so the snapshot sees it empty; nothing of it was committed on the target. Rerun with --resume: it copies the unfinished tables again under a new snapshot"
)]
pub struct TableRewritten(pub String);

/// Parts the target already committed (found on resume).
pub async fn loaded_parts(target: &Client) -> Result<std::collections::HashSet<(u32, i64)>> {
    let rows = target
        .query("SELECT table_oid, part FROM pgtide.copied_parts", &[])
        .await
        .context("cannot read pgtide.copied_parts on the target")?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, u32>(0), r.get::<_, i32>(1) as i64))
        .collect())
}

/// Creates the marker table on the target (idempotent).
pub async fn prepare_target(target: &Client) -> Result<()> {
    target.batch_execute(MARKER_DDL).await.map_err(|e| {
        anyhow!(
            "cannot create the pgtide schema on the target: {}",
            pg::describe(&e)
        )
    })
}
