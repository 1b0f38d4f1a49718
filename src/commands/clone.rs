//! `pgtide clone`: parse options, lock the work dir, run the clone, handle Ctrl-C.

use anyhow::{Result, bail};

use crate::cli::CloneArgs;
use crate::clone::{self, CloneOptions};
use crate::replication::Plugin;
use crate::state::Phase;
use crate::workdir::WorkDir;

use super::follow;

pub async fn run(args: CloneArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    if args.table_jobs == 0 || args.index_jobs == 0 {
        bail!("--table-jobs and --index-jobs must be at least 1");
    }
    let workdir = WorkDir::open(&args.dir, "clone")?;
    // A resumed migration keeps the filters it recorded when it started (invariant 9).
    let filters = if args.restart {
        super::load_filters(args.filters.as_deref())?
    } else {
        super::migration_filters(&workdir.state, args.filters.as_deref())?
    };
    super::start_metrics(args.metrics_addr.as_deref(), &workdir, &source, &target).await?;
    // A fresh start (also with --resume on an empty work dir, as a container restarting the
    // same command does): every hazard that would stop this migration is reported now, before
    // anything is created. A real resume has its own checks: the work dir's identity.
    let fresh = workdir.state.clone_status()?.is_none() && workdir.state.stream_slot()?.is_none();
    if fresh {
        crate::preflight::preflight(&crate::preflight::CheckOptions {
            filters: filters.clone(),
            online: args.follow,
            table_jobs: args.table_jobs,
            index_jobs: args.index_jobs,
            drop_if_exists: args.drop_if_exists,
            identity: crate::preflight::Identity {
                replica_identity_full: args.identity.replica_identity_full,
                append_only: args.identity.append_only.clone(),
            },
            no_owner: args.no_owner,
            no_acl: args.no_acl,
            plugin: args.plugin.unwrap_or(Plugin::Pgoutput),
            wal2json_nan_as_null: args.wal2json_nan_as_null,
            ..crate::preflight::CheckOptions::new(
                source.clone(),
                Some(target.clone()),
                args.dir.clone(),
            )
        })
        .await?;
    }
    let result = async {
    let mut opts = CloneOptions {
        source,
        target,
        table_jobs: args.table_jobs,
        index_jobs: args.index_jobs,
        split_bytes: (args.split_tables_larger_than > 0).then_some(args.split_tables_larger_than),
        filters,
        drop_if_exists: args.drop_if_exists,
        resume: args.resume,
        restart: args.restart,
        snapshot: args.snapshot,
        skip_vacuum: args.skip_vacuum,
        skip_large_objects: args.skip_large_objects,
        no_owner: args.no_owner,
        no_acl: args.no_acl,
        resync_for_follow: args.follow && args.resume,
        follow: args.follow,
    };
    if !args.follow {
        interruptible(clone::run(&workdir, &opts), &args.dir).await?;
        workdir.state.set_phase(Phase::Done)?;
        return Ok(());
    }
    if args.resume
        && let Some(slot) = workdir.state.stream_slot()?
    {
        // The slot and its spool survive; its exported snapshot does not. Tables the clone has
        // not finished are copied again under a new snapshot at a known LSN, and apply skips
        // their changes from before it.
        if slot != args.slot_name {
            bail!(
                "the work dir {} follows slot \"{slot}\", not \"{}\": rerun with --slot-name {slot}",
                args.dir.display(),
                args.slot_name
            );
        }
        // The plugin the slot was created with is the one its spool holds.
        let recorded = workdir.state.stream_plugin()?;
        if let Some(asked) = args.plugin
            && asked != recorded
        {
            bail!(
                "the work dir {} follows slot \"{slot}\" with --plugin {}, not {}: rerun without --plugin (or with --plugin {})",
                args.dir.display(),
                recorded.name(),
                asked.name(),
                recorded.name()
            );
        }
        tracing::info!("resuming clone --follow on slot {slot} ({})", recorded.name());
        let receiver = follow::start_receiver(&opts.source, &workdir)?;
        interruptible(clone::run(&workdir, &opts), &args.dir).await?;
        return apply_phase(&opts, &workdir, receiver).await;
    }
    // The slot and its exported snapshot first: the copy reads exactly the state the stream
    // starts after, so every change is applied once.
    let slot_name = args.slot_name.clone();
    if args.restart {
        // Starting over forgets the earlier run first: the slot recorded below must survive
        // the clone's own reset.
        let cleaned = workdir.state.cleaned_up()?;
        if let Some(old) = workdir.state.stream_slot()?
            && !cleaned
        {
            bail!(
                "the work dir {} follows slot \"{old}\" of an earlier run: run pgtide cleanup --dir {} (drops that slot, its publication and origin) before clone --follow --restart",
                args.dir.display(),
                args.dir.display()
            );
        }
        workdir.state.reset()?;
        opts.restart = false;
    }
    if args.resume {
        // Interrupted before the slot was recorded: nothing was copied or spooled yet. A slot
        // the source created in that instant is ours and unused: start over without it.
        let mut conn =
            crate::replication::conn::ReplicationConnection::connect(&opts.source).await?;
        if crate::replication::slot::drop_slot(&mut conn, &slot_name).await? {
            tracing::warn!("dropped the unrecorded slot {slot_name} of the interrupted run");
        }
        conn.close().await;
    }
    let (holder, created) = super::stream::create_recorded_slot(
        &opts.source,
        &workdir.state,
        &slot_name,
        super::stream::PluginChoice {
            plugin: args.plugin.unwrap_or(Plugin::Pgoutput),
            nan_as_null: args.wal2json_nan_as_null,
            applied: true,
        },
        &opts.filters,
        &args.identity,
        true,
    )
    .await?;
    tracing::info!(
        "slot {slot_name} created at {}; copying under its snapshot",
        created.consistent_point
    );
    let receiver = follow::start_receiver(&opts.source, &workdir)?;
    opts.snapshot = created.snapshot;
    opts.resync_for_follow = false;
    interruptible(clone::run(&workdir, &opts), &args.dir).await?;
    holder.close().await;
    apply_phase(&opts, &workdir, receiver).await
    }
    .await;
    super::record_failure(&workdir.state, result)
}

/// Applies the spooled stream once the clone is complete, until endpos.
async fn apply_phase(
    opts: &CloneOptions,
    workdir: &WorkDir,
    receiver: follow::Receiver,
) -> Result<()> {
    tracing::info!("clone done; applying the spooled changes");
    let applied = tokio::select! {
        r = follow::apply_until_endpos(&opts.source, &opts.target, workdir, receiver) => r?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted during apply: continue with `pgtide follow` (same --dir); nothing applied is lost or applied twice"),
    };
    println!(
        "reached endpos: applied through {applied}; sequences set. The slot is kept until `pgtide stream cleanup`."
    );
    Ok(())
}

/// Runs the clone; Ctrl-C drops it (connections close, open transactions roll back, pg_dump /
/// pg_restore children are killed) and says how to resume.
async fn interruptible(
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
