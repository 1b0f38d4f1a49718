//! The command line: every subcommand's clap definitions, and the clap side of the engine
//! types it parses (the plugin). Nothing outside `cli/` and `main.rs` names clap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod clone;
mod follow;
mod stream;

pub use clone::*;
pub use follow::*;
pub use stream::*;

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
    /// What a clone with these options would create and copy (databases, roles, tables with
    /// their sizes and parts, indexes, sequences, large objects), the connections it needs,
    /// the preflight's findings, and an estimate of its time from a short measured sample and
    /// of the WAL the slot keeps meanwhile. Read-only; the same as `clone --dry-run`.
    Plan(CloneArgs),
    /// Where a migration stands: phase, clone progress, positions, lag in bytes and seconds,
    /// apply rate, and a verdict; from another shell while it runs, or after.
    Status(StatusArgs),
    /// Switch over: optionally fence writes on the source, pin endpos at its current position,
    /// wait for apply to reach it, copy sequences, verify, and report the write downtime.
    Cutover(CutoverArgs),
    /// Serve the dashboard and its API for a work dir (its run stopped, or runs elsewhere),
    /// until interrupted.
    Serve(ServeArgs),
    /// Undo a cutover made with --reverse: fence the target, apply the rest of the reverse
    /// stream to the source, set the source's sequences, verify, and lift the source's fence.
    Rollback(RollbackArgs),
    /// The reverse stream after `cutover --reverse`: keep the source in step, or watch it.
    #[command(subcommand)]
    Reverse(ReverseCommand),
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
    /// The schema change apply stopped on (DDL capture): show it, skip it, or replay it anyway.
    #[command(subcommand)]
    Ddl(DdlCommand),
}

/// `pgtide ddl show|skip|retry`: the operator's say on a schema change apply stopped on. The
/// decision is recorded in the work dir; start the follow again to act on it.
#[derive(Subcommand, Debug)]
pub enum DdlCommand {
    /// Print the schema change apply stopped on, why, and the decisions taken so far.
    Show(DdlArgs),
    /// Go past it without running it on the target (you made the change yourself, or do not
    /// want it there).
    Skip(DdlArgs),
    /// Run it on the target as captured, although pgtide judged it unsafe to replay.
    Retry(DdlArgs),
}

#[derive(Args, Debug)]
pub struct DdlArgs {
    #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
    pub dir: PathBuf,
}

/// How tables are published: those without a primary key, and those created during follow.
#[derive(Args, Debug, Clone, Default)]
pub struct IdentityArgs {
    /// Do not install the DDL capture event triggers on the source: a schema change during
    /// follow then stops apply until you make it on the target yourself, and tables created
    /// on the source are not followed.
    #[arg(long)]
    pub no_ddl_capture: bool,
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

/// The plugin as a clap value (`--plugin pgoutput|wal2json`): the replication module knows
/// nothing of clap.
impl ValueEnum for crate::replication::Plugin {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Pgoutput, Self::Wal2json]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// `--toast-compression lz4|pglz|keep` as a clap value (the clone module knows nothing of clap).
impl ValueEnum for crate::clone::toast::ToastCompression {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Lz4, Self::Pglz, Self::Keep]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
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
