//! `pgtide cutover`: the switch-over in one command. Optionally fences writes on the source
//! (the application roles made read-only in the source database and their sessions ended),
//! pins endpos at the source's current position, waits until apply reaches it (a running
//! follow, or this process when none runs), copies sequences, verifies, and prints the
//! measured write-downtime window. On any failure the fence is lifted and the output says
//! where both sides stand.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio_postgres::Client;

use crate::cli::{CutoverArgs, VerifyMode};
use crate::clone::{filters::Filters, sequences};
use crate::conninfo::ConnInfo;
use crate::follow::{self, LIVENESS_TIMEOUT};
use crate::pg::{self, Lsn, Side, catalog};
use crate::state::{CloneStatus, FencedRole, StateDb};
use crate::workdir::WorkDir;

pub async fn run(args: CutoverArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    let state = super::sentinel::open(&args.dir)?;
    let src = pg::connect(&source, Side::Source, "cutover").await?;
    if args.unfence {
        let roles = unfence(&src, &state).await?;
        println!("fence lifted on the source for: {}", list_or_none(&roles));
        return Ok(());
    }
    let slot = state.stream_slot()?.ok_or_else(|| {
        anyhow!(
            "the work dir {} has no change stream: cutover follows a `pgtide clone --follow` (or `stream setup` + `follow`) migration",
            args.dir.display()
        )
    })?;
    let window_start = Instant::now();
    let fenced = if args.fence {
        fence(&src, &state, &args.fence_roles).await?
    } else {
        Vec::new()
    };
    let outcome = switch_over(&args, &source, &target, &src, &state).await;
    match outcome {
        Ok(report) => {
            let fence_note = if fenced.is_empty() {
                "no fence (writes after endpos were not migrated: stop them before cutting over, or use --fence)".to_string()
            } else {
                format!(
                    "roles {} stay read-only on the source (lift with `pgtide cutover --unfence`)",
                    fenced.join(", ")
                )
            };
            let window = report.ready_at.duration_since(window_start);
            println!("cutover complete on slot {slot}");
            println!("  endpos:            {}", report.endpos);
            println!("  applied through:   {}", report.applied);
            println!("  sequences set:     {}", report.sequences);
            if let Some(refreshed) = &report.refreshed {
                println!("  matviews:          {refreshed}");
            }
            println!("  verify:            {}", report.verdict);
            println!(
                "  write downtime:    {:.1} s ({} → target ready: endpos applied, sequences set)",
                window.as_secs_f64(),
                if fenced.is_empty() {
                    "endpos pinned"
                } else {
                    "fence"
                }
            );
            println!("  source:            {fence_note}");
            println!(
                "Point the application at the target; then `pgtide cleanup` drops the slot, publication and origin."
            );
            Ok(())
        }
        Err(e) => {
            let lifted = if fenced.is_empty() {
                String::new()
            } else {
                match unfence(&src, &state).await {
                    Ok(roles) => format!(
                        " The fence is lifted: {} can write on the source again.",
                        roles.join(", ")
                    ),
                    Err(u) => format!(
                        " Lifting the fence FAILED ({u:#}): run `pgtide cutover --unfence` with the same --dir."
                    ),
                }
            };
            let applied = applied_at_endpos(&state)?;
            Err(e.context(format!(
                "cutover failed.{lifted} The source is unchanged otherwise (the slot keeps the changes); the target has applied through {applied}. Fix the cause and run cutover again."
            )))
        }
    }
}

/// The position apply stopped at when it reached endpos, for the report ("unknown" if none).
fn applied_at_endpos(state: &StateDb) -> Result<String> {
    Ok(state
        .sentinel()?
        .applied_lsn
        .map_or_else(|| "unknown".into(), |lsn| lsn.to_string()))
}

struct Report {
    endpos: Lsn,
    applied: String,
    sequences: usize,
    /// What --refresh-matviews refreshed.
    refreshed: Option<String>,
    ready_at: Instant,
    verdict: String,
}

async fn switch_over(
    args: &CutoverArgs,
    source: &ConnInfo,
    target: &ConnInfo,
    src: &Client,
    state: &StateDb,
) -> Result<Report> {
    // The insert position covers every commit already visible (asynchronous commit included).
    let text: String = src
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(|e| {
            anyhow!(
                "cannot read the source's WAL position: {}",
                pg::describe(&e)
            )
        })?
        .get(0);
    let endpos: Lsn = text.parse().map_err(|e: String| anyhow!(e))?;
    // Recorded before endpos: a running follow sets the sequences when it reaches endpos too,
    // and must add the same offset (and verify --dir expects it).
    state.record_sequence_offset(args.sequence_offset)?;
    follow::set_endpos(state, endpos)?;
    tracing::info!("endpos pinned at {endpos}; waiting for apply to reach it");
    tokio::time::timeout(
        args.timeout,
        reach_endpos(source, target, &args.dir, state, endpos),
    )
    .await
    .map_err(|_| {
        anyhow!(
            "apply did not reach endpos {endpos} within {} (is `pgtide follow` or `clone --follow` running and done copying? see `pgtide sentinel get`); raise --timeout to wait longer",
            humantime::format_duration(args.timeout)
        )
    })??;
    let dst = pg::connect(target, Side::Target, "cutover").await?;
    // The filters the migration recorded when it started (invariant 9).
    let filters: Filters = state.recorded_filters()?.unwrap_or_default();
    let seqs = catalog::read_sequences(src, &filters).await?;
    sequences::set_on_target(&dst, &seqs, args.sequence_offset).await?;
    let ready_at = Instant::now();
    let refreshed = if args.refresh_matviews {
        let names = crate::verify::refresh_matviews(target, &filters).await?;
        Some(format!(
            "{} materialized view{} refreshed on the target{}",
            names.len(),
            if names.len() == 1 { "" } else { "s" },
            if names.is_empty() {
                String::new()
            } else {
                format!(" ({})", names.join(", "))
            }
        ))
    } else {
        None
    };
    let verdict = match args.verify {
        VerifyMode::None => "skipped (--verify none)".to_string(),
        mode => {
            let opts = crate::verify::Options {
                filters,
                counts_only: mode == VerifyMode::Counts,
                sequence_offset: args.sequence_offset,
            };
            let report = crate::verify::run(source, target, &opts).await?;
            let what = if mode == VerifyMode::Counts {
                "row counts"
            } else {
                "row counts and checksums"
            };
            if !report.all_match {
                crate::verify::print_report(&report);
                bail!("verify found differences between source and target (see the report above)");
            }
            let matviews = if report.matviews.is_empty() {
                String::new()
            } else {
                format!("; {}", crate::verify::matview_summary(&report))
            };
            format!(
                "{} tables identical ({what}), taking {:.1} s after the target was ready{matviews}",
                report.tables.len(),
                ready_at.elapsed().as_secs_f64()
            )
        }
    };
    Ok(Report {
        endpos,
        applied: applied_at_endpos(state)?,
        sequences: seqs.len(),
        refreshed,
        ready_at,
        verdict,
    })
}

/// Waits for a running follow to reach endpos, or, when none holds the work dir, runs the
/// follow to endpos in this process.
async fn reach_endpos(
    source: &ConnInfo,
    target: &ConnInfo,
    dir: &std::path::Path,
    state: &StateDb,
    endpos: Lsn,
) -> Result<()> {
    match WorkDir::open(dir, "cutover") {
        Ok(workdir) => {
            if let Some(status) = state.clone_status()?
                && status != CloneStatus::Done
            {
                bail!(
                    "the clone in {} is not finished ({status}): resume it with `pgtide clone --follow --resume`, then cut over",
                    dir.display()
                );
            }
            tracing::info!("no follow is running on this work dir: applying to endpos here");
            let receiver = follow::start_receiver(source, &workdir)?;
            follow::apply_until_endpos(source, target, &workdir, receiver).await?;
            Ok(())
        }
        Err(_) => {
            let waiting_since = Instant::now();
            loop {
                if state.sentinel()?.reached_endpos == Some(endpos) {
                    return Ok(());
                }
                if let Some(why) = apply_not_running(state, waiting_since.elapsed())? {
                    bail!(
                        "apply is not running, so endpos {endpos} cannot be reached: {why}. Restart it (`pgtide follow` with the same --dir), or run cutover again: with no follow running it applies to endpos itself"
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Why the follow that cutover waits for is not running, if it is not (see
/// `FollowLiveness::not_running`; a process holding the work dir that never recorded a follow
/// counts after the same grace), with the last error the work dir recorded.
fn apply_not_running(state: &StateDb, waited: Duration) -> Result<Option<String>> {
    let why = match state.follow_liveness()? {
        Some(live) => live.not_running(crate::state::now(), LIVENESS_TIMEOUT),
        None => (waited > LIVENESS_TIMEOUT).then(|| {
            "no follow process has run in this work dir (the process holding it does not apply the stream)".to_string()
        }),
    };
    // A killed follow leaves no error of its own: name the last one the work dir recorded.
    Ok(why.map(|why| match state.failure() {
        Ok(Some(error)) if !why.contains(&error) => {
            format!("{why}; the last error recorded: {error}")
        }
        _ => why,
    }))
}

/// Makes the roles read-only in the source database and ends their sessions there. The
/// earlier settings are recorded first, so that a failure at any point can restore them.
async fn fence(src: &Client, state: &StateDb, asked: &[String]) -> Result<Vec<String>> {
    if state.fence()?.is_some() {
        bail!(
            "a fence from an earlier cutover is still recorded in this work dir: lift it with `pgtide cutover --unfence`, then run cutover again"
        );
    }
    let roles: Vec<String> = if asked.is_empty() {
        src.query(
            "SELECT rolname::text FROM pg_roles WHERE rolcanlogin AND NOT rolsuper AND rolname <> current_user ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect()
    } else {
        asked.to_vec()
    };
    if roles.is_empty() {
        bail!(
            "--fence found no role to fence (no non-superuser login role besides pgtide's own): name them with --fence-role, or stop the writers yourself and cut over without --fence"
        );
    }
    let mut fenced = Vec::new();
    for role in &roles {
        let row = src
            .query_opt(
                "SELECT (SELECT split_part(c, '=', 2) FROM unnest(s.setconfig) c WHERE c LIKE 'default_transaction_read_only=%')
                 FROM pg_roles r LEFT JOIN pg_db_role_setting s
                   ON s.setrole = r.oid AND s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
                 WHERE r.rolname = $1",
                &[role],
            )
            .await?
            .ok_or_else(|| anyhow!("--fence-role {role}: no such role on the source"))?;
        fenced.push(FencedRole {
            role: role.clone(),
            previous: row.get(0),
        });
    }
    state.record_fence(&fenced)?;
    let db: String = src
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    for role in &roles {
        src.batch_execute(&format!(
            "ALTER ROLE {} IN DATABASE {} SET default_transaction_read_only = on",
            pg::quote_ident(role),
            pg::quote_ident(&db)
        ))
        .await
        .map_err(|e| anyhow!("cannot fence role {role}: {}", pg::describe(&e)))?;
    }
    let ended: Vec<i32> = src
        .query(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE usename = ANY($1) AND datname = current_database() AND pid <> pg_backend_pid()",
            &[&roles],
        )
        .await
        .context("cannot end the fenced roles' sessions")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    wait_sessions_gone(src, &ended).await?;
    let ended = ended.len();
    tracing::info!(
        "fenced {} on the source (read-only in {db}); ended {ended} of their sessions",
        roles.join(", ")
    );
    Ok(roles)
}

/// Waits until the backends that `fence` signalled have exited. pg_terminate_backend only
/// sends SIGTERM: a session in the middle of a commit finishes it first, and that commit must
/// come before endpos, which is pinned next. A session still there after the wait is only
/// warned about: a write it commits after endpos makes the verify fail, which lifts the fence.
async fn wait_sessions_gone(src: &Client, pids: &[i32]) -> Result<()> {
    if pids.is_empty() {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = src
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&pids],
            )
            .await
            .context("cannot check that the fenced roles' sessions ended")?
            .get(0);
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            tracing::warn!(
                "{left} of the fenced roles' sessions have not exited 30 s after they were ended; cutting over anyway (the verify finds any write they commit after endpos)"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Restores the fenced roles' earlier setting and forgets the fence.
async fn unfence(src: &Client, state: &StateDb) -> Result<Vec<String>> {
    let Some(fenced) = state.fence()? else {
        return Ok(Vec::new());
    };
    let db: String = src
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    for f in &fenced {
        let role = pg::quote_ident(&f.role);
        let sql = match &f.previous {
            Some(v) => format!(
                "ALTER ROLE {role} IN DATABASE {} SET default_transaction_read_only = {}",
                pg::quote_ident(&db),
                pg::quote_literal(v)
            ),
            None => format!(
                "ALTER ROLE {role} IN DATABASE {} RESET default_transaction_read_only",
                pg::quote_ident(&db)
            ),
        };
        src.batch_execute(&sql).await.map_err(|e| {
            anyhow!(
                "cannot lift the fence of role {}: {}",
                f.role,
                pg::describe(&e)
            )
        })?;
    }
    state.forget_fence()?;
    Ok(fenced.into_iter().map(|f| f.role).collect())
}

fn list_or_none(roles: &[String]) -> String {
    if roles.is_empty() {
        "nobody (no fence was recorded)".into()
    } else {
        roles.join(", ")
    }
}
