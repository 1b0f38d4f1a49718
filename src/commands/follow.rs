//! `pgtide follow` (and the follow half of `clone --follow`): the receiver spools the stream
//! while apply replays it on the target, until the sentinel's endpos; then sequences are set.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::apply::{self, Progress, StopRule};
use crate::cli::FollowArgs;
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

/// Heartbeat seconds: cutover takes a follow whose heartbeat is older than
/// `LIVENESS_TIMEOUT` for dead.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How old a follow's heartbeat may get before cutover says that apply is not running.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(5);

/// The follow process's liveness in state.db: a heartbeat every second from a thread of its
/// own (so a busy or blocked async runtime does not fake a death), until dropped or the
/// process dies; `stopped` records how it ended. Cutover reads it while it waits, so that a
/// dead follow is reported within seconds, not at the end of --timeout.
struct Liveness {
    state: StateDb,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Liveness {
    fn start(state: &StateDb) -> Result<Self> {
        let pid = std::process::id();
        state.follow_started(pid)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (beat_state, beat_stop) = (state.clone(), stop.clone());
        std::thread::Builder::new()
            .name("pgtide-heartbeat".into())
            .spawn(move || {
                while !beat_stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(HEARTBEAT);
                    if let Err(e) = beat_state.follow_heartbeat(pid) {
                        tracing::warn!("cannot record the follow heartbeat: {e:#}");
                    }
                }
            })?;
        Ok(Liveness {
            state: state.clone(),
            stop,
        })
    }

    /// Records that this follow stopped: at endpos (None) or on an error.
    fn stopped(&self, error: Option<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self
            .state
            .follow_stopped(std::process::id(), error.as_deref())
        {
            tracing::warn!("cannot record that the follow stopped: {e:#}");
        }
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Starts spooling the work dir's stream (set up by `stream setup` or `clone --follow`).
pub fn start_receiver(source: &ConnInfo, workdir: &WorkDir) -> Result<Receiver> {
    let state = workdir.state.clone();
    let stream = state
        .stream()?
        .ok_or_else(|| anyhow!("the work dir {} has no stream: start with `pgtide clone --follow` or `pgtide stream setup`", workdir.path.display()))?;
    let (progress, progress_rx) = watch::channel(Progress::default());
    let opts = ReceiveOptions {
        publications: super::stream::recorded_publications(&stream),
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

/// Pins endpos, refusing one behind the position the target has already applied: the
/// transactions between them are on the target and cannot be taken back.
pub fn set_endpos(state: &StateDb, endpos: Lsn) -> Result<()> {
    if let Some(applied) = state.applied_lsn()?
        && endpos < applied
    {
        bail!(
            "endpos {endpos} is behind the position the target has already applied, {applied}: the transactions committed between them are on the target and cannot be taken back. Give an endpos at or after {applied} (`pgtide sentinel set endpos --current` takes the source's current position)"
        );
    }
    state.set_endpos(endpos)
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
    let (endpos_tx, endpos_rx) = watch::channel(state.endpos()?);
    let poll_state = state.clone();
    let marker_source = source.clone();
    let endpos_poller = tokio::spawn(async move {
        let mut marked: Option<Lsn> = None;
        let mut last_try = std::time::Instant::now() - Duration::from_secs(60);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Ok(endpos) = poll_state.endpos() {
                endpos_tx.send_if_modified(|current| {
                    let changed = *current != endpos;
                    *current = endpos;
                    changed
                });
                // Once the source is past endpos, a marker transaction after it lets apply
                // see that nothing committed before endpos is still to come.
                if let Some(endpos) = endpos
                    && marked != Some(endpos)
                    && last_try.elapsed() >= Duration::from_secs(2)
                {
                    last_try = std::time::Instant::now();
                    match stream::emit_endpos_marker(&marker_source, endpos).await {
                        Ok(true) => marked = Some(endpos),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!("cannot write the endpos marker on the source: {e:#}")
                        }
                    }
                }
            }
        }
    });
    let mut stop = StopRule { endpos: endpos_rx };
    // For `pgtide status` and the metrics: the apply positions and counters, every second.
    let recorder = {
        let state = state.clone();
        let progress = progress.subscribe();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let p = *progress.borrow();
                let _ = state.record_applied_lsn(p.applied);
                let _ = state.record_durable_lsn(p.durable);
                let _ =
                    state.apply_sample(std::process::id(), p.changes, p.transactions, p.applied.0);
            }
        })
    };
    let resynced = state.resync_positions()?;
    let origin = apply::origin_name(&slot);
    let source_of_apply = apply::Source {
        dir: &workdir.path,
        plugin: state.stream_plugin()?,
        origin: &origin,
    };
    let mut client = std::sync::Arc::new(pg::connect(target, Side::Target, "apply").await?);
    let mut backoff = Duration::from_millis(500);
    let applied = loop {
        let result = tokio::select! {
            r = apply::run(&client, &source_of_apply, &mut stop, &resynced, &progress) => r,
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
                match pg::connect(target, Side::Target, "apply").await {
                    Ok(c) => client = std::sync::Arc::new(c),
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
    if let Ok(applied) = &applied {
        record_progress(&state, &progress.borrow())?;
        state.set_phase(Phase::StoppedAtEndpos)?;
        state.record_applied_at_endpos(*applied)?;
        if let Some(endpos) = *stop.endpos.borrow() {
            state.record_reached_endpos(endpos)?;
        }
    }
    // Give the receiver one status tick to report the final apply position, then stop it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    task.abort();
    let applied = applied?;
    let final_progress = *progress.borrow();
    tracing::info!(
        "reached endpos: applied through {applied} ({} transactions, {} changes in this run)",
        final_progress.transactions,
        final_progress.changes
    );
    let source_client = pg::connect(source, Side::Source, "sequences").await?;
    // The migration's recorded filters: a sequence it left out is not on the target.
    let filters = state.recorded_filters()?.unwrap_or_default();
    let seqs = catalog::read_sequences(&source_client, &filters).await?;
    // The offset a cutover asked for (recorded before it pinned endpos), 0 otherwise.
    let offset = state.sequence_offset()?;
    sequences::set_on_target(&client, &seqs, offset).await?;
    tracing::info!(
        "set {} sequences on the target from the source (offset {offset})",
        seqs.len()
    );
    Ok(applied)
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

/// What status and the metrics read of apply: the durable position and a rate sample.
fn record_progress(state: &StateDb, p: &Progress) -> Result<()> {
    state.record_durable_lsn(p.durable)?;
    state.apply_sample(std::process::id(), p.changes, p.transactions, p.applied.0)
}

pub async fn run(args: FollowArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    let workdir = WorkDir::open(&args.dir, "follow")?;
    crate::preflight::preflight_follow(&crate::preflight::CheckOptions::new(
        source.clone(),
        Some(target.clone()),
        args.dir.clone(),
    ))
    .await?;
    super::start_metrics(args.metrics_addr.as_deref(), &workdir, &source, &target).await?;
    if let Some(endpos) = args.endpos {
        set_endpos(&workdir.state, endpos)?;
    }
    if args.wal2json_nan_as_null {
        workdir.state.record_wal2json_nan_as_null()?;
    }
    let receiver = start_receiver(&source, &workdir)?;
    let applied = tokio::select! {
        r = apply_until_endpos(&source, &target, &workdir, receiver) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted: rerun `pgtide follow` to continue; nothing applied is lost or applied twice")),
    };
    let applied = super::record_failure(&workdir.state, applied)?;
    println!(
        "reached endpos: applied through {applied}; sequences set. The slot is kept until `pgtide stream cleanup`."
    );
    Ok(())
}
