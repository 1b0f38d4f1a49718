//! Set-based apply: the row changes of a merged target transaction are queued per table and
//! sent as one statement per run of like changes (`INSERT … SELECT FROM unnest($1::text[], …)`,
//! or `COPY … FROM STDIN` for 32 rows and more; `UPDATE … FROM unnest(…)`, `DELETE … USING
//! unnest(…)`), repeated updates of one key within a run compacted to the last one.
//!
//! Why this keeps the source's result: the apply session runs with
//! `session_replication_role = replica`, so no trigger and no foreign key check sees the order
//! of rows across tables inside one target transaction; within a table the order of runs is
//! kept, and a run only holds changes of one kind and one column set, so merging it changes no
//! row's final state. What it can change is a transient state inside the transaction (a unique
//! value swapped between two rows in one statement); the caller replays such a batch one row
//! at a time (see `apply::run`), so a conflict costs speed, never correctness.

use std::collections::HashMap;

use anyhow::Result;

use super::run::{Run, RunShape, TextParam, text_of, value_bytes};
use super::statements::{Statements, TargetTable};
use crate::decode::{Change, OldImage, Value};

/// Rows per statement: bounds the parameter arrays and the statement's memory on both sides.
const RUN_ROWS: usize = 5_000;
/// Value bytes per statement, whatever the rows' width (invariant 4): a statement stays far
/// below the server's 1 GB message limit and pgtide's memory stays bounded.
const RUN_BYTES: usize = 16 << 20;
/// Rows queued across all tables before the queues are sent.
const QUEUED_ROWS: usize = 50_000;
/// Value bytes queued across all tables before the queues are sent.
const QUEUED_BYTES: usize = 32 << 20;

enum Entry {
    Run(Run),
    /// A change that no run can hold (key changes, FULL identity, truncate): sent alone, in
    /// its place in the table's order.
    Single(Change),
}

/// Per-table queues of the current target transaction.
#[derive(Default)]
pub struct SetQueue {
    tables: Vec<(u32, Vec<Entry>)>,
    position: HashMap<u32, usize>,
    queued: usize,
    queued_bytes: usize,
}

impl SetQueue {
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Queues one row change; sends the queues when they are full.
    pub async fn push(
        &mut self,
        statements: &mut Statements,
        target: &std::sync::Arc<tokio_postgres::Client>,
        tables: &HashMap<u32, TargetTable>,
        change: Change,
    ) -> Result<()> {
        let Some(oid) = change.relation() else {
            return Ok(());
        };
        let row = match tables.get(&oid) {
            Some(table) => runnable(table, &change)?,
            None => None,
        };
        let position = *self.position.entry(oid).or_insert_with(|| {
            self.tables.push((oid, Vec::new()));
            self.tables.len() - 1
        });
        let entries = &mut self.tables[position].1;
        match row {
            None => {
                self.queued += 1;
                self.queued_bytes += change_bytes(&change);
                entries.push(Entry::Single(change));
            }
            Some((shape, values, key_len)) => {
                let bytes = value_bytes(&values);
                let last_fits = matches!(entries.last(), Some(Entry::Run(run))
                    if run.shape == shape && run.rows() < RUN_ROWS && run.bytes + bytes <= RUN_BYTES);
                if !last_fits {
                    entries.push(Entry::Run(Run {
                        values: vec![Vec::new(); values.len()],
                        shape: shape.clone(),
                        by_key: HashMap::new(),
                        bytes: 0,
                    }));
                }
                self.queued_bytes += bytes;
                let Some(Entry::Run(run)) = entries.last_mut() else {
                    unreachable!("a run was just pushed")
                };
                run.bytes += bytes;
                let key = matches!(shape, RunShape::Update { .. })
                    .then(|| values[values.len() - key_len..].to_vec());
                match key.as_ref().and_then(|k| run.by_key.get(k)) {
                    // The same key updated again in this run: its last values win.
                    Some(&index) => {
                        for (column, value) in run.values.iter_mut().zip(values) {
                            column[index] = value;
                        }
                    }
                    None => {
                        let index = run.rows();
                        for (column, value) in run.values.iter_mut().zip(values) {
                            column.push(value);
                        }
                        if let Some(key) = key {
                            run.by_key.insert(key, index);
                        }
                        self.queued += 1;
                    }
                }
            }
        }
        if self.queued >= QUEUED_ROWS || self.queued_bytes >= QUEUED_BYTES {
            self.send(statements, target, tables).await?;
        }
        Ok(())
    }

    /// Sends every queued run and single change (pipelined) and checks their results.
    pub async fn send(
        &mut self,
        statements: &mut Statements,
        target: &std::sync::Arc<tokio_postgres::Client>,
        tables: &HashMap<u32, TargetTable>,
    ) -> Result<()> {
        self.hand_over(statements, target, tables).await?;
        statements.flush().await
    }

    /// Moves every queued run and single change into the statement pipeline, in order, without
    /// waiting for the last results: parallel apply (`lanes.rs`) awaits them in the lane's
    /// own task.
    pub async fn hand_over(
        &mut self,
        statements: &mut Statements,
        target: &std::sync::Arc<tokio_postgres::Client>,
        tables: &HashMap<u32, TargetTable>,
    ) -> Result<()> {
        let queued = std::mem::take(&mut self.tables);
        self.position.clear();
        self.queued = 0;
        self.queued_bytes = 0;
        for (oid, entries) in queued {
            for entry in entries {
                match entry {
                    Entry::Run(run) => {
                        let table = tables.get(&oid).ok_or_else(|| {
                            anyhow::anyhow!(
                                "a change for relation {oid} arrived before its description"
                            )
                        })?;
                        statements.send_run(target, table, run).await?
                    }
                    Entry::Single(change) => statements.apply(target, tables, &change).await?,
                }
            }
        }
        Ok(())
    }

    /// Drops everything queued (the target transaction is being rolled back).
    pub fn discard(&mut self) {
        self.tables.clear();
        self.position.clear();
        self.queued = 0;
        self.queued_bytes = 0;
    }
}

/// The bytes of a change's values (old and new images).
fn change_bytes(change: &Change) -> usize {
    let row = |values: &[Value]| -> usize {
        values
            .iter()
            .map(|v| match v {
                Value::Text(b) | Value::Binary(b) => b.len(),
                Value::Null | Value::Unchanged => 0,
            })
            .sum()
    };
    match change {
        Change::Insert { new, .. } => row(new),
        Change::Update { old, new, .. } => row(new) + old.as_ref().map_or(0, |o| row(&o.1)),
        Change::Delete { old, .. } => row(&old.1),
        _ => 0,
    }
}

/// The run shape and parameter values of a change a run can hold, with the key's length.
type Runnable = (RunShape, Vec<Option<TextParam>>, usize);

fn runnable(table: &TargetTable, change: &Change) -> Result<Option<Runnable>> {
    let key = table.key_columns();
    let present = |row: &[Value]| -> Vec<usize> {
        (0..row.len())
            .filter(|i| row[*i] != Value::Unchanged)
            .collect()
    };
    Ok(match change {
        Change::Insert { new, .. } => {
            let columns = present(new);
            let values = columns
                .iter()
                .map(|i| text_of(&new[*i]))
                .collect::<Result<_>>()?;
            Some((RunShape::Insert { columns }, values, 0))
        }
        // No old image: the key did not change, so the new row's key finds it.
        Change::Update { old: None, new, .. } => {
            if key.is_empty() || key.iter().any(|i| new[*i] == Value::Unchanged) {
                return Ok(None);
            }
            // A GENERATED ALWAYS identity column cannot be assigned: it joins the match
            // instead (see `Statements::apply`).
            let set: Vec<usize> = present(new)
                .into_iter()
                .filter(|i| !key.contains(i) && !table.generated_always[*i])
                .collect();
            if set.is_empty() {
                return Ok(None);
            }
            let guard: Vec<usize> = present(new)
                .into_iter()
                .filter(|i| !key.contains(i) && table.generated_always[*i])
                .collect();
            let key: Vec<usize> = key.into_iter().chain(guard).collect();
            let mut values: Vec<Option<TextParam>> = set
                .iter()
                .map(|i| text_of(&new[*i]))
                .collect::<Result<_>>()?;
            for i in &key {
                values.push(text_of(&new[*i])?);
            }
            let key_len = key.len();
            Some((RunShape::Update { set, key }, values, key_len))
        }
        Change::Delete { old, .. } if old.0 == OldImage::Key && !key.is_empty() => {
            let values = key
                .iter()
                .map(|i| text_of(&old.1[*i]))
                .collect::<Result<_>>()?;
            let key_len = key.len();
            Some((RunShape::Delete { key }, values, key_len))
        }
        _ => None,
    })
}
