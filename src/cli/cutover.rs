//! `pgtide cutover`: parse, run the cutover engine (`crate::cutover`) or lift its fence, and
//! print the report.

use anyhow::Result;

use crate::cli::CutoverArgs;
use crate::cutover::{self, Options};

pub async fn run(args: CutoverArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    // A whole-server work dir: every database at once.
    let databases = crate::server::databases_of(&args.dir).unwrap_or_default();
    if args.unfence {
        if databases.is_empty() {
            let roles = cutover::lift_fence(&source, &args.dir).await?;
            println!("fence lifted on the source for: {}", list_or_none(&roles));
        }
        for (db, dir) in &databases {
            let source = crate::server::in_database(&source, &db.name);
            let roles = cutover::lift_fence(&source, dir).await?;
            println!(
                "fence lifted on the source in database {} for: {}",
                db.name,
                list_or_none(&roles)
            );
        }
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
        direction: cutover::Direction::Forward,
        reverse: args.reverse,
        pgbouncer: super::pgbouncer(&args.pgbouncer)?,
    };
    if !databases.is_empty() {
        let dirs: Vec<cutover::ServerDatabaseDir> = databases
            .into_iter()
            .map(|(db, dir)| cutover::ServerDatabaseDir { name: db.name, dir })
            .collect();
        let report = cutover::run_server(&source, &target, &opts, &dirs).await?;
        println!("cutover complete for {} databases", report.databases.len());
        for (name, done) in &report.databases {
            println!(
                "  {name}: endpos {}, applied through {}, {} sequences set; verify: {}",
                done.endpos, done.applied, done.sequences, done.verdict
            );
        }
        print_window(report.window, &report.fenced);
        for (name, stream) in &report.reversed {
            println!(
                "  reverse stream:    {name}: slot {} on the target{}",
                stream.slot,
                stream
                    .start
                    .map(|lsn| format!(", from {lsn}"))
                    .unwrap_or_default()
            );
        }
        if report.reversed.is_empty() {
            println!(
                "Point the application at the target; then `pgtide cleanup` (same --dir) drops every database's slot, publication and origin."
            );
        } else {
            println!(
                "Point the application at the target, and run `pgtide reverse follow` (same --source, --target, --dir) to keep the source in step; `pgtide rollback` moves back with nothing lost, `pgtide cleanup` ends the migration."
            );
        }
        return Ok(());
    }
    let report = cutover::run(&source, &target, &opts).await?;
    let done = &report.switched;
    println!("cutover complete on slot {}", report.slot);
    println!("  endpos:            {}", done.endpos);
    println!("  applied through:   {}", done.applied);
    println!("  sequences set:     {}", done.sequences);
    if let Some(refreshed) = &done.refreshed {
        println!("  matviews:          {refreshed}");
    }
    println!("  verify:            {}", done.verdict);
    print_window(report.window, &report.fenced);
    print_superusers(&report.superusers_left, "source");
    if let Some(reverse) = &report.reverse {
        println!(
            "  reverse stream:    slot {} on the target{}{}",
            reverse.slot,
            reverse
                .start
                .map(|lsn| format!(", from {lsn}"))
                .unwrap_or_default(),
            if reverse.created {
                ""
            } else {
                " (already set up)"
            }
        );
        println!(
            "Point the application at the target, and run `pgtide reverse follow` (same --source, --target, --dir) to keep the source in step; `pgtide rollback` moves back with nothing lost, `pgtide cleanup` ends the migration."
        );
    } else {
        println!(
            "Point the application at the target; then `pgtide cleanup` drops the slot, publication and origin."
        );
    }
    Ok(())
}

/// The write-downtime window and the fence left on the source.
fn print_window(window: std::time::Duration, fenced: &[String]) {
    println!(
        "  write downtime:    {:.1} s ({} → target ready: endpos applied, sequences set)",
        window.as_secs_f64(),
        if fenced.is_empty() {
            "endpos pinned"
        } else {
            "fence"
        }
    );
    if fenced.is_empty() {
        println!(
            "  source:            no fence (writes after endpos were not migrated: stop them before cutting over, or use --fence)"
        );
    } else {
        println!(
            "  source:            roles {} stay read-only on the source (lift with `pgtide cutover --unfence`)",
            fenced.join(", ")
        );
    }
}

/// The superusers a fence leaves able to write on `side`, with the fix.
pub fn print_superusers(superusers: &[String], side: &str) {
    if !superusers.is_empty() {
        println!(
            "  superusers:        {} can still write on the {side} (a superuser can lift the fence for itself): stop their writers, or add --fence-role; the leak check found no write after endpos",
            superusers.join(", ")
        );
    }
}

fn list_or_none(roles: &[String]) -> String {
    if roles.is_empty() {
        "nobody (no fence was recorded)".into()
    } else {
        roles.join(", ")
    }
}
