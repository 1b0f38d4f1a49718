//! The work dir of a test and peeks into it: state.db while pgtide runs, the spool, the files.

use std::path::{Path, PathBuf};

use super::process::pgtide_ok_stdout;
use super::servers::password;

/// A fresh, empty work dir for one test.
pub fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pgtide-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A count from the work dir's state.db, 0 while state.db or its tables do not exist yet (a
/// test polling a pgtide that is still starting).
pub fn state_count_or_zero(dir: &Path, sql: &str) -> i64 {
    if !dir.join("state.db").exists() {
        return 0;
    }
    rusqlite::Connection::open(dir.join("state.db"))
        .and_then(|c| c.query_row(sql, [], |r| r.get(0)))
        .unwrap_or(0)
}

/// Parts the clone in `dir` has finished, 0 while state.db does not exist yet.
pub fn parts_done(dir: &Path) -> i64 {
    state_count_or_zero(dir, "SELECT count(*) FROM parts WHERE status = 'done'")
}

/// One value from the work dir's state.db.
pub fn state_query_i64(dir: &Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("state.db")).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Waits until clone --follow has created its slot (its consistent point is recorded): changes
/// made before that are part of the copy, not of the stream.
pub fn wait_for_slot(dir: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let recorded = rusqlite::Connection::open(dir.join("state.db"))
            .and_then(|c| {
                c.query_row(
                    "SELECT count(*) FROM meta WHERE key = 'stream.startpos'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
            })
            .unwrap_or(0);
        if recorded == 1 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was never created"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `pgtide spool show` parsed into JSON objects.
pub fn spool_show(dir: &Path) -> Vec<serde_json::Value> {
    let out = pgtide_ok_stdout(&["spool", "show", "--dir", dir.to_str().unwrap()]);
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l}: {e}")))
        .collect()
}

/// No file of a work dir holds the test password (state.db, spool, dumps, lists, lock).
pub fn assert_no_file_holds_password(dir: &Path) {
    let needle = password().into_bytes();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        // A whole-server work dir holds one work dir per database.
        if path.is_dir() {
            assert_no_file_holds_password(&path);
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
            "the password is in {}",
            path.display()
        );
    }
}
