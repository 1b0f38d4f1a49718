//! The cutover fence: the application roles made read-only in the database (their earlier
//! setting recorded first) and their sessions ended and waited for, so that nothing commits
//! after endpos; the unfence that restores the recorded settings; and the refusal of prepared
//! transactions, which no fence holds. A cutover fences the source, a rollback the target.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio_postgres::Client;

use crate::pg;
use crate::state::{FencedRole, StateDb};

/// What a fence did: the roles made read-only and the superusers it leaves able to write.
pub struct Fenced {
    pub roles: Vec<String>,
    /// Login superusers not fenced (a superuser can lift any fence for itself): the leak
    /// check after endpos finds what they write.
    pub superusers_left: Vec<String>,
}

/// Makes the roles read-only in the database and ends their sessions there: by default every
/// non-superuser login role and the role pgtide itself connects as (an application may log in
/// as it; pgtide's own sessions turn the default off, see `pg::connect`). The earlier settings
/// are recorded first, so that a failure at any point can restore them. A fence already
/// recorded (an interrupted cutover or rollback run again) is put in force again as recorded.
pub async fn fence(src: &Client, state: &StateDb, asked: &[String]) -> Result<Fenced> {
    let recorded = state.fence()?;
    let roles: Vec<String> = if let Some(recorded) = &recorded {
        recorded.iter().map(|f| f.role.clone()).collect()
    } else if asked.is_empty() {
        src.query(
            "SELECT rolname::text FROM pg_roles
             WHERE rolcanlogin AND (NOT rolsuper OR rolname = current_user) ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect()
    } else {
        asked.to_vec()
    };
    if recorded.is_none() {
        let mut fenced = Vec::new();
        for role in &roles {
            let row = src
                .query_opt(
                    "SELECT (SELECT split_part(c, '=', 2) FROM unnest(s.setconfig) c WHERE c LIKE 'default_transaction_read_only=%')
                     FROM pg_roles r LEFT JOIN pg_db_role_setting s
                       ON s.setrole = r.oid AND s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
                     WHERE r.rolname = $1",
                    &[role],
                )
                .await?
                .ok_or_else(|| anyhow!("--fence-role {role}: no such role on this server"))?;
            fenced.push(FencedRole {
                role: role.clone(),
                previous: row.get(0),
            });
        }
        state.record_fence(&fenced)?;
    }
    let db: String = src
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    for role in &roles {
        src.batch_execute(&format!(
            "ALTER ROLE {} IN DATABASE {} SET default_transaction_read_only = on",
            pg::quote_ident(role),
            pg::quote_ident(&db)
        ))
        .await
        .map_err(|e| anyhow!("cannot fence role {role}: {}", pg::describe(&e)))?;
    }
    // Every client session of a fenced role but pgtide's own (its role's sessions named
    // `pgtide`): a session started before the fence keeps the old default.
    let ended: Vec<i32> = src
        .query(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE usename = ANY($1) AND datname = current_database() AND pid <> pg_backend_pid()
               AND backend_type = 'client backend'
               AND NOT (usename = current_user AND application_name = 'pgtide')",
            &[&roles],
        )
        .await
        .context("cannot end the fenced roles' sessions")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    wait_sessions_gone(src, &ended).await?;
    let superusers_left: Vec<String> = src
        .query(
            "SELECT rolname::text FROM pg_roles
             WHERE rolcanlogin AND rolsuper AND NOT rolname = ANY($1) ORDER BY 1",
            &[&roles],
        )
        .await
        .context("cannot list the superusers")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let ended = ended.len();
    tracing::info!(
        "fenced {} (read-only in {db}); ended {ended} of their sessions",
        roles.join(", ")
    );
    if !superusers_left.is_empty() {
        tracing::warn!(
            "{} can still write in {db}: a superuser can lift any fence for itself. Stop their writers, or fence them too with --fence-role; the leak check after endpos reports any write that lands",
            superusers_left.join(", ")
        );
    }
    Ok(Fenced {
        roles,
        superusers_left,
    })
}

/// Waits until the backends that `fence` signalled have exited. pg_terminate_backend only
/// sends SIGTERM: a session in the middle of a commit finishes it first, and that commit must
/// come before endpos, which is pinned next. A session still there after the wait is only
/// warned about: a write it commits after endpos makes the verify fail, which lifts the fence.
async fn wait_sessions_gone(src: &Client, pids: &[i32]) -> Result<()> {
    if pids.is_empty() {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = src
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&pids],
            )
            .await
            .context("cannot check that the fenced roles' sessions ended")?
            .get(0);
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            tracing::warn!(
                "{left} of the fenced roles' sessions have not exited 30 s after they were ended; cutting over anyway (the verify finds any write they commit after endpos)"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Restores the fenced roles' earlier setting and forgets the fence.
pub async fn unfence(src: &Client, state: &StateDb) -> Result<Vec<String>> {
    let Some(fenced) = state.fence()? else {
        return Ok(Vec::new());
    };
    let db: String = src
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    for f in &fenced {
        let role = pg::quote_ident(&f.role);
        let sql = match &f.previous {
            Some(v) => format!(
                "ALTER ROLE {role} IN DATABASE {} SET default_transaction_read_only = {}",
                pg::quote_ident(&db),
                pg::quote_literal(v)
            ),
            None => format!(
                "ALTER ROLE {role} IN DATABASE {} RESET default_transaction_read_only",
                pg::quote_ident(&db)
            ),
        };
        src.batch_execute(&sql).await.map_err(|e| {
            anyhow!(
                "cannot lift the fence of role {}: {}",
                f.role,
                pg::describe(&e)
            )
        })?;
    }
    state.forget_fence()?;
    Ok(fenced.into_iter().map(|f| f.role).collect())
}

/// Refuses the cutover while the source database holds prepared transactions: one survives
/// the fence (it belongs to no session) and can be committed on the source after endpos, after
/// verify passed, and its changes would never reach the target.
pub async fn refuse_prepared(src: &Client) -> Result<()> {
    let prepared: Vec<String> = src
        .query(
            "SELECT format('%L (prepared %s by %s)', gid, date_trunc('second', prepared), owner)
             FROM pg_prepared_xacts WHERE database = current_database() ORDER BY prepared",
            &[],
        )
        .await
        .context("cannot list the source's prepared transactions")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if prepared.is_empty() {
        return Ok(());
    }
    bail!(
        "the source database holds {} prepared transaction(s): {}. A prepared transaction outlives the fence and could commit on the source after endpos, where its changes would be lost to the target. Finish each on the source (COMMIT PREPARED 'gid' or ROLLBACK PREPARED 'gid', as the application that prepared it decides), then run cutover again",
        prepared.len(),
        prepared.join(", ")
    )
}
