//! Index builds on the target, started for a table as soon as all its parts have landed, while
//! other tables still copy. A primary key or unique constraint is built as `CREATE UNIQUE
//! INDEX` then `ADD CONSTRAINT … USING INDEX` in one transaction, so a crash leaves either both
//! or neither; exclusion constraints are added directly.

use anyhow::{Result, anyhow};
use tokio_postgres::Client;

use crate::pg::{describe, quote_ident};
use crate::state::{IndexRow, TableRow};

/// Whether the index (and its constraint) already exists on the target: a resumed build that
/// committed before the crash is not built again.
pub async fn exists_on_target(target: &Client, index: &IndexRow, table: &TableRow) -> Result<bool> {
    let row = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                            WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('i', 'I')),
                    EXISTS (SELECT 1 FROM pg_constraint k
                            WHERE k.conrelid = (quote_ident($3) || '.' || quote_ident($4))::regclass
                              AND k.conname = $5)",
            &[
                &index.schema,
                &index.name,
                &table.schema,
                &table.name,
                &index
                    .constraint
                    .as_ref()
                    .map(|c| c.name.clone())
                    .unwrap_or_default(),
            ],
        )
        .await?;
    let index_exists: bool = row.get(0);
    let constraint_exists: bool = row.get(1);
    Ok(match &index.constraint {
        Some(_) => constraint_exists,
        None => index_exists,
    })
}

/// Builds one index (and its constraint) on the target.
pub async fn build(target: &Client, index: &IndexRow, table: &TableRow) -> Result<()> {
    let sql = match &index.constraint {
        None => index.definition.clone(),
        Some(c) if c.kind == "x" => format!(
            "ALTER TABLE {} ADD CONSTRAINT {} {}",
            table.qualified(),
            quote_ident(&c.name),
            c.definition
        ),
        Some(c) => {
            let kind = if c.kind == "p" {
                "PRIMARY KEY"
            } else {
                "UNIQUE"
            };
            let deferrable = match (c.deferrable, c.deferred) {
                (true, true) => " DEFERRABLE INITIALLY DEFERRED",
                (true, false) => " DEFERRABLE",
                _ => "",
            };
            format!(
                "BEGIN; {}; ALTER TABLE {} ADD CONSTRAINT {} {kind} USING INDEX {}{deferrable}; COMMIT",
                index.definition,
                table.qualified(),
                quote_ident(&c.name),
                quote_ident(&index.name),
            )
        }
    };
    if let Err(e) = target.batch_execute(&sql).await {
        let _ = target.batch_execute("ROLLBACK").await;
        return Err(anyhow!(
            "cannot build index {}.{} on the target: {}\nstatement: {sql}",
            index.schema,
            index.name,
            describe(&e)
        ));
    }
    Ok(())
}
