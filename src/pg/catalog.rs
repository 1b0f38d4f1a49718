//! Source catalog queries, run inside the snapshot transaction so that the list of tables,
//! their sizes, indexes and sequences is the one the copy will see.

use anyhow::{Context, Result, bail};
use tokio_postgres::Client;

use crate::clone::filters::Filters;
use crate::state::{ConstraintRow, IndexRow, PartRow, SequenceRow, TableRow};

/// Everything the clone needs to know about the source, as of the snapshot.
pub struct Catalog {
    pub tables: Vec<TableRow>,
    pub parts: Vec<PartRow>,
    pub indexes: Vec<IndexRow>,
    pub sequences: Vec<SequenceRow>,
    pub large_objects: Vec<u32>,
    pub constraints: Vec<ConstraintInfo>,
}

/// Every constraint of the copied tables, for the record in state.db: those backed by an index
/// are built by the index workers, the others (foreign keys, checks…) come with post-data.
#[derive(Clone, Debug)]
pub struct ConstraintInfo {
    pub oid: u32,
    pub table_oid: u32,
    pub name: String,
    pub kind: String,
    pub definition: String,
}

/// Schemas that never hold user data to migrate.
const SYSTEM_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgtide') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'";

/// Reads the catalog. `split_bytes`: tables whose heap + TOAST size exceeds it are split into
/// ctid ranges of about that size.
pub async fn read_catalog(
    client: &Client,
    filters: &Filters,
    split_bytes: Option<u64>,
) -> Result<Catalog> {
    let block_size: i64 = client
        .query_one("SELECT current_setting('block_size')::bigint", &[])
        .await?
        .get(0);
    let sql = format!(
        "SELECT c.oid, n.nspname, c.relname, pg_relation_size(c.oid),
                coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0),
                greatest(c.reltuples, 0)::bigint,
                EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'p'),
                coalesce((SELECT json_agg(a.attname ORDER BY a.attnum)::text FROM pg_attribute a
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''), '[]'),
                NOT EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                            WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
                              AND (t.oid >= 16384 OR t.typsend = 0 OR t.typreceive = 0))
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r' AND {SYSTEM_SCHEMAS}
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                           AND d.objid = c.oid AND d.deptype = 'e')
         ORDER BY 1"
    );
    let mut tables = Vec::new();
    for row in client
        .query(&sql, &[])
        .await
        .context("cannot list the source tables")?
    {
        let schema: String = row.get(1);
        let name: String = row.get(2);
        if !filters.includes_table(&schema, &name) {
            continue;
        }
        let heap_bytes: i64 = row.get(3);
        let columns_json: String = row.get(7);
        tables.push(TableRow {
            oid: row.get(0),
            copy_data: filters.copies_data(&schema, &name),
            schema,
            name,
            heap_bytes,
            toast_bytes: row.get(4),
            pages: heap_bytes / block_size,
            est_rows: row.get(5),
            has_pk: row.get(6),
            columns: serde_json::from_str(&columns_json)?,
            binary_copy: row.get(8),
        });
    }
    check_filters_name_real_objects(client, filters).await?;

    let parts = tables
        .iter()
        .filter(|t| t.copy_data)
        .flat_map(|t| split_table(t, split_bytes))
        .collect();

    let table_oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let mut indexes = Vec::new();
    for row in client
        .query(
            "SELECT i.indexrelid, i.indrelid, n.nspname, ic.relname, pg_get_indexdef(i.indexrelid),
                    k.oid, k.conname, k.contype::text, pg_get_constraintdef(k.oid), k.condeferrable, k.condeferred, i.indisreplident
             FROM pg_index i
             JOIN pg_class ic ON ic.oid = i.indexrelid
             JOIN pg_namespace n ON n.oid = ic.relnamespace
             LEFT JOIN pg_constraint k ON k.conindid = i.indexrelid AND k.conrelid = i.indrelid
                                       AND k.contype IN ('p', 'u', 'x')
             WHERE i.indrelid = ANY($1) AND i.indisvalid AND i.indislive
             ORDER BY i.indrelid, i.indexrelid",
            &[&table_oids],
        )
        .await
        .context("cannot list the source indexes")?
    {
        let constraint_oid: Option<u32> = row.get(5);
        indexes.push(IndexRow {
            oid: row.get(0),
            table_oid: row.get(1),
            schema: row.get(2),
            name: row.get(3),
            definition: row.get(4),
            constraint: constraint_oid.map(|oid| ConstraintRow {
                oid,
                name: row.get(6),
                kind: row.get(7),
                definition: row.get(8),
                deferrable: row.get(9),
                deferred: row.get(10),
            }),
            replica_identity: row.get(11),
            status: "pending".into(),
        });
    }

    let sequences = read_sequences(client, filters).await?;

    let constraints = client
        .query(
            "SELECT oid, conrelid, conname, contype::text, pg_get_constraintdef(oid)
             FROM pg_constraint WHERE conrelid = ANY($1) ORDER BY conrelid, conname",
            &[&table_oids],
        )
        .await
        .context("cannot list the source constraints")?
        .iter()
        .map(|r| ConstraintInfo {
            oid: r.get(0),
            table_oid: r.get(1),
            name: r.get(2),
            kind: r.get(3),
            definition: r.get(4),
        })
        .collect();

    let large_objects = client
        .query("SELECT oid FROM pg_largeobject_metadata ORDER BY oid", &[])
        .await
        .context("cannot list the source large objects")?
        .iter()
        .map(|r| r.get(0))
        .collect();

    Ok(Catalog {
        tables,
        parts,
        indexes,
        sequences,
        large_objects,
        constraints,
    })
}

/// Every sequence's current value (sequences are not transactional: read it as late as
/// possible, at the snapshot for a clone, at endpos for a follow).
pub async fn read_sequences(client: &Client, filters: &Filters) -> Result<Vec<SequenceRow>> {
    let mut sequences = Vec::new();
    let seq_sql = format!(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'S' AND {SYSTEM_SCHEMAS}
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                           AND d.objid = c.oid AND d.deptype = 'e')
         ORDER BY 1, 2"
    );
    for row in client
        .query(&seq_sql, &[])
        .await
        .context("cannot list the source sequences")?
    {
        let schema: String = row.get(0);
        let name: String = row.get(1);
        if !filters.includes_schema(&schema) {
            continue;
        }
        let value = client
            .query_one(
                &format!(
                    "SELECT last_value, is_called FROM {}",
                    crate::pg::qualified(&schema, &name)
                ),
                &[],
            )
            .await
            .with_context(|| format!("cannot read sequence {schema}.{name}"))?;
        sequences.push(SequenceRow {
            schema,
            name,
            last_value: value.get(0),
            is_called: value.get(1),
        });
    }

    Ok(sequences)
}

/// A filters file that names a table or schema that does not exist is a typo the operator must
/// hear about, not a silent no-op.
pub async fn check_filters_name_real_objects(client: &Client, filters: &Filters) -> Result<()> {
    for schema in filters.named_schemas() {
        let found = client
            .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[schema])
            .await?;
        if found.is_none() {
            bail!(
                "the filters file names the schema \"{schema}\", which does not exist on the source; fix the name (unquoted names are folded to lower case)"
            );
        }
    }
    for t in filters.named_tables() {
        let found = client
            .query_opt(
                "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&t.schema, &t.name],
            )
            .await?;
        if found.is_none() {
            bail!(
                "the filters file names the table {}.{}, which does not exist on the source; fix the name (unquoted names are folded to lower case)",
                t.schema,
                t.name
            );
        }
    }
    Ok(())
}

/// Splits a table into ctid page ranges sized on heap + TOAST bytes; the last range is open so
/// that it also covers pages the size estimate missed.
pub fn split_table(table: &TableRow, split_bytes: Option<u64>) -> Vec<PartRow> {
    let total = table.total_bytes().max(0) as u64;
    let nparts = match split_bytes {
        Some(limit) if limit > 0 && total > limit && table.pages > 1 => {
            (total.div_ceil(limit) as i64).min(table.pages)
        }
        _ => 1,
    };
    let pages_per_part = (table.pages + nparts - 1) / nparts.max(1);
    (0..nparts)
        .map(|part| PartRow {
            table_oid: table.oid,
            part,
            nparts,
            first_page: part * pages_per_part,
            end_page: (part + 1 < nparts).then_some((part + 1) * pages_per_part),
            status: "pending".into(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(heap: i64, toast: i64, pages: i64) -> TableRow {
        TableRow {
            oid: 1,
            schema: "s".into(),
            name: "t".into(),
            heap_bytes: heap,
            toast_bytes: toast,
            pages,
            est_rows: 0,
            has_pk: true,
            columns: vec![],
            binary_copy: true,
            copy_data: true,
        }
    }

    #[test]
    fn split_covers_every_page_once() {
        let parts = split_table(&table(1000 * 8192, 0, 1000), Some(300 * 8192));
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0].first_page, 0);
        for w in parts.windows(2) {
            assert_eq!(w[0].end_page, Some(w[1].first_page));
        }
        assert_eq!(parts.last().unwrap().end_page, None);
    }

    #[test]
    fn toast_counts_towards_the_split() {
        assert_eq!(
            split_table(&table(8192 * 10, 0, 10), Some(8192 * 20)).len(),
            1
        );
        assert_eq!(
            split_table(&table(8192 * 10, 8192 * 30, 10), Some(8192 * 20)).len(),
            2
        );
        assert_eq!(split_table(&table(8192 * 10, 0, 10), None).len(), 1);
    }
}
