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

/// The page: markup, style and script in one file, no build step.
const DASHBOARD: &str = include_str!("dashboard.html");

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

/// Set once an action ran: its response may still be on its way out.
static ACTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Waits until no action asked over HTTP is running (and, after one, a moment for its
/// response to be written).
pub async fn wait_for_actions() {
    drop(actions().write().await);
    if ACTED.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
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
    let served = Arc::new(Served {
        dir,
        state,
        servers,
        token,
    });
    let app = axum::Router::new()
        .route("/", get(page))
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
    if !bound.ip().is_loopback() {
        tracing::warn!(
            "the dashboard listens on {bound}, beyond this machine: it is read-only and shows no password, but anyone who can reach it sees the migration's status"
        );
    }
    tracing::info!("dashboard on http://{bound}/ (API: /api/status, /api/history, /metrics)");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the dashboard stopped: {e}");
        }
    });
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
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
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
                let points = StateDb::open_in_dir(&dir)?.history_since(since)?;
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
    let _running = actions().read().await;
    ACTED.store(true, std::sync::atomic::Ordering::Relaxed);
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
