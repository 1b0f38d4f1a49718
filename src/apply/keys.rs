//! What a batch of source transactions touches on the target, so that parallel apply
//! (`lanes.rs`) can tell when a later batch may run beside an earlier one still in flight.
//!
//! A change touches its row by the replica identity key (old and new values) and by the values
//! of every unique index of the target table that its new row carries. A change whose row
//! cannot be named that way (FULL or NOTHING identity, a key value left out as unchanged
//! TOAST, an old image that is the whole row) touches its whole table. Two batches that share
//! nothing here may run at once; one that shares a key with a batch in flight waits for that
//! batch's commit first.
//!
//! This is a performance rule, not the only guard: values are compared as the source printed
//! them, so two values a type calls equal but prints differently (numeric scale, a
//! nondeterministic collation) are not seen as one. Then the target itself serializes the two
//! batches (a row or unique-index lock wait, ended by `lock_timeout`) or refuses one (a unique
//! violation, a row not found), and apply re-runs that batch alone after every earlier one
//! has committed, which is the single-lane result.

use std::collections::HashSet;

use bytes::Bytes;

use super::statements::TargetTable;
use crate::decode::{Change, OldImage, Value};

/// Row keys a batch may hold before it is recorded as touching its tables whole: bounds the
/// memory of a huge transaction's key set.
const MAX_ROW_KEYS: usize = 200_000;

/// One row as another batch could meet it: a table, which of its keys (0 the replica
/// identity, n the n-th unique index), and that key's values as text.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RowKey {
    relation: u32,
    key: usize,
    values: Vec<Option<Bytes>>,
}

/// What one change touches.
#[derive(Debug, Default)]
pub struct ChangeKeys {
    relation: u32,
    rows: Vec<RowKey>,
    /// The change cannot be reduced to row keys: it touches its whole table.
    whole_table: bool,
}

/// What a batch touches: its row keys, every table it changed, and the tables it touched whole.
#[derive(Debug, Default)]
pub struct KeySet {
    rows: HashSet<RowKey>,
    tables: HashSet<u32>,
    whole_tables: HashSet<u32>,
}

impl KeySet {
    /// Whether a change of a later batch touches something this batch touched.
    pub fn conflicts(&self, change: &ChangeKeys) -> bool {
        if self.whole_tables.contains(&change.relation) {
            return true;
        }
        if change.whole_table {
            return self.tables.contains(&change.relation);
        }
        change.rows.iter().any(|row| self.rows.contains(row))
    }

    /// Records what a change of this batch touches.
    pub fn add(&mut self, change: ChangeKeys) {
        self.tables.insert(change.relation);
        if change.whole_table || self.whole_tables.contains(&change.relation) {
            self.whole_tables.insert(change.relation);
            return;
        }
        self.rows.extend(change.rows);
        if self.rows.len() > MAX_ROW_KEYS {
            // Too many rows to remember one by one: the batch now holds its tables whole.
            self.whole_tables.extend(self.tables.iter().copied());
            self.rows = HashSet::new();
        }
    }
}

/// The keys a row change of `table` touches (see the module comment).
pub fn of_change(table: &TargetTable, change: &Change) -> ChangeKeys {
    let relation = table.source.oid;
    let whole = || ChangeKeys {
        relation,
        rows: Vec::new(),
        whole_table: true,
    };
    let identity = table.key_columns();
    if identity.is_empty() || matches!(table.source.replica_identity, b'f' | b'n') {
        return whole();
    }
    let mut rows = Vec::new();
    let mut add_key = |key: usize, columns: &[usize], values: &[Value]| -> bool {
        let mut texts = Vec::with_capacity(columns.len());
        for column in columns {
            match values.get(*column) {
                Some(Value::Text(b) | Value::Binary(b)) => texts.push(Some(b.clone())),
                Some(Value::Null) => texts.push(None),
                Some(Value::Unchanged) | None => return false,
            }
        }
        rows.push(RowKey {
            relation,
            key,
            values: texts,
        });
        true
    };
    let named = match change {
        Change::Insert { new, .. } => add_key(0, &identity, new),
        Change::Update { old, new, .. } => {
            let old_named = match old {
                None => true,
                Some((OldImage::Key, values)) => add_key(0, &identity, values),
                Some((OldImage::Full, _)) => false,
            };
            old_named && add_key(0, &identity, new)
        }
        Change::Delete {
            old: (OldImage::Key, values),
            ..
        } => add_key(0, &identity, values),
        _ => false,
    };
    if !named {
        return whole();
    }
    // The unique values the new row takes: a later batch inserting the same value waits.
    if let Change::Insert { new, .. } | Change::Update { new, .. } = change {
        for (n, columns) in table.unique.iter().enumerate() {
            // A unique value left out as unchanged TOAST did not change: nothing to record.
            add_key(n + 1, columns, new);
        }
    }
    ChangeKeys {
        relation,
        rows,
        whole_table: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Column, Relation};

    fn table(identity: u8, unique: Vec<Vec<usize>>) -> TargetTable {
        let column = |name: &str, is_key: bool| Column {
            is_key,
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
        };
        TargetTable {
            source: Relation {
                oid: 7,
                schema: "public".into(),
                name: "t".into(),
                replica_identity: identity,
                columns: vec![column("id", true), column("email", false)],
            },
            qualified: "public.t".into(),
            types: vec!["text".into(), "text".into()],
            generated_always: vec![false, false],
            generated: vec![false, false],
            index: Vec::new(),
            unique,
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn insert(id: &str, email: &str) -> Change {
        Change::Insert {
            relation: 7,
            new: vec![text(id), text(email)],
        }
    }

    fn batch(table: &TargetTable, changes: &[Change]) -> KeySet {
        let mut keys = KeySet::default();
        for change in changes {
            keys.add(of_change(table, change));
        }
        keys
    }

    #[test]
    fn the_same_row_conflicts_and_another_row_does_not() {
        let t = table(b'd', vec![]);
        let earlier = batch(&t, &[insert("1", "a")]);
        assert!(earlier.conflicts(&of_change(
            &t,
            &Change::Delete {
                relation: 7,
                old: (OldImage::Key, vec![text("1"), Value::Null]),
            }
        )));
        assert!(!earlier.conflicts(&of_change(&t, &insert("2", "b"))));
    }

    #[test]
    fn a_key_change_touches_the_old_and_the_new_key() {
        let t = table(b'd', vec![]);
        let earlier = batch(
            &t,
            &[Change::Update {
                relation: 7,
                old: Some((OldImage::Key, vec![text("1"), Value::Null])),
                new: vec![text("2"), text("a")],
            }],
        );
        assert!(earlier.conflicts(&of_change(&t, &insert("1", "x"))));
        assert!(earlier.conflicts(&of_change(&t, &insert("2", "y"))));
        assert!(!earlier.conflicts(&of_change(&t, &insert("3", "z"))));
    }

    #[test]
    fn a_unique_value_conflicts_across_rows() {
        let t = table(b'd', vec![vec![1]]);
        let earlier = batch(&t, &[insert("1", "a@x")]);
        assert!(earlier.conflicts(&of_change(&t, &insert("2", "a@x"))));
        assert!(!earlier.conflicts(&of_change(&t, &insert("2", "b@x"))));
    }

    #[test]
    fn full_identity_and_unchanged_keys_touch_the_whole_table() {
        let full = table(b'f', vec![]);
        let earlier = batch(&full, &[insert("1", "a")]);
        assert!(earlier.conflicts(&of_change(&full, &insert("2", "b"))));
        let t = table(b'd', vec![]);
        let unchanged_key = Change::Update {
            relation: 7,
            old: None,
            new: vec![Value::Unchanged, text("a")],
        };
        let earlier = batch(&t, &[unchanged_key]);
        assert!(earlier.conflicts(&of_change(&t, &insert("9", "q"))));
        // Another table is never touched.
        let mut other = insert("9", "q");
        if let Change::Insert { relation, .. } = &mut other {
            *relation = 8;
        }
        let mut other_table = table(b'd', vec![]);
        other_table.source.oid = 8;
        assert!(!earlier.conflicts(&of_change(&other_table, &other)));
    }

    #[test]
    fn too_many_rows_become_whole_tables() {
        let t = table(b'd', vec![]);
        let mut keys = KeySet::default();
        for i in 0..=MAX_ROW_KEYS {
            keys.add(of_change(&t, &insert(&i.to_string(), "e")));
        }
        assert!(keys.rows.is_empty());
        assert!(keys.conflicts(&of_change(&t, &insert("not seen", "e"))));
    }
}
