//! `pgtide rollback` and `pgtide reverse follow|status`: parse, run the reverse stream's
//! engine (`crate::cutover::reverse`, the follow engine with the servers swapped), print.

use anyhow::{Result, anyhow, bail};

use crate::cli::{ReverseFollowArgs, RollbackArgs, StatusArgs};
use crate::cutover::reverse::{self, Rollback, RollbackOptions};
use crate::follow;
use crate::pg::{self, Side};
use crate::workdir::WorkDir;

pub async fn rollback(args: RollbackArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    if args.unfence {
        let databases = server_databases(&args.dir)?;
        if !databases.is_empty() {
            for db in &databases {
                let Some(state) = reverse::state_of(&db.dir)? else {
                    continue;
                };
                let dst = pg::connect(
                    &crate::server::in_database(&target, &db.name),
                    Side::Target,
                    "rollback",
                )
                .await?;
                let roles = crate::cutover::unfence_with(&dst, &state).await?;
                println!(
                    "fence lifted on the target in database {} for: {}",
                    db.name,
                    if roles.is_empty() {
                        "nobody (no fence was recorded)".into()
                    } else {
                        roles.join(", ")
                    }
                );
            }
            return Ok(());
        }
        let Some(state) = reverse::state_of(&args.dir)? else {
            bail!(
                "the work dir {} has no reverse stream, so no rollback fenced the target",
                args.dir.display()
            );
        };
        let dst = pg::connect(&target, Side::Target, "rollback").await?;
        let roles = crate::cutover::unfence_with(&dst, &state).await?;
        println!(
            "fence lifted on the target for: {}",
            if roles.is_empty() {
                "nobody (no fence was recorded)".into()
            } else {
                roles.join(", ")
            }
        );
        return Ok(());
    }
    let opts = RollbackOptions {
        dir: args.dir.clone(),
        fence_roles: args.fence_roles,
        timeout: args.timeout,
        verify: args.verify,
        sequence_offset: args.sequence_offset,
        pgbouncer: super::pgbouncer(&args.pgbouncer)?,
    };
    let databases = server_databases(&args.dir)?;
    if !databases.is_empty() {
        return rollback_server(&source, &target, &opts, &databases).await;
    }
    let outcome = reverse::rollback(&source, &target, &opts).await?;
    let report = match outcome {
        Rollback::Completed(report) => report,
        Rollback::AlreadyDone(done) => {
            println!(
                "already rolled back: the reverse stream was applied through the target's {} (nothing changed by this run)",
                done.endpos
            );
            return Ok(());
        }
    };
    let done = &report.switched.switched;
    println!(
        "rollback complete on the reverse slot {}",
        report.switched.slot
    );
    println!("  target endpos:     {}", done.endpos);
    println!("  applied through:   {} (on the source)", done.applied);
    println!(
        "  sequences set:     {} (on the source, from the target)",
        done.sequences
    );
    println!("  verify:            {}", done.verdict);
    print_rollback_end(
        report.window,
        &report.switched.fenced,
        &report.switched.superusers_left,
        &report.unfenced,
    );
    Ok(())
}

/// The end of a rollback's report: its window and where each server's fence stands.
fn print_rollback_end(
    window: std::time::Duration,
    fenced: &[String],
    superusers_left: &[String],
    unfenced: &[String],
) {
    println!(
        "  write downtime:    {:.1} s (target fenced → source writable)",
        window.as_secs_f64()
    );
    println!(
        "  target:            roles {} stay read-only on the target (lift with `pgtide rollback --unfence`)",
        fenced.join(", ")
    );
    super::cutover::print_superusers(superusers_left, "target");
    println!(
        "  source:            writable again for {}",
        if unfenced.is_empty() {
            "every role (no fence was recorded)".into()
        } else {
            unfenced.join(", ")
        }
    );
    println!(
        "Point the application back at the source; then `pgtide cleanup` (same --dir) drops the slots, publications and origins on both servers."
    );
}

pub async fn follow(args: ReverseFollowArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    let databases = server_databases(&args.dir)?;
    if databases.is_empty() {
        return follow_one(&source, &target, &args.dir, args.apply_jobs).await;
    }
    // A whole server: one reverse follow per database in this process; the first to fail
    // stops the others (a rerun continues every one exactly where it stopped).
    let mut running = Vec::new();
    for db in &databases {
        let (source, target) = (
            crate::server::in_database(&source, &db.name),
            crate::server::in_database(&target, &db.name),
        );
        let (dir, name) = (db.dir.clone(), db.name.clone());
        let jobs = args.apply_jobs;
        running.push(async move {
            follow_one(&source, &target, &dir, jobs)
                .await
                .map_err(|e| e.context(format!("database {name}")))
        });
    }
    futures_util::future::try_join_all(running).await?;
    Ok(())
}

/// One database's reverse follow.
async fn follow_one(
    source: &crate::conninfo::ConnInfo,
    target: &crate::conninfo::ConnInfo,
    dir: &std::path::Path,
    apply_jobs: Option<usize>,
) -> Result<()> {
    let (source, target) = (source.clone(), target.clone());
    let forward = crate::state::StateDb::open_in_dir(dir)?;
    if reverse::state_of(dir)?.is_none() {
        bail!(
            "the work dir {} has no reverse stream: run `pgtide cutover --reverse` first",
            dir.display()
        );
    }
    {
        let src = pg::connect(&source, Side::Source, "reverse follow").await?;
        let dst = pg::connect(&target, Side::Target, "reverse follow").await?;
        reverse::check_servers(&src, &dst, &forward).await?;
    }
    let workdir = WorkDir::open(&reverse::dir_of(dir), "reverse follow")?;
    if let Some(done) = workdir.state.rolled_back()? {
        bail!(
            "the rollback is done (the reverse stream was applied through {}): there is nothing left to follow; `pgtide cleanup` removes the streams",
            done.endpos
        );
    }
    match apply_jobs {
        Some(0) => bail!("--apply-jobs must be at least 1"),
        Some(jobs) => workdir.state.record_apply_jobs(jobs)?,
        None => {}
    }
    // The servers swap roles: the target's changes are applied to the source.
    let receiver = follow::start_receiver(&target, &workdir)?;
    let applied = tokio::select! {
        r = follow::apply_until_endpos(&target, &source, &workdir, receiver) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted: rerun `pgtide reverse follow` to continue; nothing applied is lost or applied twice")),
    };
    let applied = super::record_failure(&workdir.state, applied)?;
    println!(
        "the reverse stream reached the rollback's endpos: applied through {applied} on the source; sequences set."
    );
    Ok(())
}

/// `reverse status`: the status of the reverse work dir, its servers swapped.
pub async fn status(args: StatusArgs) -> Result<()> {
    // A whole server: its status, which has each database's reverse stream.
    if !server_databases(&args.dir)?.is_empty() {
        return super::status::run(args).await;
    }
    let Some(state) = reverse::state_of(&args.dir)? else {
        bail!(
            "the work dir {} has no reverse stream: `pgtide cutover --reverse` creates it",
            args.dir.display()
        );
    };
    if !args.json {
        match state.rolled_back()? {
            Some(done) => println!(
                "reverse stream (target → source): rolled back, applied through the target's {}",
                done.endpos
            ),
            None => println!("reverse stream (target → source): the source follows the target"),
        }
    }
    super::status::run(StatusArgs {
        dir: reverse::dir_of(&args.dir),
        source: args.target,
        target: args.source,
        ..args
    })
    .await
}

/// The databases of a whole-server work dir (empty for one database), as cutover takes them.
fn server_databases(dir: &std::path::Path) -> Result<Vec<crate::cutover::ServerDatabaseDir>> {
    Ok(crate::server::databases_of(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|(db, dir)| crate::cutover::ServerDatabaseDir { name: db.name, dir })
        .collect())
}

async fn rollback_server(
    source: &crate::conninfo::ConnInfo,
    target: &crate::conninfo::ConnInfo,
    opts: &RollbackOptions,
    databases: &[crate::cutover::ServerDatabaseDir],
) -> Result<()> {
    let report = match reverse::rollback_server(source, target, opts, databases).await? {
        reverse::ServerRollback::Completed(report) => report,
        reverse::ServerRollback::AlreadyDone => {
            println!(
                "already rolled back: every database's reverse stream was applied (nothing changed by this run)"
            );
            return Ok(());
        }
    };
    println!(
        "rollback complete for {} databases",
        report.switched.databases.len()
    );
    for (name, done) in &report.switched.databases {
        println!(
            "  {name}: target endpos {}, applied through {} on the source, {} sequences set; verify: {}",
            done.endpos, done.applied, done.sequences, done.verdict
        );
    }
    print_rollback_end(
        report.window,
        &report.switched.fenced,
        &[],
        &report.unfenced,
    );
    Ok(())
}
