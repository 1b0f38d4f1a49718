//! Index builds on the target, started for a table as soon as all its parts have landed, while
//! other tables still copy. A primary key or unique constraint is built as `CREATE UNIQUE
//! INDEX` then `ADD CONSTRAINT … USING INDEX` in one transaction, so a crash leaves either both
//! or neither; exclusion constraints are added directly. An index that is its table's REPLICA
//! IDENTITY is made so again in the same transaction.

use anyhow::{Result, anyhow};
use tokio_postgres::Client;

use crate::pg::catalog::{IndexRow, TableRow};
use crate::pg::{describe, quote_ident};

/// How much of an index build the target already has: a resumed build that committed before
/// the crash is not redone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnTarget {
    Missing,
    /// The unique index exists but its constraint was not attached yet.
    IndexOnly,
    Complete,
}

pub async fn state_on_target(
    target: &Client,
    index: &IndexRow,
    table: &TableRow,
) -> Result<OnTarget> {
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
    Ok(match (&index.constraint, index_exists, constraint_exists) {
        (Some(_), _, true) | (None, true, _) => OnTarget::Complete,
        (Some(c), true, false) if c.kind != "x" => OnTarget::IndexOnly,
        _ => OnTarget::Missing,
    })
}

/// Builds one index (and its constraint) on the target, continuing from `from`.
///
/// The unique index and its constraint are two transactions on purpose: `ADD CONSTRAINT`
/// takes an ACCESS EXCLUSIVE lock, and taking it inside the transaction that built one index
/// deadlocks with another worker building a second index of the same table. Alone, it simply
/// waits for the other builds to finish.
pub async fn build(
    target: &Client,
    index: &IndexRow,
    table: &TableRow,
    from: OnTarget,
) -> Result<()> {
    let mut statements = Vec::new();
    match &index.constraint {
        None => statements.push(index.definition.clone()),
        Some(c) if c.kind == "x" => statements.push(format!(
            "ALTER TABLE {} ADD CONSTRAINT {} {}",
            table.qualified(),
            quote_ident(&c.name),
            c.definition
        )),
        Some(c) => {
            if from == OnTarget::Missing {
                statements.push(index.definition.clone());
            }
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
            statements.push(format!(
                "ALTER TABLE {} ADD CONSTRAINT {} {kind} USING INDEX {}{deferrable}",
                table.qualified(),
                quote_ident(&c.name),
                quote_ident(&index.name),
            ));
        }
    }
    // The table's replica identity goes with the index's last statement, in its transaction
    // (a multi-statement batch is one): a resumed build finds both or neither.
    if index.replica_identity
        && let Some(last) = statements.last_mut()
    {
        last.push_str(&format!(
            "; ALTER TABLE ONLY {} REPLICA IDENTITY USING INDEX {}",
            table.qualified(),
            quote_ident(&index.name)
        ));
    }
    for sql in statements {
        target.batch_execute(&sql).await.map_err(|e| {
            anyhow!(
                "cannot build index {}.{} on the target: {}\nstatement: {sql}",
                index.schema,
                index.name,
                describe(&e)
            )
        })?;
        fail::fail_point!(crate::failpoints::INDEX_AFTER_STATEMENT);
    }
    Ok(())
}
