//! Normal (non-replication) connections through tokio-postgres, identifier quoting, and the
//! translation of connection failures into errors that tell the operator what to fix.

pub mod catalog;
pub mod cores;
pub mod lsn;
pub mod sql_text;
pub mod version;

pub use lsn::Lsn;
pub use version::ServerVersion;

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, anyhow};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client};

use crate::conninfo::ConnInfo;
use crate::errors::{Classified, Disconnected, classify_connect};

/// Which server a connection goes to; named in every connection error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Target => "target",
        }
    }
}

/// Opens a session with settings that make text output identical on both servers (UTC,
/// ISO dates, hex bytea, full float precision), so checksums and COPY text agree. A source
/// session also gets an empty search_path (see [`pin_search_path`]).
pub async fn connect(info: &ConnInfo, side: Side, purpose: &str) -> Result<Client> {
    let client = connect_bare(info, side, purpose).await?;
    set_up_session(&client, side).await?;
    Ok(client)
}

/// A connection with no session set-up (no SET, no query): what a server that only speaks
/// the simple query protocol and knows no settings, PgBouncer's admin console, accepts.
pub async fn connect_bare(info: &ConnInfo, side: Side, purpose: &str) -> Result<Client> {
    let tls = info.tls_connector()?;
    let config = info.tokio_config("pgtide");
    // connect_timeout bounds the whole connection set-up (as in libpq), not only the TCP
    // connect: a server that accepts but never answers must not hang pgtide.
    let connecting = config.connect(tls);
    let connected = match info.connect_timeout {
        Some(limit) => tokio::time::timeout(limit, connecting).await.map_err(|_| {
            anyhow::Error::new(Disconnected(format!(
                "cannot connect to the {} server at {}: no answer within connect_timeout ({} s). Check that the host and port are those of a PostgreSQL server and that it is not overloaded, or raise connect_timeout.",
                side.name(),
                info.endpoint(),
                limit.as_secs()
            )))
        })?,
        None => connecting.await,
    };
    // The explanation is text: its class (a restarting server is transient, a wrong
    // password is not) travels with it for the retry loops.
    let (client, connection) = connected.map_err(|e| {
        anyhow::Error::new(Classified::pg(
            &e,
            classify_connect(&e),
            format!("{:#}", explain_connect_error(info, side, &e)),
        ))
    })?;
    let label = format!("{} {purpose}", side.name());
    tokio::spawn(drive_connection(connection, label));
    Ok(client)
}

/// The session settings of every pgtide connection (invariant 5).
async fn set_up_session(client: &Client, side: Side) -> Result<()> {
    // `default_transaction_read_only = off`: a cutover's fence makes pgtide's own role
    // read-only too (an application may log in as it); pgtide's own sessions stay writable.
    client
        .batch_execute(
            "SET default_transaction_read_only = off; \
             SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; \
             SET bytea_output = 'hex'; SET extra_float_digits = 1; SET statement_timeout = 0; \
             SET lock_timeout = 0; SET idle_in_transaction_session_timeout = 0; \
             SELECT set_config('idle_session_timeout', '0', false) \
             WHERE current_setting('server_version_num')::int >= 140000",
        )
        .await
        .map_err(|e| {
            anyhow!(
                "cannot set up the {} session: {}",
                side.name(),
                describe(&e)
            )
        })?;
    if side == Side::Source {
        pin_search_path(client).await?;
    }
    Ok(())
}

/// Sets an empty search_path for the session. Definitions that pgtide reads
/// (`pg_get_indexdef`, `pg_get_constraintdef`, `pg_get_expr`, `format_type`, regclass text)
/// name an object without its schema when the session's search_path finds it: under the
/// source database's own search_path (`ALTER DATABASE … SET search_path = public, s`) an index
/// on `s.state` would read `'new'::state`, which fails on the target. With nothing on the path
/// every name comes out schema-qualified, as pg_dump does it. Every source session gets it;
/// a target session that reads definitions to compare them with the source's needs it too.
pub async fn pin_search_path(client: &Client) -> Result<()> {
    client
        .batch_execute("SET search_path = ''")
        .await
        .map_err(|e| anyhow!("cannot set an empty search_path: {}", describe(&e)))
}

/// The server's major version (`server_version_num` / 10000): what pg_dump must match and
/// what decides the catalogs verify reads.
pub async fn server_major(client: &Client) -> Result<u32> {
    Ok(ServerVersion::of(client).await?.major())
}

/// Server notices received on pgtide's connections, for the count at the end of a run.
static NOTICES: AtomicU64 = AtomicU64::new(0);

/// Drives a connection until it ends. Its notices (a trigger or a function may send thousands,
/// each up to the server's message size) are logged at debug level under the target
/// `pgtide::notice`, shortened, and counted; tokio-postgres alone would log each one whole at
/// INFO.
async fn drive_connection<S, T>(mut connection: tokio_postgres::Connection<S, T>, label: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    const SHOWN: usize = 500;
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notice(notice))) => {
                NOTICES.fetch_add(1, Ordering::Relaxed);
                let message = notice.message();
                let shown = match message.char_indices().nth(SHOWN) {
                    Some((end, _)) => format!("{}… ({} bytes)", &message[..end], message.len()),
                    None => message.to_string(),
                };
                tracing::debug!(target: "pgtide::notice", "{label}: {}: {shown}", notice.severity());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!("{label} connection ended: {e}");
                return;
            }
            None => return,
        }
    }
}

/// Logs how many notices the servers sent during this run, if any, and how to see them.
pub fn log_notice_count() {
    let n = NOTICES.load(Ordering::Relaxed);
    if n > 0 {
        tracing::info!(
            "{n} server notices received (not shown; PGTIDE_LOG=info,pgtide::notice=debug shows them)"
        );
    }
}

/// A one-paragraph explanation for a failed connection: what happened and what to do.
pub fn explain_connect_error(
    info: &ConnInfo,
    side: Side,
    err: &tokio_postgres::Error,
) -> anyhow::Error {
    let side = side.name();
    let endpoint = info.endpoint();
    if let Some(db) = err.as_db_error() {
        let code = db.code();
        let msg = db.message();
        if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            return anyhow!(
                "cannot log in to the {side} server at {endpoint} as user \"{}\": {msg}. Check the password (in the connection string, PGPASSWORD or ~/.pgpass) and the server's pg_hba.conf.",
                info.user
            );
        }
        if *code == SqlState::INVALID_CATALOG_NAME {
            return anyhow!(
                "the {side} database \"{}\" does not exist on {endpoint}: {msg}. Fix the database name in the connection string, or create it (createdb).",
                info.dbname
            );
        }
        if *code == SqlState::TOO_MANY_CONNECTIONS {
            return anyhow!(
                "the {side} server at {endpoint} refused the connection: {msg}. Lower --table-jobs / --index-jobs or raise max_connections."
            );
        }
        return anyhow!(
            "cannot connect to the {side} server at {endpoint}: {msg} (SQLSTATE {})",
            code.code()
        );
    }
    let text = err.to_string();
    let source_text = std::error::Error::source(err)
        .map(|s| s.to_string())
        .unwrap_or_default();
    let detail = if source_text.is_empty() {
        text.clone()
    } else {
        format!("{text}: {source_text}")
    };
    let lower = detail.to_lowercase();
    if lower.contains("password missing") {
        return anyhow!(
            "cannot log in to the {side} server at {endpoint} as user \"{}\": the server asks for a password and none was found. Put it in the connection string, PGPASSWORD or ~/.pgpass (mode 0600).",
            info.user
        );
    }
    let hint = if lower.contains("refused") || lower.contains("no such file") {
        "Is PostgreSQL running there and listening on that address and port? Check host and port in the connection string."
    } else if lower.contains("timed out") || lower.contains("timeout") {
        "The server did not answer in time: check the host, port and firewall, or raise connect_timeout."
    } else if lower.contains("lookup")
        || lower.contains("resolve")
        || lower.contains("name or service")
        || lower.contains("no address")
    {
        "The host name does not resolve: check the host in the connection string."
    } else if lower.contains("tls") || lower.contains("certificate") || lower.contains("ssl") {
        "TLS failed: check sslmode and sslrootcert (the CA that signed the server certificate, and for verify-full the host name it names)."
    } else {
        "Check the connection string and that the server accepts connections from this machine."
    };
    anyhow!(
        "cannot connect to the {side} server at {endpoint} (database \"{}\", user \"{}\"): {detail}. {hint}",
        info.dbname,
        info.user
    )
}

/// The server's message with detail and hint, for errors from statements.
pub fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; detail: {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => {
            let mut s = err.to_string();
            if let Some(src) = std::error::Error::source(err) {
                s.push_str(&format!(": {src}"));
            }
            s
        }
    }
}

/// Quotes an SQL identifier the way `quote_ident` does.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `"schema"."name"`.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// The server's WAL insert position: it covers every commit already visible, asynchronous
/// commits included (cutover's endpos, a table sync's removal point).
pub async fn current_insert_lsn(client: &Client, side: Side) -> Result<Lsn> {
    let text: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(|e| {
            anyhow!(
                "cannot read the {}'s WAL position: {}",
                side.name(),
                describe(&e)
            )
        })?
        .get(0);
    text.parse().map_err(|e: String| anyhow!(e))
}

/// Quotes an SQL string literal.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A deadlock (SQLSTATE 40P01) anywhere in the error, from a server error or from a client
/// tool's message: transient, the statement can run again.
pub fn is_deadlock(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<tokio_postgres::Error>()
            .and_then(tokio_postgres::Error::code)
            .is_some_and(|code| *code == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED)
    }) || format!("{e:#}").contains("deadlock detected")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(qualified("Sch", "t"), "\"Sch\".\"t\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
