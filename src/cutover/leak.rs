//! The fence's leak check. Once endpos is reached the slot still decodes everything committed
//! after it; a fenced server should have committed nothing since that touches the migrated
//! tables. The check peeks at the slot (nothing is consumed) and reports every transaction
//! committed after endpos that changed a published table: a superuser's write, or a session
//! that turned the fence's default off. Such a change is not on the other side, so the fence
//! is kept and the cutover (or rollback) reported as failed.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::pg::{self, Lsn};
use crate::replication::Plugin;
use crate::state::StreamRecord;

/// Writes that landed on the fenced server after endpos.
#[derive(Debug, PartialEq, Eq)]
pub struct Leak {
    pub transactions: usize,
    pub changes: usize,
    /// The tables they changed, qualified.
    pub tables: Vec<String>,
}

impl Leak {
    /// One sentence for the error.
    pub fn describe(&self, endpos: Lsn) -> String {
        format!(
            "{} change(s) in {} transaction(s) committed after endpos {endpos}, on {}",
            self.changes,
            self.transactions,
            self.tables.join(", ")
        )
    }
}

/// How long the slot may stay in use by the receiver that just stopped.
const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(30);

/// Peeks at the stream's slot for changes to the published tables committed after `endpos`.
pub async fn check(client: &Client, stream: &StreamRecord, endpos: Lsn) -> Result<Option<Leak>> {
    let deadline = Instant::now() + SLOT_RELEASE_WAIT;
    loop {
        let peeked = match stream.plugin {
            Plugin::Pgoutput => peek_pgoutput(client, stream, endpos).await,
            Plugin::Wal2json => peek_wal2json(client, stream, endpos).await,
        };
        match peeked {
            // The receiver that reached endpos may hold the slot a moment longer.
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(anyhow!(
                    "cannot read slot {} for the leak check: {}",
                    stream.slot,
                    pg::describe(&e)
                ));
            }
            Ok(leak) => return Ok(leak),
        }
    }
}

/// pgoutput (protocol 1): 'B' carries the commit LSN of the transaction that follows; 'I',
/// 'U', 'D' and 'T' are its changes; 'R' names a relation by oid.
async fn peek_pgoutput(
    client: &Client,
    stream: &StreamRecord,
    endpos: Lsn,
) -> Result<Option<Leak>, tokio_postgres::Error> {
    let publications = crate::replication::setup::recorded_publications(stream).join(",");
    let rows = client
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
                 'proto_version', '1', 'publication_names', $2)",
            &[&stream.slot, &publications],
        )
        .await?;
    let messages: Vec<Vec<u8>> = rows.iter().map(|r| r.get(0)).collect();
    let leaked = leaked_pgoutput(&messages, endpos);
    if leaked.changes == 0 {
        return Ok(None);
    }
    let mut tables = BTreeSet::new();
    for oid in &leaked.relations {
        let name = match leaked.names.get(oid) {
            Some(name) => name.clone(),
            None => client
                .query_one("SELECT $1::oid::regclass::text", &[oid])
                .await?
                .get(0),
        };
        tables.insert(name);
    }
    Ok(Some(Leak {
        transactions: leaked.transactions,
        changes: leaked.changes,
        tables: tables.into_iter().collect(),
    }))
}

/// What `leaked_pgoutput` found in the peeked messages.
#[derive(Debug, Default)]
struct PgoutputLeak {
    transactions: usize,
    changes: usize,
    relations: BTreeSet<u32>,
    names: HashMap<u32, String>,
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Reads a NUL-terminated string at `at`; returns it and the offset after it.
fn cstring(bytes: &[u8], at: usize) -> Option<(String, usize)> {
    let rest = bytes.get(at..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    Some((
        String::from_utf8_lossy(&rest[..end]).into_owned(),
        at + end + 1,
    ))
}

/// The changes of transactions whose commit LSN is past `endpos` (apply takes every
/// transaction committed at or before it).
fn leaked_pgoutput(messages: &[Vec<u8>], endpos: Lsn) -> PgoutputLeak {
    let mut found = PgoutputLeak::default();
    let mut after_endpos = false;
    let mut counted = false;
    for m in messages {
        match m.first() {
            Some(b'B') => {
                let commit = m
                    .get(1..9)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                after_endpos = commit > endpos.0;
                counted = false;
            }
            Some(b'R') => {
                if let Some(oid) = be_u32(m, 1)
                    && let Some((schema, next)) = cstring(m, 5)
                    && let Some((table, _)) = cstring(m, next)
                {
                    found.names.insert(
                        oid,
                        format!("{}.{}", pg::quote_ident(&schema), pg::quote_ident(&table)),
                    );
                }
            }
            Some(kind @ (b'I' | b'U' | b'D' | b'T')) if after_endpos => {
                if *kind == b'T' {
                    // 'T', Int32 number of relations, Int8 options, then their oids.
                    let count = be_u32(m, 1).unwrap_or(0) as usize;
                    for i in 0..count {
                        if let Some(oid) = be_u32(m, 6 + 4 * i) {
                            found.relations.insert(oid);
                        }
                    }
                } else if let Some(oid) = be_u32(m, 1) {
                    found.relations.insert(oid);
                }
                found.changes += 1;
                if !counted {
                    found.transactions += 1;
                    counted = true;
                }
            }
            _ => {}
        }
    }
    found
}

/// wal2json (format 2): a transaction's rows share its xid, and the peeked row of its commit
/// carries the LSN where the commit ends.
async fn peek_wal2json(
    client: &Client,
    stream: &StreamRecord,
    endpos: Lsn,
) -> Result<Option<Leak>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_changes($1, NULL, NULL,
                 'format-version', '2', 'include-transaction', 'true')",
            &[&stream.slot],
        )
        .await?;
    let published: BTreeSet<(String, String)> = stream
        .tables
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut changes: HashMap<String, Vec<String>> = HashMap::new();
    let mut committed_after: BTreeSet<String> = BTreeSet::new();
    for row in &rows {
        let (lsn, xid, data): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&data) else {
            continue;
        };
        let action = value["action"].as_str().unwrap_or_default();
        match action {
            "C" if lsn.parse::<Lsn>().is_ok_and(|at| at > endpos) => {
                committed_after.insert(xid);
            }
            "I" | "U" | "D" | "T" => {
                let schema = value["schema"].as_str().unwrap_or_default().to_string();
                let table = value["table"].as_str().unwrap_or_default().to_string();
                if published.contains(&(schema.clone(), table.clone())) {
                    changes.entry(xid).or_default().push(format!(
                        "{}.{}",
                        pg::quote_ident(&schema),
                        pg::quote_ident(&table)
                    ));
                }
            }
            _ => {}
        }
    }
    let mut leak = Leak {
        transactions: 0,
        changes: 0,
        tables: Vec::new(),
    };
    let mut tables = BTreeSet::new();
    for xid in &committed_after {
        if let Some(touched) = changes.get(xid) {
            leak.transactions += 1;
            leak.changes += touched.len();
            tables.extend(touched.iter().cloned());
        }
    }
    leak.tables = tables.into_iter().collect();
    Ok((leak.changes > 0).then_some(leak))
}

/// The fence leaked: the error for the operator, the fence kept.
pub fn leaked_error(leak: &Leak, endpos: Lsn, server: &str, again: &str) -> anyhow::Error {
    anyhow!(
        "the fence leaked: {} on the {server}; those changes are not on the other side. The fence is kept. Find who wrote (a superuser, or a session that turned default_transaction_read_only off) and stop them, then run `{again}` again: it applies what the slot kept, verifies and checks again",
        leak.describe(endpos)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin(commit: u64) -> Vec<u8> {
        let mut m = vec![b'B'];
        m.extend(commit.to_be_bytes());
        m.extend(0i64.to_be_bytes());
        m.extend(7u32.to_be_bytes());
        m
    }

    fn relation(oid: u32, schema: &str, table: &str) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(oid.to_be_bytes());
        m.extend(schema.as_bytes());
        m.push(0);
        m.extend(table.as_bytes());
        m.push(0);
        m
    }

    fn insert(oid: u32) -> Vec<u8> {
        let mut m = vec![b'I'];
        m.extend(oid.to_be_bytes());
        m.push(b'N');
        m
    }

    #[test]
    fn only_transactions_committed_past_endpos_leak() {
        let messages = vec![
            begin(100),
            relation(1, "public", "a"),
            insert(1),
            vec![b'C'],
            begin(200),
            insert(1),
            insert(1),
            vec![b'C'],
            begin(300),
            relation(2, "app", "Orders"),
            insert(2),
            vec![b'C'],
        ];
        let found = leaked_pgoutput(&messages, Lsn(100));
        assert_eq!((found.transactions, found.changes), (2, 3));
        assert_eq!(found.relations, BTreeSet::from([1, 2]));
        assert_eq!(found.names[&2], "app.\"Orders\"");
        let none = leaked_pgoutput(&messages, Lsn(300));
        assert_eq!(none.changes, 0);
    }
}
