//! The source's checks: version and what an older major lacks, logical decoding settings and
//! rights, read access, the filters' dependencies, what is published and how (replica
//! identities, append-only tables), and what logical decoding does not carry.

use anyhow::Result;
use tokio_postgres::{Client, Row};

use super::{CheckId, CheckOptions, MIN_SERVER_VERSION, Report};
use crate::clone::filters::Filters;
use crate::pg;
use crate::replication::setup::PublicationPlan;
use crate::replication::{Plugin, slot};

/// The source's checks, in the order the report prints them; returns the source's major
/// version and database size.
pub(super) async fn source_checks(
    r: &mut Report,
    src: &Client,
    opts: &CheckOptions,
) -> Result<(u32, i64)> {
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
    version_check(r, &row);
    let role: String = row.get(8);
    let size: i64 = row.get(9);
    if opts.online {
        wal_level_check(r, &row);
        replication_slots_check(r, &row);
        wal_senders_check(r, &row);
        replication_role_check(r, &row);
    }
    read_access_check(r, src, opts, &role).await?;
    filters_check(r, src, &opts.filters).await?;
    if opts.online {
        // The online checks concern what is published: not the [exclude-table-data] tables.
        // What is published: the plan stream setup and clone --follow use.
        let mut plan = PublicationPlan::decide(src, opts.plugin, &opts.filters).await?;
        tables_not_followed_check(r, &plan.not_followed);
        append_only_check(r, src, &mut plan, opts).await?;
        let regular = plan.regular();
        replica_identity_check(r, src, &regular, opts).await?;
        if opts.plugin == Plugin::Wal2json {
            super::wal2json::wal2json_exactness(r, src, &regular, opts.wal2json_nan_as_null)
                .await?;
        }
    }
    if opts.online {
        version_checks(r, src, pg::ServerVersion::from_num(version_num), opts).await?;
    }
    unlogged_tables_check(r, src).await?;
    materialized_views_check(r, src, opts.online).await?;
    large_objects_check(r, src, opts.online).await?;
    if opts.online {
        if opts.plugin == Plugin::Wal2json {
            wal2json_plugin_check(r, src).await;
        }
        ddl_capture_check(r, src, opts).await;
        earlier_runs_check(r, src).await?;
        slot_wal_limit_check(r, src).await?;
    }
    Ok(((version_num / 10000) as u32, size))
}

/// The source's version: 12 and newer are supported.
fn version_check(r: &mut Report, row: &Row) {
    let version_num: i32 = row.get(0);
    let version: String = row.get(1);
    if version_num < MIN_SERVER_VERSION {
        r.fail(
            CheckId::SourceVersion,
            format!("PostgreSQL {version}: pgtide supports 12 and newer"),
            "upgrade the source in place first, or migrate it with pg_dump | pg_restore",
        );
    } else {
        r.ok(
            CheckId::SourceVersion,
            format!("PostgreSQL {version} (supported: 12 and newer)"),
        );
    }
}

/// Logical decoding needs wal_level = logical.
fn wal_level_check(r: &mut Report, row: &Row) {
    let wal_level: String = row.get(2);
    if wal_level == "logical" {
        r.ok(CheckId::SourceWalLevel, "logical");
    } else {
        r.fail(
            CheckId::SourceWalLevel,
            format!("wal_level is {wal_level}; logical decoding needs logical"),
            "ALTER SYSTEM SET wal_level = logical; then restart the source server",
        );
    }
}

/// A free replication slot for pgtide's slot.
fn replication_slots_check(r: &mut Report, row: &Row) {
    let (max_slots, slots): (i32, i32) = (row.get(3), row.get(5));
    if slots < max_slots {
        r.ok(
            CheckId::SourceReplicationSlots,
            format!("{slots} of {max_slots} in use"),
        );
    } else {
        r.fail(
            CheckId::SourceReplicationSlots,
            format!("all {max_slots} replication slots are in use"),
            "raise max_replication_slots (restart) or drop an unused slot with pg_drop_replication_slot()",
        );
    }
}

/// A free WAL sender for pgtide's replication connection.
fn wal_senders_check(r: &mut Report, row: &Row) {
    let (max_senders, senders): (i32, i32) = (row.get(4), row.get(6));
    if senders < max_senders {
        r.ok(
            CheckId::SourceWalSenders,
            format!("{senders} of {max_senders} in use"),
        );
    } else {
        r.fail(
            CheckId::SourceWalSenders,
            format!("all {max_senders} WAL senders are in use"),
            "raise max_wal_senders (restart) or stop an idle replication client",
        );
    }
}

/// The role may open replication connections.
fn replication_role_check(r: &mut Report, row: &Row) {
    let role: String = row.get(8);
    let can_replicate: Option<bool> = row.get(7);
    if can_replicate == Some(true) {
        r.ok(
            CheckId::SourceReplicationRole,
            format!("role {role} may open replication connections"),
        );
    } else {
        r.fail(
            CheckId::SourceReplicationRole,
            format!("role {role} has neither REPLICATION nor SUPERUSER"),
            format!(
                "ALTER ROLE {} REPLICATION;  (and allow it in pg_hba.conf for replication connections)",
                pg::quote_ident(&role)
            ),
        );
    }
}

/// Every table the clone reads must be readable.
async fn read_access_check(
    r: &mut Report,
    src: &Client,
    opts: &CheckOptions,
    role: &str,
) -> Result<()> {
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
            CheckId::SourceReadAccess,
            format!("{role} can read all {} tables", tables.len()),
        );
    } else {
        r.fail(
            CheckId::SourceReadAccess,
            format!("{role} cannot read {}", unreadable.join(", ")),
            format!(
                "GRANT SELECT ON {} TO {};  (or GRANT pg_read_all_data TO {})",
                unreadable.join(", "),
                pg::quote_ident(role),
                pg::quote_ident(role)
            ),
        );
    }
    Ok(())
}

/// Tables copied but not published ([exclude-table-data]).
fn tables_not_followed_check(r: &mut Report, not_followed: &[(String, String)]) {
    if !not_followed.is_empty() {
        r.warn(
            CheckId::SourceTablesNotFollowed,
            slot::not_followed_notice(not_followed),
            "their source rows and later changes stay on the source; remove them from [exclude-table-data] to migrate them",
        );
    }
}

/// The tables declared --append-only, as published; a declaration that names no table fails.
async fn append_only_check(
    r: &mut Report,
    src: &Client,
    plan: &mut PublicationPlan,
    opts: &CheckOptions,
) -> Result<()> {
    if let Err(e) = plan
        .declare_append_only(src, &opts.identity.append_only)
        .await
    {
        r.fail(
            CheckId::SourceAppendOnlyTables,
            format!("{e:#}"),
            "name existing tables with --append-only schema.table",
        );
    }
    let append_only = &plan.append_only;
    if !append_only.is_empty() {
        r.warn(
            CheckId::SourceAppendOnlyTables,
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
    Ok(())
}

/// Every published table (append-only ones aside) has a primary key or replica identity.
async fn replica_identity_check(
    r: &mut Report,
    src: &Client,
    regular: &[(String, String)],
    opts: &CheckOptions,
) -> Result<()> {
    let missing = slot::tables_without_identity(src, regular).await?;
    let alter = missing
        .iter()
        .map(|t| format!("ALTER TABLE {t} REPLICA IDENTITY FULL;"))
        .collect::<Vec<_>>()
        .join(" ");
    if missing.is_empty() {
        r.ok(
            CheckId::SourceReplicaIdentity,
            "every table has a primary key or a replica identity",
        );
    } else if opts.identity.replica_identity_full {
        r.warn(
            CheckId::SourceReplicaIdentity,
            format!(
                "{} table(s) without a primary key: pgtide will run {alter} (--replica-identity-full)",
                missing.len()
            ),
            "FULL identity logs whole old rows: a primary key is cheaper where one can be added",
        );
    } else {
        let why = match opts.plugin {
            Plugin::Pgoutput => "once published, an UPDATE or DELETE on them fails on the source",
            Plugin::Wal2json => "wal2json would silently drop their updates and deletes",
        };
        r.fail(
            CheckId::SourceReplicaIdentity,
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
    Ok(())
}

/// The names a query returns (one text column).
async fn names(src: &Client, sql: &str) -> Result<Vec<String>> {
    Ok(src
        .query(sql, &[])
        .await?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect())
}

/// Unlogged tables: copied, but their changes are not in the WAL.
async fn unlogged_tables_check(r: &mut Report, src: &Client) -> Result<()> {
    let unlogged = names(
        src,
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r' AND c.relpersistence = 'u' AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    )
    .await?;
    if !unlogged.is_empty() {
        r.warn(
            CheckId::SourceUnloggedTables,
            format!("{}: copied by clone, but their changes are not in the WAL, so follow cannot replicate them", unlogged.join(", ")),
            "make them logged (ALTER TABLE … SET LOGGED) before the migration, or copy them again at cutover",
        );
    }
    Ok(())
}

/// Materialized views: their refreshes are not decoded.
async fn materialized_views_check(r: &mut Report, src: &Client, online: bool) -> Result<()> {
    let matviews = names(
        src,
        "SELECT format('%I.%I', schemaname, matviewname) FROM pg_matviews ORDER BY 1",
    )
    .await?;
    if !matviews.is_empty() && online {
        r.warn(
            CheckId::SourceMaterializedViews,
            format!("{}: created and populated by clone; logical decoding does not carry their refreshes", matviews.join(", ")),
            "run REFRESH MATERIALIZED VIEW on the target after the cutover",
        );
    }
    Ok(())
}

/// Large objects: later changes to them are not decoded.
async fn large_objects_check(r: &mut Report, src: &Client, online: bool) -> Result<()> {
    let large_objects: i64 = src
        .query_one("SELECT count(*) FROM pg_largeobject_metadata", &[])
        .await?
        .get(0);
    if large_objects > 0 && online {
        r.warn(
            CheckId::SourceLargeObjects,
            format!("{large_objects} large objects: copied by clone; logical decoding does not carry later changes to them"),
            "keep large objects unchanged during the migration, or copy them again at cutover",
        );
    }
    Ok(())
}

/// With wal2json: the plugin loads on the source.
async fn wal2json_plugin_check(r: &mut Report, src: &Client) {
    match src
        .query_one(
            "SELECT slot_name::text FROM pg_create_logical_replication_slot($1, 'wal2json', true)",
            &[&format!("pgtide_check_{}", std::process::id())],
        )
        .await
    {
        Ok(_) => r.ok(CheckId::SourceWal2json, "the wal2json plugin loads"),
        Err(e) => r.fail(
            CheckId::SourceWal2json,
            format!("the source cannot use wal2json: {}", pg::describe(&e)),
            "install postgresql-NN-wal2json on the source server, or use --plugin pgoutput",
        ),
    }
}

/// pgtide objects left by an earlier run.
async fn earlier_runs_check(r: &mut Report, src: &Client) -> Result<()> {
    let mut leftovers: Vec<String> = Vec::new();
    let slots: Vec<String> = src
        .query(
            "SELECT slot_name::text FROM pg_replication_slots
             WHERE NOT temporary
               AND (slot_name LIKE 'pgtide%'
                    OR (database = current_database()
                        AND EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'pgtide_' || slot_name)))
             ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for slot in slots {
        // A lost slot cannot be resumed: say so, with why.
        let wal = crate::observe::slot_wal::ask(src, &slot).await?;
        leftovers.push(match wal.lost {
            Some(why) => format!(
                "slot {slot} ({why}; it cannot be resumed: `pgtide cleanup`, then a new clone --follow)"
            ),
            None => format!("slot {slot}"),
        });
    }
    leftovers.extend(
        src.query(
            "SELECT 'publication ' || pubname FROM pg_publication WHERE pubname LIKE 'pgtide%'
             UNION ALL SELECT 'event trigger ' || evtname FROM pg_event_trigger WHERE evtname LIKE 'pgtide\\_ddl\\_%' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get::<_, String>(0)),
    );
    if !leftovers.is_empty() {
        r.warn(
            CheckId::SourceEarlierRuns,
            format!("pgtide objects from an earlier run: {}", leftovers.join(", ")),
            "continue that migration with `--resume` (same --dir), or remove them with `pgtide cleanup --slot-name NAME`",
        );
    }
    Ok(())
}

/// What a stopped (or stalled) follower may cost the source: the slot retains WAL from its
/// last acknowledgement on, up to max_slot_wal_keep_size (then the slot is lost and only a new
/// clone helps) or, with -1 (and on 12, which has no limit), until the source's disk fills.
/// The time to the limit is measured at the source's current WAL rate (one second's sample).
/// While pgtide runs it acknowledges as it spools, also during the copy, so a running pgtide
/// keeps the slot far below the limit.
async fn slot_wal_limit_check(r: &mut Report, src: &Client) -> Result<()> {
    use crate::observe::{slot_wal, status::human_seconds};
    use crate::units::human_bytes;
    let limit = slot_wal::keep_limit(src).await?;
    let rate = slot_wal::wal_rate(src).await.ok().filter(|r| *r > 0.0);
    let rate_text = rate.map_or_else(
        || "the source wrote no WAL during the one-second sample".to_string(),
        |r| format!("the source writes {}/s now", human_bytes(r as u64)),
    );
    match limit {
        Some(limit) if limit >= 0 => {
            let window = rate.map_or_else(String::new, |r| {
                format!(
                    ": a pgtide stopped for more than about {} loses its slot (then only a new clone helps)",
                    human_seconds(limit as f64 / r)
                )
            });
            r.ok(
                CheckId::SourceSlotWalLimit,
                format!(
                    "max_slot_wal_keep_size = {}; {rate_text}{window}",
                    human_bytes(limit as u64)
                ),
            );
        }
        limit => r.warn(
            CheckId::SourceSlotWalLimit,
            format!(
                "{}: a stopped or stalled pgtide makes the source keep WAL until its disk fills ({rate_text})",
                if limit.is_some() {
                    "max_slot_wal_keep_size = -1 (unlimited)"
                } else {
                    "PostgreSQL 12 has no max_slot_wal_keep_size"
                }
            ),
            "set max_slot_wal_keep_size (13+: ALTER SYSTEM SET max_slot_wal_keep_size = '…'; SELECT pg_reload_conf()) to what the source's disk can spare, and watch `pgtide status` (slot retains) while pgtide is stopped; `pgtide cleanup` drops the slot",
        ),
    }
    Ok(())
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
            CheckId::SourceFilters,
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
        CheckId::SourceFilters,
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
            CheckId::SourceLogicalMessages,
            format!(
                "source {major}: pgoutput has no logical messages; the endpos marker uses an empty transaction"
            ),
        );
    }
    if opts.plugin == Plugin::Pgoutput && !version.can_publish_partitioned() {
        let partitioned = partitioned_tables(src, &opts.filters).await?;
        if !partitioned.is_empty() {
            r.warn(
                CheckId::SourcePartitionedTables,
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

/// Whether schema changes during follow will be captured (replication::ddl_capture): the
/// event triggers need a superuser and pgoutput.
async fn ddl_capture_check(r: &mut Report, src: &Client, opts: &CheckOptions) {
    const NOT_CAPTURED: &str = "a schema change on the source during follow stops apply until you make it on the target, and tables created on the source are not followed";
    if opts.identity.no_ddl_capture {
        r.warn(
            CheckId::SourceDdlCapture,
            format!("off (--no-ddl-capture): {NOT_CAPTURED}"),
            "leave out --no-ddl-capture to replay schema changes in order",
        );
        return;
    }
    if opts.plugin != Plugin::Pgoutput {
        r.warn(
            CheckId::SourceDdlCapture,
            format!("not with wal2json: {NOT_CAPTURED}"),
            "use --plugin pgoutput to replay schema changes in order",
        );
        return;
    }
    match crate::replication::ddl_capture::check_privileges(src).await {
        Ok(()) => r.ok(
            CheckId::SourceDdlCapture,
            "schema changes during follow are replayed in commit order (event triggers pgtide_ddl_*, removed by cleanup); tables created on the source are followed",
        ),
        Err(why) => r.warn(
            CheckId::SourceDdlCapture,
            format!("not possible: {why:#}"),
            "connect to the source as a superuser, or accept that schema changes stop apply",
        ),
    }
}
