//! The fence's leak check. Once endpos is reached the slot still decodes everything committed
//! after it; a fenced server should have committed nothing since that touches the migrated
//! tables. The check peeks at the slot (nothing is consumed) and reports every transaction
//! committed after endpos that changed a published table: a superuser's write, or a session
//! that turned the fence's default off. Such a change is not on the other side, so the fence
//! is kept and the cutover (or rollback) reported as failed.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::decode::{Change, StreamDecoder};
use crate::pg::{self, Lsn};
use crate::replication::Plugin;
use crate::spool::SpoolReader;
use crate::state::{StateDb, StreamRecord};

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

/// Looks for changes to the published tables committed after `endpos`: in the spool (the
/// receiver may have spooled, and acknowledged, a transaction past endpos before apply
/// stopped), then in the slot (what it has not sent yet). A transaction apply took past
/// endpos (it had not yet read the new endpos) counts too, even once pruned from the spool.
pub async fn check(
    client: &Client,
    state: &StateDb,
    dir: &Path,
    endpos: Lsn,
) -> Result<Option<Leak>> {
    let stream = state
        .stream()?
        .ok_or_else(|| anyhow!("the work dir lost its stream record"))?;
    let mut tally = Tally::default();
    if let Some(reader) = spool_reader(dir)? {
        let mut decoder = StreamDecoder::new(stream.plugin);
        let mut after = reader.seq_through(endpos)?;
        for payload in reader.relations_before(after)? {
            for change in decoder.decode(payload)? {
                tally.feed(&change, endpos);
            }
        }
        loop {
            let rows = reader.read(after, 1000)?;
            let Some(last) = rows.last() else { break };
            after = last.seq;
            for row in rows {
                for change in decoder.decode(row.payload)? {
                    tally.feed(&change, endpos);
                }
            }
        }
    }
    let deadline = Instant::now() + SLOT_RELEASE_WAIT;
    let mut from_slot = loop {
        let peeked = match stream.plugin {
            Plugin::Pgoutput => peek_pgoutput(client, &stream, endpos, tally.clone())
                .await
                .map(|with_slot| (None, Some(with_slot))),
            Plugin::Wal2json => peek_wal2json(client, &stream, endpos)
                .await
                .map(|leak| (leak, None)),
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
            Ok(found) => break found,
        }
    };
    if let Some(with_slot) = from_slot.1.take() {
        tally = with_slot;
    }
    let mut leak = tally.into_leak(client).await?;
    if let Some(wal2json) = from_slot.0.take() {
        leak = Some(match leak {
            Some(mut l) => {
                l.transactions += wal2json.transactions;
                l.changes += wal2json.changes;
                l.tables.extend(wal2json.tables);
                l.tables.sort();
                l.tables.dedup();
                l
            }
            None => wal2json,
        });
    }
    if leak.is_none()
        && let Some(applied) = state.sentinel()?.applied_lsn
        && applied > endpos
    {
        return Ok(Some(Leak {
            transactions: 1,
            changes: 0,
            tables: vec![format!(
                "tables no longer known (apply took it before it read endpos; applied through {applied})"
            )],
        }));
    }
    Ok(leak)
}

fn spool_reader(dir: &Path) -> Result<Option<SpoolReader>> {
    if !dir.join("spool.db").exists() {
        return Ok(None);
    }
    SpoolReader::open(dir).map(Some)
}

/// The changes of transactions committed past `endpos` (apply takes every transaction
/// committed at or before it), each transaction counted once however often it is read.
#[derive(Clone, Debug, Default)]
struct Tally {
    /// The commit LSNs of the leaked transactions.
    commits: BTreeSet<Lsn>,
    changes: usize,
    relations: BTreeSet<u32>,
    names: HashMap<u32, String>,
    /// Inside a transaction past endpos, not yet counted.
    counting: bool,
}

impl Tally {
    fn feed(&mut self, change: &Change, endpos: Lsn) {
        match change {
            Change::Begin { final_lsn, .. } => {
                self.counting = *final_lsn > endpos && self.commits.insert(*final_lsn);
            }
            Change::Relation(r) => {
                self.names.insert(
                    r.oid,
                    format!(
                        "{}.{}",
                        pg::quote_ident(&r.schema),
                        pg::quote_ident(&r.name)
                    ),
                );
            }
            Change::Insert { relation, .. }
            | Change::Update { relation, .. }
            | Change::Delete { relation, .. }
                if self.counting =>
            {
                self.relations.insert(*relation);
                self.changes += 1;
            }
            Change::Truncate { relations, .. } if self.counting => {
                self.relations.extend(relations.iter().copied());
                self.changes += 1;
            }
            _ => {}
        }
    }

    async fn into_leak(self, client: &Client) -> Result<Option<Leak>> {
        if self.changes == 0 {
            return Ok(None);
        }
        let mut tables = BTreeSet::new();
        for oid in &self.relations {
            let name = match self.names.get(oid) {
                Some(name) => name.clone(),
                None => client
                    .query_one("SELECT $1::oid::regclass::text", &[oid])
                    .await?
                    .get(0),
            };
            tables.insert(name);
        }
        // Transactions that changed nothing published (an empty BEGIN/COMMIT) do not count.
        let transactions = self.commits.len().min(self.changes);
        Ok(Some(Leak {
            transactions,
            changes: self.changes,
            tables: tables.into_iter().collect(),
        }))
    }
}

/// pgoutput (protocol 1), decoded as the spool is: the tally after the spool's, with what the
/// slot still holds.
async fn peek_pgoutput(
    client: &Client,
    stream: &StreamRecord,
    endpos: Lsn,
    mut tally: Tally,
) -> Result<Tally, tokio_postgres::Error> {
    let publications = crate::replication::setup::recorded_publications(stream).join(",");
    let rows = client
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
                 'proto_version', '1', 'publication_names', $2)",
            &[&stream.slot, &publications],
        )
        .await?;
    let mut decoder = StreamDecoder::new(Plugin::Pgoutput);
    for row in rows {
        let data: Vec<u8> = row.get(0);
        // A message this decoder cannot read (a newer protocol's) is left out of the tally.
        if let Ok(changes) = decoder.decode(bytes::Bytes::from(data)) {
            for change in &changes {
                tally.feed(change, endpos);
            }
        }
    }
    Ok(tally)
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
    anyhow::Error::new(Leaked(format!(
        "the fence leaked: {} on the {server}; those changes are not on the other side. The fence is kept. Find who wrote (a superuser, or a session that turned default_transaction_read_only off) and stop them, then run `{again}` again: it applies what the slot kept, verifies and checks again",
        leak.describe(endpos)
    )))
}

/// The leak check could not run: the fence is kept all the same (nothing says it held).
pub fn leaked_error_unchecked(e: anyhow::Error, server: &str, again: &str) -> anyhow::Error {
    anyhow::Error::new(Leaked(format!(
        "the leak check after endpos could not run ({e:#}); the fence on the {server} is kept: run `{again}` again"
    )))
}

/// The typed error of a fence that leaked (or could not be checked): the caller keeps the
/// fence instead of lifting it.
#[derive(Debug)]
pub struct Leaked(String);

impl std::fmt::Display for Leaked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Leaked {}

/// Whether an error (with any context) is a leaked fence.
pub fn is_leak(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Leaked>().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin(commit: u64) -> Change {
        Change::Begin {
            final_lsn: Lsn(commit),
            commit_time: 0,
            xid: 7,
        }
    }

    fn insert(relation: u32) -> Change {
        Change::Insert {
            relation,
            new: Vec::new(),
        }
    }

    #[test]
    fn only_transactions_committed_past_endpos_leak_and_each_counts_once() {
        let mut tally = Tally::default();
        let stream = [
            begin(100),
            insert(1),
            begin(200),
            insert(1),
            insert(1),
            begin(300),
            insert(2),
        ];
        // Read twice (spooled and still in the slot): counted once.
        for change in stream.iter().chain(stream[2..5].iter()) {
            tally.feed(change, Lsn(100));
        }
        assert_eq!(tally.commits.len(), 2);
        assert_eq!(tally.changes, 3);
        assert_eq!(tally.relations, BTreeSet::from([1, 2]));
        let mut none = Tally::default();
        for change in &stream {
            none.feed(change, Lsn(300));
        }
        assert_eq!(none.changes, 0);
    }
}
