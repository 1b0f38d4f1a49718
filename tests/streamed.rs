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

    // A large transaction rolled back whole, after chunks of it were streamed.
    big.batch_execute(
        "BEGIN; INSERT INTO items SELECT g, 9, repeat('c', 100) FROM generate_series(6000, 9000) g;
         UPDATE items SET n = 99 WHERE id <= 2000;",
    )
    .await
    .unwrap();
    let before = chunks_streamed(&src, slot).await;
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
