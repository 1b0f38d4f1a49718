//! `--fast-restore`: target settings for the bulk load, recorded in the work dir before they
//! change and always put back.
//!
//! A clone writes the whole database at once: bigger `maintenance_work_mem` sorts indexes in
//! memory, a larger `max_wal_size` and longer `checkpoint_timeout` spare the target checkpoints
//! in the middle of the load, `wal_compression` shrinks the full-page images it writes. With
//! `--fast-restore=unsafe` also `fsync`, `full_page_writes` and `synchronous_commit` off: a
//! target crash meanwhile can corrupt it, so only for a target that would be recreated anyway.
//! The settings change through `ALTER SYSTEM` + `pg_reload_conf()`, so they hold for every
//! session of the target server, not only pgtide's.
//!
//! What each setting was (its postgresql.auto.conf line, and the value in effect) is recorded
//! in state.db **before** the first change; the restore uses that record when the clone ends,
//! when it fails, on the next run (`clone --resume` or `follow`) and in `cleanup` after a crash
//! or SIGKILL. Apply never runs with them: a clone --follow restores them before applying, so
//! the durability of applied changes is the target's own.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio_postgres::Client;

use crate::pg::{describe, quote_literal};
use crate::state::{SavedSetting, StateDb};

/// How far `--fast-restore` goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FastRestore {
    /// Settings that cost no durability.
    Safe,
    /// Also fsync, full_page_writes and synchronous_commit off (a target crash during the
    /// copy can corrupt the target).
    Unsafe,
}

/// The settings and their bulk-load values.
fn settings(level: FastRestore) -> Vec<(&'static str, &'static str)> {
    let mut settings = vec![
        ("maintenance_work_mem", "512MB"),
        ("max_wal_size", "4GB"),
        ("checkpoint_timeout", "30min"),
        ("wal_compression", "on"),
    ];
    if level == FastRestore::Unsafe {
        settings.extend([
            ("fsync", "off"),
            ("full_page_writes", "off"),
            ("synchronous_commit", "off"),
        ]);
    }
    settings
}

/// Records what the target has, then applies the bulk-load settings. If an `ALTER SYSTEM`
/// fails, what was changed is put back before the error is returned.
pub async fn apply(target: &Client, state: &StateDb, level: FastRestore) -> Result<()> {
    let wanted = settings(level);
    let mut saved = Vec::new();
    for (name, _) in &wanted {
        saved.push(read_setting(target, name).await?);
    }
    // Before the first ALTER SYSTEM: a crash from here on leaves a record to restore from.
    state.record_target_settings(&server_id(target).await?, &saved)?;
    if level == FastRestore::Unsafe {
        tracing::warn!(
            "--fast-restore=unsafe: fsync, full_page_writes and synchronous_commit are off on the target server until the copy ends; a crash of the target meanwhile can corrupt it"
        );
    }
    for (done, (name, value)) in wanted.iter().enumerate() {
        let changed = alter_system(
            target,
            &format!("ALTER SYSTEM SET {name} = {}", quote_literal(value)),
        )
        .await;
        if let Err(e) = changed {
            if done == 0 {
                // Nothing changed (ALTER SYSTEM refused: no privilege, allow_alter_system off).
                state.forget_target_settings()?;
            } else if let Err(undo) = restore(target, state).await {
                tracing::warn!("{undo:#}");
            }
            return Err(e);
        }
    }
    reload(target).await?;
    tracing::info!(
        "--fast-restore: set {} on the target until the copy ends (the previous values are recorded in the work dir)",
        wanted
            .iter()
            .map(|(n, v)| format!("{n} = {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// The target server's system identifier: settings recorded on one server are never written
/// to another (a `--restart` with a new --target, say).
async fn server_id(target: &Client) -> Result<String> {
    let row = target
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "--fast-restore cannot identify the target server: {}",
                describe(&e)
            )
        })?;
    Ok(row.get(0))
}

/// Puts back every recorded setting and forgets the record; a no-op when nothing is recorded.
/// Checked: each setting must read its previous value again (from a new session, once the
/// reload is done).
pub async fn restore(target: &Client, state: &StateDb) -> Result<()> {
    let saved = state.saved_target_settings()?;
    if saved.is_empty() {
        return Ok(());
    }
    let here = server_id(target).await?;
    if let Some(recorded) = state.target_settings_server()?
        && recorded != here
    {
        bail!(
            "the work dir holds target settings that --fast-restore changed on another server (system identifier {recorded}; this target is {here}). Run `pgtide cleanup` (or the clone) with --target pointing at that server to restore them there."
        );
    }
    for s in &saved {
        let statement = match &s.auto_conf {
            Some(value) => format!("ALTER SYSTEM SET {} = {}", s.name, quote_literal(value)),
            None => format!("ALTER SYSTEM RESET {}", s.name),
        };
        alter_system(target, &statement).await?;
    }
    reload(target).await?;
    // pg_reload_conf() only signals the postmaster: wait until the values read back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut differing = Vec::new();
        for s in &saved {
            let now = current_value(target, &s.name).await?;
            if now != s.value_before {
                differing.push(format!("{} is {now}, was {}", s.name, s.value_before));
            }
        }
        if differing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            // The ALTER SYSTEMs went through: what differs now was changed by someone else
            // (postgresql.conf edited meanwhile, say). Said, not retried forever.
            tracing::warn!(
                "the target's settings were put back, but some read differently than before --fast-restore: {}. A setting changed in postgresql.conf meanwhile? Check them with SHOW",
                differing.join("; ")
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    state.forget_target_settings()?;
    tracing::info!(
        "restored the target's settings from before --fast-restore ({})",
        saved
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

async fn read_setting(target: &Client, name: &str) -> Result<SavedSetting> {
    // pg_file_settings: superuser (or pg_read_all_settings) only, as ALTER SYSTEM is.
    let auto_conf: Option<String> = target
        .query_opt(
            "SELECT setting FROM pg_file_settings
             WHERE name = $1 AND sourcefile LIKE '%postgresql.auto.conf' ORDER BY seqno DESC LIMIT 1",
            &[&name],
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "--fast-restore cannot read the target's configuration files (pg_file_settings): {}. It needs a superuser on the target; run without --fast-restore otherwise",
                describe(&e)
            )
        })?
        .map(|r| r.get(0));
    Ok(SavedSetting {
        name: name.to_string(),
        auto_conf,
        value_before: current_value(target, name).await?,
    })
}

/// The value in effect, as pg_settings shows it (base units: "65536" for 64MB). The session
/// takes a reload at its next statement, so a restore is polled until the values read back.
async fn current_value(target: &Client, name: &str) -> Result<String> {
    let row = target
        .query_one("SELECT setting FROM pg_settings WHERE name = $1", &[&name])
        .await
        .with_context(|| format!("cannot read the target's setting {name}"))?;
    Ok(row.get(0))
}

async fn alter_system(target: &Client, statement: &str) -> Result<()> {
    target.batch_execute(statement).await.map_err(|e| {
        anyhow::anyhow!(
            "--fast-restore could not change the target's settings ({statement}): {}. ALTER SYSTEM needs a superuser on the target (or, from 15, GRANT ALTER SYSTEM ON PARAMETER); run without --fast-restore otherwise",
            describe(&e)
        )
    })
}

async fn reload(target: &Client) -> Result<()> {
    target
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .map_err(|e| anyhow::anyhow!("cannot reload the target's configuration: {}", describe(&e)))
}
