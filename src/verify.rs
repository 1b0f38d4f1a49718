//! verify: proves a copy identical by content. For every table, each server computes the row
//! count and an order-independent checksum over the rows' text form (the sum of a 64-bit hash
//! of each row), inside one REPEATABLE READ transaction per side; the results are printed side
//! by side. Sequences, indexes, constraints, columns, domains and partitioning are compared by
//! value and definition, as each server version catalogs them (see `CONSTRAINTS`).
//! Materialized views are compared the same way but reported apart: each holds what its last
//! REFRESH saw on its own server, so a difference is listed, never counted as lost data.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, anyhow};
use serde::Serialize;
use tokio_postgres::Client;

use crate::clone::filters::{Filters, TableName};
use crate::conninfo::ConnInfo;
use crate::pg::{self, Side, describe, qualified};

/// One compared object and its verdict.
#[derive(Debug, Serialize, Clone)]
pub struct TableReport {
    pub table: String,
    pub source_rows: Option<i64>,
    pub target_rows: Option<i64>,
    pub source_checksum: Option<String>,
    pub target_checksum: Option<String>,
    pub matches: bool,
}

#[derive(Debug, Serialize)]
pub struct ObjectReport {
    pub kind: &'static str,
    pub name: String,
    pub source: Option<String>,
    pub target: Option<String>,
    pub matches: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub tables: Vec<TableReport>,
    /// Materialized views, compared like tables; not part of `all_match` (see the module doc).
    pub matviews: Vec<TableReport>,
    pub objects: Vec<ObjectReport>,
    pub all_match: bool,
}

/// What a verify compares, and how: the migration's filters and the offset its sequences were
/// set with (with one, a target sequence must be ahead of the source's by the offset's sign,
/// not equal to it).
#[derive(Debug, Default)]
pub struct Options {
    pub filters: Filters,
    pub counts_only: bool,
    pub sequence_offset: i64,
}

/// Compares every table of the source (within the filters) with the target.
pub async fn run(source: &ConnInfo, target: &ConnInfo, opts: &Options) -> Result<Report> {
    let (filters, counts_only) = (&opts.filters, opts.counts_only);
    let src = pg::connect(source, Side::Source, "verify").await?;
    let dst = pg::connect(target, Side::Target, "verify").await?;
    // Definitions are compared as text: read them on both sides fully qualified.
    pg::pin_search_path(&dst).await?;
    for c in [&src, &dst] {
        c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
    }
    let tables = compare_relations(&src, &dst, Relkind::Table, filters, counts_only).await?;
    let matviews = compare_relations(&src, &dst, Relkind::Matview, filters, counts_only).await?;
    let mut objects = Vec::new();
    for (kind, query) in [
        ("sequence", SEQUENCES.as_str()),
        ("index", INDEXES),
        ("constraint", CONSTRAINTS),
        ("column", COLUMNS),
        ("domain", DOMAINS),
        ("partition", PARTITIONS),
        ("replica identity", REPLICA_IDENTITIES),
    ] {
        let s = named_values(&src, kind, query, filters).await?;
        let t = named_values(&dst, kind, query, filters).await?;
        let names: BTreeSet<&String> = s.keys().chain(t.keys()).collect();
        for name in names {
            let (sv, tv) = (s.get(name).cloned(), t.get(name).cloned());
            let matches = match (&sv, &tv) {
                (Some(sv), Some(tv)) if kind == "sequence" => {
                    sequence_matches(sv, tv, opts.sequence_offset)
                }
                _ => sv.is_some() && sv == tv,
            };
            objects.push(ObjectReport {
                kind,
                name: name.clone(),
                matches,
                source: sv,
                target: tv,
            });
        }
    }
    for c in [&src, &dst] {
        let _ = c.batch_execute("ROLLBACK").await;
    }
    let all_match = tables.iter().all(|t| t.matches) && objects.iter().all(|o| o.matches);
    Ok(Report {
        tables,
        matviews,
        objects,
        all_match,
    })
}

/// A sequence's values agree: equal, or with an offset, the target ahead of the source in the
/// offset's direction (the source may have moved on since the target was set, by less than
/// the offset: that is the gap the offset is for).
fn sequence_matches(source: &str, target: &str, offset: i64) -> bool {
    if source == target {
        return true;
    }
    match (source.parse::<i64>(), target.parse::<i64>()) {
        (Ok(s), Ok(t)) if offset > 0 => t >= s,
        (Ok(s), Ok(t)) if offset < 0 => t <= s,
        _ => false,
    }
}

/// Which relations a comparison covers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Relkind {
    /// Plain tables and leaf partitions.
    Table,
    /// Materialized views.
    Matview,
}

/// Row count and checksum of each relation of a kind, side by side.
async fn compare_relations(
    src: &Client,
    dst: &Client,
    kind: Relkind,
    filters: &Filters,
    counts_only: bool,
) -> Result<Vec<TableReport>> {
    let source_tables = list_tables(src, kind, filters).await?;
    let target_tables: BTreeMap<String, bool> = list_tables(dst, kind, filters)
        .await?
        .into_iter()
        .map(|(n, _, populated)| (n, populated))
        .collect();
    let digest = |client, sql_name, populated| async move {
        // An unpopulated materialized view (WITH NO DATA) cannot be read: it has no rows.
        if populated {
            table_digest(client, sql_name, counts_only).await.map(Some)
        } else {
            Ok(None)
        }
    };
    let mut reports = Vec::new();
    for (name, sql_name, populated) in &source_tables {
        let (s, t) = match target_tables.get(name) {
            Some(target_populated) => {
                let (s, t) = tokio::join!(
                    digest(src, sql_name.as_str(), *populated),
                    digest(dst, sql_name.as_str(), *target_populated)
                );
                (s?, t?)
            }
            None => (digest(src, sql_name.as_str(), *populated).await?, None),
        };
        let matches = target_tables.contains_key(name) && s == t;
        reports.push(TableReport {
            table: name.clone(),
            source_rows: s.as_ref().map(|d| d.0),
            target_rows: t.as_ref().map(|d| d.0),
            source_checksum: s.and_then(|d| d.1),
            target_checksum: t.and_then(|d| d.1),
            matches,
        });
    }
    Ok(reports)
}

/// (display name, quoted name, populated) of every relation of a kind holding rows.
async fn list_tables(
    client: &Client,
    kind: Relkind,
    filters: &Filters,
) -> Result<Vec<(String, String, bool)>> {
    let relkind = match kind {
        Relkind::Table => "r",
        Relkind::Matview => "m",
    };
    let rows = client
        .query(
            "SELECT n.nspname, c.relname, c.relispopulated FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = $1::text::\"char\" AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgtide')
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                               AND d.objid = c.oid AND d.deptype = 'e')
             ORDER BY 1, 2",
            &[&relkind],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let schema: String = r.get(0);
            let name: String = r.get(1);
            (filters.includes_table(&schema, &name) && filters.copies_data(&schema, &name)).then(
                || {
                    (
                        format!("{schema}.{name}"),
                        qualified(&schema, &name),
                        r.get(2),
                    )
                },
            )
        })
        .collect())
}

/// Row count and checksum of one table. The checksum is a numeric sum of 64-bit row hashes:
/// independent of row order and of physical layout, sensitive to every value.
async fn table_digest(
    client: &Client,
    table: &str,
    counts_only: bool,
) -> Result<(i64, Option<String>)> {
    let sql = if counts_only {
        format!("SELECT count(*), NULL::text FROM ONLY {table}")
    } else {
        format!(
            "SELECT count(*), coalesce(sum(hashtextextended(r::text, 0)::numeric), 0)::text FROM ONLY {table} r"
        )
    };
    let row = client
        .query_one(&sql, &[])
        .await
        .map_err(|e| anyhow!("cannot checksum {table}: {}", describe(&e)))?;
    Ok((row.get(0), row.get(1)))
}

// Each query returns (name, schema, table or NULL, value) so that filters apply to it; the
// sequences' also (sequence name, owner schema, owner table, identity, tables whose defaults
// use it) for `catalog::SequenceLinks::included`, the rule the clone selected them by.
static SEQUENCES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT n.nspname || '.' || c.relname, n.nspname::text, NULL::text,
                coalesce(CASE WHEN has_sequence_privilege(c.oid, 'SELECT,USAGE') THEN pg_sequence_last_value(c.oid) END::text, 'not called'),
                c.relname::text, tn.nspname::text, t.relname::text, coalesce(o.deptype = 'i', false),
                {}
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         {}
         WHERE c.relkind = 'S' AND NOT pg_is_other_temp_schema(n.oid)",
        crate::pg::catalog::SEQUENCE_USED_BY,
        crate::pg::catalog::SEQUENCE_OWNER_JOIN
    )
});
const INDEXES: &str =
    "SELECT schemaname || '.' || indexname, schemaname, tablename::text, indexdef FROM pg_indexes";
/// Constraints by definition, as a migration must preserve them whatever the servers' majors:
/// NOT NULL is compared per column (`COLUMNS`), because PostgreSQL 18 also catalogs it as
/// constraints (contype 'n', named by the server) and older majors do not; and the constraints
/// a server derives by itself from a foreign key that references a partitioned table (one per
/// referenced partition, on the referencing table, named `…_fkey1` before 18 and `…_fkey_1`
/// since) are left out, their parent foreign key being compared (invariant 10).
const CONSTRAINTS: &str = "SELECT n.nspname || '.' || c.relname || '.' || k.conname, n.nspname, c.relname::text, pg_get_constraintdef(k.oid)
    FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE k.contype <> 'n'
      AND NOT EXISTS (SELECT 1 FROM pg_constraint p WHERE p.oid = k.conparentid AND p.conrelid = k.conrelid)";

/// Each column of each table: type, collation when not its type's, NOT NULL (attnotnull, on
/// every major), identity, generated expression or default, printed the same way by 12 … 18.
const COLUMNS: &str = "SELECT n.nspname || '.' || c.relname || '.' || a.attname, n.nspname, c.relname::text,
        format_type(a.atttypid, a.atttypmod)
        || coalesce((SELECT ' COLLATE ' || quote_ident(cn.nspname) || '.' || quote_ident(co.collname)
                     FROM pg_collation co JOIN pg_namespace cn ON cn.oid = co.collnamespace JOIN pg_type ty ON ty.oid = a.atttypid
                     WHERE co.oid = a.attcollation AND a.attcollation <> ty.typcollation), '')
        || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END
        || CASE a.attidentity WHEN 'a' THEN ' GENERATED ALWAYS AS IDENTITY'
                              WHEN 'd' THEN ' GENERATED BY DEFAULT AS IDENTITY' ELSE '' END
        || CASE WHEN a.attgenerated <> '' THEN ' GENERATED ALWAYS AS (' || pg_get_expr(d.adbin, d.adrelid) || ')'
                     || CASE a.attgenerated WHEN 's' THEN ' STORED' ELSE ' VIRTUAL' END
                WHEN d.adbin IS NOT NULL THEN ' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid)
                ELSE '' END
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p')
      AND n.nspname <> 'pgtide' AND NOT pg_is_other_temp_schema(n.oid) AND n.nspname NOT LIKE 'pg\\_toast%'
      AND NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = 'pg_class'::regclass
                      AND x.objid = c.oid AND x.deptype = 'e')";

/// Each domain: base type, NOT NULL (typnotnull: PostgreSQL 18 also catalogs it as a
/// constraint), default and CHECK constraints.
const DOMAINS: &str = "SELECT n.nspname || '.' || t.typname, n.nspname, NULL::text,
        format_type(t.typbasetype, t.typtypmod)
        || CASE WHEN t.typnotnull THEN ' NOT NULL' ELSE '' END
        || coalesce(' DEFAULT ' || pg_get_expr(t.typdefaultbin, 0), '')
        || coalesce((SELECT string_agg(' CONSTRAINT ' || quote_ident(k.conname) || ' ' || pg_get_constraintdef(k.oid), '' ORDER BY k.conname)
                     FROM pg_constraint k WHERE k.contypid = t.oid AND k.contype = 'c'), '')
    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE t.typtype = 'd' AND n.nspname <> 'pgtide' AND NOT pg_is_other_temp_schema(n.oid)
      AND NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = 'pg_type'::regclass
                      AND x.objid = t.oid AND x.deptype = 'e')";

/// How each table is partitioned (its key) or is a partition (its parent and bounds).
const PARTITIONS: &str = "SELECT n.nspname || '.' || c.relname, n.nspname, c.relname::text,
        concat_ws(' ',
            CASE WHEN c.relkind = 'p' THEN 'PARTITION BY ' || pg_get_partkeydef(c.oid) END,
            CASE WHEN c.relispartition THEN
                (SELECT 'PARTITION OF ' || quote_ident(pn.nspname) || '.' || quote_ident(pc.relname)
                 FROM pg_inherits i JOIN pg_class pc ON pc.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = pc.relnamespace
                 WHERE i.inhrelid = c.oid)
                || ' ' || pg_get_expr(c.relpartbound, c.oid) END)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE (c.relkind = 'p' OR c.relispartition) AND c.relkind IN ('r', 'p')
      AND n.nspname <> 'pgtide' AND NOT pg_is_other_temp_schema(n.oid)";

/// Each table's replica identity (what logical replication from it, the reverse stream
/// included, matches rows by): default, nothing, full or the index's name.
const REPLICA_IDENTITIES: &str = "SELECT n.nspname || '.' || c.relname, n.nspname, c.relname::text,
        CASE c.relreplident WHEN 'd' THEN 'default' WHEN 'n' THEN 'nothing' WHEN 'f' THEN 'full'
             ELSE 'index ' || coalesce((SELECT ic.relname::text FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                                         WHERE i.indrelid = c.oid AND i.indisreplident), '?') END
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'pgtide' AND NOT pg_is_other_temp_schema(n.oid)
      AND n.nspname NOT LIKE 'pg\\_toast%'
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                      AND d.objid = c.oid AND d.deptype = 'e')";

async fn named_values(
    client: &Client,
    kind: &str,
    query: &str,
    filters: &Filters,
) -> Result<BTreeMap<String, String>> {
    let rows = client
        .query(query, &[])
        .await
        .map_err(|e| anyhow!("{}", describe(&e)))?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let schema: String = r.get(1);
            let table: Option<String> = r.get(2);
            let included = if kind == "sequence" {
                let table_name = |(schema, name): (String, String)| TableName { schema, name };
                let owner: Option<String> = r.get(5);
                let used_by: Vec<(String, String)> =
                    serde_json::from_str(&r.get::<_, String>(8)).unwrap_or_default();
                crate::pg::catalog::SequenceLinks {
                    schema: schema.clone(),
                    name: r.get(4),
                    owner: owner
                        .zip(r.get::<_, Option<String>>(6))
                        .map(|owner| (table_name(owner), r.get(7))),
                    used_by: used_by.into_iter().map(table_name).collect(),
                }
                .included(filters)
            } else {
                match &table {
                    Some(t) => filters.includes_table(&schema, t),
                    None => filters.includes_schema(&schema),
                }
            };
            (included && !matches!(schema.as_str(), "pg_catalog" | "information_schema"))
                .then(|| (r.get::<_, String>(0), r.get::<_, String>(3)))
        })
        .collect())
}

/// Prints the side-by-side table for a terminal.
pub fn print_report(report: &Report) {
    println!(
        "{:<40} {:>12} {:>12} {:>22} {:>22}  verdict",
        "table", "source rows", "target rows", "source checksum", "target checksum"
    );
    for t in &report.tables {
        print_row(t, if t.matches { "ok" } else { "DIFFERENT" });
    }
    if !report.matviews.is_empty() {
        println!();
        println!(
            "materialized views (each holds what its last REFRESH saw on its server; refresh the target's with `pgtide cutover --refresh-matviews` or REFRESH MATERIALIZED VIEW):"
        );
        for t in &report.matviews {
            print_row(
                t,
                if t.matches {
                    "ok (materialized view)"
                } else {
                    "differs (materialized view)"
                },
            );
        }
    }
    let mismatched: Vec<&ObjectReport> = report.objects.iter().filter(|o| !o.matches).collect();
    let count = |kind: &str| report.objects.iter().filter(|o| o.kind == kind).count();
    println!();
    println!(
        "{} sequences, {} indexes, {} constraints, {} columns, {} domains, {} partitioned tables and partitions, {} replica identities compared; {} differ",
        count("sequence"),
        count("index"),
        count("constraint"),
        count("column"),
        count("domain"),
        count("partition"),
        count("replica identity"),
        mismatched.len()
    );
    for o in mismatched {
        println!(
            "  {} {}: source {} / target {}",
            o.kind,
            o.name,
            o.source.as_deref().unwrap_or("missing"),
            o.target.as_deref().unwrap_or("missing")
        );
    }
    println!();
    if !report.matviews.is_empty() {
        println!("{}", matview_summary(report));
    }
    if report.all_match {
        println!(
            "verify: source and target are identical ({} tables)",
            report.tables.len()
        );
    } else {
        let bad = report.tables.iter().filter(|t| !t.matches).count();
        println!("verify: DIFFERENCES FOUND ({bad} tables differ)");
    }
}

/// One line of the side-by-side table.
fn print_row(t: &TableReport, verdict: &str) {
    let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!(
        "{:<40} {:>12} {:>12} {:>22} {:>22}  {}",
        t.table,
        t.source_rows
            .map(|v| v.to_string())
            .unwrap_or_else(|| "-".into()),
        t.target_rows
            .map(|v| v.to_string())
            .unwrap_or_else(|| "missing".into()),
        show(&t.source_checksum),
        show(&t.target_checksum),
        verdict
    );
}

/// "N materialized view(s): K identical, J differ (names)": printed by verify and cutover,
/// apart from the tables' verdict.
pub fn matview_summary(report: &Report) -> String {
    let differ: Vec<&str> = report
        .matviews
        .iter()
        .filter(|m| !m.matches)
        .map(|m| m.table.as_str())
        .collect();
    let n = report.matviews.len();
    let mut line = format!(
        "{n} materialized view{} compared: {} identical",
        if n == 1 { "" } else { "s" },
        n - differ.len()
    );
    if !differ.is_empty() {
        line.push_str(&format!(
            ", {} differ{} ({}): a materialized view holds what its last REFRESH saw; refresh it where it is stale",
            differ.len(),
            if differ.len() == 1 { "s" } else { "" },
            differ.join(", ")
        ));
    }
    line
}

/// Refreshes every populated materialized view on the target (within the filters), in
/// creation order (pg_restore creates a matview after those it reads): after the data is
/// final, so that each holds what the migrated tables hold. Returns their names.
pub async fn refresh_matviews(target: &ConnInfo, filters: &Filters) -> Result<Vec<String>> {
    let dst = pg::connect(target, Side::Target, "refresh matviews").await?;
    let rows = dst
        .query(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'm' AND c.relispopulated AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgtide')
             ORDER BY c.oid",
            &[],
        )
        .await
        .map_err(|e| anyhow!("cannot list the target's materialized views: {}", describe(&e)))?;
    let mut refreshed = Vec::new();
    for r in &rows {
        let (schema, name): (String, String) = (r.get(0), r.get(1));
        if !filters.includes_table(&schema, &name) {
            continue;
        }
        dst.batch_execute(&format!(
            "REFRESH MATERIALIZED VIEW {}",
            qualified(&schema, &name)
        ))
        .await
        .map_err(|e| {
            anyhow!(
                "cannot refresh the materialized view {schema}.{name} on the target: {}",
                describe(&e)
            )
        })?;
        refreshed.push(format!("{schema}.{name}"));
    }
    Ok(refreshed)
}

#[cfg(test)]
mod tests {
    use super::sequence_matches;

    #[test]
    fn sequences_with_an_offset_must_be_ahead() {
        assert!(sequence_matches("5", "5", 0));
        assert!(!sequence_matches("5", "1005", 0));
        assert!(sequence_matches("5", "1005", 1000));
        assert!(sequence_matches("5", "6", 1000));
        assert!(!sequence_matches("7", "6", 1000));
        assert!(sequence_matches("7", "6", -1000));
        assert!(sequence_matches("not called", "not called", 1000));
        assert!(!sequence_matches("not called", "1005", 1000));
    }
}
