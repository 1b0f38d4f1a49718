//! The receive loop: START_REPLICATION, XLogData into the spool, primary keepalives answered,
//! standby status updates on a timer with write = received, flush = durably spooled (never
//! more: invariant 1) or, when nothing received is pending, the last keepalive's position (so
//! an idle slot keeps moving: invariant 12), apply = durably applied on the target. Positions
//! never move backwards.
//! A lost connection is retried with backoff from the last durable commit; the partial
//! transaction it interrupted is dropped from the spool because the source sends it again.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::Plugin;
use super::conn::ReplicationConnection;
use super::slot::publication_name;
use super::streamed::{Outcome, StreamingFallback};
use crate::conninfo::ConnInfo;
use crate::decode::{Change, pgoutput};
use crate::errors::{ErrorClass, Fatal, classify, sqlstate};
use crate::pg::{Lsn, ServerVersion, quote_ident, quote_literal};
use crate::spool::{Record, SpoolWriter};
use crate::state::StateDb;

/// Seconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_SECS: u64 = 946_684_800;

/// What the receive loop was asked to do.
pub struct ReceiveOptions {
    pub slot: String,
    pub plugin: Plugin,
    /// Where the stream starts when the spool is empty (the slot's consistent point).
    pub start: Lsn,
    /// Stop once every transaction committed at or before it is spooled.
    pub endpos: Option<Lsn>,
    pub status_interval: Duration,
    /// wal2json's table filter (`add-tables`), the same tables the publication holds.
    pub tables: Vec<(String, String)>,
    /// pgoutput's publications (the slot's, and its append-only one when there is one).
    pub publications: Vec<String>,
    /// The source's system identifier recorded at setup: streaming from another server is
    /// refused.
    pub system_id: Option<String>,
    /// Where the target durably stands, when an apply loop runs beside the receiver: reported
    /// to the source as "apply".
    pub applied: Option<AppliedPosition>,
}

/// Asks the apply loop running beside the receiver for the position the target has durably
/// committed. A plain position, so the receiver does not depend on apply.
pub type AppliedPosition = Box<dyn Fn() -> Lsn + Send + Sync>;

/// Why the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Endpos { flushed: Lsn },
    Interrupted { flushed: Lsn },
}

/// The work dir belongs to another source server.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct WrongServer(String);

/// How long a new receiver waits for the source to release a slot held by a connection that
/// just died.
const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(20);

/// The reason and the fix for the errors the receiver stops on that the server's message
/// alone does not explain.
fn explain(e: anyhow::Error, slot: &str) -> anyhow::Error {
    if super::slot::is_slot_lost(&e) {
        let e = format!("{e:#}");
        return anyhow::Error::new(Fatal(format!(
            "the replication slot \"{slot}\" is lost: the source removed WAL it still needed, because it retained more than max_slot_wal_keep_size while pgtide was behind or stopped (or invalidated the slot) ({e}). {}",
            super::slot::LOST_SLOT_FIX
        )));
    }
    match sqlstate(&e).as_deref() {
        Some("55006") => {
            let e = format!("{e:#}");
            anyhow!(
                "the replication slot \"{slot}\" is in use by another process ({e}). Another pgtide (or another consumer) is streaming from it: stop that one first, or use another --slot-name."
            )
        }
        Some("42704") => e.context("run `pgtide stream setup` first (or check --slot-name)"),
        _ => e,
    }
}

/// Receives into `spool` until endpos, Ctrl-C, or a fatal error.
pub async fn receive(
    info: &ConnInfo,
    spool: &mut SpoolWriter,
    state: &StateDb,
    opts: &ReceiveOptions,
) -> Result<Ended> {
    let mut positions = Positions::default();
    let mut backoff = Duration::from_millis(200);
    // Since when the slot has been reported busy without a break.
    let mut busy_since: Option<Instant> = None;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let durable = spool.sync().await?;
        let start = durable.commit_end.max(opts.start);
        let session = Session::run(info, spool, state, opts, &mut positions, start);
        let result = tokio::select! {
            r = session => r,
            _ = &mut ctrl_c => {
                let d = spool.sync().await?;
                tracing::info!("interrupted; spooled through {}", d.commit_end);
                return Ok(Ended::Interrupted { flushed: d.commit_end });
            }
        };
        let e = match result {
            Ok(ended) => return Ok(ended),
            Err(e) => e,
        };
        if let Some(fallback) = e.downcast_ref::<StreamingFallback>() {
            tracing::warn!(
                "{fallback}: reconnecting without streaming of transactions before their commit, so that the source sends that transaction whole (until pgtide restarts)"
            );
            positions.whole_transactions_only = true;
            spool.rollback_to_commit()?;
            continue;
        }
        match classify(&e) {
            // A pgtide killed a moment ago (or our own connection that just died) leaves its
            // walsender holding the slot until the source notices the closed connection:
            // wait for it a little.
            ErrorClass::Busy
                if busy_since.get_or_insert_with(Instant::now).elapsed() < SLOT_RELEASE_WAIT =>
            {
                tracing::info!(
                    "the slot {} is still held by a previous connection; waiting for the source to release it",
                    opts.slot
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            // Once the stream has started, a lost connection or a restarting source is
            // retried from the last durable commit. Before it ever started (bad password,
            // TLS, unreachable source, missing slot) retrying cannot help: say so at once.
            ErrorClass::Transient if positions.streamed => {
                busy_since = None;
                tracing::warn!("replication connection lost: {e:#}; reconnecting in {backoff:?}");
                spool.rollback_to_commit()?;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            // Anything else (a decode error, the wrong server, a missing slot, permission
            // denied, an unknown SQLSTATE) would fail again on every retry.
            _ => return Err(explain(e, &opts.slot)),
        }
    }
}

/// Positions reported to the source; each only moves forward.
#[derive(Default)]
struct Positions {
    /// Whether START_REPLICATION ever succeeded in this run.
    streamed: bool,
    received: Lsn,
    flushed: Lsn,
    applied: Lsn,
    /// The last keepalive position received between transactions: reported as flushed once
    /// everything received before it is durable (see [`send_status`]).
    keepalive: Lsn,
    /// Transactions are no longer asked to be streamed before their commit, after a
    /// [`StreamingFallback`] in this run.
    whole_transactions_only: bool,
}

struct Session;

impl Session {
    async fn run(
        info: &ConnInfo,
        spool: &mut SpoolWriter,
        state: &StateDb,
        opts: &ReceiveOptions,
        positions: &mut Positions,
        start: Lsn,
    ) -> Result<Ended> {
        let mut conn = ReplicationConnection::connect(info).await?;
        let identity = super::slot::identify_system(&mut conn).await?;
        if let Some(expected) = &opts.system_id
            && *expected != identity.system_id
        {
            return Err(anyhow::Error::new(WrongServer(format!(
                "the source at {} (system {}) is not the server this work dir streams from (system {expected}): check --source, or use another --dir",
                info.endpoint(),
                identity.system_id
            ))));
        }
        let options = match opts.plugin {
            Plugin::Pgoutput => pgoutput_options(
                opts,
                ServerVersion::parse(&conn.server_version)?,
                !positions.whole_transactions_only,
            ),
            Plugin::Wal2json => format!(
                "\"format-version\" '2', \"include-xids\" '1', \"include-timestamp\" '1', \"include-lsn\" '1', \"include-transaction\" '1', \"include-type-oids\" '1', \"include-pk\" '1', \"add-tables\" {}",
                quote_literal(&wal2json_table_filter(&opts.tables))
            ),
        };
        conn.start_copy_both(&format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({options})",
            quote_ident(&opts.slot)
        ))
        .await?;
        positions.streamed = true;
        tracing::info!("streaming from slot {} at {start}", opts.slot);
        let mut decoder = pgoutput::Decoder::default();
        let mut in_transaction: Option<u32> = None;
        let mut in_progress = super::streamed::InProgress::default();
        let marker = super::marker::EndposMarker::new(info);
        let mut tick = tokio::time::interval(opts.status_interval);
        let mut last_state_write = Instant::now();
        loop {
            tokio::select! {
                message = conn.recv_copy_data() => {
                    let Some(mut data) = message? else {
                        // The server ends the copy when it shuts down: reconnect.
                        return Err(crate::errors::Disconnected("the source ended the replication stream".into()).into());
                    };
                    if data.is_empty() {
                        continue;
                    }
                    match data.get_u8() {
                        b'w' => {
                            if data.remaining() < 24 {
                                bail!("truncated XLogData from the source");
                            }
                            let wal_start = Lsn(data.get_u64());
                            let _wal_end = data.get_u64();
                            let _send_time = data.get_i64();
                            // Relation/Type messages arrive with 0/0: never move backwards.
                            if wal_start.0 != 0 {
                                positions.received = positions.received.max(wal_start);
                            }
                            if opts.plugin == Plugin::Pgoutput {
                                match in_progress.receive(wal_start, &data, &mut decoder, spool, opts.endpos)? {
                                    Outcome::NotStreamed => {}
                                    Outcome::Handled => continue,
                                    Outcome::Committed { commit_lsn, queued } => {
                                        if opts.endpos.is_some_and(|endpos| !queued || commit_lsn >= endpos) {
                                            return finish(conn, spool, state, opts, positions).await;
                                        }
                                        continue;
                                    }
                                }
                            }
                            let record = to_record(opts.plugin, &mut decoder, wal_start, data, &mut in_transaction)
                                .map_err(|e| e.context(Fatal(format!(
                                    "cannot decode the replication stream at {wal_start}: the source would send the same message again, so the receiver stops instead of retrying (nothing after the last spooled commit was kept). Report it with the source's version and plugin"
                                ))))?;
                            if let (Some(endpos), Some(final_lsn)) = (opts.endpos, record.begin_final)
                                && final_lsn > endpos
                            {
                                return finish(conn, spool, state, opts, positions).await;
                            }
                            let commit_lsn = record.commit_lsn;
                            spool.append(record.record)?;
                            if let (Some(endpos), Some(commit)) = (opts.endpos, commit_lsn)
                                && commit >= endpos
                            {
                                return finish(conn, spool, state, opts, positions).await;
                            }
                        }
                        b'k' => {
                            if data.remaining() < 17 {
                                bail!("truncated keepalive from the source");
                            }
                            let wal_end = Lsn(data.get_u64());
                            let _time = data.get_i64();
                            let reply = data.get_u8() == 1;
                            let idle = in_transaction.is_none() && in_progress.none_open();
                            if idle {
                                positions.received = positions.received.max(wal_end);
                                positions.keepalive = positions.keepalive.max(wal_end);
                            }
                            // The source is past endpos but no transaction after it has come:
                            // write one (a logical message) so that its Begin proves every
                            // transaction up to endpos was received. A keepalive alone does not.
                            // A streamed transaction still open commits after this keepalive,
                            // so past endpos: it does not hold the marker back.
                            if let Some(endpos) = opts.endpos
                                && in_transaction.is_none()
                                && in_progress.between_chunks()
                                && wal_end >= endpos
                            {
                                marker.request(endpos);
                            }
                            if reply {
                                send_status(&mut conn, spool, opts, positions, idle, false).await?;
                            }
                        }
                        other => bail!("unknown replication message {:?} from the source", other as char),
                    }
                }
                _ = tick.tick() => {
                    spool.check_alive()?;
                    // Between transactions, ask for a keepalive: its position lets an idle source's slot (and
                    // a waiting endpos) move on without waiting for the server's own timer.
                    let idle = in_transaction.is_none() && in_progress.none_open();
                    send_status(&mut conn, spool, opts, positions, idle, idle).await?;
                    if last_state_write.elapsed() >= Duration::from_millis(900) {
                        state.record_stream_positions(positions.received, positions.flushed)?;
                        last_state_write = Instant::now();
                    }
                }
            }
        }
    }
}

/// pgoutput's START_REPLICATION options. Logical messages (the endpos marker's) are asked
/// for from 14 on; before, pgoutput refuses the `messages` option, and the marker's
/// transaction still arrives as an empty BEGIN/COMMIT (see [`super::marker`]). From 14 on,
/// unless `streaming` is false, large transactions are asked to be streamed before their
/// commit (protocol 2, see [`super::streamed`]).
fn pgoutput_options(opts: &ReceiveOptions, source: ServerVersion, streaming: bool) -> String {
    let publications = if opts.publications.is_empty() {
        vec![publication_name(&opts.slot)]
    } else {
        opts.publications.clone()
    };
    let names = publications
        .iter()
        .map(|p| quote_ident(p))
        .collect::<Vec<_>>()
        .join(",");
    let streaming = streaming && source.has_pgoutput_streaming();
    format!(
        "proto_version '{}', publication_names {}{}{}",
        if streaming { 2 } else { 1 },
        quote_literal(&names),
        if source.has_pgoutput_messages() {
            ", messages 'true'"
        } else {
            ""
        },
        if streaming { ", streaming 'on'" } else { "" }
    )
}

/// wal2json's `add-tables` value: `schema.table` entries separated by commas, with `\`
/// escaping a comma, dot or backslash inside a name.
fn wal2json_table_filter(tables: &[(String, String)]) -> String {
    let escape = |name: &str| {
        name.chars()
            .flat_map(|c| match c {
                ',' | '.' | '\\' | ' ' => vec!['\\', c],
                c => vec![c],
            })
            .collect::<String>()
    };
    tables
        .iter()
        .map(|(s, t)| format!("{}.{}", escape(s), escape(t)))
        .collect::<Vec<_>>()
        .join(",")
}

/// A decoded stream message ready for the spool, with what the loop needs to know of it.
struct Decoded {
    record: Record,
    begin_final: Option<Lsn>,
    commit_lsn: Option<Lsn>,
}

fn to_record(
    plugin: Plugin,
    decoder: &mut pgoutput::Decoder,
    wal_start: Lsn,
    payload: Bytes,
    in_transaction: &mut Option<u32>,
) -> Result<Decoded> {
    fail::fail_point!(crate::failpoints::RECEIVE_DECODE, |_| Err(anyhow!(
        "failpoint {}",
        crate::failpoints::RECEIVE_DECODE
    )));
    // A row change needs no decoding to be spooled (apply reads its tuple): only its kind.
    // Reading every tuple here was a tenth of pgtide's CPU in the 4-client apply benchmark
    // (issue 14).
    if plugin == Plugin::Pgoutput
        && let Some(kind) = pgoutput::row_change_kind(&payload)
    {
        return Ok(Decoded {
            record: Record {
                lsn: wal_start,
                end_lsn: None,
                xid: *in_transaction,
                kind,
                payload,
            },
            begin_final: None,
            commit_lsn: None,
        });
    }
    match plugin {
        Plugin::Pgoutput => {
            let change = decoder.decode(payload.clone())?;
            let (mut begin_final, mut commit_lsn, mut end_lsn) = (None, None, None);
            match &change {
                Change::Begin { final_lsn, xid, .. } => {
                    *in_transaction = Some(*xid);
                    begin_final = Some(*final_lsn);
                }
                Change::Commit {
                    commit_lsn: c,
                    end_lsn: e,
                    ..
                } => {
                    commit_lsn = Some(*c);
                    end_lsn = Some(*e);
                }
                _ => {}
            }
            let xid = *in_transaction;
            if end_lsn.is_some() {
                *in_transaction = None;
            }
            Ok(Decoded {
                record: Record {
                    lsn: wal_start,
                    end_lsn,
                    xid,
                    kind: change.kind(),
                    payload,
                },
                begin_final,
                commit_lsn,
            })
        }
        Plugin::Wal2json => {
            let decoded = crate::decode::wal2json::classify(&payload)?;
            if decoded.kind == "begin" {
                *in_transaction = decoded.xid.or(Some(0));
            }
            let xid = in_transaction
                .and_then(|x| (x != 0).then_some(x))
                .or(decoded.xid);
            let end_lsn = decoded
                .commit_end
                .or_else(|| (decoded.kind == "commit").then_some(wal_start));
            if decoded.kind == "commit" {
                *in_transaction = None;
            }
            Ok(Decoded {
                record: Record {
                    lsn: wal_start,
                    end_lsn,
                    xid,
                    kind: decoded.kind,
                    payload,
                },
                begin_final: decoded.begin_final,
                commit_lsn: (decoded.kind == "commit")
                    .then_some(decoded.commit_lsn.unwrap_or(wal_start)),
            })
        }
    }
}

/// Sends a standby status update with the current positions. `idle`: no transaction is being
/// received (no Begin without its Commit).
///
/// Flushed is the end of the last durable commit, or — the rule of PostgreSQL's own apply
/// worker (worker.c, `send_feedback` / `get_flush_position`: with nothing pending flush,
/// flushpos = writepos = the last position received) — the last keepalive position when
/// nothing received is pending: not inside a transaction, and every record received is
/// durable in the spool. That keeps a slot whose published tables are idle moving while
/// other databases or unpublished tables write WAL (invariant 12); otherwise a stopped
/// pgtide would make the source keep everything since the last published commit.
///
/// Why a keepalive's position is safe then (invariant 1), checked in walsender.c of 12…18:
/// the keepalive carries `sentPtr`, which `XLogSendLogical` sets to the end of a WAL record
/// only after decoding it, and decoding a commit record sends its whole transaction first. So
/// every transaction committing before the keepalive's position was sent before the
/// keepalive, and received and spooled here before it was read. A transaction the source is
/// still decoding (even a large one spilled to disk, whose replay sends keepalives through
/// `WalSndUpdateProgress` / `ProcessPendingWrites`) commits at or after `sentPtr`, and a
/// restart from `confirmed_flush` skips only commits before it, so it is sent again whole.
/// The one keepalive carrying another position (`WalSndUpdateProgress` for a skipped empty
/// transaction under synchronous replication, 15+) carries the end of that skipped commit,
/// which was just decoded with nothing sent: the same argument holds. Inside a transaction a
/// keepalive is never used (its Begin was sent, its Commit not yet durable here).
async fn send_status(
    conn: &mut ReplicationConnection,
    spool: &SpoolWriter,
    opts: &ReceiveOptions,
    positions: &mut Positions,
    idle: bool,
    reply_requested: bool,
) -> Result<()> {
    let durable = spool.durable();
    positions.flushed = positions.flushed.max(durable.commit_end);
    if idle && spool.all_durable() {
        positions.flushed = positions.flushed.max(positions.keepalive);
    }
    positions.received = positions.received.max(positions.flushed);
    if let Some(applied) = &opts.applied {
        positions.applied = positions.applied.max(applied()).min(positions.flushed);
    }
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64 - (PG_EPOCH_OFFSET_SECS as i64) * 1_000_000)
        .unwrap_or(0);
    let mut buf = BytesMut::with_capacity(34);
    buf.put_u8(b'r');
    buf.put_u64(positions.received.0);
    buf.put_u64(positions.flushed.0);
    buf.put_u64(positions.applied.0);
    buf.put_i64(micros);
    buf.put_u8(reply_requested as u8);
    conn.send_copy_data(&buf).await
}

/// Endpos reached: make everything durable, report it, and end the stream cleanly.
async fn finish(
    mut conn: ReplicationConnection,
    spool: &mut SpoolWriter,
    state: &StateDb,
    opts: &ReceiveOptions,
    positions: &mut Positions,
) -> Result<Ended> {
    let durable = spool.sync().await?;
    send_status(&mut conn, spool, opts, positions, false, false).await?;
    state.record_stream_positions(positions.received, positions.flushed)?;
    if let Err(e) = conn.finish_copy().await {
        tracing::debug!("ending the copy: {e:#}");
    }
    conn.close().await;
    Ok(Ended::Endpos {
        flushed: durable.commit_end,
    })
}
