//! The follow engine (`pgtide follow`, the follow half of `clone --follow`, and a cutover with
//! no follow running): the receiver task spools the stream while apply replays it on the
//! target (reconnecting on what errors.rs calls transient), the recorder task publishes
//! apply's progress for status and the metrics, and the endpos task (`endpos.rs`, the one
//! endpos rule) follows the sentinel; at endpos the sequences are set.

mod clone;
mod endpos;
mod liveness;
mod recorder;
pub mod table_sync;

pub use clone::{ApplyGate, CloneFollow, clone_and_follow, interruptible};
pub use endpos::set_endpos;
pub use liveness::LIVENESS_TIMEOUT;
use liveness::Liveness;

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::apply::{self, Progress, StopRule};
use crate::clone::sequences;
use crate::conninfo::ConnInfo;
use crate::errors::{ErrorClass, classify};
use crate::pg::{self, Lsn, Side, catalog};
use crate::replication::stream::{self, ReceiveOptions};
use crate::state::{Phase, StateDb};
use crate::workdir::WorkDir;

/// A receiver running in the background, and what it publishes.
pub struct Receiver {
    task: JoinHandle<Result<()>>,
    pub progress: watch::Sender<Progress>,
    liveness: Liveness,
}

/// Starts spooling the work dir's stream (set up by `stream setup` or `clone --follow`).
pub fn start_receiver(source: &ConnInfo, workdir: &WorkDir) -> Result<Receiver> {
    let state = workdir.state.clone();
    let stream = state
        .stream()?
        .ok_or_else(|| anyhow!("the work dir {} has no stream: start with `pgtide clone --follow` or `pgtide stream setup`", workdir.path.display()))?;
    let (progress, progress_rx) = watch::channel(Progress::default());
    let opts = ReceiveOptions {
        publications: crate::replication::setup::recorded_publications(&stream),
        slot: stream.slot,
        plugin: stream.plugin,
        start: stream.startpos.unwrap_or_default(),
        endpos: None,
        status_interval: Duration::from_secs(1),
        tables: stream.tables.unwrap_or_default(),
        system_id: stream.system_id,
        applied: Some(Box::new(move || progress_rx.borrow().durable)),
    };
    let mut spool = workdir.spool_writer()?;
    let liveness = Liveness::start(&state)?;
    let source = source.clone();
    let task = tokio::spawn(async move {
        let ended = stream::receive(&source, &mut spool, &state, &opts).await;
        spool.close()?;
        ended.map(|_| ())
    });
    Ok(Receiver {
        task,
        progress,
        liveness,
    })
}

/// Replays the spool until endpos (from `--endpos` or the sentinel, re-read every half
/// second), then sets the sequences from the source. Returns the last applied position. How
/// it ended (endpos, or the error) is recorded for cutover.
pub async fn apply_until_endpos(
    source: &ConnInfo,
    target: &ConnInfo,
    workdir: &WorkDir,
    receiver: Receiver,
) -> Result<Lsn> {
    let Receiver {
        task,
        progress,
        liveness,
    } = receiver;
    let result = apply_and_set_sequences(source, target, workdir, task, progress).await;
    liveness.stopped(result.as_ref().err().map(|e| format!("{e:#}")));
    result
}

async fn apply_and_set_sequences(
    source: &ConnInfo,
    target: &ConnInfo,
    workdir: &WorkDir,
    mut task: JoinHandle<Result<()>>,
    progress: watch::Sender<Progress>,
) -> Result<Lsn> {
    let state = workdir.state.clone();
    let slot = state.stream_slot()?.unwrap_or_default();
    refuse_inexact_wal2json(source, &state).await?;
    state.switch_apply_on()?;
    state.set_phase(Phase::Following)?;
    let (endpos_poller, endpos_rx) = endpos::follow_sentinel(&state, source)?;
    let mut stop = StopRule { endpos: endpos_rx };
    let recorder = recorder::start(&state, &progress);
    let mut resynced = apply::Resynced::load(&state)?;
    let origin = apply::origin_name(&slot);
    let ddl_rules = apply::ddl::DdlRules::load(&state)?;
    let echo_origin = state.echo_origin()?;
    let source_of_apply = apply::Source {
        dir: &workdir.path,
        plugin: state.stream_plugin()?,
        origin: &origin,
        ddl: &ddl_rules,
        echo_origin: echo_origin.as_deref(),
    };
    let jobs = state.apply_jobs()?.unwrap_or(DEFAULT_APPLY_JOBS);
    let mut clients = connect_lanes(target, jobs).await?;
    // Target settings a clone interrupted with --fast-restore on left changed: apply never
    // runs with them (the durability of applied changes is the target's own).
    if let Some(first) = clients.first() {
        crate::clone::fast_restore::restore(first, &state).await?;
    }
    let mut backoff = Duration::from_millis(500);
    let applied = loop {
        let result = tokio::select! {
            r = apply::run(&clients, &source_of_apply, &mut stop, &mut resynced, &progress) => r,
            r = &mut task => {
                endpos_poller.abort();
                return match r {
                    Ok(Ok(())) => Err(anyhow!("the receiver stopped before endpos was reached")),
                    Ok(Err(e)) => Err(e.context("the receiver failed")),
                    Err(e) => Err(anyhow!("the receiver crashed: {e}")),
                };
            }
        };
        match result {
            // A lost target connection (a restart, a terminated session): reconnect and
            // resume from the origin, which is exactly where the target's committed state ends.
            // Only what the one classification calls transient is retried (errors.rs): a
            // decode error, drift or bad input stops with its reason.
            Err(e) if classify(&e) == ErrorClass::Transient => {
                tracing::warn!("{e:#}; reconnecting to the target in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                match connect_lanes(target, jobs).await {
                    Ok(c) => clients = c,
                    Err(e) if classify(&e) == ErrorClass::Transient => {
                        tracing::warn!("the target is not back yet: {e:#}")
                    }
                    // A wrong password, a dropped database…: no reconnect will succeed.
                    Err(e) => break Err(e.context("cannot reconnect to the target")),
                }
            }
            other => break other,
        }
    };
    endpos_poller.abort();
    recorder.abort();
    let mut sequences_set = Ok(());
    if let Ok(applied) = &applied {
        recorder::record_progress(&state, &progress.borrow())?;
        state.set_phase(Phase::StoppedAtEndpos)?;
        state.record_applied_at_endpos(*applied)?;
        let final_progress = *progress.borrow();
        tracing::info!(
            "reached endpos: applied through {applied} ({} transactions, {} changes in this run)",
            final_progress.transactions,
            final_progress.changes
        );
        // Before endpos is recorded as reached: a cutover waiting for it sets the sequences
        // again and moves the application over, whose nextval a late setval here would undo.
        sequences_set = set_sequences(source, &clients[0], &state).await;
        if sequences_set.is_ok()
            && let Some(endpos) = *stop.endpos.borrow()
        {
            state.record_reached_endpos(endpos)?;
        }
    }
    // Give the receiver one status tick to report the final apply position, then stop it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    task.abort();
    let applied = applied?;
    sequences_set?;
    Ok(applied)
}

/// Sets the target's sequences from the source's, at endpos.
async fn set_sequences(
    source: &ConnInfo,
    target: &tokio_postgres::Client,
    state: &StateDb,
) -> Result<()> {
    let source_client = pg::connect(source, Side::Source, "sequences").await?;
    // The migration's recorded filters: a sequence it left out is not on the target.
    let filters = state.recorded_filters()?.unwrap_or_default();
    let seqs = catalog::read_sequences(&source_client, &filters).await?;
    // The offset a cutover asked for (recorded before it pinned endpos), 0 otherwise.
    let offset = state.sequence_offset()?;
    sequences::set_on_target(target, &seqs, offset).await?;
    tracing::info!(
        "set {} sequences on the target from the source (offset {offset})",
        seqs.len()
    );
    Ok(())
}

/// Apply lanes when the work dir records no `--apply-jobs`.
pub const DEFAULT_APPLY_JOBS: usize = 1;

/// One target connection per apply lane (`apply/lanes.rs`).
async fn connect_lanes(
    target: &ConnInfo,
    jobs: usize,
) -> Result<Vec<std::sync::Arc<tokio_postgres::Client>>> {
    let mut clients = Vec::with_capacity(jobs.max(1));
    for _ in 0..jobs.max(1) {
        clients.push(std::sync::Arc::new(
            pg::connect(target, Side::Target, "apply").await?,
        ));
    }
    Ok(clients)
}

/// Before applying a wal2json stream: refuses, naming them, the published nullable numeric
/// and float columns whose NaN / ±Infinity wal2json turns into NULL, unless the operator
/// accepted it (`--wal2json-nan-as-null`, recorded). `clone --follow` checked it before it
/// created anything; a stream set up by `stream setup` is checked here.
async fn refuse_inexact_wal2json(source: &ConnInfo, state: &StateDb) -> Result<()> {
    use crate::replication::{Plugin, wal2json as w};
    if state.stream_plugin()? != Plugin::Wal2json || state.wal2json_nan_as_null()? {
        return Ok(());
    }
    let tables = state
        .stream()?
        .and_then(|stream| stream.tables)
        .unwrap_or_default();
    let client = pg::connect(source, Side::Source, "wal2json columns").await?;
    let columns = w::inexact_columns(&client, &tables).await?;
    if columns.iter().any(|c| !c.not_null) {
        bail!(
            "{}. Nothing was applied. Fix: {}",
            w::nullable_message(&columns, false),
            w::NULLABLE_FIX
        );
    }
    Ok(())
}
