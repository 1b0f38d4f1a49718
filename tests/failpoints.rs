//! Crashes at the named failpoints (src/failpoints.rs) and the error classification end to
//! end: a crash at a durability boundary loses nothing and applies nothing twice; a decode
//! error stops follow with its reason instead of reconnecting forever.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use pgtide::failpoints::{APPLY_AFTER_COMMIT, RECEIVE_DECODE, SPOOL_AFTER_WRITE};

/// A decode error in the receiver is not transient: with the decoder failing once, follow
/// stops with the error (naming it) instead of reconnecting, which would have succeeded and
/// hidden it, or, for a real decode bug, retried forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_decode_error_stops_follow_instead_of_reconnecting() {
    let (src, dst) = fresh_db_pair("t_fp_decode").await;
    exec(
        &src,
        "CREATE TABLE d (id int PRIMARY KEY); INSERT INTO d VALUES (0);",
    )
    .await;
    let dir = workdir("fp-decode");
    let d = dir.to_str().unwrap();
    let failpoint = format!("{RECEIVE_DECODE}=1*return");
    let child = spawn_pgtide(
        &clone_follow_args(&src, &dst, d, "t_fp_decode_slot"),
        &[("FAILPOINTS", failpoint.as_str())],
    );
    wait_for_slot(&dir);
    // The first message the receiver decodes (this transaction's) fails.
    exec(&src, "INSERT INTO d VALUES (1)").await;
    let out = wait_exit(child, 120);
    let message = text(&out);
    assert!(
        !out.status.success(),
        "follow should stop on a decode error:\n{message}"
    );
    assert!(
        message.contains("cannot decode the replication stream")
            && message.contains(&format!("failpoint {RECEIVE_DECODE}")),
        "{message}"
    );
    assert!(
        !message.contains("reconnecting"),
        "a decode error must not be retried:\n{message}"
    );
    // With the cause gone (the failpoint fired once), a rerun continues to identical.
    let endpos = current_lsn(&src).await;
    pgtide_ok(&[
        "follow", "--source", &src, "--target", &dst, "--dir", d, "--endpos", &endpos,
    ]);
    assert_identical(&src, &dst);
    pgtide_ok(&["stream", "cleanup", "--source", &src, "--dir", d]);
}

/// SIGKILL right after a target transaction commits, before anything else is recorded: the
/// rerun resumes from the target's origin, so nothing is applied twice (a keyless table would
/// get duplicate rows) and nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_target_commits_applies_nothing_twice() {
    let (src, dst) = fresh_db_pair("t_fp_after_commit").await;
    exec(
        &src,
        "CREATE TABLE k (id int PRIMARY KEY, n int); INSERT INTO k VALUES (0, 0);
         CREATE TABLE bag (a int, b text); ALTER TABLE bag REPLICA IDENTITY FULL;
         INSERT INTO bag VALUES (0, 'copied');",
    )
    .await;
    let dir = workdir("fp-after-commit");
    let d = dir.to_str().unwrap();
    // The first commit of apply is followed by a long pause: the test kills pgtide in it.
    let failpoint = format!("{APPLY_AFTER_COMMIT}=1*sleep(20000)");
    let mut child = spawn_pgtide(
        &clone_follow_args(&src, &dst, d, "t_fp_after_commit_slot"),
        &[("FAILPOINTS", failpoint.as_str())],
    );
    wait_for_slot(&dir);
    let client = connect(&src).await;
    for i in 1..=30 {
        client
            .batch_execute(&format!(
                "INSERT INTO bag VALUES ({i}, 'streamed'); INSERT INTO k VALUES ({i}, 0); UPDATE k SET n = n + 1 WHERE id = 0"
            ))
            .await
            .unwrap();
    }
    // The origin past 0/0 on the target means the first apply commit is done and pgtide is
    // paused at the failpoint, nothing after the commit recorded.
    let applied = "SELECT count(*) FROM pg_replication_origin_status
                   WHERE external_id = 'pgtide_t_fp_after_commit_slot' AND remote_lsn > '0/0'";
    let deadline = Instant::now() + Duration::from_secs(120);
    while scalar_i64(&dst, applied).await == 0 {
        assert!(Instant::now() < deadline, "apply never committed");
        assert!(
            child.try_wait().unwrap().is_none(),
            "pgtide ended before its first apply commit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "pgtide ended before it could be killed at {APPLY_AFTER_COMMIT}"
    );
    child.kill().unwrap();
    child.wait().unwrap();

    for i in 31..=40 {
        client
            .batch_execute(&format!(
                "INSERT INTO bag VALUES ({i}, 'later'); UPDATE k SET n = n + 1 WHERE id = 0"
            ))
            .await
            .unwrap();
    }
    let endpos = current_lsn(&src).await;
    let out = pgtide_ok(&[
        "follow", "--source", &src, "--target", &dst, "--dir", d, "--endpos", &endpos,
    ]);
    assert!(out.contains("reached endpos"), "{out}");
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM (SELECT a FROM bag GROUP BY a HAVING count(*) > 1) t"
        )
        .await,
        0,
        "a row of the keyless table was applied twice"
    );
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM bag").await, 41);
    assert_identical(&src, &dst);
    pgtide_ok(&["stream", "cleanup", "--source", &src, "--dir", d]);
}

/// The spool writer dies right after a batch commits, before the batch is published as
/// durable (so before its flush was reported to the source): a rerun of the receiver keeps that
/// batch and receives the rest, every transaction exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_a_spool_write_loses_nothing_and_duplicates_nothing() {
    let (src, _dst) = fresh_db_pair("t_fp_spool_write").await;
    exec(&src, "CREATE TABLE s (id int PRIMARY KEY);").await;
    let dir = workdir("fp-spool-write");
    std::fs::create_dir_all(&dir).unwrap();
    let w = dir.join("w");
    let d = w.to_str().unwrap();
    pgtide_ok(&[
        "stream",
        "setup",
        "--source",
        &src,
        "--dir",
        d,
        "--slot-name",
        "t_fp_spool_write_slot",
    ]);
    let client = connect(&src).await;
    for i in 0..30 {
        client
            .execute("INSERT INTO s VALUES ($1)", &[&i])
            .await
            .unwrap();
    }
    let failpoint = format!("{SPOOL_AFTER_WRITE}=panic");
    let child = spawn_pgtide(
        &["stream", "receive", "--source", &src, "--dir", d],
        &[("FAILPOINTS", failpoint.as_str())],
    );
    let out = wait_exit(child, 60);
    assert!(
        !out.status.success(),
        "the failpoint should have stopped the receiver:\n{}",
        text(&out)
    );
    // It died at the failpoint: after a batch was committed to the spool.
    assert!(
        text(&out).contains(&format!("failpoint {SPOOL_AFTER_WRITE} panic")),
        "{}",
        text(&out)
    );

    for i in 30..40 {
        client
            .execute("INSERT INTO s VALUES ($1)", &[&i])
            .await
            .unwrap();
    }
    let endpos = current_lsn(&src).await;
    pgtide_ok(&[
        "stream", "receive", "--source", &src, "--dir", d, "--endpos", &endpos,
    ]);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for c in spool_show(&w) {
        if c["kind"] == "insert" && c["table"] == "s" {
            *seen
                .entry(c["new"]["id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    for i in 0..40 {
        assert_eq!(
            seen.get(&i.to_string()).copied().unwrap_or(0),
            1,
            "row {i} must be spooled exactly once"
        );
    }
    assert_eq!(seen.len(), 40);
    pgtide_ok(&["stream", "cleanup", "--source", &src, "--dir", d]);
}
