//! What wal2json cannot carry exactly, found before a migration starts (invariant 6).
//!
//! wal2json prints `numeric`, `real` and `double precision` values as bare JSON numbers, and
//! NaN, Infinity and -Infinity, which JSON cannot write, as `null` (wal2json.c,
//! `pg_decode_write_value`; the `numeric-data-types-as-string` option that avoids it exists
//! only from wal2json 2.6). In the stream such a value cannot be told from a NULL: in a
//! nullable column it would silently become NULL on the target, so those columns are refused
//! unless the operator accepts it (`--wal2json-nan-as-null`); in a NOT NULL column the
//! target refuses the NULL and apply stops, so those are a warning. Arrays of these types and
//! domains over them are printed as strings and are exact; generated columns are computed
//! by the target and never written.

use anyhow::{Context, Result};
use tokio_postgres::Client;

/// A published column whose NaN / ±Infinity wal2json prints as null.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InexactColumn {
    /// `schema.table.column`, quoted as SQL needs.
    pub name: String,
    /// A NOT NULL column: a NaN stops apply instead of becoming NULL.
    pub not_null: bool,
}

/// The columns of `tables` (schema, table) whose NaN / ±Infinity wal2json prints as null.
pub async fn inexact_columns(
    client: &Client,
    tables: &[(String, String)],
) -> Result<Vec<InexactColumn>> {
    let (schemas, names): (Vec<String>, Vec<String>) = tables.iter().cloned().unzip();
    let rows = client
        .query(
            "SELECT format('%I.%I.%I', n.nspname, c.relname, a.attname), a.attnotnull
             FROM pg_attribute a
             JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN unnest($1::text[], $2::text[]) AS t(s, r) ON t.s = n.nspname AND t.r = c.relname
             WHERE a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
               AND a.atttypid IN ('numeric'::regtype, 'real'::regtype, 'double precision'::regtype)
             ORDER BY 1",
            &[&schemas, &names],
        )
        .await
        .context("cannot list the numeric and float columns of the published tables")?;
    Ok(rows
        .iter()
        .map(|r| InexactColumn {
            name: r.get(0),
            not_null: r.get(1),
        })
        .collect())
}

/// The refusal (or, with `accepted`, the warning) naming the nullable columns.
pub fn nullable_message(columns: &[InexactColumn], accepted: bool) -> String {
    let list = columns
        .iter()
        .filter(|c| !c.not_null)
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if accepted {
        format!(
            "with wal2json, a NaN or ±Infinity written to {list} arrives on the target as NULL (wal2json prints them as null; accepted with --wal2json-nan-as-null)"
        )
    } else {
        format!(
            "with wal2json, numeric/real/double precision column(s) {list} cannot carry NaN or ±Infinity (wal2json prints them as null): a change writing one would silently become NULL on the target"
        )
    }
}

/// The fix printed under the refusal.
pub const NULLABLE_FIX: &str = "use --plugin pgoutput (exact for every value), or pass --wal2json-nan-as-null if these columns never hold NaN or Infinity (or exclude their tables with --filters)";

/// The warning naming the NOT NULL columns (a NaN there stops apply).
pub fn not_null_message(columns: &[InexactColumn]) -> String {
    let list = columns
        .iter()
        .filter(|c| c.not_null)
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "with wal2json, a NaN or ±Infinity written to the NOT NULL column(s) {list} arrives as null, which the target refuses: apply would stop there"
    )
}
