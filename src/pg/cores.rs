//! How many sessions two servers can run at full speed at the same time, measured over SQL.
//!
//! The copy's split policy needs the cores the servers really have, and PostgreSQL reports no
//! server's core count. A hardware count would be wrong anyway under a container's CPU quota,
//! on a host shared with other work, or when source and target share one machine (a copy
//! stream keeps a backend busy on each side). So a CPU-bound query (no I/O, no locks, no
//! parallel workers, no JIT) is timed in one session on each server, then in 2, 4, …
//! concurrent sessions on each at once, until throughput stops growing. Both servers are
//! loaded together, as a copy loads them: two servers on one host each see half of it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio_postgres::Client;

use super::{Side, connect};
use crate::conninfo::ConnInfo;

/// Wall time aimed at for one probe query alone: long enough that connection and scheduling
/// noise is small against it, short enough that the whole probe stays under about a second
/// on the cores it finds.
const QUERY_TARGET: Duration = Duration::from_millis(80);

/// A level counts as scaling when throughput grew by at least this share of the sessions
/// added; below it the cores are taken as used up and the probe stops.
const SCALING: f64 = 0.75;

/// What the probe found: per server, the speedup of its best level over one session.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Parallelism {
    pub source: f64,
    pub target: f64,
    /// The most sessions run at once on each server.
    pub sessions_tried: usize,
}

impl Parallelism {
    /// Sessions the copy can run at full speed: the lower of the two servers' speedups,
    /// rounded, and at least one.
    pub fn streams(&self) -> usize {
        self.source.min(self.target).round().max(1.0) as usize
    }
}

/// One server's sessions for the probe, with the query size calibrated for it.
struct ProbeSide {
    side: Side,
    info: ConnInfo,
    sessions: Vec<Client>,
    rows: u64,
    alone: Duration,
}

/// Measures both servers together with up to `max_sessions` sessions on each (the copy never
/// runs more streams than that, so more cores would change nothing).
pub async fn measure(
    source: &ConnInfo,
    target: &ConnInfo,
    max_sessions: usize,
) -> Result<Parallelism> {
    let max_sessions = max_sessions.max(1);
    let mut sides = Vec::new();
    for (info, side) in [(source, Side::Source), (target, Side::Target)] {
        let first = open_session(info, side).await?;
        let rows = calibrate(&first, side).await?;
        sides.push(ProbeSide {
            side,
            info: info.clone(),
            sessions: vec![first],
            rows,
            alone: Duration::ZERO,
        });
    }
    // One session on each server at once: the baseline every level is compared with.
    let baseline = run_level(&mut sides, 1).await?;
    for (side, elapsed) in sides.iter_mut().zip(baseline) {
        side.alone = elapsed;
    }
    let mut best = [1.0_f64, 1.0_f64];
    let mut sessions_tried = 1;
    let mut level = 1;
    while level < max_sessions {
        let previous = level;
        level = (level * 2).min(max_sessions);
        let elapsed = match run_level(&mut sides, level).await {
            Ok(elapsed) => elapsed,
            // A server that takes no more sessions (max_connections) caps what the copy could
            // use as well: what was measured so far stands.
            Err(e) => {
                tracing::info!("core probe stopped at {level} sessions: {e:#}");
                break;
            }
        };
        sessions_tried = level;
        let mut scaling = false;
        for (i, (side, took)) in sides.iter().zip(elapsed).enumerate() {
            let speedup = level as f64 * side.alone.as_secs_f64() / took.as_secs_f64().max(1e-6);
            // Going on pays only while the sessions added ran at most at a quarter below full
            // speed; a server already saturated cannot scale at a higher level either.
            if speedup >= best[i] + SCALING * (level - previous) as f64 {
                scaling = true;
            }
            best[i] = best[i].max(speedup);
        }
        if !scaling {
            break;
        }
    }
    Ok(Parallelism {
        source: best[0],
        target: best[1],
        sessions_tried,
    })
}

async fn open_session(info: &ConnInfo, side: Side) -> Result<Client> {
    let client = connect(info, side, "core probe").await?;
    client
        .batch_execute("SET jit = off; SET max_parallel_workers_per_gather = 0")
        .await
        .with_context(|| format!("cannot set up the {} core probe session", side.name()))?;
    Ok(client)
}

/// The number of rows whose count takes about QUERY_TARGET on this server alone.
async fn calibrate(client: &Client, side: Side) -> Result<u64> {
    let mut rows: u64 = 100_000;
    loop {
        let took = time_query(client, rows, side).await?;
        if took >= QUERY_TARGET / 4 || rows >= 1 << 30 {
            let scale = QUERY_TARGET.as_secs_f64() / took.as_secs_f64().max(1e-6);
            return Ok(((rows as f64 * scale) as u64).clamp(10_000, 1 << 30));
        }
        rows *= 4;
    }
}

/// Runs `level` sessions on every server at once (twice, keeping each server's faster round
/// against noise); returns each server's wall time for its slowest session.
async fn run_level(sides: &mut [ProbeSide], level: usize) -> Result<Vec<Duration>> {
    for side in sides.iter_mut() {
        while side.sessions.len() < level {
            let client = open_session(&side.info, side.side).await?;
            side.sessions.push(client);
        }
    }
    let mut best = vec![Duration::MAX; sides.len()];
    for _round in 0..2 {
        let mut queries = Vec::new();
        for (i, side) in sides.iter().enumerate() {
            for client in &side.sessions[..level] {
                queries.push(async move { (i, time_query(client, side.rows, side.side).await) });
            }
        }
        let mut slowest = vec![Duration::ZERO; sides.len()];
        for (i, took) in futures_util::future::join_all(queries).await {
            slowest[i] = slowest[i].max(took?);
        }
        for (b, s) in best.iter_mut().zip(slowest) {
            *b = (*b).min(s);
        }
    }
    Ok(best)
}

async fn time_query(client: &Client, rows: u64, side: Side) -> Result<Duration> {
    // A set-returning function in the target list is evaluated row by row (no tuplestore, no
    // temp files): pure CPU in the backend.
    let sql = format!("SELECT count(*) FROM (SELECT generate_series(1::bigint, {rows})) s");
    let started = Instant::now();
    client
        .simple_query(&sql)
        .await
        .with_context(|| format!("the core probe query failed on the {}", side.name()))?;
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::Parallelism;

    #[test]
    fn streams_round_the_lower_speedup() {
        let p = |source, target| Parallelism {
            source,
            target,
            sessions_tried: 4,
        };
        assert_eq!(p(3.9, 1.8).streams(), 2);
        assert_eq!(p(1.7, 1.8).streams(), 2);
        assert_eq!(p(1.4, 3.0).streams(), 1);
        assert_eq!(p(0.9, 3.0).streams(), 1);
        assert_eq!(p(7.8, 8.0).streams(), 8);
    }
}
