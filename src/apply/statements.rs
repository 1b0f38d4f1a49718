//! Statement building for apply: one prepared statement per (table, operation, column set),
//! every value sent as text and cast by the target column's own type (`$1::text::numeric`), so
//! nothing goes through a lossy conversion (invariant 5). Unchanged TOAST columns are left out
//! of SET and out of every match.
//!
//! A REPLICA IDENTITY FULL row is found by its whole old image compared as text through each
//! column's type; that comparison cannot use an index, so when the target has a btree index
//! whose columns the old row covers (`TargetTable::index`), its columns are also matched with
//! `col = value` / `col IS NULL`, which the planner answers with an index scan. Those conjuncts
//! only narrow the scan: the full-row comparison is kept, so correctness never rests on them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use futures_util::SinkExt;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use super::run::{Run, RunShape, TextParam, text_of, value_bytes};
use super::target_error;
use crate::decode::{Change, OldImage, Relation, Value};
use crate::pg::{qualified, quote_ident};

/// A source relation matched with its target table.
pub struct TargetTable {
    pub source: Relation,
    pub qualified: String,
    /// The target column type of each source column, as format_type prints it.
    pub types: Vec<String>,
    /// Per source column: a `GENERATED ALWAYS AS IDENTITY` column on the target, which an
    /// UPDATE cannot assign; apply matches it instead (its value never changes in practice).
    pub generated_always: Vec<bool>,
    /// Per source column: a generated (computed) column on the target. wal2json sends their
    /// values; the target computes its own, so they are never written.
    pub generated: Vec<bool>,
    /// Source column positions of the target btree index that FULL-identity matches narrow
    /// by (see `usable_index`); empty when the target has none usable.
    pub index: Vec<usize>,
    /// Source column positions of each unique index of the target table on plain columns:
    /// what parallel apply (`keys.rs`) compares between batches besides the replica identity.
    pub unique: Vec<Vec<usize>>,
}

impl TargetTable {
    /// Matches a Relation message with the target table; a column the target lacks is schema
    /// drift, reported before anything of it is applied.
    pub async fn describe(target: &Client, relation: Relation) -> Result<Self> {
        let name = qualified(&relation.schema, &relation.name);
        let rows = target
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attidentity = 'a', a.attgenerated <> ''
                 FROM pg_attribute a
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
                &[&name],
            )
            .await
            .map_err(|e| target_error(&e, format!("cannot read the target's columns of {name}")))?;
        if rows.is_empty() {
            bail!(
                "schema drift: the source sends changes for {}.{} but the target has no such table. Create it on the target (pg_dump --schema-only -t …), then rerun follow; nothing after this change was applied.",
                relation.schema,
                relation.name
            );
        }
        let target_columns: HashMap<String, (String, bool, bool)> = rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
            .collect();
        let mut types = Vec::with_capacity(relation.columns.len());
        let mut generated_always = Vec::with_capacity(relation.columns.len());
        let mut generated = Vec::with_capacity(relation.columns.len());
        for column in &relation.columns {
            match target_columns.get(&column.name) {
                Some((t, always, computed)) => {
                    types.push(t.clone());
                    generated_always.push(*always);
                    generated.push(*computed);
                }
                None => bail!(
                    "schema drift on {}.{}: the source has column \"{}\" that the target lacks. Add it on the target (ALTER TABLE {name} ADD COLUMN …) and rerun follow; nothing after this change was applied.",
                    relation.schema,
                    relation.name,
                    column.name
                ),
            }
        }
        let index = usable_index(target, &name, &relation, &generated).await?;
        let unique = unique_indexes(target, &name, &relation).await?;
        Ok(TargetTable {
            source: relation,
            qualified: name,
            types,
            generated_always,
            generated,
            index,
            unique,
        })
    }

    /// The index columns a FULL-identity match of this old row can narrow by, with whether
    /// each value is NULL (`col IS NULL`, which a btree answers too); empty, so the plain
    /// full-row match, when the table has no usable index or one of its columns' old value is
    /// not in the row (an unchanged TOAST value, or a generated column's, masked).
    fn narrowing(&self, old: &[Value]) -> Vec<(usize, bool)> {
        narrowing(&self.index, old)
    }

    /// The change without the values of generated columns (as `Unchanged`: never written,
    /// never matched), which wal2json sends and pgoutput does not.
    pub fn without_generated(&self, mut change: Change) -> Change {
        if !self.generated.contains(&true) {
            return change;
        }
        let mask = |values: &mut Vec<Value>| {
            for (v, computed) in values.iter_mut().zip(&self.generated) {
                if *computed {
                    *v = Value::Unchanged;
                }
            }
        };
        match &mut change {
            Change::Insert { new, .. } => mask(new),
            Change::Update { old, new, .. } => {
                mask(new);
                if let Some((OldImage::Full, values)) = old {
                    mask(values);
                }
            }
            Change::Delete {
                old: (OldImage::Full, values),
                ..
            } => mask(values),
            _ => {}
        }
        change
    }

    fn column(&self, i: usize) -> String {
        quote_ident(&self.source.columns[i].name)
    }

    pub fn key_columns(&self) -> Vec<usize> {
        (0..self.source.columns.len())
            .filter(|i| self.source.columns[*i].is_key)
            .collect()
    }
}

/// See `TargetTable::narrowing`.
fn narrowing(index: &[usize], old: &[Value]) -> Vec<(usize, bool)> {
    if index.is_empty()
        || index
            .iter()
            .any(|i| old.get(*i).is_none_or(|v| *v == Value::Unchanged))
    {
        return Vec::new();
    }
    index.iter().map(|i| (*i, old[*i] == Value::Null)).collect()
}

/// The target index a FULL-identity update or delete can find its row through, as source
/// column positions (empty: none). Only a valid, non-partial btree index on plain columns
/// qualifies, and only if every key column uses its type's default btree operator class with
/// the column's own collation: then `col = value` is the operator the index answers (a type
/// without a default btree class, json or point, is never indexed this way), and since that
/// `=` is reflexive it cannot exclude the row the full-row text comparison finds. Every index
/// column must be a source column the old row carries, and not generated on the target (its
/// value is never sent). Preferred: the primary key, then a unique index, then the most
/// columns (the most selective), then the name, so the choice is stable.
async fn usable_index(
    target: &Client,
    name: &str,
    relation: &Relation,
    generated: &[bool],
) -> Result<Vec<usize>> {
    let rows = target
        .query(
            "SELECT array_agg(a.attname::text ORDER BY k.n)
             FROM pg_index i
             JOIN pg_class c ON c.oid = i.indexrelid
             JOIN pg_am am ON am.oid = c.relam
             CROSS JOIN LATERAL unnest(i.indkey::int2[], i.indclass::oid[], i.indcollation::oid[])
                 WITH ORDINALITY AS k(attnum, opclass, coll, n)
             LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             LEFT JOIN pg_opclass oc ON oc.oid = k.opclass
             WHERE i.indrelid = to_regclass($1)
               AND i.indisvalid AND i.indisready AND i.indislive
               AND i.indpred IS NULL AND i.indexprs IS NULL
               AND am.amname = 'btree'
               AND k.n <= i.indnkeyatts
             GROUP BY i.indexrelid, i.indisprimary, i.indisunique, i.indnkeyatts
             HAVING bool_and(k.attnum > 0 AND a.attname IS NOT NULL AND NOT a.attisdropped
                             AND coalesce(oc.opcdefault, false)
                             AND coalesce(k.coll, 0::oid) = a.attcollation)
             ORDER BY i.indisprimary DESC, i.indisunique DESC, i.indnkeyatts DESC,
                      i.indexrelid::regclass::text",
            &[&name],
        )
        .await
        .map_err(|e| target_error(&e, format!("cannot read the target's indexes of {name}")))?;
    for row in rows {
        let usable = |p: usize| !generated.get(p).copied().unwrap_or(true);
        if let Some(positions) = index_positions(&row, name, relation, usable)? {
            return Ok(positions);
        }
    }
    Ok(Vec::new())
}

/// The source column positions of an index whose column names a query returned (an array in
/// column 0); None when one of them is not a source column `usable` accepts, or it has none.
fn index_positions(
    row: &tokio_postgres::Row,
    name: &str,
    relation: &Relation,
    usable: impl Fn(usize) -> bool,
) -> Result<Option<Vec<usize>>> {
    let columns: Vec<String> = row
        .try_get::<_, Option<Vec<String>>>(0)
        .map_err(|e| anyhow!("cannot read the target's index columns of {name}: {e}"))?
        .unwrap_or_default();
    let positions: Option<Vec<usize>> = columns
        .iter()
        .map(|c| {
            relation
                .columns
                .iter()
                .position(|s| &s.name == c)
                .filter(|p| usable(*p))
        })
        .collect();
    Ok(positions.filter(|p| !p.is_empty()))
}

/// The unique indexes of the target table whose columns are all source columns, as source
/// column positions (a unique index on an expression or with a predicate is left out: the
/// target still serializes what it guards, see `keys.rs`).
async fn unique_indexes(
    target: &Client,
    name: &str,
    relation: &Relation,
) -> Result<Vec<Vec<usize>>> {
    let rows = target
        .query(
            "SELECT array_agg(a.attname::text ORDER BY k.n)
             FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
             LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = to_regclass($1) AND i.indisunique
               AND i.indpred IS NULL AND i.indexprs IS NULL AND k.n <= i.indnkeyatts
             GROUP BY i.indexrelid
             HAVING bool_and(k.attnum > 0 AND a.attname IS NOT NULL)
             ORDER BY i.indexrelid",
            &[&name],
        )
        .await
        .map_err(|e| {
            target_error(
                &e,
                format!("cannot read the target's unique indexes of {name}"),
            )
        })?;
    let mut unique = Vec::new();
    for row in rows {
        if let Some(positions) = index_positions(&row, name, relation, |_| true)? {
            unique.push(positions);
        }
    }
    Ok(unique)
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Shape {
    Insert(Vec<usize>),
    /// An empty `set` checks that the row exists (`SELECT 1 … WHERE`): a change whose new
    /// values are all unchanged TOAST or unassignable still has to find its row.
    Update {
        set: Vec<usize>,
        key: Vec<usize>,
        full: bool,
        /// GENERATED ALWAYS identity columns, matched on their new value instead of set.
        guard: Vec<usize>,
        /// FULL identity: the index columns that narrow the match, each with whether its old
        /// value is NULL (a statement's text is fixed, so one per NULL pattern).
        narrow: Vec<(usize, bool)>,
    },
    Delete {
        key: Vec<usize>,
        full: bool,
        narrow: Vec<(usize, bool)>,
    },
    /// A run of rows (see `sets`): one `text[]` parameter per column.
    Run(RunShape),
    /// `COPY … FROM STDIN` of an insert run's columns (no parameters). Prepared like the
    /// others so that a COPY is sent the moment it is queued, in order with the statements
    /// around it (an unprepared one would be parsed first, and a statement queued after it
    /// could reach the server before it).
    Copy(Vec<usize>),
}

/// What the row count of a statement must be, or the target has diverged.
#[derive(Clone, Copy)]
enum Expect {
    Any,
    AtLeastOne,
    Exactly(u64),
}

impl Expect {
    /// An update or delete must find its row. A FULL-identity match finds one by its whole old
    /// image (LIMIT 1): exactly one, or the target has diverged.
    fn row_found(full: bool) -> Self {
        if full {
            Expect::Exactly(1)
        } else {
            Expect::AtLeastOne
        }
    }
}

/// A statement sent but not yet awaited: up to PIPELINE of them travel together, one round
/// trip for the lot (tokio-postgres pipelines requests polled together, in order).
struct Pending {
    result: Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send>>,
    table: String,
    what: &'static str,
    expect: Expect,
}

/// Set once a COPY failed in this process: insert runs then go through INSERT statements for
/// the rest of the run. A COPY that fails before the server enters copy mode (row-level
/// security refuses COPY FROM, a missing privilege, a dropped table) leaves tokio-postgres
/// 0.7 one ReadyForQuery out of step (rust-postgres issue #789), so its connection cannot be
/// trusted again: the error is reported as a lost target connection (follow reconnects and
/// resumes at the target's committed position), and the same rows then meet the INSERT path,
/// which applies them or fails with the precise reason.
static COPY_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The `what` of a COPY in the pipeline.
const COPY_WHAT: &str = "a COPY of inserted rows";

/// Insert runs of at least this many rows are loaded with `COPY … FROM STDIN` (text format)
/// instead of `INSERT … SELECT FROM unnest(…)`: the target inserts them in batches
/// (heap_multi_insert, fewer WAL records) and builds no arrays. The text values are the
/// source's, read by the same input functions of the target's column types either way.
/// Measured on PostgreSQL 15, 500,000 rows in runs of 5,000: a table of two int columns took
/// 0.31 s by COPY against 1.02 s by unnest; four columns (int, int, text, timestamptz) behind
/// a bigserial key 1.39 s against 2.57 s (`BURST=H scripts/bench-cpu.sh` shows it end to end).
/// Below this many rows one prepared statement costs less than a COPY's own round trip.
const COPY_MIN_ROWS: usize = 32;

/// The rows of an insert run in COPY's text format: columns separated by tabs, rows ended by
/// newlines, NULL as `\N`, and backslash, tab, newline and carriage return escaped.
fn copy_text(columns: &[Vec<Option<TextParam>>], bytes: usize) -> Bytes {
    let rows = columns.first().map_or(0, Vec::len);
    let mut out = BytesMut::with_capacity(bytes + rows * (columns.len() + 1) + bytes / 64);
    for row in 0..rows {
        for (c, column) in columns.iter().enumerate() {
            if c > 0 {
                out.extend_from_slice(b"\t");
            }
            match &column[row] {
                None => out.extend_from_slice(b"\\N"),
                Some(value) => {
                    let mut start = 0;
                    for (i, byte) in value.0.iter().enumerate() {
                        let escaped: &[u8] = match byte {
                            b'\\' => b"\\\\",
                            b'\t' => b"\\t",
                            b'\n' => b"\\n",
                            b'\r' => b"\\r",
                            _ => continue,
                        };
                        out.extend_from_slice(&value.0[start..i]);
                        out.extend_from_slice(escaped);
                        start = i + 1;
                    }
                    out.extend_from_slice(&value.0[start..]);
                }
            }
        }
        out.extend_from_slice(b"\n");
    }
    out.freeze()
}

/// How many row statements are pipelined before their results are awaited.
const PIPELINE: usize = 1_000;
/// Parameter bytes pipelined before the results are awaited (invariant 4: memory bounded
/// whatever the rows' width).
const PIPELINE_BYTES: usize = 32 << 20;

/// The statement cache and the pipeline of statements in flight.
#[derive(Default)]
pub struct Statements {
    prepared: HashMap<(u32, Shape), Statement>,
    pending: Vec<Pending>,
    pending_bytes: usize,
}

impl Statements {
    /// Drops the statements of a relation that was described again (it may have changed).
    pub fn forget(&mut self, oid: u32) {
        self.prepared.retain(|(o, _), _| *o != oid);
    }

    async fn statement(
        &mut self,
        target: &Client,
        table: &TargetTable,
        shape: Shape,
    ) -> Result<Statement> {
        let key = (table.source.oid, shape);
        if let Some(s) = self.prepared.get(&key) {
            return Ok(s.clone());
        }
        let mut n = 0;
        let mut param = |i: usize| {
            n += 1;
            format!("${n}::text::{}", table.types[i])
        };
        let sql = match &key.1 {
            // OVERRIDING SYSTEM VALUE: the source's value of a GENERATED ALWAYS identity column
            // is the one to keep.
            Shape::Insert(cols) => format!(
                "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({})",
                table.qualified,
                cols.iter()
                    .map(|i| table.column(*i))
                    .collect::<Vec<_>>()
                    .join(", "),
                cols.iter()
                    .map(|i| param(*i))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Shape::Update {
                set,
                key,
                full,
                guard,
                narrow,
            } => {
                let set_list = set
                    .iter()
                    .map(|i| format!("{} = {}", table.column(*i), param(*i)))
                    .collect::<Vec<_>>()
                    .join(", ");
                let mut filter = where_clause(table, key, *full, narrow, &mut n);
                for i in guard {
                    n += 1;
                    filter.push_str(&format!(
                        " AND {} = ${n}::text::{}",
                        table.column(*i),
                        table.types[*i]
                    ));
                }
                if set.is_empty() {
                    format!("SELECT 1 FROM {} WHERE {filter}", table.qualified)
                } else {
                    format!("UPDATE {} SET {set_list} WHERE {filter}", table.qualified)
                }
            }
            Shape::Delete { key, full, narrow } => {
                let filter = where_clause(table, key, *full, narrow, &mut n);
                format!("DELETE FROM {} WHERE {filter}", table.qualified)
            }
            Shape::Run(shape) => run_sql(table, shape, &mut n),
            Shape::Copy(columns) => format!(
                "COPY {} ({}) FROM STDIN",
                table.qualified,
                columns
                    .iter()
                    .map(|i| table.column(*i))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let param_type = match key.1 {
            Shape::Run(_) => Type::TEXT_ARRAY,
            _ => Type::TEXT,
        };
        let types = vec![param_type; n];
        let statement = target
            .prepare_typed(&sql, &types)
            .await
            .map_err(|e| target_error(&e, format!("cannot prepare \"{sql}\" on the target")))?;
        self.prepared.insert(key, statement.clone());
        Ok(statement)
    }

    /// Applies one row change (or truncate) inside the current target transaction.
    pub async fn apply(
        &mut self,
        target: &Arc<Client>,
        tables: &HashMap<u32, TargetTable>,
        change: &Change,
    ) -> Result<()> {
        let table_of = |oid: u32| {
            tables.get(&oid).ok_or_else(|| {
                anyhow!("a change for relation {oid} arrived before its description")
            })
        };
        match change {
            Change::Insert { relation, new } => {
                let table = table_of(*relation)?;
                let cols: Vec<usize> = (0..new.len())
                    .filter(|i| new[*i] != Value::Unchanged)
                    .collect();
                let params: Vec<Option<TextParam>> = cols
                    .iter()
                    .map(|i| text_of(&new[*i]))
                    .collect::<Result<_>>()?;
                let bytes = value_bytes(&params);
                let statement = self.statement(target, table, Shape::Insert(cols)).await?;
                self.send(
                    target,
                    statement,
                    params,
                    bytes,
                    table,
                    ("an insert", Expect::Any),
                )
                .await
            }
            Change::Update { relation, old, new } => {
                let table = table_of(*relation)?;
                let (key_values, key, full) = identity(table, old.as_ref(), new)?;
                // When the key did not change it is left out of SET (it would be a no-op).
                // A GENERATED ALWAYS identity column cannot be assigned at all: it is matched
                // on its new value instead, so a changed one (`SET id = DEFAULT` on the
                // source) stops apply rather than pass unnoticed.
                let unchanged_key = old.is_none();
                let present = |i: &usize| new[*i] != Value::Unchanged;
                let set: Vec<usize> = (0..new.len())
                    .filter(present)
                    .filter(|i| !(unchanged_key && key.contains(i)))
                    .filter(|i| !table.generated_always[*i])
                    .collect();
                let guard: Vec<usize> = (0..new.len())
                    .filter(present)
                    .filter(|i| table.generated_always[*i] && !(unchanged_key && key.contains(i)))
                    .collect();
                let mut params: Vec<Option<TextParam>> = set
                    .iter()
                    .map(|i| text_of(&new[*i]))
                    .collect::<Result<_>>()?;
                for i in &key {
                    params.push(text_of(&key_values[*i])?);
                }
                for i in &guard {
                    params.push(text_of(&new[*i])?);
                }
                let expect = Expect::row_found(full);
                let narrow = if full {
                    table.narrowing(key_values)
                } else {
                    Vec::new()
                };
                let what = if guard.is_empty() {
                    "an update"
                } else {
                    "an update (its GENERATED ALWAYS identity column is matched, not assigned)"
                };
                let statement = self
                    .statement(
                        target,
                        table,
                        Shape::Update {
                            set,
                            key,
                            full,
                            guard,
                            narrow,
                        },
                    )
                    .await?;
                let bytes = value_bytes(&params);
                self.send(target, statement, params, bytes, table, (what, expect))
                    .await
            }
            Change::Delete { relation, old } => {
                let table = table_of(*relation)?;
                let (key_values, key, full) = identity(table, Some(old), &old.1)?;
                let params: Vec<Option<TextParam>> = key
                    .iter()
                    .map(|i| text_of(&key_values[*i]))
                    .collect::<Result<_>>()?;
                let expect = Expect::row_found(full);
                let narrow = if full {
                    table.narrowing(key_values)
                } else {
                    Vec::new()
                };
                let statement = self
                    .statement(target, table, Shape::Delete { key, full, narrow })
                    .await?;
                let bytes = value_bytes(&params);
                self.send(
                    target,
                    statement,
                    params,
                    bytes,
                    table,
                    ("a delete", expect),
                )
                .await
            }
            Change::Truncate {
                relations,
                cascade,
                restart_identity,
            } => {
                let names = relations
                    .iter()
                    .map(|oid| table_of(*oid).map(|t| t.qualified.clone()))
                    .collect::<Result<Vec<_>>>()?;
                let sql = format!(
                    "TRUNCATE {}{}{}",
                    names.join(", "),
                    if *restart_identity {
                        " RESTART IDENTITY"
                    } else {
                        ""
                    },
                    if *cascade { " CASCADE" } else { "" }
                );
                self.flush().await?;
                target
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| target_error(&e, format!("cannot apply \"{sql}\" on the target")))
            }
            _ => Ok(()),
        }
    }
}

impl Statements {
    /// Empties these tables with DELETE (see the truncate rule in `apply`).
    pub async fn delete_all(
        &mut self,
        target: &Client,
        tables: &HashMap<u32, TargetTable>,
        relations: &[u32],
    ) -> Result<()> {
        self.flush().await?;
        for oid in relations {
            let table = tables.get(oid).ok_or_else(|| {
                anyhow!("a truncate of relation {oid} arrived before its description")
            })?;
            let sql = format!("DELETE FROM {}", table.qualified);
            target
                .batch_execute(&sql)
                .await
                .map_err(|e| target_error(&e, format!("cannot apply \"{sql}\" on the target")))?;
        }
        Ok(())
    }
}

/// Which old values identify the row: the 'K' key image, the 'O' full row (matched NULL-safe
/// on every column it carries), or the key columns of the new row when the key did not change.
fn identity<'a>(
    table: &TargetTable,
    old: Option<&'a (OldImage, Vec<Value>)>,
    new: &'a [Value],
) -> Result<(&'a [Value], Vec<usize>, bool)> {
    match old {
        Some((OldImage::Full, values)) => Ok((
            values,
            (0..values.len())
                .filter(|i| values[*i] != Value::Unchanged)
                .collect(),
            true,
        )),
        Some((OldImage::Key, values)) => Ok((values, table.key_columns(), false)),
        None => {
            let key = table.key_columns();
            if key.is_empty() {
                bail!(
                    "{} has no replica identity: its updates and deletes cannot be applied. Give it a primary key or run ALTER TABLE … REPLICA IDENTITY FULL on the source.",
                    table.qualified
                );
            }
            Ok((new, key, false))
        }
    }
}

/// The statement of a run: the rows come in as one `text[]` per column, unnested side by side
/// (`pgtide_rows.c1 …`), each cast by its target column's type.
fn run_sql(table: &TargetTable, shape: &RunShape, n: &mut usize) -> String {
    let columns: Vec<usize> = match shape {
        RunShape::Insert { columns } => columns.clone(),
        RunShape::Update { set, key } => set.iter().chain(key).copied().collect(),
        RunShape::Delete { key } => key.clone(),
    };
    *n = columns.len();
    let unnest = format!(
        "unnest({}) AS pgtide_rows({})",
        (1..=columns.len())
            .map(|p| format!("${p}::text[]"))
            .collect::<Vec<_>>()
            .join(", "),
        (1..=columns.len())
            .map(|p| format!("c{p}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let value = |p: usize| format!("pgtide_rows.c{}::{}", p + 1, table.types[columns[p]]);
    let key_match = |first: usize| {
        columns[first..]
            .iter()
            .enumerate()
            .map(|(k, i)| format!("pgtide_target.{} = {}", table.column(*i), value(first + k)))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    match shape {
        RunShape::Insert { columns } => format!(
            "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {unnest}",
            table.qualified,
            columns
                .iter()
                .map(|i| table.column(*i))
                .collect::<Vec<_>>()
                .join(", "),
            (0..columns.len()).map(value).collect::<Vec<_>>().join(", ")
        ),
        RunShape::Update { set, .. } => format!(
            "UPDATE {} AS pgtide_target SET {} FROM {unnest} WHERE {}",
            table.qualified,
            set.iter()
                .enumerate()
                .map(|(p, i)| format!("{} = {}", table.column(*i), value(p)))
                .collect::<Vec<_>>()
                .join(", "),
            key_match(set.len())
        ),
        RunShape::Delete { .. } => format!(
            "DELETE FROM {} AS pgtide_target USING {unnest} WHERE {}",
            table.qualified,
            key_match(0)
        ),
    }
}

/// The WHERE clause that finds a row by `key`'s values, parameters numbered from `n + 1`.
/// `narrow` (FULL identity only) adds index-usable conjuncts on the parameters already bound.
fn where_clause(
    table: &TargetTable,
    key: &[usize],
    full: bool,
    narrow: &[(usize, bool)],
    n: &mut usize,
) -> String {
    let mut next = || {
        *n += 1;
        *n
    };
    if full {
        // One matching row, compared NULL-safe on the text form that the column's own type
        // gives both sides (every type has one; the value sent is first read as that type,
        // so char(n) padding, numeric scale and the like normalise alike on both sides).
        let mut parameter = HashMap::new();
        let mut conditions = key
            .iter()
            .map(|i| {
                let p = next();
                parameter.insert(*i, p);
                format!(
                    "{}::text IS NOT DISTINCT FROM ${p}::text::{}::text",
                    table.column(*i),
                    table.types[*i]
                )
            })
            .collect::<Vec<_>>();
        // The index's columns, compared as the index compares them: the planner can then
        // find the candidates by an index scan, which the full comparison above filters.
        // A column's parameter is reused (a narrowing column is always one of `key`).
        let mut index_conditions = Vec::new();
        for (i, null) in narrow {
            match (null, parameter.get(i)) {
                (true, _) => index_conditions.push(format!("{} IS NULL", table.column(*i))),
                (false, Some(p)) => index_conditions.push(format!(
                    "{} = ${p}::text::{}",
                    table.column(*i),
                    table.types[*i]
                )),
                // Not in the row: no narrowing on it (narrowing() never gives one).
                (false, None) => {}
            }
        }
        index_conditions.append(&mut conditions);
        let conditions = index_conditions.join(" AND ");
        format!(
            "ctid = (SELECT ctid FROM {} WHERE {conditions} LIMIT 1)",
            table.qualified
        )
    } else {
        key.iter()
            .map(|i| {
                format!(
                    "{} = ${}::text::{}",
                    table.column(*i),
                    next(),
                    table.types[*i]
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }
}

impl Statements {
    /// Queues one statement with its parameters (text values of one row, or one text array
    /// per column of a run); the pipeline is flushed when it is full.
    async fn send<P>(
        &mut self,
        target: &Arc<Client>,
        statement: Statement,
        params: Vec<P>,
        bytes: usize,
        table: &TargetTable,
        (what, expect): (&'static str, Expect),
    ) -> Result<()>
    where
        P: tokio_postgres::types::ToSql + Sync + Send + 'static,
    {
        let client = target.clone();
        let result = Box::pin(async move { client.execute_raw(&statement, params).await });
        self.queue(result, bytes, table, (what, expect)).await
    }

    /// Puts one request in the pipeline (requests go out in the order they are queued); the
    /// pipeline is flushed when it is full.
    async fn queue(
        &mut self,
        result: Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send>>,
        bytes: usize,
        table: &TargetTable,
        (what, expect): (&'static str, Expect),
    ) -> Result<()> {
        self.pending_bytes += bytes;
        self.pending.push(Pending {
            result,
            table: table.qualified.clone(),
            what,
            expect,
        });
        if self.pending.len() >= PIPELINE || self.pending_bytes >= PIPELINE_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends every queued statement (in order, pipelined) and checks each result: an error,
    /// or an update/delete that matched no row, stops apply.
    pub async fn flush(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        if pending.is_empty() {
            return Ok(());
        }
        let (futures, meta): (Vec<_>, Vec<_>) = pending
            .into_iter()
            .map(|p| (p.result, (p.table, p.what, p.expect)))
            .unzip();
        let results = futures_util::future::join_all(futures).await;
        for (result, (table, what, expect)) in results.into_iter().zip(meta) {
            let rows = match result {
                Ok(rows) => rows,
                Err(e) if what == COPY_WHAT => {
                    COPY_FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err(anyhow::Error::new(crate::errors::TargetLost(format!(
                        "a COPY into {table} failed ({}); reconnecting, and inserting with INSERT statements from now on",
                        crate::pg::describe(&e)
                    ))));
                }
                Err(e) => return Err(target_error(&e, format!("cannot apply {what} on {table}"))),
            };
            let matched = match expect {
                Expect::Any => true,
                Expect::AtLeastOne => rows > 0,
                Expect::Exactly(n) => rows == n,
            };
            if !matched {
                bail!(
                    "{what} on {table} found no matching row on the target ({rows} rows matched): the target has diverged from the source (changed by hand, or not copied under the slot's snapshot). Nothing after it was applied; verify the table and copy it again."
                );
            }
        }
        Ok(())
    }

    /// Queues one statement for a whole run of like changes (see `sets`); an update or delete
    /// run must match exactly one target row per row of the run.
    pub async fn send_run(
        &mut self,
        target: &Arc<Client>,
        table: &TargetTable,
        run: Run,
    ) -> Result<()> {
        let rows = run.rows() as u64;
        let (what, expect) = match run.shape {
            RunShape::Insert { .. } => ("a multi-row insert", Expect::Any),
            RunShape::Update { .. } => ("a multi-row update", Expect::Exactly(rows)),
            RunShape::Delete { .. } => ("a multi-row delete", Expect::Exactly(rows)),
        };
        let bytes = run.bytes();
        if let RunShape::Insert { columns } = &run.shape
            && run.rows() >= COPY_MIN_ROWS
            && !COPY_FAILED.load(std::sync::atomic::Ordering::Relaxed)
        {
            let statement = self
                .statement(target, table, Shape::Copy(columns.clone()))
                .await?;
            // A COPY starts on an empty pipeline: if a statement before it failed, the server
            // would skip the COPY's messages up to its Sync while the COPY waited for its
            // CopyInResponse, and the connection would be lost instead of the error reported.
            self.flush().await?;
            tracing::debug!(
                "loading {rows} inserted rows into {} with COPY",
                table.qualified
            );
            let data = copy_text(&run.values, bytes);
            let client = target.clone();
            let copy = async move {
                let sink = client.copy_in::<_, Bytes>(&statement).await?;
                futures_util::pin_mut!(sink);
                sink.send(data).await?;
                sink.finish().await
            };
            return self
                .queue(Box::pin(copy), bytes, table, (COPY_WHAT, Expect::Any))
                .await;
        }
        let statement = self.statement(target, table, Shape::Run(run.shape)).await?;
        self.send(target, statement, run.values, bytes, table, (what, expect))
            .await
    }

    /// Drops queued statements whose transaction is being rolled back.
    pub fn discard(&mut self) {
        self.pending.clear();
        self.pending_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Column;

    fn table(index: Vec<usize>) -> TargetTable {
        let column = |name: &str| Column {
            is_key: false,
            name: name.into(),
            type_oid: 0,
            type_modifier: -1,
        };
        TargetTable {
            source: Relation {
                oid: 1,
                schema: "public".into(),
                name: "t".into(),
                replica_identity: b'f',
                columns: vec![column("id"), column("doc"), column("n")],
            },
            qualified: "\"public\".\"t\"".into(),
            types: vec!["integer".into(), "text".into(), "numeric(6,2)".into()],
            generated_always: vec![false; 3],
            generated: vec![false; 3],
            index,
            unique: Vec::new(),
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(bytes::Bytes::copy_from_slice(s.as_bytes()))
    }

    /// The NULL pattern of the index columns picks the statement; an index column whose old
    /// value is an unchanged TOAST value (or no usable index) means no narrowing for that row.
    #[test]
    fn narrowing_follows_the_old_row() {
        let old = vec![text("7"), Value::Null, text("1.50")];
        assert_eq!(narrowing(&[0], &old), vec![(0, false)]);
        assert_eq!(narrowing(&[0, 1], &old), vec![(0, false), (1, true)]);
        assert_eq!(narrowing(&[], &old), vec![]);
        let toasted = vec![text("7"), Value::Unchanged, text("1.50")];
        assert_eq!(narrowing(&[0, 1], &toasted), vec![]);
        assert_eq!(narrowing(&[0], &toasted), vec![(0, false)]);
        assert_eq!(narrowing(&[5], &old), vec![]);
    }

    /// The index conjuncts reuse the full comparison's parameters and keep it whole.
    #[test]
    fn full_match_keeps_the_text_comparison_and_adds_index_conjuncts() {
        let t = table(vec![0, 2]);
        let mut n = 0;
        let sql = where_clause(&t, &[0, 2], true, &[(0, false), (2, true)], &mut n);
        assert_eq!(n, 2);
        assert_eq!(
            sql,
            "ctid = (SELECT ctid FROM \"public\".\"t\" WHERE \"id\" = $1::text::integer AND \
             \"n\" IS NULL AND \"id\"::text IS NOT DISTINCT FROM $1::text::integer::text AND \
             \"n\"::text IS NOT DISTINCT FROM $2::text::numeric(6,2)::text LIMIT 1)"
        );
        let mut n = 0;
        let plain = where_clause(&t, &[0, 2], true, &[], &mut n);
        assert!(!plain.contains(" = $"), "{plain}");
    }
}
