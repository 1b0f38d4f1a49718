//! `pgtide clone`: parse options, lock the work dir, run the clone (one database, or a whole
//! server with `--all-databases` / `--database`), handle Ctrl-C.

use anyhow::{Result, bail};

use crate::cli::CloneArgs;
use crate::cli::SplitArg;
use crate::clone::{self, CloneOptions, SplitChoice};
use crate::conninfo::ConnInfo;
use crate::pg::catalog::SplitPolicy;
use crate::replication::Plugin;
use crate::state::Phase;
use crate::workdir::WorkDir;

use crate::follow;

pub async fn run(args: CloneArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    if args.table_jobs == 0 || args.index_jobs == 0 || args.apply_jobs == Some(0) {
        bail!("--table-jobs, --index-jobs and --apply-jobs must be at least 1");
    }
    if args.dry_run {
        return plan(args).await;
    }
    if args.json {
        bail!("--json belongs to --dry-run (or `pgtide plan`): add --dry-run to see the plan");
    }
    if args.all_databases || !args.databases.is_empty() {
        return server(args, source, target).await;
    }
    if !args.exclude_databases.is_empty()
        || args.skip_db_properties
        || args.skip_roles
        || args.no_role_passwords
        || !args.exclude_roles.is_empty()
    {
        bail!(
            "--exclude-database, --skip-db-properties, --skip-roles, --no-role-passwords and --exclude-role belong to a whole-server run: add --all-databases (or --database NAME)"
        );
    }
    let workdir = WorkDir::open(&args.dir, "clone")?;
    // A resumed migration keeps the filters it recorded when it started (invariant 9).
    let filters = if args.restart {
        super::load_filters(args.filters.as_deref())?
    } else {
        super::migration_filters(&workdir.state, args.filters.as_deref())?
    };
    super::start_observers(
        args.metrics_addr.as_deref(),
        (args.http.http_addr.as_deref(), args.http.http_token.clone()),
        &workdir,
        &source,
        &target,
    )
    .await?;
    // A fresh start (also with --resume on an empty work dir, as a container restarting the
    // same command does): every hazard that would stop this migration is reported now, before
    // anything is created. A real resume has its own checks: the work dir's identity.
    let fresh = workdir.state.clone_status()?.is_none() && workdir.state.stream_slot()?.is_none();
    if fresh {
        crate::preflight::preflight(&check_options(&args, &source, &target, &filters)).await?;
    }
    let result = async {
        let opts = clone_options(&args, source, target, filters);
        if !args.follow {
            follow::interruptible(clone::run(&workdir, &opts), &args.dir).await?;
            workdir.state.set_phase(Phase::Done)?;
            return Ok(());
        }
        let applied = follow::clone_and_follow(&workdir, &args.dir, opts, &follow_options(&args)).await?;
        println!(
            "reached endpos: applied through {applied}; sequences set. The slot is kept until `pgtide stream cleanup`."
        );
        Ok(())
    }
    .await;
    // A cutover asked over HTTP (the dashboard's API) finishes before the process ends.
    crate::observe::http::wait_for_actions().await;
    super::record_failure(&workdir.state, result)
}

/// `pgtide plan` / `clone --dry-run`: the plan of this clone, read-only.
pub async fn plan(args: CloneArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.endpoints.source, "source")?;
    let target = super::parse_conninfo(&args.endpoints.target, "target")?;
    if args.table_jobs == 0 || args.index_jobs == 0 {
        bail!("--table-jobs and --index-jobs must be at least 1");
    }
    let filters = super::load_filters(args.filters.as_deref())?;
    let server = (args.all_databases || !args.databases.is_empty()).then(|| {
        crate::server::databases::Selection {
            only: args.databases.clone(),
            exclude: args.exclude_databases.clone(),
        }
    });
    let opts = crate::plan::PlanOptions {
        preflight: check_options(&args, &source, &target, &filters),
        online: args.follow,
        server,
        clone: clone_options(&args, source, target, filters),
    };
    let plan = crate::plan::plan(&opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", crate::plan::render(&plan));
    }
    Ok(())
}

/// `clone --all-databases` / `--database`: every selected database in one process.
async fn server(args: CloneArgs, source: ConnInfo, target: ConnInfo) -> Result<()> {
    if args.metrics_addr.is_some() {
        bail!(
            "--metrics-addr is not available with several databases yet: use --http-addr (its /api/status has every database), or `pgtide status --dir {}`",
            args.dir.display()
        );
    }
    let servers = crate::observe::status::Servers {
        source: Some(source.clone()),
        target: Some(target.clone()),
    };
    if let Some(addr) = &args.http.http_addr {
        crate::observe::http::serve(
            addr,
            args.dir.clone(),
            None,
            servers.clone(),
            args.http.http_token.clone(),
        )
        .await?;
    }
    crate::observe::history::start_server_recorder(args.dir.clone(), servers);
    if args.snapshot.is_some() {
        bail!(
            "--snapshot names one database's snapshot: it cannot be given with several databases"
        );
    }
    let filters = super::load_filters(args.filters.as_deref())?;
    let opts = crate::server::ServerOptions {
        selection: crate::server::databases::Selection {
            only: args.databases.clone(),
            exclude: args.exclude_databases.clone(),
        },
        skip_db_properties: args.skip_db_properties,
        roles: (!args.skip_roles).then(|| crate::roles::RoleCopyOptions {
            passwords: !args.no_role_passwords,
            exclude: args.exclude_roles.clone(),
        }),
        preflight: Some(check_options(&args, &source, &target, &filters)),
        follow: args.follow.then(|| follow_options(&args)),
        clone: clone_options(&args, source, target, filters),
    };
    let finished = crate::server::run(&args.dir, opts).await?;
    for (name, applied) in finished {
        match applied {
            Some(lsn) => {
                println!("database {name}: reached endpos, applied through {lsn}; sequences set")
            }
            None => println!("database {name}: cloned"),
        }
    }
    Ok(())
}

/// The preflight of a migration that starts now.
fn check_options(
    args: &CloneArgs,
    source: &ConnInfo,
    target: &ConnInfo,
    filters: &crate::clone::filters::Filters,
) -> crate::preflight::CheckOptions {
    crate::preflight::CheckOptions {
        filters: filters.clone(),
        online: args.follow,
        table_jobs: args.table_jobs,
        index_jobs: args.index_jobs,
        apply_jobs: args.apply_jobs.unwrap_or(1),
        drop_if_exists: args.drop_if_exists,
        identity: super::preflight_identity(&args.identity),
        no_owner: args.no_owner,
        no_acl: args.no_acl,
        no_tablespaces: args.no_tablespaces,
        plugin: args.plugin.unwrap_or(Plugin::Pgoutput),
        wal2json_nan_as_null: args.wal2json_nan_as_null,
        ..crate::preflight::CheckOptions::new(
            source.clone(),
            Some(target.clone()),
            args.dir.clone(),
        )
    }
}

fn clone_options(
    args: &CloneArgs,
    source: ConnInfo,
    target: ConnInfo,
    filters: crate::clone::filters::Filters,
) -> CloneOptions {
    CloneOptions {
        source,
        target,
        table_jobs: args.table_jobs,
        index_jobs: args.index_jobs,
        split: match args.split_tables_larger_than {
            SplitArg::Auto => SplitChoice::Auto {
                copy_cores: args.copy_cores.map(usize::from),
            },
            SplitArg::Never => SplitChoice::Fixed(SplitPolicy::Never),
            SplitArg::LargerThan(bytes) => SplitChoice::Fixed(SplitPolicy::LargerThan(bytes)),
        },
        filters,
        drop_if_exists: args.drop_if_exists,
        resume: args.resume,
        restart: args.restart,
        snapshot: args.snapshot.clone(),
        skip_vacuum: args.skip_vacuum,
        skip_large_objects: args.skip_large_objects,
        no_owner: args.no_owner,
        no_acl: args.no_acl,
        no_tablespaces: args.no_tablespaces,
        resync_for_follow: args.follow && args.resume,
        follow: args.follow,
        toast_compression: args.toast_compression,
        fast_restore: args.fast_restore,
        budget: None,
    }
}

fn follow_options(args: &CloneArgs) -> follow::CloneFollow {
    follow::CloneFollow {
        slot_name: args.slot_name.clone(),
        plugin: args.plugin,
        nan_as_null: args.wal2json_nan_as_null,
        identity: super::identity(&args.identity),
        resume: args.resume,
        restart: args.restart,
        apply_jobs: args.apply_jobs,
        apply_gate: None,
    }
}
