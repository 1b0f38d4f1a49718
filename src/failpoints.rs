//! The named failpoints, one constant each, shared by the code and the tests (DESIGN.md:
//! "Failpoints at every durability boundary"). A build with `--features failpoints` switches
//! them on through `FAILPOINTS=name=action` (`sleep(ms)`, `panic`, `return`, `1*…`; see the
//! `fail` crate); in a normal build they compile to nothing.
//!
//! Each doc comment says which boundary the point sits on and what a crash there must not
//! lose. A test that kills pgtide at a point proves exactly that sentence.

/// The spool's batch is written but its SQLite transaction not yet committed: a crash here
/// loses the batch, which was never reported flushed to the source, so the source sends it
/// again (nothing acknowledged is lost).
pub const SPOOL_BEFORE_COMMIT: &str = "spool.before_commit";

/// The spool's batch is committed (durable) but not yet published as durable to the receive
/// loop: a crash here must not lose the batch, and its transactions, sent again by the source
/// because their flush was never reported, must not be spooled or applied twice.
pub const SPOOL_AFTER_WRITE: &str = "spool.after_write";

/// A streamed transaction committed: its Begin is durable in the queue, its staged records and
/// its Commit not yet (they move in spool transactions of their own, `spool/staged.rs`): a
/// crash here drops the Begin (and any records moved) at the next open with everything
/// staged, and the source streams the transaction again, its commit never acknowledged
/// (nothing lost, nothing applied twice).
pub const SPOOL_STAGED_PARTLY_MOVED: &str = "spool.staged_partly_moved";

/// A target transaction holds whole source transactions and the origin's new position, not yet
/// committed: a crash here rolls back both together, and apply resumes from the origin's old
/// position (nothing applied twice, nothing lost).
pub const APPLY_BEFORE_COMMIT: &str = "apply.before_commit";

/// A target transaction (changes and origin position together) is committed, and nothing else
/// about it is recorded yet (progress, state.db, the source's feedback): a crash here must not
/// apply it again on resume, since the origin on the target already says it is applied.
pub const APPLY_AFTER_COMMIT: &str = "apply.after_commit";

/// One statement of an index build is committed on the target (a unique index before its
/// constraint is attached), the build not yet recorded: a crash here must leave the resumed
/// clone to finish the build from what the target has (never an index built twice, never a
/// constraint missing).
pub const INDEX_AFTER_STATEMENT: &str = "index.after_statement";

/// The clone's snapshot exists and the target is prepared, the schema not yet dumped: a crash
/// here is resumed with the dump step still to do.
pub const CLONE_BEFORE_DUMP: &str = "clone.before_dump";

/// A copied table part is loaded in the target transaction with its `copied_parts` row not yet
/// committed: a crash here rolls both back, and the resumed clone copies the part again (no
/// duplicate rows, none lost).
pub const COPY_BEFORE_COMMIT: &str = "copy.before_commit";

/// A table part and its `copied_parts` row are committed on the target, state.db does not know
/// yet: a crash here must not copy the part again (the target's record says it is done).
pub const COPY_AFTER_COMMIT: &str = "copy.after_commit";

/// Not a durability boundary: makes the receiver's decoding of the stream fail (with
/// `return`), so that tests can prove a decode error stops the receiver with the reason instead
/// of reconnecting forever.
pub const RECEIVE_DECODE: &str = "receive.decode";

/// `follow --add-table` / `--resync`: the table's copy is committed on the target under a
/// snapshot at L (recorded as copying at L), its end not yet recorded: a crash here leaves apply
/// waiting for the table, and the rerun of the same command copies it again under a later
/// snapshot (nothing applied twice, nothing lost).
pub const TABLE_SYNC_AFTER_COPY: &str = "table_sync.after_copy";

/// Not a durability boundary: a cutover has pinned endpos and not yet waited for it, so that
/// tests can commit a write after the fence and prove the leak check reports it (with
/// `sleep(ms)`).
pub const CUTOVER_AFTER_ENDPOS: &str = "cutover.after_endpos";
