//! The publication (pgoutput) and the logical replication slot: created before anything is
//! copied, dropped by cleanup (both idempotent, both named pgtide…, invariant 8).

use anyhow::{Context, Result, anyhow, bail};
use tokio_postgres::Client;

use super::Plugin;
use super::conn::{ReplicationConnection, ServerError};
use crate::pg::{self, Lsn, quote_ident};

/// The way out of a lost or invalidated slot, said by follow's error and status' verdict: the
/// changes the slot held are gone, so only a new clone restores a consistent target.
pub const LOST_SLOT_FIX: &str = "The changes it held are gone, so this migration cannot continue: start a new one with `pgtide cleanup` (same --dir: drops the slot, its publication and the target's origin) and then `pgtide clone --follow` (add --drop-if-exists to replace what is on the target). To keep it from happening again, keep pgtide running and raise max_slot_wal_keep_size on the source (or set it to -1, watching the source's disk).";

/// Whether a source error says that the slot is lost: WAL it needs was removed
/// (`max_slot_wal_keep_size`; 13–15: "cannot read from logical replication slot" with the
/// detail "This slot has been invalidated because …", 16+: "can no longer get changes from
/// replication slot", 55000) or invalidated (16+: a conflict with recovery), or a segment is
/// gone (12: "requested WAL segment … has already been removed", 58P01). SQLSTATE 55000 also means other unmet prerequisites, so the server's message tells
/// them apart; this only explains an error that is classified (a stop) by its SQLSTATE anyway.
pub fn is_slot_lost(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<crate::errors::ServerError>())
        .any(|s| {
            (s.code == "55000"
                && (s.message.contains("can no longer")
                    || s.detail
                        .as_deref()
                        .is_some_and(|d| d.contains("invalidated"))))
                || (s.code == "58P01" && s.message.contains("has already been removed"))
        })
}

/// The publication that goes with a slot.
pub fn publication_name(slot: &str) -> String {
    format!("pgtide_{slot}")
}

/// Slot names are identifiers PostgreSQL restricts to [a-z0-9_], at most 63 bytes.
pub fn check_slot_name(slot: &str) -> Result<()> {
    if slot.is_empty()
        || slot.len() > 56
        || !slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        bail!(
            "invalid slot name \"{slot}\": use lower-case letters, digits and _, at most 56 characters"
        );
    }
    Ok(())
}

/// The publication of a slot's append-only tables (INSERT and TRUNCATE only).
pub fn append_publication_name(slot: &str) -> String {
    format!("pgtide_{slot}_append")
}

/// Creates a publication for these tables unless it exists; `publish` limits the operations
/// (e.g. "insert, truncate").
pub async fn create_publication(
    client: &Client,
    name: &str,
    tables: &[(String, String)],
    publish: Option<&str>,
) -> Result<String> {
    let name = name.to_string();
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await?
        .is_some();
    if exists {
        return Ok(name);
    }
    // No table yet (an empty database of a whole-server migration): an empty publication,
    // to which the tables the application creates later are added (DDL capture).
    let list = if tables.is_empty() {
        String::new()
    } else {
        format!(
            " FOR TABLE {}",
            tables
                .iter()
                .map(|(s, t)| pg::qualified(s, t))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    client
        .batch_execute(&format!(
            "CREATE PUBLICATION {}{list}{}",
            quote_ident(&name),
            publish.map_or(String::new(), |p| format!(
                " WITH (publish = {})",
                pg::quote_literal(p)
            ))
        ))
        .await
        .map_err(|e| {
            anyhow!(
                "cannot create publication {name} on the source: {}",
                pg::describe(&e)
            )
        })?;
    Ok(name)
}

/// Drops the slot's publications (the main one and the append-only one); absent ones are fine.
pub async fn drop_publication(client: &Client, slot: &str) -> Result<()> {
    for name in [publication_name(slot), append_publication_name(slot)] {
        client
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {}",
                quote_ident(&name)
            ))
            .await
            .map_err(|e| anyhow!("cannot drop publication {name}: {}", pg::describe(&e)))?;
    }
    Ok(())
}

/// How a table list names partitioned tables: a publication names a partitioned table from
/// 13 on (it covers its partitions) but only leaf partitions before; wal2json filters on the
/// leaf a change arrives for. Changes always arrive for the leaf partitions (pgtide never sets
/// publish_via_partition_root), so apply, clone and verify work on leaves in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partitions {
    /// Tables that are not partitions: plain tables and the roots of partitioned ones.
    Roots,
    /// Plain tables and leaf partitions, never a partitioned table (a publication before 13).
    Leaves,
    /// Every plain table, partitioned table and partition (wal2json's table filter).
    All,
}

impl Partitions {
    /// What a slot of this plugin on this source names.
    pub fn published_by(plugin: Plugin, source: pg::ServerVersion) -> Self {
        match plugin {
            Plugin::Wal2json => Partitions::All,
            Plugin::Pgoutput if source.can_publish_partitioned() => Partitions::Roots,
            Plugin::Pgoutput => Partitions::Leaves,
        }
    }
}

/// The tables a slot replicates: ordinary and partitioned tables outside system schemas,
/// partitions named as `partitions` says.
pub async fn replicated_tables(
    client: &Client,
    partitions: Partitions,
) -> Result<Vec<(String, String)>> {
    let with_partitions = partitions != Partitions::Roots;
    let with_partitioned = partitions != Partitions::Leaves;
    let rows = client
        .query(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND ($1 OR NOT c.relispartition) AND ($2 OR c.relkind = 'r')
               AND c.relpersistence = 'p'
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgtide')
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                               AND d.objid = c.oid AND d.deptype = 'e')
             ORDER BY 1, 2",
            &[&with_partitions, &with_partitioned],
        )
        .await
        .context("cannot list the source tables")?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The notice naming the tables whose changes a migration does not follow (check and clone
/// print it).
pub fn not_followed_notice(tables: &[(String, String)]) -> String {
    format!(
        "changes of {} are not followed: [exclude-table-data] tables are created empty on the target and left out of the publication",
        tables
            .iter()
            .map(|(s, t)| format!("{s}.{t}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// IDENTIFY_SYSTEM: the server's system identifier, timeline and current WAL position.
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
}

pub async fn identify_system(conn: &mut ReplicationConnection) -> Result<SystemIdentity> {
    let rows = conn.simple_query("IDENTIFY_SYSTEM").await?;
    let row = rows
        .first()
        .ok_or_else(|| anyhow!("IDENTIFY_SYSTEM returned no row"))?;
    let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    Ok(SystemIdentity {
        system_id: field(0),
        timeline: field(1).parse().unwrap_or(0),
        xlogpos: field(2).parse().map_err(|e: String| anyhow!(e))?,
    })
}

/// A created slot: where its stream starts, and the snapshot that matches that point.
pub struct CreatedSlot {
    pub consistent_point: Lsn,
    pub snapshot: Option<String>,
}

/// CREATE_REPLICATION_SLOT … LOGICAL; with `export` the connection must stay idle (and open)
/// while others import the snapshot.
pub async fn create_slot(
    conn: &mut ReplicationConnection,
    slot: &str,
    plugin: Plugin,
    export: bool,
) -> Result<CreatedSlot> {
    create(conn, slot, "", plugin, export).await
}

/// A TEMPORARY slot (dropped when its connection ends) whose exported snapshot is exactly its
/// consistent point: a resumed clone copies the tables it has not finished under it and knows
/// the LSN their copy is consistent with.
pub async fn create_temporary_slot(
    conn: &mut ReplicationConnection,
    slot: &str,
) -> Result<CreatedSlot> {
    create(conn, slot, "TEMPORARY", Plugin::Pgoutput, true).await
}

async fn create(
    conn: &mut ReplicationConnection,
    slot: &str,
    temporary: &str,
    plugin: Plugin,
    export: bool,
) -> Result<CreatedSlot> {
    let sql = format!(
        "CREATE_REPLICATION_SLOT {} {temporary} LOGICAL {} {}",
        quote_ident(slot),
        plugin.name(),
        if export {
            "EXPORT_SNAPSHOT"
        } else {
            "NOEXPORT_SNAPSHOT"
        }
    );
    let rows = conn.simple_query(&sql).await.map_err(|e| match e.downcast_ref::<ServerError>() {
        Some(s) if s.code == "42710" => anyhow!(
            "the replication slot \"{slot}\" already exists on the source: resume with it (`pgtide stream receive`), or drop it with `pgtide stream cleanup` to start over"
        ),
        Some(s) if s.code == "53400" => anyhow!(
            "the source has no free replication slot ({}): raise max_replication_slots or drop an unused slot",
            s.message
        ),
        Some(s) if s.message.contains("may not be used as an output plugin") => anyhow!(
            "the source refuses {} as an output plugin ({}): add it to output_plugin_libraries in the source's postgresql.conf and reload, or use --plugin pgoutput",
            plugin.name(),
            s.message
        ),
        Some(s) if s.code == "58P01" || s.message.contains("could not access file") => anyhow!(
            "the source cannot load the output plugin {}: {}. For wal2json install postgresql-NN-wal2json on the source server.",
            plugin.name(),
            s.message
        ),
        Some(s) if s.code == "55000" && s.message.contains("wal_level") => anyhow!(
            "the source's wal_level is not logical ({}): set wal_level = logical in postgresql.conf and restart the server",
            s.message
        ),
        _ => e.context(format!("cannot create the replication slot \"{slot}\"")),
    })?;
    let row = rows
        .first()
        .ok_or_else(|| anyhow!("CREATE_REPLICATION_SLOT returned no row"))?;
    let consistent_point = row
        .get(1)
        .and_then(|v| v.as_deref())
        .ok_or_else(|| anyhow!("CREATE_REPLICATION_SLOT returned no consistent point"))?
        .parse::<Lsn>()
        .map_err(|e| anyhow!(e))?;
    Ok(CreatedSlot {
        consistent_point,
        snapshot: row.get(2).cloned().flatten(),
    })
}

/// Drops the slot; a slot that does not exist is not an error (cleanup runs twice).
pub async fn drop_slot(conn: &mut ReplicationConnection, slot: &str) -> Result<bool> {
    match conn
        .simple_query(&format!("DROP_REPLICATION_SLOT {} WAIT", quote_ident(slot)))
        .await
    {
        Ok(_) => Ok(true),
        Err(e) => match e.downcast_ref::<ServerError>() {
            Some(s) if s.code == "42704" => Ok(false),
            _ => Err(e.context(format!("cannot drop the replication slot \"{slot}\""))),
        },
    }
}

/// The published tables that have no primary key and no replica identity: once in a
/// publication an UPDATE or DELETE on them fails on the source (and wal2json would silently
/// drop them).
pub async fn tables_without_identity(
    client: &tokio_postgres::Client,
    tables: &[(String, String)],
) -> Result<Vec<String>> {
    let names: Vec<String> = tables.iter().map(|(s, t)| pg::qualified(s, t)).collect();
    let rows = client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'r'
               AND (c.oid = ANY($1::text[]::regclass[])
                    OR pg_partition_root(c.oid) = ANY($1::text[]::regclass[]))
               AND (c.relreplident = 'n'
                    OR (c.relreplident = 'd' AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))
             ORDER BY 1",
            &[&names],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

/// [`append_only_tables`] on a source that publishes leaf partitions (12): a name that is no
/// published table but a partitioned one stands for its published leaves, so `--append-only`
/// names the same table on every version.
pub async fn append_only_published(
    client: &Client,
    tables: &[(String, String)],
    names: &[String],
) -> Result<Vec<(String, String)>> {
    let mut resolved = Vec::new();
    for name in names {
        match append_only_tables(tables, std::slice::from_ref(name)) {
            Ok(found) => resolved.extend(found),
            Err(e) => {
                let leaves: Vec<(String, String)> = leaf_partitions(client, name)
                    .await?
                    .into_iter()
                    .filter(|leaf| tables.contains(leaf))
                    .collect();
                if leaves.is_empty() {
                    return Err(e);
                }
                resolved.extend(leaves);
            }
        }
    }
    Ok(resolved)
}

/// The leaf partitions of the partitioned table `name` (as SQL reads it, unqualified in
/// public); none when it is no partitioned table.
async fn leaf_partitions(client: &Client, name: &str) -> Result<Vec<(String, String)>> {
    let Ok(table) = crate::clone::filters::parse_table_name(name) else {
        return Ok(Vec::new());
    };
    let rows = client
        .query(
            "SELECT n.nspname, c.relname
               FROM pg_partition_tree(to_regclass(format('%I.%I', $1::text, $2::text))) t
               JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE t.isleaf ORDER BY 1, 2",
            &[&table.schema, &table.name],
        )
        .await
        .with_context(|| format!("cannot list the partitions of {name}"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Resolves `--append-only` names (schema.table, or table in public) against the published
/// tables; an unknown name is an error. A name is read as SQL reads it (quotes, case
/// folding), so that it can be given exactly as `check` prints it (`public."Odd Name"`); the
/// literal `schema.table` split at its first dot is still accepted.
pub fn append_only_tables(
    tables: &[(String, String)],
    names: &[String],
) -> Result<Vec<(String, String)>> {
    names
        .iter()
        .map(|name| {
            let literal = name.split_once('.').unwrap_or(("public", name));
            let sql = crate::clone::filters::parse_table_name(name).ok();
            tables
                .iter()
                .find(|(s, t)| {
                    sql.as_ref()
                        .is_some_and(|n| *s == n.schema && *t == n.name)
                })
                .or_else(|| tables.iter().find(|(s, t)| (s.as_str(), t.as_str()) == literal))
                .cloned()
                .ok_or_else(|| {
                    anyhow!(
                        "--append-only {name}: no such table among the published tables (give schema.table)"
                    )
                })
        })
        .collect()
}
