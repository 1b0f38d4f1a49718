//! `pgtide cutover`: parse, run the cutover engine (`crate::cutover`) or lift its fence, and
//! print the report.

use anyhow::Result;

use crate::cli::CutoverArgs;
use crate::cutover::{self, Options};

pub async fn run(args: CutoverArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    if args.unfence {
        let roles = cutover::lift_fence(&source, &args.dir).await?;
        println!("fence lifted on the source for: {}", list_or_none(&roles));
        return Ok(());
    }
    let opts = Options {
        dir: args.dir,
        fence: args.fence,
        fence_roles: args.fence_roles,
        timeout: args.timeout,
        verify: args.verify,
        sequence_offset: args.sequence_offset,
        refresh_matviews: args.refresh_matviews,
    };
    let report = cutover::run(&source, &target, &opts).await?;
    let fenced = &report.fenced;
    let fence_note = if fenced.is_empty() {
        "no fence (writes after endpos were not migrated: stop them before cutting over, or use --fence)".to_string()
    } else {
        format!(
            "roles {} stay read-only on the source (lift with `pgtide cutover --unfence`)",
            fenced.join(", ")
        )
    };
    let done = &report.switched;
    println!("cutover complete on slot {}", report.slot);
    println!("  endpos:            {}", done.endpos);
    println!("  applied through:   {}", done.applied);
    println!("  sequences set:     {}", done.sequences);
    if let Some(refreshed) = &done.refreshed {
        println!("  matviews:          {refreshed}");
    }
    println!("  verify:            {}", done.verdict);
    println!(
        "  write downtime:    {:.1} s ({} → target ready: endpos applied, sequences set)",
        report.window.as_secs_f64(),
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

fn list_or_none(roles: &[String]) -> String {
    if roles.is_empty() {
        "nobody (no fence was recorded)".into()
    } else {
        roles.join(", ")
    }
}
