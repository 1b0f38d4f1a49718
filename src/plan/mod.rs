//! `pgtide plan` (and `clone --dry-run`): what a clone would create and copy, read-only, with
//! an estimate of its time measured on this source and target, so that an operator can size
//! the window, the connections and the WAL the slot will keep before starting anything.
//!
//! The estimate comes from a measured sample (`sample.rs`: the largest tables' first rows
//! copied into a temporary table on the target the way the clone copies, their indexes built
//! on it, vacuumed) and from the cores both servers have for parallel streams (`pg::cores`);
//! the schema steps are counted at a fixed cost per database. Nothing is created on either
//! server but the sample's temporary table, which lives and dies with its session.

pub mod sample;

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::clone::{CloneOptions, SplitChoice};
use crate::pg::catalog::{self, SplitPolicy};
use crate::pg::{self, Side};
use crate::preflight::{CheckOptions, Finding, Level};
use crate::units::human_bytes;
use sample::TableSample;

/// The schema steps (pg_dump, pg_restore of pre- and post-data, sequences) of one database,
/// counted, not measured.
const SCHEMA_SECONDS_PER_DATABASE: f64 = 1.5;

/// What to plan.
pub struct PlanOptions {
    /// The clone as it would run (its source and target, jobs, split and filters).
    pub clone: CloneOptions,
    /// A whole-server run: the databases it selects (None: the one database of the URIs).
    pub server: Option<crate::server::databases::Selection>,
    /// The preflight of the run (its source, target and dir are set per database).
    pub preflight: CheckOptions,
    /// `--follow`: slots, receivers and the WAL the slots keep during the copy.
    pub online: bool,
}

/// The plan, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Plan {
    pub source: String,
    pub target: String,
    pub databases: Vec<DatabasePlan>,
    /// Roles a whole-server run would copy first.
    pub roles_to_copy: Option<usize>,
    pub connections: Connections,
    /// Copy streams at once (the lower of --table-jobs and the measured cores).
    pub copy_streams: usize,
    /// The servers' measured speedup with parallel sessions (None: one job, nothing to measure).
    pub measured_source_speedup: Option<f64>,
    pub measured_target_speedup: Option<f64>,
    pub samples: Vec<TableSample>,
    pub estimate: Estimate,
    pub wal: WalEstimate,
}

/// One database of the plan.
#[derive(Debug, Serialize)]
pub struct DatabasePlan {
    pub name: String,
    /// A whole-server run creates it on the target (it is not there yet).
    pub create_on_target: bool,
    pub tables: Vec<TablePlan>,
    pub indexes: usize,
    pub index_bytes: i64,
    pub sequences: usize,
    pub large_objects: usize,
    pub bytes: i64,
    /// The preflight's findings that are not OK.
    pub findings: Vec<Finding>,
    pub findings_ok: usize,
}

/// One table.
#[derive(Debug, Serialize)]
pub struct TablePlan {
    pub table: String,
    pub heap_bytes: i64,
    pub toast_bytes: i64,
    pub rows: i64,
    pub parts: usize,
    /// False: its schema is created, its rows are not copied (exclude-table-data).
    pub copy_data: bool,
    pub indexes: usize,
}

/// Connections the run opens at most on each side.
#[derive(Debug, Serialize)]
pub struct Connections {
    pub source: usize,
    pub source_max_connections: Option<i64>,
    pub target: usize,
    pub target_max_connections: Option<i64>,
}

/// The time estimate and its parts.
#[derive(Debug, Serialize)]
pub struct Estimate {
    pub seconds: f64,
    pub copy_seconds: f64,
    pub index_seconds: f64,
    pub vacuum_seconds: f64,
    pub schema_seconds: f64,
    /// How it was made, in words.
    pub basis: String,
}

/// The WAL the source keeps for the slots while the copy runs.
#[derive(Debug, Serialize)]
pub struct WalEstimate {
    pub source_wal_bytes_per_second: Option<f64>,
    pub retained_bytes: Option<u64>,
    /// max_slot_wal_keep_size in bytes (-1: unlimited; None: before 13).
    pub max_slot_wal_keep_size: Option<i64>,
    /// Free space where the spool would grow (the work dir's file system).
    pub spool_free_bytes: Option<u64>,
    pub verdict: String,
}

/// Builds the plan (see the module doc). Read-only on both servers.
pub async fn plan(opts: &PlanOptions) -> Result<Plan> {
    let src_admin = pg::connect(&opts.clone.source, Side::Source, "plan").await?;
    let dst_admin = pg::connect(&opts.clone.target, Side::Target, "plan").await?;
    let (names, roles_to_copy) = match &opts.server {
        Some(selection) => {
            let chosen = crate::server::databases::select(&src_admin, selection).await?;
            let roles: i64 = src_admin
                .query_one("SELECT count(*) FROM pg_roles WHERE rolname !~ '^pg_'", &[])
                .await?
                .get(0);
            (
                chosen.into_iter().map(|d| d.name).collect::<Vec<_>>(),
                Some(roles as usize),
            )
        }
        None => (vec![opts.clone.source.dbname.clone()], None),
    };
    let source_major = pg::server_major(&src_admin).await?;

    // The cores both servers have for parallel streams, measured once for the run.
    let parallelism = if opts.clone.table_jobs >= 2 {
        match opts.clone.split {
            SplitChoice::Auto {
                copy_cores: Some(_),
            } => None,
            _ => Some(
                crate::pg::cores::measure(
                    &opts.clone.source,
                    &opts.clone.target,
                    opts.clone.table_jobs,
                )
                .await?,
            ),
        }
    } else {
        None
    };
    let copy_cores = match opts.clone.split {
        SplitChoice::Auto {
            copy_cores: Some(cores),
        } => cores,
        _ => parallelism.map_or(1, |p| p.streams()),
    };
    let streams = copy_cores.min(opts.clone.table_jobs).max(1);

    let mut databases = Vec::new();
    let mut samples = Vec::new();
    let mut work = Work::default();
    let sampling_started = Instant::now();
    for name in &names {
        // One database: the URIs' own; a whole server: each database by its source name.
        let (source, target) = match opts.server {
            Some(_) => (
                crate::server::in_database(&opts.clone.source, name),
                crate::server::in_database(&opts.clone.target, name),
            ),
            None => (opts.clone.source.clone(), opts.clone.target.clone()),
        };
        let exists_on_target = crate::server::databases::exists(&dst_admin, &target.dbname).await?;
        let src = pg::connect(&source, Side::Source, "plan").await?;
        // The split the clone would choose, with the cores measured above.
        let split_opts = CloneOptions {
            source: source.clone(),
            target: target.clone(),
            split: match opts.clone.split {
                SplitChoice::Auto { .. } => SplitChoice::Auto {
                    copy_cores: Some(copy_cores),
                },
                fixed => fixed,
            },
            ..opts.clone.clone()
        };
        let listed = catalog::read_catalog(&src, &opts.clone.filters, SplitPolicy::Never).await?;
        let policy = crate::clone::split_policy(&split_opts, &listed.tables, source_major).await?;
        let parts = catalog::plan_parts(&listed.tables, policy);
        let index_bytes: i64 = src
            .query_one(
                "SELECT coalesce(sum(pg_relation_size(indexrelid)), 0)::bigint FROM pg_index WHERE indrelid = ANY($1)",
                &[&listed.tables.iter().map(|t| t.oid).collect::<Vec<u32>>()],
            )
            .await?
            .get(0);
        let mut tables: Vec<TablePlan> = listed
            .tables
            .iter()
            .map(|t| TablePlan {
                table: t.display_name(),
                heap_bytes: t.heap_bytes,
                toast_bytes: t.toast_bytes,
                rows: t.est_rows,
                parts: parts.iter().filter(|p| p.table_oid == t.oid).count().max(1),
                copy_data: t.copy_data,
                indexes: listed
                    .indexes
                    .iter()
                    .filter(|i| i.table_oid == t.oid)
                    .count(),
            })
            .collect();
        tables.sort_by_key(|t| std::cmp::Reverse(t.heap_bytes + t.toast_bytes));

        // The sample: this database's largest tables with rows, while the budget lasts (the
        // first database's largest table is always sampled).
        let dst = if exists_on_target {
            Some(pg::connect(&target, Side::Target, "plan").await?)
        } else {
            None
        };
        let sample_on = match &dst {
            Some(dst) => dst,
            None => &dst_admin,
        };
        // The copy sessions' own settings: TOAST compression (lz4 where the target has it:
        // several times faster than pglz on TOAST-heavy rows) and asynchronous commit.
        let compression =
            crate::clone::toast::copy_session_setting(sample_on, opts.clone.toast_compression)
                .await?;
        sample_on
            .batch_execute(&format!(
                "SET synchronous_commit = off; {}",
                compression.as_deref().unwrap_or("")
            ))
            .await?;

        let mut by_size: Vec<&catalog::TableRow> = listed
            .tables
            .iter()
            .filter(|t| t.copy_data && t.est_rows > 0)
            .collect();
        by_size.sort_by_key(|t| std::cmp::Reverse(t.total_bytes()));
        for table in by_size.iter().take(3) {
            if !samples.is_empty() && sampling_started.elapsed() > sample::SAMPLE_BUDGET {
                break;
            }
            let indexes: Vec<&catalog::IndexRow> = listed
                .indexes
                .iter()
                .filter(|i| i.table_oid == table.oid)
                .collect();
            let taken = sample::sample_table(&src, sample_on, table, &indexes).await?;
            work.sampled.push((table.oid, name.clone(), taken.clone()));
            samples.push(taken);
        }
        for table in listed.tables.iter().filter(|t| t.copy_data) {
            let parts = parts
                .iter()
                .filter(|p| p.table_oid == table.oid)
                .count()
                .max(1);
            work.tables.push(TableWork {
                oid: table.oid,
                database: name.clone(),
                bytes: table.total_bytes() as f64,
                parts,
                indexes: listed
                    .indexes
                    .iter()
                    .filter(|i| i.table_oid == table.oid)
                    .count(),
            });
        }

        let mut check = opts.preflight.clone();
        check.source = source.clone();
        check.target = Some(target.clone());
        let findings = if exists_on_target {
            crate::preflight::run(&check).await
        } else {
            // The database is created by the run: only the source's findings apply now.
            check.target = None;
            crate::preflight::run(&check).await
        };
        let findings_ok = findings.iter().filter(|f| f.level == Level::Ok).count();
        databases.push(DatabasePlan {
            name: name.clone(),
            create_on_target: opts.server.is_some() && !exists_on_target,
            bytes: tables.iter().map(|t| t.heap_bytes + t.toast_bytes).sum(),
            indexes: listed.indexes.len(),
            index_bytes,
            sequences: listed.sequences.len(),
            large_objects: listed.large_objects.len(),
            tables,
            findings: findings
                .into_iter()
                .filter(|f| f.level != Level::Ok)
                .collect(),
            findings_ok,
        });
    }

    let estimate = work.estimate(streams, names.len());
    let connections = connections(opts, &src_admin, &dst_admin, names.len(), streams).await?;
    let wal = wal_estimate(
        &src_admin,
        &opts.preflight.dir,
        estimate.seconds,
        opts.online,
    )
    .await;
    Ok(Plan {
        source: opts.clone.source.endpoint(),
        target: opts.clone.target.endpoint(),
        databases,
        roles_to_copy,
        connections,
        copy_streams: streams,
        measured_source_speedup: parallelism.map(|p| p.source),
        measured_target_speedup: parallelism.map(|p| p.target),
        samples,
        estimate,
        wal,
    })
}

/// The copy work of the plan, table by table, and the samples measured.
#[derive(Default)]
struct Work {
    tables: Vec<TableWork>,
    /// (table oid, database, sample)
    sampled: Vec<(u32, String, TableSample)>,
}

struct TableWork {
    oid: u32,
    database: String,
    bytes: f64,
    parts: usize,
    indexes: usize,
}

impl Work {
    /// The time of the copy, index builds and vacuums: each table at its own sampled rates
    /// (others at the samples' overall rates), the work spread over the copy streams, and never
    /// less than the largest table's copy on its own parts.
    fn estimate(&self, streams: usize, databases: usize) -> Estimate {
        let sum = |f: &dyn Fn(&TableSample) -> f64| {
            self.sampled.iter().map(|(_, _, s)| f(s)).sum::<f64>()
        };
        let sampled_bytes = sum(&|s| s.disk_bytes).max(1.0);
        // Seconds per byte copied; per byte and index built; per byte vacuumed.
        let copy_rate = sum(&|s| s.copy_seconds) / sampled_bytes;
        let index_weight: f64 = self
            .sampled
            .iter()
            .map(|(oid, db, s)| s.disk_bytes * self.indexes_of(*oid, db) as f64)
            .sum::<f64>()
            .max(1.0);
        let index_rate = sum(&|s| s.index_seconds) / index_weight;
        let vacuum_rate = sum(&|s| s.vacuum_seconds) / sampled_bytes;
        let (mut copy, mut index, mut vacuum, mut longest) = (0.0, 0.0, 0.0, 0.0f64);
        for t in &self.tables {
            let own = self
                .sampled
                .iter()
                .find(|(oid, db, _)| *oid == t.oid && *db == t.database)
                .map(|(_, _, s)| s);
            let per_byte = |measured: Option<f64>, overall: f64| measured.unwrap_or(overall);
            let bytes_of = |s: &TableSample| s.disk_bytes.max(1.0);
            let c = t.bytes * per_byte(own.map(|s| s.copy_seconds / bytes_of(s)), copy_rate);
            let i = t.bytes
                * per_byte(
                    own.map(|s| s.index_seconds / bytes_of(s)),
                    index_rate * t.indexes as f64,
                );
            let v = t.bytes * per_byte(own.map(|s| s.vacuum_seconds / bytes_of(s)), vacuum_rate);
            copy += c;
            index += i;
            vacuum += v;
            longest = longest.max(c / t.parts as f64 + i + v);
        }
        let streams = streams as f64;
        let schema = SCHEMA_SECONDS_PER_DATABASE * databases as f64;
        let spread = (copy + index + vacuum) / streams;
        let seconds = schema + spread.max(longest);
        Estimate {
            seconds,
            copy_seconds: copy / streams,
            index_seconds: index / streams,
            vacuum_seconds: vacuum / streams,
            schema_seconds: schema,
            basis: format!(
                "measured: {} table sample(s) of {} copied at {}/s in one stream, their indexes built and vacuumed on the target; spread over {} stream(s); the schema steps counted at {SCHEMA_SECONDS_PER_DATABASE} s per database",
                self.sampled.len(),
                human_bytes(sampled_bytes as u64),
                human_bytes((1.0 / copy_rate.max(f64::MIN_POSITIVE)) as u64),
                streams
            ),
        }
    }

    fn indexes_of(&self, oid: u32, database: &str) -> usize {
        self.tables
            .iter()
            .find(|t| t.oid == oid && t.database == database)
            .map_or(0, |t| t.indexes)
    }
}

/// Connections at most: the copy's streams on both sides, the index builders, pg_dump /
/// pg_restore, and with --follow each database's slot holder and receiver (source) and apply
/// connections (target, once its copy is done).
async fn connections(
    opts: &PlanOptions,
    src: &tokio_postgres::Client,
    dst: &tokio_postgres::Client,
    databases: usize,
    streams: usize,
) -> Result<Connections> {
    let copy = if opts.server.is_some() {
        opts.clone.table_jobs
    } else {
        streams.max(opts.clone.table_jobs)
    };
    let per_database_source = if opts.online { 2 } else { 1 };
    let apply = if opts.online {
        opts.preflight.apply_jobs
    } else {
        0
    };
    Ok(Connections {
        source: copy + 1 + per_database_source * databases,
        source_max_connections: max_connections(src).await,
        target: copy + opts.clone.index_jobs + 1 + apply * databases,
        target_max_connections: max_connections(dst).await,
    })
}

async fn max_connections(client: &tokio_postgres::Client) -> Option<i64> {
    client
        .query_one("SELECT current_setting('max_connections')::bigint", &[])
        .await
        .ok()
        .map(|r| r.get(0))
}

async fn wal_estimate(
    src: &tokio_postgres::Client,
    dir: &std::path::Path,
    seconds: f64,
    online: bool,
) -> WalEstimate {
    let rate = crate::observe::slot_wal::wal_rate(src).await.ok();
    let limit = crate::observe::slot_wal::keep_limit(src)
        .await
        .ok()
        .flatten();
    let free = crate::preflight::local::free_disk(dir);
    let retained = rate.map(|r| (r * seconds) as u64);
    let verdict = match (online, retained, limit, free) {
        (false, ..) => "a clone without --follow keeps no slot".to_string(),
        (true, Some(kept), Some(limit), _) if limit >= 0 && kept as i64 > limit => format!(
            "the slot would keep about {} but max_slot_wal_keep_size is {}: the source would invalidate it during the copy. Raise max_slot_wal_keep_size, or copy when the source writes less",
            human_bytes(kept),
            human_bytes(limit as u64)
        ),
        (true, Some(kept), _, Some(free)) if kept > free => format!(
            "the spool may need about {} but the work dir's disk has {} free: choose a --dir with more room",
            human_bytes(kept),
            human_bytes(free)
        ),
        (true, Some(kept), _, _) => format!(
            "about {} of WAL kept by the slot during the copy, within the limits",
            human_bytes(kept)
        ),
        (true, None, ..) => "the source's WAL rate could not be measured".to_string(),
    };
    WalEstimate {
        source_wal_bytes_per_second: rate,
        retained_bytes: retained,
        max_slot_wal_keep_size: limit,
        spool_free_bytes: free,
        verdict,
    }
}

/// The plan for a terminal.
pub fn render(plan: &Plan) -> String {
    let mut out = format!(
        "plan: {} → {} (read-only: nothing was created on either server)\n",
        plan.source, plan.target
    );
    if let Some(roles) = plan.roles_to_copy {
        out.push_str(&format!("roles: {roles} to copy first\n"));
    }
    for db in &plan.databases {
        let heap: i64 = db.tables.iter().map(|t| t.heap_bytes).sum();
        let toast: i64 = db.tables.iter().map(|t| t.toast_bytes).sum();
        out.push_str(&format!(
            "\ndatabase {}{}: {} tables, {} (heap {}, TOAST {}), {} indexes ({} on the source), {} sequences, {} large objects\n",
            db.name,
            if db.create_on_target { " (created on the target)" } else { "" },
            db.tables.len(),
            human_bytes(db.bytes.max(0) as u64),
            human_bytes(heap.max(0) as u64),
            human_bytes(toast.max(0) as u64),
            db.indexes,
            human_bytes(db.index_bytes.max(0) as u64),
            db.sequences,
            db.large_objects
        ));
        const SHOWN: usize = 15;
        for t in db.tables.iter().take(SHOWN) {
            out.push_str(&format!(
                "  {:<40} heap {:>9}  TOAST {:>9}  ~{:>10} rows  {} part{}{}\n",
                t.table,
                human_bytes(t.heap_bytes.max(0) as u64),
                human_bytes(t.toast_bytes.max(0) as u64),
                t.rows,
                t.parts,
                if t.parts == 1 { "" } else { "s" },
                if t.copy_data { "" } else { " (schema only)" }
            ));
        }
        if db.tables.len() > SHOWN {
            out.push_str(&format!(
                "  … and {} smaller tables\n",
                db.tables.len() - SHOWN
            ));
        }
        out.push_str(&format!("  preflight: {} checks OK", db.findings_ok));
        if db.findings.is_empty() {
            out.push('\n');
        } else {
            out.push_str(", and:\n");
            for line in crate::preflight::render(&db.findings).lines() {
                out.push_str(&format!("    {line}\n"));
            }
        }
    }
    let c = &plan.connections;
    let limit = |m: Option<i64>| m.map_or(String::new(), |m| format!(" (max_connections {m})"));
    out.push_str(&format!(
        "\nconnections: up to {} on the source{}, {} on the target{}\n",
        c.source,
        limit(c.source_max_connections),
        c.target,
        limit(c.target_max_connections)
    ));
    out.push_str(&format!(
        "copy streams: {}{}\n",
        plan.copy_streams,
        match (plan.measured_source_speedup, plan.measured_target_speedup) {
            (Some(s), Some(t)) => format!(
                " (measured: parallel sessions ran {s:.1}x on the source, {t:.1}x on the target)"
            ),
            _ => String::new(),
        }
    ));
    for s in &plan.samples {
        out.push_str(&format!(
            "sample: {} — {} rows ({}) copied in {:.2} s, indexes {:.2} s, vacuum {:.2} s\n",
            s.table,
            s.rows,
            human_bytes(s.disk_bytes as u64),
            s.copy_seconds,
            s.index_seconds,
            s.vacuum_seconds
        ));
    }
    let e = &plan.estimate;
    out.push_str(&format!(
        "estimate: about {} for the clone (copy {:.1} s, indexes {:.1} s, vacuum {:.1} s, schema {:.1} s)\n  {}\n",
        crate::observe::status::human_seconds(e.seconds),
        e.copy_seconds,
        e.index_seconds,
        e.vacuum_seconds,
        e.schema_seconds,
        e.basis
    ));
    let w = &plan.wal;
    out.push_str(&format!(
        "WAL: the source writes {}/s; {}\n",
        w.source_wal_bytes_per_second
            .map_or("?".to_string(), |r| human_bytes(r as u64)),
        w.verdict
    ));
    out
}
