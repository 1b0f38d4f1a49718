//! The spool's disk fills up (a real tmpfs of a few MB, mounted by the test: the tests run as
//! root): receive stops with an error that names the problem and the fix, the source's slot is
//! never told more than the spool holds durably, and a rerun after freeing space continues
//! with nothing lost and nothing twice.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

/// A small tmpfs, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let path = std::env::temp_dir().join(format!("pgtide-full-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                path.to_str().unwrap(),
            ])
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "cannot mount a tmpfs (the tests need root)"
        );
        SmallDisk(path)
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args([
                "-o",
                &format!("remount,size={size}"),
                self.0.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn spooled(dir: &std::path::Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("spool.db")).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// How many spooled messages of this kind `pgtide spool show` reads back (the spool packs
/// the messages of a transaction into one row, so rows are not messages).
fn spooled_kind(dir: &std::path::Path, kind: &str) -> usize {
    spool_show(dir)
        .iter()
        .filter(|change| change["kind"] == kind)
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_spool_disk_stops_receive_and_a_rerun_continues() {
    let (src, _) = fresh_db_pair("t_full").await;
    exec(&src, "CREATE TABLE big (id int PRIMARY KEY, pad text)").await;
    let disk = SmallDisk::mount("6m");
    let dir = disk.0.join("work");
    let d = dir.to_str().unwrap();
    pgtide_ok(&[
        "stream",
        "setup",
        "--source",
        &src,
        "--dir",
        d,
        "--slot-name",
        "t_full_slot",
    ]);
    // Where the slot starts: the spool may fill before its first durable transaction, and
    // then the slot must still be there.
    let start = scalar_i64(
        &src,
        "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = 't_full_slot'",
    )
    .await;
    // About 20 MB of changes in 20 transactions.
    for i in 0..20 {
        exec(
            &src,
            &format!(
                "INSERT INTO big SELECT g, repeat(md5(g::text), 32) FROM generate_series({} , {}) g",
                i * 1000 + 1,
                (i + 1) * 1000
            ),
        )
        .await;
    }
    let endpos = current_lsn(&src).await;
    let out = pgtide_fails(&[
        "stream", "receive", "--source", &src, "--dir", d, "--endpos", &endpos,
    ]);
    assert!(
        out.contains("is full") && out.contains("Free space") && out.contains(d),
        "{out}"
    );
    assert!(!out.contains(&password()), "{out}");
    // The slot was never told more than the spool holds durably (nor moved at all when the
    // spool holds no whole transaction).
    let durable = spooled(&dir, "SELECT coalesce(max(end_lsn), 0) FROM changes").max(start);
    let confirmed = scalar_i64(
        &src,
        "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = 't_full_slot'",
    )
    .await;
    assert!(
        confirmed <= durable,
        "slot confirmed {confirmed} > spool durable {durable}"
    );

    // Space is freed (spool show reads the spool then): the same command continues and ends
    // with every row exactly once.
    disk.resize("256m");
    let before = spooled_kind(&dir, "insert");
    assert!(
        before < 20_000,
        "the disk should have filled before the end ({before} rows)"
    );
    pgtide_ok(&[
        "stream", "receive", "--source", &src, "--dir", d, "--endpos", &endpos,
    ]);
    assert_eq!(spooled_kind(&dir, "insert"), 20_000);
    assert_eq!(spooled_kind(&dir, "commit"), 20);
    pgtide_ok(&["stream", "cleanup", "--source", &src, "--dir", d]);
}
