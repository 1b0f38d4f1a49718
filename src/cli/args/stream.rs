//! The arguments of the change-stream commands: `stream setup | receive | cleanup`,
//! `snapshot`, `spool show` and `sentinel` (where apply ends).

use super::*;

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
