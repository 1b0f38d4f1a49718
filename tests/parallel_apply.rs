//! Parallel apply (`--apply-jobs`) against the real clusters: a backlog of concurrent
//! transactions that share hot rows, swap unique values, change keys and touch a FULL-identity
//! table, applied by four lanes through SIGKILLs, ends identical to the source; a diverged row
//! still stops apply with the row's table named.

mod common;

use std::time::Duration;

use common::*;
use pgtide::failpoints::{APPLY_BEFORE_COMMIT, COPY_BEFORE_COMMIT};

const SCHEMA: &str = "
    CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, email text UNIQUE);
    INSERT INTO accounts SELECT g, 0, 'user' || g || '@x' FROM generate_series(1, 2000) g;
    CREATE TABLE hot (id int PRIMARY KEY, n bigint NOT NULL);
    INSERT INTO hot SELECT g, 0 FROM generate_series(1, 3) g;
    CREATE TABLE log (id bigserial PRIMARY KEY, client int, note text);
    CREATE TABLE bag (a int, b text);
    ALTER TABLE bag REPLICA IDENTITY FULL;
    INSERT INTO bag SELECT g % 10, 'x' FROM generate_series(1, 50) g;
    CREATE TABLE tick (id int PRIMARY KEY);
";

/// One client's transactions: mostly disjoint rows (what lanes can run side by side), with
/// hot rows every transaction meets, unique values swapped between two rows, keys changed and
/// changed back, a row deleted and inserted again with its key, and a FULL-identity table.
async fn client_traffic(src: String, client_no: i32, transactions: i32) {
    let client = connect(&src).await;
    for i in 0..transactions {
        let a = (client_no * 500 + i * 7) % 2000 + 1;
        let b = (a + 1000) % 2000 + 1;
        let mut sql = format!(
            "BEGIN; UPDATE accounts SET balance = balance + {i} WHERE id = {a};
             INSERT INTO log (client, note) VALUES ({client_no}, 't{i}');"
        );
        if i % 5 == 0 {
            sql += &format!("UPDATE hot SET n = n + 1 WHERE id = {};", i % 3 + 1);
        }
        if i % 9 == 0 && i < 60 {
            // The two rows exchange their unique e-mails through NULL. Only early on: a batch
            // holding such a swap fails as a set statement and is re-run alone, one row at a
            // time, so the later batches are the ones that commit beside each other.
            sql += &format!(
                "DO $$ DECLARE ea text; eb text; BEGIN
                   SELECT email INTO ea FROM accounts WHERE id = {a};
                   SELECT email INTO eb FROM accounts WHERE id = {b};
                   UPDATE accounts SET email = NULL WHERE id = {a};
                   UPDATE accounts SET email = ea WHERE id = {b};
                   UPDATE accounts SET email = eb WHERE id = {a};
                 END $$;"
            );
        }
        if i % 13 == 0 {
            sql += &format!(
                "UPDATE accounts SET id = id + 100000 WHERE id = {a};
                 UPDATE accounts SET id = id - 100000 WHERE id = {a} + 100000;"
            );
        }
        if i % 17 == 0 {
            sql += &format!(
                "DELETE FROM accounts WHERE id = {b};
                 INSERT INTO accounts VALUES ({b}, {i}, 'again' || {b} || '@x');"
            );
        }
        if i % 11 == 0 {
            sql += &format!(
                "DELETE FROM bag WHERE ctid = (SELECT ctid FROM bag WHERE a = {} LIMIT 1);
                 INSERT INTO bag VALUES ({}, 'c{client_no}');",
                i % 10,
                i % 10
            );
        }
        sql += "COMMIT;";
        // Two clients may swap or move the same row at once: a deadlock or a unique violation
        // on the source rolls the transaction back, which then never reaches the stream.
        if client.batch_execute(&sql).await.is_err() {
            client.batch_execute("ROLLBACK").await.ok();
        }
    }
}

async fn traffic(src: &str, clients: i32, transactions: i32) {
    let tasks: Vec<_> = (0..clients)
        .map(|c| tokio::spawn(client_traffic(src.to_string(), c, transactions)))
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

async fn lane_origins(dst: &str, slot: &str) -> (i64, i64) {
    let total = scalar_i64(
        dst,
        &format!(
            "SELECT count(*) FROM pg_replication_origin WHERE roname LIKE 'pgtide_{slot}.lane%'"
        ),
    )
    .await;
    let used = scalar_i64(
        dst,
        &format!(
            "SELECT count(*) FROM pg_replication_origin
             WHERE roname LIKE 'pgtide_{slot}.lane%'
               AND pg_replication_origin_progress(roname, false) > '0/0'"
        ),
    )
    .await;
    (total, used)
}

/// The furthest position any of the slot's origins committed (the resume point).
async fn applied(dst: &str, slot: &str) -> String {
    scalar_string(
        dst,
        &format!(
            "SELECT coalesce((SELECT pg_replication_origin_progress(roname, false) AS p
                               FROM pg_replication_origin WHERE roname = 'pgtide_{slot}' OR roname LIKE 'pgtide_{slot}.lane%'
                               ORDER BY p DESC NULLS LAST LIMIT 1), '0/0')::text"
        ),
    )
    .await
}

/// The differential check for parallel apply: a backlog of 4 × 900 concurrent transactions
/// spooled while the copy runs is applied by four lanes with their commits slowed, and pgtide
/// is SIGKILLed three times while batches are in flight, each time after apply moved forward,
/// then resumed with `clone --follow --resume` (the last time with two lanes). The target ends
/// identical to the source:
/// nothing lost, nothing applied twice; and the other lanes did commit batches (so the test
/// cannot pass with parallel apply silently off). `cleanup` drops every lane's origin.
#[tokio::test(flavor = "multi_thread")]
async fn parallel_apply_survives_sigkills_and_ends_identical() {
    let slot = "t_par_slot";
    let (src, dst) = fresh_db_pair("t_par").await;
    exec(&src, SCHEMA).await;
    let dir = workdir("parallel-apply");
    let d = dir.to_str().unwrap();
    let mut args = clone_follow_args(&src, &dst, d, slot);
    args.extend(["--apply-jobs", "4"]);
    // Another migration's origin whose name starts like this slot's, far ahead: taken for one
    // of this slot's lanes, resume would skip every change.
    let neighbour = format!("pgtide_{slot}_lane1");
    exec(
        &dst,
        &format!(
            "SELECT pg_replication_origin_create('{neighbour}');
             SELECT pg_replication_origin_advance('{neighbour}', 'FF/0')"
        ),
    )
    .await;
    // The copy is slowed so that the whole backlog is spooled before apply starts; commits
    // are slowed so that apply lasts seconds, with batches waiting on several lanes.
    let slow = format!("{COPY_BEFORE_COMMIT}=sleep(2000);{APPLY_BEFORE_COMMIT}=sleep(150)");
    let slow_apply = format!("{APPLY_BEFORE_COMMIT}=sleep(150)");
    let mut child = spawn_pgtide(&args, &[("FAILPOINTS", slow.as_str())]);
    wait_for_slot(&dir);
    // Enough that the last resume still has several batches to hand to other lanes, however
    // many the killed rounds committed.
    traffic(&src, 4, 900).await;
    let endpos = current_lsn(&src).await;
    pgtide_ok(&["sentinel", "set", "endpos", &endpos, "--dir", d]);
    let mut resume = args.clone();
    resume.push("--resume");
    // The last resume runs with two lanes: the origins of lanes 2 and 3, left by the killed
    // run, are bound and released before the position is read, and stay part of it.
    let mut fewer = clone_follow_args(&src, &dst, d, slot);
    fewer.extend(["--apply-jobs", "2", "--resume"]);
    let mut log = String::new();
    let mut last = "0/0".to_string();
    for round in 0..3 {
        // Killed once apply has committed past where the previous round stopped.
        let deadline = std::time::Instant::now() + Duration::from_secs(180);
        loop {
            let now = applied(&dst, slot).await;
            if scalar_i64(
                &dst,
                &format!("SELECT ('{now}'::pg_lsn > '{last}'::pg_lsn)::int::int8"),
            )
            .await
                == 1
            {
                last = now;
                break;
            }
            assert!(
                child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline,
                "round {round}: apply did not move past {last}:\n{log}{}",
                child.output_so_far()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let finished = child.try_wait().unwrap();
        child.kill().ok();
        let out = child.wait_with_output().unwrap();
        assert!(
            finished.is_none(),
            "round {round}: pgtide ended before its kill:\n{log}{}",
            text(&out)
        );
        log += &format!("round {round}: killed after apply reached {last}\n");
        let next = if round == 2 { &fewer } else { &resume };
        child = spawn_pgtide(next, &[("FAILPOINTS", slow_apply.as_str())]);
    }
    let out = wait_exit(child, 240);
    assert!(
        out.status.success(),
        "the final resume failed:\n{log}{}",
        text(&out)
    );
    assert_identical(&src, &dst);
    let (total, used) = lane_origins(&dst, slot).await;
    assert_eq!(
        total, 3,
        "four lanes: the slot's origin and three lane origins"
    );
    assert!(
        used >= 1,
        "no lane but the first committed a batch:\n{log}{}",
        text(&out)
    );
    pgtide_ok(&["cleanup", "--source", &src, "--target", &dst, "--dir", d]);
    assert_eq!(
        lane_origins(&dst, slot).await,
        (0, 0),
        "cleanup left lane origins"
    );
    assert_eq!(
        scalar_i64(
            &dst,
            &format!("SELECT count(*) FROM pg_replication_origin WHERE roname = '{neighbour}'")
        )
        .await,
        1,
        "cleanup dropped another migration's origin"
    );
}

/// A row changed by hand on the target stops parallel apply as it stops single-lane apply:
/// the batch is re-run alone, then row by row, and the error names the table and says the
/// target diverged.
#[tokio::test(flavor = "multi_thread")]
async fn parallel_apply_stops_on_a_diverged_row() {
    let slot = "t_par_diverged_slot";
    let (src, dst) = fresh_db_pair("t_par_diverged").await;
    exec(&src, SCHEMA).await;
    let dir = workdir("parallel-diverged");
    let d = dir.to_str().unwrap();
    let mut args = clone_follow_args(&src, &dst, d, slot);
    args.extend(["--apply-jobs", "3"]);
    let mut child = spawn_pgtide(&args, &[]);
    wait_for_slot(&dir);
    wait_applied(&src, &dst, slot, &mut child).await;
    exec(&dst, "DELETE FROM accounts WHERE id = 1500").await;
    traffic(&src, 2, 100).await;
    exec(&src, "UPDATE accounts SET balance = -1 WHERE id = 1500").await;
    let out = wait_exit(child, 120);
    assert!(!out.status.success(), "apply went on past a missing row");
    let printed = text(&out);
    assert!(
        printed.contains("accounts") && printed.contains("diverged"),
        "{printed}"
    );
    // The failed batch was re-run alone (the parallel fallback), then row by row, which named
    // the row's table: the same end as single-lane apply.
    assert!(printed.contains("re-running it alone"), "{printed}");
    assert!(printed.contains("one row at a time"), "{printed}");
}
