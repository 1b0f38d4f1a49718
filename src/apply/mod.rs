//! Apply: replays the spool on the target in source commit order, exactly once.
//!
//! Each target transaction carries one or more whole consecutive source transactions (never a
//! part of one, never reordered: invariant 3) and advances the replication origin
//! `pgtide_<slot>` in the same transaction (`pg_replication_origin_xact_setup`, invariant 2),
//! so after any crash the target's committed state says exactly where to resume. Changes are
//! applied as they are read from the spool: a large transaction is never held in memory
//! (invariant 4). Values go to the target as text parameters cast by the column's own type
//! (invariant 5); an unchanged TOAST column is left out of the SET list.

pub mod statements;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::decode::{Change, pgoutput};
use crate::pg::{Lsn, describe};
use crate::spool::SpoolReader;
use statements::{Statements, TargetTable};

/// The target connection was lost (a restart, the network, a terminated session): follow
/// reconnects and resumes from the origin, which says exactly where the target is.
#[derive(Debug, thiserror::Error)]
#[error("lost the connection to the target: {0}")]
pub struct TargetLost(pub String);

/// A target error with its context; a lost connection or a shutting-down server becomes
/// `TargetLost`, everything else (constraint violations, drift…) stays fatal.
pub fn target_error(e: &tokio_postgres::Error, context: impl std::fmt::Display) -> anyhow::Error {
    let lost = match e.as_db_error() {
        None => true,
        Some(db) => {
            let code = db.code().code();
            code.starts_with("57P") || code.starts_with("08")
        }
    };
    let text = format!("{context}: {}", describe(e));
    if lost {
        anyhow::Error::new(TargetLost(text))
    } else {
        anyhow!(text)
    }
}

/// How many source transactions / changes one target transaction may merge, and for how long.
const BATCH_TRANSACTIONS: usize = 200;
const BATCH_CHANGES: usize = 20_000;
const BATCH_TIME: Duration = Duration::from_millis(200);

/// The replication origin that tracks what the target has applied for this slot.
pub fn origin_name(slot: &str) -> String {
    format!("pgtide_{slot}")
}

/// Creates the origin if needed and binds this session to it; returns the durable position
/// the target has applied through.
pub async fn setup_origin(target: &Client, origin: &str) -> Result<Lsn> {
    target
        .execute(
            "SELECT pg_replication_origin_create($1) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
            &[&origin],
        )
        .await
        .map_err(|e| target_error(&e, format!("cannot create the replication origin {origin} on the target")))?;
    target
        .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
        .await
        .map_err(|e| target_error(&e, format!("cannot use the replication origin {origin} on the target. Is another pgtide applying to it?")))?;
    target
        .batch_execute("SET session_replication_role = replica; SET synchronous_commit = off")
        .await
        .map_err(|e| target_error(&e, "cannot set up the apply session on the target"))?;
    durable_progress(target, origin).await
}

/// The origin's position as far as it is flushed on the target: what a crash cannot undo.
pub async fn durable_progress(target: &Client, origin: &str) -> Result<Lsn> {
    let row = target
        .query_one(
            "SELECT coalesce(pg_replication_origin_progress($1, true), '0/0')::text",
            &[&origin],
        )
        .await
        .map_err(|e| target_error(&e, "cannot read the origin's progress on the target"))?;
    let text: String = row.get(0);
    text.parse().map_err(|e: String| anyhow!(e))
}

/// When the apply loop may stop: at the first transaction that commits after endpos (every
/// one before it has been applied, the stream being in commit order). When the source is
/// idle past endpos, follow writes a marker transaction so that one arrives.
pub struct StopRule {
    /// The end position: every transaction committed at or before it, none after.
    pub endpos: watch::Receiver<Option<Lsn>>,
}

/// Apply progress, for feedback to the source and for status.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    /// Committed on the target (maybe not yet flushed).
    pub applied: Lsn,
    /// Flushed on the target: safe to report to the source and to prune.
    pub durable: Lsn,
    pub transactions: u64,
    pub changes: u64,
}

/// Runs until the stop rule says every transaction up to endpos is applied.
pub async fn run(
    target: &Arc<Client>,
    dir: &Path,
    origin: &str,
    stop: &mut StopRule,
    progress_tx: &watch::Sender<Progress>,
) -> Result<Lsn> {
    let start = setup_origin(target, origin).await?;
    let reader = SpoolReader::open(dir)?;
    let mut after_seq = reader.seq_through(start)?;
    let mut decoder = pgoutput::Decoder::default();
    let mut statements = Statements::default();
    let mut tables: HashMap<u32, TargetTable> = HashMap::new();
    for payload in reader.relations_before(after_seq)? {
        if let Change::Relation(r) = decoder.decode(payload)? {
            tables.insert(r.oid, TargetTable::describe(target, r).await?);
        }
    }
    tracing::info!("apply: resuming after {start} (origin {origin})");
    let mut progress = Progress {
        applied: start,
        durable: start,
        ..Default::default()
    };
    let mut batch = Batch::default();
    let mut last_progress_read = Instant::now();
    loop {
        let records = reader.read(after_seq, Lsn(0), 2_000)?;
        let idle = records.is_empty();
        let mut rewound = false;
        for record in records {
            after_seq = record.seq;
            let change = decoder.decode(record.payload)?;
            match change {
                Change::Relation(r) => {
                    statements.flush().await?;
                    let table = TargetTable::describe(target, r).await?;
                    statements.forget(table.source.oid);
                    tables.insert(table.source.oid, table);
                }
                Change::Begin { final_lsn, .. } => {
                    tracing::trace!(
                        "apply: begin of a transaction committing at {final_lsn} (spool seq {after_seq})"
                    );
                    if let Some(endpos) = *stop.endpos.borrow()
                        && final_lsn > endpos
                    {
                        tracing::debug!(
                            "apply: transaction committing at {final_lsn} is past endpos {endpos}: done"
                        );
                        statements.flush().await?;
                        batch.commit(target, &mut progress).await?;
                        return finish(target, origin, progress, progress_tx).await;
                    }
                    if batch.in_source_transaction {
                        // The receiver lost its connection inside this transaction and the
                        // source sent it again from its beginning (the spool dropped the
                        // partial copy). Undo everything not yet committed and read again
                        // from the last committed transaction: nothing applied twice.
                        tracing::warn!(
                            "apply: a transaction was re-sent by the source; re-reading the spool after {}",
                            progress.applied
                        );
                        statements.discard();
                        target
                            .batch_execute("ROLLBACK")
                            .await
                            .map_err(|e| target_error(&e, "cannot roll back on the target"))?;
                        progress.changes -= batch.changes as u64;
                        batch = Batch::default();
                        after_seq = reader.seq_through(progress.applied)?;
                        decoder = pgoutput::Decoder::default();
                        rewound = true;
                        break;
                    }
                    if !batch.open {
                        target
                            .batch_execute("BEGIN")
                            .await
                            .map_err(|e| target_error(&e, "cannot begin on the target"))?;
                        batch.open = true;
                        batch.started = Instant::now();
                    }
                    batch.in_source_transaction = true;
                }
                Change::Commit {
                    end_lsn,
                    commit_time,
                    ..
                } => {
                    batch.transactions += 1;
                    batch.last_commit = Some((end_lsn, commit_time));
                    batch.in_source_transaction = false;
                    if batch.transactions >= BATCH_TRANSACTIONS
                        || batch.changes >= BATCH_CHANGES
                        || batch.started.elapsed() >= BATCH_TIME
                    {
                        statements.flush().await?;
                        batch.commit(target, &mut progress).await?;
                        progress_tx.send_replace(progress);
                    }
                }
                Change::Insert { .. }
                | Change::Update { .. }
                | Change::Delete { .. }
                | Change::Truncate { .. } => {
                    statements.apply(target, &tables, &change).await?;
                    batch.changes += 1;
                    progress.changes += 1;
                }
                // Messages, origins and types need nothing on the target.
                _ => {}
            }
        }
        if rewound {
            continue;
        }
        if idle {
            // Nothing more spooled for now: commit the whole transactions gathered so far
            // (a transaction still being spooled stays open until its commit arrives).
            if batch.open && !batch.in_source_transaction {
                statements.flush().await?;
                batch.commit(target, &mut progress).await?;
                progress_tx.send_replace(progress);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if last_progress_read.elapsed() >= Duration::from_secs(1) {
            progress.durable = durable_progress(target, origin).await?;
            progress_tx.send_replace(progress);
            reader.prune_through(progress.durable)?;
            last_progress_read = Instant::now();
        }
    }
}

async fn finish(
    target: &Client,
    origin: &str,
    mut progress: Progress,
    progress_tx: &watch::Sender<Progress>,
) -> Result<Lsn> {
    // Make the last commits durable before saying so.
    target
        .batch_execute(
            "SET synchronous_commit = on; SELECT pg_replication_origin_session_progress(true)",
        )
        .await
        .ok();
    progress.durable = durable_progress(target, origin).await?;
    progress_tx.send_replace(progress);
    Ok(progress.applied)
}

/// The target transaction being filled with whole source transactions.
struct Batch {
    open: bool,
    started: Instant,
    transactions: usize,
    changes: usize,
    /// End LSN and commit time of the last whole source transaction in the batch.
    last_commit: Option<(Lsn, i64)>,
    /// Between a source Begin and its Commit: the batch cannot be committed now.
    in_source_transaction: bool,
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            open: false,
            started: Instant::now(),
            transactions: 0,
            changes: 0,
            last_commit: None,
            in_source_transaction: false,
        }
    }
}

impl Batch {
    async fn commit(&mut self, target: &Client, progress: &mut Progress) -> Result<()> {
        if !self.open {
            return Ok(());
        }
        if self.in_source_transaction {
            bail!("internal error: a target commit inside a source transaction");
        }
        let Some((end_lsn, commit_time)) = self.last_commit else {
            target.batch_execute("ROLLBACK").await.ok();
            self.open = false;
            return Ok(());
        };
        // The origin advances in the same transaction as the changes (invariant 2).
        target
            .execute(
                "SELECT pg_replication_origin_xact_setup($1::text::pg_lsn, '2000-01-01 00:00:00+00'::timestamptz + $2::bigint * interval '1 microsecond')",
                &[&end_lsn.to_string(), &commit_time],
            )
            .await
            .map_err(|e| target_error(&e, "cannot record the origin position on the target"))?;
        fail::fail_point!("apply.before_commit");
        target
            .batch_execute("COMMIT")
            .await
            .map_err(|e| target_error(&e, "cannot commit on the target"))?;
        progress.applied = end_lsn;
        progress.transactions += self.transactions as u64;
        *self = Batch::default();
        Ok(())
    }
}
