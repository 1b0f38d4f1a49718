//! `pgtide follow`: parse, run the follow engine (`crate::follow`) until endpos, print.

use anyhow::{Result, anyhow};

use crate::cli::FollowArgs;
use crate::follow;
use crate::workdir::WorkDir;

pub async fn run(args: FollowArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    let workdir = WorkDir::open(&args.dir, "follow")?;
    crate::preflight::preflight_follow(&crate::preflight::CheckOptions::new(
        source.clone(),
        Some(target.clone()),
        args.dir.clone(),
    ))
    .await?;
    super::start_metrics(args.metrics_addr.as_deref(), &workdir, &source, &target).await?;
    if let Some(endpos) = args.endpos {
        follow::set_endpos(&workdir.state, endpos)?;
    }
    if args.wal2json_nan_as_null {
        workdir.state.record_wal2json_nan_as_null()?;
    }
    let receiver = follow::start_receiver(&source, &workdir)?;
    let applied = tokio::select! {
        r = follow::apply_until_endpos(&source, &target, &workdir, receiver) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted: rerun `pgtide follow` to continue; nothing applied is lost or applied twice")),
    };
    let applied = super::record_failure(&workdir.state, applied)?;
    println!(
        "reached endpos: applied through {applied}; sequences set. The slot is kept until `pgtide stream cleanup`."
    );
    Ok(())
}
