//! Which changes of a table apply may apply while that table is (or was) copied under a
//! snapshot of its own: a resumed clone --follow's resynced tables (`ResyncPositions`), and the
//! tables `follow --add-table` / `--resync` copy and `--remove-table` drops while the follow
//! runs (`state::TableSync`). Exactly once (invariant 2) rests on these rules, for a change of
//! table T in a source transaction committing at C:
//!
//! - no sync record for T: apply it;
//! - T removed: skip it (the migration no longer follows T);
//! - T pending (its snapshot LSN is not known yet): neither apply nor skip, wait;
//! - T copying under a snapshot at L: skip it when C < L (it is in the copy), else wait;
//! - T done at L: skip it when C < L, else apply it.
//!
//! Waiting is never done inside an open target transaction: apply rolls its batch back
//! (`Step::Rewind`), which releases every lock the batch held on the target, so the copy's
//! TRUNCATE and COPY of T cannot deadlock with apply; it then polls state.db until the rule
//! lets it go on, and reads the spool again from its last commit.
//!
//! The records are reloaded at start, whenever a Relation message names a table apply has not
//! seen (a table just added to the publication), and every second (a cheap generation check).
//! Apply records the generation it has loaded: `follow --add-table` waits for that
//! acknowledgement before it publishes or copies anything, so no change of T is applied under
//! rules older than T's record.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::pg::Lsn;
use crate::state::{ResyncPositions, StateDb, SyncKind, SyncStage, TableSync};

/// How often the records are checked for a new generation while apply runs.
const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// How often they are read while apply waits for a copy.
const POLL_WHILE_WAITING: Duration = Duration::from_millis(200);
/// How often a wait that lasts says so in the log.
const WAIT_NOTICE_EVERY: Duration = Duration::from_secs(60);

/// What apply does with one change of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Apply,
    /// Already in the table's copy, or the table is no longer followed.
    Skip,
    /// Not decidable yet: roll the batch back and wait for the table's copy.
    Wait,
}

/// The tables copied under snapshots of their own, as apply sees them.
pub struct Joins {
    /// Where the records live; None for a fixed set (unit tests).
    state: Option<StateDb>,
    /// A resumed clone --follow's resynced tables (fixed for the run).
    resynced: ResyncPositions,
    generation: u64,
    syncs: HashMap<String, TableSync>,
    /// Tables named by a Relation message so far.
    seen_tables: HashSet<String>,
    checked: Instant,
}

impl Joins {
    /// Loads the records and acknowledges their generation: what apply starts with.
    pub fn load(state: &StateDb) -> Result<Self> {
        let mut joins = Joins {
            state: Some(state.clone()),
            resynced: state.resync_positions()?,
            generation: 0,
            syncs: HashMap::new(),
            seen_tables: HashSet::new(),
            checked: Instant::now(),
        };
        joins.reload(true)?;
        Ok(joins)
    }

    /// A fixed set of resynced tables and sync records, read from nowhere (tests).
    pub fn fixed(resynced: ResyncPositions, syncs: Vec<TableSync>) -> Self {
        Joins {
            state: None,
            resynced,
            generation: 0,
            syncs: syncs.into_iter().map(|s| (s.table.clone(), s)).collect(),
            seen_tables: HashSet::new(),
            checked: Instant::now(),
        }
    }

    /// The rule above for a change of `table` (quoted qualified name) in a transaction
    /// committing at `commit`.
    pub fn decide(&self, table: &str, commit: Lsn) -> Decision {
        if self
            .resynced
            .get(table)
            .is_some_and(|copied_at| commit < *copied_at)
        {
            return Decision::Skip;
        }
        let Some(sync) = self.syncs.get(table) else {
            return Decision::Apply;
        };
        match (sync.kind, sync.stage) {
            (SyncKind::Remove, _) => Decision::Skip,
            (_, SyncStage::Pending) => Decision::Wait,
            (_, SyncStage::CopyingAt(at) | SyncStage::Done(at)) if commit < at => Decision::Skip,
            (_, SyncStage::CopyingAt(_)) => Decision::Wait,
            (_, SyncStage::Done(_)) => Decision::Apply,
        }
    }

    /// [`Self::decide`], but a `Wait` is checked against the records once more first (a cheap
    /// generation check): the copy may have moved on since the last reload, and a rewind
    /// costs the whole open batch.
    pub fn decide_now(&mut self, table: &str, commit: Lsn) -> Result<Decision> {
        let decision = self.decide(table, commit);
        if decision != Decision::Wait {
            return Ok(decision);
        }
        self.reload(false)?;
        Ok(self.decide(table, commit))
    }

    /// Whether `table` (quoted qualified name) has a sync record: `follow --add-table`,
    /// `--resync` or `--remove-table` decide its changes, whatever the filters the apply run
    /// started with say.
    pub fn has_sync(&self, table: &str) -> bool {
        self.syncs.contains_key(table)
    }

    /// The periodic generation check (at most once a second).
    pub fn reload_if_due(&mut self) -> Result<()> {
        if self.checked.elapsed() >= RELOAD_EVERY {
            self.reload(false)?;
        }
        Ok(())
    }

    /// A Relation message named `table`: a table apply has not seen may have just joined the
    /// publication, so its record is read now, before any change of it.
    pub fn relation(&mut self, table: &str) -> Result<()> {
        if self.seen_tables.insert(table.to_string()) && !self.syncs.contains_key(table) {
            self.reload(false)?;
        }
        Ok(())
    }

    /// Waits (the target batch rolled back) until a change of `table` committing at `commit`
    /// is no longer `Wait`.
    pub async fn wait(&mut self, table: &str, commit: Lsn) -> Result<()> {
        let started = Instant::now();
        let mut noticed = started;
        tracing::info!(
            "apply: waiting for the copy of {table} (a change committed at {commit} needs it)"
        );
        while self.decide(table, commit) == Decision::Wait {
            if self.state.is_none() {
                anyhow::bail!("internal error: waiting for {table} on fixed table sync records");
            }
            tokio::time::sleep(POLL_WHILE_WAITING).await;
            self.reload(false)?;
            if noticed.elapsed() >= WAIT_NOTICE_EVERY {
                noticed = Instant::now();
                tracing::warn!(
                    "apply: still waiting for the copy of {table} after {} s. If no `pgtide follow --add-table` or `--resync` of it is running, rerun that command: it continues the copy",
                    started.elapsed().as_secs()
                );
            }
        }
        tracing::info!(
            "apply: the copy of {table} is ready after {:.1} s; going on",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Reads the records when their generation moved (or `force`), and acknowledges it.
    fn reload(&mut self, force: bool) -> Result<()> {
        self.checked = Instant::now();
        let Some(state) = &self.state else {
            return Ok(());
        };
        let generation = state.table_sync_generation()?;
        if generation == self.generation && !force {
            return Ok(());
        }
        let (generation, syncs) = state.table_syncs()?;
        if generation != self.generation {
            tracing::info!("apply: table sync records at generation {generation}");
        }
        self.generation = generation;
        self.syncs = syncs.into_iter().map(|s| (s.table.clone(), s)).collect();
        // Only now, with the new rules in force for every later change.
        state.record_table_sync_seen(generation)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sync(table: &str, kind: SyncKind, stage: SyncStage) -> TableSync {
        TableSync {
            table: table.into(),
            kind,
            stage,
            generation: 1,
        }
    }

    #[test]
    fn the_rules() {
        let joins = Joins::fixed(
            [("\"public\".\"r\"".to_string(), Lsn(100))].into(),
            vec![
                sync("p", SyncKind::Add, SyncStage::Pending),
                sync("c", SyncKind::Resync, SyncStage::CopyingAt(Lsn(50))),
                sync("d", SyncKind::Add, SyncStage::Done(Lsn(50))),
                sync("x", SyncKind::Remove, SyncStage::Done(Lsn(50))),
            ],
        );
        assert_eq!(joins.decide("other", Lsn(1)), Decision::Apply);
        assert_eq!(joins.decide("\"public\".\"r\"", Lsn(99)), Decision::Skip);
        assert_eq!(joins.decide("\"public\".\"r\"", Lsn(100)), Decision::Apply);
        assert_eq!(joins.decide("p", Lsn(1)), Decision::Wait);
        assert_eq!(joins.decide("c", Lsn(49)), Decision::Skip);
        assert_eq!(joins.decide("c", Lsn(50)), Decision::Wait);
        assert_eq!(joins.decide("d", Lsn(49)), Decision::Skip);
        assert_eq!(joins.decide("d", Lsn(50)), Decision::Apply);
        assert_eq!(joins.decide("x", Lsn(1)), Decision::Skip);
        assert_eq!(joins.decide("x", Lsn(1000)), Decision::Skip);
    }
}
