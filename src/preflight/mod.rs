//! Preflight: every known hazard of a migration, found before anything is created (invariant
//! 6). Each check gives OK, WARN or FAIL and, for the last two, the fix to run. `pgtide check`
//! prints them; clone runs the FAIL-level ones that concern it before it creates anything.

//!
//! This file holds the report (`Finding`, `CheckId`, `render`), the options and `run`; the
//! checks themselves live by what they ask: `source.rs`, `target.rs`, `local.rs` (tools and
//! disk), `wal2json.rs`.

pub(crate) mod local;
mod source;
mod target;
mod wal2json;

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use crate::clone::filters::Filters;
use crate::conninfo::ConnInfo;
use crate::pg::{self, Side};
use crate::replication::Plugin;
use local::local_checks;
use source::source_checks;
use target::{connections_check, target_checks};

/// The oldest source server pgtide supports (publications and pg_partition_root).
pub const MIN_SERVER_VERSION: i32 = 120000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// Which check a finding comes from: callers select findings by id, never by their label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CheckId {
    SourceConnection,
    /// A source check failed to run (the error says why).
    SourceCheckError,
    SourceVersion,
    SourceWalLevel,
    SourceReplicationSlots,
    SourceWalSenders,
    SourceReplicationRole,
    SourceReadAccess,
    SourceFilters,
    SourceTablesNotFollowed,
    SourceAppendOnlyTables,
    SourceReplicaIdentity,
    SourceWal2jsonExactness,
    SourceLogicalMessages,
    SourcePartitionedTables,
    SourceUnloggedTables,
    SourceMaterializedViews,
    SourceLargeObjects,
    SourceWal2json,
    SourceEarlierRuns,
    SourceDdlCapture,
    /// How much WAL a stopped follower may make the source keep (max_slot_wal_keep_size).
    SourceSlotWalLimit,
    SourceConnections,
    TargetConnection,
    /// A target check failed to run (the error says why).
    TargetCheckError,
    TargetVersion,
    TargetPrivileges,
    TargetReplicationOrigin,
    TargetExtensions,
    TargetRoles,
    TargetTablespaces,
    /// Whether `cutover --reverse` can decode the target (wal_level = logical).
    TargetReverseStream,
    TargetEmpty,
    TargetConnections,
    LocalPgDump,
    LocalDisk,
}

impl CheckId {
    /// The label printed in the report (and matched by tests and operators' scripts).
    pub fn label(self) -> &'static str {
        match self {
            CheckId::SourceConnection => "source connection",
            CheckId::SourceCheckError => "source",
            CheckId::SourceVersion => "source version",
            CheckId::SourceWalLevel => "source wal_level",
            CheckId::SourceReplicationSlots => "source replication slots",
            CheckId::SourceWalSenders => "source wal senders",
            CheckId::SourceReplicationRole => "source REPLICATION",
            CheckId::SourceReadAccess => "source read access",
            CheckId::SourceFilters => "source filters",
            CheckId::SourceTablesNotFollowed => "source tables not followed",
            CheckId::SourceAppendOnlyTables => "source append-only tables",
            CheckId::SourceReplicaIdentity => "source replica identity",
            CheckId::SourceWal2jsonExactness => "source wal2json exactness",
            CheckId::SourceLogicalMessages => "source logical messages",
            CheckId::SourcePartitionedTables => "source partitioned tables",
            CheckId::SourceUnloggedTables => "source unlogged tables",
            CheckId::SourceMaterializedViews => "source materialized views",
            CheckId::SourceLargeObjects => "source large objects",
            CheckId::SourceWal2json => "source wal2json",
            CheckId::SourceEarlierRuns => "source earlier runs",
            CheckId::SourceDdlCapture => "source DDL capture",
            CheckId::SourceSlotWalLimit => "source slot WAL limit",
            CheckId::SourceConnections => "source connections",
            CheckId::TargetConnection => "target connection",
            CheckId::TargetCheckError => "target",
            CheckId::TargetVersion => "target version",
            CheckId::TargetPrivileges => "target privileges",
            CheckId::TargetReplicationOrigin => "target replication origin",
            CheckId::TargetExtensions => "target extensions",
            CheckId::TargetRoles => "target roles",
            CheckId::TargetTablespaces => "target tablespaces",
            CheckId::TargetReverseStream => "target reverse stream",
            CheckId::TargetEmpty => "target empty",
            CheckId::TargetConnections => "target connections",
            CheckId::LocalPgDump => "local pg_dump",
            CheckId::LocalDisk => "local disk",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// The check it comes from; `check` is its label.
    #[serde(skip)]
    pub id: CheckId,
    pub level: Level,
    pub check: String,
    pub message: String,
    pub fix: Option<String>,
}

/// What to check for.
#[derive(Clone)]
pub struct CheckOptions {
    pub source: ConnInfo,
    pub target: Option<ConnInfo>,
    pub plugin: Plugin,
    pub filters: Filters,
    /// clone + follow (needs logical decoding and replica identities) or a plain clone.
    pub online: bool,
    pub table_jobs: usize,
    pub index_jobs: usize,
    /// --apply-jobs: apply's target connections, open once the copy's are closed.
    pub apply_jobs: usize,
    pub dir: PathBuf,
    pub drop_if_exists: bool,
    /// --replica-identity-full / --append-only, as follow will be given them.
    pub identity: Identity,
    /// The clone's --no-owner / --no-acl: roles are then not needed on the target.
    pub no_owner: bool,
    pub no_acl: bool,
    /// The clone's --no-tablespaces: the source's tablespaces are then not needed.
    pub no_tablespaces: bool,
    /// --wal2json-nan-as-null: the operator accepts that wal2json turns NaN / ±Infinity of
    /// numeric and float columns into NULL.
    pub wal2json_nan_as_null: bool,
}

/// How tables without a primary key will be published (the CLI's --replica-identity-full and
/// --append-only, as plain values).
#[derive(Clone, Debug, Default)]
pub struct Identity {
    /// pgtide sets REPLICA IDENTITY FULL on published tables that have no identity.
    pub replica_identity_full: bool,
    /// Tables declared append-only (schema.table or table): published for INSERT and TRUNCATE.
    pub append_only: Vec<String>,
    /// --no-ddl-capture: schema changes during follow are not captured.
    pub no_ddl_capture: bool,
}

impl CheckOptions {
    /// An online check of these servers with no jobs, filters or options; callers set what
    /// their command was given.
    pub fn new(source: ConnInfo, target: Option<ConnInfo>, dir: PathBuf) -> Self {
        CheckOptions {
            source,
            target,
            plugin: Plugin::Pgoutput,
            filters: Filters::default(),
            online: true,
            table_jobs: 0,
            index_jobs: 0,
            apply_jobs: 1,
            dir,
            drop_if_exists: false,
            identity: Default::default(),
            no_owner: false,
            no_acl: false,
            no_tablespaces: false,
            wal2json_nan_as_null: false,
        }
    }
}

#[derive(Default)]
pub(crate) struct Report(Vec<Finding>);

impl Report {
    fn push(&mut self, level: Level, id: CheckId, message: impl Into<String>, fix: Option<String>) {
        self.0.push(Finding {
            id,
            level,
            check: id.label().into(),
            message: message.into(),
            fix,
        });
    }
    fn ok(&mut self, check: CheckId, message: impl Into<String>) {
        self.push(Level::Ok, check, message, None);
    }
    fn warn(&mut self, check: CheckId, message: impl Into<String>, fix: impl Into<String>) {
        self.push(Level::Warn, check, message, Some(fix.into()));
    }
    fn fail(&mut self, check: CheckId, message: impl Into<String>, fix: impl Into<String>) {
        self.push(Level::Fail, check, message, Some(fix.into()));
    }
}

/// Runs every check; a server that cannot be reached is a FAIL line, not an error.
pub async fn run(opts: &CheckOptions) -> Vec<Finding> {
    let mut report = Report::default();
    let source = match pg::connect(&opts.source, Side::Source, "check").await {
        Ok(c) => Some(c),
        Err(e) => {
            report.fail(
                CheckId::SourceConnection,
                format!("{e:#}"),
                "fix the --source connection string, the network or the server",
            );
            None
        }
    };
    let mut source_major = None;
    let mut source_size = None;
    let mut target_major = None;
    if let Some(src) = &source {
        match source_checks(&mut report, src, opts).await {
            Ok((major, size)) => {
                source_major = Some(major);
                source_size = Some(size);
            }
            Err(e) => report.fail(
                CheckId::SourceCheckError,
                format!("a check failed to run: {e:#}"),
                "see the error",
            ),
        }
    }
    if let Some(target_info) = &opts.target {
        match pg::connect(target_info, Side::Target, "check").await {
            Ok(dst) => {
                match target_checks(&mut report, &dst, source.as_ref(), source_major, opts).await {
                    Ok(major) => target_major = Some(major),
                    Err(e) => report.fail(
                        CheckId::TargetCheckError,
                        format!("a check failed to run: {e:#}"),
                        "see the error",
                    ),
                }
                if let Some(src) = source.as_ref() {
                    // The copy's connections are closed before apply opens its lanes.
                    let copy = (opts.table_jobs + opts.index_jobs + 2) as i64;
                    let target = copy.max(opts.apply_jobs as i64 + 2);
                    for (side, client, budget) in
                        [(Side::Source, src, copy), (Side::Target, &dst, target)]
                    {
                        if let Err(e) = connections_check(&mut report, side, client, budget).await {
                            let id = match side {
                                Side::Source => CheckId::SourceCheckError,
                                Side::Target => CheckId::TargetCheckError,
                            };
                            report.fail(id, format!("{e:#}"), "see the error");
                        }
                    }
                }
            }
            Err(e) => report.fail(
                CheckId::TargetConnection,
                format!("{e:#}"),
                "fix the --target connection string, the network or the server",
            ),
        }
    }
    if let Some(major) = source_major {
        local_checks(&mut report, major, target_major, source_size, opts).await;
    }
    report.0
}

/// The FAIL-level checks, run by clone (and clone --follow) before it creates anything.
pub async fn preflight(opts: &CheckOptions) -> Result<()> {
    preflight_only(opts, |_| true).await
}

/// The checks that concern `pgtide follow` on an existing stream: both servers reachable,
/// logical decoding and replication allowed on the source, replication origins on the target.
pub async fn preflight_follow(opts: &CheckOptions) -> Result<()> {
    preflight_only(opts, |check| {
        matches!(
            check,
            CheckId::SourceConnection
                | CheckId::TargetConnection
                | CheckId::SourceWalLevel
                | CheckId::SourceReplicationRole
                | CheckId::SourceWalSenders
                | CheckId::TargetReplicationOrigin
        )
    })
    .await
}

async fn preflight_only(opts: &CheckOptions, concerns: impl Fn(CheckId) -> bool) -> Result<()> {
    let failed: Vec<Finding> = run(opts)
        .await
        .into_iter()
        .filter(|f| f.level == Level::Fail && concerns(f.id))
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = failed
        .iter()
        .map(|f| {
            format!(
                "{}: {} (fix: {})",
                f.check,
                f.message,
                f.fix.as_deref().unwrap_or("-")
            )
        })
        .collect();
    anyhow::bail!(
        "preflight found {} problem(s); nothing was created:\n  {}\n(`pgtide check` prints the full report)",
        failed.len(),
        lines.join("\n  ")
    )
}

/// The report as text: one line per check, fixes indented under WARN and FAIL.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        let level = match f.level {
            Level::Ok => "OK  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        out.push_str(&format!("{level}  {:<28} {}\n", f.check, f.message));
        if let Some(fix) = &f.fix
            && f.level != Level::Ok
        {
            out.push_str(&format!("      {:<28} fix: {fix}\n", ""));
        }
    }
    out
}
