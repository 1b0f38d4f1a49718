//! `pgtide clone`: parse options, lock the work dir, run the clone, handle Ctrl-C.

use anyhow::{Result, bail};

use crate::cli::CloneArgs;
use crate::clone::{self, CloneOptions};
use crate::workdir::WorkDir;

pub async fn run(args: CloneArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    let filters = super::load_filters(args.filters.as_deref())?;
    if args.table_jobs == 0 || args.index_jobs == 0 {
        bail!("--table-jobs and --index-jobs must be at least 1");
    }
    let workdir = WorkDir::open(&args.dir, "clone")?;
    let opts = CloneOptions {
        source,
        target,
        table_jobs: args.table_jobs,
        index_jobs: args.index_jobs,
        split_bytes: (args.split_tables_larger_than > 0).then_some(args.split_tables_larger_than),
        filters,
        drop_if_exists: args.drop_if_exists,
        resume: args.resume,
        restart: args.restart,
        snapshot: args.snapshot,
        skip_vacuum: args.skip_vacuum,
        skip_large_objects: args.skip_large_objects,
        no_owner: args.no_owner,
        no_acl: args.no_acl,
    };
    tokio::select! {
        result = clone::run(&workdir, &opts) => result,
        _ = tokio::signal::ctrl_c() => {
            // Dropping the clone future closes every connection (open transactions roll back)
            // and kills pg_dump / pg_restore children; state.db already holds what is done.
            bail!(
                "interrupted: the clone stopped cleanly and its progress is saved in {}. Rerun the same command with --resume to continue.",
                args.dir.display()
            )
        }
    }
}
