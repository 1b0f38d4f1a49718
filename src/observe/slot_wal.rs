//! What a slot costs the source (invariant 12): the WAL it retains (`pg_current_wal_lsn()` −
//! `restart_lsn`), `wal_status` and `safe_wal_size` (13+), against `max_slot_wal_keep_size`
//! (−1: unlimited), with the source's WAL rate measured here and the time until the limit at
//! that rate — how long pgtide may stay stopped before the source drops the slot. A lost or
//! invalidated slot is said with why and the way out. Shared by `status`, the Prometheus
//! metrics and `check`, so all three tell the same story.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use serde::Serialize;
use tokio_postgres::Client;

use crate::pg::Lsn;

/// The slot's WAL figures on the source; each is None where the server cannot say.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SlotWal {
    /// Whether the slot exists.
    pub exists: bool,
    pub retained_bytes: Option<u64>,
    /// `pg_replication_slots.wal_status` (13+): reserved, extended, unreserved or lost.
    pub wal_status: Option<String>,
    /// `pg_replication_slots.safe_wal_size` (13+, with a limit): WAL that can still be written
    /// before the slot is in danger.
    pub safe_wal_bytes: Option<i64>,
    /// Why the slot can no longer be used, when it cannot (see [`lost_reason`]).
    pub lost: Option<String>,
}

/// `max_slot_wal_keep_size` in bytes: −1 when unlimited, None before 13 (no such setting: a
/// slot retains WAL without limit).
pub async fn keep_limit(client: &Client) -> Result<Option<i64>> {
    let row = client
        .query_one(
            "SELECT (SELECT CASE WHEN setting::bigint < 0 THEN -1 ELSE setting::bigint * 1024 * 1024 END
                     FROM pg_settings WHERE name = 'max_slot_wal_keep_size')",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The last WAL position sampled by this process and the rate measured then, so that a
/// long-lived process (the metrics endpoint, `status --watch`) measures the rate between two
/// samples instead of waiting.
static LAST_SAMPLE: Mutex<Option<(Instant, Lsn, f64)>> = Mutex::new(None);

/// The source's WAL rate in bytes per second: between the last sample this process took
/// (when 1 s to 10 min old) and now; the rate measured then when the last sample is younger
/// than a second (`status --watch 300ms` does not wait for a second each time); or else over
/// half a second measured here.
pub async fn wal_rate(client: &Client) -> Result<f64> {
    let now = current_lsn(client).await?;
    let at = Instant::now();
    let previous = *LAST_SAMPLE.lock().unwrap_or_else(|e| e.into_inner());
    let rate = match previous {
        Some((t, l, _))
            if at.duration_since(t) >= Duration::from_secs(1)
                && at.duration_since(t) <= Duration::from_secs(600)
                && l <= now =>
        {
            now.0.saturating_sub(l.0) as f64 / at.duration_since(t).as_secs_f64()
        }
        Some((t, _, rate)) if at.duration_since(t) < Duration::from_secs(1) => return Ok(rate),
        _ => {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let later = current_lsn(client).await?;
            let rate = later.0.saturating_sub(now.0) as f64 / at.elapsed().as_secs_f64();
            *LAST_SAMPLE.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((Instant::now(), later, rate));
            return Ok(rate);
        }
    };
    *LAST_SAMPLE.lock().unwrap_or_else(|e| e.into_inner()) = Some((at, now, rate));
    Ok(rate)
}

async fn current_lsn(client: &Client) -> Result<Lsn> {
    let text: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    text.parse().map_err(|e: String| anyhow!(e))
}

/// The slot's figures, as the server's version can give them.
pub async fn ask(client: &Client, slot: &str) -> Result<SlotWal> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    // wal_status and safe_wal_size: 13+; conflicting: 16+; invalidation_reason: 17+.
    let columns = match version {
        v if v >= 170000 => "wal_status, safe_wal_size, invalidation_reason",
        v if v >= 160000 => {
            "wal_status, safe_wal_size, CASE WHEN conflicting THEN 'conflict with recovery' END"
        }
        v if v >= 130000 => "wal_status, safe_wal_size, NULL::text",
        _ => "NULL::text, NULL::bigint, NULL::text",
    };
    let rows = client
        .query(
            &format!(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, {columns}
                 FROM pg_replication_slots WHERE slot_name = $1"
            ),
            &[&slot],
        )
        .await?;
    let Some(row) = rows.first() else {
        return Ok(SlotWal::default());
    };
    let retained: Option<i64> = row.get(0);
    let wal_status: Option<String> = row.get(1);
    let invalidation: Option<String> = row.get(3);
    Ok(SlotWal {
        exists: true,
        retained_bytes: retained.map(|r| r.max(0) as u64),
        lost: lost_reason(wal_status.as_deref(), invalidation.as_deref()),
        wal_status,
        safe_wal_bytes: row.get(2),
    })
}

/// Why a slot is unusable, from its `wal_status` and invalidation reason; None when usable.
pub fn lost_reason(wal_status: Option<&str>, invalidation: Option<&str>) -> Option<String> {
    match (wal_status, invalidation) {
        (_, Some("rows_removed")) => Some(
            "invalidated: rows it needed were removed (a conflict with recovery on a standby)"
                .into(),
        ),
        (_, Some("wal_level_insufficient")) => {
            Some("invalidated: the primary's wal_level is no longer logical".into())
        }
        (_, Some("idle_timeout")) => {
            Some("invalidated: idle longer than idle_replication_slot_timeout".into())
        }
        (Some("lost"), _) | (_, Some("wal_removed")) => Some(
            "lost: the source removed WAL it still needed, because it retained more than max_slot_wal_keep_size while pgtide was behind or stopped".into(),
        ),
        (_, Some(other)) => Some(format!("invalidated ({other})")),
        _ => None,
    }
}

/// Seconds until the slot reaches the limit at `rate` bytes/s: from `safe_wal_size` when the
/// server gives it, else from the limit and the retained WAL. None when unlimited or unknown.
pub fn seconds_to_limit(wal: &SlotWal, limit: Option<i64>, rate: Option<f64>) -> Option<f64> {
    let limit = limit.filter(|l| *l >= 0)?;
    let rate = rate.filter(|r| *r > 0.0)?;
    let left = wal.safe_wal_bytes.or_else(|| {
        wal.retained_bytes
            .map(|r| limit.saturating_sub(r.min(i64::MAX as u64) as i64))
    })?;
    Some(left.max(0) as f64 / rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_slot_says_why() {
        assert_eq!(lost_reason(Some("reserved"), None), None);
        assert_eq!(lost_reason(None, None), None);
        let lost = lost_reason(Some("lost"), None).unwrap_or_default();
        assert!(lost.contains("max_slot_wal_keep_size"), "{lost}");
        let removed = lost_reason(Some("lost"), Some("wal_removed")).unwrap_or_default();
        assert!(removed.contains("max_slot_wal_keep_size"), "{removed}");
        let conflict = lost_reason(Some("lost"), Some("rows_removed")).unwrap_or_default();
        assert!(conflict.contains("conflict with recovery"), "{conflict}");
    }

    #[test]
    fn time_to_the_limit_needs_a_limit_and_a_rate() {
        let wal = SlotWal {
            exists: true,
            retained_bytes: Some(10),
            ..Default::default()
        };
        assert_eq!(seconds_to_limit(&wal, Some(-1), Some(5.0)), None);
        assert_eq!(seconds_to_limit(&wal, None, Some(5.0)), None);
        assert_eq!(seconds_to_limit(&wal, Some(110), Some(0.0)), None);
        assert_eq!(seconds_to_limit(&wal, Some(110), Some(5.0)), Some(20.0));
        let safe = SlotWal {
            safe_wal_bytes: Some(50),
            ..wal
        };
        assert_eq!(seconds_to_limit(&safe, Some(110), Some(5.0)), Some(10.0));
    }
}
