//! wal2json format-version 2 (one JSON object per action: B, C, I, U, D, T, M) into the same
//! `Change` model. Numbers are kept as their exact text (serde_json's arbitrary_precision), so
//! nothing passes through a float; a column missing from an update's new image is an
//! unchanged TOAST value. wal2json names tables instead of sending Relation messages, so the
//! decoder assigns each (schema, table, columns) a stable pseudo relation id and emits a
//! `Relation` change the first time it sees it.

use std::collections::HashMap;

use anyhow::{Result, anyhow, bail};
use bytes::Bytes;
use serde_json::Value as Json;

use super::{Change, Column, OldImage, Relation, Value};
use crate::pg::Lsn;

/// What the receive loop needs from one message without decoding the rows.
pub struct Classified {
    pub kind: &'static str,
    pub xid: Option<u32>,
    pub begin_final: Option<Lsn>,
    pub commit_lsn: Option<Lsn>,
    pub commit_end: Option<Lsn>,
}

fn parse(payload: &[u8]) -> Result<Json> {
    serde_json::from_slice(payload).map_err(|e| anyhow!("invalid wal2json message: {e}"))
}

fn lsn_field(obj: &Json, key: &str) -> Option<Lsn> {
    obj.get(key)
        .and_then(|v| v.as_str())
        .and_then(|s| s.parse().ok())
}

fn str_field(obj: &Json, key: &str) -> String {
    obj.get(key)
        .and_then(|s| s.as_str())
        .unwrap_or_default()
        .to_string()
}

fn array_field(obj: &Json, key: &str) -> Vec<Json> {
    obj.get(key)
        .and_then(|c| c.as_array())
        .cloned()
        .unwrap_or_default()
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01), pgoutput's time base.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The commit time (include-timestamp: "2026-11-26 03:44:08.756791+00", in the walsender's
/// TimeZone) as pgoutput gives it, microseconds since 2000-01-01; 0 when absent or unreadable
/// (it only feeds the lag figures and the origin's timestamp).
fn commit_time(obj: &Json) -> i64 {
    obj.get("timestamp")
        .and_then(|t| t.as_str())
        .and_then(parse_timestamptz)
        .map_or(0, |unix_micros| unix_micros - PG_EPOCH_MICROS)
}

/// Unix microseconds of an ISO timestamptz with a numeric offset (`+00`, `-05:30`).
fn parse_timestamptz(text: &str) -> Option<i64> {
    let sign_at = text.rfind(['+', '-']).filter(|i| *i > 10)?;
    let (local, offset) = text.split_at(sign_at);
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let mut parts = offset[1..].split(':');
    let hours: i64 = parts.next()?.parse().ok()?;
    let minutes: i64 = parts.next().map_or(Some(0), |m| m.parse().ok())?;
    let utc = humantime::parse_rfc3339_weak(local).ok()?;
    let micros = utc.duration_since(std::time::UNIX_EPOCH).ok()?.as_micros() as i64;
    Some(micros - sign * (hours * 3600 + minutes * 60) * 1_000_000)
}

fn kind_of(action: &str) -> Result<&'static str> {
    Ok(match action {
        "B" => "begin",
        "C" => "commit",
        "I" => "insert",
        "U" => "update",
        "D" => "delete",
        "T" => "truncate",
        "M" => "message",
        other => bail!("unknown wal2json action \"{other}\""),
    })
}

pub fn classify(payload: &[u8]) -> Result<Classified> {
    let obj = parse(payload)?;
    let action = obj
        .get("action")
        .and_then(|a| a.as_str())
        .ok_or_else(|| anyhow!("wal2json message without action"))?;
    let kind = kind_of(action)?;
    let xid = obj.get("xid").and_then(|x| x.as_u64()).map(|x| x as u32);
    Ok(Classified {
        kind,
        xid,
        begin_final: if kind == "begin" {
            lsn_field(&obj, "lsn")
        } else {
            None
        },
        commit_lsn: if kind == "commit" {
            lsn_field(&obj, "lsn")
        } else {
            None
        },
        commit_end: if kind == "commit" {
            lsn_field(&obj, "nextlsn")
        } else {
            None
        },
    })
}

/// `bytea`'s type OID: wal2json prints its hex form without the leading `\x`.
const BYTEA_OID: u64 = 17;

/// The text form of a JSON value as PostgreSQL would print it: strings as they are (a
/// `bytea` given back its `\x`), numbers as their exact digits (serde_json's
/// arbitrary_precision keeps the text wal2json wrote, `-0` and `1e+308` included), booleans as
/// t/f. A JSON null is NULL: wal2json also prints numeric/real/double precision NaN and
/// ±Infinity as null, which `check` reports before a migration starts.
fn value_text(column: &Json) -> Value {
    let v = column.get("value").unwrap_or(&Json::Null);
    match v {
        Json::Null => Value::Null,
        Json::String(s) if column.get("typeoid").and_then(|t| t.as_u64()) == Some(BYTEA_OID) => {
            Value::Text(Bytes::from(format!("\\x{s}")))
        }
        Json::String(s) => Value::Text(Bytes::from(s.clone())),
        Json::Bool(b) => Value::Text(Bytes::from_static(if *b { b"t" } else { b"f" })),
        Json::Number(n) => Value::Text(Bytes::from(n.to_string())),
        other => Value::Text(Bytes::from(other.to_string())),
    }
}

fn names(cols: &[Json]) -> Vec<String> {
    cols.iter()
        .filter_map(|c| c.get("name").and_then(|n| n.as_str()).map(String::from))
        .collect()
}

/// Stateful decoder: remembers the pseudo relations it announced.
#[derive(Default)]
pub struct Decoder {
    /// Per table: its pseudo relation id and the column list announced with it.
    relations: HashMap<(String, String), (u32, Vec<String>)>,
    next_id: u32,
}

impl Decoder {
    /// Decodes one message; a row change on a new column set yields its Relation first.
    pub fn decode(&mut self, payload: &[u8]) -> Result<Vec<Change>> {
        let obj = parse(payload)?;
        let action = obj
            .get("action")
            .and_then(|a| a.as_str())
            .unwrap_or_default();
        let lsn = lsn_field(&obj, "lsn").unwrap_or_default();
        let xid = obj.get("xid").and_then(|x| x.as_u64()).unwrap_or(0) as u32;
        Ok(match action {
            "B" => vec![Change::Begin {
                final_lsn: lsn,
                commit_time: commit_time(&obj),
                xid,
            }],
            "C" => vec![Change::Commit {
                commit_lsn: lsn,
                end_lsn: lsn_field(&obj, "nextlsn").unwrap_or(lsn),
                commit_time: commit_time(&obj),
            }],
            "M" => vec![Change::Message {
                transactional: obj
                    .get("transactional")
                    .and_then(|t| t.as_bool())
                    .unwrap_or(false),
                lsn,
                prefix: obj
                    .get("prefix")
                    .and_then(|p| p.as_str())
                    .unwrap_or_default()
                    .to_string(),
                content: Bytes::from(
                    obj.get("content")
                        .and_then(|c| c.as_str())
                        .unwrap_or_default()
                        .to_string(),
                ),
            }],
            "I" | "U" | "D" | "T" => self.row_change(action, &obj)?,
            other => bail!("unknown wal2json action \"{other}\""),
        })
    }

    fn row_change(&mut self, action: &str, obj: &Json) -> Result<Vec<Change>> {
        let schema = str_field(obj, "schema");
        let table = str_field(obj, "table");
        let columns = array_field(obj, "columns");
        let identity = array_field(obj, "identity");
        // The relation's column list: the one announced for this table, unless this message
        // names a column it lacks (the table changed): then a new version is announced.
        let described = if columns.is_empty() {
            &identity
        } else {
            &columns
        };
        let message_names = names(described);
        // "pk" (include-pk) lists the primary key in every row message, `[]` without one.
        let key_names = names(&array_field(obj, "pk"));
        let mut out = Vec::new();
        let table_key = (schema.clone(), table.clone());
        let known = self.relations.get(&table_key).cloned();
        let (oid, column_names) = match known {
            Some((oid, known)) if message_names.iter().all(|n| known.contains(n)) => (oid, known),
            _ => {
                self.next_id += 1;
                let oid = self.next_id;
                self.relations
                    .insert(table_key, (oid, message_names.clone()));
                out.push(Change::Relation(Relation {
                    oid,
                    schema: schema.clone(),
                    name: table.clone(),
                    replica_identity: b'd',
                    columns: described
                        .iter()
                        .map(|c| {
                            let name = c
                                .get("name")
                                .and_then(|n| n.as_str())
                                .unwrap_or_default()
                                .to_string();
                            Column {
                                is_key: key_names.contains(&name),
                                name,
                                type_oid: c.get("typeoid").and_then(|t| t.as_u64()).unwrap_or(0)
                                    as u32,
                                type_modifier: -1,
                            }
                        })
                        .collect(),
                }));
                (oid, message_names)
            }
        };
        // The row image over the relation's columns; a column the message leaves out is
        // `missing`.
        let image = |cols: &[Json], missing: Value| -> Vec<Value> {
            column_names
                .iter()
                .map(|name| {
                    cols.iter()
                        .find(|c| c.get("name").and_then(|n| n.as_str()) == Some(name))
                        .map(value_text)
                        .unwrap_or_else(|| missing.clone())
                })
                .collect()
        };
        // The old image. wal2json's "identity" is the primary key (a default replica
        // identity), the columns of a REPLICA IDENTITY USING INDEX index, or the whole old row
        // (FULL). When it holds the primary key, the row is found by that key (unique, and an
        // index lookup); otherwise it is matched as a whole over the columns it carries (the
        // others left out of the match as `Unchanged`), exactly one row, as pgoutput's 'O'
        // images are.
        let identity_names = names(&identity);
        let is_key = !key_names.is_empty() && key_names.iter().all(|k| identity_names.contains(k));
        let old = |identity: &[Json]| -> (OldImage, Vec<Value>) {
            if is_key {
                (OldImage::Key, image(identity, Value::Null))
            } else {
                (OldImage::Full, image(identity, Value::Unchanged))
            }
        };
        out.push(match action {
            "I" => Change::Insert {
                relation: oid,
                new: image(&columns, Value::Unchanged),
            },
            "U" => {
                let new = image(&columns, Value::Unchanged);
                // wal2json prints an identity taken from the new row when the key did not
                // change: that is pgoutput's update without an old key.
                let old =
                    (!identity.is_empty())
                        .then(|| old(&identity))
                        .filter(|(kind, values)| {
                            !(*kind == OldImage::Key
                                && column_names.iter().enumerate().all(|(i, name)| {
                                    !key_names.contains(name) || values[i] == new[i]
                                }))
                        });
                Change::Update {
                    relation: oid,
                    old,
                    new,
                }
            }
            "D" => Change::Delete {
                relation: oid,
                old: old(&identity),
            },
            _ => Change::Truncate {
                relations: vec![oid],
                cascade: false,
                restart_identity: false,
            },
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_times_are_pgoutput_micros() {
        assert_eq!(
            parse_timestamptz("2000-01-01 00:00:00+00"),
            Some(PG_EPOCH_MICROS)
        );
        assert_eq!(
            parse_timestamptz("2000-01-01 05:30:00.25+05:30"),
            Some(PG_EPOCH_MICROS + 250_000)
        );
        assert_eq!(
            parse_timestamptz("1999-12-31 23:00:00-01"),
            Some(PG_EPOCH_MICROS)
        );
        assert_eq!(commit_time(&serde_json::json!({"action": "C"})), 0);
    }

    #[test]
    fn numbers_keep_their_exact_text_and_missing_columns_are_unchanged() {
        let mut d = Decoder::default();
        let changes = d
            .decode(br#"{"action":"U","xid":7,"schema":"public","table":"t","columns":[{"name":"id","type":"integer","value":1},{"name":"n","type":"numeric","value":123456789012345678901234567890.123456789012345678901234567890}],"identity":[{"name":"id","type":"integer","value":1}],"pk":[{"name":"id","type":"integer"}]}"#)
            .unwrap();
        assert!(
            matches!(&changes[0], Change::Relation(r) if r.columns.len() == 2 && r.columns[0].is_key)
        );
        match &changes[1] {
            Change::Update { new, old, .. } => {
                assert_eq!(
                    new[1],
                    Value::Text(Bytes::from_static(
                        b"123456789012345678901234567890.123456789012345678901234567890"
                    ))
                );
                assert_eq!(*old, None, "the key did not change");
            }
            other => panic!("{other:?}"),
        }
        // The same table with a column missing from the new image: an unchanged TOAST value.
        let changes = d
            .decode(br#"{"action":"U","xid":7,"schema":"public","table":"t","columns":[{"name":"id","type":"integer","value":2}],"identity":[{"name":"id","type":"integer","value":1}],"pk":[{"name":"id","type":"integer"}]}"#)
            .unwrap();
        assert_eq!(changes.len(), 1);
        match &changes[0] {
            Change::Update { new, old, .. } => {
                assert_eq!(new[1], Value::Unchanged);
                let (image, old) = old.as_ref().unwrap();
                assert_eq!(*image, OldImage::Key, "the key changed from 1 to 2");
                assert_eq!(old[0], Value::Text(Bytes::from_static(b"1")));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_full_identity_holding_the_primary_key_is_found_by_the_key() {
        let mut d = Decoder::default();
        let changes = d
            .decode(br#"{"action":"D","schema":"public","table":"f","identity":[{"name":"id","typeoid":23,"value":3},{"name":"b","typeoid":17,"value":"00ff"}],"pk":[{"name":"id","typeoid":23}]}"#)
            .unwrap();
        match &changes[1] {
            Change::Delete {
                old: (OldImage::Key, old),
                ..
            } => {
                assert_eq!(old[0], Value::Text(Bytes::from_static(b"3")));
                assert_eq!(old[1], Value::Text(Bytes::from_static(b"\\x00ff")));
            }
            other => panic!("{other:?}"),
        }
        // Without a primary key the same identity is matched whole.
        let changes = d
            .decode(br#"{"action":"D","schema":"public","table":"g","identity":[{"name":"id","typeoid":23,"value":3}],"pk":[]}"#)
            .unwrap();
        assert!(matches!(
            &changes[1],
            Change::Delete {
                old: (OldImage::Full, _),
                ..
            }
        ));
    }
}
