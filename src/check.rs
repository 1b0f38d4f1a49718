//! Preflight: every known hazard of a migration, found before anything is created (invariant
//! 6). Each check gives OK, WARN or FAIL and, for the last two, the fix to run. `pgtide check`
//! prints them; clone runs the FAIL-level ones that concern it before it creates anything.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;
use tokio_postgres::Client;

use crate::clone::filters::Filters;
use crate::clone::tools;
use crate::conninfo::ConnInfo;
use crate::pg::{self, Side};
use crate::replication::{Plugin, slot};

/// The oldest source server pgtide supports (publications and pg_partition_root).
pub const MIN_SERVER_VERSION: i32 = 120000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub level: Level,
    pub check: String,
    pub message: String,
    pub fix: Option<String>,
}

/// What to check for.
pub struct CheckOptions {
    pub source: ConnInfo,
    pub target: Option<ConnInfo>,
    pub plugin: Plugin,
    pub filters: Filters,
    /// clone + follow (needs logical decoding and replica identities) or a plain clone.
    pub online: bool,
    pub table_jobs: usize,
    pub index_jobs: usize,
    pub dir: PathBuf,
    pub drop_if_exists: bool,
    /// --replica-identity-full / --append-only, as follow will be given them.
    pub identity: crate::cli::IdentityArgs,
    /// The clone's --no-owner / --no-acl: roles are then not needed on the target.
    pub no_owner: bool,
    pub no_acl: bool,
    /// --wal2json-nan-as-null: the operator accepts that wal2json turns NaN / ±Infinity of
    /// numeric and float columns into NULL.
    pub wal2json_nan_as_null: bool,
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
            dir,
            drop_if_exists: false,
            identity: Default::default(),
            no_owner: false,
            no_acl: false,
            wal2json_nan_as_null: false,
        }
    }
}

#[derive(Default)]
struct Report(Vec<Finding>);

impl Report {
    fn push(&mut self, level: Level, check: &str, message: impl Into<String>, fix: Option<String>) {
        self.0.push(Finding {
            level,
            check: check.into(),
            message: message.into(),
            fix,
        });
    }
    fn ok(&mut self, check: &str, message: impl Into<String>) {
        self.push(Level::Ok, check, message, None);
    }
    fn warn(&mut self, check: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.push(Level::Warn, check, message, Some(fix.into()));
    }
    fn fail(&mut self, check: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.push(Level::Fail, check, message, Some(fix.into()));
    }
}

/// What an older source lacks for an online migration, and the fallback pgtide uses
/// (invariant 11); nothing on a source that lacks nothing.
async fn version_checks(
    r: &mut Report,
    src: &Client,
    version: pg::ServerVersion,
    opts: &CheckOptions,
) -> Result<()> {
    let major = version.major();
    if opts.plugin == Plugin::Pgoutput && !version.has_pgoutput_messages() {
        r.ok(
            "source logical messages",
            format!(
                "source {major}: pgoutput has no logical messages; the endpos marker uses an empty transaction"
            ),
        );
    }
    if opts.plugin == Plugin::Pgoutput && !version.can_publish_partitioned() {
        let partitioned = partitioned_tables(src, &opts.filters).await?;
        if !partitioned.is_empty() {
            r.warn(
                "source partitioned tables",
                format!(
                    "source {major} cannot publish a partitioned table: pgtide publishes the leaf partitions of {} as they are when it starts, so rows of a partition created or attached later are NOT followed",
                    partitioned.join(", ")
                ),
                "create the partitions the application will need during the migration before it starts (or upgrade the source to 13+ first)",
            );
        }
    }
    Ok(())
}

/// The partitioned tables (roots) that the filters include.
async fn partitioned_tables(src: &Client, filters: &Filters) -> Result<Vec<String>> {
    let rows = src
        .query(
            "SELECT n.nspname, c.relname, format('%I.%I', n.nspname, c.relname)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'p' AND NOT c.relispartition ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .filter(|row| filters.includes_table(row.get(0), row.get(1)))
        .map(|row| row.get(2))
        .collect())
}

/// Runs every check; a server that cannot be reached is a FAIL line, not an error.
pub async fn run(opts: &CheckOptions) -> Vec<Finding> {
    let mut report = Report::default();
    let source = match pg::connect(&opts.source, Side::Source, "check").await {
        Ok(c) => Some(c),
        Err(e) => {
            report.fail(
                "source connection",
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
                "source",
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
                        "target",
                        format!("a check failed to run: {e:#}"),
                        "see the error",
                    ),
                }
                if let Some(src) = source.as_ref() {
                    let budget = (opts.table_jobs + opts.index_jobs + 2) as i64;
                    for (side, client) in [("source", src), ("target", &dst)] {
                        if let Err(e) = connections_check(&mut report, side, client, budget).await {
                            report.fail(side, format!("{e:#}"), "see the error");
                        }
                    }
                }
            }
            Err(e) => report.fail(
                "target connection",
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

async fn source_checks(r: &mut Report, src: &Client, opts: &CheckOptions) -> Result<(u32, i64)> {
    let row = src
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version'),
                    current_setting('wal_level'), current_setting('max_replication_slots')::int,
                    current_setting('max_wal_senders')::int,
                    (SELECT count(*) FROM pg_replication_slots)::int,
                    (SELECT count(*) FROM pg_stat_replication)::int,
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
                    current_user::text, pg_database_size(current_database())",
            &[],
        )
        .await?;
    let version_num: i32 = row.get(0);
    let version: String = row.get(1);
    if version_num < MIN_SERVER_VERSION {
        r.fail(
            "source version",
            format!("PostgreSQL {version}: pgtide supports 12 and newer"),
            "upgrade the source in place first, or migrate it with pg_dump | pg_restore",
        );
    } else {
        r.ok(
            "source version",
            format!("PostgreSQL {version} (supported: 12 and newer)"),
        );
    }
    let role: String = row.get(8);
    let size: i64 = row.get(9);
    if opts.online {
        let wal_level: String = row.get(2);
        if wal_level == "logical" {
            r.ok("source wal_level", "logical");
        } else {
            r.fail(
                "source wal_level",
                format!("wal_level is {wal_level}; logical decoding needs logical"),
                "ALTER SYSTEM SET wal_level = logical; then restart the source server",
            );
        }
        let (max_slots, slots, max_senders, senders): (i32, i32, i32, i32) =
            (row.get(3), row.get(5), row.get(4), row.get(6));
        if slots < max_slots {
            r.ok(
                "source replication slots",
                format!("{slots} of {max_slots} in use"),
            );
        } else {
            r.fail(
                "source replication slots",
                format!("all {max_slots} replication slots are in use"),
                "raise max_replication_slots (restart) or drop an unused slot with pg_drop_replication_slot()",
            );
        }
        if senders < max_senders {
            r.ok(
                "source wal senders",
                format!("{senders} of {max_senders} in use"),
            );
        } else {
            r.fail(
                "source wal senders",
                format!("all {max_senders} WAL senders are in use"),
                "raise max_wal_senders (restart) or stop an idle replication client",
            );
        }
        let can_replicate: Option<bool> = row.get(7);
        if can_replicate == Some(true) {
            r.ok(
                "source REPLICATION",
                format!("role {role} may open replication connections"),
            );
        } else {
            r.fail(
                "source REPLICATION",
                format!("role {role} has neither REPLICATION nor SUPERUSER"),
                format!(
                    "ALTER ROLE {} REPLICATION;  (and allow it in pg_hba.conf for replication connections)",
                    pg::quote_ident(&role)
                ),
            );
        }
    }
    // Every table the clone reads must be readable.
    let tables = slot::replicated_tables(src, slot::Partitions::Roots).await?;
    let tables: Vec<(String, String)> = tables
        .into_iter()
        .filter(|(s, t)| opts.filters.includes_table(s, t))
        .collect();
    let names: Vec<String> = tables.iter().map(|(s, t)| pg::qualified(s, t)).collect();
    let unreadable: Vec<String> = src
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = ANY($1::text[]::regclass[]) AND NOT has_table_privilege(c.oid, 'SELECT') ORDER BY 1",
            &[&names],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if unreadable.is_empty() {
        r.ok(
            "source read access",
            format!("{role} can read all {} tables", tables.len()),
        );
    } else {
        r.fail(
            "source read access",
            format!("{role} cannot read {}", unreadable.join(", ")),
            format!(
                "GRANT SELECT ON {} TO {};  (or GRANT pg_read_all_data TO {})",
                unreadable.join(", "),
                pg::quote_ident(&role),
                pg::quote_ident(&role)
            ),
        );
    }
    filters_check(r, src, &opts.filters).await?;
    if opts.online {
        // The online checks concern what is published: not the [exclude-table-data] tables.
        let (tables, not_followed) =
            slot::published_tables(src, opts.plugin, &opts.filters).await?;
        if !not_followed.is_empty() {
            r.warn(
                "source tables not followed",
                slot::not_followed_notice(&not_followed),
                "their source rows and later changes stay on the source; remove them from [exclude-table-data] to migrate them",
            );
        }
        let append_only =
            match slot::append_only_published(src, &tables, &opts.identity.append_only).await {
                Ok(list) => list,
                Err(e) => {
                    r.fail(
                        "source append-only tables",
                        format!("{e:#}"),
                        "name existing tables with --append-only schema.table",
                    );
                    Vec::new()
                }
            };
        if !append_only.is_empty() {
            r.warn(
                "source append-only tables",
                format!(
                    "{}: published for INSERT and TRUNCATE only; an UPDATE or DELETE on them is NOT replicated",
                    append_only
                        .iter()
                        .map(|(s, t)| format!("{s}.{t}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "declare only tables the application never updates or deletes from",
            );
        }
        let regular: Vec<(String, String)> = tables
            .iter()
            .filter(|t| !append_only.contains(t))
            .cloned()
            .collect();
        let missing = slot::tables_without_identity(src, &regular).await?;
        let alter = missing
            .iter()
            .map(|t| format!("ALTER TABLE {t} REPLICA IDENTITY FULL;"))
            .collect::<Vec<_>>()
            .join(" ");
        if missing.is_empty() {
            r.ok(
                "source replica identity",
                "every table has a primary key or a replica identity",
            );
        } else if opts.identity.replica_identity_full {
            r.warn(
                "source replica identity",
                format!(
                    "{} table(s) without a primary key: pgtide will run {alter} (--replica-identity-full)",
                    missing.len()
                ),
                "FULL identity logs whole old rows: a primary key is cheaper where one can be added",
            );
        } else {
            let why = match opts.plugin {
                Plugin::Pgoutput => {
                    "once published, an UPDATE or DELETE on them fails on the source"
                }
                Plugin::Wal2json => "wal2json would silently drop their updates and deletes",
            };
            r.fail(
                "source replica identity",
                format!(
                    "{} table(s) without a primary key or replica identity: {} ({why})",
                    missing.len(),
                    missing.join(", ")
                ),
                format!(
                    "give them a primary key, or run {alter} (pgtide does it with --replica-identity-full), or declare log-like tables with --append-only TABLE, or exclude them with --filters"
                ),
            );
        }
        if opts.plugin == Plugin::Wal2json {
            wal2json_exactness(r, src, &regular, opts.wal2json_nan_as_null).await?;
        }
    }
    if opts.online {
        version_checks(r, src, pg::ServerVersion::from_num(version_num), opts).await?;
    }
    let warn_list = |sql: &'static str| async move {
        src.query(sql, &[]).await.map(|rows| {
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        })
    };
    let unlogged = warn_list(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r' AND c.relpersistence = 'u' AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    )
    .await?;
    if !unlogged.is_empty() {
        r.warn(
            "source unlogged tables",
            format!("{}: copied by clone, but their changes are not in the WAL, so follow cannot replicate them", unlogged.join(", ")),
            "make them logged (ALTER TABLE … SET LOGGED) before the migration, or copy them again at cutover",
        );
    }
    let matviews =
        warn_list("SELECT format('%I.%I', schemaname, matviewname) FROM pg_matviews ORDER BY 1")
            .await?;
    if !matviews.is_empty() && opts.online {
        r.warn(
            "source materialized views",
            format!("{}: created and populated by clone; logical decoding does not carry their refreshes", matviews.join(", ")),
            "run REFRESH MATERIALIZED VIEW on the target after the cutover",
        );
    }
    let large_objects: i64 = src
        .query_one("SELECT count(*) FROM pg_largeobject_metadata", &[])
        .await?
        .get(0);
    if large_objects > 0 && opts.online {
        r.warn(
            "source large objects",
            format!("{large_objects} large objects: copied by clone; logical decoding does not carry later changes to them"),
            "keep large objects unchanged during the migration, or copy them again at cutover",
        );
    }
    if opts.online {
        if opts.plugin == Plugin::Wal2json {
            match src
                .query_one(
                    "SELECT slot_name::text FROM pg_create_logical_replication_slot($1, 'wal2json', true)",
                    &[&format!("pgtide_check_{}", std::process::id())],
                )
                .await
            {
                Ok(_) => r.ok("source wal2json", "the wal2json plugin loads"),
                Err(e) => r.fail(
                    "source wal2json",
                    format!("the source cannot use wal2json: {}", pg::describe(&e)),
                    "install postgresql-NN-wal2json on the source server, or use --plugin pgoutput",
                ),
            }
        }
        let leftovers: Vec<String> = src
            .query(
                "SELECT 'slot ' || slot_name FROM pg_replication_slots WHERE slot_name LIKE 'pgtide%' AND NOT temporary
                 UNION ALL SELECT 'publication ' || pubname FROM pg_publication WHERE pubname LIKE 'pgtide%' ORDER BY 1",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !leftovers.is_empty() {
            r.warn(
                "source earlier runs",
                format!("pgtide objects from an earlier run: {}", leftovers.join(", ")),
                "continue that migration with `--resume` (same --dir), or remove them with `pgtide cleanup --slot-name NAME`",
            );
        }
    }
    Ok(((version_num / 10000) as u32, size))
}

/// The filters must not leave out a relation that a copied view, foreign key or inheritance
/// child depends on: pg_restore would stop on it halfway. pgtide refuses rather than leave out
/// the dependents silently (a view or a foreign key missing on the target is a difference the
/// operator must choose).
async fn filters_check(r: &mut Report, src: &Client, filters: &Filters) -> Result<()> {
    if filters.named_tables().next().is_none() && filters.named_schemas().next().is_none() {
        return Ok(());
    }
    let broken = crate::pg::catalog::broken_dependencies(src, filters).await?;
    if broken.is_empty() {
        r.ok(
            "source filters",
            "nothing copied depends on what the filters leave out",
        );
        return Ok(());
    }
    let what: Vec<String> = broken
        .iter()
        .map(|b| match &b.constraint {
            Some(name) => format!(
                "foreign key {} on {} references {}",
                pg::quote_ident(name),
                b.dependent,
                b.left_out
            ),
            None if b.kind == "inheritance" => {
                format!(
                    "{} inherits from (or is a partition of) {}",
                    b.dependent, b.left_out
                )
            }
            None if is_relation(&b.kind) => {
                format!("{} {} uses {}", b.kind, b.dependent, b.left_out)
            }
            None => format!(
                "{} uses the {} {}, in a schema the filters leave out",
                b.dependent, b.kind, b.left_out
            ),
        })
        .collect();
    let mut dependents: Vec<&str> = broken.iter().map(|b| b.dependent.as_str()).collect();
    dependents.dedup();
    let drops: Vec<String> = broken
        .iter()
        .map(|b| match &b.constraint {
            Some(name) => format!(
                "ALTER TABLE {} DROP CONSTRAINT {};",
                b.dependent,
                pg::quote_ident(name)
            ),
            None if b.kind == "inheritance" => {
                format!("(detach {} from {})", b.dependent, b.left_out)
            }
            None if is_relation(&b.kind) => {
                format!("DROP {} {};", b.kind.to_uppercase(), b.dependent)
            }
            None => format!(
                "(make {} stop using {}, or copy its schema)",
                b.dependent, b.left_out
            ),
        })
        .collect();
    r.fail(
        "source filters",
        format!(
            "the filters leave out what copied objects depend on: {}",
            what.join("; ")
        ),
        format!(
            "copy both or neither: add {} to [exclude-table] (with [include-only-table], add what they depend on to it instead), or remove the dependency on the source: {}",
            dependents.join(", "),
            drops.join(" ")
        ),
    );
    Ok(())
}

/// Whether a broken dependency's kind names a relation that depends (a view), rather than an
/// object that is used (a sequence, a type).
fn is_relation(kind: &str) -> bool {
    matches!(kind, "view" | "materialized view")
}

/// The target's checks; returns its major version (which pg_dump to prefer).
async fn target_checks(
    r: &mut Report,
    dst: &Client,
    src: Option<&Client>,
    source_major: Option<u32>,
    opts: &CheckOptions,
) -> Result<u32> {
    let row = dst
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version'),
                    has_database_privilege(current_database(), 'CREATE'),
                    (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                      OR has_function_privilege('pg_replication_origin_create(text)', 'EXECUTE'),
                    current_user::text,
                    (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                       AND n.nspname NOT LIKE 'pg_toast%'
                       -- an extension's own tables (its configuration) are not the user's data
                       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                                       AND d.objid = c.oid AND d.deptype = 'e'))",
            &[],
        )
        .await?;
    let version_num: i32 = row.get(0);
    let version: String = row.get(1);
    let major = (version_num / 10000) as u32;
    match source_major {
        Some(s) if major < s => r.warn(
            "target version",
            format!(
                "PostgreSQL {version} is older than the source's {s}: the schema may not restore"
            ),
            "migrate to a target of the source's major version or newer",
        ),
        _ => r.ok("target version", format!("PostgreSQL {version}")),
    }
    let role: String = row.get(4);
    if row.get::<_, bool>(2) {
        r.ok("target privileges", format!("{role} may create schemas"));
    } else {
        r.fail(
            "target privileges",
            format!("{role} cannot create schemas in the target database"),
            format!("GRANT CREATE ON DATABASE … TO {}", pg::quote_ident(&role)),
        );
    }
    if opts.online {
        if row.get::<_, Option<bool>>(3) == Some(true) {
            r.ok(
                "target replication origin",
                "apply can track its position in an origin",
            );
        } else {
            r.fail(
                "target replication origin",
                format!("{role} may not create replication origins"),
                format!(
                    "run apply as a superuser, or GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), pg_replication_origin_session_setup(text), pg_replication_origin_xact_setup(pg_lsn, timestamptz), pg_replication_origin_progress(text, boolean) TO {}",
                    pg::quote_ident(&role)
                ),
            );
        }
    }
    if let Some(src) = src {
        let used: Vec<String> = src
            .query(
                "SELECT extname::text FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let available: Vec<String> = dst
            .query("SELECT name::text FROM pg_available_extensions", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let missing: Vec<&String> = used.iter().filter(|e| !available.contains(e)).collect();
        if missing.is_empty() {
            r.ok(
                "target extensions",
                format!("all {} extensions of the source are available", used.len()),
            );
        } else {
            r.fail(
                "target extensions",
                format!(
                    "not installed on the target server: {}",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "install their packages on the target server (e.g. postgresql-NN-<extension>)",
            );
        }
    }
    if let Some(src) = src {
        // pg_restore sets owners and grants: every role they name must exist on the target.
        let needed: Vec<String> = src
            .query(
                "WITH owners AS (
                   SELECT c.relowner AS r FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
                   UNION SELECT nspowner FROM pg_namespace WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg_%'
                 ), grantees AS (
                   SELECT (aclexplode(c.relacl)).grantee AS r FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE c.relacl IS NOT NULL AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                   UNION SELECT (aclexplode(nspacl)).grantee FROM pg_namespace WHERE nspacl IS NOT NULL AND nspname NOT LIKE 'pg_%' AND nspname <> 'information_schema'
                 )
                 SELECT DISTINCT rolname::text FROM pg_roles
                  WHERE oid IN (SELECT r FROM owners WHERE NOT $1 UNION SELECT r FROM grantees WHERE NOT $2)
                  ORDER BY 1",
                &[&opts.no_owner, &opts.no_acl],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let present: Vec<String> = dst
            .query(
                "SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1)",
                &[&needed],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let missing: Vec<&String> = needed.iter().filter(|r| !present.contains(r)).collect();
        if missing.is_empty() {
            r.ok(
                "target roles",
                format!("the {} roles owning or granted objects exist", needed.len()),
            );
        } else {
            r.fail(
                "target roles",
                format!(
                    "roles that own or are granted source objects are missing on the target: {}",
                    missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ),
                "create them on the target first (pg_dumpall --roles-only on the source, then psql on the target), or clone with --no-owner / --no-acl",
            );
        }
    }
    let tables: i64 = row.get(5);
    match (tables, opts.drop_if_exists) {
        (0, _) => r.ok("target empty", "the target database has no tables"),
        (n, true) => r.warn(
            "target empty",
            format!("the target database has {n} tables; --drop-if-exists replaces those the source also has"),
            "make sure this is the intended target",
        ),
        (n, false) => r.fail(
            "target empty",
            format!("the target database is not empty ({n} tables)"),
            "give an empty target database, or add --drop-if-exists to replace the source's objects",
        ),
    }
    Ok(major)
}

async fn connections_check(r: &mut Report, side: &str, client: &Client, budget: i64) -> Result<()> {
    let row = client
        .query_one(
            "SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int,
                    (SELECT count(*) FROM pg_stat_activity)::int",
            &[],
        )
        .await?;
    let (max, used): (i32, i32) = (row.get(0), row.get(1));
    let free = (max - used) as i64;
    let check = format!("{side} connections");
    if budget <= free {
        r.ok(
            &check,
            format!("pgtide needs {budget} (table-jobs + index-jobs + 2); {free} of {max} free"),
        );
    } else {
        r.fail(
            &check,
            format!("pgtide needs {budget} connections (table-jobs + index-jobs + 2) but only {free} of {max} are free"),
            "lower --table-jobs / --index-jobs, or raise max_connections",
        );
    }
    Ok(())
}

async fn local_checks(
    r: &mut Report,
    source_major: u32,
    target_major: Option<u32>,
    source_size: Option<i64>,
    opts: &CheckOptions,
) {
    match tools::find(source_major, target_major).await {
        Ok(tools) => r.ok("local pg_dump", tools.describe()),
        Err(e) => r.fail("local pg_dump", e.message, e.fix),
    }
    match free_disk(&opts.dir) {
        Some(free) => {
            let need = source_size.unwrap_or(0).max(0) as u64;
            let text = format!(
                "{} free for the work dir {}; the source database is {}",
                crate::units::human_bytes(free),
                opts.dir.display(),
                crate::units::human_bytes(need)
            );
            if !opts.online || free >= need {
                r.ok("local disk", text);
            } else {
                r.warn(
                    "local disk",
                    text,
                    "the spool holds the changes made during the copy until they are applied: give --dir a disk with room for them",
                );
            }
        }
        None => r.warn(
            "local disk",
            format!("cannot tell the free space for {}", opts.dir.display()),
            "check that --dir is on a disk with room for the spool",
        ),
    }
}

/// Free bytes on the file system that holds `dir` (or its nearest existing parent).
fn free_disk(dir: &Path) -> Option<u64> {
    let mut path = dir.to_path_buf();
    while !path.exists() {
        path = path.parent()?.to_path_buf();
        if path.as_os_str().is_empty() {
            path = PathBuf::from(".");
        }
    }
    let c_path = std::ffi::CString::new(path.to_str()?).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stat a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// The FAIL-level checks, run by clone (and clone --follow) before it creates anything.
pub async fn preflight(opts: &CheckOptions) -> Result<()> {
    preflight_only(opts, |_| true).await
}

/// With wal2json: the published numeric / float columns whose NaN or ±Infinity would arrive
/// as NULL (FAIL for nullable ones unless accepted, WARN for NOT NULL ones, whose NULL the
/// target refuses).
async fn wal2json_exactness(
    r: &mut Report,
    src: &Client,
    tables: &[(String, String)],
    accepted: bool,
) -> Result<()> {
    use crate::replication::wal2json as w;
    let columns = w::inexact_columns(src, tables).await?;
    let check = "source wal2json exactness";
    if columns.iter().any(|c| !c.not_null) {
        if accepted {
            r.warn(check, w::nullable_message(&columns, true), w::NULLABLE_FIX);
        } else {
            r.fail(check, w::nullable_message(&columns, false), w::NULLABLE_FIX);
        }
    }
    if columns.iter().any(|c| c.not_null) {
        r.warn(check, w::not_null_message(&columns), w::NULLABLE_FIX);
    }
    if columns.is_empty() {
        r.ok(check, "wal2json carries every published column exactly");
    }
    Ok(())
}

/// The checks that concern `pgtide follow` on an existing stream: both servers reachable,
/// logical decoding and replication allowed on the source, replication origins on the target.
pub async fn preflight_follow(opts: &CheckOptions) -> Result<()> {
    preflight_only(opts, |check| {
        matches!(
            check,
            "source connection"
                | "target connection"
                | "source wal_level"
                | "source REPLICATION"
                | "source wal senders"
                | "target replication origin"
        )
    })
    .await
}

async fn preflight_only(opts: &CheckOptions, concerns: impl Fn(&str) -> bool) -> Result<()> {
    let failed: Vec<Finding> = run(opts)
        .await
        .into_iter()
        .filter(|f| f.level == Level::Fail && concerns(&f.check))
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
