//! `pgtide verify`: compare source and target; exit 0 only when everything matches.

use anyhow::{Result, bail};

use crate::cli::VerifyArgs;
use crate::verify;

pub async fn run(args: VerifyArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
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
