//! PgBouncer around the switch (`--pgbouncer URI`): `PAUSE` before the fence, so that the
//! application's queries wait in the pooler instead of failing on a read-only source; then,
//! once the other side is ready, `RELOAD` (with `--pgbouncer-reload`: a pgbouncer.ini already
//! edited to point at the new server is read now) and `RESUME`, and the waiting queries run
//! there. On a failed switch the pooler is resumed without the reload.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use tokio_postgres::Client;

use crate::conninfo::ConnInfo;
use crate::pg::{self, Side};

/// How to reach the pooler, and what to do there.
#[derive(Clone, Debug)]
pub struct PoolerOptions {
    /// The admin console (database `pgbouncer`).
    pub admin: ConnInfo,
    /// The pooler's database to pause; None: every database of the pooler.
    pub database: Option<String>,
    /// `RELOAD` before `RESUME` once the switch is done.
    pub reload: bool,
}

/// Runs `switch` with the pooler (if any) paused: reloaded and resumed after a success,
/// resumed after a failure.
pub async fn around<T>(
    opts: Option<&PoolerOptions>,
    timeout: Duration,
    switch: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let Some(opts) = opts else {
        return switch.await;
    };
    let pooler = Pooler::pause(opts, timeout).await?;
    let result = switch.await;
    let resumed = match &result {
        Ok(_) => pooler.switched().await,
        Err(_) => pooler.resume().await,
    };
    match (result, resumed) {
        (result, Ok(())) => result,
        (Ok(_), Err(e)) => Err(e.context(
            "the switch is complete, but PgBouncer could not be reloaded and resumed: run RELOAD and RESUME on its admin console",
        )),
        (Err(first), Err(e)) => Err(first.context(format!(
            "and resuming PgBouncer failed too ({e:#}): run RESUME on its admin console"
        ))),
    }
}

/// A paused pooler: resume it whatever happens.
pub struct Pooler {
    client: Client,
    target: String,
    reload: bool,
}

impl Pooler {
    /// Connects to the admin console and pauses; gives up (and resumes) after `timeout`,
    /// naming the likely cause: `PAUSE` waits for every running transaction to end.
    pub async fn pause(opts: &PoolerOptions, timeout: Duration) -> Result<Pooler> {
        if opts.admin.dbname != "pgbouncer" {
            bail!(
                "--pgbouncer must name PgBouncer's admin console (database pgbouncer), not {}: e.g. postgres://admin@pooler:6432/pgbouncer",
                opts.admin.dbname
            );
        }
        let client = pg::connect_bare(&opts.admin, Side::Source, "pgbouncer")
            .await
            .map_err(|e| e.context("cannot reach PgBouncer's admin console (--pgbouncer)"))?;
        let target = match &opts.database {
            Some(db) => format!(" {}", pg::quote_ident(db)),
            None => String::new(),
        };
        let pooler = Pooler {
            client,
            target,
            reload: opts.reload,
        };
        match tokio::time::timeout(timeout, pooler.command("PAUSE")).await {
            Ok(Ok(())) => {
                tracing::info!("PgBouncer paused{}", pooler.target);
                Ok(pooler)
            }
            // Left paused by a run that was killed: the rerun goes on from there.
            Ok(Err(e)) if format!("{e:#}").contains("already suspended/paused") => {
                tracing::info!("PgBouncer was paused already (by an interrupted run)");
                Ok(pooler)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                // A second session: the first is still waiting for its PAUSE.
                let resumed = match pg::connect_bare(&opts.admin, Side::Source, "pgbouncer").await {
                    Ok(other) => other
                        .simple_query(&format!("RESUME{}", pooler.target))
                        .await
                        .is_ok(),
                    Err(_) => false,
                };
                bail!(
                    "PgBouncer did not pause within {}: PAUSE waits for every open transaction through the pooler to end (a long or idle-in-transaction session holds it). {} Nothing was fenced.",
                    humantime::format_duration(timeout),
                    if resumed {
                        "The pooler is resumed."
                    } else {
                        "Resuming it FAILED: run RESUME on its admin console."
                    }
                )
            }
        }
    }

    /// After a successful switch: `RELOAD` (if asked) then `RESUME`.
    pub async fn switched(&self) -> Result<()> {
        if self.reload {
            self.command("RELOAD").await?;
            tracing::info!("PgBouncer reloaded its configuration");
        }
        self.resume().await
    }

    /// `RESUME` (also after a failed switch).
    pub async fn resume(&self) -> Result<()> {
        self.command("RESUME").await?;
        tracing::info!("PgBouncer resumed{}", self.target);
        Ok(())
    }

    async fn command(&self, verb: &str) -> Result<()> {
        let sql = if verb == "RELOAD" {
            verb.to_string()
        } else {
            format!("{verb}{}", self.target)
        };
        self.client
            .simple_query(&sql)
            .await
            .map(|_| ())
            .map_err(|e| anyhow!("PgBouncer refused {sql}: {}", pg::describe(&e)))
    }
}
