//! The measured part of a plan: a sample of the largest tables copied from the source into a
//! temporary table on the target the way the clone copies (same COPY format, one stream), then
//! that table's indexes built on it and the table vacuumed, each timed. A temporary table is
//! session-local and dropped with the session: the target's catalog and data are left as they
//! were.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio_postgres::Client;

use crate::pg::catalog::{IndexRow, TableRow};
use crate::pg::{describe, quote_ident};

/// How much of a table one sample copies at most.
const SAMPLE_BYTES: i64 = 48 * 1024 * 1024;

/// One table's sample.
#[derive(Clone, Debug, Serialize)]
pub struct TableSample {
    pub table: String,
    pub rows: u64,
    /// Bytes of the table on disk the sampled rows stand for (rows × its bytes per row).
    pub disk_bytes: f64,
    pub copy_seconds: f64,
    pub index_seconds: f64,
    pub vacuum_seconds: f64,
}

/// Copies a sample of `table` from the source into a temporary table on the target, builds its
/// indexes there and vacuums it; times each step.
pub async fn sample_table(
    source: &Client,
    target: &Client,
    table: &TableRow,
    indexes: &[&IndexRow],
) -> Result<TableSample> {
    let name = table.display_name();
    let per_row = table.total_bytes() as f64 / table.est_rows.max(1) as f64;
    let rows = ((SAMPLE_BYTES as f64 / per_row.max(1.0)) as i64).clamp(1, table.est_rows.max(1));
    let columns: Vec<(String, String)> = source
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
             ORDER BY a.attnum",
            &[&table.oid],
        )
        .await
        .with_context(|| format!("cannot read the columns of {name}"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let sample = "pg_temp.pgtide_plan_sample";
    let create = |typed: bool| {
        format!(
            "DROP TABLE IF EXISTS {sample}; CREATE TEMP TABLE pgtide_plan_sample ({})",
            columns
                .iter()
                .map(|(c, t)| format!("{} {}", quote_ident(c), if typed { t } else { "text" }))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    // The source's types, or text where the target lacks one (an extension's, an enum).
    let typed = target.batch_execute(&create(true)).await.is_ok();
    if !typed {
        target.batch_execute(&create(false)).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot create the sample table on the target: {}",
                describe(&e)
            )
        })?;
    }
    let format = if table.binary_copy && typed {
        " WITH (FORMAT binary)"
    } else {
        ""
    };
    let column_list = columns
        .iter()
        .map(|(c, _)| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let started = Instant::now();
    let (copied, _) = crate::clone::copy::pump(
        source,
        target,
        &name,
        &format!(
            "COPY (SELECT {column_list} FROM {} LIMIT {rows}) TO STDOUT{format}",
            table.qualified()
        ),
        &format!("COPY {sample} FROM STDIN{format}"),
        |_, _| {},
    )
    .await?;
    let copy_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    if typed {
        for index in indexes {
            // The index's own definition, on the sample table; one the sample cannot take
            // (a constraint's exclusion operator the target lacks, say) is left out.
            if let Some(definition) = on_sample(&index.definition) {
                let _ = target.batch_execute(&definition).await;
            }
        }
    }
    let index_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    target
        .batch_execute(&format!("VACUUM ANALYZE {sample}"))
        .await
        .map_err(|e| anyhow::anyhow!("cannot vacuum the sample table: {}", describe(&e)))?;
    let vacuum_seconds = started.elapsed().as_secs_f64();
    target
        .batch_execute(&format!("DROP TABLE {sample}"))
        .await
        .map_err(|e| anyhow::anyhow!("cannot drop the sample table: {}", describe(&e)))?;
    Ok(TableSample {
        table: name,
        rows: copied,
        disk_bytes: copied as f64 * per_row,
        copy_seconds,
        index_seconds,
        vacuum_seconds,
    })
}

/// `CREATE [UNIQUE] INDEX name ON table USING …` (as pg_get_indexdef prints it) rewritten to
/// build the same index, unnamed, on the sample table.
fn on_sample(definition: &str) -> Option<String> {
    let head = if definition.starts_with("CREATE UNIQUE INDEX ") {
        "CREATE UNIQUE INDEX"
    } else if definition.starts_with("CREATE INDEX ") {
        "CREATE INDEX"
    } else {
        return None;
    };
    let on = definition.find(" ON ")?;
    let rest = &definition[on + 4..];
    let using = rest.find(" USING ")?;
    Some(format!(
        "{head} ON pg_temp.pgtide_plan_sample USING {}",
        &rest[using + 7..]
    ))
}

/// A bound on the time the samples take in all.
pub const SAMPLE_BUDGET: Duration = Duration::from_secs(6);

#[cfg(test)]
mod tests {
    use super::on_sample;

    #[test]
    fn an_index_definition_is_moved_onto_the_sample() {
        assert_eq!(
            on_sample("CREATE UNIQUE INDEX t_pkey ON public.t USING btree (id)").as_deref(),
            Some("CREATE UNIQUE INDEX ON pg_temp.pgtide_plan_sample USING btree (id)")
        );
        assert_eq!(
            on_sample("CREATE INDEX i ON \"My\".\"T\" USING gin (doc) WHERE (x > 1)").as_deref(),
            Some("CREATE INDEX ON pg_temp.pgtide_plan_sample USING gin (doc) WHERE (x > 1)")
        );
        assert_eq!(on_sample("ALTER TABLE t ADD PRIMARY KEY (a)"), None);
    }
}
