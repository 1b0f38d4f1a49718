//! `pgtide follow` (and the follow half of `clone --follow`): the receiver spools the stream
//! while apply replays it on the target, until the sentinel's endpos; then sequences are set.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::apply::{self, Progress, StopRule};
use crate::cli::FollowArgs;
use crate::clone::{filters::Filters, sequences};
use crate::conninfo::ConnInfo;
use crate::pg::{self, Lsn, Side, catalog};
use crate::replication::Plugin;
use crate::replication::stream::{self, ReceiveOptions};
use crate::state::StateDb;
use crate::workdir::WorkDir;

/// The sentinel keys in state.db (`pgtide sentinel get|set` reads and writes them).
pub const ENDPOS_KEY: &str = "sentinel.endpos";
pub const APPLY_KEY: &str = "sentinel.apply";
/// The endpos a follow stopped at, once everything up to it is applied (cutover waits on it).
pub const REACHED_KEY: &str = "sentinel.reached_endpos";

/// A receiver running in the background, and what it publishes.
pub struct Receiver {
    task: JoinHandle<Result<()>>,
    pub progress: watch::Sender<Progress>,
}

/// Starts spooling the work dir's stream (set up by `stream setup` or `clone --follow`).
pub fn start_receiver(source: &ConnInfo, workdir: &WorkDir) -> Result<Receiver> {
    let state = workdir.state.clone();
    let slot = state
        .get_meta("stream.slot")?
        .ok_or_else(|| anyhow!("the work dir {} has no stream: start with `pgtide clone --follow` or `pgtide stream setup`", workdir.path.display()))?;
    let plugin = Plugin::parse(&state.get_meta("stream.plugin")?.unwrap_or_default())?;
    if plugin != Plugin::Pgoutput {
        bail!(
            "apply reads pgoutput streams; this work dir's slot uses {}: set up a pgoutput slot",
            plugin.name()
        );
    }
    let start: Lsn = state
        .get_meta("stream.startpos")?
        .unwrap_or_else(|| "0/0".into())
        .parse()
        .map_err(|e: String| anyhow!(e))?;
    let tables = match state.get_meta("stream.tables")? {
        Some(json) => serde_json::from_str(&json)?,
        None => Vec::new(),
    };
    let (progress, progress_rx) = watch::channel(Progress::default());
    let opts = ReceiveOptions {
        publications: super::stream::recorded_publications(&state, &slot)?,
        slot,
        plugin,
        start,
        endpos: None,
        status_interval: Duration::from_secs(1),
        tables,
        system_id: state.get_meta("stream.system_id")?,
        applied: Some(progress_rx),
    };
    let mut spool = workdir.spool_writer()?;
    let source = source.clone();
    let task = tokio::spawn(async move {
        let ended = stream::receive(&source, &mut spool, &state, &opts).await;
        spool.close()?;
        ended.map(|_| ())
    });
    Ok(Receiver { task, progress })
}

/// Replays the spool until endpos (from `--endpos` or the sentinel, re-read every half
/// second), then sets the sequences from the source. Returns the last applied position.
pub async fn apply_until_endpos(
    source: &ConnInfo,
    target: &ConnInfo,
    workdir: &WorkDir,
    receiver: Receiver,
) -> Result<Lsn> {
    let state = workdir.state.clone();
    let slot = state.get_meta("stream.slot")?.unwrap_or_default();
    state.set_meta(APPLY_KEY, "on")?;
    state.set_phase("following")?;
    let (endpos_tx, endpos_rx) = watch::channel(read_endpos(&state)?);
    let poll_state = state.clone();
    let marker_source = source.clone();
    let endpos_poller = tokio::spawn(async move {
        let mut marked: Option<Lsn> = None;
        let mut last_try = std::time::Instant::now() - Duration::from_secs(60);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Ok(endpos) = read_endpos(&poll_state) {
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
        let progress = receiver.progress.subscribe();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let p = *progress.borrow();
                let _ = state.set_meta("apply.applied_lsn", &p.applied.to_string());
                let _ = state.set_meta("apply.durable_lsn", &p.durable.to_string());
                let _ =
                    state.apply_sample(std::process::id(), p.changes, p.transactions, p.applied.0);
            }
        })
    };
    let resynced = crate::clone::resynced_tables(&state)?;
    let Receiver {
        mut task, progress, ..
    } = receiver;
    let origin = apply::origin_name(&slot);
    let mut client = std::sync::Arc::new(pg::connect(target, Side::Target, "apply").await?);
    let mut backoff = Duration::from_millis(500);
    let applied = loop {
        let result = tokio::select! {
            r = apply::run(&client, &workdir.path, &origin, &mut stop, &resynced, &progress) => r,
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
            Err(e) if e.chain().any(|c| c.is::<apply::TargetLost>()) => {
                tracing::warn!("{e:#}; reconnecting to the target in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                match pg::connect(target, Side::Target, "apply").await {
                    Ok(c) => client = std::sync::Arc::new(c),
                    Err(e) => tracing::warn!("the target is not back yet: {e:#}"),
                }
            }
            other => break other,
        }
    };
    endpos_poller.abort();
    recorder.abort();
    if let Ok(applied) = &applied {
        record_progress(&state, &progress.borrow())?;
        state.set_phase("stopped at endpos")?;
        state.set_meta("sentinel.applied_lsn", &applied.to_string())?;
        if let Some(endpos) = *stop.endpos.borrow() {
            state.set_meta(REACHED_KEY, &endpos.to_string())?;
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
    let seqs = catalog::read_sequences(&source_client, &Filters::default()).await?;
    sequences::set_on_target(&client, &seqs, 0).await?;
    tracing::info!("set {} sequences on the target from the source", seqs.len());
    Ok(applied)
}

/// What status and the metrics read of apply: the durable position and a rate sample.
fn record_progress(state: &StateDb, p: &Progress) -> Result<()> {
    state.set_meta("apply.durable_lsn", &p.durable.to_string())?;
    state.apply_sample(std::process::id(), p.changes, p.transactions, p.applied.0)
}

fn read_endpos(state: &StateDb) -> Result<Option<Lsn>> {
    match state.get_meta(ENDPOS_KEY)? {
        Some(text) => Ok(Some(text.parse().map_err(|e: String| anyhow!(e))?)),
        None => Ok(None),
    }
}

pub async fn run(args: FollowArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    let workdir = WorkDir::open(&args.dir, "follow")?;
    crate::check::preflight_follow(&crate::check::CheckOptions::new(
        source.clone(),
        Some(target.clone()),
        args.dir.clone(),
    ))
    .await?;
    super::start_metrics(args.metrics_addr.as_deref(), &workdir, &source, &target).await?;
    if let Some(endpos) = args.endpos {
        workdir.state.set_meta(ENDPOS_KEY, &endpos.to_string())?;
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
