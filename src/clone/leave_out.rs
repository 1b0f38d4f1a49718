//! What of the source's schema dump is not restored on the target, decided from the servers'
//! catalogs (never from names parsed out of `pg_restore --list`, which prints them unquoted):
//!
//! - pgtide's own publications (`pgtide_…`, invariant 8): they belong on the source only;
//! - schemas that already exist on the target (a DBA often creates them, empty, with the
//!   right owner): `CREATE SCHEMA` would fail, so the existing one is used as it is (its
//!   comment is set only where pgtide's role owns it);
//! - extensions already installed on the target (typically by a superuser): they are not the
//!   user's data, and the clone's role may not own them, so they are neither recreated,
//!   commented nor dropped by `--drop-if-exists`.

use anyhow::{Context, Result};
use tokio_postgres::Client;

use crate::clone::schema::LeaveOut;

/// Reads both servers and returns the entries to leave out of a restore.
pub async fn decide(source: &Client, target: &Client) -> Result<LeaveOut> {
    let mut leave_out = LeaveOut::default();
    for row in source
        .query(
            "SELECT 'pg_catalog.pg_publication'::regclass::oid, p.oid FROM pg_catalog.pg_publication p
              WHERE p.pubname LIKE 'pgtide\\_%'
             UNION ALL
             SELECT 'pg_catalog.pg_publication_rel'::regclass::oid, r.oid
               FROM pg_catalog.pg_publication_rel r JOIN pg_catalog.pg_publication p ON p.oid = r.prpubid
              WHERE p.pubname LIKE 'pgtide\\_%'",
            &[],
        )
        .await
        .context("cannot list pgtide's publications on the source")?
    {
        leave_out.object(row.get(0), row.get(1), "pgtide's own, source only");
    }

    // (catalog, oid, name, name as pg_dump quotes it) of the source's schemas and extensions.
    let source_objects = source
        .query(
            "SELECT 'pg_catalog.pg_namespace'::regclass::oid, oid, nspname::text, quote_ident(nspname), 'SCHEMA'
               FROM pg_catalog.pg_namespace
             UNION ALL
             SELECT 'pg_catalog.pg_extension'::regclass::oid, oid, extname::text, quote_ident(extname), 'EXTENSION'
               FROM pg_catalog.pg_extension",
            &[],
        )
        .await
        .context("cannot list the source's schemas and extensions")?;
    // (kind, name, whether this session's role owns it) of what the target has.
    let present: Vec<(String, String, bool)> = target
        .query(
            "SELECT 'SCHEMA', nspname::text, pg_catalog.pg_has_role(nspowner, 'MEMBER')
               FROM pg_catalog.pg_namespace
             UNION ALL
             SELECT 'EXTENSION', extname::text, pg_catalog.pg_has_role(extowner, 'MEMBER')
               FROM pg_catalog.pg_extension",
            &[],
        )
        .await
        .context("cannot list the target's schemas and extensions")?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    for row in source_objects {
        let kind: String = row.get(4);
        let name: String = row.get(2);
        let Some(&(_, _, owned)) = present.iter().find(|(k, n, _)| *k == kind && *n == name) else {
            continue;
        };
        let why = if kind == "SCHEMA" {
            "exists on the target already, used as it is"
        } else {
            "installed on the target already, left as it is"
        };
        if name != "public" && name != "plpgsql" {
            tracing::info!("{} {name} {why}", kind.to_lowercase());
        }
        leave_out.object(row.get(0), row.get(1), why);
        // COMMENT ON needs ownership: the source's comment is kept where pgtide's role may
        // set it (an extension's comment is the extension's own, the same on both sides).
        if kind == "EXTENSION" || !owned {
            leave_out.comment(format!("{kind} {}", row.get::<_, String>(3)), why);
        }
    }
    Ok(leave_out)
}
