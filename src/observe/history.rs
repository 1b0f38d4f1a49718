//! The migration's time series: the running process records, every few seconds, what status
//! says (lag in bytes and seconds, apply rate, the WAL the slot keeps against its limit, the
//! spool's size, copy progress) in state.db, so that the dashboard and `/api/history` show
//! trends, also after a restart. Bounded: points older than an hour are thinned to one a
//! minute, older than a day to one every ten minutes, and kept for the migration's life.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use super::status::{self, Servers, Status};
use crate::state::{HistoryPoint, StateDb};

/// How often a point is recorded.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// The point `status` makes at `at`.
pub fn point(s: &Status, at: f64) -> HistoryPoint {
    let signed = |v: Option<u64>| v.map(|v| v as i64);
    HistoryPoint {
        at,
        phase: s.phase.to_string(),
        lag_bytes: signed(s.lag_bytes),
        lag_seconds: s.lag_seconds,
        apply_changes_per_second: s.apply_changes_per_second,
        retained_wal_bytes: signed(s.slot_retained_bytes),
        wal_limit_bytes: s.slot_wal_limit_bytes.filter(|limit| *limit >= 0),
        spool_bytes: signed(s.spool_bytes),
        bytes_copied: s.bytes_copied as i64,
        bytes_total: s.bytes_total as i64,
    }
}

/// The trend over `window` in two lines (`status --since`).
pub fn trend(points: &[HistoryPoint], window: Duration) -> String {
    let over = humantime::format_duration(window);
    if points.is_empty() {
        return format!(
            "trend over {over}: nothing recorded (a running clone or follow records a point every {} s)\n",
            INTERVAL.as_secs()
        );
    }
    let max_by = |f: &dyn Fn(&HistoryPoint) -> Option<f64>| {
        points.iter().filter_map(|p| f(p).map(|v| (v, p.at))).fold(
            None,
            |best: Option<(f64, f64)>, (v, at)| match best {
                Some((b, _)) if b >= v => best,
                _ => Some((v, at)),
            },
        )
    };
    let ago = |at: f64| crate::observe::status::human_seconds((crate::state::now() - at).max(0.0));
    let lag = max_by(&|p| p.lag_seconds);
    let lag_bytes = max_by(&|p| p.lag_bytes.map(|b| b as f64));
    let rates: Vec<f64> = points
        .iter()
        .filter_map(|p| p.apply_changes_per_second)
        .collect();
    let wal = max_by(&|p| p.retained_wal_bytes.map(|b| b as f64));
    let spool = max_by(&|p| p.spool_bytes.map(|b| b as f64));
    let bytes = |v: Option<(f64, f64)>| {
        v.map_or("–".to_string(), |(b, at)| {
            format!("{} ({} ago)", crate::units::human_bytes(b as u64), ago(at))
        })
    };
    format!(
        "trend over {over} ({} points): lag at most {}, behind at most {}; apply {}\n  WAL kept by the slot at most {}; spool at most {}\n",
        points.len(),
        lag.map_or("–".to_string(), |(s, at)| format!(
            "{s:.1} s ({} ago)",
            ago(at)
        )),
        bytes(lag_bytes),
        if rates.is_empty() {
            "–".to_string()
        } else {
            format!(
                "{:.0} changes/s on average, {:.0} at most",
                rates.iter().sum::<f64>() / rates.len() as f64,
                rates.iter().cloned().fold(0.0, f64::max)
            )
        },
        bytes(wal),
        bytes(spool)
    )
}

/// Thins the old points (see the module doc).
pub fn downsample(state: &StateDb, now: f64) -> Result<()> {
    state.downsample_history(now - 3600.0, 60.0)?;
    state.downsample_history(now - 86_400.0, 600.0)?;
    Ok(())
}

/// Records one point of `dir`'s migration at `now`, and on `thin` thins the old ones (a
/// status that cannot be collected is skipped: the next tick comes).
async fn record(dir: &std::path::Path, state: &StateDb, servers: &Servers, now: f64, thin: bool) {
    match status::collect(dir, state, servers).await {
        Ok(s) => {
            if let Err(e) = state.record_history(&point(&s, now)) {
                tracing::debug!("history of {}: cannot record a point: {e:#}", dir.display());
            }
        }
        Err(e) => tracing::debug!("history of {}: no status to record: {e:#}", dir.display()),
    }
    if thin && let Err(e) = downsample(state, now) {
        tracing::debug!(
            "history of {}: cannot thin the old points: {e:#}",
            dir.display()
        );
    }
}

/// Records a point every `INTERVAL` for as long as the process runs, thinning the old ones
/// every 60 ticks (the first included: a process restarted often still thins).
pub fn start_recorder(dir: PathBuf, state: StateDb, servers: Servers) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        for recorded in 0u64.. {
            tick.tick().await;
            record(
                &dir,
                &state,
                &servers,
                crate::state::now(),
                recorded.is_multiple_of(60),
            )
            .await;
        }
    });
}

/// The same for a whole-server run: every tick, one point in each database's own state.db
/// (the databases whose pipeline has started), all at the same instant.
pub fn start_server_recorder(dir: PathBuf, servers: Servers) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        for recorded in 0u64.. {
            tick.tick().await;
            let now = crate::state::now();
            // Not before the run has created its work dir.
            let databases = if dir.join("state.db").exists() {
                crate::server::databases_of(&dir).unwrap_or_default()
            } else {
                Vec::new()
            };
            for (db, sub) in databases {
                if !sub.join("state.db").exists() {
                    continue;
                }
                let Ok(state) = StateDb::open_in_dir(&sub) else {
                    continue;
                };
                let in_db = |info: &Option<crate::conninfo::ConnInfo>| {
                    info.as_ref()
                        .map(|i| crate::server::in_database(i, &db.name))
                };
                let servers =
                    Servers::from_state(&state, in_db(&servers.source), in_db(&servers.target));
                record(&sub, &state, &servers, now, recorded.is_multiple_of(60)).await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_points_are_thinned_and_recent_ones_kept() {
        let dir = std::env::temp_dir().join(format!("pgtide-history-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = StateDb::open(&dir.join("state.db")).unwrap();
        let now = 1_000_800.0;
        // Two hours of points every 5 s.
        for i in 0..1440 {
            let at = now - 7200.0 + f64::from(i) * 5.0;
            let mut p = point(&Status::default(), at);
            p.lag_bytes = Some(i64::from(i));
            state.record_history(&p).unwrap();
        }
        downsample(&state, now).unwrap();
        let left = state.history_since(0.0).unwrap();
        let old = left.iter().filter(|p| p.at < now - 3600.0).count();
        let recent = left.iter().filter(|p| p.at >= now - 3600.0).count();
        assert_eq!(old, 60, "one point a minute beyond the hour");
        assert_eq!(recent, 720, "every point of the last hour");
        assert!(left.windows(2).all(|w| w[0].at < w[1].at));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
