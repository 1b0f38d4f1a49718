//! A run of like changes (one table, one kind, one column set) and the text values it
//! carries: what set batching (`sets.rs`) builds and statement building (`statements.rs`)
//! sends. Kept apart so that each of those two depends on this one and not on the other.

use std::collections::HashMap;

use anyhow::{Result, anyhow, bail};

use crate::decode::Value;

/// The bytes of a row's text values: what it costs in memory and in the statement.
pub fn value_bytes(values: &[Option<String>]) -> usize {
    values
        .iter()
        .map(|v| v.as_ref().map_or(0, String::len))
        .sum()
}

/// The kind of a run and the columns its rows carry.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum RunShape {
    /// Values of `columns`.
    Insert { columns: Vec<usize> },
    /// New values of `set`, then the key values that find the row (the key did not change).
    Update { set: Vec<usize>, key: Vec<usize> },
    /// The key values of the deleted rows.
    Delete { key: Vec<usize> },
}

/// Like changes of one table, stored column-major as the statement takes them.
pub struct Run {
    pub shape: RunShape,
    /// One array per parameter: the shape's columns in order (for updates, set then key).
    pub values: Vec<Vec<Option<String>>>,
    /// Update runs: the row index of each key, so a later update of it replaces the earlier.
    pub(super) by_key: HashMap<Vec<Option<String>>, usize>,
    /// Value bytes held (replaced values of compacted updates included: an upper bound).
    pub(super) bytes: usize,
}

impl Run {
    pub fn rows(&self) -> usize {
        self.values.first().map_or(0, Vec::len)
    }

    /// Value bytes held: what the statement will carry, at most.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// A decoded value as the text parameter a statement takes (NULL as `None`).
pub fn text_of(v: &Value) -> Result<Option<String>> {
    Ok(match v {
        Value::Null => None,
        Value::Text(b) => {
            Some(String::from_utf8(b.to_vec()).map_err(|_| anyhow!("a text value is not UTF-8"))?)
        }
        Value::Binary(_) => bail!("binary tuple values are not requested by pgtide"),
        Value::Unchanged => bail!("internal error: an unchanged TOAST value used as a parameter"),
    })
}
