//! clone: a snapshot-consistent copy of the source database onto the target.
//!
//! Steps, each recorded in state.db with start/end times so that `--resume` skips what is done:
//! catalog → dump → pre-data → copy (+ indexes, overlapped) → large-objects → post-data →
//! sequences → vacuum. Table workers take parts largest first; when the last part of a table
//! lands its indexes are queued for the index workers while other tables still copy.

pub mod copy;
pub mod fast_restore;
pub mod filters;
pub mod indexes;
pub mod large_objects;
pub mod leave_out;
pub mod restore_script;
pub mod schedule;
pub mod schema;
pub mod sequences;
pub mod snapshot;
pub mod toast;
pub mod tools;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::conninfo::ConnInfo;
use crate::pg::catalog::{IndexRow, PartRow, SplitPolicy, TableRow};
use crate::pg::{self, Side, catalog};
use crate::state::{CloneProgress, CloneStatus, Phase, ServerIdentity, StateDb, Step};
use crate::units::human_bytes;
use crate::workdir::WorkDir;
use copy::{CopyCounters, CopyWorker};
use filters::Filters;
use schedule::{Next, Schedule};
use snapshot::Snapshot;

/// What the operator asked for on the command line.
#[derive(Clone)]
pub struct CloneOptions {
    pub source: ConnInfo,
    pub target: ConnInfo,
    pub table_jobs: usize,
    pub index_jobs: usize,
    pub split: SplitChoice,
    pub filters: Filters,
    pub drop_if_exists: bool,
    pub resume: bool,
    pub restart: bool,
    pub snapshot: Option<String>,
    pub skip_vacuum: bool,
    pub skip_large_objects: bool,
    pub no_owner: bool,
    pub no_acl: bool,
    /// Everything in the target's default tablespace (pg_restore --no-tablespaces).
    pub no_tablespaces: bool,
    /// A clone --follow resuming after its slot's snapshot is gone: unfinished tables are
    /// copied again under a new snapshot whose LSN is recorded per table (see `resync`).
    pub resync_for_follow: bool,
    /// The copy feeds a follow: a table rewritten during the copy can be resynced.
    pub follow: bool,
    /// How the copy compresses TOASTed values on the target (None: lz4 where available).
    pub toast_compression: Option<toast::ToastCompression>,
    /// Target settings for the bulk load, restored when it ends (`--fast-restore`).
    pub fast_restore: Option<fast_restore::FastRestore>,
    /// Copy and index workers shared with the other clones of this process (a whole-server
    /// migration); None: this clone's own --table-jobs and --index-jobs.
    pub budget: Option<Arc<Budget>>,
}

/// The copy and index workers of a whole-server migration, shared by its databases' clones: a
/// worker holds its permit from before it connects until it exits, so the server runs at most
/// `--table-jobs` copy streams and `--index-jobs` index builds in all, and one database's index
/// builds overlap the next one's copy.
pub struct Budget {
    pub copy: Arc<tokio::sync::Semaphore>,
    pub index: Arc<tokio::sync::Semaphore>,
}

impl Budget {
    pub fn new(table_jobs: usize, index_jobs: usize) -> Self {
        Budget {
            copy: Arc::new(tokio::sync::Semaphore::new(table_jobs.max(1))),
            index: Arc::new(tokio::sync::Semaphore::new(index_jobs.max(1))),
        }
    }
}

/// Waits for a permit of `pool` when the clone shares a budget; the permit is released when
/// dropped.
async fn permit(
    pool: Option<&Arc<tokio::sync::Semaphore>>,
) -> Result<Option<tokio::sync::OwnedSemaphorePermit>> {
    match pool {
        Some(pool) => {
            Ok(Some(pool.clone().acquire_owned().await.map_err(|_| {
                anyhow!("the shared worker budget was closed")
            })?))
        }
        None => Ok(None),
    }
}

/// How the operator chose to split tables: a fixed policy, or one decided from the cores the
/// servers have for the copy (measured unless given).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitChoice {
    Fixed(SplitPolicy),
    Auto { copy_cores: Option<usize> },
}

/// Resolves `--split-tables-larger-than auto`: the copy can run at most `--table-jobs`
/// streams, and no more than both servers have cores for (measured when `--copy-cores` is not
/// given, and only when some table is big enough for the answer to matter); never on a source
/// older than 14, where a part costs a whole-table scan.
pub(crate) async fn split_policy(
    opts: &CloneOptions,
    tables: &[TableRow],
    source_major: u32,
) -> Result<SplitPolicy> {
    // A part is read with a ctid range, which only 14+ reads as a range (TID range scan);
    // older servers scan the whole table for each part.
    let ranges_scan = source_major >= 14;
    let copy_cores = match opts.split {
        SplitChoice::Fixed(policy @ SplitPolicy::LargerThan(_)) if !ranges_scan => {
            tracing::warn!(
                "splitting tables on a PostgreSQL {source_major} source: each part is read by a scan of the whole table (ctid ranges are read as ranges from 14 on); --split-tables-larger-than auto or 0 avoids it"
            );
            return Ok(policy);
        }
        SplitChoice::Fixed(policy) => return Ok(policy),
        SplitChoice::Auto { .. } if !ranges_scan => return Ok(SplitPolicy::Never),
        SplitChoice::Auto { .. } if opts.table_jobs < 2 || !catalog::could_split(tables) => {
            return Ok(SplitPolicy::Never);
        }
        SplitChoice::Auto {
            copy_cores: Some(cores),
        } => {
            tracing::info!("planning the copy for {cores} cores per server (--copy-cores)");
            cores
        }
        SplitChoice::Auto { copy_cores: None } => {
            let found =
                crate::pg::cores::measure(&opts.source, &opts.target, opts.table_jobs).await?;
            tracing::info!(
                "measured the cores free for the copy: the source ran {:.1}x and the target {:.1}x one session's speed with up to {} sessions each at once; planning {} copy stream(s) (--copy-cores N overrides)",
                found.source,
                found.target,
                found.sessions_tried,
                found.streams()
            );
            found.streams()
        }
    };
    let streams = copy_cores.min(opts.table_jobs);
    Ok(if streams >= 2 {
        SplitPolicy::Streams(streams)
    } else {
        SplitPolicy::Never
    })
}

/// Runs (or resumes) a clone in `workdir`.
pub async fn run(workdir: &WorkDir, opts: &CloneOptions) -> Result<()> {
    run_holding(workdir, opts, None).await
}

/// Runs a clone whose snapshot (`opts.snapshot`) was exported by `holder` (clone --follow's
/// slot): the holder is closed as soon as the last copy part is done, not kept through index
/// builds and post-data.
pub async fn run_holding(
    workdir: &WorkDir,
    opts: &CloneOptions,
    holder: Option<crate::replication::conn::ReplicationConnection>,
) -> Result<()> {
    let state = &workdir.state;
    let started = Instant::now();
    if opts.restart {
        state.reset()?;
    }
    let resuming = match state.clone_status()? {
        None => false,
        Some(CloneStatus::Done) if !opts.resume => bail!(
            "the work dir {} holds a clone that already finished. To copy again, give another --dir, or add --restart (with --drop-if-exists to replace what is on the target).",
            workdir.path.display()
        ),
        Some(_) if !opts.resume => bail!(
            "the work dir {} holds an unfinished clone. Rerun with --resume to continue it (work already done is kept), or add --restart --drop-if-exists to start over.",
            workdir.path.display()
        ),
        Some(_) => true,
    };
    if !resuming {
        // The migration starts here (or with its slot, for --follow): its filters are
        // recorded once and every later stage reads them back (invariant 9).
        state.record_filters(&opts.filters)?;
    }
    if resuming && state.clone_status()? == Some(CloneStatus::Done) {
        tracing::info!(
            "the clone in {} is already done; nothing to resume",
            workdir.path.display()
        );
        print_summary(state, started.elapsed())?;
        return Ok(());
    }

    let source = pg::connect(&opts.source, Side::Source, "catalog").await?;
    let target = pg::connect(&opts.target, Side::Target, "admin").await?;
    // Settings an earlier run left changed (killed with --fast-restore on): back first, so
    // that this run records the target's own values (and an earlier =unsafe is not left on
    // under a =safe run).
    fast_restore::restore(&target, state).await?;
    let tools = choose_tools(&source, &target).await?;
    let tools = &tools;
    check_identity(state, &source, &target, opts).await?;
    state.set_clone_status(CloneStatus::Running)?;
    state.set_phase(Phase::Snapshot)?;

    let (snapshot, resync_lsn) = match &opts.snapshot {
        Some(name) => (Snapshot::external(name, holder), None),
        None if opts.resync_for_follow => {
            let (snapshot, lsn) = Snapshot::at_known_lsn(&opts.source).await?;
            (snapshot, Some(lsn))
        }
        None => (Snapshot::export(&opts.source).await?, None),
    };
    if resuming {
        tracing::info!(
            "resuming under a new snapshot {} (source LSN {}); parts copied before the interruption keep the earlier snapshot's contents",
            snapshot.name,
            snapshot.lsn
        );
    } else {
        tracing::info!(
            "using snapshot {} (source LSN {})",
            snapshot.name,
            snapshot.lsn
        );
    }
    state.record_snapshot_name(&snapshot.name)?;

    if !state.has_catalog()? {
        run_step(state, Step::Catalog, async {
            // Reading table sizes locks each table in turn: an application transaction that
            // locks two of them the other way round can make this read a deadlock's victim
            // (transient: read again, the snapshot is still held).
            let mut attempt = 1;
            let cat = loop {
                snapshot::import(&source, &snapshot.name).await?;
                let cat = catalog::read_catalog(&source, &opts.filters, SplitPolicy::Never).await;
                let _ = source.batch_execute("ROLLBACK").await;
                match cat {
                    Err(e) if attempt < 5 && pg::is_deadlock(&e) => {
                        tracing::warn!(
                            "reading the catalog lost a deadlock with a source session; reading it again"
                        );
                        attempt += 1;
                    }
                    other => break other?,
                }
            };
            let mut cat = cat;
            let policy = split_policy(opts, &cat.tables, pg::server_major(&source).await?).await?;
            cat.parts = catalog::plan_parts(&cat.tables, policy);
            state.save_catalog(&cat)
        })
        .await?;
    }
    let tables = state.tables()?;

    if !resuming {
        prepare_empty_target(&target, &tables, opts.drop_if_exists).await?;
    }

    if !state.step_is_done(Step::Dump)? {
        fail::fail_point!(crate::failpoints::CLONE_BEFORE_DUMP, |_| Err(anyhow!(
            "failpoint {}",
            crate::failpoints::CLONE_BEFORE_DUMP
        )));
        run_step(state, Step::Dump, async {
            let filters = catalog::sequences_for_dump(&source, &opts.filters).await?;
            let (pre, post) = tokio::join!(
                schema::dump(
                    tools,
                    &opts.source,
                    &snapshot.name,
                    &filters,
                    schema::Section::PreData,
                    &workdir.path
                ),
                schema::dump(
                    tools,
                    &opts.source,
                    &snapshot.name,
                    &filters,
                    schema::Section::PostData,
                    &workdir.path
                ),
            );
            pre.and(post).map(|_| ())
        })
        .await?;
    }

    let all_indexes = state.indexes()?;
    let built_by_pgtide: HashSet<u32> = all_indexes
        .iter()
        .flat_map(|i| std::iter::once(i.oid).chain(i.constraint.as_ref().map(|c| c.oid)))
        .collect();
    if !state.step_is_done(Step::PreData)? {
        let clean = opts.drop_if_exists;
        run_step(state, Step::PreData, async {
            let leave_out = leave_out::decide(&source, &target).await?;
            schema::restore(
                &workdir.path.join("pre-data.dump"),
                &opts.target,
                &schema::RestoreOptions {
                    tools,
                    skip_object_oids: &HashSet::new(),
                    leave_out: &leave_out,
                    clean,
                    no_owner: opts.no_owner,
                    no_acl: opts.no_acl,
                    no_tablespaces: opts.no_tablespaces,
                },
            )
            .await
        })
        .await?;
    }

    // The snapshot is shared by the copy workers; the last one to finish releases it.
    let snapshot = snapshot::Lease::new(snapshot);
    // Large objects first: they read the snapshot too, and then nothing after the last copy
    // part does.
    if !state.step_is_done(Step::LargeObjects)? {
        let oids = state.large_objects()?;
        let skip = opts.skip_large_objects;
        run_step(state, Step::LargeObjects, async {
            if skip {
                tracing::info!(
                    "skipping {} large objects (--skip-large-objects)",
                    oids.len()
                );
                return Ok(());
            }
            let bytes = large_objects::copy(&source, &target, snapshot.name(), &oids).await?;
            tracing::info!("copied {} large objects ({} bytes)", oids.len(), bytes);
            Ok(())
        })
        .await?;
    }
    // The bulk load, with the --fast-restore settings on the target for its duration only:
    // they are restored whether it succeeds or fails (and by the next run or cleanup after a
    // kill).
    if let Some(level) = opts.fast_restore {
        fast_restore::apply(&target, state, level).await?;
    }
    let loaded = async {
        if !state.step_is_done(Step::Copy)? || !state.step_is_done(Step::Indexes)? {
            copy::prepare_target(&target).await?;
            reconcile_with_target(state, &target, &tables, &all_indexes).await?;
            if let Some(lsn) = resync_lsn {
                resync_unfinished_tables(state, &target, &tables, lsn).await?;
            }
            state.set_phase(Phase::Copying)?;
            state.step_started(Step::Copy)?;
            state.step_started(Step::Indexes)?;
            let result =
                copy_resyncing_rewritten(opts, state, &target, snapshot.clone(), &tables).await;
            match &result {
                Ok(()) => {
                    state.step_done(Step::Copy)?;
                    state.step_done(Step::Indexes)?;
                }
                Err(e) => {
                    state.step_failed(Step::Copy, &format!("{e:#}"))?;
                    state.step_failed(Step::Indexes, &format!("{e:#}"))?;
                }
            }
            result?;
        }

        if !state.step_is_done(Step::PostData)? {
            run_step(state, Step::PostData, async {
                let leave_out = leave_out::decide(&source, &target).await?;
                schema::restore(
                    &workdir.path.join("post-data.dump"),
                    &opts.target,
                    &schema::RestoreOptions {
                        tools,
                        skip_object_oids: &built_by_pgtide,
                        leave_out: &leave_out,
                        clean: false,
                        no_owner: opts.no_owner,
                        no_acl: opts.no_acl,
                        no_tablespaces: opts.no_tablespaces,
                    },
                )
                .await
            })
            .await?;
        }

        if !state.step_is_done(Step::Sequences)? {
            let seqs = state.sequences()?;
            run_step(
                state,
                Step::Sequences,
                sequences::set_on_target(&target, &seqs, 0),
            )
            .await?;
        }

        if !opts.skip_vacuum && !state.step_is_done(Step::Vacuum)? {
            let left = state.tables_not_vacuumed()?;
            run_step(
                state,
                Step::Vacuum,
                vacuum_analyze(&opts.target, state, &left, opts.table_jobs),
            )
            .await?;
        }

        Ok::<(), anyhow::Error>(())
    }
    .await;
    let restored = fast_restore::restore(&target, state).await;
    loaded?;
    restored?;

    target
        .batch_execute("DROP SCHEMA IF EXISTS pgtide CASCADE")
        .await
        .map_err(|e| {
            anyhow!(
                "cannot drop the pgtide schema on the target: {}",
                pg::describe(&e)
            )
        })?;
    state.set_clone_status(CloneStatus::Done)?;
    state.set_phase(Phase::Cloned)?;
    print_summary(state, started.elapsed())?;
    Ok(())
}

/// Records a step's start, end or failure around `work`.
async fn run_step<F>(state: &StateDb, name: Step, work: F) -> Result<()>
where
    F: std::future::Future<Output = Result<()>>,
{
    tracing::info!("step {name}: started");
    let t0 = Instant::now();
    state.set_phase(name.phase())?;
    state.step_started(name)?;
    match work.await {
        Ok(()) => {
            state.step_done(name)?;
            tracing::info!("step {name}: done in {:.1?}", t0.elapsed());
            Ok(())
        }
        Err(e) => {
            state.step_failed(name, &format!("{e:#}"))?;
            Err(e.context(format!("clone step {name} failed")))
        }
    }
}

/// The pg_dump / pg_restore pair for these servers (see `tools`), logged once.
pub(crate) async fn choose_tools(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
) -> Result<tools::PgTools> {
    let source_major = pg::server_major(source).await?;
    let target_major = pg::server_major(target).await?;
    let tools = tools::find(source_major, Some(target_major)).await?;
    tracing::info!(
        "using {} for a PostgreSQL {source_major} source and {target_major} target",
        tools.describe()
    );
    Ok(tools)
}

/// Ties the work dir to one source and target so that a resume against other servers is
/// refused instead of mixing two migrations.
async fn check_identity(
    state: &StateDb,
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
    opts: &CloneOptions,
) -> Result<()> {
    let source_id = database_identity(source).await?;
    let target_id = database_identity(target).await?;
    if source_id == target_id {
        bail!(
            "the source and target are the same database ({}): give a different --target",
            opts.target
        );
    }
    for (side, id, info) in [
        (Side::Source, source_id, &opts.source),
        (Side::Target, target_id, &opts.target),
    ] {
        match state.server_identity(side)? {
            Some(stored) if stored.identity != id => bail!(
                "this work dir belongs to another migration: its {side} was {} but this run's {side} is {info}. Use another --dir, or --restart to start over here.",
                stored.uri.unwrap_or(stored.identity),
                side = side.name()
            ),
            _ => state.record_server_identity(
                side,
                &ServerIdentity {
                    identity: id,
                    uri: Some(info.redacted()),
                },
            )?,
        }
    }
    Ok(())
}

/// The server's system identifier and the database name: what a work dir is tied to.
pub(crate) async fn database_identity(client: &tokio_postgres::Client) -> Result<String> {
    let row = client
        .query_one(
            "SELECT system_identifier::text || '/' || current_database() FROM pg_control_system()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// A fresh clone must not silently mix with tables left on the target: refuse, or with
/// `--drop-if-exists` remove the foreign keys that would block pg_restore --clean.
async fn prepare_empty_target(
    target: &tokio_postgres::Client,
    tables: &[TableRow],
    drop_if_exists: bool,
) -> Result<()> {
    let names: Vec<String> = tables.iter().map(|t| t.qualified()).collect();
    let existing: Vec<String> = target
        .query(
            // An extension's own table is not the user's: never reported nor dropped.
            "SELECT n FROM unnest($1::text[]) n WHERE to_regclass(n) IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                               AND d.objid = to_regclass(n) AND d.deptype = 'e')",
            &[&names],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if existing.is_empty() {
        target
            .batch_execute("DROP SCHEMA IF EXISTS pgtide CASCADE")
            .await?;
        return Ok(());
    }
    if !drop_if_exists {
        let shown: Vec<&str> = existing.iter().take(5).map(|s| s.as_str()).collect();
        bail!(
            "the target database is not empty: {} of the tables to copy already exist there ({}{}). Add --drop-if-exists to drop and recreate them, or point --target at an empty database.",
            existing.len(),
            shown.join(", "),
            if existing.len() > 5 { ", …" } else { "" }
        );
    }
    tracing::info!(
        "--drop-if-exists: dropping {} existing tables' foreign keys on the target",
        existing.len()
    );
    let fks = target
        .query(
            "SELECT conrelid::regclass::text, quote_ident(conname) FROM pg_constraint
             WHERE contype = 'f' AND (conrelid = ANY($1::text[]::regclass[]) OR confrelid = ANY($1::text[]::regclass[]))",
            &[&existing],
        )
        .await?;
    for fk in fks {
        let table: String = fk.get(0);
        let name: String = fk.get(1);
        target
            .batch_execute(&format!(
                "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}"
            ))
            .await
            .map_err(|e| {
                anyhow!(
                    "cannot drop foreign key {name} on {table}: {}",
                    pg::describe(&e)
                )
            })?;
    }
    target
        .batch_execute("DROP SCHEMA IF EXISTS pgtide CASCADE")
        .await?;
    Ok(())
}

/// Copies and indexes; in a clone --follow, a table found truncated or rewritten after the
/// snapshot (see `copy::TableRewritten`) is copied again with every unfinished table, whole,
/// under a new snapshot at a known LSN, the way a resumed clone --follow does: apply skips
/// their changes from before it. A plain clone stops with the fix instead (its tables must all
/// come from one snapshot).
async fn copy_resyncing_rewritten(
    opts: &CloneOptions,
    state: &StateDb,
    target: &tokio_postgres::Client,
    mut lease: snapshot::Lease,
    tables: &[TableRow],
) -> Result<()> {
    /// Resyncs in one run before giving up: a source that rewrites a table faster than it can
    /// be copied needs the operator.
    const RESYNCS: usize = 5;
    for attempt in 0.. {
        let result = copy_and_index(opts, state, &lease, tables).await;
        match result {
            Err(e)
                if opts.follow
                    && attempt < RESYNCS
                    && e.chain().any(|c| c.is::<copy::TableRewritten>()) =>
            {
                tracing::warn!("{e:#}; copying the unfinished tables again under a new snapshot");
                let (snapshot, lsn) = Snapshot::at_known_lsn(&opts.source).await?;
                // What the stopped workers left (parts and indexes committed on the target
                // but not yet recorded), as a resume finds it.
                reconcile_with_target(state, target, tables, &state.indexes()?).await?;
                resync_unfinished_tables(state, target, tables, lsn).await?;
                lease.release();
                lease = snapshot::Lease::new(snapshot);
            }
            other => {
                lease.release();
                return other;
            }
        }
    }
    unreachable!("the loop returns")
}

/// A table not completely copied under the earlier snapshot is copied again, whole, under the
/// new one (its parts must all come from one snapshot). Its LSN is recorded before its target
/// rows are removed, so a crash in between only leads to another resync.
async fn resync_unfinished_tables(
    state: &StateDb,
    target: &tokio_postgres::Client,
    tables: &[TableRow],
    lsn: crate::pg::Lsn,
) -> Result<()> {
    let unfinished: HashSet<u32> = state
        .parts()?
        .into_iter()
        .filter(|p| p.status != "done")
        .map(|p| p.table_oid)
        .collect();
    let mut resynced = state.resync_positions()?;
    let again: Vec<&TableRow> = tables
        .iter()
        .filter(|t| unfinished.contains(&t.oid))
        .collect();
    for table in &again {
        resynced.insert(pg::qualified(&table.schema, &table.name), lsn);
    }
    state.record_resync_positions(&resynced)?;
    for table in again {
        let name = pg::qualified(&table.schema, &table.name);
        tracing::info!(
            "{name}: copying it again under a new snapshot at {lsn}; changes before that LSN are in its copy"
        );
        target
            .batch_execute(&format!(
                "BEGIN; TRUNCATE ONLY {name}; DELETE FROM pgtide.copied_parts WHERE table_oid = {}; COMMIT",
                table.oid
            ))
            .await
            .map_err(|e| anyhow::anyhow!("cannot empty {name} on the target before copying it again: {}", pg::describe(&e)))?;
        state.table_parts_pending(table.oid)?;
    }
    Ok(())
}

/// On resume the target is the truth: a part is done iff the target committed its marker row,
/// an index iff it exists there.
async fn reconcile_with_target(
    state: &StateDb,
    target: &tokio_postgres::Client,
    tables: &[TableRow],
    indexes: &[IndexRow],
) -> Result<()> {
    let loaded = copy::loaded_parts(target).await?;
    for p in state.parts()? {
        if loaded.contains(&(p.table_oid, p.part)) {
            if p.status != "done" {
                state.part_found_done(p.table_oid, p.part)?;
            }
        } else if p.status == "done" {
            tracing::warn!(
                "part {} of table oid {} is not on the target; copying it again",
                p.part,
                p.table_oid
            );
            state.part_started(p.table_oid, p.part, "")?;
        }
    }
    let by_oid: HashMap<u32, &TableRow> = tables.iter().map(|t| (t.oid, t)).collect();
    for index in indexes.iter().filter(|i| i.status != "done") {
        if let Some(table) = by_oid.get(&index.table_oid)
            && indexes::state_on_target(target, index, table).await? == indexes::OnTarget::Complete
        {
            state.index_done(index.oid)?;
        }
    }
    Ok(())
}

/// Runs the table workers and the index workers until every part is loaded and every index
/// built; each table is vacuumed as soon as it is complete. The first error stops all of them
/// (their transactions roll back).
async fn copy_and_index(
    opts: &CloneOptions,
    state: &StateDb,
    lease: &snapshot::Lease,
    tables: &[TableRow],
) -> Result<()> {
    let by_oid: Arc<HashMap<u32, TableRow>> =
        Arc::new(tables.iter().map(|t| (t.oid, t.clone())).collect());
    let parts = state.parts()?;
    let mut schedule = Schedule::new(&parts, &state.indexes()?);
    let mut queue: Vec<(TableRow, PartRow)> = parts
        .iter()
        .filter(|p| p.status != "done")
        .filter_map(|p| by_oid.get(&p.table_oid).map(|t| (t.clone(), p.clone())))
        .collect();
    // Largest table first; a split table's parts stay together so its indexes start early.
    queue.sort_by_key(|(t, p)| (std::cmp::Reverse(t.total_bytes()), t.oid, p.part));
    let total_bytes: i64 = queue
        .iter()
        .map(|(t, p)| t.total_bytes() / p.nparts.max(1))
        .sum();
    let queue = Arc::new(Mutex::new(VecDeque::from(queue)));

    let (index_tx, index_rx) = mpsc::unbounded_channel::<IndexRow>();
    let index_rx = Arc::new(Mutex::new(index_rx));
    for index in schedule.ready_at_start() {
        let _ = index_tx.send(index);
    }
    let schedule = Arc::new(std::sync::Mutex::new(schedule));
    let vacuum = !opts.skip_vacuum;

    let counters = Arc::new(CopyCounters::default());
    let mut workers: JoinSet<Result<()>> = JoinSet::new();
    // Copy workers still copying: the last one to find the queue empty releases the snapshot
    // (index builds and vacuum do not need it).
    let copying = Arc::new(std::sync::atomic::AtomicUsize::new(opts.table_jobs.max(1)));
    let compression = {
        let target = pg::connect(&opts.target, Side::Target, "copy").await?;
        toast::copy_session_setting(&target, opts.toast_compression).await?
    };
    if let Some(setting) = &compression {
        tracing::info!("copy sessions on the target: {setting}");
    }
    let connect_worker = {
        let (source, target) = (opts.source.clone(), opts.target.clone());
        let (snapshot, counters, state) =
            (lease.name().to_string(), counters.clone(), state.clone());
        let session = format!(
            "SET synchronous_commit = off; {}",
            compression.as_deref().unwrap_or("")
        );
        move || {
            let (source, target, session) = (source.clone(), target.clone(), session.clone());
            let (snapshot, counters, state) = (snapshot.clone(), counters.clone(), state.clone());
            async move {
                let worker = CopyWorker {
                    source: pg::connect(&source, Side::Source, "copy").await?,
                    target: pg::connect(&target, Side::Target, "copy").await?,
                    snapshot,
                    counters,
                    state,
                };
                worker.target.batch_execute(&session).await?;
                anyhow::Ok(worker)
            }
        }
    };
    // Without a shared budget the workers connect now, so that a refused connection stops
    // the clone before any copy starts.
    let mut connected = Vec::new();
    if opts.budget.is_none() {
        for _ in 0..opts.table_jobs.max(1) {
            connected.push(connect_worker().await?);
        }
    }
    for n in 0..opts.table_jobs.max(1) {
        let ready = connected.pop();
        let connect_worker = connect_worker.clone();
        let budget = opts.budget.clone();
        let queue = queue.clone();
        let schedule = schedule.clone();
        let index_tx = index_tx.clone();
        let state = state.clone();
        let copying = copying.clone();
        let lease = lease.clone();
        workers.spawn(async move {
            // A shared budget: wait for a copy stream of the server's, held until this worker
            // exits, and connect only then (and only if there is still something to copy).
            let _permit = permit(budget.as_ref().map(|b| &b.copy)).await?;
            let mut ready = ready;
            loop {
                let Some((table, part)) = queue.lock().await.pop_front() else {
                    if copying.fetch_sub(1, Ordering::SeqCst) == 1 {
                        lease.release();
                    }
                    return Ok(());
                };
                let worker = match ready.take() {
                    Some(worker) => worker,
                    None => connect_worker().await?,
                };
                let worker = ready.insert(worker);
                let label = if part.nparts > 1 {
                    format!(
                        "{} part {}/{}",
                        table.display_name(),
                        part.part + 1,
                        part.nparts
                    )
                } else {
                    table.display_name()
                };
                tracing::debug!("copy worker {n}: {label}");
                let t0 = Instant::now();
                state.part_started(table.oid, part.part, &worker.snapshot)?;
                // Every line logged inside names the part (a span field, also in JSON logs).
                let result = worker
                    .copy_part(&table, &part)
                    .instrument(tracing::info_span!("copy", part = %label))
                    .await
                    .with_context(|| format!("copying {label}"))?;
                state.part_done(table.oid, part.part, result.rows, result.bytes)?;
                tracing::info!(
                    "copied {label}: {} rows, {} in {:.1?}",
                    result.rows,
                    human_bytes(result.bytes),
                    t0.elapsed()
                );
                let next = schedule
                    .lock()
                    .map_err(|_| anyhow!("lock poisoned"))?
                    .part_landed(table.oid);
                match next {
                    Next::BuildIndexes(indexes) => {
                        for index in indexes {
                            let _ = index_tx.send(index);
                        }
                    }
                    Next::Vacuum if vacuum => vacuum_table(&worker.target, &state, &table).await?,
                    Next::Vacuum | Next::Wait => {}
                }
            }
        });
    }
    drop(index_tx);

    let connect_index_worker = {
        let target = opts.target.clone();
        move || {
            let target = target.clone();
            async move {
                let client = pg::connect(&target, Side::Target, "index").await?;
                client
                    .batch_execute(
                        "SET maintenance_work_mem = '512MB'; SET synchronous_commit = off",
                    )
                    .await?;
                anyhow::Ok(client)
            }
        }
    };
    for _ in 0..opts.index_jobs.max(1) {
        let ready = match opts.budget {
            None => Some(connect_index_worker().await?),
            Some(_) => None,
        };
        let connect_index_worker = connect_index_worker.clone();
        let budget = opts.budget.clone();
        let index_rx = index_rx.clone();
        let by_oid = by_oid.clone();
        let schedule = schedule.clone();
        let state = state.clone();
        workers.spawn(async move {
            let mut ready = ready;
            loop {
                let next = index_rx.lock().await.recv().await;
                let Some(index) = next else { return Ok(()) };
                let Some(table) = by_oid.get(&index.table_oid) else {
                    continue;
                };
                // A shared budget: one of the server's index builds, for this index only (an
                // idle worker waiting for its tables to land holds none).
                let _permit = permit(budget.as_ref().map(|b| &b.index)).await?;
                let target = match ready.take() {
                    Some(target) => target,
                    None => connect_index_worker().await?,
                };
                let target = ready.insert(target);
                let t0 = Instant::now();
                state.index_started(index.oid)?;
                let span = tracing::info_span!("index", index = %format!("{}.{}", index.schema, index.name));
                let from = indexes::state_on_target(target, &index, table)
                    .instrument(span.clone())
                    .await?;
                indexes::build(target, &index, table, from)
                    .instrument(span)
                    .await?;
                state.index_done(index.oid)?;
                tracing::info!(
                    "built index {}.{} in {:.1?}",
                    index.schema,
                    index.name,
                    t0.elapsed()
                );
                let last = schedule
                    .lock()
                    .map_err(|_| anyhow!("lock poisoned"))?
                    .index_built(table.oid);
                if last && vacuum {
                    vacuum_table(target, &state, table).await?;
                }
            }
        });
    }

    // Bytes and rows of parts finished before this run, so that status counts them too.
    let (done_bytes, done_rows) = state.copied_so_far()?;
    let indexes_total = state.indexes()?.len() as u64;
    let (stop_progress, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let progress = {
        let counters = counters.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let mut bars = crate::observe::progress::CloneBars::start(
                total_bytes.max(0) as u64,
                indexes_total,
            );
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            for n in 1u64.. {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut stopped => break,
                }
                let bytes = done_bytes + counters.bytes.load(Ordering::Relaxed);
                let rows = done_rows + counters.rows.load(Ordering::Relaxed);
                // For `pgtide status` in another shell: live figures, every second.
                let _ = state.record_clone_progress(CloneProgress {
                    bytes_copied: bytes,
                    rows_copied: rows,
                });
                match bars.as_mut() {
                    Some(bars) => {
                        let indexes_done = state
                            .indexes()
                            .map(|i| i.iter().filter(|i| i.status == "done").count() as u64)
                            .unwrap_or(0);
                        let in_flight = state.parts_in_flight().unwrap_or_default();
                        bars.update(bytes, indexes_done, &in_flight);
                    }
                    // No terminal: a plain line every 10 seconds.
                    None if n % 10 == 0 => tracing::info!(
                        "progress: {} copied of about {} to copy, {rows} rows",
                        human_bytes(bytes),
                        human_bytes(total_bytes.max(0) as u64),
                    ),
                    None => {}
                }
            }
            if let Some(bars) = bars {
                bars.finish();
            }
        })
    };
    let result = async {
        while let Some(joined) = workers.join_next().await {
            joined.map_err(|e| anyhow!("a clone worker crashed: {e}"))??;
        }
        Ok(())
    }
    .await;
    let _ = stop_progress.send(());
    let _ = progress.await;
    result
}

/// VACUUM ANALYZE of one complete table, so the planner has statistics and the visibility map
/// is set before traffic arrives; recorded so that a resume does not repeat it.
async fn vacuum_table(
    target: &tokio_postgres::Client,
    state: &StateDb,
    table: &TableRow,
) -> Result<()> {
    let t0 = Instant::now();
    target
        .batch_execute(&format!("VACUUM (ANALYZE) {}", table.qualified()))
        .await
        .map_err(|e| {
            anyhow!(
                "VACUUM ANALYZE {} failed: {}",
                table.display_name(),
                pg::describe(&e)
            )
        })?;
    state.table_vacuumed(table.oid)?;
    tracing::debug!("vacuumed {} in {:.1?}", table.display_name(), t0.elapsed());
    Ok(())
}

/// VACUUM ANALYZE of the tables the copy did not vacuum yet (empty or data-excluded tables,
/// or a resume), `jobs` at a time.
async fn vacuum_analyze(
    target: &ConnInfo,
    state: &StateDb,
    tables: &[TableRow],
    jobs: usize,
) -> Result<()> {
    let queue = Arc::new(Mutex::new(tables.iter().cloned().collect::<VecDeque<_>>()));
    let mut set = JoinSet::new();
    for _ in 0..jobs.max(1).min(tables.len()) {
        let client = pg::connect(target, Side::Target, "vacuum").await?;
        let queue = queue.clone();
        let state = state.clone();
        set.spawn(async move {
            loop {
                let Some(table) = queue.lock().await.pop_front() else {
                    return Ok::<(), anyhow::Error>(());
                };
                vacuum_table(&client, &state, &table).await?;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| anyhow!("a vacuum worker crashed: {e}"))??;
    }
    Ok(())
}

/// The end-of-clone summary: each step's wall time, then per-table rows, bytes and time.
pub fn print_summary(state: &StateDb, elapsed: Duration) -> Result<()> {
    println!();
    println!("{:<24} {:>10} {:>12}", "step", "status", "seconds");
    for step in state.steps()? {
        println!(
            "{:<24} {:>10} {:>12}",
            step.step.as_str(),
            step.status.as_str(),
            step.seconds
                .map(|s| format!("{s:.1}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    println!();
    println!(
        "{:<40} {:>6} {:>12} {:>10} {:>9}",
        "table", "parts", "rows", "bytes", "seconds"
    );
    for t in state.table_summary()? {
        println!(
            "{:<40} {:>6} {:>12} {:>10} {:>9.1}",
            t.table,
            t.parts,
            t.rows,
            human_bytes(t.bytes.max(0) as u64),
            t.seconds
        );
    }
    println!();
    println!("clone finished in {:.1?}", elapsed);
    Ok(())
}
