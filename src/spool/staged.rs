//! Transactions the source streams before they commit (pgoutput `streaming 'on'`, 14+). A
//! transaction larger than the source's `logical_decoding_work_mem` is sent in chunks while
//! it runs instead of being spilled to disk on the source and sent at its commit. Its records
//! wait in the `staged` table, by top-level transaction and subtransaction, until the stream
//! says how it ended:
//! - commit: they move into the change queue between a Begin and a Commit made from the
//!   stream's commit message, in one SQLite transaction, so apply reads an ordinary
//!   transaction at its place in commit order (nothing downstream knows it was streamed);
//! - abort of the transaction: they are dropped;
//! - abort of a subtransaction: what it and the subtransactions inside it wrote is dropped,
//!   which is every row change from its first one on (a subtransaction stays open from its
//!   first change to its abort, so whatever follows is its own or a child's). Relation and
//!   type descriptions stay: the source does not describe a table twice in one transaction.
//!
//! Staged records are never acknowledged to the source (flushed only moves past commits), so
//! a restart drops them all: the source streams every open transaction again from its start.

use anyhow::{Context, Result};
use rusqlite::{CachedStatement, OptionalExtension, Transaction, params};

use super::Stored;

use super::{Record, RowSink};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS staged (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    top     INTEGER NOT NULL,       -- the streamed transaction's xid
    sub     INTEGER NOT NULL,       -- the (sub)transaction that wrote the record
    lsn     INTEGER NOT NULL,
    xid     INTEGER,
    kind    TEXT NOT NULL,
    payload BLOB NOT NULL           -- a change queue row: one record or a frame of them
);
CREATE INDEX IF NOT EXISTS staged_by_transaction ON staged (top, sub);
CREATE INDEX IF NOT EXISTS staged_in_order ON staged (top);
";
// staged_in_order: an index on (top) holds (top, seq), seq being the rowid, so a transaction's
// rows are read and moved in order without a sort. With (top, sub) alone, every read and
// every move of a streamed transaction sorted all its remaining rows, payloads included (a
// temp B-tree of up to the whole transaction per 128-row move: 84% of pgtide's CPU went to
// SQLite on a 768 MB streamed transaction). `reads_use_no_sort` checks the plans.

/// The next move's last row: MOVE_ROWS rows on from `after`.
const MOVE_BOUND_SQL: &str =
    "SELECT seq FROM staged WHERE top = ?1 AND seq > ?2 ORDER BY seq LIMIT 1 OFFSET ?3";
/// One move's rows, into the change queue in the order they arrived.
const MOVE_SQL: &str = "INSERT INTO changes (lsn, end_lsn, xid, kind, payload)
   SELECT lsn, NULL, xid, kind, payload FROM staged
   WHERE top = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq";
/// Apply ahead's read of a transaction's staged rows.
const READ_SQL: &str = "SELECT seq, lsn, xid, kind, payload FROM staged WHERE top = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3";

/// The insert into `staged` for the (sub)transaction whose records a frame holds.
pub(super) struct StagedRows<'c> {
    insert: CachedStatement<'c>,
    pub(super) top: u32,
    pub(super) sub: u32,
}

impl<'c> StagedRows<'c> {
    pub(super) fn new(tx: &'c Transaction) -> Result<Self> {
        Ok(StagedRows {
            insert: tx.prepare_cached(
                "INSERT INTO staged (top, sub, lsn, xid, kind, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?,
            top: 0,
            sub: 0,
        })
    }
}

impl RowSink for StagedRows<'_> {
    fn row(&mut self, record: &Record, kind: &str, payload: &[u8]) -> Result<()> {
        self.insert.execute(params![
            self.top,
            self.sub,
            record.lsn.0 as i64,
            record.xid,
            kind,
            payload
        ])?;
        Ok(())
    }
}

/// Drops what is staged for `top` (it is streamed again from its first chunk, or aborted).
pub(super) fn forget(tx: &Transaction, top: u32) -> Result<usize> {
    bump_generation(tx)?;
    Ok(tx.execute("DELETE FROM staged WHERE top = ?1", params![top])?)
}

/// Drops what subtransaction `sub` of `top` and the subtransactions inside it wrote: every
/// row change from `sub`'s first one on.
pub(super) fn abort_subtransaction(tx: &Transaction, top: u32, sub: u32) -> Result<usize> {
    bump_generation(tx)?;
    Ok(tx.execute(
        "DELETE FROM staged WHERE top = ?1 AND kind NOT IN ('relation', 'type')
           AND seq >= (SELECT min(seq) FROM staged WHERE top = ?1 AND sub = ?2)",
        params![top, sub],
    )?)
}

/// Staged rows moved into the queue per spool transaction: the write lock is released between
/// them (apply's pruning, the other writer, never waits out its busy timeout behind a large
/// transaction), and a frame is at most 256 kB, so one move stays within tens of MB.
const MOVE_ROWS: i64 = 128;

/// Moves what is staged for `top` into the change queue, in the order it arrived, after its
/// Begin (already written), then writes `commit` and forgets the staged rows, in spool
/// transactions of [`MOVE_ROWS`] rows. Until the last one, the queue holds a transaction
/// without its commit, as while an ordinary large transaction arrives: a crash in between
/// drops that part at the next open ([`super::SpoolWriter::open`]) together with everything
/// staged, and the source streams the transaction again (its commit was not acknowledged).
pub(super) fn move_to_queue(
    conn: &mut rusqlite::Connection,
    top: u32,
    commit: &Record,
) -> Result<usize> {
    let mut after = 0i64;
    let mut moved = 0;
    loop {
        fail::fail_point!(crate::failpoints::SPOOL_STAGED_PARTLY_MOVED);
        let tx = conn.transaction()?;
        let bound: Option<i64> = tx
            .query_row(MOVE_BOUND_SQL, params![top, after, MOVE_ROWS - 1], |r| {
                r.get(0)
            })
            .optional()?;
        moved += tx.execute(MOVE_SQL, params![top, after, bound.unwrap_or(i64::MAX)])?;
        let Some(bound) = bound else {
            tx.prepare_cached(
                "INSERT INTO changes (lsn, end_lsn, xid, kind, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .row(commit, commit.kind, &commit.payload)?;
            tx.execute("DELETE FROM staged WHERE top = ?1", params![top])?;
            tx.commit()
                .context("cannot commit to the spool (is the disk full?)")?;
            return Ok(moved);
        };
        tx.commit()
            .context("cannot commit to the spool (is the disk full?)")?;
        after = bound;
    }
}

/// Drops everything staged: at open and after a lost connection, when the source streams
/// every open transaction again.
pub(super) fn forget_all(conn: &rusqlite::Connection) -> Result<usize> {
    bump_generation(conn)?;
    Ok(conn.execute("DELETE FROM staged", [])?)
}

/// The `spool_meta` key of the count of undoings (an abort, a restart of a stream, a lost
/// connection): apply, which may read staged records ahead of their commit, knows from it
/// that what it read may no longer be the transaction that commits.
const GENERATION_KEY: &str = "staged_generation";

/// Counts one more undoing of staged records (see [`GENERATION_KEY`]).
pub(super) fn bump_generation(conn: &rusqlite::Connection) -> Result<()> {
    conn.execute(
        "INSERT INTO spool_meta (key, value) VALUES (?1, '1')
           ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
        params![GENERATION_KEY],
    )?;
    Ok(())
}

impl super::SpoolReader {
    /// The streamed transaction staged longest ago, if any.
    pub fn oldest_staged(&self) -> Result<Option<u32>> {
        Ok(self
            .conn
            .query_row("SELECT top FROM staged ORDER BY seq LIMIT 1", [], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// How many times staged records were undone so far: while it stays the same, every
    /// record read from `staged` is still part of its transaction.
    pub fn staged_generation(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row(
                "SELECT CAST(value AS INTEGER) FROM spool_meta WHERE key = ?1",
                params![GENERATION_KEY],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0))
    }

    /// The records staged for `top` in rows after `after_seq` (at most `limit` rows), in
    /// order; each record carries its row's staged sequence number.
    pub fn read_staged(&self, top: u32, after_seq: i64, limit: usize) -> Result<Vec<Stored>> {
        let mut stmt = self.conn.prepare_cached(READ_SQL)?;
        // Bounded by `limit` rows (a frame is at most 256 kB), not by bytes.
        super::unpack_rows(
            stmt.query(params![top, after_seq, limit as i64])?,
            usize::MAX,
        )
    }
}

/// What the spool holds of transactions the source is still streaming (for `status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StagedSummary {
    /// Streamed transactions not yet committed or aborted.
    pub transactions: u64,
    /// Their staged payload bytes.
    pub bytes: u64,
}

impl super::SpoolView {
    /// What is staged; `None` when the spool cannot say (one written before staging existed).
    pub fn staged(&self) -> Option<StagedSummary> {
        self.conn
            .query_row(
                "SELECT count(DISTINCT top), coalesce(sum(length(payload)), 0) FROM staged",
                [],
                |r| {
                    Ok(StagedSummary {
                        transactions: r.get::<_, i64>(0)?.max(0) as u64,
                        bytes: r.get::<_, i64>(1)?.max(0) as u64,
                    })
                },
            )
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::{MOVE_BOUND_SQL, MOVE_SQL, READ_SQL};

    /// A streamed transaction can be hundreds of MB: reading or moving its rows must walk an
    /// index in order, never sort them (a temp B-tree holds the payloads).
    #[test]
    fn reads_use_no_sort() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(super::super::SCHEMA).unwrap();
        conn.execute_batch(super::SCHEMA).unwrap();
        for sql in [MOVE_BOUND_SQL, MOVE_SQL, READ_SQL] {
            let mut plan = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let steps: Vec<String> = plan
                .query_map([1, 2, 3], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                steps.iter().all(|s| !s.contains("TEMP B-TREE")),
                "{sql}: {steps:?}"
            );
            assert!(
                steps.iter().any(|s| s.contains("staged_in_order")),
                "{sql}: {steps:?}"
            );
        }
    }
}
