//! Parallel apply (`--apply-jobs N`): up to N target connections ("lanes") work on consecutive
//! batches of whole source transactions at once, and the batches commit strictly in source
//! commit order.
//!
//! How exactly-once survives it: each lane's session has its own replication origin
//! (`pgtide_<slot>` for the first lane, `pgtide_<slot>.lane<n>` for the others), advanced in
//! the same transaction as the batch (invariant 2). A batch commits only after the batch
//! before it has committed (the [`Gate`]), so the highest position among the lanes' origins
//! always ends a consistent prefix of the stream: that maximum is where a restart resumes
//! ([`super::durable_progress`]). The target's WAL orders the commits the same way, so the
//! flushed positions obey the same rule after a target crash.
//!
//! What may run side by side: the apply loop fills one batch at a time on its current lane,
//! then hands the lane over to a task that sends the rest and waits for its turn to commit,
//! and goes on with the next batch on another lane. A change whose keys (`keys.rs`) meet a
//! batch still in flight waits for that batch's commit first; schema changes, truncates and
//! new table descriptions wait for every batch in flight (barriers). Whatever the keys miss,
//! the target serializes or refuses; a batch that fails while others are in flight is rolled
//! back with every later one, and apply re-runs it alone, after all earlier batches have
//! committed: the single-lane result, at single-lane speed, for that batch only.

use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::{Result, anyhow};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use super::keys::{ChangeKeys, KeySet};
use super::sets::SetQueue;
use super::statements::Statements;
use super::{Progress, commit_with_origin};
use crate::errors::{ErrorClass, classify};
use crate::pg::Lsn;

/// How long a lane waits for a row or unique-index lock while other batches are in flight.
/// Two batches whose keys did not meet can still wait on each other through a value the keys
/// compare differently; the timeout ends such a wait, and the batch is re-run alone.
pub const LOCK_TIMEOUT: &str = "2s";

/// One target connection with what is bound to it: its prepared statements and its queue.
pub struct Lane {
    pub client: Arc<Client>,
    pub statements: Statements,
    pub sets: SetQueue,
}

impl Lane {
    pub fn new(client: Arc<Client>) -> Self {
        Lane {
            client,
            statements: Statements::default(),
            sets: SetQueue::default(),
        }
    }
}

/// The commit turn: the number of the last batch committed, and the first that failed (every
/// batch after it rolls back instead of committing).
#[derive(Clone, Copy, Debug, Default)]
struct Gate {
    committed: u64,
    failed: Option<u64>,
}

/// A batch whose rest is being sent and which waits for its turn to commit.
struct InFlight {
    number: u64,
    batch: Sealed,
    task: JoinHandle<(Lane, Result<()>)>,
}

/// A sealed batch handed to a lane's task.
pub struct Sealed {
    pub keys: KeySet,
    pub end_lsn: Lsn,
    pub commit_time: i64,
    pub transactions: usize,
    pub changes: usize,
    /// The spool sequence number of the batch's last record: a failed batch is re-run alone
    /// up to there.
    pub through_seq: i64,
}

/// A batch failed while others were in flight (or while it ran in parallel mode): every batch
/// from it on was rolled back; apply re-runs the stream alone up to `through_seq`.
#[derive(Debug)]
pub struct ParallelFailure {
    pub through_seq: i64,
    pub error: anyhow::Error,
}

impl std::fmt::Display for ParallelFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a batch applied in parallel failed: {:#}", self.error)
    }
}

impl std::error::Error for ParallelFailure {}

/// A lane's task ended abnormally (a panic): its connection is gone, apply stops (a rerun
/// resumes from the origins).
#[derive(Debug)]
pub struct LaneLost(String);

impl std::fmt::Display for LaneLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a parallel apply task ended abnormally: {}. Rerun to continue: apply resumes from the target's origins, so nothing is lost or applied twice",
            self.0
        )
    }
}

impl std::error::Error for LaneLost {}

/// A batch rolled back because an earlier one failed (not itself an error).
#[derive(Debug)]
struct RolledBack;

impl std::fmt::Display for RolledBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("rolled back after an earlier batch failed")
    }
}

impl std::error::Error for RolledBack {}

/// The lanes other than the one the apply loop is filling, and the batches in flight.
pub struct Lanes {
    idle: Vec<Lane>,
    in_flight: VecDeque<InFlight>,
    gate: Arc<watch::Sender<Gate>>,
    next_number: u64,
    /// The number of lanes in all (the filling one included).
    count: usize,
}

impl Lanes {
    /// `others`: every lane but the one the apply loop starts filling.
    pub fn new(others: Vec<Lane>) -> Self {
        let count = others.len() + 1;
        Lanes {
            idle: others,
            in_flight: VecDeque::new(),
            gate: Arc::new(watch::Sender::new(Gate::default())),
            next_number: 1,
            count,
        }
    }

    /// More than one lane: batches may run side by side.
    pub fn parallel(&self) -> bool {
        self.count > 1
    }

    /// The latest batch in flight that a change meets (see `keys.rs`).
    pub fn conflict(&self, change: &ChangeKeys) -> Option<u64> {
        self.in_flight
            .iter()
            .rev()
            .find(|flight| flight.batch.keys.conflicts(change))
            .map(|flight| flight.number)
    }

    /// The end of the last batch handed to a lane and not yet reaped.
    pub fn last_launched_end(&self) -> Option<Lsn> {
        self.in_flight.back().map(|flight| flight.batch.end_lsn)
    }

    /// Hands `lane` and its sealed batch to a task that sends the rest, waits for the batch
    /// before it to commit, then commits it with its origin position.
    pub fn launch(&mut self, mut lane: Lane, batch: Sealed) {
        let number = self.next_number;
        self.next_number += 1;
        let gate = self.gate.clone();
        let (end_lsn, commit_time) = (batch.end_lsn, batch.commit_time);
        let task = tokio::spawn(async move {
            let result = finish(&mut lane, number, &gate, end_lsn, commit_time).await;
            match &result {
                Ok(()) => gate.send_modify(|g| g.committed = number),
                Err(_) => {
                    gate.send_modify(|g| {
                        g.failed = Some(g.failed.map_or(number, |f| f.min(number)))
                    });
                    lane.sets.discard();
                    lane.statements.discard();
                    // A lost connection needs no rollback; anything else ends the transaction.
                    lane.client.batch_execute("ROLLBACK").await.ok();
                }
            }
            (lane, result)
        });
        self.in_flight.push_back(InFlight {
            number,
            batch,
            task,
        });
    }

    /// An idle lane, waiting for the oldest batch in flight to commit when none is.
    pub async fn take_idle(&mut self, progress: &mut Progress) -> Result<Lane> {
        loop {
            if let Some(lane) = self.idle.pop() {
                return Ok(lane);
            }
            let Some(oldest) = self.in_flight.front().map(|b| b.number) else {
                return Err(anyhow!(
                    "internal error: no lane is idle and none is in flight"
                ));
            };
            self.wait_through(oldest, progress).await?;
        }
    }

    /// Waits until every batch up to `number` has committed (updating `progress`). A failed
    /// batch ends the wait with a [`ParallelFailure`] once every batch in flight is done.
    pub async fn wait_through(&mut self, number: u64, progress: &mut Progress) -> Result<()> {
        while self.in_flight.front().is_some_and(|b| b.number <= number) {
            self.reap_oldest(progress).await?;
        }
        Ok(())
    }

    /// Reaps the batches at the front that are done, without waiting.
    pub async fn reap_finished(&mut self, progress: &mut Progress) -> Result<()> {
        while self.in_flight.front().is_some_and(|b| b.task.is_finished()) {
            self.reap_oldest(progress).await?;
        }
        Ok(())
    }

    /// Waits for every batch in flight (a barrier).
    pub async fn drain(&mut self, progress: &mut Progress) -> Result<()> {
        self.wait_through(u64::MAX, progress).await
    }

    /// The clients of the idle lanes (every lane but the filling one once drained).
    pub fn idle_clients(&self) -> impl Iterator<Item = &Arc<Client>> {
        self.idle.iter().map(|lane| &lane.client)
    }

    /// Drops the prepared statements of a relation on every idle lane.
    pub fn forget(&mut self, oid: u32) {
        for lane in &mut self.idle {
            lane.statements.forget(oid);
        }
    }

    /// After a batch failed: collects every later batch (each rolls back, the gate saying so)
    /// and its lane, then opens the gate for the batches launched from now on.
    async fn abandon_later(&mut self, progress: &mut Progress) -> Result<()> {
        let mut lost = None;
        while let Some(later) = self.in_flight.pop_front() {
            progress.changes = progress.changes.saturating_sub(later.batch.changes as u64);
            match later.task.await {
                Ok((lane, _)) => self.idle.push(lane),
                Err(e) => lost = Some(e.to_string()),
            }
        }
        self.gate.send_replace(Gate {
            committed: self.next_number - 1,
            failed: None,
        });
        match lost {
            Some(e) => Err(anyhow::Error::new(LaneLost(e))),
            None => Ok(()),
        }
    }

    async fn reap_oldest(&mut self, progress: &mut Progress) -> Result<()> {
        let Some(InFlight {
            number,
            batch,
            task,
        }) = self.in_flight.pop_front()
        else {
            return Ok(());
        };
        let (lane, result) = match task.await {
            Ok(done) => done,
            Err(e) => {
                // The task is gone with its lane (a panic): no later batch may wait for its
                // turn forever. They roll back; apply stops with this error.
                self.gate.send_modify(|g| g.failed = Some(number));
                progress.changes = progress.changes.saturating_sub(batch.changes as u64);
                self.abandon_later(progress).await.ok();
                return Err(anyhow::Error::new(LaneLost(e.to_string())));
            }
        };
        self.idle.push(lane);
        match result {
            Ok(()) => {
                progress.applied = batch.end_lsn;
                progress.transactions += batch.transactions as u64;
                Ok(())
            }
            Err(error) => {
                progress.changes = progress.changes.saturating_sub(batch.changes as u64);
                self.abandon_later(progress).await?;
                if error.is::<RolledBack>() {
                    return Err(anyhow!(
                        "internal error: a batch rolled back though no earlier one failed"
                    ));
                }
                if classify(&error) == ErrorClass::Transient {
                    // A lost connection: follow reconnects every lane and resumes.
                    return Err(error);
                }
                Err(anyhow::Error::new(ParallelFailure {
                    through_seq: batch.through_seq,
                    error,
                }))
            }
        }
    }
}

/// The task of a handed-over batch: sends what is still queued, waits for its turn, commits.
async fn finish(
    lane: &mut Lane,
    number: u64,
    gate: &watch::Sender<Gate>,
    end_lsn: Lsn,
    commit_time: i64,
) -> Result<()> {
    lane.statements.flush().await?;
    let mut turn = gate.subscribe();
    loop {
        let now = *turn.borrow_and_update();
        if now.failed.is_some_and(|failed| failed < number) {
            return Err(anyhow::Error::new(RolledBack));
        }
        if now.committed + 1 == number {
            break;
        }
        if turn.changed().await.is_err() {
            return Err(anyhow::Error::new(RolledBack));
        }
    }
    commit_with_origin(&lane.client, end_lsn, commit_time).await
}
