//! Decoders of the change stream into one `Change` model that apply consumes. Values stay in
//! PostgreSQL's text (or binary) representation, byte for byte (invariant 5): nothing is parsed
//! into a float or a number, and an unchanged TOAST value is a distinct `Unchanged`, never NULL.

pub mod pgoutput;
pub mod wal2json;

#[cfg(test)]
mod golden_tests;

use bytes::Bytes;
use serde_json::{Map, Value as Json, json};

use crate::pg::Lsn;

/// The decoder of the work dir's plugin: apply and `spool show` read a pgoutput or a
/// wal2json spool through the same `Change` model.
pub enum StreamDecoder {
    Pgoutput(pgoutput::Decoder),
    Wal2json(wal2json::Decoder),
}

impl StreamDecoder {
    pub fn new(plugin: crate::replication::Plugin) -> Self {
        match plugin {
            crate::replication::Plugin::Pgoutput => Self::Pgoutput(Default::default()),
            crate::replication::Plugin::Wal2json => Self::Wal2json(Default::default()),
        }
    }

    /// Decodes one spooled message: one change for pgoutput; for wal2json a row change on a
    /// table (or column set) not seen before comes after the `Relation` it implies.
    pub fn decode(&mut self, payload: Bytes) -> anyhow::Result<Vec<Change>> {
        match self {
            Self::Pgoutput(d) => Ok(vec![d.decode(payload)?]),
            Self::Wal2json(d) => d.decode(&payload),
        }
    }
}

/// One column value of a row image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Null,
    /// An unchanged TOASTed value the server did not send: leave the column as it is.
    Unchanged,
    Text(Bytes),
    Binary(Bytes),
}

/// Which old row image an update or delete carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldImage {
    /// 'K': the replica identity key columns only.
    Key,
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// A column of a relation as the stream describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// A relation (table) description, sent before the first change to it and again after it
/// changed: apply compares it with the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// 'd' default, 'n' nothing, 'f' full, 'i' index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

impl Relation {
    /// Checks that a row change of this relation carries one value per column: apply indexes
    /// the relation's columns by the tuple's positions, so a tuple of another width (a
    /// corrupt spool, a decoder bug, a relation message missed) stops here, naming the table,
    /// instead of writing values into the wrong columns or panicking.
    pub fn check_width(&self, change: &Change) -> anyhow::Result<()> {
        let tuples: Vec<(&str, usize)> = match change {
            Change::Insert { new, .. } => vec![("new", new.len())],
            Change::Update { old, new, .. } => old
                .iter()
                .map(|(_, o)| ("old", o.len()))
                .chain([("new", new.len())])
                .collect(),
            Change::Delete { old, .. } => vec![("old", old.1.len())],
            _ => Vec::new(),
        };
        let expected = self.columns.len();
        match tuples.iter().find(|(_, n)| *n != expected) {
            None => Ok(()),
            Some((which, n)) => Err(anyhow::Error::new(crate::errors::Fatal(format!(
                "the stream's {} of {}.{} (relation {}) carries {n} values in its {which} row, but the table's relation message describes {expected} columns. The change cannot be matched with the columns, so apply stops; nothing of this transaction was applied. Check the spool with `pgtide spool show` and report it with the source's version and plugin",
                change.kind(),
                self.schema,
                self.name,
                self.oid
            )))),
        }
    }
}

/// One decoded message of the stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Begin {
        final_lsn: Lsn,
        commit_time: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: i64,
    },
    Origin {
        lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        schema: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Vec<Value>,
    },
    Update {
        relation: u32,
        old: Option<(OldImage, Vec<Value>)>,
        new: Vec<Value>,
    },
    Delete {
        relation: u32,
        old: (OldImage, Vec<Value>),
    },
    Truncate {
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
    StreamStart {
        xid: u32,
        first_segment: bool,
    },
    StreamStop,
    StreamCommit {
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: i64,
    },
    StreamAbort {
        xid: u32,
        subxid: u32,
    },
    BeginPrepare {
        prepare_lsn: Lsn,
        end_lsn: Lsn,
        prepare_time: i64,
        xid: u32,
        gid: String,
    },
    Prepare {
        prepare_lsn: Lsn,
        end_lsn: Lsn,
        prepare_time: i64,
        xid: u32,
        gid: String,
    },
    CommitPrepared {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: i64,
        xid: u32,
        gid: String,
    },
    RollbackPrepared {
        prepare_end_lsn: Lsn,
        rollback_end_lsn: Lsn,
        xid: u32,
        gid: String,
    },
}

impl Change {
    /// The relation a row change is for (None for everything else, truncate included).
    pub fn relation(&self) -> Option<u32> {
        match self {
            Change::Insert { relation, .. }
            | Change::Update { relation, .. }
            | Change::Delete { relation, .. } => Some(*relation),
            _ => None,
        }
    }

    /// The `kind` name used by `spool show` and the spool index.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Begin { .. } => "begin",
            Change::Commit { .. } => "commit",
            Change::Origin { .. } => "origin",
            Change::Relation(_) => "relation",
            Change::Type { .. } => "type",
            Change::Insert { .. } => "insert",
            Change::Update { .. } => "update",
            Change::Delete { .. } => "delete",
            Change::Truncate { .. } => "truncate",
            Change::Message { .. } => "message",
            Change::StreamStart { .. } => "stream_start",
            Change::StreamStop => "stream_stop",
            Change::StreamCommit { .. } => "stream_commit",
            Change::StreamAbort { .. } => "stream_abort",
            Change::BeginPrepare { .. } => "begin_prepare",
            Change::Prepare { .. } => "prepare",
            Change::CommitPrepared { .. } => "commit_prepared",
            Change::RollbackPrepared { .. } => "rollback_prepared",
        }
    }
}

fn value_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Unchanged => json!({"unchanged_toast": true}),
        Value::Text(b) => Json::String(String::from_utf8_lossy(b).into_owned()),
        Value::Binary(b) => {
            json!({"binary_hex": b.iter().map(|x| format!("{x:02x}")).collect::<String>()})
        }
    }
}

fn row_json(relation: Option<&Relation>, values: &[Value], only_keys: bool) -> Json {
    let mut map = Map::new();
    for (i, v) in values.iter().enumerate() {
        let column = relation.and_then(|r| r.columns.get(i));
        if only_keys && !column.is_some_and(|c| c.is_key) && matches!(v, Value::Null) {
            continue;
        }
        let name = column
            .map(|c| c.name.clone())
            .unwrap_or_else(|| format!("${}", i + 1));
        map.insert(name, value_json(v));
    }
    Json::Object(map)
}

/// The JSON line `spool show` prints for one change: `lsn`, `xid`, `kind`, and for row
/// changes `schema`, `table`, `new` values and the `old` key or row.
pub fn change_json(
    lsn: Lsn,
    xid: Option<u32>,
    change: &Change,
    relation_of: &dyn Fn(u32) -> Option<Relation>,
) -> Json {
    let mut obj = json!({ "lsn": lsn.to_string(), "xid": xid, "kind": change.kind() });
    let add_table = |obj: &mut Json, rel: &Option<Relation>, oid: u32| {
        obj["relation_oid"] = json!(oid);
        if let Some(r) = rel {
            obj["schema"] = json!(r.schema);
            obj["table"] = json!(r.name);
        }
    };
    match change {
        Change::Begin {
            final_lsn,
            commit_time,
            ..
        } => {
            obj["final_lsn"] = json!(final_lsn.to_string());
            obj["commit_time_us"] = json!(commit_time);
        }
        Change::Commit {
            commit_lsn,
            end_lsn,
            commit_time,
        } => {
            obj["commit_lsn"] = json!(commit_lsn.to_string());
            obj["end_lsn"] = json!(end_lsn.to_string());
            obj["commit_time_us"] = json!(commit_time);
        }
        Change::Relation(r) => {
            obj["relation_oid"] = json!(r.oid);
            obj["schema"] = json!(r.schema);
            obj["table"] = json!(r.name);
            obj["replica_identity"] = json!((r.replica_identity as char).to_string());
            obj["columns"] = json!(r.columns.iter().map(|c| json!({"name": c.name, "type_oid": c.type_oid, "type_modifier": c.type_modifier, "key": c.is_key})).collect::<Vec<_>>());
        }
        Change::Insert { relation, new } => {
            let rel = relation_of(*relation);
            add_table(&mut obj, &rel, *relation);
            obj["new"] = row_json(rel.as_ref(), new, false);
        }
        Change::Update { relation, old, new } => {
            let rel = relation_of(*relation);
            add_table(&mut obj, &rel, *relation);
            obj["new"] = row_json(rel.as_ref(), new, false);
            if let Some((image, values)) = old {
                obj["old"] = row_json(rel.as_ref(), values, *image == OldImage::Key);
                obj["old_image"] = json!(if *image == OldImage::Key {
                    "key"
                } else {
                    "full"
                });
            }
        }
        Change::Delete {
            relation,
            old: (image, values),
        } => {
            let rel = relation_of(*relation);
            add_table(&mut obj, &rel, *relation);
            obj["old"] = row_json(rel.as_ref(), values, *image == OldImage::Key);
            obj["old_image"] = json!(if *image == OldImage::Key {
                "key"
            } else {
                "full"
            });
        }
        Change::Truncate {
            relations,
            cascade,
            restart_identity,
        } => {
            obj["tables"] = json!(
                relations
                    .iter()
                    .map(|oid| relation_of(*oid)
                        .map(|r| format!("{}.{}", r.schema, r.name))
                        .unwrap_or_else(|| oid.to_string()))
                    .collect::<Vec<_>>()
            );
            obj["cascade"] = json!(cascade);
            obj["restart_identity"] = json!(restart_identity);
        }
        Change::Message {
            transactional,
            prefix,
            content,
            ..
        } => {
            obj["transactional"] = json!(transactional);
            obj["prefix"] = json!(prefix);
            obj["content"] = json!(String::from_utf8_lossy(content));
        }
        Change::Origin { name, .. } => obj["origin"] = json!(name),
        Change::Type { oid, schema, name } => {
            obj["type_oid"] = json!(oid);
            obj["schema"] = json!(schema);
            obj["name"] = json!(name);
        }
        _ => {}
    }
    obj
}
