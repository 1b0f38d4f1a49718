//! `pgtide follow --add-table T` / `--resync T` / `--remove-table T`: a table joins, is copied
//! again, or leaves a migration while its follow keeps running (issue 13, item 2).
//!
//! A join: (1) refuse what setup would refuse (no such table, already followed, no replica
//! identity, a partition whose root is published, …); (2) record T as `Pending` under a new
//! generation; (3) when a follow is live, wait until its apply acknowledges that generation,
//! so that no change of T is applied under older rules; (4) create T on the target if missing
//! (pg_dump / pg_restore of that table alone: columns, indexes, constraints, triggers);
//! (5) add T to the slot's publication; (6) take a snapshot at a known LSN L (a temporary
//! slot: what commits before L is in it, what commits after is in the stream) and record
//! `CopyingAt(L)`; (7) empty T on the target and copy it under that snapshot in one target
//! transaction; (8) record `Done(L)` with the filters and the stream's table list that include T
//! (invariant 9: verify, sequences and cutover agree at once). A resync is the same without
//! (4) and (5). Apply's side of the bargain is in `apply/joins.rs`.
//!
//! A removal records T as removed (apply ignores its changes from then on), excludes it from
//! the recorded filters and drops it from the publication; its target table is kept.
//!
//! Every step is idempotent: a command killed anywhere is rerun as it was, and continues
//! (a copy under an earlier snapshot is simply done again under a later one).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio_postgres::Client;

use crate::clone::filters::{Filters, TableName};
use crate::clone::snapshot::Snapshot;
use crate::clone::{copy, leave_out, schema};
use crate::conninfo::ConnInfo;
use crate::pg::{self, Lsn, Side, catalog, quote_ident};
use crate::replication::Plugin;
use crate::replication::setup::recorded_publications;
use crate::replication::slot::append_publication_name;
use crate::state::{
    CloneStatus, FollowedTables, StateDb, StreamRecord, SyncKind, SyncStage, TableSync,
};

/// One request of `pgtide follow`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableRequest {
    /// `--add-table`: a table the migration does not follow joins it.
    Add(TableName),
    /// `--resync`: a followed table is copied again under a new snapshot.
    Resync(TableName),
    /// `--remove-table`: the migration stops following a table (its target table is kept).
    Remove(TableName),
}

/// Where the requests run.
pub struct TableSyncOptions {
    pub source: ConnInfo,
    pub target: ConnInfo,
    /// The migration's work dir (a follow may hold its lock: only state.db is opened).
    pub dir: PathBuf,
    /// How long to wait for a running follow to acknowledge a request.
    pub ack_timeout: Duration,
}

/// How often the acknowledgement of the running apply is looked for.
const ACK_POLL: Duration = Duration::from_millis(200);
/// Copies of one table in a row that a rewrite on the source may spoil before giving up.
const COPY_ATTEMPTS: usize = 5;

/// Runs the requests in order (removals, then additions, then resyncs); returns one line per
/// table saying what was done.
pub async fn run(opts: &TableSyncOptions, requests: &[TableRequest]) -> Result<Vec<String>> {
    let _lock = lock(&opts.dir)?;
    let state = StateDb::open_in_dir(&opts.dir)?;
    let stream = state.stream()?.ok_or_else(|| {
        anyhow!(
            "the work dir {} has no stream: tables are added to a migration started with `pgtide clone --follow` (or `pgtide stream setup`)",
            opts.dir.display()
        )
    })?;
    if state.cleaned_up()? {
        bail!(
            "the migration in {} was cleaned up: its slot and publication are gone",
            opts.dir.display()
        );
    }
    if let Some(status) = state.clone_status()?
        && status != CloneStatus::Done
    {
        bail!(
            "the clone in {} has not finished: add, resync or remove tables once the follow applies changes (`pgtide status` shows the phase following)",
            opts.dir.display()
        );
    }
    let source = pg::connect(&opts.source, Side::Source, "table sync").await?;
    let target = pg::connect(&opts.target, Side::Target, "table sync").await?;
    let mut ordered: Vec<&TableRequest> = Vec::new();
    for pass in 0..3 {
        ordered.extend(requests.iter().filter(|r| {
            matches!(
                (pass, r),
                (0, TableRequest::Remove(_))
                    | (1, TableRequest::Add(_))
                    | (2, TableRequest::Resync(_))
            )
        }));
    }
    let mut lines = Vec::new();
    for request in ordered {
        // The stream record changes with each request (its table list).
        let stream = state.stream()?.unwrap_or_else(|| stream.clone());
        let line = match request {
            TableRequest::Remove(t) => remove(&state, &stream, &source, t).await?,
            TableRequest::Add(t) => {
                join(opts, &state, &stream, &source, &target, t, SyncKind::Add).await?
            }
            TableRequest::Resync(t) => {
                join(opts, &state, &stream, &source, &target, t, SyncKind::Resync).await?
            }
        };
        tracing::info!("{line}");
        lines.push(line);
    }
    Ok(lines)
}

/// One table sync command at a time per work dir (a follow holds the main lock).
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join("table-sync.lock");
    if !dir.join("state.db").exists() {
        bail!(
            "{} has no state.db: give the --dir of the migration",
            dir.display()
        );
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another `pgtide follow --add-table/--resync/--remove-table` is running on the work dir {}: wait for it to finish",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

fn shown(t: &TableName) -> String {
    format!("{}.{}", t.schema, t.name)
}

/// The source's view of a table a request names.
struct SourceTable {
    relkind: String,
    permanent: bool,
    /// The root of its partition tree, for a partition.
    root: Option<(String, String)>,
}

async fn source_table(client: &Client, t: &TableName) -> Result<Option<SourceTable>> {
    let row = client
        .query_opt(
            "SELECT c.relkind::text, c.relpersistence = 'p', rn.nspname::text, r.relname::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_class r ON c.relispartition AND r.oid = pg_partition_root(c.oid)
             LEFT JOIN pg_namespace rn ON rn.oid = r.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&t.schema, &t.name],
        )
        .await
        .map_err(|e| {
            anyhow!(
                "cannot look {} up on the source: {}",
                shown(t),
                pg::describe(&e)
            )
        })?;
    Ok(row.map(|row| {
        let root_schema: Option<String> = row.get(2);
        let root_name: Option<String> = row.get(3);
        SourceTable {
            relkind: row.get(0),
            permanent: row.get(1),
            root: root_schema.zip(root_name),
        }
    }))
}

fn followed(stream: &StreamRecord, t: &TableName) -> bool {
    stream
        .tables
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|(s, n)| *s == t.schema && *n == t.name)
}

fn in_progress(sync: Option<&TableSync>) -> Option<SyncKind> {
    sync.filter(|s| s.kind != SyncKind::Remove && !matches!(s.stage, SyncStage::Done(_)))
        .map(|s| s.kind)
}

fn flag(kind: SyncKind) -> &'static str {
    match kind {
        SyncKind::Add => "--add-table",
        SyncKind::Resync => "--resync",
        SyncKind::Remove => "--remove-table",
    }
}

/// Refuses a table that setup would refuse to publish, naming the fix.
async fn refuse_unfit(
    source: &Client,
    stream: &StreamRecord,
    t: &TableName,
    kind: SyncKind,
) -> Result<()> {
    let name = shown(t);
    let Some(table) = source_table(source, t).await? else {
        bail!(
            "{name} does not exist on the source. Give it as schema.table, as the source names it (quote capitals: '\"My Schema\".\"T\"'); a name without schema means public"
        );
    };
    match table.relkind.as_str() {
        "r" => {}
        "p" => bail!(
            "{name} is a partitioned table: add its partitions one by one (one {} per partition)",
            flag(kind)
        ),
        other => bail!(
            "{name} is not a table (relkind {other}): only tables are followed; views and materialized views are not replicated"
        ),
    }
    if !table.permanent {
        bail!(
            "{name} is unlogged or temporary: logical decoding carries none of its changes. Make it logged on the source first (ALTER TABLE {} SET LOGGED)",
            pg::qualified(&t.schema, &t.name)
        );
    }
    let is_followed = followed(stream, t);
    match kind {
        SyncKind::Add if is_followed => bail!(
            "{name} is already followed by this migration: to copy it again, use --resync {name}"
        ),
        SyncKind::Resync if !is_followed => {
            bail!("{name} is not followed by this migration: add it with --add-table {name}")
        }
        _ => {}
    }
    if let Some((root_schema, root_name)) = &table.root
        && stream
            .tables
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|(s, n)| s == root_schema && n == root_name)
        && kind == SyncKind::Add
    {
        bail!(
            "{name} is a partition of {root_schema}.{root_name}, which is published: its changes already arrive. To copy it again, use --resync {root_schema}.{root_name}"
        );
    }
    if kind == SyncKind::Add {
        if stream.plugin != Plugin::Pgoutput {
            bail!(
                "--add-table needs a pgoutput stream: wal2json's table list is fixed when the stream starts. Start the migration again with --plugin pgoutput to add tables live"
            );
        }
        let missing = crate::replication::slot::tables_without_identity(
            source,
            &[(t.schema.clone(), t.name.clone())],
        )
        .await?;
        if !missing.is_empty() {
            bail!(
                "{name} has no primary key and no replica identity: once published, an UPDATE or DELETE on it would fail on the source. Give it a primary key, or run on the source: ALTER TABLE {} REPLICA IDENTITY FULL; then add it again",
                pg::qualified(&t.schema, &t.name)
            );
        }
    }
    Ok(())
}

/// `--add-table` and `--resync`: steps (1) to (8) of the module comment.
async fn join(
    opts: &TableSyncOptions,
    state: &StateDb,
    stream: &StreamRecord,
    source: &Client,
    target: &Client,
    t: &TableName,
    kind: SyncKind,
) -> Result<String> {
    let name = shown(t);
    let qualified = pg::qualified(&t.schema, &t.name);
    let (_, syncs) = state.table_syncs()?;
    let existing = syncs.iter().find(|s| s.table == qualified);
    let resuming = match in_progress(existing) {
        Some(k) if k == kind => true,
        Some(other) => bail!(
            "a {} of {name} was interrupted: finish it first by running that command again (pgtide follow {} {name})",
            flag(other),
            flag(other)
        ),
        None => false,
    };
    if resuming {
        tracing::info!("{name}: continuing the interrupted {}", flag(kind));
        if source_table(source, t).await?.is_none() {
            bail!(
                "{name} does not exist on the source any more: remove it with --remove-table {name}"
            );
        }
    } else {
        refuse_unfit(source, stream, t, kind).await?;
    }
    let generation = if resuming {
        state.table_sync_generation()?
    } else {
        state.record_table_sync(&qualified, kind, SyncStage::Pending)?
    };
    // Until the table is published (an addition) or a snapshot LSN is recorded (apply may
    // skip changes against it), nothing depends on the record: a failure gives it up whole.
    // After that, apply waits for the table's changes until the command is run again.
    let mut published = false;
    let steps = async {
        wait_for_apply(state, generation, opts.ack_timeout).await?;
        let created = match kind {
            SyncKind::Add => create_on_target(opts, source, target, t).await?,
            _ => {
                if !exists_on_target(target, &qualified).await? {
                    bail!(
                        "{name} does not exist on the target: create it there (or remove it from the migration with --remove-table {name})"
                    );
                }
                false
            }
        };
        let publication = match kind {
            SyncKind::Add => {
                published = true;
                Some(add_to_publication(source, stream, t).await?)
            }
            _ => None,
        };
        let (lsn, rows) = copy_under_new_snapshot(opts, state, source, target, t, kind).await?;
        Ok((created, publication, lsn, rows))
    }
    .await;
    let (created, publication, lsn, rows) = match steps {
        Ok(done) => done,
        Err(e) => {
            let (_, syncs) = state.table_syncs()?;
            let still_pending = syncs
                .iter()
                .any(|s| s.table == qualified && s.stage == SyncStage::Pending);
            if !resuming && still_pending && !published {
                state.cancel_table_sync(&qualified)?;
                return Err(e.context(format!(
                    "{} {name} gave up: nothing depends on it, the follow goes on as before",
                    flag(kind)
                )));
            }
            return Err(e.context(format!(
                "{} {name} stopped midway: the follow applies no change of {name} (it waits for them) until `pgtide follow {} {name}` is run again and succeeds",
                flag(kind),
                flag(kind)
            )));
        }
    };
    let filters = state.recorded_filters()?.unwrap_or_default();
    let mut tables = stream.tables.clone().unwrap_or_default();
    let filters = match kind {
        SyncKind::Add => {
            if !followed(stream, t) {
                tables.push((t.schema.clone(), t.name.clone()));
            }
            filters.with_table_added(t)
        }
        _ => filters,
    };
    state.finish_table_sync(
        &qualified,
        kind,
        SyncStage::Done(lsn),
        &FollowedTables {
            filters: &filters,
            stream_tables: &tables,
        },
    )?;
    Ok(match publication {
        Some(publication) => format!(
            "{name}: joined the migration: {} on the target, published in {publication}, {rows} rows copied under a snapshot at {lsn}; the follow applies its changes committed from {lsn} on",
            if created { "created" } else { "already" }
        ),
        None => format!(
            "{name}: copied again: {rows} rows under a snapshot at {lsn}; the follow applies its changes committed from {lsn} on"
        ),
    })
}

/// Step (3): when a follow is running, its apply must have loaded `generation` before
/// anything is published or copied. A follow that is not running reads the records when it
/// starts.
async fn wait_for_apply(state: &StateDb, generation: u64, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        if state.table_sync_seen()? >= generation {
            return Ok(());
        }
        let liveness = state.follow_liveness()?;
        let running = liveness.as_ref().filter(|l| {
            l.not_running(crate::state::now(), super::LIVENESS_TIMEOUT)
                .is_none()
        });
        let Some(running) = running else {
            tracing::info!(
                "no follow is running on this work dir: the next one reads the request when it starts"
            );
            return Ok(());
        };
        if started.elapsed() >= timeout {
            bail!(
                "the running follow (pid {}) did not take the request into account within {} s (its apply reads requests every second): it may be applying one very long transaction, or reconnecting to the target; `pgtide status` says which. Nothing was changed on either server; run the same command again",
                running.pid,
                timeout.as_secs()
            );
        }
        tokio::time::sleep(ACK_POLL).await;
    }
}

async fn exists_on_target(target: &Client, qualified: &str) -> Result<bool> {
    Ok(target
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified])
        .await
        .map_err(|e| {
            anyhow!(
                "cannot look {qualified} up on the target: {}",
                pg::describe(&e)
            )
        })?
        .get(0))
}

/// Step (4): the table's schema on the target, from the source's pg_dump of that table alone
/// (its columns, defaults, owned sequences, indexes, constraints, triggers), restored in one
/// transaction. Whether it was created (false: it was there).
async fn create_on_target(
    opts: &TableSyncOptions,
    source: &Client,
    target: &Client,
    t: &TableName,
) -> Result<bool> {
    let qualified = pg::qualified(&t.schema, &t.name);
    if exists_on_target(target, &qualified).await? {
        return Ok(false);
    }
    // pg_dump --table dumps no schema: one the migration left out is created empty.
    target
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(&t.schema)
        ))
        .await
        .map_err(|e| {
            anyhow!(
                "cannot create the schema {} on the target: {}",
                t.schema,
                pg::describe(&e)
            )
        })?;
    let tools = crate::clone::choose_tools(source, target).await?;
    let dir = opts.dir.join("table-sync");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let only = Filters {
        include_only_tables: vec![t.clone()],
        ..Filters::default()
    };
    let snapshot = Snapshot::export(&opts.source).await?;
    let file = schema::dump(
        &tools,
        &opts.source,
        &snapshot.name,
        &only,
        schema::Section::Whole,
        &dir,
    )
    .await?;
    drop(snapshot);
    let mut leave_out = leave_out::decide(source, target).await?;
    // A sequence the table owns may be on the target already (the clone copies every
    // sequence of an included schema): used as it is, its OWNED BY still restored.
    for row in source
        .query(
            "SELECT 'pg_catalog.pg_class'::regclass::oid, s.oid, format('%I.%I', n.nspname, s.relname)
             FROM pg_depend d JOIN pg_class s ON s.oid = d.objid JOIN pg_namespace n ON n.oid = s.relnamespace
             WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
               AND d.refobjid = to_regclass($1) AND d.deptype = 'a' AND s.relkind = 'S'",
            &[&qualified],
        )
        .await
        .map_err(|e| anyhow!("cannot list the sequences {} owns: {}", shown(t), pg::describe(&e)))?
    {
        let sequence: String = row.get(2);
        if exists_on_target(target, &sequence).await? {
            leave_out.object(row.get(0), row.get(1), "exists on the target already");
        }
    }
    schema::restore(
        &file,
        &opts.target,
        &schema::RestoreOptions {
            tools: &tools,
            skip_object_oids: &Default::default(),
            leave_out: &leave_out,
            clean: false,
            no_owner: false,
            no_acl: false,
            no_tablespaces: false,
        },
    )
    .await
    .with_context(|| format!("cannot create {} on the target", shown(t)))?;
    tracing::info!("{}: created on the target", shown(t));
    Ok(true)
}

/// Step (5): adds the table to the slot's publication (not the append-only one), unless it is
/// already there (a rerun). Returns the publication's name.
async fn add_to_publication(
    source: &Client,
    stream: &StreamRecord,
    t: &TableName,
) -> Result<String> {
    let append = append_publication_name(&stream.slot);
    let publication = recorded_publications(stream)
        .into_iter()
        .find(|p| *p != append)
        .ok_or_else(|| {
            anyhow!(
                "the migration has only an append-only publication: tables cannot join it live. Start the migration again to follow {}",
                shown(t)
            )
        })?;
    let qualified = pg::qualified(&t.schema, &t.name);
    if !in_publication(source, &publication, &qualified).await? {
        source
            .batch_execute(&format!(
                "ALTER PUBLICATION {} ADD TABLE {qualified}",
                quote_ident(&publication)
            ))
            .await
            .map_err(|e| {
                anyhow!(
                    "cannot add {} to the publication {publication} on the source: {}. pgtide's source role must own the table (as it did for the tables it published)",
                    shown(t),
                    pg::describe(&e)
                )
            })?;
    }
    Ok(publication)
}

async fn in_publication(source: &Client, publication: &str, qualified: &str) -> Result<bool> {
    Ok(source
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                             WHERE p.pubname = $1 AND r.prrelid = to_regclass($2))",
            &[&publication, &qualified],
        )
        .await
        .map_err(|e| anyhow!("cannot read the publication {publication}: {}", pg::describe(&e)))?
        .get(0))
}

/// Steps (6) and (7): a snapshot at a known LSN, recorded, then the table emptied and copied
/// under it on the target. A table rewritten on the source meanwhile is copied again under a
/// later snapshot. Returns the LSN and the rows copied.
async fn copy_under_new_snapshot(
    opts: &TableSyncOptions,
    state: &StateDb,
    source: &Client,
    target: &Client,
    t: &TableName,
    kind: SyncKind,
) -> Result<(Lsn, u64)> {
    let name = shown(t);
    let qualified = pg::qualified(&t.schema, &t.name);
    let only = Filters {
        include_only_tables: vec![t.clone()],
        ..Filters::default()
    };
    let table = catalog::read_catalog(source, &only, catalog::SplitPolicy::Never)
        .await?
        .tables
        .into_iter()
        .find(|row| row.schema == t.schema && row.name == t.name)
        .ok_or_else(|| {
            anyhow!("{name} is not a table pgtide can copy (not found in the source catalog)")
        })?;
    let copier = pg::connect(&opts.source, Side::Source, "table sync copy").await?;
    for attempt in 1..=COPY_ATTEMPTS {
        let (snapshot, lsn) = Snapshot::at_known_lsn(&opts.source).await?;
        // Recorded before the target's rows are touched: apply skips what commits before it.
        state.record_table_sync(&qualified, kind, SyncStage::CopyingAt(lsn))?;
        match copy::replace_table(&copier, target, &table, &snapshot.name).await {
            Ok(rows) => {
                drop(snapshot);
                tracing::info!("{name}: copied {rows} rows under a snapshot at {lsn}");
                fail::fail_point!(crate::failpoints::TABLE_SYNC_AFTER_COPY);
                return Ok((lsn, rows));
            }
            Err(e)
                if attempt < COPY_ATTEMPTS && e.chain().any(|c| c.is::<copy::TableRewritten>()) =>
            {
                tracing::warn!("{e:#}; copying {name} again under a new snapshot");
                drop(snapshot);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.context(format!("cannot copy {name}"))),
        }
    }
    unreachable!("the last attempt returns")
}

/// `--remove-table`: recorded first (apply ignores the table's changes from then on, and
/// verify, sequences and cutover leave it out), then unpublished. Its target table is kept.
async fn remove(
    state: &StateDb,
    stream: &StreamRecord,
    source: &Client,
    t: &TableName,
) -> Result<String> {
    let name = shown(t);
    let qualified = pg::qualified(&t.schema, &t.name);
    let (_, syncs) = state.table_syncs()?;
    let existing = syncs.iter().find(|s| s.table == qualified);
    if let Some(kind) = in_progress(existing) {
        bail!(
            "a {} of {name} was interrupted: finish it first (pgtide follow {} {name}), then remove it",
            flag(kind),
            flag(kind)
        );
    }
    let already = existing.is_some_and(|s| s.kind == SyncKind::Remove) && !followed(stream, t);
    if !already {
        if !followed(stream, t) {
            bail!("{name} is not followed by this migration: nothing to remove");
        }
        let filters = state
            .recorded_filters()?
            .unwrap_or_default()
            .with_table_removed(t);
        let tables: Vec<(String, String)> = stream
            .tables
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|(s, n)| !(*s == t.schema && *n == t.name))
            .collect();
        let at: Lsn = pg::current_insert_lsn(source, pg::Side::Source).await?;
        state.finish_table_sync(
            &qualified,
            SyncKind::Remove,
            SyncStage::Done(at),
            &FollowedTables {
                filters: &filters,
                stream_tables: &tables,
            },
        )?;
    }
    if stream.plugin == Plugin::Pgoutput {
        for publication in recorded_publications(stream) {
            if in_publication(source, &publication, &qualified).await? {
                source
                    .batch_execute(&format!(
                        "ALTER PUBLICATION {} DROP TABLE {qualified}",
                        quote_ident(&publication)
                    ))
                    .await
                    .map_err(|e| {
                        anyhow!(
                            "cannot drop {name} from the publication {publication} on the source: {}. Its changes are already ignored; run the same command again",
                            pg::describe(&e)
                        )
                    })?;
            }
        }
    }
    Ok(format!(
        "{name}: removed from the migration: no longer published, its changes are no longer applied, and verify and cutover leave it out. Its table on the target is kept as it is (drop it there after cutover if it is not needed)"
    ))
}
