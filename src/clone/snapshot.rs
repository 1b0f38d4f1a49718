//! The source snapshot every copy worker imports. Either pgtide exports one itself (a
//! REPEATABLE READ transaction kept open until the copy is done) or the caller hands one in:
//! `--snapshot NAME`, or the replication slot's exported snapshot in the follow pipeline.
//! The copy holds it through a [`Lease`], released by the last copy worker to finish: a
//! snapshot held through index builds and post-data would keep the source's vacuum horizon
//! (and, for a slot's snapshot, its walsender) pinned for nothing.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio_postgres::Client;

use crate::conninfo::ConnInfo;
use crate::pg::{self, Lsn, Side};
use crate::replication::conn::ReplicationConnection;
use crate::replication::slot;

/// Keeps an exported snapshot alive; dropping it ends the exporting transaction.
pub struct Snapshot {
    pub name: String,
    /// The source WAL position when the snapshot was taken (for the per-part record).
    pub lsn: String,
    _holder: Option<Client>,
    _slot_holder: Option<ReplicationConnection>,
}

impl Snapshot {
    /// Exports a new snapshot from a transaction held open by this value.
    pub async fn export(source: &ConnInfo) -> Result<Self> {
        let client = pg::connect(source, Side::Source, "snapshot").await?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .context("cannot open the snapshot transaction on the source")?;
        let row = client
            .query_one(
                "SELECT pg_export_snapshot(), CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text",
                &[],
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot export a snapshot on the source: {}", pg::describe(&e)))?;
        Ok(Snapshot {
            name: row.get(0),
            lsn: row.get(1),
            _holder: Some(client),
            _slot_holder: None,
        })
    }

    /// The snapshot of a temporary logical slot: every transaction that commits before its
    /// LSN is in it, every later one is in the change stream after that LSN. Used when a
    /// clone --follow resumes and the slot's own snapshot is gone.
    pub async fn at_known_lsn(source: &ConnInfo) -> Result<(Self, Lsn)> {
        let mut conn = ReplicationConnection::connect(source).await?;
        // Unique in the process too: a whole-server run resumes several databases at once.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let name = format!(
            "pgtide_resync_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let created = slot::create_temporary_slot(&mut conn, &name).await?;
        let snapshot = created
            .snapshot
            .ok_or_else(|| anyhow::anyhow!("the temporary slot exported no snapshot"))?;
        Ok((
            Snapshot {
                name: snapshot,
                lsn: created.consistent_point.to_string(),
                _holder: None,
                _slot_holder: Some(conn),
            },
            created.consistent_point,
        ))
    }

    /// A snapshot exported by someone else; its exporter must keep it alive for the whole copy.
    /// `holder`, when given, is the replication connection that exported it (clone --follow's
    /// slot): it is closed with this value, as soon as the copy no longer needs the snapshot.
    pub fn external(name: &str, holder: Option<ReplicationConnection>) -> Self {
        Snapshot {
            name: name.to_string(),
            lsn: String::new(),
            _holder: None,
            _slot_holder: holder,
        }
    }
}

/// A snapshot shared by the copy workers; [`Lease::release`] ends it (closes the exporting
/// session) once, whoever calls it first. Cloning shares the same snapshot.
#[derive(Clone)]
pub struct Lease {
    name: String,
    held: Arc<Mutex<Option<Snapshot>>>,
}

impl Lease {
    pub fn new(snapshot: Snapshot) -> Self {
        Lease {
            name: snapshot.name.clone(),
            held: Arc::new(Mutex::new(Some(snapshot))),
        }
    }

    /// The snapshot's name, for `SET TRANSACTION SNAPSHOT`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Ends the exporting session (its transaction rolls back, or its replication connection
    /// closes): nothing imports the snapshot after this.
    pub fn release(&self) {
        let taken = self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(snapshot) = taken {
            tracing::info!(
                "the copy is done: released snapshot {} on the source",
                snapshot.name
            );
        }
    }
}

/// Starts a read-only REPEATABLE READ transaction on `client` that sees `snapshot`.
pub async fn import(client: &Client, snapshot: &str) -> Result<()> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            pg::quote_literal(snapshot)
        ))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot import the snapshot \"{snapshot}\" on the source: {}. The transaction that exported it must stay open for the whole copy; with --snapshot, keep its exporter running.",
                pg::describe(&e)
            )
        })
}
