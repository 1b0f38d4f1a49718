//! Decoder tests on the golden streams in proto/, captured from a real server by
//! proto/capture.sh (workload: proto/workload.sql). No server is needed to run them.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;

use super::{Change, OldImage, Value, pgoutput, wal2json};

fn golden(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("proto")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn hex(s: &str) -> Bytes {
    Bytes::from(
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect::<Vec<_>>(),
    )
}

fn decode_pgoutput(name: &str) -> Vec<Change> {
    let mut decoder = pgoutput::Decoder::default();
    golden(name)
        .lines()
        .map(|line| {
            let payload = line.split(' ').nth(2).unwrap();
            decoder
                .decode(hex(payload))
                .unwrap_or_else(|e| panic!("{name}: cannot decode {line}: {e:#}"))
        })
        .collect()
}

fn counts(changes: &[Change]) -> HashMap<&'static str, usize> {
    let mut m = HashMap::new();
    for c in changes {
        *m.entry(c.kind()).or_default() += 1;
    }
    m
}

fn text(v: &Value) -> &str {
    match v {
        Value::Text(b) => std::str::from_utf8(b).unwrap(),
        other => panic!("expected a text value, got {other:?}"),
    }
}

/// What the server version changes in pgoutput v1 for the capture workload.
struct V1Expect {
    /// Committed transactions sent: before 15 pgoutput also sends the empty ones (the
    /// transactional message's, the origin's creation).
    transactions: usize,
    /// Logical messages exist in pgoutput from 14 (the `messages` option).
    messages: bool,
}

#[test]
fn pgoutput_v1_golden_stream() {
    check_pgoutput_v1(
        "pgoutput-v1.hex",
        V1Expect {
            transactions: 14,
            messages: true,
        },
    );
}

/// PostgreSQL 12: no logical messages, empty transactions sent; the transactional message's
/// Begin still arrives, which is what the endpos marker relies on there.
#[test]
fn pgoutput_v1_golden_stream_from_12() {
    check_pgoutput_v1(
        "pgoutput-v1-pg12.hex",
        V1Expect {
            transactions: 15,
            messages: false,
        },
    );
}

#[test]
fn pgoutput_v1_golden_stream_from_18() {
    check_pgoutput_v1(
        "pgoutput-v1-pg18.hex",
        V1Expect {
            transactions: 14,
            messages: true,
        },
    );
}

fn check_pgoutput_v1(file: &str, expect: V1Expect) {
    let changes = decode_pgoutput(file);
    let n = counts(&changes);
    assert_eq!(n["begin"], n["commit"]);
    assert_eq!(
        n["begin"], expect.transactions,
        "one per committed transaction of the workload"
    );
    assert_eq!(n["type"], 1, "the enum type is described once");
    assert_eq!(n["origin"], 1);
    assert_eq!(
        n.get("message").copied().unwrap_or(0),
        if expect.messages { 2 } else { 0 }
    );
    assert_eq!(n["truncate"], 1);
    assert_eq!(n["update"], 3);
    assert_eq!(n["delete"], 2);
    assert_eq!(n["insert"], 2 + 1 + 1 + 1 + 1 + 1 + 2901);
    assert!(!changes.iter().any(|c| matches!(c, Change::Insert { new, .. } if new.get(1).is_some_and(|v| *v == Value::Text(Bytes::from_static(b"never"))))));

    let type_change = changes.iter().find_map(|c| match c {
        Change::Type { name, .. } => Some(name.clone()),
        _ => None,
    });
    assert_eq!(type_change.as_deref(), Some("mood"));
    let items = changes
        .iter()
        .find_map(|c| match c {
            Change::Relation(r) if r.name == "items" => Some(r.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        items
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["id", "name", "big", "price", "m"]
    );
    assert!(items.columns[0].is_key && !items.columns[1].is_key);

    let inserts: Vec<&Vec<Value>> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Insert { new, .. } => Some(new),
            _ => None,
        })
        .collect();
    assert_eq!(
        text(&inserts[0][2]).len(),
        400 * 32,
        "the TOASTed value arrives whole"
    );
    assert_eq!(text(&inserts[0][3]), "1.50", "numeric keeps its exact text");
    assert_eq!(text(&inserts[1][3]), "NaN");
    assert_eq!(inserts[1][2], Value::Null);

    let updates: Vec<&Change> = changes
        .iter()
        .filter(|c| matches!(c, Change::Update { .. }))
        .collect();
    match updates[0] {
        Change::Update { old: None, new, .. } => {
            assert_eq!(text(&new[1]), "first!");
            assert_eq!(
                new[2],
                Value::Unchanged,
                "an untouched TOAST column is 'u', not NULL"
            );
        }
        other => panic!("{other:?}"),
    }
    match updates[1] {
        Change::Update {
            old: Some((OldImage::Key, old)),
            new,
            ..
        } => {
            assert_eq!(text(&old[0]), "2");
            assert_eq!(text(&new[0]), "20");
        }
        other => panic!("{other:?}"),
    }
    match updates[2] {
        Change::Update {
            old: Some((OldImage::Full, old)),
            ..
        } => assert_eq!(text(&old[1]), "a"),
        other => panic!("REPLICA IDENTITY FULL sends the old row: {other:?}"),
    }
    let deletes: Vec<&Change> = changes
        .iter()
        .filter(|c| matches!(c, Change::Delete { .. }))
        .collect();
    assert!(
        matches!(deletes[0], Change::Delete { old: (OldImage::Key, old), .. } if text(&old[0]) == "20")
    );
    assert!(
        matches!(deletes[1], Change::Delete { old: (OldImage::Full, old), .. } if text(&old[1]) == "b")
    );

    let truncate = changes
        .iter()
        .find(|c| matches!(c, Change::Truncate { .. }))
        .unwrap();
    assert!(
        matches!(truncate, Change::Truncate { relations, cascade: true, restart_identity: true } if relations.len() == 3)
    );
    let messages: Vec<(bool, String)> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Message {
                transactional,
                content,
                ..
            } => Some((
                *transactional,
                String::from_utf8_lossy(content).into_owned(),
            )),
            _ => None,
        })
        .collect();
    let expected_messages = if expect.messages {
        vec![
            (true, "in a transaction".to_string()),
            (false, "outside any transaction".to_string()),
        ]
    } else {
        Vec::new()
    };
    assert_eq!(messages, expected_messages);
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, Change::Origin { name, .. } if name == "pgtide_capture"))
    );

    // Commits are in increasing LSN order and each closes the transaction its Begin opened.
    let mut last = 0;
    let mut open = false;
    for c in &changes {
        match c {
            Change::Begin { .. } => {
                assert!(!open);
                open = true;
            }
            Change::Commit { end_lsn, .. } => {
                assert!(open && end_lsn.0 > last);
                last = end_lsn.0;
                open = false;
            }
            _ => {}
        }
    }
}

#[test]
fn pgoutput_v2_streamed_transactions() {
    let changes = decode_pgoutput("pgoutput-v2-stream.hex");
    let n = counts(&changes);
    assert!(
        n["stream_start"] >= 2,
        "large transactions were streamed in chunks"
    );
    assert_eq!(n["stream_start"], n["stream_stop"]);
    assert_eq!(n["stream_commit"], 1, "the bulk insert commits");
    assert_eq!(n["stream_abort"], 1, "the aborted bulk insert aborts");
    // Rows inside streamed chunks (with their xid prefix) decode to the right values.
    let streamed_ids: Vec<i64> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Insert { new, .. } => text(&new[0]).parse().ok(),
            _ => None,
        })
        .filter(|id| *id >= 100)
        .collect();
    assert_eq!(
        streamed_ids
            .iter()
            .filter(|id| (100..=3000).contains(*id))
            .count(),
        2901
    );
    // Of the aborted transaction only the chunks streamed before the abort are sent.
    let aborted = streamed_ids
        .iter()
        .filter(|id| (5000..=8000).contains(*id))
        .count();
    assert!(
        aborted > 0 && aborted <= 3001,
        "{aborted} aborted rows streamed"
    );
}

#[test]
fn wal2json_v2_golden_stream() {
    let mut decoder = wal2json::Decoder::default();
    let mut changes = Vec::new();
    for line in golden("wal2json-v2.jsonl").lines() {
        changes.extend(
            decoder
                .decode(line.as_bytes())
                .unwrap_or_else(|e| panic!("cannot decode {line}: {e:#}")),
        );
    }
    let n = counts(&changes);
    assert_eq!(n["begin"], n["commit"]);
    assert_eq!(n["message"], 2);
    assert_eq!(n["truncate"], 3, "wal2json sends one T per table");
    assert_eq!(n["insert"], 2 + 1 + 1 + 1 + 1 + 1 + 2901);
    let inserts: Vec<&Vec<Value>> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Insert { new, .. } => Some(new),
            _ => None,
        })
        .collect();
    assert_eq!(text(&inserts[0][2]).len(), 400 * 32);
    assert_eq!(
        text(&inserts[0][3]),
        "1.50",
        "numbers keep their exact text"
    );
    match changes
        .iter()
        .find(|c| matches!(c, Change::Update { .. }))
        .unwrap()
    {
        Change::Update { new, old, .. } => {
            assert_eq!(text(&new[1]), "first!");
            assert_eq!(
                new[2],
                Value::Unchanged,
                "a column missing from wal2json's new image is unchanged TOAST"
            );
            assert_eq!(
                *old, None,
                "an identity taken from the new row (key unchanged) is no old key"
            );
        }
        other => panic!("{other:?}"),
    }
}

fn decode_wal2json(name: &str) -> Vec<Change> {
    let mut decoder = wal2json::Decoder::default();
    let mut changes = Vec::new();
    for line in golden(name).lines() {
        changes.extend(
            decoder
                .decode(line.as_bytes())
                .unwrap_or_else(|e| panic!("cannot decode {line}: {e:#}")),
        );
    }
    changes
}

/// The rows of one table's inserts, by the relation the decoder announced for it.
fn inserts_of<'a>(changes: &'a [Change], table: &str) -> Vec<&'a Vec<Value>> {
    let mut oids = Vec::new();
    let mut rows = Vec::new();
    for c in changes {
        match c {
            Change::Relation(r) if r.name == table => oids.push(r.oid),
            Change::Insert { relation, new } if oids.contains(relation) => rows.push(new),
            _ => {}
        }
    }
    rows
}

/// How wal2json format-version 2 prints each type (proto/wal2json-types.sql, captured by
/// proto/capture-wal2json-types.sh) and what the decoder makes of it: the exact text
/// PostgreSQL prints.
#[test]
fn wal2json_types_golden_stream() {
    let changes = decode_wal2json("wal2json-types.jsonl");
    let vals = inserts_of(&changes, "vals");
    let row = |id: &str| {
        *vals
            .iter()
            .find(|r| text(&r[0]) == id)
            .unwrap_or_else(|| panic!("no row {id}"))
    };
    let one = row("1");
    let expected = [
        "1",
        "123456789012345678901234567890.123456789012345678901234567890",
        "-0",
        "-1.7976931348623157e+308",
        "\\x00ff5c22",
        "{\"\\\\x00\",\"\\\\xff\"}",
        "{1.50,NaN,NULL}",
        "{-0,Infinity,5e-324}",
        "{\"a\": 1.0, \"b\": [1e400]}",
        "{\"k\": \"v\\\"q\", \"n\": 0.10}",
        "2024-02-29 12:34:56.789012",
        "0001-01-01 00:00:00+00 BC",
        "1 year 2 mons -3 days +04:05:06.7",
        "infinity",
        "t",
        "9007199254740993",
        "4294967295",
        "quote\" back\\ nl\n tab\t ü",
    ];
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(text(&one[i]), *want, "column {i}");
    }
    // Float edge values keep wal2json's digits (never through an f64).
    assert_eq!(text(&row("4")[2]), "1.1754944e-38");
    assert_eq!(text(&row("4")[3]), "5e-324");
    assert_eq!(text(&row("5")[2]), "3.4028235e+38");
    assert_eq!(text(&row("5")[3]), "-0");
    // NaN and ±Infinity of numeric, real and double precision arrive as JSON null: wal2json
    // cannot carry them (check refuses such columns), while a domain over numeric is a string.
    for id in ["2", "3"] {
        assert_eq!(row(id)[1..4], [Value::Null, Value::Null, Value::Null]);
    }
    let dom = inserts_of(&changes, "dom");
    assert_eq!(text(&dom[0][1]), "NaN");
    assert_eq!(text(&dom[1][1]), "1.000");
    // Updates of vals: the TOASTed t set, then left unchanged (absent: Unchanged, never NULL),
    // then a key update (old key 3), then the delete of key 30.
    let updates: Vec<&Change> = changes
        .iter()
        .filter(|c| matches!(c, Change::Update { .. } | Change::Delete { .. }))
        .collect();
    match updates[1] {
        Change::Update { new, old: None, .. } => {
            assert_eq!(new[17], Value::Unchanged);
            assert_eq!(text(&new[14]), "f");
        }
        other => panic!("{other:?}"),
    }
    match updates[2] {
        Change::Update {
            new,
            old: Some((OldImage::Key, old)),
            ..
        } => {
            assert_eq!(text(&old[0]), "3");
            assert_eq!(text(&new[0]), "30");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(updates[3], Change::Delete { old: (OldImage::Key, old), .. } if text(&old[0]) == "30")
    );
    // REPLICA IDENTITY FULL (no key): the whole old row, matched as a whole (one twin).
    match updates[4] {
        Change::Delete {
            old: (OldImage::Full, old),
            ..
        } => assert_eq!((text(&old[0]), text(&old[1])), ("1", "same")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        updates[5],
        Change::Update {
            old: Some((OldImage::Full, _)),
            ..
        }
    ));
    // REPLICA IDENTITY USING INDEX: the index columns, the others out of the match.
    match updates[6] {
        Change::Update {
            old: Some((OldImage::Full, old)),
            ..
        } => assert_eq!(old[1], Value::Unchanged),
        other => panic!("{other:?}"),
    }
    // A row moving between partitions: a delete from one leaf, an insert into the other.
    assert!(!inserts_of(&changes, "part_2").is_empty());
    // TRUNCATE parent, child: one T per table, apply merges them into one statement.
    assert_eq!(
        changes
            .iter()
            .filter(|c| matches!(c, Change::Truncate { .. }))
            .count(),
        2
    );
}
