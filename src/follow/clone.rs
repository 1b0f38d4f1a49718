//! `clone --follow`, the whole migration in one run: the slot and its exported snapshot
//! first, the copy under that snapshot while the receiver spools the stream, then apply until
//! endpos; a resumed run keeps the recorded slot (and plugin) and re-copies what the clone had
//! not finished under a new snapshot.

use std::path::Path;

use anyhow::{Result, bail};

use crate::clone::{self, CloneOptions};
use crate::pg::Lsn;
use crate::replication::Plugin;
use crate::replication::setup::IdentityChoice;
use crate::workdir::WorkDir;

/// The follow half of `clone --follow`'s options.
#[derive(Clone)]
pub struct CloneFollow {
    pub slot_name: String,
    /// None: pgoutput, or on resume the recorded plugin.
    pub plugin: Option<Plugin>,
    pub nan_as_null: bool,
    pub identity: IdentityChoice,
    pub resume: bool,
    pub restart: bool,
    /// `--apply-jobs`, recorded for every later follow of the work dir.
    pub apply_jobs: Option<usize>,
    /// Apply waits at this gate once the clone is done (a whole-server run with
    /// --fast-restore: no database applies before every copy is done and the settings are
    /// restored).
    pub apply_gate: Option<ApplyGate>,
}

/// Where a pipeline says its clone is done, and learns when it may apply.
#[derive(Clone)]
pub struct ApplyGate {
    pub cloned: tokio::sync::mpsc::UnboundedSender<()>,
    pub open: tokio::sync::watch::Receiver<bool>,
}

impl ApplyGate {
    /// Says the clone is done, then waits until the gate opens.
    async fn pass(&self) -> Result<()> {
        let _ = self.cloned.send(());
        let mut open = self.open.clone();
        open.wait_for(|open| *open).await.map_err(|_| {
            anyhow::anyhow!("the whole-server run stopped before apply could start")
        })?;
        Ok(())
    }
}

/// Runs the clone with the stream, then apply to endpos; returns the last applied position.
pub async fn clone_and_follow(
    workdir: &WorkDir,
    dir: &Path,
    mut opts: CloneOptions,
    follow: &CloneFollow,
) -> Result<Lsn> {
    if follow.resume
        && let Some(slot) = workdir.state.stream_slot()?
    {
        // The slot and its spool survive; its exported snapshot does not. Tables the clone has
        // not finished are copied again under a new snapshot at a known LSN, and apply skips
        // their changes from before it.
        if slot != follow.slot_name {
            bail!(
                "the work dir {} follows slot \"{slot}\", not \"{}\": rerun with --slot-name {slot}",
                dir.display(),
                follow.slot_name
            );
        }
        // The plugin the slot was created with is the one its spool holds.
        let recorded = workdir.state.stream_plugin()?;
        if let Some(asked) = follow.plugin
            && asked != recorded
        {
            bail!(
                "the work dir {} follows slot \"{slot}\" with --plugin {}, not {}: rerun without --plugin (or with --plugin {})",
                dir.display(),
                recorded.name(),
                asked.name(),
                recorded.name()
            );
        }
        tracing::info!(
            "resuming clone --follow on slot {slot} ({})",
            recorded.name()
        );
        if let Some(jobs) = follow.apply_jobs {
            workdir.state.record_apply_jobs(jobs)?;
        }
        let receiver = super::start_receiver(&opts.source, workdir)?;
        interruptible(clone::run(workdir, &opts), dir).await?;
        if let Some(gate) = &follow.apply_gate {
            gate.pass().await?;
        }
        return apply_phase(&opts, workdir, receiver).await;
    }
    // The slot and its exported snapshot first: the copy reads exactly the state the stream
    // starts after, so every change is applied once.
    let slot_name = follow.slot_name.clone();
    if follow.restart {
        // Starting over forgets the earlier run first: the slot recorded below must survive
        // the clone's own reset.
        let cleaned = workdir.state.cleaned_up()?;
        if let Some(old) = workdir.state.stream_slot()?
            && !cleaned
        {
            bail!(
                "the work dir {} follows slot \"{old}\" of an earlier run: run pgtide cleanup --dir {} (drops that slot, its publication and origin) before clone --follow --restart",
                dir.display(),
                dir.display()
            );
        }
        workdir.state.reset()?;
        opts.restart = false;
    }
    if let Some(jobs) = follow.apply_jobs {
        workdir.state.record_apply_jobs(jobs)?;
    }
    if follow.resume {
        // Interrupted before the slot was recorded: nothing was copied or spooled yet. A slot
        // the source created in that instant is ours and unused: start over without it.
        let mut conn =
            crate::replication::conn::ReplicationConnection::connect(&opts.source).await?;
        if crate::replication::slot::drop_slot(&mut conn, &slot_name).await? {
            tracing::warn!("dropped the unrecorded slot {slot_name} of the interrupted run");
        }
        conn.close().await;
    }
    let (holder, created) = crate::replication::setup::create_recorded_slot(
        &opts.source,
        &workdir.state,
        &slot_name,
        crate::replication::setup::PluginChoice {
            plugin: follow.plugin.unwrap_or(Plugin::Pgoutput),
            nan_as_null: follow.nan_as_null,
            applied: true,
        },
        &opts.filters,
        &follow.identity,
        true,
    )
    .await?;
    tracing::info!(
        "slot {slot_name} created at {}; copying under its snapshot",
        created.consistent_point
    );
    let receiver = super::start_receiver(&opts.source, workdir)?;
    opts.snapshot = created.snapshot;
    opts.resync_for_follow = false;
    // The slot's connection holds the exported snapshot: the clone closes it as soon as the
    // last copy part is done (the slot itself stays, for the stream).
    interruptible(clone::run_holding(workdir, &opts, Some(holder)), dir).await?;
    if let Some(gate) = &follow.apply_gate {
        gate.pass().await?;
    }
    apply_phase(&opts, workdir, receiver).await
}

/// Applies the spooled stream once the clone is complete, until endpos.
async fn apply_phase(
    opts: &CloneOptions,
    workdir: &WorkDir,
    receiver: super::Receiver,
) -> Result<Lsn> {
    tracing::info!("clone done; applying the spooled changes");
    let applied = tokio::select! {
        r = super::apply_until_endpos(&opts.source, &opts.target, workdir, receiver) => r?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted during apply: continue with `pgtide follow` (same --dir); nothing applied is lost or applied twice"),
    };
    Ok(applied)
}

/// Runs the clone; Ctrl-C drops it (connections close, open transactions roll back, pg_dump /
/// pg_restore children are killed) and says how to resume.
pub async fn interruptible(
    clone: impl std::future::Future<Output = Result<()>>,
    dir: &std::path::Path,
) -> Result<()> {
    tokio::select! {
        result = clone => result,
        _ = tokio::signal::ctrl_c() => bail!(
            "interrupted: the clone stopped cleanly and its progress is saved in {}. Rerun the same command with --resume to continue.",
            dir.display()
        ),
    }
}
