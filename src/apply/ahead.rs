//! Applying a streamed transaction ahead of its commit. A transaction the source streams
//! while it runs (`replication::streamed`) is staged in the spool and joins the queue only at
//! its commit; applied only then, its whole apply time would add to the lag after the commit.
//! When apply has nothing else to do, it applies the oldest staged transaction's records
//! already, in one open target transaction, as they are staged (as native replication's
//! `streaming = parallel` does from 16). When the transaction's Begin then comes through the
//! queue, the records applied ahead are passed over and the rest applied as usual; the commit
//! advances the origin as always, so exactly-once and the commit order hold unchanged.
//!
//! Whatever else happens first gives the attempt up (the target transaction is rolled back
//! with the usual rewind, the transaction is applied at its commit like any other):
//! - another transaction commits first (apply never holds the target's locks against a
//!   transaction that must commit before this one);
//! - staged records are undone (an aborted subtransaction, a restarted stream: the spool's
//!   staged generation changes), or the transaction aborts;
//! - any error, or a table whose copy is still running.
//!
//! Applying ahead pauses (the records read stay applied, the rest waits for the commit) at a
//! captured schema change, a truncate or a logical message: those keep their own handling.

use std::collections::HashSet;

use anyhow::Result;

use super::{Applier, Step, StopRule};
use crate::pg::Lsn;
use crate::replication::Plugin;

/// Staged rows read per pass: the apply loop looks at the queue between passes.
const ROWS_PER_PASS: usize = 16;

/// The streamed transaction being applied ahead.
#[derive(Debug)]
pub(super) struct Ahead {
    top: u32,
    /// The spool's staged generation when it started (see `SpoolReader::staged_generation`).
    generation: i64,
    /// The last staged row whose records were all applied.
    after_row: i64,
    /// Records applied ahead: passed over when the transaction comes through the queue.
    records: u64,
    /// Stopped at a record kept for the commit.
    paused: bool,
    /// Its Begin came through the queue: it is now applied as usual.
    committed: bool,
}

/// What applying ahead knows between passes.
#[derive(Default)]
pub(super) struct AheadState {
    pub(super) current: Option<Ahead>,
    /// Transactions given up: applied at their commit.
    given_up: HashSet<u32>,
    /// Records of the queue still to pass over (applied ahead).
    pub(super) skip_records: u64,
}

impl AheadState {
    /// Gives the current attempt up (called by the rewind that rolls it back).
    pub(super) fn give_up(&mut self) {
        if let Some(ahead) = self.current.take() {
            tracing::debug!(
                "apply: giving up applying transaction {} ahead of its commit",
                ahead.top
            );
            self.given_up.insert(ahead.top);
        }
        self.skip_records = 0;
    }

    /// The transaction's Begin came through the queue: whether it is the one applied ahead,
    /// still whole. `None`: nothing is applied ahead.
    pub(super) fn meets_begin(&mut self, xid: u32, generation: i64) -> Option<bool> {
        let ahead = self.current.as_mut()?;
        if ahead.committed {
            return Some(false);
        }
        if ahead.top != xid || ahead.generation != generation {
            return Some(false);
        }
        ahead.committed = true;
        self.skip_records = ahead.records;
        tracing::debug!(
            "apply: transaction {xid} committed; passing over its {} records applied ahead",
            ahead.records
        );
        Some(true)
    }

    /// The applied-ahead transaction committed on the target.
    pub(super) fn done(&mut self) {
        if self.current.as_ref().is_some_and(|a| a.committed) {
            self.current = None;
        }
    }

    /// Something other than the transaction's own Begin came through the queue first.
    pub(super) fn waiting_for_begin(&self) -> bool {
        self.current.as_ref().is_some_and(|a| !a.committed)
    }
}

impl Applier<'_> {
    /// One pass of applying ahead, when apply is idle; `Ok(true)` when it applied something.
    /// `Err`: given up (the caller rewinds).
    pub(super) async fn apply_ahead(&mut self, stop: &StopRule) -> Result<bool> {
        if self.plugin != Plugin::Pgoutput
            || self.lanes.last_launched_end().is_some()
            || self.pending_truncate.is_some()
            || self.ddl_stop_before.is_some()
            || self.ahead.skip_records > 0
            // Still re-running earlier records one row or one batch at a time.
            || self.after_seq < self.one_row_at_a_time_through
            || self.after_seq < self.serial_through
        {
            return Ok(false);
        }
        match &self.ahead.current {
            None if self.batch.open => return Ok(false),
            None => {
                let Some(top) = self.reader.oldest_staged()? else {
                    return Ok(false);
                };
                if self.ahead.given_up.contains(&top) {
                    return Ok(false);
                }
                let generation = self.reader.staged_generation()?;
                self.lane
                    .client
                    .batch_execute("BEGIN")
                    .await
                    .map_err(|e| super::target_error(&e, "cannot begin on the target"))?;
                self.batch.open = true;
                self.batch.started = std::time::Instant::now();
                self.batch.in_source_transaction = true;
                // Its commit position is not known yet: after every copy there is.
                self.final_lsn = Lsn(u64::MAX);
                self.ddl_ordinal = 0;
                self.ddl_replayed.clear();
                tracing::debug!("apply: applying transaction {top} ahead of its commit");
                self.ahead.current = Some(Ahead {
                    top,
                    generation,
                    after_row: 0,
                    records: 0,
                    paused: false,
                    committed: false,
                });
            }
            Some(ahead) if ahead.committed => return Ok(false),
            Some(_) => {}
        }
        let Some((top, generation, after_row, paused)) = self
            .ahead
            .current
            .as_ref()
            .map(|a| (a.top, a.generation, a.after_row, a.paused))
        else {
            return Ok(false);
        };
        // Checked while paused too: an aborted transaction's target transaction is not left
        // open until the next commit comes.
        if self.reader.staged_generation()? != generation {
            anyhow::bail!("staged records of transaction {top} were undone");
        }
        if paused {
            return Ok(false);
        }
        let records = self.reader.read_staged(top, after_row, ROWS_PER_PASS)?;
        if records.is_empty() {
            return Ok(false);
        }
        let last_row = records.last().map(|r| r.seq).unwrap_or(after_row);
        for record in records {
            if matches!(record.payload.first(), Some(b'M' | b'T')) {
                if let Some(ahead) = self.ahead.current.as_mut() {
                    ahead.paused = true;
                }
                return Ok(true);
            }
            match self.handle(record.payload, stop).await? {
                Step::Continue => {}
                other => anyhow::bail!("applying ahead met {other:?}"),
            }
            if let Some(ahead) = self.ahead.current.as_mut() {
                ahead.records += 1;
            }
        }
        if let Some(ahead) = self.ahead.current.as_mut() {
            ahead.after_row = last_row;
        }
        Ok(true)
    }
}

impl Applier<'_> {
    /// Called for each record read from the queue before it is handled: passes over what was
    /// applied ahead, takes the Begin of the transaction applied ahead, and gives the attempt
    /// up (`Rewind`) when something else comes first. `None`: handle the record as usual.
    pub(super) fn before_queue_record(
        &mut self,
        payload: &[u8],
        stop: &StopRule,
    ) -> Result<Option<Step>> {
        if self.ahead.skip_records > 0 {
            self.ahead.skip_records -= 1;
            return Ok(Some(Step::Continue));
        }
        if !self.ahead.waiting_for_begin() {
            return Ok(None);
        }
        if let Some((final_lsn, xid)) = begin_fields(payload) {
            let endpos = *stop.endpos.borrow();
            // Past endpos, or committed before what the target has applied (sent again):
            // the usual Begin handling decides, after the rewind.
            let usual =
                endpos.is_some_and(|endpos| final_lsn > endpos) || final_lsn < self.dispatched();
            let generation = self.reader.staged_generation()?;
            if !usual && self.ahead.meets_begin(xid, generation) == Some(true) {
                self.final_lsn = final_lsn;
                return Ok(Some(Step::Continue));
            }
        }
        Ok(Some(Step::Rewind))
    }
}

/// The commit position and xid of a pgoutput Begin message.
fn begin_fields(payload: &[u8]) -> Option<(Lsn, u32)> {
    if payload.first() != Some(&b'B') {
        return None;
    }
    let final_lsn = u64::from_be_bytes(payload.get(1..9)?.try_into().ok()?);
    let xid = u32::from_be_bytes(payload.get(17..21)?.try_into().ok()?);
    Some((Lsn(final_lsn), xid))
}
