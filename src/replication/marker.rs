//! The endpos marker, one rule for both its writers (`stream receive --endpos` and the follow
//! engine): when the source is past endpos, a transactional logical message is written there,
//! once per endpos, retried at most every two seconds until it is, never blocking the caller.
//! Its transaction commits after endpos, so its Begin proves to the receiver and to apply that
//! nothing committed at or before endpos is still to come.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::conninfo::ConnInfo;
use crate::pg::Lsn;

/// How long after a try that wrote nothing (the source not yet past endpos, or an error) the
/// marker is tried again.
const RETRY: Duration = Duration::from_secs(2);

/// Writes the endpos marker on the source, in the background, by the one rule above.
#[derive(Clone)]
pub struct EndposMarker {
    source: ConnInfo,
    tries: Arc<Mutex<Tries>>,
}

#[derive(Default)]
struct Tries {
    /// The endpos whose marker is written.
    marked: Option<Lsn>,
    last_try: Option<Instant>,
    in_flight: bool,
}

impl EndposMarker {
    pub fn new(source: &ConnInfo) -> Self {
        EndposMarker {
            source: source.clone(),
            tries: Arc::default(),
        }
    }

    /// Asks for the marker after `endpos`: a no-op when it is written, being written, or was
    /// tried less than two seconds ago; otherwise a background task tries now.
    pub fn request(&self, endpos: Lsn) {
        {
            let mut tries = self.tries.lock().unwrap_or_else(|e| e.into_inner());
            if tries.marked == Some(endpos)
                || tries.in_flight
                || tries.last_try.is_some_and(|t| t.elapsed() < RETRY)
            {
                return;
            }
            tries.last_try = Some(Instant::now());
            tries.in_flight = true;
        }
        let (source, tries) = (self.source.clone(), self.tries.clone());
        tokio::spawn(async move {
            let written = emit_endpos_marker(&source, endpos).await;
            let mut tries = tries.lock().unwrap_or_else(|e| e.into_inner());
            tries.in_flight = false;
            match written {
                Ok(true) => tries.marked = Some(endpos),
                Ok(false) => {}
                Err(e) => tracing::warn!("cannot write the endpos marker on the source: {e:#}"),
            }
        });
    }
}

/// Writes a transactional logical message on the source once its WAL is past `endpos`: the
/// message's transaction commits after endpos, so when its Begin arrives every transaction
/// committed at or before endpos has been received (the stream is in commit order). The
/// message assigns the transaction an xid, so its Begin arrives on every version: with the
/// message from 14 on (`messages 'true'`), as a BEGIN/COMMIT with nothing published in
/// between on 12 and 13 (pgoutput skips empty transactions only from 15;
/// tests/old_sources.rs proves it on an idle source).
async fn emit_endpos_marker(source: &ConnInfo, endpos: Lsn) -> Result<bool> {
    let client = crate::pg::connect(source, crate::pg::Side::Source, "endpos marker").await?;
    let rows = client
        .query(
            "SELECT pg_logical_emit_message(true, 'pgtide', 'endpos ' || $1) WHERE pg_current_wal_insert_lsn() >= $1::text::pg_lsn",
            &[&endpos.to_string()],
        )
        .await?;
    Ok(!rows.is_empty())
}
