//! The arguments of the live-migration commands: `follow`, `cutover`, `status`, `cleanup`
//! and `copy sequences`.

use super::*;

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
    /// Add the trend over this past window (e.g. 1h) from the recorded history: lag, apply
    /// rate, retained WAL, spool (with --json: the points, under "history").
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<std::time::Duration>,
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
    /// The roles to fence (repeatable); by default every non-superuser login role and the one
    /// pgtide connects as (pgtide's own sessions still write; other sessions of that role are
    /// ended). Superusers are only fenced when named here.
    #[arg(long = "fence-role", requires = "fence")]
    pub fence_roles: Vec<String>,
    /// Before the application moves, start a reverse stream on the target (it needs
    /// wal_level = logical there): every change written on the target after cutover is kept
    /// for `pgtide reverse follow` to apply to the source, so that `pgtide rollback` loses
    /// nothing. The forward slot is dropped once the reverse stream exists.
    #[arg(long, conflicts_with = "unfence")]
    pub reverse: bool,
    #[command(flatten)]
    pub pgbouncer: PgbouncerArgs,
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

pub use crate::cutover::VerifyMode;

/// `--verify checksums|counts|none`: the cutover's verify mode as a clap value.
impl ValueEnum for VerifyMode {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Checksums, Self::Counts, Self::None]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(match self {
            Self::Checksums => "checksums",
            Self::Counts => "counts",
            Self::None => "none",
        }))
    }
}

/// PgBouncer around a cutover or rollback.
#[derive(Args, Debug, Clone, Default)]
pub struct PgbouncerArgs {
    /// PgBouncer's admin console (postgres://admin@pooler:6432/pgbouncer): PAUSE before the
    /// fence, so that the application's queries wait in the pooler, RESUME once the switch is
    /// done (or failed).
    #[arg(long, env = "PGTIDE_PGBOUNCER_URI", hide_env_values = true)]
    pub pgbouncer: Option<String>,
    /// The pooler's database to pause (default: every database of the pooler).
    #[arg(long, requires = "pgbouncer")]
    pub pgbouncer_database: Option<String>,
    /// RELOAD the pooler before RESUME on success: a pgbouncer.ini edited beforehand to point
    /// at the new server is read then, and the waiting queries run there.
    #[arg(long, requires = "pgbouncer")]
    pub pgbouncer_reload: bool,
}

/// The dashboard of a running clone or follow.
#[derive(Args, Debug, Clone, Default)]
pub struct HttpArgs {
    /// Serve the dashboard and its API (/, /api/status, /api/history, /metrics) on
    /// HOST:PORT, or PORT on localhost, while this runs. Read-only.
    #[arg(long, env = "PGTIDE_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// With --http-addr: allow the API's actions (POST /api/verify, /api/endpos,
    /// /api/cutover) for requests carrying `Authorization: Bearer TOKEN` (16 characters or
    /// more). Without it the dashboard is read-only.
    #[arg(
        long,
        env = "PGTIDE_HTTP_TOKEN",
        hide_env_values = true,
        requires = "http_addr"
    )]
    pub http_token: Option<String>,
}

/// `pgtide serve`: the dashboard of a work dir whose run has stopped (or runs elsewhere).
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// HOST:PORT, or PORT on localhost.
    #[arg(long, env = "PGTIDE_HTTP_ADDR", default_value = "127.0.0.1:8187")]
    pub http_addr: String,
    /// Allow the API's actions for requests carrying `Authorization: Bearer TOKEN`.
    #[arg(long, env = "PGTIDE_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
    /// Source to ask (default: the one the work dir recorded, password from PGPASSWORD/.pgpass).
    #[arg(long, env = "PGTIDE_SOURCE_PGURI", hide_env_values = true)]
    pub source: Option<String>,
    /// Target to ask (default: the one the work dir recorded).
    #[arg(long, env = "PGTIDE_TARGET_PGURI", hide_env_values = true)]
    pub target: Option<String>,
}

/// `pgtide rollback`: the cutover undone through the reverse stream.
#[derive(Args, Debug)]
pub struct RollbackArgs {
    /// The migration's source and target, as given to cutover (pgtide swaps them itself).
    #[command(flatten)]
    pub endpoints: Endpoints,
    #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// The target roles to fence (repeatable); by default every non-superuser login role and
    /// the one pgtide connects to the target as.
    #[arg(long = "fence-role")]
    pub fence_roles: Vec<String>,
    /// Lift the target's fence left by an earlier rollback, and exit.
    #[arg(long)]
    pub unfence: bool,
    /// How long to wait for the reverse stream to reach the target's endpos.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// How to verify the source once the reverse stream is applied.
    #[arg(long, value_enum, default_value_t = VerifyMode::Checksums)]
    pub verify: VerifyMode,
    /// Added to every sequence value set on the source from the target's.
    #[arg(long, default_value_t = 0)]
    pub sequence_offset: i64,
    #[command(flatten)]
    pub pgbouncer: PgbouncerArgs,
}

/// `pgtide reverse follow|status`: the reverse stream between cutover and rollback.
#[derive(Subcommand, Debug)]
pub enum ReverseCommand {
    /// Apply the target's changes to the source as they come (until rollback, or Ctrl-C: a
    /// rerun continues exactly where the source's committed state ends).
    Follow(ReverseFollowArgs),
    /// Where the reverse stream stands: its lag, and whether a rollback has run.
    Status(StatusArgs),
}

#[derive(Args, Debug)]
pub struct ReverseFollowArgs {
    /// The migration's source and target, as given to cutover.
    #[command(flatten)]
    pub endpoints: Endpoints,
    #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Source connections that apply the reverse stream side by side (default 1).
    #[arg(long)]
    pub apply_jobs: Option<usize>,
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
    /// Copy the source server's roles to the target: attributes, password hashes,
    /// memberships, per-role settings, comments. Never touches the role pgtide connects to
    /// the target as, nor the target's bootstrap superuser. Safe to rerun.
    Roles(CopyRolesArgs),
}

#[derive(Args, Debug)]
pub struct CopyRolesArgs {
    #[command(flatten)]
    pub endpoints: Endpoints,
    /// Copy the roles without their passwords (reading password hashes needs a superuser on
    /// the source); set them on the target afterwards with ALTER ROLE … PASSWORD.
    #[arg(long)]
    pub no_role_passwords: bool,
    /// A source role not to copy, with its memberships and settings (repeatable): a managed
    /// service's own administrator roles, say (rdsadmin, cloudsqladmin, azure_superuser).
    #[arg(long = "exclude-role", value_name = "ROLE")]
    pub exclude_roles: Vec<String>,
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
    #[command(flatten)]
    pub http: HttpArgs,
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
    /// Target connections that apply the change stream side by side (default 1). Batches of
    /// whole source transactions run at once when they touch different rows and commit in
    /// source order, so a restart resumes exactly; recorded in the work dir for later runs.
    /// Each lane uses one target connection and one replication origin.
    #[arg(long)]
    pub apply_jobs: Option<usize>,
    /// Add a source table to the migration while its follow runs (repeatable): created on the
    /// target if missing, published, copied under its own snapshot, then followed. Exits when
    /// done; the running follow keeps going.
    #[arg(long = "add-table", value_name = "TABLE")]
    pub add_tables: Vec<String>,
    /// Copy a followed table again under a new snapshot (repeatable), e.g. after it diverged
    /// on the target; the running follow keeps going.
    #[arg(long = "resync", value_name = "TABLE")]
    pub resync_tables: Vec<String>,
    /// Stop following a table (repeatable): unpublished, its changes no longer applied, left
    /// out of verify and cutover. Its table on the target is kept.
    #[arg(long = "remove-table", value_name = "TABLE")]
    pub remove_tables: Vec<String>,
    /// With --add-table / --resync: how long to wait for the running follow to take the
    /// request into account.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub request_timeout: std::time::Duration,
}
