//! The CLI layer: the clap definitions (`args.rs`, re-exported here) and one thin file per
//! subcommand that parses its arguments, calls an engine and prints the outcome. The engines
//! live below (`follow/`, `cutover/`, `replication/`, `clone/`, …); nothing here owns one.

mod args;
pub use args::*;

pub mod check;
pub mod cleanup;
pub mod clone;
pub mod copy;
pub mod cutover;
pub mod ddl;
pub mod follow;
pub mod reverse;
pub mod sentinel;
pub mod spool;
pub mod status;
pub mod stream;
pub mod verify;

use anyhow::Result;

use crate::clone::filters::Filters;
use crate::conninfo::ConnInfo;

/// Parses a `--source`/`--target` value, naming which one was wrong.
pub fn parse_conninfo(value: &str, which: &str) -> Result<ConnInfo> {
    ConnInfo::parse(value)
        .map_err(|e| e.context(format!("--{which} is not a valid connection string")))
}

/// `--pgbouncer` and its companions as the cutover engine takes them.
pub fn pgbouncer(args: &PgbouncerArgs) -> Result<Option<crate::cutover::pooler::PoolerOptions>> {
    let Some(uri) = &args.pgbouncer else {
        return Ok(None);
    };
    Ok(Some(crate::cutover::pooler::PoolerOptions {
        admin: parse_conninfo(uri, "pgbouncer")?,
        database: args.pgbouncer_database.clone(),
        reload: args.pgbouncer_reload,
    }))
}

pub fn load_filters(path: Option<&std::path::Path>) -> Result<Filters> {
    match path {
        Some(p) => Filters::load(p),
        None => Ok(Filters::default()),
    }
}

/// The migration's filters (invariant 9): those recorded in the work dir when it started, or
/// `--filters` for one that starts now. A `--filters` that differs from the recorded ones is
/// refused: every stage of one migration must select the same tables.
pub fn migration_filters(
    state: &crate::state::StateDb,
    path: Option<&std::path::Path>,
) -> Result<Filters> {
    let given = path.map(Filters::load).transpose()?;
    match (state.recorded_filters()?, given) {
        (Some(recorded), None) => Ok(recorded),
        (Some(recorded), Some(given)) if recorded == given => Ok(recorded),
        (Some(_), Some(_)) => anyhow::bail!(
            "--filters {} differs from the filters this migration recorded (when it started, and as `follow --add-table` / `--remove-table` changed them since): leave --filters out (the recorded ones are used), or start a new migration in another --dir",
            path.map(|p| p.display().to_string()).unwrap_or_default()
        ),
        (None, Some(given)) => Ok(given),
        (None, None) => Ok(Filters::default()),
    }
}

/// Records a failed run in the work dir (phase `failed` and the error, for `pgtide status`)
/// and passes the result on.
pub fn record_failure<T>(state: &crate::state::StateDb, result: Result<T>) -> Result<T> {
    if let Err(e) = &result {
        let _ = state.set_failed(&format!("{e:#}"));
    }
    result
}

/// Starts the Prometheus endpoint when `--metrics-addr` is given.
pub async fn start_observers(
    metrics_addr: Option<&str>,
    http: (Option<&str>, Option<String>),
    workdir: &crate::workdir::WorkDir,
    source: &ConnInfo,
    target: &ConnInfo,
) -> Result<()> {
    let servers = || crate::observe::status::Servers {
        source: Some(source.clone()),
        target: Some(target.clone()),
    };
    if let Some(addr) = metrics_addr {
        crate::observe::metrics::serve(
            addr,
            workdir.path.clone(),
            workdir.state.clone(),
            servers(),
        )
        .await?;
    }
    if let (Some(addr), token) = http {
        crate::observe::http::serve(
            addr,
            workdir.path.clone(),
            Some(workdir.state.clone()),
            servers(),
            token,
        )
        .await?;
    }
    // The time series the dashboard shows, kept across restarts.
    crate::observe::history::start_recorder(workdir.path.clone(), workdir.state.clone(), servers());
    Ok(())
}

/// The preflight's view of `--replica-identity-full` / `--append-only` / `--no-ddl-capture`
/// (check and clone's preflight read the same options).
pub fn preflight_identity(args: &IdentityArgs) -> crate::preflight::Identity {
    crate::preflight::Identity {
        replica_identity_full: args.replica_identity_full,
        append_only: args.append_only.clone(),
        no_ddl_capture: args.no_ddl_capture,
    }
}

/// The engine's view of `--replica-identity-full` / `--append-only`.
pub fn identity(args: &IdentityArgs) -> crate::replication::setup::IdentityChoice {
    crate::replication::setup::IdentityChoice {
        replica_identity_full: args.replica_identity_full,
        append_only: args.append_only.clone(),
        ddl_capture: !args.no_ddl_capture,
    }
}
