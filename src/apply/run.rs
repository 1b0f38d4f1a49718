//! A run of like changes (one table, one kind, one column set) and the text values it
//! carries: what set batching (`sets.rs`) builds and statement building (`statements.rs`)
//! sends. Kept apart so that each of those two depends on this one and not on the other.

use std::collections::HashMap;

use anyhow::{Result, bail};
use bytes::{Bytes, BytesMut};
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use crate::decode::Value;

/// A text parameter: the bytes the source printed, sent as they are (no copy, no UTF-8
/// check here; the target checks the encoding as it reads them, as for any text it
/// receives). A String per value was a copy and an allocation per column of every change.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TextParam(pub Bytes);

impl TextParam {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl ToSql for TextParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        <&str as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

/// The bytes of a row's text values: what it costs in memory and in the statement.
pub fn value_bytes(values: &[Option<TextParam>]) -> usize {
    values
        .iter()
        .map(|v| v.as_ref().map_or(0, TextParam::len))
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
    pub values: Vec<Vec<Option<TextParam>>>,
    /// Update runs: the row index of each key, so a later update of it replaces the earlier.
    pub(super) by_key: HashMap<Vec<Option<TextParam>>, usize>,
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
pub fn text_of(v: &Value) -> Result<Option<TextParam>> {
    Ok(match v {
        Value::Null => None,
        Value::Text(b) => Some(TextParam(b.clone())),
        Value::Binary(_) => bail!("binary tuple values are not requested by pgtide"),
        Value::Unchanged => bail!("internal error: an unchanged TOAST value used as a parameter"),
    })
}
