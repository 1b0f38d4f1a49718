//! Source catalog queries, run inside the snapshot transaction so that the list of tables,
//! their sizes, indexes and sequences is the one the copy will see.

use anyhow::{Context, Result, bail};
use tokio_postgres::Client;

use crate::clone::filters::{Filters, TableName};

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

/// Reads the catalog; `split` decides which tables are copied as several ctid ranges.
pub async fn read_catalog(
    client: &Client,
    filters: &Filters,
    split: SplitPolicy,
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

    let parts = plan_parts(&tables, split);

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

/// Joined to a sequence `c`: the table that owns it (`t`, in schema `tn`) through a serial
/// column (deptype 'a', OWNED BY) or an identity column (deptype 'i'), NULLs when none does.
pub const SEQUENCE_OWNER_JOIN: &str =
    "LEFT JOIN pg_depend o ON o.classid = 'pg_class'::regclass AND o.objid = c.oid
           AND o.refclassid = 'pg_class'::regclass AND o.deptype IN ('a', 'i')
         LEFT JOIN pg_class t ON t.oid = o.refobjid
         LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace";

/// Every sequence's current value (sequences are not transactional: read it as late as
/// possible, at the snapshot for a clone, at endpos for a follow). Only the sequences that the
/// filtered schema dump holds (see [`SequenceLinks::included`]).
pub async fn read_sequences(client: &Client, filters: &Filters) -> Result<Vec<SequenceRow>> {
    let mut sequences = Vec::new();
    for link in sequence_links(client).await? {
        if !link.included(filters) {
            continue;
        }
        let SequenceLinks { schema, name, .. } = link;
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

/// A sequence and the tables it belongs to: the one that owns it (`OWNED BY`, or an identity
/// column) and those whose column defaults draw from it (`DEFAULT nextval('s')`, owned or not).
#[derive(Clone, Debug)]
pub struct SequenceLinks {
    pub schema: String,
    pub name: String,
    /// The owning table, and whether the sequence is an identity column's.
    pub owner: Option<(TableName, bool)>,
    pub used_by: Vec<TableName>,
}

impl SequenceLinks {
    /// Whether the filtered dump holds this sequence, as pg_dump decides it plus the sequences
    /// pgtide adds to it ([`sequences_for_dump`]): with `[include-only-table]`, the sequences
    /// the included tables own or draw their defaults from; otherwise every sequence of an
    /// included schema (an identity sequence goes with its table) and those included tables
    /// own.
    pub fn included(&self, filters: &Filters) -> bool {
        let includes = |t: &TableName| filters.includes_table(&t.schema, &t.name);
        let owner_included = self.owner.as_ref().is_some_and(|(t, _)| includes(t));
        if !filters.include_only_tables.is_empty() {
            return owner_included || self.used_by.iter().any(includes);
        }
        let identity_of_excluded = matches!(&self.owner, Some((t, true)) if !includes(t));
        owner_included
            || (filters.includes_table(&self.schema, &self.name) && !identity_of_excluded)
    }
}

/// For a sequence `c`: a JSON array of the [schema, table] pairs whose column defaults draw
/// from it (`DEFAULT nextval('s')`, owned or not).
pub const SEQUENCE_USED_BY: &str =
    "coalesce((SELECT json_agg(json_build_array(un.nspname, u.relname))::text
               FROM pg_depend d JOIN pg_attrdef ad ON ad.oid = d.objid
               JOIN pg_class u ON u.oid = ad.adrelid JOIN pg_namespace un ON un.oid = u.relnamespace
               WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass
                 AND d.refobjid = c.oid), '[]')";

/// Every user sequence of the source with its links (extension members left out).
pub async fn sequence_links(client: &Client) -> Result<Vec<SequenceLinks>> {
    let sql = format!(
        "SELECT n.nspname::text, c.relname::text,
                o.owner_schema, o.owner_name, o.identity,
                {SEQUENCE_USED_BY}
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         LEFT JOIN LATERAL (
             SELECT tn.nspname::text AS owner_schema, t.relname::text AS owner_name, d.deptype = 'i' AS identity
             FROM pg_depend d JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = t.relnamespace
             WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
               AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
             LIMIT 1) o ON true
         WHERE c.relkind = 'S' AND {SYSTEM_SCHEMAS}
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                           AND d.objid = c.oid AND d.deptype = 'e')
         ORDER BY 1, 2"
    );
    let mut links = Vec::new();
    for row in client
        .query(&sql, &[])
        .await
        .context("cannot list the source sequences")?
    {
        let owner_schema: Option<String> = row.get(2);
        let owner_name: Option<String> = row.get(3);
        let identity: Option<bool> = row.get(4);
        let used_by: Vec<(String, String)> = serde_json::from_str(&row.get::<_, String>(5))
            .context("cannot read the tables using a sequence")?;
        links.push(SequenceLinks {
            schema: row.get(0),
            name: row.get(1),
            owner: owner_schema
                .zip(owner_name)
                .map(|(schema, name)| (TableName { schema, name }, identity.unwrap_or(false))),
            used_by: used_by
                .into_iter()
                .map(|(schema, name)| TableName { schema, name })
                .collect(),
        });
    }
    Ok(links)
}

/// The filters for pg_dump: with `[include-only-table]`, pg_dump dumps only the tables named
/// (and the sequences they own), so a table whose default draws from a sequence it does not
/// own (`CREATE SEQUENCE s; CREATE TABLE t (id int DEFAULT nextval('s'))`) would fail to
/// restore; those sequences are added to the selection.
pub async fn sequences_for_dump(client: &Client, filters: &Filters) -> Result<Filters> {
    let mut for_dump = filters.clone();
    if filters.include_only_tables.is_empty() {
        return Ok(for_dump);
    }
    for link in sequence_links(client).await? {
        let owned_by_included = link
            .owner
            .as_ref()
            .is_some_and(|(t, _)| filters.includes_table(&t.schema, &t.name));
        if link.included(filters) && !owned_by_included {
            tracing::info!(
                "including sequence {}.{}: the default of {} draws from it",
                link.schema,
                link.name,
                link.used_by
                    .iter()
                    .filter(|t| filters.includes_table(&t.schema, &t.name))
                    .map(|t| format!("{}.{}", t.schema, t.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for_dump.include_only_tables.push(TableName {
                schema: link.schema,
                name: link.name,
            });
        }
    }
    Ok(for_dump)
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
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
                &[&t.schema, &t.name],
            )
            .await?;
        if found.is_none() {
            bail!(
                "the filters file names the table {}.{}, which does not exist on the source (no table, view or materialized view of that name); fix the name (unquoted names are folded to lower case)",
                t.schema,
                t.name
            );
        }
    }
    Ok(())
}

/// An object the filtered dump holds that depends on a relation the filters leave out: the
/// restore of the dump would fail on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokenDependency {
    /// "view", "materialized view", "foreign key", "inheritance", or the kind of a used
    /// object outside the copied schemas ("sequence", "type", "function", …).
    pub kind: String,
    /// The dependent relation, as SQL prints it (`public."My View"`).
    pub dependent: String,
    /// The foreign key's name, for a foreign key.
    pub constraint: Option<String>,
    /// The relation left out, as SQL prints it.
    pub left_out: String,
}

/// The views and materialized views, foreign keys and inheritance children that the filters
/// keep while leaving out a relation they depend on (`[exclude-table] public.a` with a view on
/// `a`, or `[include-only-table] public.t` with a foreign key to a table not listed), and the
/// kept relations that use a sequence, type or function of a schema the filters leave out.
pub async fn broken_dependencies(
    client: &Client,
    filters: &Filters,
) -> Result<Vec<BrokenDependency>> {
    let rows = client
        .query(
            "WITH edges AS (
               SELECT 'view' AS kind, w.ev_class AS dep, NULL::text AS con, d.refobjid AS ref
                 FROM pg_depend d JOIN pg_rewrite w ON w.oid = d.objid
                WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
                  AND d.refobjid <> w.ev_class
               UNION
               SELECT 'foreign key', k.conrelid, k.conname::text, k.confrelid
                 FROM pg_constraint k WHERE k.contype = 'f' AND k.conrelid <> k.confrelid
               UNION
               SELECT 'inheritance', i.inhrelid, NULL, i.inhparent FROM pg_inherits i
             )
             SELECT CASE WHEN e.kind = 'view' AND dc.relkind = 'm' THEN 'materialized view' ELSE e.kind END,
                    dn.nspname::text, dc.relname::text, e.con, rn.nspname::text, rc.relname::text,
                    format('%I.%I', dn.nspname, dc.relname), format('%I.%I', rn.nspname, rc.relname)
               FROM edges e
               JOIN pg_class dc ON dc.oid = e.dep JOIN pg_namespace dn ON dn.oid = dc.relnamespace
               JOIN pg_class rc ON rc.oid = e.ref JOIN pg_namespace rn ON rn.oid = rc.relnamespace
              WHERE rc.relkind IN ('r', 'p', 'v', 'm', 'f')
                AND rn.nspname NOT IN ('pg_catalog', 'information_schema', 'pgtide') AND rn.nspname NOT LIKE 'pg\\_toast%'
                AND NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = 'pg_class'::regclass
                                AND x.objid IN (dc.oid, rc.oid) AND x.deptype = 'e')
              ORDER BY 7, 1, 4, 8",
            &[],
        )
        .await
        .context("cannot list the dependencies between source relations")?;
    let mut broken = Vec::new();
    for r in rows {
        let (dep_schema, dep_name): (String, String) = (r.get(1), r.get(2));
        let (ref_schema, ref_name): (String, String) = (r.get(4), r.get(5));
        if filters.includes_table(&dep_schema, &dep_name)
            && !filters.includes_table(&ref_schema, &ref_name)
        {
            let found = BrokenDependency {
                kind: r.get(0),
                dependent: r.get(6),
                constraint: r.get(3),
                left_out: r.get(7),
            };
            if !broken.contains(&found) {
                broken.push(found);
            }
        }
    }
    // Objects other than relations (types, functions, sequences, collations…) that a kept
    // relation's columns, defaults, constraints, triggers, indexes or view rules use, in a
    // schema the filters leave out: `[exclude-schema] ids` while a default draws from
    // `ids.s`. (A sequence the relation owns is dumped with it; extension members are left to
    // the extension.)
    let rows = client
        .query(
            "WITH parts AS (
               SELECT 'pg_class'::regclass AS classid, c.oid AS objid, c.oid AS rel
                 FROM pg_class c WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
               UNION ALL SELECT 'pg_class'::regclass, i.indexrelid, i.indrelid FROM pg_index i
               UNION ALL SELECT 'pg_attrdef'::regclass, ad.oid, ad.adrelid FROM pg_attrdef ad
               UNION ALL SELECT 'pg_constraint'::regclass, k.oid, k.conrelid FROM pg_constraint k WHERE k.conrelid <> 0
               UNION ALL SELECT 'pg_trigger'::regclass, t.oid, t.tgrelid FROM pg_trigger t WHERE NOT t.tgisinternal
               UNION ALL SELECT 'pg_rewrite'::regclass, w.oid, w.ev_class FROM pg_rewrite w
             )
             SELECT DISTINCT dn.nspname::text, dc.relname::text, format('%I.%I', dn.nspname, dc.relname),
                    o.type, o.schema, o.identity
               FROM pg_depend d
               JOIN parts p ON p.classid = d.classid AND p.objid = d.objid
               JOIN pg_class dc ON dc.oid = p.rel JOIN pg_namespace dn ON dn.oid = dc.relnamespace
               CROSS JOIN LATERAL pg_identify_object(d.refclassid, d.refobjid, 0) o
              WHERE d.deptype = 'n' AND d.refobjid >= 16384 -- built-in objects are never left out
                AND o.schema IS NOT NULL
                AND o.schema NOT IN ('pg_catalog', 'information_schema', 'pgtide') AND o.schema NOT LIKE 'pg\\_toast%'
                AND o.type NOT IN ('table', 'view', 'materialized view', 'foreign table', 'index',
                                   'table column', 'view column', 'materialized view column', 'foreign table column')
                AND NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.refclassid = 'pg_extension'::regclass
                                AND x.classid = d.refclassid AND x.objid = d.refobjid AND x.deptype = 'e')
                AND NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = 'pg_class'::regclass
                                AND x.objid = d.refobjid AND x.refobjid = p.rel AND x.deptype IN ('a', 'i'))
                AND NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = 'pg_class'::regclass
                                AND x.objid = dc.oid AND x.deptype = 'e')
              ORDER BY 3, 4, 6",
            &[],
        )
        .await
        .context("cannot list what the source relations use")?;
    for r in rows {
        let (dep_schema, dep_name): (String, String) = (r.get(0), r.get(1));
        let used_schema: String = r.get(4);
        if filters.includes_table(&dep_schema, &dep_name) && !filters.includes_schema(&used_schema)
        {
            let found = BrokenDependency {
                kind: r.get(3),
                dependent: r.get(2),
                constraint: None,
                left_out: r.get(5),
            };
            if !broken.contains(&found) {
                broken.push(found);
            }
        }
    }
    Ok(broken)
}

/// Which tables are copied as several ctid ranges in parallel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitPolicy {
    /// Every table in one part (`--split-tables-larger-than 0`).
    Never,
    /// Tables above this many heap + TOAST bytes, in parts of about that size.
    LargerThan(u64),
    /// For this many copy streams: a table larger than an even share of all the data is split
    /// into as many parts as it has shares (at most one per stream), none smaller than
    /// [`MIN_AUTO_PART`]. Smaller tables are copied whole, with `COPY FREEZE`.
    Streams(usize),
}

/// The smallest part the `Streams` policy makes: below it a part's own start (a snapshot
/// import, a ctid scan set-up) and the lost `COPY FREEZE` (a split table's rows are frozen by
/// the final VACUUM instead) outweigh the time another stream saves.
pub const MIN_AUTO_PART: u64 = 32 << 20;

/// Whether the `Streams` policy could split anything here, so whether measuring the servers'
/// cores can change the plan.
pub fn could_split(tables: &[TableRow]) -> bool {
    tables
        .iter()
        .any(|t| t.copy_data && t.total_bytes().max(0) as u64 >= 2 * MIN_AUTO_PART)
}

/// The parts of every table whose data is copied, under `policy`.
pub fn plan_parts(tables: &[TableRow], policy: SplitPolicy) -> Vec<PartRow> {
    let copied = || tables.iter().filter(|t| t.copy_data);
    let all_bytes: u64 = copied().map(|t| t.total_bytes().max(0) as u64).sum();
    copied()
        .flat_map(|t| {
            let part_bytes = match policy {
                SplitPolicy::Never => None,
                SplitPolicy::LargerThan(limit) => Some(limit),
                SplitPolicy::Streams(streams) => {
                    let bytes = t.total_bytes().max(0) as u64;
                    let share = all_bytes.div_ceil(streams.max(1) as u64).max(1);
                    let nparts = (streams as u64)
                        .min(bytes.div_ceil(share))
                        .min(bytes / MIN_AUTO_PART);
                    (nparts >= 2).then(|| bytes.div_ceil(nparts))
                }
            };
            split_table(t, part_bytes)
        })
        .collect()
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

/// One table as the catalog saw it under the snapshot.
#[derive(Clone, Debug)]
pub struct TableRow {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub heap_bytes: i64,
    pub toast_bytes: i64,
    pub pages: i64,
    pub est_rows: i64,
    pub has_pk: bool,
    pub columns: Vec<String>,
    pub binary_copy: bool,
    pub copy_data: bool,
}

impl TableRow {
    pub fn total_bytes(&self) -> i64 {
        self.heap_bytes + self.toast_bytes
    }
    pub fn qualified(&self) -> String {
        crate::pg::qualified(&self.schema, &self.name)
    }
    pub fn display_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// One index (and the constraint it backs, if any) to build on the target.
#[derive(Clone, Debug)]
pub struct IndexRow {
    pub oid: u32,
    pub table_oid: u32,
    pub schema: String,
    pub name: String,
    pub definition: String,
    pub constraint: Option<ConstraintRow>,
    /// The index is the table's REPLICA IDENTITY (USING INDEX): pg_dump says so in the index's
    /// own entry, which the index workers replace, so they must say it again.
    pub replica_identity: bool,
    pub status: String,
}

/// A primary key, unique or exclusion constraint backed by an index.
#[derive(Clone, Debug)]
pub struct ConstraintRow {
    pub oid: u32,
    pub name: String,
    pub kind: String,
    pub definition: String,
    pub deferrable: bool,
    pub deferred: bool,
}

/// One ctid range of a table.
#[derive(Clone, Debug)]
pub struct PartRow {
    pub table_oid: u32,
    pub part: i64,
    pub nparts: i64,
    pub first_page: i64,
    pub end_page: Option<i64>,
    pub status: String,
}

#[derive(Clone, Debug)]
pub struct SequenceRow {
    pub schema: String,
    pub name: String,
    pub last_value: i64,
    pub is_called: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_are_selected_as_pg_dump_selects_them() {
        let name = |schema: &str, name: &str| TableName {
            schema: schema.into(),
            name: name.into(),
        };
        let seq = |schema: &str, seq: &str, owner: Option<(&str, &str, bool)>| SequenceLinks {
            schema: schema.into(),
            name: seq.into(),
            owner: owner.map(|(s, t, identity)| (name(s, t), identity)),
            used_by: vec![],
        };
        let f = Filters::parse(
            "[exclude-schema]\nscratch\n[exclude-table]\npublic.tmp\npublic.named_seq\n",
        )
        .unwrap();
        assert!(!seq("scratch", "counter", None).included(&f));
        assert!(seq("public", "orders_id_seq", Some(("public", "orders", false))).included(&f));
        // A serial's sequence outlives its excluded table; an identity sequence does not.
        assert!(seq("public", "tmp_id_seq", Some(("public", "tmp", false))).included(&f));
        assert!(!seq("public", "tmp_id_seq", Some(("public", "tmp", true))).included(&f));
        // A sequence named in [exclude-table] is left out like a table.
        assert!(!seq("public", "named_seq", None).included(&f));
        let only = Filters::parse("[include-only-table]\npublic.orders\n").unwrap();
        assert!(seq("public", "orders_id_seq", Some(("public", "orders", true))).included(&only));
        assert!(!seq("public", "other_seq", None).included(&only));
    }

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

    #[test]
    fn streams_split_only_what_outweighs_its_share() {
        const MB: i64 = 1 << 20;
        let sized = |oid: u32, mb: i64| TableRow {
            oid,
            ..table(mb * MB, 0, mb * MB / 8192)
        };
        let parts_of = |tables: &[TableRow], streams| {
            let parts = plan_parts(tables, SplitPolicy::Streams(streams));
            tables
                .iter()
                .map(|t| parts.iter().filter(|p| p.table_oid == t.oid).count())
                .collect::<Vec<_>>()
        };
        // One big table and small ones: the big one gets a part per stream.
        let skewed = [sized(1, 1000), sized(2, 40), sized(3, 10)];
        assert_eq!(parts_of(&skewed, 4), vec![4, 1, 1]);
        // One stream (a shared or busy host): nothing is split.
        assert_eq!(parts_of(&skewed, 1), vec![1, 1, 1]);
        // Even tables: each already is a stream's share.
        let even = [sized(1, 500), sized(2, 500), sized(3, 500), sized(4, 500)];
        assert_eq!(parts_of(&even, 4), vec![1, 1, 1, 1]);
        // Two shares' worth: two parts.
        let two = [sized(1, 600), sized(2, 300), sized(3, 300)];
        assert_eq!(parts_of(&two, 4), vec![2, 1, 1]);
        // Never below the smallest part, however many streams.
        assert_eq!(parts_of(&[sized(1, 70), sized(2, 1)], 8), vec![2, 1]);
        assert_eq!(parts_of(&[sized(1, 50)], 8), vec![1]);
        // Explicit policies are unchanged.
        assert_eq!(
            parts_of_policy(&skewed, SplitPolicy::LargerThan(300 << 20)),
            vec![4, 1, 1]
        );
        assert_eq!(parts_of_policy(&skewed, SplitPolicy::Never), vec![1, 1, 1]);
        assert!(could_split(&skewed));
        assert!(!could_split(&[sized(1, 50)]));
    }

    fn parts_of_policy(tables: &[TableRow], policy: SplitPolicy) -> Vec<usize> {
        let parts = plan_parts(tables, policy);
        tables
            .iter()
            .map(|t| parts.iter().filter(|p| p.table_oid == t.oid).count())
            .collect()
    }

    #[test]
    fn sequences_follow_the_tables_that_use_them() {
        let t = |s: &str, n: &str| TableName {
            schema: s.into(),
            name: n.into(),
        };
        let shared = SequenceLinks {
            schema: "public".into(),
            name: "shared".into(),
            owner: None,
            used_by: vec![t("public", "t")],
        };
        let identity = SequenceLinks {
            schema: "public".into(),
            name: "u_id_seq".into(),
            owner: Some((t("public", "u"), true)),
            used_by: vec![],
        };
        let only_t = Filters::parse("[include-only-table]\npublic.t\n").unwrap();
        assert!(shared.included(&only_t));
        assert!(!identity.included(&only_t));
        let without_u = Filters::parse("[exclude-table]\npublic.u\n").unwrap();
        assert!(shared.included(&without_u));
        assert!(!identity.included(&without_u));
        assert!(identity.included(&Filters::default()));
    }
}
