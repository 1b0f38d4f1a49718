//! The recorder task: apply's positions and counters written to state.db every second, for
//! `pgtide status` and the metrics.

use std::time::Duration;

use anyhow::Result;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::apply::Progress;
use crate::state::StateDb;

/// Starts recording `progress` every second; abort the task to stop.
pub(super) fn start(state: &StateDb, progress: &watch::Sender<Progress>) -> JoinHandle<()> {
    let state = state.clone();
    let progress = progress.subscribe();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let p = *progress.borrow();
            let _ = state.record_applied_lsn(p.applied);
            let _ = state.record_durable_lsn(p.durable);
            let _ = state.apply_sample(std::process::id(), p.changes, p.transactions, p.applied.0);
        }
    })
}

/// What status and the metrics read of apply: the durable position and a rate sample.
pub(super) fn record_progress(state: &StateDb, p: &Progress) -> Result<()> {
    state.record_durable_lsn(p.durable)?;
    state.apply_sample(std::process::id(), p.changes, p.transactions, p.applied.0)
}
