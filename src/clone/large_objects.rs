//! Large objects: their metadata (owner, ACL, comment) comes with the pre-data schema; their
//! contents are copied here, one object at a time, under the snapshot.

use anyhow::{Result, anyhow};
use tokio_postgres::Client;

use crate::clone::snapshot;
use crate::pg::describe;

/// INV_READ | INV_WRITE for lo_open.
const LO_READ_WRITE: i32 = 0x20000 | 0x40000;

async fn write_object(target: &Client, oid: u32, data: &[u8]) -> Result<(), tokio_postgres::Error> {
    let exists: bool = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_largeobject_metadata WHERE oid = $1)",
            &[&oid],
        )
        .await?
        .get(0);
    if exists {
        // Keep the object pre-data created (its owner, ACL and comment); replace its contents.
        target
            .execute(
                "SELECT lo_truncate(lo_open($1, $2), 0)",
                &[&oid, &LO_READ_WRITE],
            )
            .await?;
        target
            .execute("SELECT lo_put($1, 0, $2)", &[&oid, &data])
            .await?;
    } else {
        target
            .execute("SELECT lo_from_bytea($1, $2)", &[&oid, &data])
            .await?;
    }
    Ok(())
}

/// Copies the contents of each large object; objects that pre-data already created are
/// rewritten in place, others are created with the same OID.
pub async fn copy(
    source: &Client,
    target: &Client,
    snapshot_name: &str,
    oids: &[u32],
) -> Result<u64> {
    if oids.is_empty() {
        return Ok(0);
    }
    snapshot::import(source, snapshot_name).await?;
    let mut bytes = 0u64;
    for oid in oids {
        let row = source
            .query_one("SELECT lo_get($1)", &[oid])
            .await
            .map_err(|e| {
                anyhow!(
                    "cannot read large object {oid} on the source: {}",
                    describe(&e)
                )
            })?;
        let data: Vec<u8> = row.get(0);
        bytes += data.len() as u64;
        target
            .batch_execute("BEGIN")
            .await
            .map_err(|e| anyhow!("cannot start a target transaction: {}", describe(&e)))?;
        let result = write_object(target, *oid, &data).await;
        if let Err(e) = result {
            let _ = target.batch_execute("ROLLBACK").await;
            return Err(anyhow!(
                "cannot write large object {oid} on the target: {}",
                describe(&e)
            ));
        }
        target
            .batch_execute("COMMIT")
            .await
            .map_err(|e| anyhow!("cannot commit large object {oid}: {}", describe(&e)))?;
    }
    let _ = source.batch_execute("ROLLBACK").await;
    Ok(bytes)
}
