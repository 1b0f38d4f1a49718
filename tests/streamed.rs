//! Transactions streamed before their commit (pgoutput `streaming`, 14+) against the real
//! clusters: the source database's `logical_decoding_work_mem` is set to its minimum, so every
//! large transaction arrives in chunks while it runs. Savepoints rolled back (nested, with a
//! released child), a whole transaction rolled back, small transactions committing in
//! between, a SIGKILL of pgtide while a streamed transaction is open, and a captured schema
//! change beside a rolled-back savepoint (the fallback to whole transactions): the target ends
//! identical to the source.

mod common;

use std::time::Duration;

use common::*;
use pgtide::failpoints::SPOOL_STAGED_PARTLY_MOVED;

const SCHEMA: &str = "
    CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL, v text);
    INSERT INTO items VALUES (20000, 0, 'shared');
    CREATE TABLE tick (id int PRIMARY KEY);
    DO $$ BEGIN
      EXECUTE format('ALTER DATABASE %I SET logical_decoding_work_mem = %L', current_database(), '64kB');
    END $$;
";

/// pgtide's log with the streamed transactions' chunks, commits and aborts.
const DEBUG_STREAMED: &str = "info,pgtide::replication::streamed=debug";

/// Chunks the source streamed for the slot so far (`pg_stat_replication_slots`, 14+).
async fn chunks_streamed(src: &str, slot: &str) -> i64 {
    scalar_i64(
        src,
        &format!(
            "SELECT coalesce(sum(stream_count), 0)::int8 FROM pg_stat_replication_slots WHERE slot_name = '{slot}'"
        ),
    )
    .await
}

/// Waits until the source has streamed more than `after` chunks for the slot.
async fn wait_streamed(src: &str, slot: &str, after: i64, child: &mut PgtideChild) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while chunks_streamed(src, slot).await <= after {
        assert!(
            std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "the source never streamed a chunk of the open transaction:\n{}",
            child.output_so_far()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rows staged in the spool for transactions streamed before their commit.
fn staged_rows(dir: &std::path::Path) -> i64 {
    rusqlite::Connection::open(dir.join("spool.db"))
        .and_then(|c| c.query_row("SELECT count(*) FROM staged", [], |r| r.get(0)))
        .unwrap_or(0)
}

/// Writes `tick` row `id` on the source and waits until the target has it: everything
/// committed before it is applied.
async fn wait_caught_up(src: &str, dst: &str, id: i32, child: &mut PgtideChild) {
    exec(src, &format!("INSERT INTO tick VALUES ({id})")).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while scalar_i64(dst, &format!("SELECT count(*) FROM tick WHERE id = {id}")).await == 0 {
        assert!(
            std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "apply did not reach tick {id}:\n{}",
            child.output_so_far()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_transactions_apply_exactly_through_savepoints_aborts_and_a_kill() {
    let slot = "t_streamed_slot";
    let (src, dst) = fresh_db_pair("t_streamed").await;
    exec(&src, SCHEMA).await;
    let dir = workdir("streamed");
    let d = dir.to_str().unwrap();
    let args = clone_follow_args(&src, &dst, d, slot);
    let mut resume = args.clone();
    resume.push("--resume");
    let mut child = spawn_pgtide(&args, &[("PGTIDE_LOG", DEBUG_STREAMED)]);
    wait_for_slot(&dir);
    wait_applied(&src, &dst, slot, &mut child).await;

    // A large transaction, open while small ones commit and while pgtide is killed.
    let big = connect(&src).await;
    big.batch_execute(
        "BEGIN;
         INSERT INTO items SELECT g, 0, repeat('a', 100) || g FROM generate_series(1, 3000) g;",
    )
    .await
    .unwrap();
    // Committed while the large one is open: applied before it, in commit order.
    for i in 0..20 {
        exec(
            &src,
            &format!(
                "INSERT INTO items VALUES ({}, {i}, 'small'); UPDATE items SET n = n + 1, v = 'small' WHERE id = 20000",
                10000 + i
            ),
        )
        .await;
    }
    wait_streamed(&src, slot, 0, &mut child).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while staged_rows(&dir) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing of the open transaction was staged:\n{}",
            child.output_so_far()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = chunks_streamed(&src, slot).await;
    // status says a transaction is arriving ahead of its commit (it counts in no lag yet).
    let status: serde_json::Value = serde_json::from_str(&pgtide_ok_stdout(&[
        "status", "--json", "--dir", d, "--source", &src, "--target", &dst,
    ]))
    .unwrap();
    assert!(
        status["streamed_in_progress"]
            .as_u64()
            .is_some_and(|n| n >= 1)
            && status["streamed_in_progress_bytes"]
                .as_u64()
                .is_some_and(|b| b > 0),
        "{status}"
    );
    let human = pgtide_ok_stdout(&["status", "--dir", d, "--source", &src, "--target", &dst]);
    assert!(human.contains("still running on the source"), "{human}");

    // Killed with chunks of the open transaction staged: the restarted receiver drops them,
    // and the source streams the transaction again from its start.
    child.kill().ok();
    child.wait().ok();
    child = spawn_pgtide(&resume, &[("PGTIDE_LOG", DEBUG_STREAMED)]);
    // Savepoints, streamed to the restarted receiver: a rolled-back update of every row, a
    // released savepoint, a rolled-back savepoint holding a released one, and a rolled-back
    // savepoint nested in a released one.
    big.batch_execute(
        "SAVEPOINT s1; UPDATE items SET n = 1 WHERE id <= 3000; ROLLBACK TO s1;
         SAVEPOINT s2; INSERT INTO items SELECT g, 2, 's2' FROM generate_series(3001, 3500) g;
         SAVEPOINT s3; DELETE FROM items WHERE id % 7 = 0 AND id <= 3500; RELEASE s3;
         SAVEPOINT s4; UPDATE items SET n = 4 WHERE id <= 1000;
           SAVEPOINT s5; INSERT INTO items SELECT g, 5, 's5' FROM generate_series(3501, 4000) g; RELEASE s5;
         ROLLBACK TO s4;
         SAVEPOINT s6; INSERT INTO items SELECT g, 6, 's6' FROM generate_series(5000, 5100) g;
           SAVEPOINT s7; UPDATE items SET n = 7 WHERE id >= 5000; ROLLBACK TO s7;
         RELEASE s6;
         UPDATE items SET v = 'final' WHERE id % 11 = 0 AND id <= 3500;
         UPDATE items SET v = 'big', n = -1 WHERE id = 20000;
         INSERT INTO items SELECT g, 8, repeat('b', 200) FROM generate_series(4001, 4800) g;
         COMMIT;",
    )
    .await
    .unwrap();
    wait_streamed(&src, slot, before, &mut child).await;

    // A large transaction rolled back whole, after chunks of it were streamed. (The count is
    // read before: the source streams while the statements run.)
    let before = chunks_streamed(&src, slot).await;
    big.batch_execute(
        "BEGIN; INSERT INTO items SELECT g, 9, repeat('c', 100) FROM generate_series(6000, 9000) g;
         UPDATE items SET n = 99 WHERE id <= 2000;",
    )
    .await
    .unwrap();
    wait_streamed(&src, slot, before, &mut child).await;
    big.batch_execute("ROLLBACK").await.unwrap();
    wait_caught_up(&src, &dst, 2, &mut child).await;
    assert_eq!(
        scalar_string(&dst, "SELECT v || '/' || n FROM items WHERE id = 20000").await,
        "big/-1",
        "the large transaction committed last must win over the small ones"
    );

    // A captured schema change in a large transaction that rolls a savepoint back: whether the
    // change's message was inside the savepoint cannot be told from the stream, so the
    // receiver asks for that transaction whole.
    big.batch_execute(
        "BEGIN;
         ALTER TABLE items ADD COLUMN extra int NOT NULL DEFAULT 0;
         UPDATE items SET extra = 1 WHERE id <= 2500;
         SAVEPOINT d1; UPDATE items SET extra = 2 WHERE id <= 500; ROLLBACK TO d1;
         COMMIT;",
    )
    .await
    .unwrap();
    wait_caught_up(&src, &dst, 3, &mut child).await;
    child.kill().ok();
    let out = child.wait_with_output().unwrap();
    let printed = text(&out);
    assert!(
        printed.contains("subtransaction") && printed.contains("aborted"),
        "no subtransaction abort was streamed:\n{printed}"
    );
    assert!(
        printed.contains("rows of transactions streamed before their commit"),
        "the resumed run found nothing staged to drop:\n{printed}"
    );
    assert!(
        printed.contains("reconnecting without streaming"),
        "the receiver did not fall back to whole transactions:\n{printed}"
    );
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM items WHERE extra = 2").await,
        0
    );

    // A streamed transaction still open when endpos is set does not hold the end back: it
    // commits after endpos, if ever.
    let mut child = spawn_pgtide(&resume, &[("PGTIDE_LOG", DEBUG_STREAMED)]);
    wait_caught_up(&src, &dst, 4, &mut child).await;
    let before = chunks_streamed(&src, slot).await;
    big.batch_execute(
        "BEGIN; INSERT INTO items SELECT g, 10, repeat('d', 100) FROM generate_series(30000, 33000) g;",
    )
    .await
    .unwrap();
    wait_streamed(&src, slot, before, &mut child).await;
    let endpos = current_lsn(&src).await;
    pgtide_ok(&["sentinel", "set", "endpos", &endpos, "--dir", d]);
    let out = wait_exit(child, 60);
    assert!(
        out.status.success(),
        "pgtide did not stop at endpos:\n{}",
        text(&out)
    );
    big.batch_execute("ROLLBACK").await.unwrap();
    assert_identical(&src, &dst);
}

/// pgtide's log with applying ahead of the commit.
const DEBUG_AHEAD: &str = "info,pgtide::apply=debug,pgtide::replication::streamed=debug";

/// Waits until pgtide's output so far holds `text` `count` times.
async fn wait_logged(child: &mut PgtideChild, text: &str, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.output_so_far().matches(text).count() < count {
        assert!(
            std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "pgtide never logged {text:?} {count} times:\n{}",
            child.output_so_far()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A streamed transaction is applied on the target while it still runs on the source, in an
/// open target transaction that nobody sees until the source commits: applied whole ahead,
/// applied in part when the commit comes (the rest after it), given up when another
/// transaction commits first or a savepoint is rolled back. Nothing is applied twice or lost.
#[tokio::test(flavor = "multi_thread")]
async fn streamed_transactions_are_applied_ahead_of_their_commit() {
    let slot = "t_ahead_slot";
    let (src, dst) = fresh_db_pair("t_ahead").await;
    exec(&src, SCHEMA).await;
    let dir = workdir("ahead");
    let d = dir.to_str().unwrap();
    let mut child = spawn_pgtide(
        &clone_follow_args(&src, &dst, d, slot),
        &[("PGTIDE_LOG", DEBUG_AHEAD)],
    );
    wait_for_slot(&dir);
    wait_applied(&src, &dst, slot, &mut child).await;
    let big = connect(&src).await;

    // Whole: applied ahead, invisible on the target until the commit.
    big.batch_execute(
        "BEGIN; INSERT INTO items SELECT g, 1, repeat('a', 100) FROM generate_series(1, 2000) g;
         UPDATE items SET id = id + 100000 WHERE id <= 10;
         INSERT INTO items SELECT g, 1, repeat('a', 100) FROM generate_series(2001, 4000) g;",
    )
    .await
    .unwrap();
    wait_logged(&mut child, "ahead of its commit", 1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while staged_rows(&dir) == 0 || !child.output_so_far().contains("applying transaction") {
        assert!(std::time::Instant::now() < deadline, "nothing staged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM items WHERE id <= 4000 OR id > 100000"
        )
        .await,
        0,
        "a transaction applied ahead was visible on the target before its commit"
    );
    big.batch_execute("UPDATE items SET n = 2 WHERE id <= 100; COMMIT;")
        .await
        .unwrap();
    wait_caught_up(&src, &dst, 11, &mut child).await;
    wait_logged(&mut child, "records applied ahead", 1).await;
    // Applied ahead, then committed without a second try: what was applied ahead was passed
    // over (applied again, its key changes would fail and send the batch down the row-by-row
    // fallback).
    let so_far = child.output_so_far();
    assert!(
        !so_far.contains("giving up") && !so_far.contains("one row at a time"),
        "{so_far}"
    );
    // And counted once: 4,000 inserts, 10 key changes, 90 updates (ids 1-10 moved) and two
    // ticks (applied again, the records applied ahead would count twice).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let counted = state_query_i64(&dir, "SELECT coalesce(max(changes), 0) FROM apply_samples");
    assert!(
        (4100..=4102).contains(&counted),
        "{counted} changes applied:\n{so_far}"
    );
    assert!(
        !so_far.contains("passing over its 0 records"),
        "nothing was applied ahead:\n{so_far}"
    );

    // Another transaction commits first: the attempt is given up, both are applied in order.
    big.batch_execute(
        "BEGIN; INSERT INTO items SELECT g, 3, repeat('b', 100) FROM generate_series(5001, 9000) g;",
    )
    .await
    .unwrap();
    wait_logged(&mut child, "ahead of its commit", 2).await;
    exec(
        &src,
        "UPDATE items SET v = 'first', n = n + 1 WHERE id = 20000",
    )
    .await;
    wait_logged(&mut child, "giving up applying transaction", 1).await;
    big.batch_execute("UPDATE items SET v = 'second' WHERE id = 20000; COMMIT;")
        .await
        .unwrap();

    // A savepoint rolled back after applying ahead started: given up, applied at the commit.
    big.batch_execute(
        "BEGIN; INSERT INTO items SELECT g, 4, repeat('c', 100) FROM generate_series(10001, 14000) g;",
    )
    .await
    .unwrap();
    wait_logged(&mut child, "ahead of its commit", 3).await;
    big.batch_execute(
        "SAVEPOINT a; UPDATE items SET n = 5 WHERE id > 10000; ROLLBACK TO a;
         INSERT INTO items SELECT g, 6, 'after' FROM generate_series(14001, 14500) g; COMMIT;",
    )
    .await
    .unwrap();
    wait_caught_up(&src, &dst, 12, &mut child).await;
    assert_eq!(
        scalar_string(&dst, "SELECT v FROM items WHERE id = 20000").await,
        "second"
    );
    child.kill().ok();
    let out = child.wait_with_output().unwrap();
    let printed = text(&out);
    // The transaction that another one overtook was given up (the savepoint's may be too,
    // when the source streamed the rolled-back changes before decoding their rollback).
    assert!(
        printed.contains("giving up applying transaction"),
        "{printed}"
    );
    assert_identical(&src, &dst);
}

/// A crash while a committed streamed transaction moves from its staging into the queue (its
/// Begin durable, its records and Commit not yet): the rerun drops the part moved, the source
/// streams the transaction again, and the target ends identical.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_while_a_streamed_transaction_joins_the_queue_loses_nothing() {
    let slot = "t_moved_slot";
    let (src, dst) = fresh_db_pair("t_moved").await;
    exec(&src, SCHEMA).await;
    let dir = workdir("moved");
    let d = dir.to_str().unwrap();
    let args = clone_follow_args(&src, &dst, d, slot);
    let failpoint = format!("{SPOOL_STAGED_PARTLY_MOVED}=panic");
    let mut child = spawn_pgtide(&args, &[("FAILPOINTS", failpoint.as_str())]);
    wait_for_slot(&dir);
    wait_applied(&src, &dst, slot, &mut child).await;
    exec(
        &src,
        "INSERT INTO items SELECT g, 1, repeat('m', 100) FROM generate_series(1, 4000) g",
    )
    .await;
    let out = wait_exit(child, 60);
    let printed = text(&out);
    assert!(
        !out.status.success() && printed.contains(SPOOL_STAGED_PARTLY_MOVED),
        "pgtide did not stop at the failpoint:\n{printed}"
    );
    let mut resume = args.clone();
    resume.push("--resume");
    let mut child = spawn_pgtide(&resume, &[]);
    wait_caught_up(&src, &dst, 5, &mut child).await;
    child.kill().ok();
    let printed = text(&child.wait_with_output().unwrap());
    assert!(
        printed.contains("of a transaction left incomplete"),
        "the rerun found no partly moved transaction to drop:\n{printed}"
    );
    assert_identical(&src, &dst);
}
