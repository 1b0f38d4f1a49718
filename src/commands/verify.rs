//! `pgtide verify`: compare source and target; exit 0 only when everything matches.

use anyhow::{Result, bail};

use crate::cli::VerifyArgs;
use crate::verify;

pub async fn run(args: VerifyArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    let filters = super::load_filters(args.filters.as_deref())?;
    let report = verify::run(&source, &target, &filters, args.counts_only).await?;
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
