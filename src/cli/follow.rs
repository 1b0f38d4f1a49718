//! `pgtide follow`: parse, run the follow engine (`crate::follow`) until endpos, print.

use anyhow::{Result, anyhow};

use crate::cli::FollowArgs;
use crate::follow;
use crate::workdir::WorkDir;

pub async fn run(args: FollowArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    if !(args.add_tables.is_empty()
        && args.resync_tables.is_empty()
        && args.remove_tables.is_empty())
    {
        return table_requests(args, source, target).await;
    }
    let workdir = WorkDir::open(&args.dir, "follow")?;
    crate::preflight::preflight_follow(&crate::preflight::CheckOptions::new(
        source.clone(),
        Some(target.clone()),
        args.dir.clone(),
    ))
    .await?;
    super::start_observers(
        args.metrics_addr.as_deref(),
        (args.http.http_addr.as_deref(), args.http.http_token.clone()),
        &workdir,
        &source,
        &target,
    )
    .await?;
    if let Some(endpos) = args.endpos {
        follow::set_endpos(&workdir.state, endpos)?;
    }
    if args.wal2json_nan_as_null {
        workdir.state.record_wal2json_nan_as_null()?;
    }
    match args.apply_jobs {
        Some(0) => anyhow::bail!("--apply-jobs must be at least 1"),
        Some(jobs) => workdir.state.record_apply_jobs(jobs)?,
        None => {}
    }
    let receiver = follow::start_receiver(&source, &workdir)?;
    let applied = tokio::select! {
        r = follow::apply_until_endpos(&source, &target, &workdir, receiver) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted: rerun `pgtide follow` to continue; nothing applied is lost or applied twice")),
    };
    // A cutover asked over HTTP (the dashboard's API) finishes before the process ends.
    crate::observe::http::wait_for_actions().await;
    let applied = super::record_failure(&workdir.state, applied)?;
    println!(
        "reached endpos: applied through {applied}; sequences set. The slot is kept until `pgtide stream cleanup`."
    );
    Ok(())
}

/// `follow --add-table / --resync / --remove-table`: runs the requests against the work dir
/// (a follow may be running there) and exits.
async fn table_requests(
    args: FollowArgs,
    source: crate::conninfo::ConnInfo,
    target: crate::conninfo::ConnInfo,
) -> Result<()> {
    use crate::clone::filters::parse_table_name;
    use follow::table_sync::{TableRequest, TableSyncOptions};
    let mut requests = Vec::new();
    for (names, make) in [
        (&args.remove_tables, TableRequest::Remove as fn(_) -> _),
        (&args.add_tables, TableRequest::Add as fn(_) -> _),
        (&args.resync_tables, TableRequest::Resync as fn(_) -> _),
    ] {
        for name in names {
            requests.push(make(parse_table_name(name)?));
        }
    }
    let opts = TableSyncOptions {
        source,
        target,
        dir: args.dir,
        ack_timeout: args.request_timeout,
    };
    for line in follow::table_sync::run(&opts, &requests).await? {
        println!("{line}");
    }
    Ok(())
}
