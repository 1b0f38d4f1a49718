//! The reverse stream and rollback: a cutover you can undo. `cutover --reverse` creates, once
//! the target holds exactly the source's state at endpos and before the application moves, a
//! slot and publication on the target, and records them in a work dir of their own
//! (`<dir>/reverse`). Everything committed on the target from then on is kept by that slot;
//! `pgtide reverse follow` applies it to the source (the follow engine with the two servers'
//! roles swapped: spooled, ordered, exactly once through an origin on the source), skipping
//! the forward apply's own transactions (the echo filter, by replication origin). The source
//! stays fenced against the application; pgtide's sessions write through the fence.
//! `pgtide rollback` is a cutover in the other direction: the target fenced, the reverse
//! stream drained to the target's endpos, the source's sequences set, verified, and the
//! source's fence lifted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use tokio_postgres::Client;

use super::{Direction, Options, VerifyMode};
use crate::apply;
use crate::conninfo::ConnInfo;
use crate::pg::{self, Lsn, Side};
use crate::replication::{Plugin, setup};
use crate::state::{CompletedSwitch, StateDb};
use crate::workdir::WorkDir;

/// The reverse stream's work dir, inside the migration's.
pub fn dir_of(dir: &Path) -> PathBuf {
    dir.join("reverse")
}

/// The reverse stream's state, if `cutover --reverse` created one.
pub fn state_of(dir: &Path) -> Result<Option<StateDb>> {
    let path = dir_of(dir).join("state.db");
    if !path.exists() {
        return Ok(None);
    }
    let state = StateDb::open(&path)?;
    Ok(state.stream_slot()?.is_some().then_some(state))
}

/// The reverse slot's name: the forward slot's with `_rev`, within PostgreSQL's 63 bytes.
pub fn slot_name(forward: &str) -> String {
    let mut base = forward.to_string();
    while base.len() + 4 > 63 {
        base.pop();
    }
    format!("{base}_rev")
}

/// Refuses a reverse stream the target cannot decode, before anything is fenced.
pub async fn require_logical_target(target: &Client) -> Result<()> {
    let wal_level: String = target.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        bail!(
            "--reverse needs wal_level = logical on the target (it is {wal_level}): the reverse stream decodes the target's changes. Set it (ALTER SYSTEM SET wal_level = logical) and restart the target, then cut over; nothing was changed"
        );
    }
    Ok(())
}

/// What `setup` left in place.
pub struct ReverseStream {
    pub slot: String,
    /// Where the reverse stream starts: the target's state at endpos.
    pub start: Option<Lsn>,
    /// False when an interrupted `cutover --reverse` had created it already.
    pub created: bool,
}

/// Creates the reverse stream (slot and publication on the target, the echo filter, the
/// servers) unless an earlier run did. Called with the target at endpos, before the
/// application moves: nothing but pgtide has written there yet.
pub async fn setup(target: &ConnInfo, dir: &Path, forward: &StateDb) -> Result<ReverseStream> {
    let workdir = WorkDir::open(&dir_of(dir), "cutover --reverse")?;
    let state = &workdir.state;
    if let Some(stream) = state.stream()? {
        return Ok(ReverseStream {
            slot: stream.slot,
            start: stream.startpos,
            created: false,
        });
    }
    let forward_slot = forward
        .stream_slot()?
        .ok_or_else(|| anyhow!("the work dir {} has no change stream", dir.display()))?;
    // The servers swap roles: the target is this stream's source.
    for (side, swapped) in [(Side::Source, Side::Target), (Side::Target, Side::Source)] {
        if let Some(identity) = forward.server_identity(swapped)? {
            state.record_server_identity(side, &identity)?;
        }
    }
    state.record_echo_origin(&apply::origin_name(&forward_slot))?;
    let slot = slot_name(&forward_slot);
    // A slot of that name is pgtide's own, left by a run killed before it recorded it.
    setup::drop_stream(target, &slot).await?;
    let filters = forward.recorded_filters()?.unwrap_or_default();
    let (conn, created) = setup::create_recorded_slot(
        target,
        state,
        &slot,
        setup::PluginChoice {
            plugin: Plugin::Pgoutput,
            nan_as_null: false,
            applied: true,
        },
        &filters,
        &setup::IdentityChoice {
            replica_identity_full: false,
            append_only: Vec::new(),
            ddl_capture: false,
        },
        false,
    )
    .await?;
    conn.close().await;
    Ok(ReverseStream {
        slot,
        start: Some(created.consistent_point),
        created: true,
    })
}

/// Refuses servers other than the migration's (source and target given the wrong way round
/// would stream the source into the target).
pub async fn check_servers(source: &Client, target: &Client, forward: &StateDb) -> Result<()> {
    for (side, client) in [(Side::Source, source), (Side::Target, target)] {
        let Some(recorded) = forward.server_identity(side)? else {
            continue;
        };
        let identity = crate::clone::database_identity(client).await?;
        if identity != recorded.identity {
            bail!(
                "the --{side} given is not this migration's {side} ({}): give the same --source and --target as the cutover (pgtide swaps them for the reverse stream itself)",
                recorded.uri.unwrap_or(recorded.identity),
                side = side.name()
            );
        }
    }
    Ok(())
}

/// What `pgtide rollback` is asked to do.
pub struct RollbackOptions {
    pub dir: PathBuf,
    /// The target roles to fence; empty: as cutover's fence chooses on the source.
    pub fence_roles: Vec<String>,
    pub timeout: Duration,
    pub verify: VerifyMode,
    pub sequence_offset: i64,
    /// PgBouncer to pause around the switch back.
    pub pgbouncer: Option<super::pooler::PoolerOptions>,
}

/// The switch-over a rollback runs: the target fenced, no reverse stream of its own, and no
/// pooler (the rollback pauses it around the source's fence lifted too).
fn reverse_options(opts: &RollbackOptions, dir: PathBuf) -> Options {
    Options {
        dir,
        fence: true,
        fence_roles: opts.fence_roles.clone(),
        timeout: opts.timeout,
        verify: opts.verify,
        sequence_offset: opts.sequence_offset,
        refresh_matviews: false,
        direction: Direction::Reverse,
        reverse: false,
        pgbouncer: None,
    }
}

/// A completed rollback of one database (`S` = `Report`) or of a server (`ServerReport`).
pub struct RollbackReport<S> {
    /// The reverse direction's switch-over (endpos on the target, applied on the source).
    pub switched: S,
    /// The source roles that can write again.
    pub unfenced: Vec<String>,
    /// From the target's fence to the source's fence lifted.
    pub window: Duration,
}

/// What `rollback` did.
pub enum Rollback {
    Completed(Box<RollbackReport<super::Report>>),
    /// An earlier run completed it: nothing was changed (the source may have taken writes
    /// since, so it is not compared again).
    AlreadyDone(CompletedSwitch),
}

/// Rolls the migration back: the target fenced, the reverse stream drained to the target's
/// endpos, the source's sequences set from the target's, verified, the source's fence lifted.
/// Rerun after an interruption, it finishes what is left (every step is idempotent).
pub async fn rollback(
    source: &ConnInfo,
    target: &ConnInfo,
    opts: &RollbackOptions,
) -> Result<Rollback> {
    let forward = StateDb::open_in_dir(&opts.dir)?;
    let Some(reverse_state) = state_of(&opts.dir)? else {
        bail!(
            "the work dir {} has no reverse stream: a rollback needs a cutover run with --reverse (without it, the writes made on the target since cannot be brought back)",
            opts.dir.display()
        );
    };
    let src = pg::connect(source, Side::Source, "rollback").await?;
    if let Some(done) = reverse_state.rolled_back()? {
        // A run killed while it lifted the source's fence: finish that (idempotent).
        super::fence::unfence(&src, &forward).await?;
        return Ok(Rollback::AlreadyDone(done));
    }
    let dst = pg::connect(target, Side::Target, "rollback").await?;
    check_servers(&src, &dst, &forward).await?;
    drop(dst);
    let started = Instant::now();
    let reverse = reverse_options(opts, dir_of(&opts.dir));
    let back = async {
        let switched = super::run(target, source, &reverse).await?;
        // Recorded before the source's fence is lifted: a rerun only finishes the unfence.
        reverse_state.record_rolled_back(&CompletedSwitch {
            endpos: switched.switched.endpos,
            at: crate::state::now() as i64,
        })?;
        let unfenced = super::fence::unfence(&src, &forward).await.map_err(|e| {
            e.context("the target is fenced and the source holds every change, but lifting the source's fence failed: run `pgtide rollback` again (same --dir)")
        })?;
        Ok((switched, unfenced))
    };
    let (switched, unfenced) =
        super::pooler::around(opts.pgbouncer.as_ref(), opts.timeout, back).await?;
    Ok(Rollback::Completed(Box::new(RollbackReport {
        switched,
        unfenced,
        window: started.elapsed(),
    })))
}

/// What a whole-server `rollback` did.
pub enum ServerRollback {
    Completed(Box<RollbackReport<super::ServerReport>>),
    /// Every database was rolled back by an earlier run: nothing was changed.
    AlreadyDone,
}

/// The rollback of a whole-server migration: every database's target fenced, its reverse
/// stream drained, its source sequences set and verified, as one switch-over of the server
/// (`run_server` the other way); then every database's source fence lifted. A database an
/// interrupted run finished is left as it is.
pub async fn rollback_server(
    source: &ConnInfo,
    target: &ConnInfo,
    opts: &RollbackOptions,
    databases: &[super::ServerDatabaseDir],
) -> Result<ServerRollback> {
    let mut pending = Vec::new();
    for db in databases {
        let Some(reverse_state) = state_of(&db.dir)? else {
            bail!(
                "database {} has no reverse stream: a rollback needs a cutover run with --reverse",
                db.name
            );
        };
        if reverse_state.rolled_back()?.is_some() {
            // A run killed while it lifted the source's fences: finish that (idempotent).
            let src = pg::connect(
                &crate::server::in_database(source, &db.name),
                Side::Source,
                "rollback",
            )
            .await?;
            super::fence::unfence(&src, &StateDb::open_in_dir(&db.dir)?).await?;
        } else {
            let forward = StateDb::open_in_dir(&db.dir)?;
            let src = pg::connect(
                &crate::server::in_database(source, &db.name),
                Side::Source,
                "rollback",
            )
            .await?;
            let dst = pg::connect(
                &crate::server::in_database(target, &db.name),
                Side::Target,
                "rollback",
            )
            .await?;
            check_servers(&src, &dst, &forward).await?;
            pending.push(super::ServerDatabaseDir {
                name: db.name.clone(),
                dir: dir_of(&db.dir),
            });
        }
    }
    if pending.is_empty() {
        return Ok(ServerRollback::AlreadyDone);
    }
    let started = Instant::now();
    let reverse = reverse_options(opts, opts.dir.clone());
    let back = async {
        let switched = super::run_server(target, source, &reverse, &pending).await?;
        // Every database recorded first: a rerun only finishes the unfences.
        for (db, (_, done)) in pending.iter().zip(&switched.databases) {
            StateDb::open_in_dir(&db.dir)?.record_rolled_back(&CompletedSwitch {
                endpos: done.endpos,
                at: crate::state::now() as i64,
            })?;
        }
        let mut unfenced: Vec<String> = Vec::new();
        for db in &pending {
            let forward = StateDb::open_in_dir(db.dir.parent().unwrap_or(&db.dir))?;
            let src = pg::connect(
                &crate::server::in_database(source, &db.name),
                Side::Source,
                "rollback",
            )
            .await?;
            let roles = super::fence::unfence(&src, &forward).await.map_err(|e| {
                e.context(format!(
                    "database {}: the target is fenced and the source holds every change, but lifting the source's fence failed: run `pgtide rollback` again (same --dir)",
                    db.name
                ))
            })?;
            for role in roles {
                if !unfenced.contains(&role) {
                    unfenced.push(role);
                }
            }
        }
        Ok((switched, unfenced))
    };
    let (switched, unfenced) =
        super::pooler::around(opts.pgbouncer.as_ref(), opts.timeout, back).await?;
    Ok(ServerRollback::Completed(Box::new(RollbackReport {
        switched,
        unfenced,
        window: started.elapsed(),
    })))
}
