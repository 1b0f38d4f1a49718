//! Sequence values: read on the source when the catalog is taken, set on the target with
//! `setval` (value and is_called both, so the next nextval() matches the source's).

use anyhow::{Result, anyhow};
use tokio_postgres::Client;

use crate::pg::catalog::SequenceRow;
use crate::pg::{describe, qualified, quote_literal};

/// Sets every sequence; `offset` is added to the value (a safety gap some operators want).
pub async fn set_on_target(target: &Client, sequences: &[SequenceRow], offset: i64) -> Result<()> {
    for s in sequences {
        let name = qualified(&s.schema, &s.name);
        let value = s.last_value.saturating_add(offset);
        target
            .query_one(
                &format!("SELECT setval({}::regclass, $1, $2)", quote_literal(&name)),
                &[&value, &s.is_called],
            )
            .await
            .map_err(|e| {
                anyhow!(
                    "cannot set sequence {}.{} on the target: {}",
                    s.schema,
                    s.name,
                    describe(&e)
                )
            })?;
    }
    Ok(())
}
