//! The HTTP side of a migration (`--http-addr` on clone / follow, and `pgtide serve` for a
//! work dir whose run has stopped): `/` the dashboard (one page served from the binary, no
//! CDN), `/api/status` (the `status --json` object), `/api/history?since=` (the recorded time
//! series, `history.rs`) and `/metrics` (Prometheus). Read-only unless started with a token
//! (`--http-token`): then `POST /api/verify`, `/api/endpos` and `/api/cutover` run the same
//! code as the CLI for a request that carries it (`Authorization: Bearer …`), and are logged.
//! It binds to localhost unless told otherwise, never serves a password or connection string,
//! and sends basic security headers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::status::{self, Servers};
use crate::state::StateDb;

/// The page (markup and style) and its script, served from the binary: no build step.
const DASHBOARD: &str = include_str!("dashboard.html");
const DASHBOARD_JS: &str = include_str!("dashboard.js");

/// What every request reads.
struct Served {
    dir: PathBuf,
    /// The work dir's state; None for a whole-server work dir (each database has its own).
    state: Option<StateDb>,
    servers: Servers,
    /// The token actions need; None: read-only.
    token: Option<String>,
}

impl Served {
    /// The one database's state (actions and metrics are for a one-database migration).
    fn one(&self) -> Result<&StateDb> {
        self.state.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "this is a whole-server work dir: use the CLI for it (pgtide verify / cutover --dir), or serve a database's own work dir"
            )
        })
    }
}

/// Held (shared) by every action while it runs: the process waits for them before it exits
/// (a cutover asked over HTTP outlives the follow it stops).
fn actions() -> &'static tokio::sync::RwLock<()> {
    static ACTIONS: std::sync::OnceLock<tokio::sync::RwLock<()>> = std::sync::OnceLock::new();
    ACTIONS.get_or_init(|| tokio::sync::RwLock::new(()))
}

/// Set when the process ends: a new action is refused (503) instead of being cut short.
static CLOSING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The running servers: how to stop each gracefully, and its task.
type Running = Vec<(
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
)>;

fn running() -> &'static std::sync::Mutex<Running> {
    static RUNNING: std::sync::OnceLock<std::sync::Mutex<Running>> = std::sync::OnceLock::new();
    RUNNING.get_or_init(|| std::sync::Mutex::new(Vec::new()))
}

/// At the end of the process: refuses new actions, waits for the running ones (a cutover
/// asked over HTTP outlives the follow it stops), then stops the servers gracefully, so that
/// the last responses are written before the process exits.
pub async fn wait_for_actions() {
    CLOSING.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(actions().write().await);
    let servers: Running = match running().lock() {
        Ok(mut running) => std::mem::take(&mut *running),
        Err(_) => Vec::new(),
    };
    for (stop, task) in servers {
        let _ = stop.send(());
        // Bounded: a browser's idle keep-alive connection must not hold the exit.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
    }
}

/// `HOST:PORT`, or `:PORT` / `PORT` for localhost.
pub fn parse_addr(addr: &str) -> Result<SocketAddr> {
    let full = if addr.starts_with(':') {
        format!("127.0.0.1{addr}")
    } else if addr.bytes().all(|b| b.is_ascii_digit()) {
        format!("127.0.0.1:{addr}")
    } else {
        addr.to_string()
    };
    full.parse().with_context(|| {
        format!("--http-addr {addr} is not HOST:PORT or PORT (e.g. 127.0.0.1:8080, or 8080 for localhost)")
    })
}

/// Binds `addr` and serves in the background for as long as the process runs; returns the
/// address bound (port 0 picks a free one).
pub async fn serve(
    addr: &str,
    dir: PathBuf,
    state: Option<StateDb>,
    servers: Servers,
    token: Option<String>,
) -> Result<SocketAddr> {
    let addr = parse_addr(addr)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on --http-addr {addr}: choose a free port"))?;
    let bound = listener.local_addr()?;
    if token.as_deref().is_some_and(|t| t.len() < 16) {
        anyhow::bail!(
            "--http-token must be at least 16 characters: it is all that guards the actions"
        );
    }
    let app_token = token.is_some();
    let served = Arc::new(Served {
        dir,
        state,
        servers,
        token,
    });
    let app = axum::Router::new()
        .route("/", get(page))
        .route("/dashboard.js", get(script))
        .route("/api/status", get(api_status))
        .route("/api/history", get(api_history))
        .route("/metrics", get(metrics))
        .route(
            "/api/verify",
            post(|s, h, q| action(Action::Verify, s, h, q)),
        )
        .route(
            "/api/endpos",
            post(|s, h, q| action(Action::Endpos, s, h, q)),
        )
        .route(
            "/api/cutover",
            post(|s, h, q| action(Action::Cutover, s, h, q)),
        )
        .with_state(served)
        .layer(axum::middleware::map_response(security_headers));
    let app = if bound.ip().is_loopback() {
        // DNS rebinding: a page elsewhere must not read the status through a name that
        // resolves here.
        app.layer(axum::middleware::from_fn(local_host_only))
    } else {
        tracing::warn!(
            "the dashboard listens on {bound}, beyond this machine, over plain HTTP: anyone who can reach it sees the migration's status{}",
            if app_token {
                ", and the --http-token travels in clear text: prefer a localhost address behind an SSH tunnel or a TLS proxy"
            } else {
                " (read-only: no token)"
            }
        );
        app
    };
    tracing::info!("dashboard on http://{bound}/ (API: /api/status, /api/history, /metrics)");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let graceful = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = stopped.await;
        });
        if let Err(e) = graceful.await {
            tracing::warn!("the dashboard stopped: {e}");
        }
    });
    if let Ok(mut running) = running().lock() {
        running.push((stop, task));
    }
    Ok(bound)
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Refuses a request whose `Host` is not this machine's (the server listens on loopback).
async fn local_host_only(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    if matches!(name, "localhost" | "127.0.0.1" | "::1") {
        next.run(request).await
    } else {
        refused(
            StatusCode::FORBIDDEN,
            "this dashboard answers requests for localhost only",
        )
    }
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        DASHBOARD_JS,
    )
        .into_response()
}

async fn page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        DASHBOARD,
    )
        .into_response()
}

fn json(value: Result<serde_json::Value>) -> Response {
    match value {
        Ok(v) => ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({ "error": format!("{e:#}") }).to_string(),
        )
            .into_response(),
    }
}

/// The `status --json` object, with its one-line verdict.
async fn api_status(State(served): State<Arc<Served>>) -> Response {
    json(
        async {
            let mut v = match &served.state {
                Some(state) => serde_json::to_value(
                    status::collect(&served.dir, state, &served.servers).await?,
                )?,
                None => {
                    let databases = crate::server::databases_of(&served.dir)?;
                    serde_json::to_value(
                        status::collect_server(&databases, &served.servers).await?,
                    )?
                }
            };
            v["now"] = serde_json::json!(crate::state::now());
            // An error or a captured statement may quote a secret of the user's (a
            // subscription's connection string, a user mapping's password).
            redact_tree(&mut v);
            Ok(v)
        }
        .await,
    )
}

#[derive(serde::Deserialize)]
struct Since {
    /// Unix seconds; a negative value counts back from now (`-3600`: the last hour).
    since: Option<f64>,
}

async fn api_history(State(served): State<Arc<Served>>, Query(q): Query<Since>) -> Response {
    let now = crate::state::now();
    let since = match q.since {
        Some(s) if s < 0.0 => now + s,
        Some(s) => s,
        None => now - 3600.0,
    };
    json(history(&served, since).map(|mut v| {
        v["now"] = serde_json::json!(now);
        v["since"] = serde_json::json!(since);
        v
    }))
}

/// `{points}` for one database, `{databases: [{database, points}]}` for a server.
fn history(served: &Served, since: f64) -> Result<serde_json::Value> {
    match &served.state {
        Some(state) => Ok(serde_json::json!({ "points": state.history_since(since)? })),
        None => {
            let mut databases = Vec::new();
            for (db, dir) in crate::server::databases_of(&served.dir)? {
                if !dir.join("state.db").exists() {
                    continue;
                }
                // One database's unreadable state does not hide the others'.
                let Ok(points) = StateDb::open_in_dir(&dir).and_then(|s| s.history_since(since))
                else {
                    continue;
                };
                databases.push(serde_json::json!({ "database": db.name, "points": points }));
            }
            Ok(serde_json::json!({ "databases": databases }))
        }
    }
}

async fn metrics(State(served): State<Arc<Served>>) -> Response {
    match &served.state {
        Some(state) => super::metrics::scrape(&served.dir, state, &served.servers)
            .await
            .into_response(),
        None => refused(
            StatusCode::NOT_IMPLEMENTED,
            "metrics for a whole server are not served yet: each database's work dir has them (pgtide serve --dir <dir>/databases/<oid>)",
        ),
    }
}

/// The actions the API offers (with a token).
#[derive(Clone, Copy, Debug)]
enum Action {
    Verify,
    Endpos,
    Cutover,
}

#[derive(serde::Deserialize, Default)]
struct ActionOptions {
    /// verify: counts only.
    counts_only: Option<bool>,
    /// cutover: fence the application roles first.
    fence: Option<bool>,
}

/// Compares without returning early on the first difference.
fn same_token(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn refused(status: StatusCode, why: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "error": why }).to_string(),
    )
        .into_response()
}

async fn action(
    kind: Action,
    State(served): State<Arc<Served>>,
    headers: axum::http::HeaderMap,
    Query(options): Query<ActionOptions>,
) -> Response {
    let Some(expected) = &served.token else {
        return refused(
            StatusCode::FORBIDDEN,
            "the dashboard is read-only: start pgtide with --http-token to allow actions",
        );
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !same_token(given, expected) {
        tracing::warn!("dashboard: {kind:?} refused (no or wrong token)");
        return refused(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token (Authorization: Bearer …)",
        );
    }
    let (Some(source), Some(target)) = (&served.servers.source, &served.servers.target) else {
        return refused(
            StatusCode::BAD_REQUEST,
            "this process does not know both servers: give --source and --target",
        );
    };
    // Only what changes the migration holds the exit (a verify is read-only and may be long:
    // Ctrl-C must not wait for it). Checked once the guard is held: the end may have begun.
    let _running = match kind {
        Action::Endpos | Action::Cutover => Some(actions().read().await),
        Action::Verify => None,
    };
    if CLOSING.load(std::sync::atomic::Ordering::SeqCst) {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "this pgtide is ending: run the action from the CLI, or against the next run",
        );
    }
    tracing::info!("dashboard: {kind:?} asked over HTTP");
    let result = match kind {
        Action::Verify => {
            verify(
                &served,
                source,
                target,
                options.counts_only.unwrap_or(false),
            )
            .await
        }
        Action::Endpos => endpos(&served, source).await,
        Action::Cutover => cutover(&served, source, target, options.fence.unwrap_or(false)).await,
    };
    match &result {
        Ok(_) => tracing::info!("dashboard: {kind:?} done"),
        Err(e) => tracing::warn!("dashboard: {kind:?} failed: {e:#}"),
    }
    json(result)
}

async fn verify(
    served: &Served,
    source: &crate::conninfo::ConnInfo,
    target: &crate::conninfo::ConnInfo,
    counts_only: bool,
) -> Result<serde_json::Value> {
    let opts = crate::verify::Options {
        filters: served.one()?.recorded_filters()?.unwrap_or_default(),
        counts_only,
        sequence_offset: served.one()?.sequence_offset()?,
    };
    let report = crate::verify::run(source, target, &opts).await?;
    Ok(serde_json::to_value(&report)?)
}

async fn endpos(served: &Served, source: &crate::conninfo::ConnInfo) -> Result<serde_json::Value> {
    let client = crate::pg::connect(source, crate::pg::Side::Source, "endpos").await?;
    let endpos = crate::pg::current_insert_lsn(&client, crate::pg::Side::Source).await?;
    crate::follow::set_endpos(served.one()?, endpos)?;
    Ok(serde_json::json!({ "endpos": endpos.to_string() }))
}

async fn cutover(
    served: &Served,
    source: &crate::conninfo::ConnInfo,
    target: &crate::conninfo::ConnInfo,
    fence: bool,
) -> Result<serde_json::Value> {
    let opts = crate::cutover::Options {
        dir: served.dir.clone(),
        fence,
        fence_roles: Vec::new(),
        timeout: std::time::Duration::from_secs(300),
        verify: crate::cutover::VerifyMode::Checksums,
        sequence_offset: served.one()?.sequence_offset()?,
        refresh_matviews: false,
        direction: crate::cutover::Direction::Forward,
        reverse: false,
        pgbouncer: None,
    };
    let report = crate::cutover::run(source, target, &opts).await?;
    Ok(serde_json::json!({
        "slot": report.slot,
        "endpos": report.switched.endpos.to_string(),
        "applied": report.switched.applied,
        "sequences": report.switched.sequences,
        "verdict": report.switched.verdict,
        "window_seconds": report.window.as_secs_f64(),
        "fenced": report.fenced,
    }))
}

/// Redacts every string of a JSON tree (see `redact_secrets`).
fn redact_tree(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(text) => *text = redact_secrets(text),
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_tree),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(redact_tree),
        _ => {}
    }
}

/// Hides what follows `password` (`password 'x'`, `password=x`) and the password of a URI
/// (`scheme://user:x@host`).
pub fn redact_secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let lower = text.to_ascii_lowercase();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < text.len() {
        if lower[i..].starts_with("password") {
            out.push_str(&text[i..i + 8]);
            i += 8;
            while i < text.len() && matches!(bytes[i], b' ' | b'=' | b':' | b'\t') {
                out.push(bytes[i] as char);
                i += 1;
            }
            if i < text.len() && bytes[i] == b'\'' {
                // A quoted literal ('' is a quote inside it).
                i += 1;
                while i < text.len() {
                    if bytes[i] == b'\'' {
                        if bytes.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            continue;
                        }
                        i += 1;
                        break;
                    }
                    i += 1;
                }
                out.push_str("'********'");
            } else {
                let start = i;
                while i < text.len()
                    && !matches!(bytes[i], b' ' | b'\'' | b'"' | b',' | b';' | b')' | b'\n')
                {
                    i += 1;
                }
                if i > start {
                    out.push_str("********");
                }
            }
            continue;
        }
        if lower[i..].starts_with("://") {
            out.push_str("://");
            i += 3;
            let rest = &text[i..];
            let end = rest.find(['/', ' ', '\'', '"']).unwrap_or(rest.len());
            if let Some(at) = rest[..end].rfind('@')
                && let Some(colon) = rest[..at].find(':')
            {
                out.push_str(&rest[..colon]);
                out.push_str(":********");
                i += at;
            }
            continue;
        }
        let c = text[i..].chars().next().unwrap_or(' ');
        out.push(c);
        i += c.len_utf8();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_statements_and_uris_are_hidden() {
        assert_eq!(
            redact_secrets(
                "CREATE USER MAPPING FOR u SERVER s OPTIONS (user 'a', password 'it''s secret')"
            ),
            "CREATE USER MAPPING FOR u SERVER s OPTIONS (user 'a', password '********')"
        );
        assert_eq!(
            redact_secrets("CONNECTION 'host=h password=hunter2 dbname=d'"),
            "CONNECTION 'host=h password=******** dbname=d'"
        );
        assert_eq!(
            redact_secrets("cannot reach postgres://app:hunter2@db:5432/x"),
            "cannot reach postgres://app:********@db:5432/x"
        );
        assert_eq!(redact_secrets("lag 0.2 s, ready"), "lag 0.2 s, ready");
        assert_eq!(redact_secrets("Passwörter: é"), "Passwörter: é");
    }
}
