//! The receiver's side of transactions the source streams before they commit (pgoutput
//! `streaming 'on'`, asked for from 14 on). A transaction larger than the source's
//! `logical_decoding_work_mem` then arrives in chunks while it runs (Stream Start … Stream
//! Stop, its data messages carrying the xid of the subtransaction that wrote them), and ends
//! with a Stream Commit or a Stream Abort. Without streaming the source's walsender spills
//! such a transaction to its own disk and reads it back at the commit: measured on the
//! 500,000-row UPDATE of `scripts/bench-cpu.sh`, that was a fifth of its CPU.
//!
//! Each chunk's records are staged in the spool ([`crate::spool::SpoolWriter::stage`]) with
//! the xid prefix removed, so that the committed transaction reads exactly like one sent
//! whole; the spool moves them into the change queue at the commit.
//!
//! One case cannot be staged exactly: a logical message carries the top-level xid, not its
//! subtransaction's, so when a subtransaction of a transaction holding a message aborts (a
//! DDL captured inside `SAVEPOINT … ROLLBACK TO`), whether the message was inside it is
//! unknown. The receiver then reconnects without streaming ([`StreamingFallback`]): the
//! source sends that transaction whole, already without its aborted parts.

use std::collections::HashSet;

use anyhow::{Result, anyhow, bail};
use bytes::{BufMut, Bytes, BytesMut};

use crate::decode::{Change, pgoutput};
use crate::pg::Lsn;
use crate::spool::{Record, SpoolWriter};

/// Streaming had to stop for an aborted subtransaction beside a logical message (see the
/// module doc): the receiver reconnects without it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct StreamingFallback(pub(super) String);

/// What a message was to the streamed-transaction handling.
pub(super) enum Outcome {
    /// Not part of a streamed transaction: the ordinary path spools it.
    NotStreamed,
    /// Staged, or a chunk boundary.
    Handled,
    /// A streamed transaction committed at `commit_lsn`; it is in the queue unless it
    /// commits after endpos (`queued: false`).
    Committed { commit_lsn: Lsn, queued: bool },
}

/// The streamed transactions of one replication session.
#[derive(Default)]
pub(super) struct InProgress {
    /// The transaction whose chunk is arriving (between Stream Start and Stream Stop).
    chunk_of: Option<u32>,
    /// Streamed transactions not yet committed or aborted.
    open: HashSet<u32>,
    /// Open transactions holding a transactional logical message.
    with_messages: HashSet<u32>,
}

impl InProgress {
    /// Whether no chunk is arriving: a message received now is not part of one.
    pub(super) fn between_chunks(&self) -> bool {
        self.chunk_of.is_none()
    }

    /// Whether no streamed transaction is open either: only then may a keepalive's position
    /// be reported as flushed, as between ordinary transactions.
    pub(super) fn none_open(&self) -> bool {
        self.chunk_of.is_none() && self.open.is_empty()
    }

    /// Handles one pgoutput message if it belongs to a streamed transaction.
    pub(super) fn receive(
        &mut self,
        wal_start: Lsn,
        payload: &Bytes,
        decoder: &mut pgoutput::Decoder,
        spool: &mut SpoolWriter,
        endpos: Option<Lsn>,
    ) -> Result<Outcome> {
        let Some(&tag) = payload.first() else {
            return Ok(Outcome::NotStreamed);
        };
        match tag {
            b'S' => {
                // Decoded apart: the session's decoder must not switch to chunk mode, the
                // messages it is given here have their xid removed.
                let Change::StreamStart { xid, first_segment } =
                    pgoutput::Decoder::default().decode(payload.clone())?
                else {
                    bail!("a Stream Start message that does not decode as one");
                };
                tracing::debug!("streamed transaction {xid}: a chunk (first: {first_segment})");
                if first_segment {
                    spool.restart_staged(xid)?;
                    self.with_messages.remove(&xid);
                }
                self.open.insert(xid);
                self.chunk_of = Some(xid);
                Ok(Outcome::Handled)
            }
            b'E' => {
                self.chunk_of = None;
                Ok(Outcome::Handled)
            }
            b'c' => {
                let Change::StreamCommit {
                    xid,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                } = decoder.decode(payload.clone())?
                else {
                    bail!("a Stream Commit message that does not decode as one");
                };
                tracing::debug!("streamed transaction {xid} committed at {commit_lsn}");
                self.open.remove(&xid);
                self.with_messages.remove(&xid);
                if endpos.is_some_and(|endpos| commit_lsn > endpos) {
                    return Ok(Outcome::Committed {
                        commit_lsn,
                        queued: false,
                    });
                }
                let (begin, commit) =
                    whole_transaction_ends(wal_start, xid, commit_lsn, end_lsn, commit_time);
                spool.commit_staged(xid, begin, commit)?;
                Ok(Outcome::Committed {
                    commit_lsn,
                    queued: true,
                })
            }
            b'A' => {
                let Change::StreamAbort { xid, subxid } = decoder.decode(payload.clone())? else {
                    bail!("a Stream Abort message that does not decode as one");
                };
                tracing::debug!("streamed transaction {xid}: subtransaction {subxid} aborted");
                if subxid == xid {
                    self.open.remove(&xid);
                    self.with_messages.remove(&xid);
                } else if self.with_messages.contains(&xid) {
                    return Err(anyhow::Error::new(StreamingFallback(format!(
                        "subtransaction {subxid} of the streamed transaction {xid} aborted, and that transaction holds a logical message (a captured schema change) that may have been inside it"
                    ))));
                }
                spool.abort_staged(xid, subxid)?;
                Ok(Outcome::Handled)
            }
            _ => match self.chunk_of {
                Some(top) => {
                    self.stage(top, wal_start, tag, payload, decoder, spool)?;
                    Ok(Outcome::Handled)
                }
                None => Ok(Outcome::NotStreamed),
            },
        }
    }

    /// Stages one message of `top`'s chunk without its xid prefix.
    fn stage(
        &mut self,
        top: u32,
        wal_start: Lsn,
        tag: u8,
        payload: &Bytes,
        decoder: &mut pgoutput::Decoder,
        spool: &mut SpoolWriter,
    ) -> Result<()> {
        // An origin message follows Stream Start without an xid of its own.
        let (sub, message) = if tag == b'O' {
            (top, payload.clone())
        } else {
            let prefix = payload
                .get(1..5)
                .ok_or_else(|| anyhow!("a streamed message too short for its xid"))?;
            let sub = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
            let mut message = BytesMut::with_capacity(payload.len() - 4);
            message.put_u8(tag);
            message.extend_from_slice(&payload[5..]);
            (sub, message.freeze())
        };
        let kind = match pgoutput::row_change_kind(&message) {
            Some(kind) => kind,
            None => {
                let change = decoder.decode(message.clone())?;
                if let Change::Message { transactional, .. } = &change {
                    if !*transactional {
                        // Not part of the transaction: spooled where it arrives, as it
                        // would be between transactions.
                        return spool.append(Record {
                            lsn: wal_start,
                            end_lsn: None,
                            xid: None,
                            kind: change.kind(),
                            payload: message,
                        });
                    }
                    self.with_messages.insert(top);
                }
                change.kind()
            }
        };
        spool.stage(
            top,
            sub,
            Record {
                lsn: wal_start,
                end_lsn: None,
                xid: Some(top),
                kind,
                payload: message,
            },
        )
    }
}

/// The Begin and Commit of a streamed transaction, as the source would have sent them had
/// it sent the transaction whole: apply reads no difference.
fn whole_transaction_ends(
    wal_start: Lsn,
    xid: u32,
    commit_lsn: Lsn,
    end_lsn: Lsn,
    commit_time: i64,
) -> (Record, Record) {
    let mut begin = BytesMut::with_capacity(21);
    begin.put_u8(b'B');
    begin.put_u64(commit_lsn.0);
    begin.put_i64(commit_time);
    begin.put_u32(xid);
    let mut commit = BytesMut::with_capacity(26);
    commit.put_u8(b'C');
    commit.put_u8(0);
    commit.put_u64(commit_lsn.0);
    commit.put_u64(end_lsn.0);
    commit.put_i64(commit_time);
    (
        Record {
            lsn: wal_start,
            end_lsn: None,
            xid: Some(xid),
            kind: "begin",
            payload: begin.freeze(),
        },
        Record {
            lsn: wal_start,
            end_lsn: Some(end_lsn),
            xid: Some(xid),
            kind: "commit",
            payload: commit.freeze(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Begin and Commit made from a Stream Commit decode as the ones the source sends.
    #[test]
    fn made_ends_decode_like_the_sources() {
        let (begin, commit) = whole_transaction_ends(Lsn(5), 731, Lsn(0x1000), Lsn(0x1030), 42);
        let mut decoder = pgoutput::Decoder::default();
        assert_eq!(
            decoder.decode(begin.payload).unwrap(),
            Change::Begin {
                final_lsn: Lsn(0x1000),
                commit_time: 42,
                xid: 731
            }
        );
        assert_eq!(
            decoder.decode(commit.payload).unwrap(),
            Change::Commit {
                commit_lsn: Lsn(0x1000),
                end_lsn: Lsn(0x1030),
                commit_time: 42
            }
        );
        assert_eq!(commit.end_lsn, Some(Lsn(0x1030)));
    }
}
