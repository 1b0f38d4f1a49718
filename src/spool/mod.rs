//! The spool: the durable change queue in the work dir (`spool.db`, SQLite). The receiver
//! appends every message of the stream in arrival (= commit) order; a writer thread groups
//! what has arrived into one SQLite transaction per fsync (group commit, never one fsync per
//! row) and only then publishes the new durable position, which is what the source is told as
//! "flushed" (invariant 1). The channel to the writer is bounded, so memory stays bounded
//! whatever a transaction's size (invariant 4).
//!
//! On open, records after the last complete commit are dropped: the source sends a
//! transaction again from its beginning when streaming restarts at the last flushed commit.
//!
//! Consecutive records of one transaction are packed into one row (a *frame*, ending at the
//! transaction's commit), so a TPC-B transaction of six messages costs SQLite one insert and
//! one row read instead of six: the writer and the reader were most of pgtide's own CPU in
//! the 4-client apply benchmark (issue 14). A frame never spans a commit, so every commit
//! still ends a row, and apply's resume point (`seq_through`), pruning and the rollback of an
//! incomplete transaction keep working by row. Relation messages keep their own rows (a
//! resume reads them back alone); a record wider than a frame's budget is stored alone too,
//! so wide rows are never copied. Rows written before frames existed read back unchanged.

use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::watch;

use crate::pg::Lsn;

mod staged;

pub use staged::StagedSummary;

/// Records queued to the writer before the receiver waits (bounds memory: ~ this many
/// messages in flight).
const QUEUE_RECORDS: usize = 20_000;
/// Payload bytes queued to the writer before the receiver waits: with wide rows the record
/// bound alone would let gigabytes wait in memory (invariant 4).
const QUEUE_BYTES: usize = 32 << 20;
/// The most records one SQLite transaction takes.
const BATCH_RECORDS: usize = 50_000;
/// The most payload bytes one SQLite transaction takes: the write lock is held briefly, so
/// apply's pruning (the other writer) never waits out its busy timeout behind wide rows.
const BATCH_BYTES: usize = 32 << 20;

/// Payload bytes one `SpoolReader::read` returns at most (beyond its first row).
const READ_BYTES: usize = 16 << 20;
/// The most payload bytes packed into one frame row; a wider record is stored alone.
const FRAME_BYTES: usize = 256 << 10;
/// The most records packed into one frame row.
const FRAME_RECORDS: usize = 4_096;
/// The `spool_meta` key of the end of the last durable commit (the queue's own record of it
/// is pruned with it).
const COMMIT_END_KEY: &str = "commit_end";
/// The `kind` of a row holding several records packed by [`Frame`].
const FRAME_KIND: &str = "frame";
/// The first byte of a frame's payload: its format version.
const FRAME_VERSION: u8 = 1;
/// Records one pruning statement deletes: short write transactions, the writer never waits
/// long.
const PRUNE_CHUNK: usize = 5_000;
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS changes (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: readers keep their place across pruning
    lsn     INTEGER NOT NULL,       -- the XLogData start position (0 for relation/type messages)
    end_lsn INTEGER,                -- a commit's end position: where streaming resumes
    xid     INTEGER,
    kind    TEXT NOT NULL,
    payload BLOB NOT NULL           -- the plugin's message, byte for byte
);
CREATE INDEX IF NOT EXISTS changes_relations ON changes (seq) WHERE kind = 'relation';
CREATE INDEX IF NOT EXISTS changes_commits ON changes (end_lsn) WHERE end_lsn IS NOT NULL;
CREATE TABLE IF NOT EXISTS spool_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
";

/// One message to spool.
#[derive(Debug, Clone)]
pub struct Record {
    pub lsn: Lsn,
    pub end_lsn: Option<Lsn>,
    pub xid: Option<u32>,
    pub kind: &'static str,
    pub payload: Bytes,
}

/// What the writer has made durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Durable {
    /// End LSN of the last durable commit: safe to report as flushed.
    pub commit_end: Lsn,
    /// Count of durable records appended by this writer.
    pub records: u64,
}

enum Command {
    Append(Record),
    /// Drop what follows the last durable commit and everything staged (a reconnect re-sends
    /// it).
    RollbackToCommit,
    /// A record of a transaction streamed before its commit ([`staged`]).
    Stage {
        top: u32,
        sub: u32,
        record: Record,
    },
    /// The source streams `top` again from its first chunk.
    RestartStaged {
        top: u32,
    },
    /// `sub` (or, when it is `top`, the whole transaction) aborted.
    AbortStaged {
        top: u32,
        sub: u32,
    },
    /// `top` committed: its records join the queue between a Begin and a Commit (boxed: the
    /// queue's other commands are smaller).
    CommitStaged {
        top: u32,
        begin_and_commit: Box<(Record, Record)>,
    },
}

/// Opens the spool file, dropping an incomplete transaction left by a crash.
fn open_db(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)
        .with_context(|| format!("cannot open the spool {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.execute_batch(SCHEMA)
        .context("cannot create the spool schema")?;
    conn.execute_batch(staged::SCHEMA)
        .context("cannot create the spool schema")?;
    Ok(conn)
}

fn rollback_to_last_commit(conn: &Connection) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM changes WHERE seq > coalesce((SELECT max(seq) FROM changes WHERE end_lsn IS NOT NULL), 0)",
        [],
    )
}

/// The appending side, used by the receiver.
pub struct SpoolWriter {
    tx: Option<SyncSender<Command>>,
    durable: watch::Receiver<Durable>,
    thread: Option<JoinHandle<Result<()>>>,
    sent: u64,
    queued: Arc<QueuedBytes>,
}

/// Payload bytes handed to the writer thread and not yet written: the receiver waits while
/// they exceed QUEUE_BYTES.
#[derive(Default)]
struct QueuedBytes {
    bytes: Mutex<usize>,
    written: Condvar,
}

impl QueuedBytes {
    /// Counts a payload in, first waiting (blocking) until the queue is below its budget.
    fn add(&self, n: usize) {
        let mut bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        while *bytes > QUEUE_BYTES {
            bytes = self
                .written
                .wait_timeout(bytes, std::time::Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *bytes += n;
    }

    fn remove(&self, n: usize) {
        let mut bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let over = *bytes > QUEUE_BYTES;
        *bytes = bytes.saturating_sub(n);
        // Only a receiver over budget waits: waking nobody is a system call per record.
        if over && *bytes <= QUEUE_BYTES {
            self.written.notify_all();
        }
    }

    fn over_budget(&self) -> bool {
        *self.bytes.lock().unwrap_or_else(|e| e.into_inner()) > QUEUE_BYTES
    }
}

impl SpoolWriter {
    /// Opens `dir/spool.db` for appending; `on_batch` is told the spool's size after batches.
    pub fn open(dir: &Path, on_batch: Box<dyn Fn(u64) + Send>) -> Result<Self> {
        let conn = open_db(&dir.join("spool.db"))?;
        let dropped = rollback_to_last_commit(&conn)?;
        if dropped > 0 {
            tracing::info!(
                "spool: dropped {dropped} records of a transaction left incomplete; the source sends it again"
            );
        }
        let unfinished = staged::forget_all(&conn)?;
        if unfinished > 0 {
            tracing::info!(
                "spool: dropped {unfinished} rows of transactions streamed before their commit; the source streams them again"
            );
        }
        // The last durable commit, also when apply has pruned it from the queue: streaming
        // resumes there, so that the source does not send again what is applied already.
        let start_commit: Option<i64> = conn.query_row(
            "SELECT max(coalesce((SELECT max(end_lsn) FROM changes), 0),
                        coalesce((SELECT CAST(value AS INTEGER) FROM spool_meta WHERE key = ?1), 0))",
            [COMMIT_END_KEY],
            |r| r.get(0),
        )?;
        let (durable_tx, durable) = watch::channel(Durable {
            commit_end: Lsn(start_commit.unwrap_or(0) as u64),
            records: 0,
        });
        let (tx, rx) = sync_channel(QUEUE_RECORDS);
        let where_ = dir.display().to_string();
        let queued = Arc::new(QueuedBytes::default());
        let written = queued.clone();
        let thread = std::thread::Builder::new()
            .name("pgtide-spool".into())
            .spawn(move || {
                let result = write_loop(conn, rx, durable_tx, on_batch, &written);
                // A stopped writer must not leave the receiver waiting for room.
                written.remove(usize::MAX);
                result.map_err(|e| explain_full(e, &where_))
            })?;
        Ok(SpoolWriter {
            tx: Some(tx),
            durable,
            thread: Some(thread),
            sent: 0,
            queued,
        })
    }

    fn send(&mut self, command: Command) -> Result<()> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| anyhow!("the spool is closed"))?;
        // A full queue blocks this (async) caller briefly: that is the back-pressure that
        // bounds memory, so do it off the async scheduler's hot path.
        match tx.try_send(command) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::TrySendError::Full(command)) => {
                tokio::task::block_in_place(|| tx.send(command)).map_err(|_| self.writer_error())
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => Err(self.writer_error()),
        }
    }

    fn writer_error(&mut self) -> anyhow::Error {
        self.tx = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => e.context("the spool writer failed"),
            Some(Err(_)) => anyhow!("the spool writer panicked"),
            _ => anyhow!("the spool writer stopped"),
        }
    }

    pub fn append(&mut self, record: Record) -> Result<()> {
        self.count_in(record.payload.len())?;
        self.send(Command::Append(record))
    }

    /// Stages a record of transaction `top`, written by its (sub)transaction `sub`, streamed
    /// before its commit: it joins the queue when `top` commits ([`staged`]).
    pub fn stage(&mut self, top: u32, sub: u32, record: Record) -> Result<()> {
        self.count_in(record.payload.len())?;
        self.send(Command::Stage { top, sub, record })
    }

    /// The source streams `top` again from its first chunk: forget what was staged of it.
    pub fn restart_staged(&mut self, top: u32) -> Result<()> {
        self.count_in(0)?;
        self.send(Command::RestartStaged { top })
    }

    /// Subtransaction `sub` of `top` aborted (the whole transaction when `sub == top`).
    pub fn abort_staged(&mut self, top: u32, sub: u32) -> Result<()> {
        self.count_in(0)?;
        self.send(Command::AbortStaged { top, sub })
    }

    /// `top` committed: its staged records join the queue between `begin` and `commit`, in
    /// one spool transaction.
    pub fn commit_staged(&mut self, top: u32, begin: Record, commit: Record) -> Result<()> {
        self.count_in(begin.payload.len() + commit.payload.len())?;
        self.send(Command::CommitStaged {
            top,
            begin_and_commit: Box::new((begin, commit)),
        })
    }

    /// Counts one more command for the writer (its payload bytes against the queue's
    /// budget), waiting while the queue is over budget.
    fn count_in(&mut self, bytes: usize) -> Result<()> {
        self.sent += 1;
        if self.queued.over_budget() {
            self.check_alive()?;
            tokio::task::block_in_place(|| self.queued.add(bytes));
        } else {
            self.queued.add(bytes);
        }
        Ok(())
    }

    /// Drops the partial transaction that a lost connection left; the source re-sends it.
    pub fn rollback_to_commit(&mut self) -> Result<()> {
        self.send(Command::RollbackToCommit)?;
        Ok(())
    }

    /// Fails if the writer thread has stopped (a failed fsync, a full disk): the receiver
    /// checks this on its timer so that it stops even when it has nothing to append.
    pub fn check_alive(&mut self) -> Result<()> {
        if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
            return Err(self.writer_error());
        }
        Ok(())
    }

    pub fn durable(&self) -> Durable {
        *self.durable.borrow()
    }

    /// Whether every record appended so far is durable (nothing received is pending): the
    /// receiver may then report a keepalive's position as flushed (`replication::stream`).
    pub fn all_durable(&self) -> bool {
        self.durable.borrow().records >= self.sent
    }

    /// Waits until every appended record is durable.
    pub async fn sync(&mut self) -> Result<Durable> {
        let target = self.sent;
        let mut rx = self.durable.clone();
        loop {
            let d = *rx.borrow_and_update();
            if d.records >= target {
                return Ok(d);
            }
            if rx.changed().await.is_err() {
                return Err(self.writer_error());
            }
        }
    }

    /// Flushes and stops the writer thread.
    pub fn close(mut self) -> Result<()> {
        self.tx = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(anyhow!("the spool writer panicked")),
            None => Ok(()),
        }
    }
}

/// A full disk is the one write error an operator can fix on the spot: say so, and what the
/// state is (nothing past the last durable commit was acknowledged to the source).
fn explain_full(e: anyhow::Error, dir: &str) -> anyhow::Error {
    let full = e.chain().any(|c| {
        c.downcast_ref::<rusqlite::Error>().is_some_and(|r| {
            r.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
                || r.to_string().contains("disk is full")
        }) || c
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
    });
    if full {
        anyhow!(
            "the disk of the work dir {dir} is full: the spool cannot grow. Nothing past the last durable transaction was acknowledged to the source, whose slot keeps the rest. Free space on that disk (or let apply catch up and prune the spool), then rerun the same command: it continues where the spool ends, nothing lost."
        )
    } else {
        e
    }
}

fn write_loop(
    mut conn: Connection,
    rx: Receiver<Command>,
    durable_tx: watch::Sender<Durable>,
    on_batch: Box<dyn Fn(u64) + Send>,
    queued: &QueuedBytes,
) -> Result<()> {
    let mut records = 0u64;
    let mut commit_end = durable_tx.borrow().commit_end;
    let mut batches = 0u64;
    while let Ok(first) = rx.recv() {
        let tx = conn.transaction()?;
        // A streamed transaction that committed: its Begin ends this spool transaction.
        let mut committed_stream: Option<(u32, Record)> = None;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO changes (lsn, end_lsn, xid, kind, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut staged_rows = staged::StagedRows::new(&tx)?;
            let mut frame = Frame::default();
            // Records of the streamed (sub)transaction `staged_rows` names, not yet written.
            let mut staged_frame = Frame::default();
            let mut next = Some(first);
            let mut n = 0;
            let mut bytes = 0;
            while let Some(command) = next.take() {
                // A frame of staged records holds one subtransaction's, so that an abort can
                // drop whole rows.
                let same_staged = matches!(&command, Command::Stage { top, sub, .. }
                    if (*top, *sub) == (staged_rows.top, staged_rows.sub));
                if !same_staged {
                    staged_frame.write(&mut staged_rows)?;
                }
                match command {
                    Command::Append(r) => {
                        if let Some(end) = r.end_lsn {
                            commit_end = commit_end.max(end);
                        }
                        records += 1;
                        bytes += r.payload.len();
                        queued.remove(r.payload.len());
                        frame.add(r, &mut insert)?;
                    }
                    Command::RollbackToCommit => {
                        // What the frames hold follows the last commit: dropped with the rest.
                        frame.discard();
                        staged_frame.discard();
                        rollback_to_last_commit(&tx)?;
                        staged::forget_all(&tx)?;
                    }
                    Command::Stage { top, sub, record } => {
                        (staged_rows.top, staged_rows.sub) = (top, sub);
                        records += 1;
                        bytes += record.payload.len();
                        queued.remove(record.payload.len());
                        staged_frame.add(record, &mut staged_rows)?;
                    }
                    Command::RestartStaged { top } => {
                        records += 1;
                        staged::forget(&tx, top)?;
                    }
                    Command::AbortStaged { top, sub } => {
                        records += 1;
                        if sub == top {
                            staged::forget(&tx, top)?;
                        } else {
                            staged::abort_subtransaction(&tx, top, sub)?;
                        }
                    }
                    Command::CommitStaged {
                        top,
                        begin_and_commit,
                    } => {
                        let (begin, commit) = *begin_and_commit;
                        queued.remove(begin.payload.len() + commit.payload.len());
                        // Nothing of another transaction is open between two stream
                        // messages; write the frame anyway so that the order is the queue's.
                        frame.write(&mut insert)?;
                        insert.row(&begin, begin.kind, &begin.payload)?;
                        // The records follow in spool transactions of their own, after this
                        // one (see `staged::move_to_queue`).
                        committed_stream = Some((top, commit));
                        break;
                    }
                }
                n += 1;
                if n < BATCH_RECORDS && bytes < BATCH_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            // A transaction still arriving is written as far as it came: what is queued
            // always reaches the disk, so memory stays bounded whatever its size.
            frame.write(&mut insert)?;
            staged_frame.write(&mut staged_rows)?;
        }
        if commit_end > durable_tx.borrow().commit_end {
            record_commit_end(&tx, commit_end)?;
        }
        fail::fail_point!(crate::failpoints::SPOOL_BEFORE_COMMIT);
        tx.commit()
            .context("cannot commit to the spool (is the disk full?)")?;
        fail::fail_point!(crate::failpoints::SPOOL_AFTER_WRITE);
        if let Some((top, commit)) = committed_stream {
            let started = std::time::Instant::now();
            let moved = staged::move_to_queue(&mut conn, top, &commit)?;
            tracing::debug!(
                "spool: streamed transaction {top} committed: {moved} staged rows queued in {:?}",
                started.elapsed()
            );
            records += 1;
            if let Some(end) = commit.end_lsn {
                commit_end = commit_end.max(end);
                record_commit_end(&conn, commit_end)?;
            }
        }
        durable_tx.send_replace(Durable {
            commit_end,
            records,
        });
        batches += 1;
        if batches % 16 == 1 {
            on_batch(spool_bytes(&conn));
        }
    }
    on_batch(spool_bytes(&conn));
    Ok(())
}

/// A relation or type description: always a row of its own, so that a resume finds it
/// (relations) and so that undoing a streamed subtransaction never removes one
/// ([`staged`]).
fn is_description(kind: &str) -> bool {
    kind == "relation" || kind == "type"
}

/// Records the end of the last durable commit (see [`COMMIT_END_KEY`]).
fn record_commit_end(conn: &Connection, commit_end: Lsn) -> Result<()> {
    conn.execute(
        "INSERT INTO spool_meta (key, value) VALUES (?1, ?2)
           ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![COMMIT_END_KEY, (commit_end.0 as i64).to_string()],
    )?;
    Ok(())
}

/// Records of one transaction waiting to be written as one row.
#[derive(Default)]
struct Frame {
    records: Vec<Record>,
    bytes: usize,
}

impl Frame {
    /// Takes a record: a relation description or a wide record is written alone (after what
    /// the frame holds), a commit closes the frame.
    fn add(&mut self, record: Record, insert: &mut impl RowSink) -> Result<()> {
        if is_description(record.kind) || record.payload.len() >= FRAME_BYTES {
            self.write(insert)?;
            return insert.row(&record, record.kind, &record.payload);
        }
        if self.records.len() >= FRAME_RECORDS || self.bytes + record.payload.len() > FRAME_BYTES {
            self.write(insert)?;
        }
        let closes = record.end_lsn.is_some();
        self.bytes += record.payload.len();
        self.records.push(record);
        if closes {
            self.write(insert)?;
        }
        Ok(())
    }

    /// Writes what the frame holds as one row (a lone record as itself) and empties it.
    fn write(&mut self, insert: &mut impl RowSink) -> Result<()> {
        match self.records.len() {
            0 => {}
            1 => {
                let record = &self.records[0];
                insert.row(record, record.kind, &record.payload)?;
            }
            _ => {
                let mut body = Vec::with_capacity(1 + self.bytes + self.records.len() * 17);
                body.push(FRAME_VERSION);
                for r in &self.records {
                    body.extend_from_slice(&r.lsn.0.to_be_bytes());
                    match r.xid {
                        Some(xid) => {
                            body.push(1);
                            body.extend_from_slice(&xid.to_be_bytes());
                        }
                        None => body.extend_from_slice(&[0; 5]),
                    }
                    let len = u32::try_from(r.payload.len())
                        .map_err(|_| anyhow!("a record too large for a spool frame"))?;
                    body.extend_from_slice(&len.to_be_bytes());
                    body.extend_from_slice(&r.payload);
                }
                // The row's lsn and xid are the first record's; its end_lsn the commit's, when
                // the frame ends with one (only the last record can be a commit).
                let last_end = self.records.last().and_then(|r| r.end_lsn);
                let row = Record {
                    end_lsn: last_end,
                    ..self.records[0].clone()
                };
                insert.row(&row, FRAME_KIND, &body)?;
            }
        }
        self.discard();
        Ok(())
    }

    /// Empties the frame without writing it.
    fn discard(&mut self) {
        self.records.clear();
        self.bytes = 0;
    }
}

/// Where a frame's rows go: the change queue, or the staging of a streamed transaction
/// ([`staged`]).
trait RowSink {
    fn row(&mut self, record: &Record, kind: &str, payload: &[u8]) -> Result<()>;
}

impl RowSink for rusqlite::CachedStatement<'_> {
    fn row(&mut self, record: &Record, kind: &str, payload: &[u8]) -> Result<()> {
        self.execute(params![
            record.lsn.0 as i64,
            record.end_lsn.map(|l| l.0 as i64),
            record.xid,
            kind,
            payload
        ])?;
        Ok(())
    }
}

/// The records of `(seq, lsn, xid, kind, payload)` rows, in order, stopping once `max_bytes`
/// of payload are read (at least one row).
fn unpack_rows(mut rows: rusqlite::Rows<'_>, max_bytes: usize) -> Result<Vec<Stored>> {
    let mut read = Vec::new();
    let mut bytes = 0;
    while let Some(row) = rows.next()? {
        let payload = Bytes::from(row.get::<_, Vec<u8>>(4)?);
        bytes += payload.len();
        let kind: String = row.get(3)?;
        unpack(
            row.get(0)?,
            Lsn(row.get::<_, i64>(1)? as u64),
            row.get(2)?,
            &kind,
            payload,
            &mut read,
        )?;
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(read)
}

/// Appends the records of one spool row to `out`: a frame's records, or the row itself.
fn unpack(
    seq: i64,
    lsn: Lsn,
    xid: Option<u32>,
    kind: &str,
    payload: Bytes,
    out: &mut Vec<Stored>,
) -> Result<()> {
    if kind != FRAME_KIND {
        out.push(Stored {
            seq,
            lsn,
            xid,
            payload,
        });
        return Ok(());
    }
    let corrupt = || {
        anyhow!(
            "spool row {seq} is not a readable frame: the spool file is damaged. Nothing from it on was applied, and the source's slot no longer holds those changes (they were acknowledged once spooled): run `pgtide cleanup`, then copy the database again with `pgtide clone --follow`"
        )
    };
    match payload.first() {
        Some(&FRAME_VERSION) => {}
        Some(version) => bail!(
            "spool row {seq} is a frame of format {version}, written by a newer pgtide than this one (format {FRAME_VERSION}): run that pgtide on this work dir"
        ),
        None => return Err(corrupt()),
    }
    let mut at = 1;
    while at < payload.len() {
        let header = payload.get(at..at + 17).ok_or_else(corrupt)?;
        let lsn = u64::from_be_bytes(header[0..8].try_into().map_err(|_| corrupt())?);
        let xid = (header[8] == 1)
            .then(|| u32::from_be_bytes([header[9], header[10], header[11], header[12]]));
        let len = u32::from_be_bytes([header[13], header[14], header[15], header[16]]) as usize;
        let start = at + 17;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= payload.len())
            .ok_or_else(corrupt)?;
        out.push(Stored {
            seq,
            lsn: Lsn(lsn),
            xid,
            payload: payload.slice(start..end),
        });
        at = end;
    }
    Ok(())
}

fn spool_bytes(conn: &Connection) -> u64 {
    conn.query_row(
        "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|b| b.max(0) as u64)
    .unwrap_or(0)
}

/// One spooled record read back.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its row's sequence number: the records of one frame share it, and a reader's place
    /// (`after_seq`) is always a whole row.
    pub seq: i64,
    pub lsn: Lsn,
    pub xid: Option<u32>,
    pub payload: Bytes,
}

/// The spool's size on disk (its database and WAL files); None when there is none.
pub fn disk_bytes(dir: &Path) -> Option<u64> {
    ["spool.db", "spool.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .reduce(|a, b| a + b)
}

/// A read-only view of the spool for questions about what it holds (status, metrics): it
/// never creates the spool, changes it, or waits long for the writer.
pub struct SpoolView {
    conn: Connection,
}

impl SpoolView {
    /// Opens the work dir's spool read-only; `Ok(None)` when there is no spool yet.
    pub fn open(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("spool.db");
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(2))?;
        Ok(Some(SpoolView { conn }))
    }

    /// When the oldest spooled commit after `after` (and not past `through`) was committed on
    /// the source, in seconds since the Unix epoch; `Ok(None)` when no such commit is found.
    /// `plugin` is asked only when there is a record to decode.
    pub fn oldest_pending_commit_time(
        &self,
        after: Lsn,
        through: Option<Lsn>,
        plugin: impl FnOnce() -> Result<crate::replication::Plugin>,
    ) -> Result<Option<f64>> {
        let payload: Option<(i64, String, Vec<u8>)> = self
            .conn
            .query_row(
                "SELECT seq, kind, payload FROM changes WHERE end_lsn IS NOT NULL AND end_lsn > ?1 AND end_lsn <= ?2 ORDER BY seq LIMIT 1",
                [after.0 as i64, through.map_or(i64::MAX, |e| e.0 as i64)],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?)),
            )
            .ok();
        let Some((seq, kind, payload)) = payload else {
            return Ok(None);
        };
        // A commit ends its row: the last record of a frame.
        let mut records = Vec::new();
        unpack(seq, Lsn(0), None, &kind, Bytes::from(payload), &mut records)?;
        let Some(commit) = records.pop() else {
            return Ok(None);
        };
        let mut decoder = crate::decode::StreamDecoder::new(plugin()?);
        match decoder.decode(commit.payload).as_deref() {
            Ok([crate::decode::Change::Commit { commit_time, .. }]) => {
                // Commit times are microseconds since 2000-01-01 (both decoders).
                Ok(Some(*commit_time as f64 / 1e6 + 946_684_800.0))
            }
            _ => Err(anyhow!(
                "the oldest pending commit in the spool cannot be decoded"
            )),
        }
    }
}

/// The reading side: in order, from any position.
pub struct SpoolReader {
    conn: Connection,
}

impl SpoolReader {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("spool.db");
        if !path.exists() {
            anyhow::bail!(
                "{} has no spool yet: run `pgtide stream receive` (or follow) first",
                dir.display()
            );
        }
        Ok(SpoolReader {
            conn: open_db(&path)?,
        })
    }

    /// The records of the rows with seq > `after_seq`, at most `limit` rows, in order.
    pub fn read(&self, after_seq: i64, limit: usize) -> Result<Vec<Stored>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, lsn, xid, kind, payload FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        // Wide rows: stop at READ_BYTES (at least one row), memory stays bounded.
        unpack_rows(stmt.query(params![after_seq, limit as i64])?, READ_BYTES)
    }

    /// The sequence number of the last record of the transaction whose commit ended at
    /// `applied`, or of the last commit before it: apply resumes after it.
    pub fn seq_through(&self, applied: Lsn) -> Result<i64> {
        // The last commit at or before `applied` may be pruned already (only the relation
        // descriptions of pruned transactions stay): then the position is just before the
        // first record left that is not a relation description. Starting at 0 instead would
        // replay every stale description kept, and one naming a column renamed or dropped
        // since stops apply as drift (found by scripts/soak.sh: a restart after a rename).
        //
        // Three single-table queries, each an index or rowid range: one statement joining a
        // CTE could be planned as a scan per row, and took up to a minute of CPU at the start
        // of apply on a spool of a few hundred thousand rows (found by scripts/bench.sh).
        let last_commit: i64 = self.conn.query_row(
            "SELECT coalesce(max(seq), 0) FROM changes WHERE end_lsn IS NOT NULL AND end_lsn <= ?1",
            [applied.0 as i64],
            |r| r.get(0),
        )?;
        let next: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM changes WHERE seq > ?1 AND kind <> 'relation' ORDER BY seq LIMIT 1",
                [last_commit],
                |r| r.get(0),
            )
            .optional()?;
        match next {
            Some(next) => Ok(next - 1),
            None => {
                Ok(self
                    .conn
                    .query_row("SELECT coalesce(max(seq), 0) FROM changes", [], |r| {
                        r.get(0)
                    })?)
            }
        }
    }

    /// Relation messages spooled before `seq`, oldest first: what a read that starts in the
    /// middle needs to know about the tables.
    pub fn relations_before(&self, seq: i64) -> Result<Vec<Bytes>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT payload FROM changes WHERE kind = 'relation' AND seq <= ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([seq], |r| Ok(Bytes::from(r.get::<_, Vec<u8>>(0)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Removes whole transactions whose commit ended at or before `applied` (the target's
    /// durable position: invariant 1); relation descriptions are kept for what follows.
    /// Returns the rows removed.
    /// Deletes in chunks, each its own SQLite transaction: a pruned 40-million-row
    /// transaction never holds the write lock longer than the writer's busy timeout.
    pub fn prune_through(&self, applied: Lsn) -> Result<usize> {
        let through: i64 = self.conn.query_row(
            "SELECT coalesce(max(seq), 0) FROM changes WHERE end_lsn IS NOT NULL AND end_lsn <= ?1",
            [applied.0 as i64],
            |r| r.get(0),
        )?;
        let mut stmt = self.conn.prepare_cached(
            "DELETE FROM changes WHERE seq IN (
                SELECT seq FROM changes WHERE kind <> 'relation' AND seq <= ?1 ORDER BY seq LIMIT ?2)",
        )?;
        let mut pruned = 0;
        loop {
            let deleted = match stmt.execute(params![through, PRUNE_CHUNK as i64]) {
                Ok(deleted) => deleted,
                // The writer held the lock past the busy timeout (a disk that stalls): pruning
                // only frees space, the next call (a second later) does it.
                Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => {
                    tracing::debug!("spool: pruning postponed, the spool is busy: {e}");
                    return Ok(pruned);
                }
                Err(e) => return Err(e.into()),
            };
            pruned += deleted;
            if deleted < PRUNE_CHUNK {
                return Ok(pruned);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(lsn: u64, kind: &'static str, end: Option<u64>) -> Record {
        Record {
            lsn: Lsn(lsn),
            end_lsn: end.map(Lsn),
            xid: Some(1),
            kind,
            payload: Bytes::from_static(b"x"),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn incomplete_transactions_are_dropped_on_reopen() {
        let dir = std::env::temp_dir().join(format!("pgtide-spool-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = SpoolWriter::open(&dir, Box::new(|_| {})).unwrap();
        for r in [
            rec(10, "begin", None),
            rec(11, "insert", None),
            rec(12, "commit", Some(20)),
            rec(30, "begin", None),
            rec(31, "insert", None),
        ] {
            w.append(r).unwrap();
        }
        let d = w.sync().await.unwrap();
        assert_eq!(d.commit_end, Lsn(20));
        w.close().unwrap();
        let w = SpoolWriter::open(&dir, Box::new(|_| {})).unwrap();
        assert_eq!(w.durable().commit_end, Lsn(20));
        w.close().unwrap();
        let reader = SpoolReader::open(&dir).unwrap();
        let all = reader.read(0, 100).unwrap();
        assert_eq!(
            all.iter().map(|s| s.lsn.0).collect::<Vec<_>>(),
            vec![10, 11, 12]
        );
        // Pruning stops at the applied commit: nothing not yet applied is dropped.
        assert_eq!(reader.prune_through(Lsn(19)).unwrap(), 0);
        // One row (a frame) or more (when the writer's group commit cut it).
        assert!(reader.prune_through(Lsn(20)).unwrap() >= 1);
        assert!(reader.read(0, 100).unwrap().is_empty());
        drop(reader);

        // After pruning everything, new records still come after the reader's position:
        // sequence numbers are never reused (apply once stalled on reused ones).
        let last_seq = all.last().unwrap().seq;
        let mut w = SpoolWriter::open(&dir, Box::new(|_| {})).unwrap();
        for r in [
            rec(30, "begin", None),
            rec(31, "insert", None),
            rec(32, "commit", Some(40)),
        ] {
            w.append(r).unwrap();
        }
        w.sync().await.unwrap();
        w.close().unwrap();
        let reader = SpoolReader::open(&dir).unwrap();
        let after = reader.read(last_seq, 100).unwrap();
        assert_eq!(
            after.iter().map(|s| s.lsn.0).collect::<Vec<_>>(),
            vec![30, 31, 32]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// After pruning, the position of the last applied commit is still known: a resume reads
    /// the kept relation descriptions as history (the last one of each table counts), never
    /// again as changes to match with the target.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_applied_position_survives_pruning() {
        let dir = std::env::temp_dir().join(format!("pgtide-spool-through-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = SpoolWriter::open(&dir, Box::new(|_| {})).unwrap();
        for r in [
            rec(10, "begin", None),
            rec(0, "relation", None),
            rec(11, "insert", None),
            rec(12, "commit", Some(20)),
            rec(30, "begin", None),
            rec(0, "relation", None),
            rec(31, "insert", None),
            rec(32, "commit", Some(40)),
            rec(50, "begin", None),
            rec(51, "insert", None),
            rec(52, "commit", Some(60)),
        ] {
            w.append(r).unwrap();
        }
        w.sync().await.unwrap();
        w.close().unwrap();
        let reader = SpoolReader::open(&dir).unwrap();
        let all = reader.read(0, 100).unwrap();
        let seq_of = |i: usize| all[i].seq;
        assert_eq!(reader.seq_through(Lsn(40)).unwrap(), seq_of(7));
        reader.prune_through(Lsn(40)).unwrap();
        // Both commits are gone; the position is still after the second transaction.
        assert_eq!(reader.seq_through(Lsn(40)).unwrap(), seq_of(8) - 1);
        assert_eq!(reader.relations_before(seq_of(8) - 1).unwrap().len(), 2);
        let next = reader
            .read(reader.seq_through(Lsn(40)).unwrap(), 100)
            .unwrap();
        assert_eq!(next.first().map(|r| r.lsn.0), Some(50));
        // Everything applied and pruned: the position is the end of the spool.
        reader.prune_through(Lsn(60)).unwrap();
        let end = reader.seq_through(Lsn(60)).unwrap();
        assert!(reader.read(end, 100).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A transaction larger than a pruning chunk is pruned whole (in several short write
    /// transactions), its relation description kept; a read of wide records stops at
    /// READ_BYTES.
    #[tokio::test(flavor = "multi_thread")]
    async fn big_transactions_prune_in_chunks_and_wide_reads_are_capped() {
        let dir = std::env::temp_dir().join(format!("pgtide-spool-chunks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = SpoolWriter::open(&dir, Box::new(|_| {})).unwrap();
        // More transactions than a pruning chunk: each is one row at least.
        let transactions = 3 * PRUNE_CHUNK as u64 + 7;
        w.append(rec(10, "relation", None)).unwrap();
        let mut lsn = 11;
        for _ in 0..transactions {
            w.append(rec(lsn, "begin", None)).unwrap();
            w.append(rec(lsn + 1, "insert", None)).unwrap();
            w.append(rec(lsn + 2, "commit", Some(lsn + 3))).unwrap();
            lsn += 4;
        }
        let end = lsn;
        w.append(rec(end, "commit", Some(end + 1))).unwrap();
        let wide = Bytes::from(vec![b'w'; 40 << 20]);
        w.append(rec(end + 10, "begin", None)).unwrap();
        for i in 0..3 {
            w.append(Record {
                payload: wide.clone(),
                ..rec(end + 11 + i, "insert", None)
            })
            .unwrap();
        }
        w.append(rec(end + 20, "commit", Some(end + 21))).unwrap();
        w.sync().await.unwrap();
        w.close().unwrap();
        let reader = SpoolReader::open(&dir).unwrap();
        assert!(
            reader.prune_through(Lsn(end + 1)).unwrap() > transactions as usize,
            "every transaction pruned, in several chunks"
        );
        assert_eq!(reader.relations_before(i64::MAX).unwrap().len(), 1);
        // Each 40 MB record is over READ_BYTES: a read returns what precedes it and it.
        let first = reader.read(0, 100).unwrap();
        assert_eq!(
            first.len(),
            3,
            "the relation kept, the begin, then one 40 MB record reaches the cap"
        );
        let second = reader.read(first.last().unwrap().seq, 100).unwrap();
        assert_eq!(second.len(), 1, "the second wide record alone");
        let rest = reader.read(second.last().unwrap().seq, 100).unwrap();
        assert_eq!(rest.len(), 1, "the third wide record alone");
        let last = reader.read(rest.last().unwrap().seq, 100).unwrap();
        assert_eq!(last.len(), 1, "the commit");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Records packed into frames read back exactly (position, xid, payload, order); a
    /// commit and a relation description end a row; a wide record is stored alone.
    #[test]
    fn frames_read_back_every_record_in_order() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let mut sent = Vec::new();
        {
            let mut insert = conn
                .prepare_cached(
                    "INSERT INTO changes (lsn, end_lsn, xid, kind, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .unwrap();
            let mut frame = Frame::default();
            let mut lsn = 100;
            let mut push =
                |frame: &mut Frame, kind: &'static str, end: bool, payload: Bytes, xid| {
                    lsn += 1;
                    let r = Record {
                        lsn: Lsn(lsn),
                        end_lsn: end.then_some(Lsn(lsn + 1)),
                        xid,
                        kind,
                        payload,
                    };
                    sent.push((r.lsn, r.xid, r.payload.clone()));
                    frame.add(r, &mut insert).unwrap();
                };
            push(
                &mut frame,
                "begin",
                false,
                Bytes::from_static(b"B1"),
                Some(7),
            );
            push(
                &mut frame,
                "relation",
                false,
                Bytes::from_static(b"R"),
                Some(7),
            );
            for i in 0..(FRAME_RECORDS + 10) {
                let payload = Bytes::from(format!("I{i}"));
                push(&mut frame, "insert", false, payload, Some(7));
            }
            push(
                &mut frame,
                "insert",
                false,
                Bytes::from(vec![b'w'; FRAME_BYTES]),
                Some(7),
            );
            push(
                &mut frame,
                "commit",
                true,
                Bytes::from_static(b"C1"),
                Some(7),
            );
            push(&mut frame, "message", false, Bytes::from_static(b"M"), None);
            push(
                &mut frame,
                "begin",
                false,
                Bytes::from_static(b"B2"),
                Some(8),
            );
            push(
                &mut frame,
                "commit",
                true,
                Bytes::from_static(b"C2"),
                Some(8),
            );
            frame.write(&mut insert).unwrap();
        }
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM changes", [], |r| r.get(0))
            .unwrap();
        // begin | relation | two frames of inserts | the wide insert | commit | message + B2 + C2
        assert_eq!(rows, 7);
        let ends: Vec<i64> = conn
            .prepare("SELECT seq FROM changes WHERE end_lsn IS NOT NULL ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(ends, vec![6, 7], "each commit ends a row");
        let reader = SpoolReader { conn };
        let read: Vec<_> = reader
            .read(0, 100)
            .unwrap()
            .into_iter()
            .map(|s| (s.lsn, s.xid, s.payload))
            .collect();
        assert_eq!(read, sent);
        assert_eq!(
            reader.relations_before(i64::MAX).unwrap(),
            vec![Bytes::from_static(b"R")]
        );
    }
}
