//! The arguments of `clone`, `verify` and `check`: what is copied and compared, and how.

use super::*;

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
    /// The follow's --apply-jobs (for the target's connection budget).
    #[arg(long, default_value_t = 1)]
    pub apply_jobs: usize,
    /// The clone will run with --drop-if-exists (a non-empty target is then a warning).
    #[arg(long)]
    pub drop_if_exists: bool,
    /// The clone will run with --no-owner (owners' roles are then not needed on the target).
    #[arg(long)]
    pub no_owner: bool,
    /// The clone will run with --no-acl (grantees are then not needed on the target).
    #[arg(long)]
    pub no_acl: bool,
    /// The clone will run with --no-tablespaces (the source's tablespaces are then not needed
    /// on the target).
    #[arg(long)]
    pub no_tablespaces: bool,
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
    #[command(flatten)]
    pub http: HttpArgs,
    /// Work dir holding state.db and the schema dumps.
    #[arg(long, env = "PGTIDE_DIR", default_value = crate::workdir::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Parallel table copy workers (each uses one connection on each server).
    #[arg(long, default_value_t = 4)]
    pub table_jobs: usize,
    /// Parallel index build workers (each uses one target connection).
    #[arg(long, default_value_t = 4)]
    pub index_jobs: usize,
    /// Split tables into ctid ranges copied in parallel: auto (the default) splits a table
    /// larger than an even share of the data when both servers have idle cores for more
    /// streams (measured, see --copy-cores); a size (e.g. 1GB, 200MB) splits every table above
    /// it into parts of that size; 0 never splits.
    #[arg(long, default_value = "auto", value_parser = parse_split)]
    pub split_tables_larger_than: SplitArg,
    /// The copy streams both servers can run at full speed, for --split-tables-larger-than
    /// auto. Measured when not given (about a second of CPU-bound queries on both servers).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub copy_cores: Option<u16>,
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
    /// How the copy compresses TOASTed values on the target: lz4 (the default where the
    /// target has it, 14+; several times faster than pglz), pglz, or keep (the target's
    /// default_toast_compression). Invisible to SQL; later writes follow the target's setting.
    #[arg(long, value_enum)]
    pub toast_compression: Option<crate::clone::toast::ToastCompression>,
    /// Target settings for the bulk load (maintenance_work_mem, max_wal_size,
    /// checkpoint_timeout, wal_compression; with =unsafe also fsync, full_page_writes and
    /// synchronous_commit off) through ALTER SYSTEM, recorded in the work dir first and
    /// restored when the copy ends, on failure, by the next run or by cleanup. Needs a
    /// superuser on the target.
    #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "safe")]
    pub fast_restore: Option<crate::clone::fast_restore::FastRestore>,
    /// Do not restore object ownership (pg_restore --no-owner).
    #[arg(long)]
    pub no_owner: bool,
    /// Do not restore privileges (pg_restore --no-acl).
    #[arg(long)]
    pub no_acl: bool,
    /// Create every table and index in the target's default tablespace (pg_restore
    /// --no-tablespaces) instead of the tablespaces they use on the source.
    #[arg(long)]
    pub no_tablespaces: bool,
    /// Print the plan (`pgtide plan`: what would be copied, the connections, the preflight's
    /// findings and a measured estimate of the time) and stop; nothing is created.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run (or `pgtide plan`): the plan as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Migrate every database of the source server (but templates): the roles first, each
    /// database created on the target with its properties, then one pipeline per database in
    /// this process (with --follow: a slot each, named <slot-name>_<database oid>), sharing
    /// --table-jobs and --index-jobs. status, cutover and cleanup with the same --dir cover
    /// them all.
    #[arg(long)]
    pub all_databases: bool,
    /// Migrate this source database (repeat for several): a whole-server run limited to them.
    #[arg(long = "database", value_name = "NAME")]
    pub databases: Vec<String>,
    /// With --all-databases: leave this source database out (repeatable).
    #[arg(long = "exclude-database", value_name = "NAME")]
    pub exclude_databases: Vec<String>,
    /// With several databases: create them on the target with its defaults (owned by the
    /// role pgtide connects as) instead of the source's encoding, locale, owner, connection
    /// limit, privileges, settings and comment.
    #[arg(long)]
    pub skip_db_properties: bool,
    /// With several databases: do not copy the roles first (they are on the target already).
    #[arg(long)]
    pub skip_roles: bool,
    /// With several databases: copy the roles without their passwords.
    #[arg(long)]
    pub no_role_passwords: bool,
    /// With several databases: a source role not to copy (repeatable).
    #[arg(long = "exclude-role", value_name = "ROLE")]
    pub exclude_roles: Vec<String>,
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
    /// Target connections that apply the change stream side by side (default 1). Batches of
    /// whole source transactions run at once when they touch different rows and commit in
    /// source order, so a restart resumes exactly; recorded in the work dir for later runs.
    /// Each lane uses one target connection and one replication origin.
    #[arg(long, requires = "follow")]
    pub apply_jobs: Option<usize>,
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
    /// The migration's work dir: its recorded filters and sequence offset are used. A
    /// whole-server work dir compares every database it migrated, and the roles.
    #[arg(long, env = "PGTIDE_DIR")]
    pub dir: Option<PathBuf>,
    /// Compare every database of the server (but templates) and the roles, memberships and
    /// role settings.
    #[arg(long)]
    pub all_databases: bool,
}

/// `--split-tables-larger-than`: measured, a size, or never (0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitArg {
    Auto,
    Never,
    LargerThan(u64),
}

fn parse_split(text: &str) -> Result<SplitArg, String> {
    if text.trim().eq_ignore_ascii_case("auto") {
        return Ok(SplitArg::Auto);
    }
    match crate::units::parse_size(text).map_err(|e| format!("{e}, or auto"))? {
        0 => Ok(SplitArg::Never),
        bytes => Ok(SplitArg::LargerThan(bytes)),
    }
}
