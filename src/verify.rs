//! verify: proves a copy identical by content. For every table, each server computes the row
//! count and an order-independent checksum over the rows' text form (the sum of a 64-bit hash
//! of each row), inside one REPEATABLE READ transaction per side; the results are printed side
//! by side. Sequences, indexes and constraints are compared by value and definition.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, anyhow};
use serde::Serialize;
use tokio_postgres::Client;

use crate::clone::filters::Filters;
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
    pub objects: Vec<ObjectReport>,
    pub all_match: bool,
}

/// Compares every table of the source (within `filters`) with the target.
pub async fn run(
    source: &ConnInfo,
    target: &ConnInfo,
    filters: &Filters,
    counts_only: bool,
) -> Result<Report> {
    let src = pg::connect(source, Side::Source, "verify").await?;
    let dst = pg::connect(target, Side::Target, "verify").await?;
    // Definitions are compared as text: read them on both sides fully qualified.
    pg::pin_search_path(&dst).await?;
    for c in [&src, &dst] {
        c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
    }
    let source_tables = list_tables(&src, filters).await?;
    let target_tables: BTreeSet<String> = list_tables(&dst, filters)
        .await?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut tables = Vec::new();
    for (name, sql_name) in &source_tables {
        let (s, t) = if target_tables.contains(name) {
            let (s, t) = tokio::join!(
                table_digest(&src, sql_name, counts_only),
                table_digest(&dst, sql_name, counts_only)
            );
            (Some(s?), Some(t?))
        } else {
            (Some(table_digest(&src, sql_name, counts_only).await?), None)
        };
        let matches = s.is_some() && s == t;
        tables.push(TableReport {
            table: name.clone(),
            source_rows: s.as_ref().map(|d| d.0),
            target_rows: t.as_ref().map(|d| d.0),
            source_checksum: s.and_then(|d| d.1),
            target_checksum: t.and_then(|d| d.1),
            matches,
        });
    }
    let mut objects = Vec::new();
    for (kind, query) in [
        ("sequence", SEQUENCES),
        ("index", INDEXES),
        ("constraint", CONSTRAINTS),
    ] {
        let s = named_values(&src, query, filters).await?;
        let t = named_values(&dst, query, filters).await?;
        let names: BTreeSet<&String> = s.keys().chain(t.keys()).collect();
        for name in names {
            let (sv, tv) = (s.get(name).cloned(), t.get(name).cloned());
            objects.push(ObjectReport {
                kind,
                name: name.clone(),
                matches: sv.is_some() && sv == tv,
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
        objects,
        all_match,
    })
}

/// (display name, quoted name) of every table holding rows: plain tables and leaf partitions.
async fn list_tables(client: &Client, filters: &Filters) -> Result<Vec<(String, String)>> {
    let rows = client
        .query(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgtide')
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                               AND d.objid = c.oid AND d.deptype = 'e')
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let schema: String = r.get(0);
            let name: String = r.get(1);
            filters
                .includes_table(&schema, &name)
                .then(|| (format!("{schema}.{name}"), qualified(&schema, &name)))
        })
        .filter(|(display, _)| {
            let (schema, name) = display.split_once('.').unwrap_or_default();
            filters.copies_data(schema, name)
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

// Each query returns (name, schema, table or NULL, value) so that filters apply to it.
const SEQUENCES: &str = "SELECT schemaname || '.' || sequencename, schemaname, NULL::text, coalesce(last_value::text, 'not called') FROM pg_sequences";
const INDEXES: &str =
    "SELECT schemaname || '.' || indexname, schemaname, tablename::text, indexdef FROM pg_indexes";
const CONSTRAINTS: &str = "SELECT n.nspname || '.' || c.relname || '.' || k.conname, n.nspname, c.relname::text, pg_get_constraintdef(k.oid)
    FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace";

async fn named_values(
    client: &Client,
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
            let included = match &table {
                Some(t) => filters.includes_table(&schema, t),
                None => filters.includes_schema(&schema),
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
    let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    for t in &report.tables {
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
            if t.matches { "ok" } else { "DIFFERENT" }
        );
    }
    let mismatched: Vec<&ObjectReport> = report.objects.iter().filter(|o| !o.matches).collect();
    let count = |kind: &str| report.objects.iter().filter(|o| o.kind == kind).count();
    println!();
    println!(
        "{} sequences, {} indexes, {} constraints compared; {} differ",
        count("sequence"),
        count("index"),
        count("constraint"),
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
