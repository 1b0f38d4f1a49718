//! `pgtide check`: runs the preflight checks and prints them; exits non-zero on any FAIL.

use anyhow::{Result, bail};

use crate::cli::CheckArgs;
use crate::preflight::{self as check, CheckOptions, Level};

pub async fn run(args: CheckArgs) -> Result<()> {
    let opts = CheckOptions {
        source: super::parse_conninfo(&args.source, "source")?,
        target: args
            .target
            .as_deref()
            .map(|t| super::parse_conninfo(t, "target"))
            .transpose()?,
        plugin: args.plugin,
        filters: super::load_filters(args.filters.as_deref())?,
        online: !args.offline,
        table_jobs: args.table_jobs,
        index_jobs: args.index_jobs,
        apply_jobs: args.apply_jobs,
        dir: args.dir.clone(),
        drop_if_exists: args.drop_if_exists,
        identity: super::preflight_identity(&args.identity),
        no_owner: args.no_owner,
        no_acl: args.no_acl,
        no_tablespaces: args.no_tablespaces,
        wal2json_nan_as_null: args.wal2json_nan_as_null,
    };
    let findings = check::run(&opts).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&findings)?);
    } else {
        print!("{}", check::render(&findings));
    }
    let failed = findings.iter().filter(|f| f.level == Level::Fail).count();
    let warned = findings.iter().filter(|f| f.level == Level::Warn).count();
    if failed > 0 {
        bail!(
            "{failed} check(s) failed ({warned} warning(s)): fix them (see `fix:` above) and run check again"
        );
    }
    if !args.json {
        println!(
            "all checks passed{} for an {} migration",
            if warned > 0 {
                format!(" ({warned} warning(s))")
            } else {
                String::new()
            },
            if args.offline {
                "offline (clone only)"
            } else {
                "online (clone + follow)"
            }
        );
    }
    Ok(())
}
