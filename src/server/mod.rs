//! A whole-server migration (`clone [--follow] --all-databases`, `--database D`): the roles
//! first, then every selected database created on the target with its properties, then one
//! pipeline per database in this one process — each with its own slot, publication, spool,
//! origin and state in a sub-directory of the work dir (`databases/<source oid>`), so that
//! every single-database guarantee holds per database unchanged — sharing one budget of copy
//! and index workers (`clone::Budget`). The server's work dir records which databases belong to
//! the migration (`state::ServerDatabase`); status, cutover, cleanup and a resume read that
//! list, never the source's current one.

pub mod databases;
pub mod verify;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{Result, bail};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tracing::Instrument;

use crate::clone::{self, Budget, CloneOptions};
use crate::conninfo::ConnInfo;
use crate::follow::{self, CloneFollow};
use crate::pg::{self, Side};
use crate::roles::RoleCopyOptions;
use crate::state::{Phase, ServerDatabase, StateDb};
use crate::workdir::WorkDir;

/// What a whole-server run is asked to do.
pub struct ServerOptions {
    pub selection: databases::Selection,
    /// Create the databases with the target's defaults instead of the source's properties.
    pub skip_db_properties: bool,
    /// The roles copied first (None: `--skip-roles`, the roles are already on the target).
    pub roles: Option<RoleCopyOptions>,
    /// Every database's clone options; the source and target name the server (their
    /// database is where pgtide reads the list of databases), each pipeline gets its own.
    pub clone: CloneOptions,
    /// `--follow`: every database's stream (its slot is `<slot>_<source oid>`).
    pub follow: Option<CloneFollow>,
    /// The preflight of a database that starts now (None: skipped).
    pub preflight: Option<crate::preflight::CheckOptions>,
}

/// `info` with `dbname` replaced: the connection to one database of the same server.
pub fn in_database(info: &ConnInfo, name: &str) -> ConnInfo {
    let mut info = info.clone();
    info.dbname = name.to_string();
    info
}

/// The databases of the work dir at `dir` when it holds a whole-server migration (empty
/// otherwise), with each one's work dir.
pub fn databases_of(dir: &Path) -> Result<Vec<(ServerDatabase, PathBuf)>> {
    let state = StateDb::open_in_dir(dir)?;
    Ok(state
        .server_databases()?
        .into_iter()
        .map(|d| {
            let sub = dir.join(&d.subdir);
            (d, sub)
        })
        .collect())
}

/// Runs the whole-server migration (see the module doc); returns, with `--follow`, each
/// database's last applied position once all reached endpos.
pub async fn run(dir: &Path, opts: ServerOptions) -> Result<Vec<(String, Option<pg::Lsn>)>> {
    let workdir = WorkDir::open(dir, "clone --all-databases")?;
    let state = &workdir.state;
    if opts.clone.restart {
        bail!(
            "--restart is not available for a whole-server migration: run `pgtide cleanup --dir {}`, then start again in a new --dir",
            dir.display()
        );
    }
    let source_admin = pg::connect(&opts.clone.source, Side::Source, "databases").await?;
    let target_admin = pg::connect(&opts.clone.target, Side::Target, "databases").await?;
    let mut recorded = state.server_databases()?;
    if recorded.is_empty() {
        if state.stream_slot()?.is_some() || state.clone_status()?.is_some() {
            bail!(
                "the work dir {} holds a one-database migration: give the whole-server run another --dir",
                dir.display()
            );
        }
        let slot_base = opts
            .follow
            .as_ref()
            .map_or("pgtide", |f| f.slot_name.as_str());
        let chosen = databases::select(&source_admin, &opts.selection).await?;
        let planned: Vec<ServerDatabase> = chosen
            .iter()
            .map(|d| ServerDatabase {
                name: d.name.clone(),
                source_oid: d.oid,
                bytes: d.bytes,
                subdir: format!("databases/{}", d.oid),
                slot: format!("{slot_base}_{}", d.oid),
                created_on_target: false,
            })
            .collect();
        state.record_server_databases(&planned)?;
        recorded = state.server_databases()?;
    } else if !opts.clone.resume {
        bail!(
            "the work dir {} already holds a migration of {} database(s) ({}): continue it with --resume, or run `pgtide cleanup` and start in a new --dir",
            dir.display(),
            recorded.len(),
            names(&recorded)
        );
    } else {
        tracing::info!(
            "resuming the migration of {} database(s): {}",
            recorded.len(),
            names(&recorded)
        );
    }
    state.set_phase(Phase::Copying)?;

    if let Some(role_options) = &opts.roles {
        state.record_excluded_roles(&role_options.exclude)?;
        copy_roles(&source_admin, &target_admin, role_options).await?;
    }
    let mut created_any = false;
    for db in &recorded {
        if databases::exists(&target_admin, &db.name).await? {
            if !db.created_on_target {
                tracing::info!(
                    "database {} already exists on the target: used as it is",
                    db.name
                );
            }
            continue;
        }
        let props = if opts.skip_db_properties {
            None
        } else {
            Some(databases::properties(&source_admin, db.source_oid).await?)
        };
        databases::create(&target_admin, &db.name, props.as_ref()).await?;
        state.record_database_created(&db.name)?;
        created_any = true;
        tracing::info!("created database {} on the target", db.name);
    }
    // Role settings for a database (ALTER ROLE … IN DATABASE) need the database: set now.
    if created_any && let Some(role_options) = &opts.roles {
        copy_roles(&source_admin, &target_admin, role_options).await?;
    }
    drop(source_admin);

    // --fast-restore is the server's: set once for every database's copy, restored when the
    // last copy ends (before any database applies: the gate below), on failure, by the next
    // run (here, first) or by cleanup. The databases' own clones leave the settings alone.
    crate::clone::fast_restore::restore(&target_admin, state).await?;
    let mut clone_opts = opts.clone.clone();
    let fast_restore = clone_opts.fast_restore.take();
    let mut copies_left = 0;
    for db in &recorded {
        let sub = dir.join(&db.subdir).join("state.db");
        let done = sub.exists()
            && StateDb::open(&sub)?.clone_status()? == Some(crate::state::CloneStatus::Done);
        if !done {
            copies_left += 1;
        }
    }
    let fast_restore = fast_restore.filter(|_| copies_left > 0);
    if let Some(level) = fast_restore {
        crate::clone::fast_restore::apply(&target_admin, state, level).await?;
    }
    let result = pipelines_run(dir, &recorded, &opts, clone_opts, fast_restore.is_some()).await;
    // Whatever happened: the settings go back (a no-op when the gate already restored them).
    let restored = crate::clone::fast_restore::restore(&target_admin, state).await;
    let finished = match (result, restored) {
        (Ok(finished), Ok(())) => finished,
        (Err(e), restored) => {
            let e = match restored {
                Ok(()) => e,
                Err(r) => e.context(format!(
                    "restoring the --fast-restore settings failed too ({r:#}): run `pgtide cleanup --dir {}`",
                    dir.display()
                )),
            };
            let _ = state.set_failed(&format!("{e:#}"));
            return Err(e);
        }
        (Ok(_), Err(r)) => return Err(r.context("restoring the --fast-restore settings")),
    };
    state.set_phase(Phase::Done)?;
    Ok(finished)
}

/// Runs every database's pipeline at once; with `gated`, apply starts nowhere before every
/// database's copy is done and the --fast-restore settings are restored.
async fn pipelines_run(
    dir: &Path,
    recorded: &[ServerDatabase],
    opts: &ServerOptions,
    clone: CloneOptions,
    gated: bool,
) -> Result<Vec<(String, Option<pg::Lsn>)>> {
    let (cloned_tx, mut cloned_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (open_tx, open_rx) = tokio::sync::watch::channel(false);
    let gate = gated.then(|| follow::ApplyGate {
        cloned: cloned_tx,
        open: open_rx,
    });
    let budget = Arc::new(Budget::new(opts.clone.table_jobs, opts.clone.index_jobs));
    type Pipeline<'a> =
        Pin<Box<dyn std::future::Future<Output = (String, Result<Option<pg::Lsn>>)> + 'a>>;
    let mut pipelines: FuturesUnordered<Pipeline> = FuturesUnordered::new();
    for db in recorded {
        let sub = dir.join(&db.subdir);
        let sub_workdir = WorkDir::open(&sub, "clone --all-databases")?;
        let mut clone_opts = clone.clone();
        clone_opts.source = in_database(&clone.source, &db.name);
        clone_opts.target = in_database(&clone.target, &db.name);
        clone_opts.budget = Some(budget.clone());
        let fresh = sub_workdir.state.clone_status()?.is_none()
            && sub_workdir.state.stream_slot()?.is_none();
        if fresh && let Some(check) = &opts.preflight {
            let mut check = check.clone();
            check.source = clone_opts.source.clone();
            check.target = Some(clone_opts.target.clone());
            check.dir = sub.clone();
            crate::preflight::preflight(&check)
                .await
                .map_err(|e| e.context(format!("database {}", db.name)))?;
        }
        let follow = opts.follow.clone().map(|mut f| {
            f.slot_name = db.slot.clone();
            f.apply_gate = gate.clone();
            // --apply-jobs is the server's: shared out, at least one lane per database.
            f.apply_jobs = f.apply_jobs.map(|jobs| (jobs / recorded.len()).max(1));
            f
        });
        let name = db.name.clone();
        let span = tracing::info_span!("db", db = %name);
        pipelines.push(Box::pin(async move {
            let result = pipeline(&sub_workdir, &sub, clone_opts, follow.as_ref())
                .instrument(span)
                .await;
            // As a one-database run records it: status shows the error per database.
            if let Err(e) = &result {
                let _ = sub_workdir.state.set_failed(&format!("{e:#}"));
            }
            (name, result)
        }));
    }
    let mut finished = Vec::new();
    // Clones done (with the gate): when every database's is, the settings are restored and
    // apply may start everywhere.
    let mut cloned = 0;
    let target_admin = match gated && opts.follow.is_some() {
        true => Some(pg::connect(&clone.target, Side::Target, "fast-restore").await?),
        false => None,
    };
    loop {
        let next = tokio::select! {
            next = pipelines.next() => next,
            Some(()) = cloned_rx.recv() => {
                cloned += 1;
                if cloned == recorded.len()
                    && let Some(target) = &target_admin
                {
                    let state = StateDb::open_in_dir(dir)?;
                    crate::clone::fast_restore::restore(target, &state).await?;
                    tracing::info!("every database is copied: the --fast-restore settings are restored; apply starts");
                    let _ = open_tx.send(true);
                }
                continue;
            }
        };
        let Some((name, result)) = next else { break };
        match result {
            Ok(applied) => {
                tracing::info!("database {name}: done");
                finished.push((name, applied));
            }
            Err(e) => {
                // The others stop here (their futures are dropped: connections close,
                // nothing half-done is recorded as done) and resume with the same command.
                drop(pipelines);
                return Err(e.context(format!(
                    "database {name} failed; the other databases' pipelines were stopped with it. Fix the cause and rerun with --resume: every database continues where it stopped"
                )));
            }
        }
    }
    Ok(finished)
}

/// One database's pipeline: `clone --follow` to endpos, or the clone alone.
async fn pipeline(
    workdir: &WorkDir,
    dir: &Path,
    opts: CloneOptions,
    follow: Option<&CloneFollow>,
) -> Result<Option<pg::Lsn>> {
    match follow {
        Some(with) => Ok(Some(
            follow::clone_and_follow(workdir, dir, opts, with).await?,
        )),
        None => {
            follow::interruptible(clone::run(workdir, &opts), dir).await?;
            workdir.state.set_phase(Phase::Done)?;
            Ok(None)
        }
    }
}

async fn copy_roles(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
    options: &RoleCopyOptions,
) -> Result<()> {
    let report = crate::roles::copy_roles(source, target, options)
        .await
        .map_err(|e| {
            e.context("copying the roles (give --skip-roles if they are already on the target)")
        })?;
    tracing::info!("{}", report.summary());
    for (role, why) in &report.skipped {
        tracing::info!("role {role} left alone on the target ({why})");
    }
    Ok(())
}

fn names(databases: &[ServerDatabase]) -> String {
    databases
        .iter()
        .map(|d| d.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
