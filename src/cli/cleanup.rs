//! `pgtide cleanup`: the end of a migration. It removes
//! everything pgtide created on both servers (slot, publication, origin, the pgtide schema:
//! invariant 8) and is safe to run twice or after a failed run.

use anyhow::{Result, bail};

use crate::apply;
use crate::cli::CleanupArgs;
use crate::pg::{self, Side, describe};
use crate::replication::slot;
use crate::state::{Phase, StateDb};
use crate::workdir::WorkDir;

pub async fn cleanup(args: CleanupArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    let databases = crate::server::databases_of(&args.dir).unwrap_or_default();
    if databases.is_empty() {
        cleanup_dir(&source, &target, &args.dir, args.slot_name).await?;
        return cleanup_reverse(&source, &target, &args.dir).await;
    }
    // A whole-server work dir: every database's pipeline, each in its own database.
    if args.slot_name.is_some() {
        bail!("--slot-name names one database's slot: leave it out with a whole-server work dir");
    }
    let workdir = WorkDir::open(&args.dir, "cleanup")?;
    // The server's --fast-restore settings, if a killed run left them on.
    if !workdir.state.saved_target_settings()?.is_empty() {
        let target_client = pg::connect(&target, Side::Target, "cleanup").await?;
        crate::clone::fast_restore::restore(&target_client, &workdir.state).await?;
        println!("target: settings changed by --fast-restore restored");
    }
    for (db, dir) in &databases {
        // A pipeline that never started, or a clone without --follow: no slot, nothing to drop.
        let sub = dir.join("state.db");
        if !sub.exists() || StateDb::open(&sub)?.stream_slot()?.is_none() {
            println!("database {}: no change stream, nothing to remove", db.name);
            continue;
        }
        print!("database {}: ", db.name);
        cleanup_dir(
            &crate::server::in_database(&source, &db.name),
            &crate::server::in_database(&target, &db.name),
            dir,
            None,
        )
        .await
        .map_err(|e| {
            e.context(format!(
                "cleaning up database {} (rerun cleanup: what is done stays done)",
                db.name
            ))
        })?;
        cleanup_reverse(
            &crate::server::in_database(&source, &db.name),
            &crate::server::in_database(&target, &db.name),
            dir,
        )
        .await
        .map_err(|e| e.context(format!("database {}", db.name)))?;
    }
    workdir.state.record_cleaned_up()?;
    workdir.state.set_phase(Phase::Done)?;
    Ok(())
}

/// The reverse stream of `cutover --reverse`, if any: its slot and publication on the target,
/// its origin on the source.
async fn cleanup_reverse(
    source: &crate::conninfo::ConnInfo,
    target: &crate::conninfo::ConnInfo,
    dir: &std::path::Path,
) -> Result<()> {
    if crate::cutover::reverse::state_of(dir)?.is_none() {
        return Ok(());
    }
    print!("reverse stream: ");
    cleanup_dir(target, source, &crate::cutover::reverse::dir_of(dir), None)
        .await
        .map_err(|e| {
            e.context("cleaning up the reverse stream (rerun cleanup: what is done stays done)")
        })
}

/// Cleans up one database's migration (the work dir at `dir`).
async fn cleanup_dir(
    source: &crate::conninfo::ConnInfo,
    target: &crate::conninfo::ConnInfo,
    dir: &std::path::Path,
    slot_name: Option<String>,
) -> Result<()> {
    let (source, target) = (source.clone(), target.clone());
    let workdir = WorkDir::open(dir, "cleanup")?;
    let state = &workdir.state;
    let had_fast_restore = !state.saved_target_settings()?.is_empty();
    let slot_name = match (slot_name, state.stream_slot()?) {
        (Some(s), _) | (None, Some(s)) => s,
        // A plain clone's work dir: only the target settings of a killed --fast-restore.
        (None, None) if had_fast_restore => {
            let target_client = pg::connect(&target, Side::Target, "cleanup").await?;
            crate::clone::fast_restore::restore(&target_client, state).await?;
            println!("target: settings changed by --fast-restore restored");
            return Ok(());
        }
        (None, None) => bail!("the work dir names no slot: give --slot-name"),
    };
    // The source first: a slot left behind retains WAL there, whatever the target's state.
    let dropped_slot = crate::replication::setup::drop_stream(&source, &slot_name).await?;
    let target_client = pg::connect(&target, Side::Target, "cleanup").await?;
    // Target settings a killed clone left changed (--fast-restore): back as they were.
    crate::clone::fast_restore::restore(&target_client, state).await?;
    if had_fast_restore {
        println!("target: settings changed by --fast-restore restored");
    }
    let origin = apply::origin_name(&slot_name);
    let dropped_origin = target_client
        .execute(
            &format!(
                "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE {}",
                apply::ORIGINS_OF_SLOT
            ),
            &[&origin],
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot drop the replication origin {origin} on the target: {}. Is a follow still running?", describe(&e)))?;
    target_client
        .batch_execute("DROP SCHEMA IF EXISTS pgtide CASCADE")
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot drop the pgtide schema on the target: {}",
                describe(&e)
            )
        })?;
    state.record_cleaned_up()?;
    state.set_phase(Phase::Done)?;
    println!(
        "source: slot {slot_name} {}, publication {} dropped; target: origin {origin} {}; work dir {} marked done",
        if dropped_slot {
            "dropped"
        } else {
            "already gone"
        },
        slot::publication_name(&slot_name),
        if dropped_origin > 0 {
            "dropped"
        } else {
            "already gone"
        },
        dir.display()
    );
    Ok(())
}
