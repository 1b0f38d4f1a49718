//! The target's checks: version, privileges, replication origins, the source's extensions and
//! roles, emptiness, and (for both sides) free connections.

use anyhow::Result;
use tokio_postgres::{Client, Row};

use super::{CheckId, CheckOptions, Report};
use crate::pg::{self, Side};

/// The target's checks, in the order the report prints them; returns its major version
/// (which pg_dump to prefer).
pub(super) async fn target_checks(
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
    let major = version_check(r, &row, source_major);
    privileges_check(r, &row);
    if opts.online {
        replication_origin_check(r, &row);
        reverse_stream_check(r, dst).await?;
    }
    if let Some(src) = src {
        extensions_check(r, src, dst).await?;
    }
    if let Some(src) = src {
        roles_check(r, src, dst, opts).await?;
        tablespaces_check(r, src, dst, opts).await?;
    }
    empty_check(r, &row, opts);
    Ok(major)
}

/// The target's version: the source's major or newer.
fn version_check(r: &mut Report, row: &Row, source_major: Option<u32>) -> u32 {
    let version_num: i32 = row.get(0);
    let version: String = row.get(1);
    let major = (version_num / 10000) as u32;
    match source_major {
        Some(s) if major < s => r.warn(
            CheckId::TargetVersion,
            format!(
                "PostgreSQL {version} is older than the source's {s}: the schema may not restore"
            ),
            "migrate to a target of the source's major version or newer",
        ),
        _ => r.ok(CheckId::TargetVersion, format!("PostgreSQL {version}")),
    }
    major
}

/// The role may create schemas in the target database.
fn privileges_check(r: &mut Report, row: &Row) {
    let role: String = row.get(4);
    if row.get::<_, bool>(2) {
        r.ok(
            CheckId::TargetPrivileges,
            format!("{role} may create schemas"),
        );
    } else {
        r.fail(
            CheckId::TargetPrivileges,
            format!("{role} cannot create schemas in the target database"),
            format!("GRANT CREATE ON DATABASE … TO {}", pg::quote_ident(&role)),
        );
    }
}

/// Apply can track its position in a replication origin.
fn replication_origin_check(r: &mut Report, row: &Row) {
    let role: String = row.get(4);
    if row.get::<_, Option<bool>>(3) == Some(true) {
        r.ok(
            CheckId::TargetReplicationOrigin,
            "apply can track its position in an origin",
        );
    } else {
        r.fail(
            CheckId::TargetReplicationOrigin,
            format!("{role} may not create replication origins"),
            format!(
                "run apply as a superuser, or GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), pg_replication_origin_session_setup(text), pg_replication_origin_xact_setup(pg_lsn, timestamptz), pg_replication_origin_progress(text, boolean) TO {}",
                pg::quote_ident(&role)
            ),
        );
    }
}

/// `cutover --reverse` decodes the target's changes for a rollback that loses nothing: it
/// needs wal_level = logical there, which takes a restart, so it is said now.
async fn reverse_stream_check(r: &mut Report, dst: &Client) -> Result<()> {
    let wal_level: String = dst.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level == "logical" {
        r.ok(
            CheckId::TargetReverseStream,
            "wal_level is logical: `cutover --reverse` can keep a rollback possible",
        );
    } else {
        r.ok(
            CheckId::TargetReverseStream,
            format!(
                "wal_level is {wal_level}: `cutover --reverse` (a rollback that loses nothing) would be refused; for it, ALTER SYSTEM SET wal_level = logical on the target and restart it before cutover"
            ),
        );
    }
    Ok(())
}

/// Every extension the source uses is available on the target server.
async fn extensions_check(r: &mut Report, src: &Client, dst: &Client) -> Result<()> {
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
            CheckId::TargetExtensions,
            format!("all {} extensions of the source are available", used.len()),
        );
    } else {
        r.fail(
            CheckId::TargetExtensions,
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
    Ok(())
}

/// Every role that owns or is granted a copied object exists on the target (unless --no-owner
/// / --no-acl).
async fn roles_check(
    r: &mut Report,
    src: &Client,
    dst: &Client,
    opts: &CheckOptions,
) -> Result<()> {
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
            CheckId::TargetRoles,
            format!("the {} roles owning or granted objects exist", needed.len()),
        );
    } else {
        r.fail(
            CheckId::TargetRoles,
            format!(
                "roles that own or are granted source objects are missing on the target: {}",
                missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ),
            "create them on the target first (`pgtide copy roles`, or clone with --all-databases, which copies them), or clone with --no-owner / --no-acl",
        );
    }
    Ok(())
}

/// Every tablespace a copied table, index or materialized view uses on the source exists on
/// the target (pg_restore sets it), unless --no-tablespaces puts them all in the default.
async fn tablespaces_check(
    r: &mut Report,
    src: &Client,
    dst: &Client,
    opts: &CheckOptions,
) -> Result<()> {
    let used: Vec<String> = src
        .query(
            "SELECT DISTINCT t.spcname::text FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_tablespace t ON t.oid = c.reltablespace
              WHERE c.relkind IN ('r', 'p', 'i', 'I', 'm')
                AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
              ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if used.is_empty() {
        r.ok(
            CheckId::TargetTablespaces,
            "every copied relation is in the default tablespace",
        );
        return Ok(());
    }
    if opts.no_tablespaces {
        r.ok(
            CheckId::TargetTablespaces,
            format!(
                "tablespaces {} are not used on the target (--no-tablespaces)",
                used.join(", ")
            ),
        );
        return Ok(());
    }
    let present: Vec<String> = dst
        .query(
            "SELECT spcname::text FROM pg_tablespace WHERE spcname = ANY($1)",
            &[&used],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<&String> = used.iter().filter(|t| !present.contains(t)).collect();
    if missing.is_empty() {
        r.ok(
            CheckId::TargetTablespaces,
            format!("tablespaces {} exist on the target", used.join(", ")),
        );
    } else {
        r.fail(
            CheckId::TargetTablespaces,
            format!(
                "source tables or indexes are in tablespaces the target lacks: {}",
                missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ),
            "create them on the target first (CREATE TABLESPACE name LOCATION '/a/directory/of/the/postgres/user'), or clone with --no-tablespaces to put everything in the target's default tablespace",
        );
    }
    Ok(())
}

/// The target database is empty (or --drop-if-exists says what to replace).
fn empty_check(r: &mut Report, row: &Row, opts: &CheckOptions) {
    let tables: i64 = row.get(5);
    match (tables, opts.drop_if_exists) {
        (0, _) => r.ok(CheckId::TargetEmpty, "the target database has no tables"),
        (n, true) => r.warn(
            CheckId::TargetEmpty,
            format!("the target database has {n} tables; --drop-if-exists replaces those the source also has"),
            "make sure this is the intended target",
        ),
        (n, false) => r.fail(
            CheckId::TargetEmpty,
            format!("the target database is not empty ({n} tables)"),
            "give an empty target database, or add --drop-if-exists to replace the source's objects",
        ),
    }
}

/// Whether a side has the connections pgtide will open (table-jobs + index-jobs + 2; on the
/// target at least apply-jobs + 2).
pub(super) async fn connections_check(
    r: &mut Report,
    side: Side,
    client: &Client,
    budget: i64,
) -> Result<()> {
    let row = client
        .query_one(
            "SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int,
                    (SELECT count(*) FROM pg_stat_activity)::int",
            &[],
        )
        .await?;
    let (max, used): (i32, i32) = (row.get(0), row.get(1));
    let free = (max - used) as i64;
    let check = match side {
        Side::Source => CheckId::SourceConnections,
        Side::Target => CheckId::TargetConnections,
    };
    if budget <= free {
        r.ok(
            check,
            format!("pgtide needs {budget} (table-jobs + index-jobs + 2, or apply-jobs + 2 on the target if more); {free} of {max} free"),
        );
    } else {
        r.fail(
            check,
            format!("pgtide needs {budget} connections (table-jobs + index-jobs + 2, or apply-jobs + 2 on the target if more) but only {free} of {max} are free"),
            "lower --table-jobs / --index-jobs / --apply-jobs, or raise max_connections",
        );
    }
    Ok(())
}
