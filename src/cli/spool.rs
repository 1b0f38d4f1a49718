//! `pgtide spool show`: spooled changes as JSON lines, one object per message.

use std::collections::HashMap;
use std::io::Write;

use anyhow::Result;

use crate::cli::SpoolShowArgs;
use crate::decode::{Change, Relation, StreamDecoder, change_json};
use crate::pg::Lsn;
use crate::spool::SpoolReader;
use crate::state::StateDb;

pub fn show(args: SpoolShowArgs) -> Result<()> {
    let state = StateDb::open(&args.dir.join("state.db"))?;
    let plugin = state.stream_plugin()?;
    let reader = SpoolReader::open(&args.dir)?;
    let from = args.from.unwrap_or(Lsn(0));
    let limit = args.limit.unwrap_or(usize::MAX);
    let mut relations: HashMap<u32, Relation> = HashMap::new();
    let mut decoder = StreamDecoder::new(plugin);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0usize;
    let mut after = 0i64;
    'outer: loop {
        let batch = reader.read(after, 10_000)?;
        if batch.is_empty() {
            break;
        }
        for stored in batch {
            after = stored.seq;
            let changes = decoder.decode(stored.payload)?;
            for change in changes {
                if let Change::Relation(r) = &change {
                    relations.insert(r.oid, r.clone());
                }
                if stored.lsn < from && !matches!(change, Change::Relation(_)) {
                    continue;
                }
                if stored.lsn < from {
                    continue;
                }
                let line = change_json(stored.lsn, stored.xid, &change, &|oid| {
                    relations.get(&oid).cloned()
                });
                if writeln!(out, "{line}").is_err() {
                    return Ok(()); // a closed pipe (| head) is not an error
                }
                printed += 1;
                if printed >= limit {
                    break 'outer;
                }
            }
        }
    }
    let _ = out.flush();
    Ok(())
}
