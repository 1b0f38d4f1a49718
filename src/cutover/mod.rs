//! The cutover engine: the switch-over in one call. Optionally fences writes on the source
//! (`fence.rs`: the application roles made read-only in the source database and their
//! sessions ended), pins endpos at the source's current position, waits until apply reaches it
//! (a running follow, or this process when none runs), copies sequences, verifies, and
//! measures the write-downtime window. On any failure the fence is lifted and the error says
//! where both sides stand. `cli/cutover.rs` prints the report.

mod fence;
mod leak;
pub mod pooler;
pub mod reverse;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use tokio_postgres::Client;

use crate::clone::{filters::Filters, sequences};
use crate::conninfo::ConnInfo;
use crate::follow::{self, LIVENESS_TIMEOUT};
use crate::pg::{self, Lsn, Side, catalog};
use crate::state::{CloneStatus, CompletedSwitch, Phase, StateDb};
use crate::workdir::WorkDir;

/// What a cutover is asked to do (`pgtide cutover`'s options).
pub struct Options {
    pub dir: PathBuf,
    /// Fence the source's application roles before pinning endpos.
    pub fence: bool,
    /// The roles to fence; empty: every non-superuser login role but pgtide's own.
    pub fence_roles: Vec<String>,
    /// How long to wait for apply to reach endpos.
    pub timeout: Duration,
    pub verify: VerifyMode,
    pub sequence_offset: i64,
    pub refresh_matviews: bool,
    /// Which way this switch-over goes: a cutover, or a rollback's run of the reverse stream.
    pub direction: Direction,
    /// Create the reverse stream once the target is ready (`cutover --reverse`).
    pub reverse: bool,
    /// PgBouncer to pause around the switch (`--pgbouncer`).
    pub pgbouncer: Option<pooler::PoolerOptions>,
}

/// Which way a switch-over goes, for the messages: which server is fenced, which command
/// to run again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// `pgtide cutover`: the source fenced, the target takes the application.
    Forward,
    /// `pgtide rollback`: the target fenced, the source takes the application back.
    Reverse,
}

impl Direction {
    /// The server this direction fences.
    fn fenced(self) -> &'static str {
        match self {
            Direction::Forward => "source",
            Direction::Reverse => "target",
        }
    }

    /// The command that runs this direction.
    fn command(self) -> &'static str {
        match self {
            Direction::Forward => "pgtide cutover",
            Direction::Reverse => "pgtide rollback",
        }
    }
}

/// How the target is verified once endpos is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyMode {
    Checksums,
    Counts,
    None,
}

/// Lifts the fence of an earlier cutover (`--unfence`); returns the roles that can write again.
pub async fn lift_fence(source: &ConnInfo, dir: &Path) -> Result<Vec<String>> {
    let state = StateDb::open_in_dir(dir)?;
    let src = pg::connect(source, Side::Source, "cutover").await?;
    let roles = fence::unfence(&src, &state).await?;
    // The application stays on (or goes back to) the source: a later cutover switches again.
    state.forget_completed_switch()?;
    Ok(roles)
}

/// Lifts a fence recorded in `state` on the server `client` is connected to (a rollback's
/// fence on the target: `rollback --unfence`).
pub async fn unfence_with(client: &Client, state: &StateDb) -> Result<Vec<String>> {
    let roles = fence::unfence(client, state).await?;
    state.forget_completed_switch()?;
    Ok(roles)
}

/// Runs the cutover: fence (if asked), endpos, sequences, verify, the leak check, and with
/// `reverse` the reverse stream. On failure the fence is lifted (except when it leaked: then
/// it is kept) and the error says where both sides stand.
pub async fn run(source: &ConnInfo, target: &ConnInfo, opts: &Options) -> Result<Report> {
    let state = StateDb::open_in_dir(&opts.dir)?;
    let src = pg::connect(source, Side::Source, "cutover").await?;
    let slot = state.stream_slot()?.ok_or_else(|| {
        anyhow!(
            "the work dir {} has no change stream: cutover follows a `pgtide clone --follow` (or `stream setup` + `follow`) migration",
            opts.dir.display()
        )
    })?;
    if opts.direction == Direction::Forward
        && let Some(reverse_state) = reverse::state_of(&opts.dir)?
    {
        refuse_rolled_back(&reverse_state)?;
        // Set up by a run killed before it dropped the forward stream, or completed.
        drop_forward_stream(source, &slot).await;
        return already_done(&state, Some(&reverse_state), slot);
    }
    if state.completed_switch()?.is_some() {
        return already_done(&state, None, slot);
    }
    if opts.reverse {
        let dst = pg::connect(target, Side::Target, "cutover").await?;
        reverse::require_logical_target(&dst).await?;
    }
    let window_start = Instant::now();
    let fencing = Fencing {
        src,
        state,
        slot,
        window_start,
    };
    pooler::around(
        opts.pgbouncer.as_ref(),
        opts.timeout,
        run_fenced(source, target, opts, fencing),
    )
    .await
}

/// What `run` hands to the fenced part of the switch-over.
struct Fencing {
    src: Client,
    state: StateDb,
    slot: String,
    window_start: Instant,
}

/// The switch-over from the fence on (the pooler, if any, is paused).
async fn run_fenced(
    source: &ConnInfo,
    target: &ConnInfo,
    opts: &Options,
    fencing: Fencing,
) -> Result<Report> {
    let Fencing {
        src,
        state,
        slot,
        window_start,
    } = fencing;
    let fenced = if opts.fence {
        Some(fence::fence(&src, &state, &opts.fence_roles).await?)
    } else {
        None
    };
    let switched = match switch_over(opts, source, target, &src, &state).await {
        Ok(switched) => switched,
        // A leak keeps the fence: lifting it would let the writer go on.
        Err(e) if leak::is_leak(&e) => return Err(e),
        Err(e) => return Err(lift_after(e, &src, &state, fenced.is_some(), opts).await),
    };
    let window = switched.ready_at.duration_since(window_start);
    let reverse_stream = if opts.reverse {
        let created = match reverse::setup(target, &opts.dir, &state).await {
            Ok(created) => created,
            Err(e) => {
                let e = e.context(
                    "the target is ready, but the reverse stream could not be set up on it",
                );
                return Err(lift_after(e, &src, &state, fenced.is_some(), opts).await);
            }
        };
        drop_forward_stream(source, &slot).await;
        Some(created)
    } else {
        None
    };
    state.record_completed_switch(&CompletedSwitch {
        endpos: switched.endpos,
        at: crate::state::now() as i64,
    })?;
    let (fenced, superusers_left) = fenced
        .map(|f| (f.roles, f.superusers_left))
        .unwrap_or_default();
    Ok(Report {
        slot,
        window,
        fenced,
        superusers_left,
        switched,
        reverse: reverse_stream,
    })
}

/// Drops the forward stream once the reverse one exists: finished, its slot would keep the
/// source's WAL (the reverse stream's writes included) for as long as a rollback stays
/// possible. A failure is only warned about (`cleanup` drops it later).
async fn drop_forward_stream(source: &ConnInfo, slot: &str) {
    match crate::replication::setup::drop_stream(source, slot).await {
        Ok(true) => tracing::info!("the forward stream's slot {slot} and publication dropped"),
        Ok(false) => {}
        Err(e) => tracing::warn!(
            "cannot drop the forward stream's slot {slot} ({e:#}); `pgtide cleanup` drops it later"
        ),
    }
}

/// A cutover whose reverse stream was drained by a rollback cannot run again: the source has
/// the application back and the forward stream is gone.
fn refuse_rolled_back(reverse_state: &StateDb) -> Result<()> {
    if let Some(done) = reverse_state.rolled_back()? {
        bail!(
            "this migration was rolled back (through the target's {}): the source has the application again and the forward stream is gone. To migrate again, start anew: `pgtide cleanup`, then `clone --follow` with a new --dir",
            done.endpos
        );
    }
    Ok(())
}

/// A switch-over run again after it completed (recorded, or its reverse stream set up): the
/// recorded outcome, nothing changed. Its sequences are not set again: the application may
/// already use them on the other side.
fn already_done(state: &StateDb, reverse_state: Option<&StateDb>, slot: String) -> Result<Report> {
    let endpos = match state.completed_switch()? {
        Some(done) => done.endpos,
        None => state.sentinel()?.reached_endpos.unwrap_or_default(),
    };
    if state.completed_switch()?.is_none() {
        state.record_completed_switch(&CompletedSwitch {
            endpos,
            at: crate::state::now() as i64,
        })?;
    }
    let reverse = match reverse_state {
        Some(reverse_state) => reverse_state
            .stream()?
            .map(|stream| reverse::ReverseStream {
                slot: stream.slot,
                start: stream.startpos,
                created: false,
            }),
        None => None,
    };
    Ok(Report {
        slot,
        window: Duration::ZERO,
        fenced: state
            .fence()?
            .unwrap_or_default()
            .into_iter()
            .map(|f| f.role)
            .collect(),
        superusers_left: Vec::new(),
        switched: Switched {
            endpos,
            applied: applied_at_endpos(state)?,
            sequences: 0,
            refreshed: None,
            ready_at: Instant::now(),
            verdict:
                "already done earlier (this run changed nothing; `--unfence` first to switch again)"
                    .into(),
        },
        reverse,
    })
}

/// Lifts the fence after a failed switch-over and says so in the error.
async fn lift_after(
    e: anyhow::Error,
    src: &Client,
    state: &StateDb,
    fenced: bool,
    opts: &Options,
) -> anyhow::Error {
    let side = opts.direction.fenced();
    let lifted = if fenced {
        match fence::unfence(src, state).await {
            Ok(roles) => format!(
                " The fence is lifted: {} can write on the {side} again.",
                roles.join(", ")
            ),
            Err(u) => format!(
                " Lifting the fence FAILED ({u:#}): run `{} --unfence` with the same --dir.",
                opts.direction.command()
            ),
        }
    } else {
        String::new()
    };
    let applied = applied_at_endpos(state).unwrap_or_else(|_| "unknown".into());
    let what = match opts.direction {
        Direction::Forward => "cutover",
        Direction::Reverse => "rollback",
    };
    e.context(format!(
        "{what} failed.{lifted} The {side} is unchanged otherwise (the slot keeps the changes); the other side has applied through {applied}. Fix the cause and run {what} again."
    ))
}

/// One database of a whole-server cutover: its name and work dir.
pub struct ServerDatabaseDir {
    pub name: String,
    pub dir: PathBuf,
}

/// A completed whole-server cutover: one write-downtime window for the server.
pub struct ServerReport {
    /// From the first fence (or the first endpos pinned) to the last database ready.
    pub window: Duration,
    pub fenced: Vec<String>,
    /// Each database's switch-over, in the order given.
    pub databases: Vec<(String, Switched)>,
    /// Each database's reverse stream (`--reverse`).
    pub reversed: Vec<(String, reverse::ReverseStream)>,
}

/// The cutover of a whole-server migration: the application roles fenced in every migrated
/// database first (so no database takes a write after another's endpos), then every
/// database's endpos pinned and reached at once, sequences set and verified per database.
/// On any failure every fence is lifted, and the error names the database.
pub async fn run_server(
    source: &ConnInfo,
    target: &ConnInfo,
    opts: &Options,
    databases: &[ServerDatabaseDir],
) -> Result<ServerReport> {
    let window_start = Instant::now();
    pooler::around(
        opts.pgbouncer.as_ref(),
        opts.timeout,
        run_server_fenced(source, target, opts, databases, window_start),
    )
    .await
}

async fn run_server_fenced(
    source: &ConnInfo,
    target: &ConnInfo,
    opts: &Options,
    databases: &[ServerDatabaseDir],
    window_start: Instant,
) -> Result<ServerReport> {
    struct Prepared {
        name: String,
        state: StateDb,
        src: Client,
        source: ConnInfo,
        target: ConnInfo,
        opts: Options,
    }
    let mut prepared = Vec::new();
    // Databases an interrupted `cutover --reverse` finished (their reverse stream exists).
    let mut finished = Vec::new();
    for db in databases {
        let state = StateDb::open_in_dir(&db.dir)?;
        let reverse_state = match opts.direction {
            Direction::Forward => reverse::state_of(&db.dir)?,
            Direction::Reverse => None,
        };
        if let Some(reverse_state) = &reverse_state {
            refuse_rolled_back(reverse_state)
                .map_err(|e| e.context(format!("database {}", db.name)))?;
            let source = crate::server::in_database(source, &db.name);
            drop_forward_stream(&source, &state.stream_slot()?.unwrap_or_default()).await;
        }
        if reverse_state.is_some() || state.completed_switch()?.is_some() {
            let slot = state.stream_slot()?.unwrap_or_default();
            let report = already_done(&state, reverse_state.as_ref(), slot)?;
            finished.push((db.name.clone(), report.switched, report.reverse));
            continue;
        }
        if state.stream_slot()?.is_none() {
            bail!(
                "database {}'s work dir {} has no change stream: cutover follows `clone --follow --all-databases`",
                db.name,
                db.dir.display()
            );
        }
        let source = crate::server::in_database(source, &db.name);
        let src = pg::connect(&source, Side::Source, "cutover").await?;
        prepared.push(Prepared {
            name: db.name.clone(),
            state,
            src,
            target: crate::server::in_database(target, &db.name),
            source,
            opts: Options {
                dir: db.dir.clone(),
                fence_roles: opts.fence_roles.clone(),
                pgbouncer: None,
                ..*opts
            },
        });
    }
    if opts.reverse
        && let Some(first) = prepared.first()
    {
        let dst = pg::connect(&first.target, Side::Target, "cutover").await?;
        reverse::require_logical_target(&dst).await?;
    }
    let what = opts.direction.command();
    let lift_all = async |prepared: &[Prepared]| -> String {
        let mut failed = Vec::new();
        for p in prepared {
            if let Err(e) = fence::unfence(&p.src, &p.state).await {
                failed.push(format!("{}: {e:#}", p.name));
            }
        }
        if failed.is_empty() {
            " Every fence is lifted.".to_string()
        } else {
            format!(
                " Lifting the fence FAILED in {}: run `{what} --unfence` with the same --dir.",
                failed.join("; ")
            )
        }
    };
    let mut fenced = Vec::new();
    if opts.fence {
        for p in &prepared {
            match fence::fence(&p.src, &p.state, &opts.fence_roles).await {
                Ok(done) => {
                    for role in done.roles {
                        if !fenced.contains(&role) {
                            fenced.push(role);
                        }
                    }
                }
                Err(e) => {
                    let lifted = lift_all(&prepared).await;
                    return Err(e.context(format!(
                        "{what} failed while fencing database {}.{lifted}",
                        p.name
                    )));
                }
            }
        }
    }
    let switched = futures_util::future::join_all(prepared.iter().map(|p| async {
        switch_over(&p.opts, &p.source, &p.target, &p.src, &p.state)
            .await
            .map_err(|e| e.context(format!("database {}", p.name)))
    }))
    .await;
    let mut done = Vec::new();
    let mut errors = Vec::new();
    let mut leaked = false;
    for (p, result) in prepared.iter().zip(switched) {
        match result {
            Ok(s) => done.push((p.name.clone(), s)),
            Err(e) => {
                leaked |= leak::is_leak(&e);
                errors.push(format!("{e:#}"));
            }
        }
    }
    if !errors.is_empty() {
        // A leak keeps every fence: lifting them would let the writer go on.
        let lifted = if opts.fence && !leaked {
            lift_all(&prepared).await
        } else {
            String::new()
        };
        bail!(
            "`{what}` failed: {}.{lifted} The slots keep the changes; fix the cause and run it again.",
            errors.join("; ")
        );
    }
    let ready = done
        .iter()
        .map(|(_, s)| s.ready_at)
        .max()
        .unwrap_or(window_start);
    let mut reversed = Vec::new();
    if opts.reverse {
        for p in &prepared {
            match reverse::setup(&p.target, &p.opts.dir, &p.state).await {
                Ok(stream) => reversed.push((p.name.clone(), stream)),
                Err(e) => {
                    let lifted = lift_all(&prepared).await;
                    return Err(e.context(format!(
                        "the target is ready, but database {}'s reverse stream could not be set up.{lifted} Run cutover again",
                        p.name
                    )));
                }
            }
        }
        for p in &prepared {
            drop_forward_stream(&p.source, &p.state.stream_slot()?.unwrap_or_default()).await;
        }
    }
    for (p, (_, switched)) in prepared.iter().zip(&done) {
        p.state.record_completed_switch(&CompletedSwitch {
            endpos: switched.endpos,
            at: crate::state::now() as i64,
        })?;
    }
    for (name, switched, stream) in finished {
        done.push((name.clone(), switched));
        if let Some(stream) = stream {
            reversed.push((name, stream));
        }
    }
    Ok(ServerReport {
        window: ready.duration_since(window_start),
        fenced,
        databases: done,
        reversed,
    })
}

/// A completed cutover, for the report.
pub struct Report {
    pub slot: String,
    /// The write downtime: from the fence (or endpos pinned) to the target ready.
    pub window: Duration,
    /// The roles left read-only on the source.
    pub fenced: Vec<String>,
    /// Login superusers the fence leaves able to write.
    pub superusers_left: Vec<String>,
    pub switched: Switched,
    /// The reverse stream (`--reverse`).
    pub reverse: Option<reverse::ReverseStream>,
}

/// The position apply stopped at when it reached endpos, for the report ("unknown" if none).
fn applied_at_endpos(state: &StateDb) -> Result<String> {
    Ok(state
        .sentinel()?
        .applied_lsn
        .map_or_else(|| "unknown".into(), |lsn| lsn.to_string()))
}

/// What the switch-over did once endpos was pinned.
pub struct Switched {
    pub endpos: Lsn,
    pub applied: String,
    pub sequences: usize,
    /// What --refresh-matviews refreshed.
    pub refreshed: Option<String>,
    pub ready_at: Instant,
    pub verdict: String,
}

async fn switch_over(
    args: &Options,
    source: &ConnInfo,
    target: &ConnInfo,
    src: &Client,
    state: &StateDb,
) -> Result<Switched> {
    // After the fence: no fenced session is left to prepare one meanwhile.
    fence::refuse_prepared(src).await?;
    // The insert position covers every commit already visible (asynchronous commit included).
    let endpos: Lsn = pg::current_insert_lsn(src, Side::Source).await?;
    // Recorded before endpos: a running follow sets the sequences when it reaches endpos too,
    // and must add the same offset (and verify --dir expects it).
    state.record_sequence_offset(args.sequence_offset)?;
    follow::set_endpos(state, endpos)?;
    tracing::info!("endpos pinned at {endpos}; waiting for apply to reach it");
    fail::fail_point!(crate::failpoints::CUTOVER_AFTER_ENDPOS);
    tokio::time::timeout(
        args.timeout,
        reach_endpos(source, target, &args.dir, state, endpos),
    )
    .await
    .map_err(|_| {
        anyhow!(
            "apply did not reach endpos {endpos} within {} (is `pgtide follow` or `clone --follow` running and done copying? see `pgtide sentinel get`); raise --timeout to wait longer",
            humantime::format_duration(args.timeout)
        )
    })??;
    let dst = pg::connect(target, Side::Target, "cutover").await?;
    // The filters the migration recorded when it started (invariant 9).
    let filters: Filters = state.recorded_filters()?.unwrap_or_default();
    let seqs = catalog::read_sequences(src, &filters).await?;
    sequences::set_on_target(&dst, &seqs, args.sequence_offset).await?;
    let ready_at = Instant::now();
    // After the target is ready (like verify, it does not hold writes back: it peeks at the
    // slot once the receiver has let it go), before verify, which would only see a difference
    // and lift the fence: whatever committed after endpos on a fenced server got through it.
    if args.fence {
        let (side, again) = (args.direction.fenced(), args.direction.command());
        match leak::check(src, state, &args.dir, endpos).await {
            Ok(None) => {}
            Ok(Some(leaked)) => return Err(leak::leaked_error(&leaked, endpos, side, again)),
            Err(e) => {
                return Err(leak::leaked_error_unchecked(e, side, again));
            }
        }
    }
    let refreshed = if args.refresh_matviews {
        let names = crate::verify::refresh_matviews(target, &filters).await?;
        Some(format!(
            "{} materialized view{} refreshed on the target{}",
            names.len(),
            if names.len() == 1 { "" } else { "s" },
            if names.is_empty() {
                String::new()
            } else {
                format!(" ({})", names.join(", "))
            }
        ))
    } else {
        None
    };
    let verdict = match args.verify {
        VerifyMode::None => "skipped (--verify none)".to_string(),
        mode => {
            let opts = crate::verify::Options {
                filters,
                counts_only: mode == VerifyMode::Counts,
                sequence_offset: args.sequence_offset,
            };
            let report = crate::verify::run(source, target, &opts).await?;
            let what = if mode == VerifyMode::Counts {
                "row counts"
            } else {
                "row counts and checksums"
            };
            if !report.all_match {
                crate::verify::print_report(&report);
                bail!("verify found differences between source and target (see the report above)");
            }
            let matviews = if report.matviews.is_empty() {
                String::new()
            } else {
                format!("; {}", crate::verify::matview_summary(&report))
            };
            format!(
                "{} tables identical ({what}), taking {:.1} s after the target was ready{matviews}",
                report.tables.len(),
                ready_at.elapsed().as_secs_f64()
            )
        }
    };
    Ok(Switched {
        endpos,
        applied: applied_at_endpos(state)?,
        sequences: seqs.len(),
        refreshed,
        ready_at,
        verdict,
    })
}

/// Waits for a running follow to reach endpos, or, when none holds the work dir, runs the
/// follow to endpos in this process.
async fn reach_endpos(
    source: &ConnInfo,
    target: &ConnInfo,
    dir: &std::path::Path,
    state: &StateDb,
    endpos: Lsn,
) -> Result<()> {
    let waiting_since = Instant::now();
    let mut first = true;
    loop {
        if state.sentinel()?.reached_endpos == Some(endpos) {
            return Ok(());
        }
        let not_running = if first {
            None
        } else {
            apply_not_running(state, waiting_since.elapsed())?
        };
        // A follow that stopped cleanly at an earlier endpos (a killed cutover's) may still
        // hold the work dir for a moment while it exits: then apply here. One that stopped
        // on an error, or was killed, is reported as it is.
        let stopped_at_earlier_endpos =
            not_running.is_some() && state.phase()?.phase == Phase::StoppedAtEndpos;
        if first || stopped_at_earlier_endpos {
            first = false;
            if let Ok(workdir) = WorkDir::open(dir, "cutover") {
                if let Some(status) = state.clone_status()?
                    && status != CloneStatus::Done
                {
                    bail!(
                        "the clone in {} is not finished ({status}): resume it with `pgtide clone --follow --resume`, then cut over",
                        dir.display()
                    );
                }
                tracing::info!("no follow is running on this work dir: applying to endpos here");
                let receiver = follow::start_receiver(source, &workdir)?;
                follow::apply_until_endpos(source, target, &workdir, receiver).await?;
                return Ok(());
            }
        }
        if let Some(why) = not_running
            && (!stopped_at_earlier_endpos || waiting_since.elapsed() > WORK_DIR_RELEASE)
        {
            bail!(
                "apply is not running, so endpos {endpos} cannot be reached: {why}. Restart it (`pgtide follow` with the same --dir), or run cutover again: with no follow running it applies to endpos itself"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long a follow seen stopped may keep the work dir locked (it is exiting) before cutover
/// gives up waiting for it.
const WORK_DIR_RELEASE: Duration = Duration::from_secs(15);

/// Why the follow that cutover waits for is not running, if it is not (see
/// `FollowLiveness::not_running`; a process holding the work dir that never recorded a follow
/// counts after the same grace), with the last error the work dir recorded.
fn apply_not_running(state: &StateDb, waited: Duration) -> Result<Option<String>> {
    let why = match state.follow_liveness()? {
        Some(live) => live.not_running(crate::state::now(), LIVENESS_TIMEOUT),
        None => (waited > LIVENESS_TIMEOUT).then(|| {
            "no follow process has run in this work dir (the process holding it does not apply the stream)".to_string()
        }),
    };
    // A killed follow leaves no error of its own: name the last one the work dir recorded.
    Ok(why.map(|why| match state.failure() {
        Ok(Some(error)) if !why.contains(&error) => {
            format!("{why}; the last error recorded: {error}")
        }
        _ => why,
    }))
}
