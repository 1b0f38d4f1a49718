//! Apply: replays the spool on the target in source commit order, exactly once.
//!
//! Each target transaction carries one or more whole consecutive source transactions (never a
//! part of one, never reordered: invariant 3) and advances the replication origin
//! `pgtide_<slot>` in the same transaction (`pg_replication_origin_xact_setup`, invariant 2),
//! so after any crash the target's committed state says exactly where to resume. Changes are
//! applied as they are read from the spool: a large transaction is never held in memory
//! (invariant 4). Values go to the target as text parameters cast by the column's own type
//! (invariant 5); an unchanged TOAST column is left out of the SET list.

mod ahead;
pub mod ddl;
pub mod joins;
pub mod keys;
pub mod lanes;
pub mod run;
pub mod sets;
pub mod statements;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::decode::{Change, Relation, StreamDecoder};
pub use crate::errors::TargetLost;
use crate::errors::{Classified, ErrorClass, classify, classify_pg, sqlstate};
use crate::pg::{Lsn, describe};
use crate::replication::Plugin;
use crate::spool::SpoolReader;
use keys::KeySet;
use lanes::{Lane, Lanes, ParallelFailure, Sealed};
use statements::TargetTable;

/// A target error with its context, classified by [`crate::errors::classify_pg`]: a lost
/// connection or a shutting-down server becomes `TargetLost` (follow reconnects); everything
/// else (constraint violations, drift…) keeps its class and stops, except a serialization
/// failure or deadlock, after which apply re-runs the batch.
pub fn target_error(e: &tokio_postgres::Error, context: impl std::fmt::Display) -> anyhow::Error {
    let class = classify_pg(e);
    let text = format!("{context}: {}", describe(e));
    if class == ErrorClass::Transient {
        anyhow::Error::new(TargetLost(text))
    } else {
        anyhow::Error::new(Classified::pg(e, class, text))
    }
}

/// How many times in a row a batch that hit a deadlock or serialization failure is re-run
/// before apply stops with it.
const MAX_CONFLICT_RETRIES: u32 = 5;

/// How many source transactions / changes one target transaction may merge, and for how long.
const BATCH_TRANSACTIONS: usize = 1_000;
const BATCH_CHANGES: usize = 20_000;
const BATCH_TIME: Duration = Duration::from_millis(200);
/// The same beside other lanes (`lanes.rs`): half the size, so that a backlog is cut into
/// enough batches for every lane and one that meets a batch in flight waits for less. (At 100
/// transactions, the per-statement cost made two lanes slower than one in
/// `BURST=S scripts/bench-cpu.sh`: 31,000 against 37,400 changes/s.)
const PARALLEL_BATCH_TRANSACTIONS: usize = 500;
const PARALLEL_BATCH_CHANGES: usize = 10_000;
/// How long apply waits before reading the spool again when it found nothing new: it adds up
/// to this much to the lag of every transaction that arrives while apply is idle.
const IDLE_POLL: Duration = Duration::from_millis(10);

/// The replication origin that tracks what the target has applied for this slot.
pub fn origin_name(slot: &str) -> String {
    format!("pgtide_{slot}")
}

/// The origin of parallel apply's lane `lane` (`lanes.rs`): the slot's own origin for the
/// first lane, `<origin>.lane<n>` for the others (a slot name has no `.`, so no other
/// migration's origin can take that form).
pub fn lane_origin_name(origin: &str, lane: usize) -> String {
    if lane == 0 {
        origin.to_string()
    } else {
        format!("{origin}.lane{lane}")
    }
}

/// The condition on `pg_replication_origin.roname` that selects a slot's origin (`$1`) and
/// its lanes' origins: what resume, status and cleanup read or drop, whatever `--apply-jobs`
/// a run used.
macro_rules! origins_of_slot {
    () => {
        "(roname = $1 OR (left(roname, length($1) + 5) = $1 || '.lane' AND substr(roname, length($1) + 6) ~ '^[0-9]+$'))"
    };
}
pub const ORIGINS_OF_SLOT: &str = origins_of_slot!();

/// The furthest flushed position among the slot's origin and its lanes' origins (`$1`: the
/// slot's origin), as text; NULL when none exists. `max(pg_lsn)` is 13+, so ORDER BY.
pub const FURTHEST_ORIGIN_SQL: &str = concat!(
    "SELECT (SELECT p FROM (SELECT pg_replication_origin_progress(roname, true) AS p ",
    "FROM pg_replication_origin WHERE ",
    origins_of_slot!(),
    ") o WHERE p IS NOT NULL ORDER BY p DESC LIMIT 1)::text"
);

/// The names of the slot's origins that exist on the target (its own and its lanes').
async fn lane_origins(target: &Client, origin: &str) -> Result<Vec<String>> {
    let rows = target
        .query(
            &format!("SELECT roname::text FROM pg_replication_origin WHERE {ORIGINS_OF_SLOT}"),
            &[&origin],
        )
        .await
        .map_err(|e| target_error(&e, "cannot list the replication origins on the target"))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Creates the origin if needed and binds this session to it.
pub async fn setup_origin(target: &Client, origin: &str) -> Result<()> {
    target
        .execute(
            "SELECT pg_replication_origin_create($1) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
            &[&origin],
        )
        .await
        .map_err(|e| target_error(&e, format!("cannot create the replication origin {origin} on the target")))?;
    // A pgtide killed a moment ago may still hold the origin until the target notices its
    // closed connection: wait for that a little before calling it a conflict.
    let started = Instant::now();
    loop {
        match target
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await
        {
            Ok(_) => break,
            // 55006 object_in_use: the origin is active for another session's PID.
            Err(e)
                if classify_pg(&e) == ErrorClass::Busy
                    && started.elapsed() < Duration::from_secs(20) =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(target_error(
                    &e,
                    format!(
                        "cannot use the replication origin {origin} on the target. Is another pgtide applying to it?"
                    ),
                ));
            }
        }
    }
    target
        .batch_execute("SET session_replication_role = replica; SET synchronous_commit = off")
        .await
        .map_err(|e| target_error(&e, "cannot set up the apply session on the target"))?;
    Ok(())
}

/// The origin's position as far as it is flushed on the target: what a crash cannot undo.
/// With parallel apply, the greatest among the slot's lane origins: batches commit in source
/// order, so that one ends a consistent prefix (`lanes.rs`).
pub async fn durable_progress(target: &Client, origin: &str) -> Result<Lsn> {
    let row = target
        .query_one(
            &format!("SELECT coalesce(({FURTHEST_ORIGIN_SQL})::pg_lsn, '0/0')::text"),
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

/// Tables copied under a later snapshot than the slot's (a resumed clone --follow, `follow
/// --add-table` / `--resync`), with that snapshot's LSN: their changes from transactions
/// committing before it are already in the copy and are skipped, the way native table
/// synchronization does; the rules are in `joins.rs`.
pub type Resynced = joins::Joins;

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

/// Where apply reads and what it applies to.
pub struct Source<'a> {
    /// The spool's work dir.
    pub dir: &'a Path,
    /// The plugin the spool was written by (recorded in state.db).
    pub plugin: Plugin,
    /// The replication origin tracking the target's progress.
    pub origin: &'a str,
    /// How captured schema changes are recognized and replayed.
    pub ddl: &'a ddl::DdlRules,
    /// A reverse stream's echo filter: transactions the forward apply wrote under this origin
    /// (or one of its lanes) are skipped, so that the source's own changes never come back.
    pub echo_origin: Option<&'a str>,
}

/// Whether a transaction's replication origin is the forward apply's (`origin`) or one of its
/// lanes (`<origin>.lane<n>`, see `lane_origin_name`).
pub fn is_echo(origin: &str, transaction_origin: &str) -> bool {
    transaction_origin == origin
        || transaction_origin
            .strip_prefix(origin)
            .and_then(|rest| rest.strip_prefix(".lane"))
            .is_some_and(|lane| !lane.is_empty() && lane.bytes().all(|b| b.is_ascii_digit()))
}

/// Runs until the stop rule says every transaction up to endpos is applied. `targets` holds
/// one connection per apply lane (`--apply-jobs`); one is the single-lane apply.
pub async fn run(
    targets: &[Arc<Client>],
    source: &Source<'_>,
    stop: &mut StopRule,
    resynced: &mut Resynced,
    progress_tx: &watch::Sender<Progress>,
) -> Result<Lsn> {
    let Source {
        dir,
        plugin,
        origin,
        ddl,
        echo_origin,
    } = *source;
    let Some(first) = targets.first() else {
        bail!("internal error: apply started without a target connection");
    };
    // Every lane origin of the slot is bound once before the position is read: a lane of a
    // pgtide stopped a moment ago may still be committing, and holds its origin until it is
    // done (also the lanes of a run with more of them than this one).
    let ours: Vec<String> = (0..targets.len())
        .map(|lane| lane_origin_name(origin, lane))
        .collect();
    for earlier in lane_origins(first, origin).await? {
        if !ours.contains(&earlier) {
            setup_origin(first, &earlier).await?;
            first
                .batch_execute("SELECT pg_replication_origin_session_reset()")
                .await
                .map_err(|e| {
                    target_error(&e, "cannot release a replication origin on the target")
                })?;
        }
    }
    for (client, name) in targets.iter().zip(&ours) {
        setup_origin(client, name).await?;
    }
    let start = durable_progress(first, origin).await?;
    let reader = SpoolReader::open(dir)?;
    let after_seq = reader.seq_through(start)?;
    let mut applier = Applier {
        lane: Lane::new(first.clone()),
        lanes: Lanes::new(targets[1..].iter().cloned().map(Lane::new).collect()),
        serial_through: 0,
        reader,
        plugin,
        decoder: StreamDecoder::new(plugin),
        tables: HashMap::new(),
        batch: Batch::default(),
        progress: Progress {
            applied: start,
            durable: start,
            ..Default::default()
        },
        skipped_tail: None,
        after_seq,
        one_row_at_a_time_through: 0,
        resynced,
        waiting: None,
        final_lsn: Lsn(0),
        skipping: false,
        echo: false,
        echo_origin,
        undescribed: HashMap::new(),
        pending_truncate: None,
        ddl,
        ddl_ordinal: 0,
        ddl_replayed: HashSet::new(),
        set_aside: HashSet::new(),
        ddl_log: None,
        ddl_stop_before: None,
        ahead: ahead::AheadState::default(),
    };
    // Only the last description of each relation counts, and it is matched with the target
    // only when a change of it comes: an older one may name a column dropped since (on both
    // sides), a table dropped since may never send a change again.
    // (A wal2json spool has no Relation records: its decoder announces each table again at
    // its first change.)
    for payload in applier.reader.relations_before(after_seq)? {
        for change in applier.decoder.decode(payload)? {
            if let Change::Relation(r) = change
                && !applier.sets_aside(&r)?
            {
                applier.undescribed.insert(r.oid, r);
            }
        }
    }
    if targets.len() > 1 {
        tracing::info!(
            "apply: resuming after {start} (origin {origin} and its lanes), {} lanes",
            targets.len()
        );
    } else {
        tracing::info!("apply: resuming after {start} (origin {origin})");
    }
    let result = replay(&mut applier, stop, progress_tx, origin).await;
    if result.is_err() {
        // No batch may commit behind the next run's back: wait for every one in flight (each
        // commits in its turn or rolls back).
        if let Err(e) = applier.lanes.drain(&mut applier.progress).await {
            tracing::warn!("apply: while stopping, a batch in flight failed too: {e:#}");
        }
        progress_tx.send_replace(applier.progress);
    }
    result
}

/// The apply loop: reads the spool and applies it until endpos.
async fn replay(
    applier: &mut Applier<'_>,
    stop: &mut StopRule,
    progress_tx: &watch::Sender<Progress>,
    origin: &str,
) -> Result<Lsn> {
    let plugin = applier.plugin;
    let mut last_progress_read = Instant::now();
    // Serialization failures / deadlocks in a row at the same applied position.
    let mut conflicts = (applier.progress.applied, 0u32);
    loop {
        applier.resynced.reload_if_due()?;
        let reaped = applier.lanes.reap_finished(&mut applier.progress).await;
        let records = applier.reader.read(applier.after_seq, 2_000)?;
        let idle = records.is_empty();
        let mut step = reaped.map(|()| Step::Continue);
        if step.is_ok() {
            for record in records {
                applier.after_seq = record.seq;
                step = match applier.before_queue_record(&record.payload, stop) {
                    Ok(Some(step)) => Ok(step),
                    Ok(None) => applier.handle(record.payload, stop).await,
                    Err(e) => Err(e),
                };
                if !matches!(step, Ok(Step::Continue)) {
                    break;
                }
            }
        }
        let mut applied_ahead = false;
        if idle && matches!(step, Ok(Step::Continue)) {
            // Nothing more spooled for now: commit the whole transactions gathered so far
            // (a transaction still being spooled stays open until its commit arrives).
            if applier.batch.open && !applier.batch.in_source_transaction {
                step = applier.commit().await.map(|()| Step::Continue);
                progress_tx.send_replace(applier.progress);
            }
            // Then apply a streamed transaction ahead of its commit (`ahead.rs`).
            if matches!(step, Ok(Step::Continue)) {
                match applier.apply_ahead(stop).await {
                    Ok(applied) => applied_ahead = applied,
                    Err(e) => {
                        tracing::debug!("apply: {e:#}");
                        // Given up: nothing waits for a table's copy on its behalf.
                        applier.waiting = None;
                        step = Ok(Step::Rewind);
                    }
                }
            }
        }
        // Done means every batch committed: wait for those in flight.
        let step = match step {
            Ok(Step::Done) => applier
                .lanes
                .drain(&mut applier.progress)
                .await
                .map(|()| Step::Done),
            other => other,
        };
        match step {
            Ok(Step::Continue) => {}
            Ok(Step::Rewind) => {
                applier.rewind().await?;
                continue;
            }
            Ok(Step::Done) => {
                let lane = applier.lane.client.clone();
                let clients: Vec<Arc<Client>> = std::iter::once(lane)
                    .chain(applier.lanes.idle_clients().cloned())
                    .collect();
                return finish(&clients, origin, applier.progress, progress_tx).await;
            }
            // A batch applied beside others failed: whatever the cause (two batches that met
            // on a value the keys did not compare, a lock wait past the timeout, or a real
            // error), it is re-run alone after every earlier batch committed, where it either
            // succeeds or fails as single-lane apply would, with the same handling.
            Err(e) if applier.failed_in_parallel(&e) => {
                let (through, cause) = match e.downcast_ref::<ParallelFailure>() {
                    Some(failure) => (failure.through_seq, &failure.error),
                    None => (applier.after_seq, &e),
                };
                log_fallback(cause, applier.progress.applied);
                applier.serial_through = applier.serial_through.max(through);
                applier.rewind().await?;
                continue;
            }
            // A deadlock or serialization failure with a session on the target rolled the
            // batch back: re-run it from the last commit, a few times.
            Err(e)
                if classify(&e) == ErrorClass::Conflict && {
                    if conflicts.0 != applier.progress.applied {
                        conflicts = (applier.progress.applied, 0);
                    }
                    conflicts.1 += 1;
                    conflicts.1 <= MAX_CONFLICT_RETRIES
                } =>
            {
                tracing::warn!(
                    "apply: {e:#}; re-running the batch after {} (attempt {} of {MAX_CONFLICT_RETRIES})",
                    applier.progress.applied,
                    conflicts.1
                );
                applier.rewind().await?;
                tokio::time::sleep(Duration::from_millis(100 * u64::from(conflicts.1))).await;
                continue;
            }
            Err(e)
                if applier.batch.used_sets
                    && classify(&e) != ErrorClass::Transient
                    && !e.is::<ddl::DdlStopped>() =>
            {
                // A merged statement failed (a transient conflict inside the batch, or a real
                // divergence): replay this batch one row at a time, which either applies it
                // or stops with the precise row that fails.
                tracing::warn!(
                    "apply: a multi-row statement failed ({e:#}); replaying the batch one row at a time"
                );
                applier.one_row_at_a_time_through = applier.after_seq;
                applier.rewind().await?;
                continue;
            }
            Err(e) => return Err(explain_wal2json_null(plugin, e)),
        }
        if applier.batch.transactions > 0 || applier.batch.open || applier.lanes.parallel() {
            progress_tx.send_replace(applier.progress);
        }
        if idle && !applied_ahead {
            tokio::time::sleep(IDLE_POLL).await;
        }
        if last_progress_read.elapsed() >= Duration::from_secs(1) {
            // The origin's flushed position, or further where batches that wrote nothing
            // moved it (`SkippedTail`).
            applier.progress.durable = durable_progress(&applier.lane.client, origin)
                .await?
                .max(applier.progress.durable);
            if let Some(tail) = applier.skipped_tail
                && tail.apply(&mut applier.progress)
            {
                applier.skipped_tail = None;
            }
            progress_tx.send_replace(applier.progress);
            applier.reader.prune_through(applier.progress.durable)?;
            last_progress_read = Instant::now();
        }
    }
}

/// wal2json prints NaN and ±Infinity of numeric, real and double precision columns as null:
/// a NOT NULL violation on the target is most likely one of them (`check` warned about these
/// columns). Apply stops there rather than write a wrong value; this says why.
fn explain_wal2json_null(plugin: Plugin, e: anyhow::Error) -> anyhow::Error {
    if plugin == Plugin::Wal2json && sqlstate(&e).as_deref() == Some("23502") {
        e.context("wal2json sent null for a NOT NULL column: the source value is most likely NaN, Infinity or -Infinity in a numeric, real or double precision column, which wal2json prints as null. Nothing of this transaction was applied; migrate this table with --plugin pgoutput")
    } else {
        e
    }
}

/// Says that a batch applied beside others failed and is re-run alone after `applied`.
fn log_fallback(error: &anyhow::Error, applied: Lsn) {
    tracing::info!(
        "apply: a batch applied beside others failed ({error:#}); re-running it alone after {applied} to tell a conflict between batches from a real error"
    );
}

/// What the apply loop does after a spool record.
#[derive(Debug)]
enum Step {
    Continue,
    /// Roll back the open target transaction and read again after the last commit.
    Rewind,
    /// Every transaction up to endpos is committed.
    Done,
}

/// The apply loop's state between spool records.
struct Applier<'a> {
    /// The lane the open batch is filled on (the only one with `--apply-jobs 1`).
    lane: Lane,
    /// The other lanes, and the batches in flight on them (`lanes.rs`).
    lanes: Lanes,
    /// Records up to this sequence number are applied one batch at a time: a batch of theirs
    /// failed beside others.
    serial_through: i64,
    reader: SpoolReader,
    plugin: Plugin,
    decoder: StreamDecoder,
    tables: HashMap<u32, TargetTable>,
    batch: Batch,
    progress: Progress,
    /// Batches that wrote nothing, not yet counted as durable.
    skipped_tail: Option<SkippedTail>,
    /// The spool sequence number of the last record read.
    after_seq: i64,
    /// Records up to this sequence number are applied one statement per row: a merged
    /// statement of their batch failed.
    one_row_at_a_time_through: i64,
    resynced: &'a mut Resynced,
    /// The table (and commit LSN) whose copy apply waits for after its rewind.
    waiting: Option<(String, Lsn)>,
    /// The commit LSN of the source transaction being read.
    final_lsn: Lsn,
    /// Inside a transaction that was already applied (re-sent by the source).
    skipping: bool,
    /// Inside a transaction the forward apply wrote (a reverse stream's echo): its changes
    /// are skipped, its commit still counts.
    echo: bool,
    echo_origin: Option<&'a str>,
    /// Relations read back from the spool on a resume, matched with the target on first use.
    undescribed: HashMap<u32, Relation>,
    /// wal2json sends one message per table of a TRUNCATE: the tables gathered so far, and
    /// RESTART IDENTITY, applied as one statement at the next other change (a TRUNCATE of a
    /// table referenced by a foreign key is refused unless the other table is in it too).
    pending_truncate: Option<(Vec<u32>, bool)>,
    ddl: &'a ddl::DdlRules,
    /// The rank of the next schema change in the current source transaction.
    ddl_ordinal: u32,
    /// The query strings replayed in the current source transaction.
    ddl_replayed: HashSet<String>,
    /// Relations whose changes apply leaves aside: the DDL log table (its rows are schema
    /// changes) and tables the migration does not follow.
    set_aside: HashSet<u32>,
    /// The DDL log table's relation in the stream (12, 13).
    ddl_log: Option<u32>,
    /// The schema change apply stopped on, with the commit LSN of its source transaction:
    /// after a rewind, the batch is committed at that transaction's Begin, then apply stops.
    ddl_stop_before: Option<(Lsn, anyhow::Error)>,
    /// A streamed transaction applied ahead of its commit (`ahead.rs`).
    ahead: ahead::AheadState,
}

impl Applier<'_> {
    /// Whether an error comes from a batch applied beside others (see `lanes.rs`): it is then
    /// re-run alone rather than handled as single-lane apply would.
    fn failed_in_parallel(&self, e: &anyhow::Error) -> bool {
        e.is::<ParallelFailure>()
            || (self.batch.parallel
                && classify(e) != ErrorClass::Transient
                && !e.is::<ddl::DdlStopped>()
                && !e.is::<lanes::LaneLost>())
    }

    /// Waits for every batch in flight (schema changes, truncates and new descriptions of a
    /// table see the target as single-lane apply would).
    async fn barrier(&mut self) -> Result<()> {
        self.lanes.drain(&mut self.progress).await
    }

    /// Drops a relation's prepared statements on every lane.
    fn forget(&mut self, oid: u32) {
        self.lane.statements.forget(oid);
        self.lanes.forget(oid);
    }

    /// Whether a relation's changes are left aside (see `set_aside`); records it if so.
    fn sets_aside(&mut self, r: &Relation) -> Result<bool> {
        let is_log = self.ddl.is_log_table(&r.schema, &r.name);
        if is_log {
            self.ddl_log = Some(r.oid);
        }
        let qualified = crate::pg::qualified(&r.schema, &r.name);
        // A table joined by `follow --add-table` is followed whatever the filters this run
        // started with: its sync record decides (joins.rs).
        self.resynced.relation(&qualified)?;
        let aside = is_log
            || (!self.resynced.has_sync(&qualified)
                && ddl::ignores_changes(self.ddl, &r.schema, &r.name));
        if aside {
            self.set_aside.insert(r.oid);
        } else {
            self.set_aside.remove(&r.oid);
        }
        Ok(aside)
    }

    /// What follows a schema change: go on, or, when apply stops on it while the batch holds
    /// earlier whole transactions, roll back and read again, committing those before stopping
    /// (see `ddl_stop_before`).
    fn after_ddl(&mut self, replayed: Result<()>) -> Result<Step> {
        match replayed {
            Err(e) if e.is::<ddl::DdlStopped>() && self.batch.transactions > 0 => {
                self.ddl_stop_before = Some((self.final_lsn, e));
                Ok(Step::Rewind)
            }
            other => other.map(|()| Step::Continue),
        }
    }

    /// Replays a captured schema change at its place in the transaction.
    async fn replay_ddl(&mut self, content: &[u8]) -> Result<()> {
        self.barrier().await?;
        // Later batches must see the target's new schema: this batch commits before them.
        self.batch.barrier = true;
        self.send_queued().await?;
        self.ddl_ordinal += 1;
        let id = crate::state::DdlId {
            commit: self.final_lsn,
            ordinal: self.ddl_ordinal,
        };
        if ddl::replay(
            &self.lane.client,
            self.ddl,
            id,
            content,
            &mut self.ddl_replayed,
        )
        .await?
        {
            // The target's tables may have changed: describe them again at their next change.
            let tables: Vec<(u32, TargetTable)> = self.tables.drain().collect();
            for (oid, table) in tables {
                self.forget(oid);
                self.undescribed.insert(oid, table.source);
            }
        }
        Ok(())
    }

    /// Matches a relation read back at resume with the target, now that a change needs it.
    async fn describe_pending(&mut self, oid: u32) -> Result<()> {
        if let Some(relation) = self.undescribed.remove(&oid) {
            let table = TargetTable::describe(&self.lane.client, relation).await?;
            self.tables.insert(oid, table);
        }
        Ok(())
    }

    /// What to do with a change of this relation in the current transaction: apply it, skip
    /// it (already in the table's copy, or the table is no longer followed), or wait for the
    /// table's copy (then `waiting` names it).
    fn in_copy(&mut self, oid: u32) -> Result<joins::Decision> {
        let Some(table) = self.tables.get(&oid) else {
            return Ok(joins::Decision::Apply);
        };
        let decision = self.resynced.decide_now(&table.qualified, self.final_lsn)?;
        if decision == joins::Decision::Wait {
            self.waiting = Some((table.qualified.clone(), self.final_lsn));
        }
        Ok(decision)
    }

    async fn handle(&mut self, payload: bytes::Bytes, stop: &StopRule) -> Result<Step> {
        for change in self.decoder.decode(payload)? {
            let step = self.handle_change(change, stop).await?;
            if !matches!(step, Step::Continue) {
                return Ok(step);
            }
        }
        Ok(Step::Continue)
    }

    async fn handle_change(&mut self, change: Change, stop: &StopRule) -> Result<Step> {
        if !matches!(change, Change::Truncate { .. } | Change::Relation(_))
            && let Some((relations, restart_identity)) = self.pending_truncate.take()
        {
            let step = self.truncate(relations, restart_identity).await?;
            if !matches!(step, Step::Continue) {
                return Ok(step);
            }
        }
        match change {
            Change::Relation(r) if self.sets_aside(&r)? => {
                self.undescribed.remove(&r.oid);
                self.tables.remove(&r.oid);
            }
            Change::Relation(r) => {
                self.barrier().await?;
                self.send_queued().await?;
                self.undescribed.remove(&r.oid);
                let table = TargetTable::describe(&self.lane.client, r).await?;
                self.forget(table.source.oid);
                self.resynced.relation(&table.qualified)?;
                self.tables.insert(table.source.oid, table);
            }
            Change::Begin { final_lsn, .. } if final_lsn < self.dispatched() => {
                // Committed before what the target has applied: the source sent it again
                // (its slot's confirmed position lagged behind the origin). Skip it whole.
                tracing::debug!(
                    "apply: skipping a transaction committed at {final_lsn}, already applied (target at {})",
                    self.progress.applied
                );
                self.skipping = true;
            }
            Change::Commit { .. } if self.skipping => self.skipping = false,
            // Relation messages still describe the tables for what follows.
            _ if self.skipping && !matches!(change, Change::Relation(_)) => {}
            Change::Begin { final_lsn, .. }
                if self
                    .ddl_stop_before
                    .as_ref()
                    .is_some_and(|(at, _)| final_lsn >= *at) =>
            {
                // Every whole transaction before the one holding the schema change apply
                // stopped on is committed first, so that the target is exactly where the
                // operator's decision (`pgtide ddl skip|retry`) applies.
                self.commit_here().await?;
                if let Some((_, stopped)) = self.ddl_stop_before.take() {
                    return Err(stopped);
                }
            }
            Change::Origin { name, .. }
                if self
                    .echo_origin
                    .is_some_and(|origin| is_echo(origin, &name)) =>
            {
                tracing::debug!(
                    "apply: skipping the transaction committed at {} (origin {name}: the forward apply's own, not echoed back)",
                    self.final_lsn
                );
                self.echo = true;
            }
            Change::Insert { .. }
            | Change::Update { .. }
            | Change::Delete { .. }
            | Change::Truncate { .. }
            | Change::Message { .. }
                if self.echo => {}
            Change::Begin { final_lsn, .. } => {
                self.echo = false;
                self.final_lsn = final_lsn;
                self.ddl_ordinal = 0;
                self.ddl_replayed.clear();
                // Copied out of the watch first: its guard held across the commit's await
                // blocks the endpos poller's send, which blocks a worker thread (and whatever
                // task waits in its queue, the target connection's included): a deadlock seen
                // under load.
                let endpos = *stop.endpos.borrow();
                if let Some(endpos) = endpos
                    && final_lsn > endpos
                {
                    tracing::debug!(
                        "apply: transaction committing at {final_lsn} is past endpos {endpos}: done"
                    );
                    self.commit().await?;
                    return Ok(Step::Done);
                }
                if self.batch.in_source_transaction {
                    // The receiver lost its connection inside this transaction and the
                    // source sent it again from its beginning (the spool dropped the partial
                    // copy). Undo everything not yet committed and read again from the last
                    // committed transaction: nothing applied twice.
                    tracing::warn!(
                        "apply: a transaction was re-sent by the source; re-reading the spool after {}",
                        self.progress.applied
                    );
                    return Ok(Step::Rewind);
                }
                if !self.batch.open {
                    // Beside other batches only past the ones being re-run alone; a lock wait
                    // then ends after a timeout (see `lanes::LOCK_TIMEOUT`).
                    self.batch.parallel =
                        self.lanes.parallel() && self.after_seq > self.serial_through;
                    let begin = if self.batch.parallel {
                        format!("BEGIN; SET LOCAL lock_timeout = '{}'", lanes::LOCK_TIMEOUT)
                    } else {
                        "BEGIN".to_string()
                    };
                    self.lane
                        .client
                        .batch_execute(&begin)
                        .await
                        .map_err(|e| target_error(&e, "cannot begin on the target"))?;
                    self.batch.open = true;
                    self.batch.started = Instant::now();
                }
                self.batch.in_source_transaction = true;
            }
            Change::Commit {
                end_lsn,
                commit_time,
                ..
            } => {
                self.echo = false;
                self.batch.transactions += 1;
                self.batch.last_commit = Some((end_lsn, commit_time));
                self.batch.in_source_transaction = false;
                self.ahead.done();
                let (transactions, changes) = if self.batch.parallel {
                    (PARALLEL_BATCH_TRANSACTIONS, PARALLEL_BATCH_CHANGES)
                } else {
                    (BATCH_TRANSACTIONS, BATCH_CHANGES)
                };
                if self.batch.transactions >= transactions
                    || self.batch.changes >= changes
                    || self.batch.started.elapsed() >= BATCH_TIME
                {
                    self.commit().await?;
                }
            }
            Change::Truncate {
                relations,
                cascade: _,
                restart_identity,
            } if self.plugin == Plugin::Wal2json => {
                let pending = self
                    .pending_truncate
                    .get_or_insert_with(|| (Vec::new(), restart_identity));
                pending.0.extend(relations);
            }
            Change::Truncate {
                relations,
                cascade: _,
                restart_identity,
            } => return self.truncate(relations, restart_identity).await,
            Change::Message {
                transactional: true,
                prefix,
                content,
                ..
            } if self.ddl.prefix.as_deref() == Some(prefix.as_str()) => {
                let replayed = self.replay_ddl(&content).await;
                return self.after_ddl(replayed);
            }
            Change::Insert { relation, new } if self.ddl_log == Some(relation) => {
                // The DDL log table's row: (id, message).
                match new.get(1) {
                    Some(crate::decode::Value::Text(message)) => {
                        let message = message.clone();
                        let replayed = self.replay_ddl(&message).await;
                        return self.after_ddl(replayed);
                    }
                    _ => bail!("a row of the DDL log table without its message: report it"),
                }
            }
            Change::Insert { .. } | Change::Update { .. } | Change::Delete { .. }
                if change
                    .relation()
                    .is_some_and(|oid| self.set_aside.contains(&oid)) => {}
            Change::Insert { .. } | Change::Update { .. } | Change::Delete { .. } => {
                let Some(oid) = change.relation() else {
                    return Ok(Step::Continue);
                };
                self.describe_pending(oid).await?;
                if let Some(table) = self.tables.get(&oid) {
                    table.source.check_width(&change)?;
                }
                match self.in_copy(oid)? {
                    joins::Decision::Apply => {}
                    joins::Decision::Skip => return Ok(Step::Continue),
                    joins::Decision::Wait => return Ok(Step::Rewind),
                }
                let change = match self.tables.get(&oid) {
                    Some(table) => table.without_generated(change),
                    None => change,
                };
                if self.batch.parallel
                    && let Some(table) = self.tables.get(&oid)
                {
                    let touched = keys::of_change(table, &change);
                    if let Some(earlier) = self.lanes.conflict(&touched) {
                        self.lanes.wait_through(earlier, &mut self.progress).await?;
                    }
                    self.batch.keys.add(touched);
                }
                let lane = &mut self.lane;
                // (0: no such records. A transaction applied ahead of its commit is read
                // before any record of the queue, at `after_seq` 0 in a new spool.)
                if self.one_row_at_a_time_through > 0
                    && self.after_seq <= self.one_row_at_a_time_through
                {
                    lane.statements
                        .apply(&lane.client, &self.tables, &change)
                        .await?;
                } else {
                    self.batch.used_sets = true;
                    lane.sets
                        .push(&mut lane.statements, &lane.client, &self.tables, change)
                        .await?;
                }
                self.count_change();
            }
            // Messages, origins and types need nothing on the target.
            _ => {}
        }
        Ok(Step::Continue)
    }

    /// Applies a TRUNCATE of these relations (never CASCADE; a table resynced after it keeps
    /// its copy); `Rewind` when one of them waits for its copy.
    async fn truncate(&mut self, relations: Vec<u32>, restart_identity: bool) -> Result<Step> {
        let relations: Vec<u32> = relations
            .into_iter()
            .filter(|oid| !self.set_aside.contains(oid))
            .collect();
        if relations.is_empty() {
            return Ok(Step::Continue);
        }
        for oid in &relations {
            self.describe_pending(*oid).await?;
        }
        let listed = relations.len();
        let mut kept = Vec::with_capacity(listed);
        for oid in relations {
            match self.in_copy(oid)? {
                joins::Decision::Apply => kept.push(oid),
                joins::Decision::Skip => {}
                joins::Decision::Wait => return Ok(Step::Rewind),
            }
        }
        let relations = kept;
        if relations.is_empty() {
            return Ok(Step::Continue);
        }
        self.barrier().await?;
        self.batch.barrier = true;
        self.send_queued().await?;
        if relations.len() < listed {
            // A table of this truncate was resynced after it and keeps its copy; a
            // TRUNCATE of the others alone would be refused by the foreign keys
            // between them. Emptied row by row instead (foreign keys are not checked
            // in the apply session): the same final state.
            self.lane
                .statements
                .delete_all(&self.lane.client, &self.tables, &relations)
                .await?;
        } else {
            // Never CASCADE on the target: the source already lists every table its
            // cascade emptied. The same rule as native logical replication.
            let change = Change::Truncate {
                relations,
                cascade: false,
                restart_identity,
            };
            self.lane
                .statements
                .apply(&self.lane.client, &self.tables, &change)
                .await?;
        }
        self.count_change();
        Ok(Step::Continue)
    }

    fn count_change(&mut self) {
        self.batch.changes += 1;
        self.progress.changes += 1;
    }

    /// Sends the queued runs and row statements and checks their results.
    async fn send_queued(&mut self) -> Result<()> {
        let lane = &mut self.lane;
        if !lane.sets.is_empty() {
            lane.sets
                .send(&mut lane.statements, &lane.client, &self.tables)
                .await?;
        }
        lane.statements.flush().await
    }

    /// Ends the open batch: commits it here, or, beside other batches, hands it with its lane
    /// to a task that commits it in its turn and goes on with an idle lane.
    async fn commit(&mut self) -> Result<()> {
        let handed_over = match self.batch.last_commit {
            // A batch with no change is committed here, where its skipped range is counted.
            Some((end_lsn, commit_time))
                if self.batch.open
                    && self.batch.parallel
                    && !self.batch.barrier
                    && self.batch.changes > 0 =>
            {
                (end_lsn, commit_time)
            }
            _ => return self.commit_here().await,
        };
        if self.batch.in_source_transaction {
            bail!("internal error: a target commit inside a source transaction");
        }
        let (end_lsn, commit_time) = handed_over;
        let lane = &mut self.lane;
        lane.sets
            .hand_over(&mut lane.statements, &lane.client, &self.tables)
            .await?;
        let next = self.lanes.take_idle(&mut self.progress).await?;
        let lane = std::mem::replace(&mut self.lane, next);
        let batch = std::mem::take(&mut self.batch);
        self.lanes.launch(
            lane,
            Sealed {
                keys: batch.keys,
                end_lsn,
                commit_time,
                transactions: batch.transactions,
                changes: batch.changes,
                through_seq: self.after_seq,
            },
        );
        Ok(())
    }

    /// Commits the open batch on this lane, after every batch in flight.
    async fn commit_here(&mut self) -> Result<()> {
        self.barrier().await?;
        self.send_queued().await?;
        if let Some((before, end)) = self
            .batch
            .commit(&self.lane.client, &mut self.progress)
            .await?
        {
            let tail = SkippedTail::extend(self.skipped_tail, before, end);
            self.skipped_tail = (!tail.apply(&mut self.progress)).then_some(tail);
        }
        Ok(())
    }

    /// The end of the last whole source transaction committed or handed to a lane: a
    /// transaction the source sends again that commits before it was applied already.
    fn dispatched(&self) -> Lsn {
        self.lanes
            .last_launched_end()
            .map_or(self.progress.applied, |end| end.max(self.progress.applied))
    }

    /// Rolls back the open target transaction and reads the spool again after the last
    /// committed source transaction.
    async fn rewind(&mut self) -> Result<()> {
        self.ahead.give_up();
        self.lane.sets.discard();
        self.lane.statements.discard();
        if self.batch.open {
            self.lane
                .client
                .batch_execute("ROLLBACK")
                .await
                .map_err(|e| target_error(&e, "cannot roll back on the target"))?;
        }
        self.progress.changes -= self.batch.changes as u64;
        self.batch = Batch::default();
        // The batches in flight (all earlier than the one rolled back) commit in their turn
        // or roll back; the target's position is then the one to read again from.
        if let Err(e) = self.barrier().await {
            match e.downcast::<ParallelFailure>() {
                Ok(failure) => {
                    log_fallback(&failure.error, self.progress.applied);
                    self.serial_through = self.serial_through.max(failure.through_seq);
                }
                Err(e) => return Err(e),
            }
        }
        self.skipping = false;
        self.after_seq = self.reader.seq_through(self.progress.applied)?;
        self.decoder = StreamDecoder::new(self.plugin);
        self.pending_truncate = None;
        // Rolled back because a table's copy is not ready: wait for it, holding no lock.
        if let Some((table, commit)) = self.waiting.take() {
            self.resynced.wait(&table, commit).await?;
        }
        Ok(())
    }
}

async fn finish(
    lanes: &[Arc<Client>],
    origin: &str,
    mut progress: Progress,
    progress_tx: &watch::Sender<Progress>,
) -> Result<Lsn> {
    // Make the last commits durable before saying so.
    for target in lanes {
        target
            .batch_execute(
                "SET synchronous_commit = on; SELECT pg_replication_origin_session_progress(true)",
            )
            .await
            .ok();
    }
    let Some(first) = lanes.first() else {
        bail!("internal error: apply finished without a target connection");
    };
    progress.durable = durable_progress(first, origin).await?.max(progress.durable);
    progress_tx.send_replace(progress);
    Ok(progress.applied)
}

/// Batches that wrote nothing leave the origin where it was, yet they are as durable as what
/// came before them: once `durable` reaches `needs` (the origin covers every real commit
/// before them), it may move to `then` (else status would count their transactions as
/// pending, and the spool would keep them, until the next real change).
#[derive(Clone, Copy, Debug, Default)]
struct SkippedTail {
    needs: Lsn,
    then: Lsn,
}

impl SkippedTail {
    /// A batch that wrote nothing committed, from `before` (the applied position) to `end`.
    fn extend(tail: Option<SkippedTail>, before: Lsn, end: Lsn) -> SkippedTail {
        match tail {
            // Right after the previous one: the same condition, a further end.
            Some(t) if t.then == before => SkippedTail {
                needs: t.needs,
                then: end,
            },
            _ => SkippedTail {
                needs: before,
                then: end,
            },
        }
    }

    /// Moves `progress.durable` past the tail when it may; true when the tail is used up.
    fn apply(self, progress: &mut Progress) -> bool {
        if progress.durable >= self.needs {
            progress.durable = progress.durable.max(self.then);
            return true;
        }
        false
    }
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
    /// Some of its changes went through multi-row statements.
    used_sets: bool,
    /// Applied beside other batches (`lanes.rs`).
    parallel: bool,
    /// Holds a schema change or a truncate: committed before any later batch starts.
    barrier: bool,
    /// What the batch touches, when it runs beside others (`keys.rs`).
    keys: KeySet,
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
            used_sets: false,
            parallel: false,
            barrier: false,
            keys: KeySet::default(),
        }
    }
}

impl Batch {
    /// Commits the batch; returns (the applied position before it, its end) when it wrote
    /// nothing (see `SkippedTail`).
    async fn commit(
        &mut self,
        target: &Client,
        progress: &mut Progress,
    ) -> Result<Option<(Lsn, Lsn)>> {
        if !self.open {
            return Ok(None);
        }
        if self.in_source_transaction {
            bail!("internal error: a target commit inside a source transaction");
        }
        let Some((end_lsn, commit_time)) = self.last_commit else {
            target.batch_execute("ROLLBACK").await.ok();
            self.open = false;
            return Ok(None);
        };
        // A batch whose every change was skipped (in a table's copy, or of a table no longer
        // followed) writes nothing: PostgreSQL then logs no commit record, so the origin does
        // not move past it (`SkippedTail`).
        let wrote_nothing = self.changes == 0
            && target
                .query_one("SELECT txid_current_if_assigned() IS NULL", &[])
                .await
                .map_err(|e| target_error(&e, "cannot read the transaction state on the target"))?
                .get::<_, bool>(0);
        let before = progress.applied;
        commit_with_origin(target, end_lsn, commit_time).await?;
        progress.applied = end_lsn;
        progress.transactions += self.transactions as u64;
        *self = Batch::default();
        Ok(wrote_nothing.then_some((before, end_lsn)))
    }
}

/// Commits the target transaction with the origin advanced to the source transaction's end
/// in the same transaction (invariant 2).
async fn commit_with_origin(target: &Client, end_lsn: Lsn, commit_time: i64) -> Result<()> {
    target
        .execute(
            "SELECT pg_replication_origin_xact_setup($1::text::pg_lsn, '2000-01-01 00:00:00+00'::timestamptz + $2::bigint * interval '1 microsecond')",
            &[&end_lsn.to_string(), &commit_time],
        )
        .await
        .map_err(|e| target_error(&e, "cannot record the origin position on the target"))?;
    fail::fail_point!(crate::failpoints::APPLY_BEFORE_COMMIT);
    target
        .batch_execute("COMMIT")
        .await
        .map_err(|e| target_error(&e, "cannot commit on the target"))?;
    fail::fail_point!(crate::failpoints::APPLY_AFTER_COMMIT);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_forward_apply_and_its_lanes_are_echoes_and_nothing_else_is() {
        assert!(super::is_echo("pgtide_s", "pgtide_s"));
        assert!(super::is_echo("pgtide_s", "pgtide_s.lane3"));
        assert!(!super::is_echo("pgtide_s", "pgtide_s2"));
        assert!(!super::is_echo("pgtide_s", "pgtide_s.lane"));
        assert!(!super::is_echo("pgtide_s", "pg_16384"));
    }

    use super::{Lsn, Progress, SkippedTail};

    #[test]
    fn a_skipped_tail_becomes_durable_once_what_precedes_it_is() {
        // Nothing applied yet: the first empty batch is durable at once.
        let mut progress = Progress {
            applied: Lsn(20),
            durable: Lsn(10),
            ..Default::default()
        };
        let tail = SkippedTail::extend(None, Lsn(10), Lsn(20));
        assert!(tail.apply(&mut progress));
        assert_eq!(progress.durable, Lsn(20));

        // After a real commit at 30 not yet flushed: two empty batches wait for it together.
        progress.durable = Lsn(20);
        let tail = SkippedTail::extend(None, Lsn(30), Lsn(40));
        let tail = SkippedTail::extend(Some(tail), Lsn(40), Lsn(50));
        assert!(!tail.apply(&mut progress));
        assert_eq!(progress.durable, Lsn(20));
        // The origin reaches 30: the whole tail is durable.
        progress.durable = Lsn(30);
        assert!(tail.apply(&mut progress));
        assert_eq!(progress.durable, Lsn(50));

        // A real commit between two empty batches: the tail waits for that one.
        let tail = SkippedTail::extend(
            Some(SkippedTail {
                needs: Lsn(60),
                then: Lsn(70),
            }),
            Lsn(80),
            Lsn(90),
        );
        assert_eq!((tail.needs, tail.then), (Lsn(80), Lsn(90)));
    }
}
