//! Prometheus metrics: `--metrics-addr HOST:PORT` on clone / follow serves the text exposition
//! format on `/metrics`. Every scrape builds a registry from `status::collect`, so the metrics
//! and `pgtide status` always say the same thing (positions, lag, rates, copy progress, phase).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::{Context, Result};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::status::{self, Servers, Status};
use crate::pg::Lsn;
use crate::state::StateDb;

/// What a scrape needs to build the status.
struct Source {
    dir: PathBuf,
    state: StateDb,
    servers: Servers,
}

/// Binds `addr` (an error names it, e.g. when the port is taken) and serves /metrics in the
/// background for as long as the process runs.
pub async fn serve(addr: &str, dir: PathBuf, state: StateDb, servers: Servers) -> Result<()> {
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("--metrics-addr {addr} is not HOST:PORT (e.g. 127.0.0.1:9187)"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {addr}: choose a free port"))?;
    let source = Arc::new(Source {
        dir,
        state,
        servers,
    });
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let source = source.clone();
            async move { scrape(&source.dir, &source.state, &source.servers).await }
        }),
    );
    tracing::info!("serving Prometheus metrics on http://{addr}/metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the metrics endpoint stopped: {e}");
        }
    });
    Ok(())
}

/// One scrape: the exposition of `status::collect`, or a comment saying why there is none.
pub async fn scrape(
    dir: &std::path::Path,
    state: &StateDb,
    servers: &Servers,
) -> (
    axum::http::StatusCode,
    [(axum::http::header::HeaderName, &'static str); 1],
    String,
) {
    let content_type = [(
        axum::http::header::CONTENT_TYPE,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )];
    match status::collect(dir, state, servers).await {
        Ok(status) => match exposition(&status) {
            Ok(text) => (axum::http::StatusCode::OK, content_type, text),
            Err(e) => (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                content_type,
                format!("# cannot encode the metrics: {e}\n"),
            ),
        },
        Err(e) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            content_type,
            format!("# cannot read the status: {e:#}\n"),
        ),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

/// The registry of one scrape, encoded.
pub fn exposition(s: &Status) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("pgtide");
    let mut int = |name: &str, help: &str, value: Option<u64>| {
        if let Some(v) = value {
            let g: Gauge<i64> = Gauge::default();
            g.set(v.min(i64::MAX as u64) as i64);
            registry.register(name, help, g);
        }
    };
    let lsn = |text: &Option<String>| -> Option<u64> {
        text.as_deref()
            .and_then(|t| t.parse::<Lsn>().ok())
            .map(|l| l.0)
    };
    int(
        "source_lsn",
        "Source WAL position (pg_current_wal_lsn) as a byte offset",
        lsn(&s.source_lsn),
    );
    int(
        "received_lsn",
        "End of the WAL received from the slot",
        lsn(&s.received_lsn),
    );
    int(
        "spooled_lsn",
        "End of the last commit durable in the spool (reported as flushed)",
        lsn(&s.spooled_lsn),
    );
    int(
        "applied_lsn",
        "End of the last commit durably applied on the target (reported as replayed)",
        lsn(&s.applied_lsn),
    );
    int("endpos_lsn", "The sentinel endpos", lsn(&s.endpos));
    int(
        "lag_bytes",
        "Source WAL not yet applied on the target",
        s.lag_bytes,
    );
    int(
        "tables_done",
        "Tables completely copied",
        Some(s.tables_done),
    );
    int("tables_total", "Tables to copy", Some(s.tables_total));
    int(
        "copied_bytes",
        "Bytes copied (COPY stream)",
        Some(s.bytes_copied),
    );
    int(
        "table_bytes",
        "On-disk size of the tables to copy",
        Some(s.bytes_total),
    );
    int("copied_rows", "Rows copied", Some(s.rows_copied));
    int(
        "indexes_done",
        "Indexes and constraints built",
        Some(s.indexes_done),
    );
    int(
        "indexes_total",
        "Indexes and constraints to build",
        Some(s.indexes_total),
    );
    int("spool_bytes", "Size of the spool on disk", s.spool_bytes);
    int(
        "slot_retained_bytes",
        "WAL the slot keeps on the source",
        s.slot_retained_bytes,
    );
    int(
        "slot_lost",
        "1 when the slot is lost or invalidated on the source (only a new clone helps)",
        s.slot.as_ref().map(|_| u64::from(s.slot_lost.is_some())),
    );
    int(
        "error",
        "1 when the migration stopped on an error",
        Some(u64::from(s.phase == crate::state::Phase::Failed)),
    );
    let mut float = |name: &str, help: &str, value: Option<f64>| {
        if let Some(v) = value {
            let g: Gauge<f64, AtomicU64> = Gauge::default();
            g.set(v);
            registry.register(name, help, g);
        }
    };
    float(
        "lag_seconds",
        "Age of the oldest spooled commit not yet applied (0 when caught up)",
        s.lag_seconds,
    );
    float(
        "apply_changes_per_second",
        "Row changes applied per second over the last minute",
        s.apply_changes_per_second,
    );
    float(
        "apply_transactions_per_second",
        "Source transactions applied per second over the last minute",
        s.apply_transactions_per_second,
    );
    float(
        "slot_wal_limit_bytes",
        "max_slot_wal_keep_size in bytes; -1 = unlimited (a stopped pgtide retains WAL until the disk fills)",
        s.slot_wal_limit_bytes.map(|l| l as f64),
    );
    float(
        "slot_safe_wal_bytes",
        "safe_wal_size: WAL the source may still write before the slot is in danger (13+)",
        s.slot_safe_wal_bytes.map(|l| l as f64),
    );
    float(
        "source_wal_bytes_per_second",
        "The source's WAL rate, measured between scrapes",
        s.source_wal_bytes_per_second,
    );
    float(
        "slot_seconds_to_limit",
        "At that rate, seconds until a stopped pgtide's slot reaches max_slot_wal_keep_size",
        s.slot_seconds_to_limit,
    );
    float(
        "phase_seconds",
        "Time in the current phase",
        s.phase_seconds,
    );
    let phase: Family<PhaseLabel, Gauge> = Family::default();
    phase
        .get_or_create(&PhaseLabel {
            phase: s.phase.as_str().to_string(),
        })
        .set(1);
    registry.register("phase", "The current phase (label), always 1", phase);
    let mut text = String::new();
    encode(&mut text, &registry)?;
    Ok(text)
}
