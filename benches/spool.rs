//! Spool write throughput: appends transactions of pgoutput-sized insert messages through the
//! real SpoolWriter (group commit, fsync per batch) into a temp work dir and prints changes/s.
//! Run: `cargo bench --bench spool` (scripts/bench.sh runs it too).

use std::time::Instant;

use bytes::Bytes;
use pgtide::pg::Lsn;
use pgtide::spool::{Record, SpoolWriter};

const TRANSACTIONS: u64 = 20_000;
const ROWS_PER_TRANSACTION: u64 = 100;

fn main() {
    let dir = std::env::temp_dir().join(format!("pgtide-spool-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rate = runtime.block_on(async {
        let mut spool = SpoolWriter::open(&dir, Box::new(|_| {})).expect("open spool");
        // A pgbench-like insert: relation oid, four columns of text.
        let insert = Bytes::from_static(b"I\x00\x00@\x09N\x00\x04t\x00\x00\x00\x0712345678t\x00\x00\x00\x0242t\x00\x00\x00\x01\x30t\x00\x00\x00\x0bfiller text");
        let started = Instant::now();
        let mut lsn = 1u64 << 24;
        let mut changes = 0u64;
        for txn in 0..TRANSACTIONS {
            let xid = Some(1000 + txn as u32);
            spool.append(Record { lsn: Lsn(lsn), end_lsn: None, xid, kind: "begin", payload: Bytes::from_static(b"B") }).unwrap();
            for _ in 0..ROWS_PER_TRANSACTION {
                lsn += 64;
                spool.append(Record { lsn: Lsn(lsn), end_lsn: None, xid, kind: "insert", payload: insert.clone() }).unwrap();
            }
            lsn += 64;
            spool.append(Record { lsn: Lsn(lsn), end_lsn: Some(Lsn(lsn + 48)), xid, kind: "commit", payload: Bytes::from_static(b"C") }).unwrap();
            changes += ROWS_PER_TRANSACTION + 2;
        }
        spool.sync().await.expect("sync");
        let elapsed = started.elapsed();
        spool.close().expect("close");
        let rate = changes as f64 / elapsed.as_secs_f64();
        println!(
            "spool: {changes} changes ({TRANSACTIONS} transactions) durable in {:.2} s: {:.0} changes/s",
            elapsed.as_secs_f64(),
            rate
        );
        rate
    });
    let size = std::fs::metadata(dir.join("spool.db"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!("spool file: {:.1} MB", size as f64 / 1e6);
    let _ = std::fs::remove_dir_all(&dir);
    if rate < 200_000.0 {
        println!("below the 200,000 changes/s target");
    }
}
