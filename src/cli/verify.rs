//! `pgtide verify`: compare source and target; exit 0 only when everything matches.

use anyhow::{Result, bail};

use crate::cli::VerifyArgs;
use crate::verify;

pub async fn run(args: VerifyArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    let recorded = match &args.dir {
        Some(dir) => crate::server::databases_of(dir)?,
        None => Vec::new(),
    };
    if args.all_databases || !recorded.is_empty() {
        return server(args, source, target, recorded).await;
    }
    // With the migration's work dir: the filters and sequence offset it recorded.
    let (filters, sequence_offset) = match &args.dir {
        Some(dir) => {
            let state = crate::state::StateDb::open_in_dir(dir)?;
            (
                super::migration_filters(&state, args.filters.as_deref())?,
                state.sequence_offset()?,
            )
        }
        None => (super::load_filters(args.filters.as_deref())?, 0),
    };
    let opts = verify::Options {
        filters,
        counts_only: args.counts_only,
        sequence_offset,
    };
    let report = verify::run(&source, &target, &opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        verify::print_report(&report);
    }
    if !report.all_match {
        bail!("source and target differ (see the report above)");
    }
    Ok(())
}

/// verify across a server: the databases a whole-server work dir recorded, or with
/// `--all-databases` every database of the source.
async fn server(
    args: VerifyArgs,
    source: crate::conninfo::ConnInfo,
    target: crate::conninfo::ConnInfo,
    recorded: Vec<(crate::state::ServerDatabase, std::path::PathBuf)>,
) -> Result<()> {
    if args.filters.is_some() {
        bail!(
            "--filters names one database's tables: with several databases each one's recorded filters are used"
        );
    }
    let (databases, excluded_roles): (Vec<crate::server::verify::Database>, Vec<String>) =
        if recorded.is_empty() {
            let client = crate::pg::connect(&source, crate::pg::Side::Source, "verify").await?;
            let all = crate::server::databases::select(&client, &Default::default()).await?;
            let databases = all
                .into_iter()
                .map(|d| crate::server::verify::Database {
                    name: d.name,
                    dir: None,
                })
                .collect();
            (databases, Vec::new())
        } else {
            let dir = args.dir.as_deref().unwrap_or(std::path::Path::new("."));
            let excluded = crate::state::StateDb::open_in_dir(dir)?.excluded_roles()?;
            let databases = recorded
                .into_iter()
                .map(|(db, dir)| crate::server::verify::Database {
                    name: db.name,
                    dir: dir.join("state.db").exists().then_some(dir),
                })
                .collect();
            (databases, excluded)
        };
    let report = crate::server::verify::run(
        &source,
        &target,
        &databases,
        args.counts_only,
        &excluded_roles,
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        crate::server::verify::print(&report);
    }
    if !report.all_match {
        bail!("source and target differ (see the report above)");
    }
    Ok(())
}
