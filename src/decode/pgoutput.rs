//! The pgoutput logical replication protocol (versions 1–4) into `Change`s.
//!
//! Layouts are described message by message in proto/README.md; the golden files in proto/
//! (captured from a real server) are what the tests decode. Inside a streamed transaction
//! (between Stream Start and Stream Stop) data messages carry an extra xid prefix, so the
//! decoder keeps that one bit of state.

use anyhow::{Result, anyhow, bail};
use bytes::{Buf, Bytes};

use super::{Change, Column, OldImage, Relation, Value};
use crate::pg::Lsn;

/// The kind of a row change message (insert, update, delete) from its tag alone, without
/// reading its tuple: `None` for every other message. Row changes never change a decoder's
/// state, so a reader that only needs their kind may skip `Decoder::decode`.
pub fn row_change_kind(message: &[u8]) -> Option<&'static str> {
    match message.first() {
        Some(b'I') => Some("insert"),
        Some(b'U') => Some("update"),
        Some(b'D') => Some("delete"),
        _ => None,
    }
}

/// Stateful decoder: knows whether it is inside a streamed block.
#[derive(Default)]
pub struct Decoder {
    in_stream: bool,
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize, what: &str) -> Result<()> {
        if self.buf.remaining() < n {
            bail!("pgoutput message truncated while reading {what}");
        }
        Ok(())
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }
    fn i16(&mut self, what: &str) -> Result<i16> {
        self.need(2, what)?;
        Ok(self.buf.get_i16())
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }
    fn i32(&mut self, what: &str) -> Result<i32> {
        self.need(4, what)?;
        Ok(self.buf.get_i32())
    }
    fn i64(&mut self, what: &str) -> Result<i64> {
        self.need(8, what)?;
        Ok(self.buf.get_i64())
    }
    fn lsn(&mut self, what: &str) -> Result<Lsn> {
        self.need(8, what)?;
        Ok(Lsn(self.buf.get_u64()))
    }
    fn cstring(&mut self, what: &str) -> Result<String> {
        let end = self
            .buf
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| anyhow!("pgoutput {what} is not NUL-terminated"))?;
        let s = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.advance(end + 1);
        Ok(s)
    }
    fn bytes(&mut self, n: usize, what: &str) -> Result<Bytes> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }
    fn tuple(&mut self) -> Result<Vec<Value>> {
        let n = self.i16("column count")?;
        let mut values = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            values.push(match self.u8("column kind")? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.i32("value length")?;
                    Value::Text(self.bytes(len.max(0) as usize, "text value")?)
                }
                b'b' => {
                    let len = self.i32("value length")?;
                    Value::Binary(self.bytes(len.max(0) as usize, "binary value")?)
                }
                other => bail!("unknown pgoutput column kind {:?}", other as char),
            });
        }
        Ok(values)
    }
}

impl Decoder {
    /// Decodes one pgoutput message (the payload of one XLogData).
    pub fn decode(&mut self, message: Bytes) -> Result<Change> {
        let mut r = Reader { buf: message };
        let tag = r.u8("message type")?;
        let streamed_xid = |r: &mut Reader, in_stream: bool| -> Result<()> {
            if in_stream {
                r.u32("streamed xid")?;
            }
            Ok(())
        };
        Ok(match tag {
            b'B' => Change::Begin {
                final_lsn: r.lsn("final lsn")?,
                commit_time: r.i64("commit time")?,
                xid: r.u32("xid")?,
            },
            b'C' => {
                r.u8("flags")?;
                Change::Commit {
                    commit_lsn: r.lsn("commit lsn")?,
                    end_lsn: r.lsn("end lsn")?,
                    commit_time: r.i64("commit time")?,
                }
            }
            b'O' => Change::Origin {
                lsn: r.lsn("origin lsn")?,
                name: r.cstring("origin name")?,
            },
            b'R' => {
                streamed_xid(&mut r, self.in_stream)?;
                let oid = r.u32("relation oid")?;
                let schema = r.cstring("namespace")?;
                let name = r.cstring("relation name")?;
                let replica_identity = r.u8("replica identity")?;
                let n = r.i16("column count")?;
                let mut columns = Vec::with_capacity(n.max(0) as usize);
                for _ in 0..n {
                    let flags = r.u8("column flags")?;
                    columns.push(Column {
                        is_key: flags & 1 == 1,
                        name: r.cstring("column name")?,
                        type_oid: r.u32("column type")?,
                        type_modifier: r.i32("column type modifier")?,
                    });
                }
                Change::Relation(Relation {
                    oid,
                    schema,
                    name,
                    replica_identity,
                    columns,
                })
            }
            b'Y' => {
                streamed_xid(&mut r, self.in_stream)?;
                Change::Type {
                    oid: r.u32("type oid")?,
                    schema: r.cstring("type namespace")?,
                    name: r.cstring("type name")?,
                }
            }
            b'I' => {
                streamed_xid(&mut r, self.in_stream)?;
                let relation = r.u32("relation oid")?;
                match r.u8("tuple marker")? {
                    b'N' => {}
                    other => bail!("insert without a new tuple (marker {:?})", other as char),
                }
                Change::Insert {
                    relation,
                    new: r.tuple()?,
                }
            }
            b'U' => {
                streamed_xid(&mut r, self.in_stream)?;
                let relation = r.u32("relation oid")?;
                let mut old = None;
                let mut marker = r.u8("tuple marker")?;
                if marker == b'K' || marker == b'O' {
                    let image = if marker == b'K' {
                        OldImage::Key
                    } else {
                        OldImage::Full
                    };
                    old = Some((image, r.tuple()?));
                    marker = r.u8("tuple marker")?;
                }
                if marker != b'N' {
                    bail!("update without a new tuple (marker {:?})", marker as char);
                }
                Change::Update {
                    relation,
                    old,
                    new: r.tuple()?,
                }
            }
            b'D' => {
                streamed_xid(&mut r, self.in_stream)?;
                let relation = r.u32("relation oid")?;
                let image = match r.u8("tuple marker")? {
                    b'K' => OldImage::Key,
                    b'O' => OldImage::Full,
                    other => bail!("delete without an old tuple (marker {:?})", other as char),
                };
                Change::Delete {
                    relation,
                    old: (image, r.tuple()?),
                }
            }
            b'T' => {
                streamed_xid(&mut r, self.in_stream)?;
                let n = r.u32("relation count")?;
                let options = r.u8("truncate options")?;
                let mut relations = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    relations.push(r.u32("relation oid")?);
                }
                Change::Truncate {
                    relations,
                    cascade: options & 1 != 0,
                    restart_identity: options & 2 != 0,
                }
            }
            b'M' => {
                streamed_xid(&mut r, self.in_stream)?;
                let flags = r.u8("message flags")?;
                let lsn = r.lsn("message lsn")?;
                let prefix = r.cstring("message prefix")?;
                let len = r.u32("message length")?;
                Change::Message {
                    transactional: flags & 1 != 0,
                    lsn,
                    prefix,
                    content: r.bytes(len as usize, "message content")?,
                }
            }
            b'S' => {
                self.in_stream = true;
                Change::StreamStart {
                    xid: r.u32("xid")?,
                    first_segment: r.u8("first segment")? == 1,
                }
            }
            b'E' => {
                self.in_stream = false;
                Change::StreamStop
            }
            b'c' => {
                let xid = r.u32("xid")?;
                r.u8("flags")?;
                Change::StreamCommit {
                    xid,
                    commit_lsn: r.lsn("commit lsn")?,
                    end_lsn: r.lsn("end lsn")?,
                    commit_time: r.i64("commit time")?,
                }
            }
            b'A' => Change::StreamAbort {
                xid: r.u32("xid")?,
                subxid: r.u32("subxid")?,
            },
            b'b' => Change::BeginPrepare {
                prepare_lsn: r.lsn("prepare lsn")?,
                end_lsn: r.lsn("end lsn")?,
                prepare_time: r.i64("prepare time")?,
                xid: r.u32("xid")?,
                gid: r.cstring("gid")?,
            },
            b'P' | b'p' => {
                r.u8("flags")?;
                Change::Prepare {
                    prepare_lsn: r.lsn("prepare lsn")?,
                    end_lsn: r.lsn("end lsn")?,
                    prepare_time: r.i64("prepare time")?,
                    xid: r.u32("xid")?,
                    gid: r.cstring("gid")?,
                }
            }
            b'K' => {
                r.u8("flags")?;
                Change::CommitPrepared {
                    commit_lsn: r.lsn("commit lsn")?,
                    end_lsn: r.lsn("end lsn")?,
                    commit_time: r.i64("commit time")?,
                    xid: r.u32("xid")?,
                    gid: r.cstring("gid")?,
                }
            }
            b'r' => {
                r.u8("flags")?;
                let prepare_end_lsn = r.lsn("prepare end lsn")?;
                let rollback_end_lsn = r.lsn("rollback end lsn")?;
                r.i64("prepare time")?;
                r.i64("rollback time")?;
                Change::RollbackPrepared {
                    prepare_end_lsn,
                    rollback_end_lsn,
                    xid: r.u32("xid")?,
                    gid: r.cstring("gid")?,
                }
            }
            other => bail!("unknown pgoutput message type {:?}", other as char),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn tuple(buf: &mut Vec<u8>, values: &[Option<&str>]) {
        buf.put_i16(values.len() as i16);
        for v in values {
            match v {
                None => buf.put_u8(b'n'),
                Some("\u{0}unchanged") => buf.put_u8(b'u'),
                Some(s) => {
                    buf.put_u8(b't');
                    buf.put_i32(s.len() as i32);
                    buf.put_slice(s.as_bytes());
                }
            }
        }
    }

    #[test]
    fn update_with_key_and_unchanged_toast() {
        let mut m = vec![b'U'];
        m.put_u32(16384);
        m.put_u8(b'K');
        tuple(&mut m, &[Some("1"), None]);
        m.put_u8(b'N');
        tuple(&mut m, &[Some("2"), Some("\u{0}unchanged")]);
        let change = Decoder::default().decode(Bytes::from(m)).unwrap();
        assert_eq!(
            change,
            Change::Update {
                relation: 16384,
                old: Some((
                    OldImage::Key,
                    vec![Value::Text(Bytes::from_static(b"1")), Value::Null]
                )),
                new: vec![Value::Text(Bytes::from_static(b"2")), Value::Unchanged],
            }
        );
    }

    #[test]
    fn streamed_messages_carry_an_xid() {
        let mut d = Decoder::default();
        let mut start = vec![b'S'];
        start.put_u32(77);
        start.put_u8(1);
        assert_eq!(
            d.decode(Bytes::from(start)).unwrap(),
            Change::StreamStart {
                xid: 77,
                first_segment: true
            }
        );
        let mut ins = vec![b'I'];
        ins.put_u32(77);
        ins.put_u32(16384);
        ins.put_u8(b'N');
        tuple(&mut ins, &[Some("x")]);
        assert_eq!(
            d.decode(Bytes::from(ins)).unwrap(),
            Change::Insert {
                relation: 16384,
                new: vec![Value::Text(Bytes::from_static(b"x"))]
            }
        );
        assert_eq!(
            d.decode(Bytes::from_static(b"E")).unwrap(),
            Change::StreamStop
        );
    }

    /// A tuple of another width than its relation's stops with the table named, never an
    /// index out of bounds in apply.
    #[test]
    fn a_tuple_wider_or_narrower_than_its_relation_is_refused() {
        let mut d = Decoder::default();
        let mut rel = vec![b'R'];
        rel.put_u32(16384);
        rel.put_slice(b"public\0items\0");
        rel.put_u8(b'd');
        rel.put_i16(2);
        for name in ["id", "v"] {
            rel.put_u8(u8::from(name == "id"));
            rel.put_slice(name.as_bytes());
            rel.put_u8(0);
            rel.put_u32(23);
            rel.put_i32(-1);
        }
        let Change::Relation(relation) = d.decode(Bytes::from(rel)).unwrap() else {
            panic!("not a relation");
        };
        let insert = |values: &[Option<&str>]| {
            let mut m = vec![b'I'];
            m.put_u32(16384);
            m.put_u8(b'N');
            tuple(&mut m, values);
            Decoder::default().decode(Bytes::from(m)).unwrap()
        };
        assert!(
            relation
                .check_width(&insert(&[Some("1"), Some("x")]))
                .is_ok()
        );
        for values in [&[Some("1")][..], &[Some("1"), Some("x"), None][..]] {
            let e = relation.check_width(&insert(values)).unwrap_err();
            let text = format!("{e:#}");
            assert!(
                text.contains("public.items") && text.contains("describes 2 columns"),
                "{text}"
            );
            assert_eq!(crate::errors::classify(&e), crate::errors::ErrorClass::Stop);
        }
        let mut del = vec![b'D'];
        del.put_u32(16384);
        del.put_u8(b'K');
        tuple(&mut del, &[Some("1")]);
        let delete = Decoder::default().decode(Bytes::from(del)).unwrap();
        assert!(relation.check_width(&delete).is_err());
    }

    #[test]
    fn truncated_messages_are_errors() {
        assert!(
            Decoder::default()
                .decode(Bytes::from_static(b"B\x00\x00"))
                .is_err()
        );
        assert!(Decoder::default().decode(Bytes::from_static(b"Z")).is_err());
    }
}
