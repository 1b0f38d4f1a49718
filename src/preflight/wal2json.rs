//! wal2json's exactness check: the published numeric and float columns whose NaN or
//! ±Infinity wal2json would turn into NULL.

use anyhow::Result;
use tokio_postgres::Client;

use super::{CheckId, Report};

/// With wal2json: the published numeric / float columns whose NaN or ±Infinity would arrive
/// as NULL (FAIL for nullable ones unless accepted, WARN for NOT NULL ones, whose NULL the
/// target refuses).
pub(super) async fn wal2json_exactness(
    r: &mut Report,
    src: &Client,
    tables: &[(String, String)],
    accepted: bool,
) -> Result<()> {
    use crate::replication::wal2json as w;
    let columns = w::inexact_columns(src, tables).await?;
    let check = CheckId::SourceWal2jsonExactness;
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
