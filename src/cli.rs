//! Command-line definitions (clap), logging setup and exit codes.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::units::parse_size;

#[derive(Parser, Debug)]
#[command(
    name = "pgtide",
    version,
    about = "Move a live PostgreSQL database to another server with seconds of downtime"
)]
pub struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PGTIDE_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Preflight: every known hazard, found before anything is created (OK / WARN / FAIL with
    /// the fix); with --source alone, a connection test that prints the server version.
    Check(CheckArgs),
    /// Copy schema, data, indexes, constraints and sequences from source to target, consistent
    /// with one snapshot.
    Clone(CloneArgs),
    /// Where a migration stands: phase, clone progress, positions, lag in bytes and seconds,
    /// apply rate, and a verdict; from another shell while it runs, or after.
    Status(StatusArgs),
    /// Switch over: optionally fence writes on the source, pin endpos at its current position,
    /// wait for apply to reach it, copy sequences, verify, and report the write downtime.
    Cutover(CutoverArgs),
    /// Continue a migration: spool the stream and apply it on the target until endpos.
    Follow(FollowArgs),
    /// Read or set endpos and the apply switch of a migration.
    #[command(subcommand)]
    Sentinel(SentinelCommand),
    /// Compare source and target table by table: row counts and content checksums.
    Verify(VerifyArgs),
    /// Copy things logical replication does not carry.
    #[command(subcommand)]
    Copy(CopyCommand),
    /// Drop the slot, the publication, the origin and the pgtide schema; mark the work dir
    /// done. Safe to run twice.
    Cleanup(CleanupArgs),
    /// Create the publication and a logical slot, print its exported snapshot and consistent
    /// LSN, and hold the snapshot until interrupted (for driving pg_dump or other tools).
    Snapshot(SnapshotArgs),
    /// The change stream alone: set up the slot, receive into the spool, clean up.
    #[command(subcommand)]
    Stream(StreamCommand),
    /// Inspect the spool.
    #[command(subcommand)]
    Spool(SpoolCommand),
}

/// How tables without a primary key are published.
#[derive(Args, Debug, Clone, Default)]
pub struct IdentityArgs {
    /// Run ALTER TABLE … REPLICA IDENTITY FULL on the source for every published table that has
    /// neither a primary key nor a replica identity.
    #[arg(long)]
    pub replica_identity_full: bool,
    /// A table the DBA declares append-only (repeatable; schema.table or table): published for
    /// INSERT and TRUNCATE only, so it needs no replica identity. Its UPDATEs and DELETEs are
    /// NOT replicated.
    #[arg(long = "append-only", value_name = "TABLE")]
    pub append_only: Vec<String>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub identity: IdentityArgs,
    /// Source connection string.
    #[arg(long, env = "PGTIDE_SOURCE_PGURI", hide_env_values = true)]
    pub source: String,
    /// Target connection string (without it only the source and the local tools are checked).
    #[arg(long, env = "PGTIDE_TARGET_PGURI", hide_env_values = true)]
    pub target: Option<String>,
    /// The logical decoding plugin follow will use.
    #[arg(long, value_enum, default_value = "pgoutput")]
    pub plugin: crate::replication::Plugin,
    /// With wal2json: accept that a NaN or ±Infinity written to a nullable numeric, real or
    /// double precision column arrives on the target as NULL (wal2json prints them as null).
    #[arg(long)]
    pub wal2json_nan_as_null: bool,
    /// The filters file the migration will use.
    #[arg(long)]
    pub filters: Option<PathBuf>,
    /// Check for a plain clone (no logical decoding, no replica identities needed).
    #[arg(long)]
    pub offline: bool,
    /// Print one JSON array instead of the report.
    #[arg(long)]
    pub json: bool,
    #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// The clone's --table-jobs (for the connection budget).
    #[arg(long, default_value_t = 4)]
    pub table_jobs: usize,
    /// The clone's --index-jobs (for the connection budget).
    #[arg(long, default_value_t = 4)]
    pub index_jobs: usize,
    /// The clone will run with --drop-if-exists (a non-empty target is then a warning).
    #[arg(long)]
    pub drop_if_exists: bool,
    /// The clone will run with --no-owner (owners' roles are then not needed on the target).
    #[arg(long)]
    pub no_owner: bool,
    /// The clone will run with --no-acl (grantees are then not needed on the target).
    #[arg(long)]
    pub no_acl: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Print one JSON object (the fields are documented in the README).
    #[arg(long)]
    pub json: bool,
    /// Refresh every INTERVAL (default 2s) until interrupted.
    #[arg(long, num_args = 0..=1, default_missing_value = "2s", value_parser = humantime::parse_duration)]
    pub watch: Option<std::time::Duration>,
    /// Source to ask (default: the one the work dir recorded, password from PGPASSWORD/.pgpass).
    #[arg(long, env = "PGTIDE_SOURCE_PGURI", hide_env_values = true)]
    pub source: Option<String>,
    /// Target to ask (default: the one the work dir recorded).
    #[arg(long, env = "PGTIDE_TARGET_PGURI", hide_env_values = true)]
    pub target: Option<String>,
}

#[derive(Args, Debug)]
pub struct CutoverArgs {
    #[command(flatten)]
    pub endpoints: Endpoints,
    #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Make the application roles read-only on the source database and end their sessions
    /// before pinning endpos (restored if the cutover fails; lift with --unfence).
    #[arg(long)]
    pub fence: bool,
    /// The roles to fence (repeatable); by default every non-superuser login role except the
    /// one pgtide connects as.
    #[arg(long = "fence-role", requires = "fence")]
    pub fence_roles: Vec<String>,
    /// Lift the fence of an earlier cutover and exit.
    #[arg(long, conflicts_with = "fence")]
    pub unfence: bool,
    /// How long to wait for apply to reach endpos.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// How to verify the target once endpos is reached.
    #[arg(long, value_enum, default_value_t = VerifyMode::Checksums)]
    pub verify: VerifyMode,
    /// Added to every sequence value set on the target.
    #[arg(long, default_value_t = 0)]
    pub sequence_offset: i64,
    /// Refresh the materialized views on the target once the data is final, before verify
    /// (a materialized view holds what its last REFRESH saw).
    #[arg(long)]
    pub refresh_matviews: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum VerifyMode {
    Checksums,
    Counts,
    None,
}

#[derive(Args, Debug)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub endpoints: Endpoints,
    #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// The slot to clean up when the work dir does not name one.
    #[arg(long)]
    pub slot_name: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum CopyCommand {
    /// Set every target sequence from the source's current value (plus --offset).
    Sequences(CopySequencesArgs),
}

#[derive(Args, Debug)]
pub struct CopySequencesArgs {
    #[command(flatten)]
    pub endpoints: Endpoints,
    /// Added to every value: a safety gap before traffic switches to the target.
    #[arg(long, default_value_t = 0)]
    pub offset: i64,
    /// The filters file the migration used.
    #[arg(long)]
    pub filters: Option<PathBuf>,
    /// The migration's work dir: its recorded filters are used and the offset is recorded
    /// (so that `verify --dir` expects the target ahead).
    #[arg(long, env = "PGTIDE_DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct FollowArgs {
    #[command(flatten)]
    pub endpoints: Endpoints,
    /// Serve Prometheus metrics on http://HOST:PORT/metrics while this runs.
    #[arg(long, env = "PGTIDE_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Stop after the last transaction committed at or before this LSN (or set it later with
    /// `pgtide sentinel set endpos`).
    #[arg(long, value_parser = parse_lsn)]
    pub endpos: Option<crate::pg::Lsn>,
    /// With a wal2json stream: accept that a NaN or ±Infinity written to a nullable numeric,
    /// real or double precision column arrives on the target as NULL (recorded in the work
    /// dir).
    #[arg(long)]
    pub wal2json_nan_as_null: bool,
}

#[derive(Subcommand, Debug)]
pub enum SentinelCommand {
    /// Print startpos, endpos, the apply switch and the received / spooled / applied positions.
    Get {
        #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// `set endpos <LSN>`, `set endpos --current --source …`, or `set apply`.
    Set(SentinelSetArgs),
}

#[derive(Args, Debug)]
pub struct SentinelSetArgs {
    #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// endpos or apply.
    pub what: String,
    /// The LSN for endpos (`none` clears it).
    pub lsn: Option<String>,
    /// endpos = the source's current WAL flush position.
    #[arg(long)]
    pub current: bool,
    /// The source, for --current.
    #[arg(long, env = "PGTIDE_SOURCE_PGURI", hide_env_values = true)]
    pub source: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum StreamCommand {
    /// Create the publication and the slot; record the start position in state.db.
    Setup(StreamSetupArgs),
    /// Receive the stream into the spool until --endpos or Ctrl-C; rerun to continue.
    Receive(StreamReceiveArgs),
    /// Drop the slot and the publication (safe to run twice).
    Cleanup(StreamCleanupArgs),
}

#[derive(Subcommand, Debug)]
pub enum SpoolCommand {
    /// Print spooled changes as JSON lines.
    Show(SpoolShowArgs),
}

/// The source alone.
#[derive(Args, Debug)]
pub struct SourceArg {
    /// Source connection string (postgres://user@host:port/db or "host=… dbname=…").
    #[arg(long, env = "PGTIDE_SOURCE_PGURI", hide_env_values = true)]
    pub source: String,
}

#[derive(Args, Debug)]
pub struct SlotArgs {
    /// Logical decoding output plugin.
    #[arg(long, value_enum, default_value = "pgoutput")]
    pub plugin: crate::replication::Plugin,
    /// With wal2json: accept that a NaN or ±Infinity written to a nullable numeric, real or
    /// double precision column arrives on the target as NULL (wal2json prints them as null).
    #[arg(long)]
    pub wal2json_nan_as_null: bool,
    /// Replication slot name; the publication is pgtide_<slot>.
    #[arg(long, default_value = "pgtide")]
    pub slot_name: String,
    /// Filters file (the clone's format): only the selected tables are published.
    #[arg(long)]
    pub filters: Option<PathBuf>,
    #[command(flatten)]
    pub identity: IdentityArgs,
}

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub source: SourceArg,
    #[command(flatten)]
    pub slot: SlotArgs,
}

#[derive(Args, Debug)]
pub struct StreamSetupArgs {
    #[command(flatten)]
    pub source: SourceArg,
    #[command(flatten)]
    pub slot: SlotArgs,
    #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
    pub dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct StreamReceiveArgs {
    #[command(flatten)]
    pub source: SourceArg,
    /// Adopt this existing slot (e.g. one `pgtide snapshot` created) when the work dir has no
    /// stream yet.
    #[arg(long)]
    pub slot_name: Option<String>,
    /// The adopted slot's plugin.
    #[arg(long, value_enum, default_value = "pgoutput")]
    pub plugin: crate::replication::Plugin,
    #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Stop once every transaction committed at or before this LSN is spooled.
    #[arg(long, value_parser = parse_lsn)]
    pub endpos: Option<crate::pg::Lsn>,
}

#[derive(Args, Debug)]
pub struct StreamCleanupArgs {
    #[command(flatten)]
    pub source: SourceArg,
    #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// The slot to drop when the work dir does not name one.
    #[arg(long)]
    pub slot_name: Option<String>,
}

#[derive(Args, Debug)]
pub struct SpoolShowArgs {
    #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Only changes at or after this LSN.
    #[arg(long, value_parser = parse_lsn)]
    pub from: Option<crate::pg::Lsn>,
    /// At most this many changes.
    #[arg(long)]
    pub limit: Option<usize>,
}

fn parse_lsn(text: &str) -> Result<crate::pg::Lsn, String> {
    text.parse()
}

/// Source and target connection strings (libpq URI or key=value).
#[derive(Args, Debug)]
pub struct Endpoints {
    /// Source connection string (postgres://user@host:port/db or "host=… dbname=…").
    #[arg(long, env = "PGTIDE_SOURCE_PGURI", hide_env_values = true)]
    pub source: String,
    /// Target connection string.
    #[arg(long, env = "PGTIDE_TARGET_PGURI", hide_env_values = true)]
    pub target: String,
}

#[derive(Args, Debug)]
pub struct CloneArgs {
    #[command(flatten)]
    pub endpoints: Endpoints,
    #[command(flatten)]
    pub identity: IdentityArgs,
    /// Serve Prometheus metrics on http://HOST:PORT/metrics while this runs.
    #[arg(long, env = "PGTIDE_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Work dir holding state.db and the schema dumps.
    #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Parallel table copy workers (each uses one connection on each server).
    #[arg(long, default_value_t = 4)]
    pub table_jobs: usize,
    /// Parallel index build workers (each uses one target connection).
    #[arg(long, default_value_t = 4)]
    pub index_jobs: usize,
    /// Split tables whose heap + TOAST size exceeds this into ctid ranges copied in parallel
    /// (e.g. 1GB, 200MB); 0 disables splitting.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub split_tables_larger_than: u64,
    /// Filters file (INI sections include-only-schema, exclude-schema, include-only-table,
    /// exclude-table, exclude-table-data).
    #[arg(long)]
    pub filters: Option<PathBuf>,
    /// Drop target objects that already exist (a previous attempt) before creating them.
    #[arg(long)]
    pub drop_if_exists: bool,
    /// Continue an interrupted clone in the same work dir.
    #[arg(long, conflicts_with = "restart")]
    pub resume: bool,
    /// Forget the work dir's previous clone and start over.
    #[arg(long)]
    pub restart: bool,
    /// Use this exported snapshot instead of exporting one (its exporter must stay open).
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Do not run VACUUM ANALYZE on the target tables at the end.
    #[arg(long)]
    pub skip_vacuum: bool,
    /// Do not copy large object contents.
    #[arg(long)]
    pub skip_large_objects: bool,
    /// Do not restore object ownership (pg_restore --no-owner).
    #[arg(long)]
    pub no_owner: bool,
    /// Do not restore privileges (pg_restore --no-acl).
    #[arg(long)]
    pub no_acl: bool,
    /// The whole migration: create a slot, copy under its snapshot while spooling the change
    /// stream, then apply it until endpos (`pgtide sentinel set endpos`).
    #[arg(long)]
    pub follow: bool,
    /// The slot for --follow; the publication is pgtide_<slot>, the origin pgtide_<slot>.
    #[arg(long, default_value = "pgtide")]
    pub slot_name: String,
    /// The logical decoding plugin for --follow (default pgoutput); recorded in the work dir,
    /// so follow, cutover, cleanup and --resume use the same.
    #[arg(long, value_enum, requires = "follow")]
    pub plugin: Option<crate::replication::Plugin>,
    /// With wal2json: accept that a NaN or ±Infinity written to a nullable numeric, real or
    /// double precision column arrives on the target as NULL (wal2json prints them as null).
    #[arg(long, requires = "follow")]
    pub wal2json_nan_as_null: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub endpoints: Endpoints,
    /// Compare row counts only (fast), not content checksums.
    #[arg(long)]
    pub counts_only: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// The filters file the clone used, so excluded tables are not reported as missing.
    #[arg(long)]
    pub filters: Option<PathBuf>,
    /// The migration's work dir: its recorded filters and sequence offset are used.
    #[arg(long, env = "PGTIDE_DIR")]
    pub dir: Option<PathBuf>,
}
