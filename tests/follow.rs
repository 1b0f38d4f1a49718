//! clone --follow and follow against the real clusters: a live source copied and caught up,
//! endpos honoured exactly, values that broke other tools, and SIGKILL during apply.

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use common::*;

fn wait_exit(child: Child, secs: u64) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut child = child;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("pgtide did not finish in {secs} s:\n{}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until clone --follow has created its slot (its consistent point is recorded): changes
/// made before that are part of the copy, not of the stream.
fn wait_for_slot(dir: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
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
        assert!(Instant::now() < deadline, "the slot was never created");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Tricky values: quotes, backslashes, bytea, bigints above 2^53, numeric(38,10), NaN and
/// ±Infinity, NULLs that are updated and deleted again.
const TRICKY: &str = "
    CREATE TABLE tricky (id bigint PRIMARY KEY, t text, b bytea, n numeric(38,10), f float8, big text);
    CREATE TABLE twins (a int, b text);
    ALTER TABLE twins REPLICA IDENTITY FULL;
    INSERT INTO twins VALUES (1, 'same'), (1, 'same'), (2, NULL);
    INSERT INTO tricky VALUES (1, 'seed', NULL, 1, 1, (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 300) g));
";

async fn traffic(src: &str, rounds: i64) {
    let client = connect(src).await;
    for i in 0..rounds {
        let id = 9_007_199_254_740_993i64 + i; // above 2^53: a double cannot hold it
        client
            .execute(
                "INSERT INTO tricky VALUES ($1, $2, $3, $4::text::numeric, $5::text::float8, NULL)",
                &[
                    &id,
                    &format!("it's a \"quote\" \\ back\\slash {i}"),
                    &vec![0u8, 1, 2, 255, b'\\'],
                    &"1234567890123456789012345678.0123456789",
                    &["NaN", "Infinity", "-Infinity", "1e-300"][(i % 4) as usize],
                ],
            )
            .await
            .unwrap();
        client
            .execute("UPDATE tricky SET t = t || '!' WHERE id = $1", &[&id])
            .await
            .unwrap();
        // The TOASTed column stays untouched by this update: it must not become NULL.
        client
            .execute("UPDATE tricky SET n = n + 1 WHERE id = 1", &[])
            .await
            .unwrap();
        if i % 3 == 0 {
            client
                .execute("UPDATE tricky SET id = id + 1000000 WHERE id = $1", &[&id])
                .await
                .unwrap();
        }
        if i % 5 == 0 {
            client
                .execute("DELETE FROM tricky WHERE id = $1", &[&(id + 1000000)])
                .await
                .unwrap();
        }
        client
            .execute(
                "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                &[&(((i * 37) % 5000 + 1) as i32)],
            )
            .await
            .unwrap();
    }
    // One of two identical rows of a FULL-identity table is deleted: exactly one goes.
    client
        .execute(
            "DELETE FROM twins WHERE ctid = (SELECT ctid FROM twins WHERE a = 1 LIMIT 1)",
            &[],
        )
        .await
        .unwrap();
    // A row holding a NULL is updated, then deleted.
    client
        .execute("UPDATE twins SET b = 'was null' WHERE a = 2", &[])
        .await
        .unwrap();
    client
        .execute("UPDATE twins SET b = NULL WHERE a = 2", &[])
        .await
        .unwrap();
    client
        .execute("DELETE FROM twins WHERE a = 2", &[])
        .await
        .unwrap();
    client
        .batch_execute("TRUNCATE scratch; INSERT INTO scratch VALUES (42)")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn clone_follow_catches_up_a_live_source() {
    let (src, dst) = fresh_db_pair("t_follow").await;
    exec(&src, &hard_cases_sql()).await;
    // Tables without a primary key need a replica identity before they are published.
    exec(
        &src,
        "ALTER TABLE no_pk REPLICA IDENTITY FULL; ALTER TABLE slots REPLICA IDENTITY FULL;",
    )
    .await;
    exec(&src, TRICKY).await;
    exec(
        &src,
        "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint, filler text);
         INSERT INTO accounts SELECT g, 0, repeat('x', 80) FROM generate_series(1, 5000) g;
         CREATE TABLE scratch (v int); INSERT INTO scratch VALUES (1);
         ALTER TABLE scratch REPLICA IDENTITY FULL;",
    )
    .await;
    let dir = workdir("follow");
    let d = dir.to_str().unwrap();
    // Slow every copied part a little so that the traffic overlaps the copy.
    let child = spawn_pgtide(
        &[
            "clone",
            "--follow",
            "--source",
            &src,
            "--target",
            &dst,
            "--dir",
            d,
            "--slot-name",
            "t_follow_slot",
            "--table-jobs",
            "2",
        ],
        &[("FAILPOINTS", "copy.before_commit=sleep(150)")],
    );
    wait_for_slot(&dir);
    traffic(&src, 60).await;
    // Sequences move too; follow sets them at endpos.
    exec(
        &src,
        "SELECT nextval('standalone_seq'); SELECT nextval('sales.customers_id_seq');",
    )
    .await;
    let out = pgtide_ok(&[
        "sentinel",
        "set",
        "endpos",
        "--current",
        "--dir",
        d,
        "--source",
        &src,
    ]);
    assert!(out.contains("endpos set to"), "{out}");
    let out = wait_exit(child, 180);
    assert!(
        out.status.success(),
        "clone --follow failed:\n{}",
        text(&out)
    );
    assert!(text(&out).contains("reached endpos"), "{}", text(&out));
    assert_identical(&src, &dst);
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM twins WHERE a = 1").await,
        1
    );
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM tricky WHERE big IS NULL AND id = 1"
        )
        .await,
        0
    );
    let sentinel = pgtide_ok_stdout(&["sentinel", "get", "--dir", d]);
    let sentinel: serde_json::Value = serde_json::from_str(&sentinel).unwrap();
    assert_eq!(sentinel["apply"], true);
    assert!(sentinel["applied_lsn"].is_string(), "{sentinel}");
    // Sequences again, with the safety gap operators add before switching traffic.
    pgtide_ok(&[
        "copy",
        "sequences",
        "--source",
        &src,
        "--target",
        &dst,
        "--offset",
        "1000",
    ]);
    let next = "SELECT nextval('standalone_seq')";
    assert_eq!(
        scalar_i64(&dst, next).await - scalar_i64(&src, next).await,
        1000
    );
    // cleanup removes what pgtide created on both sides, and can run again.
    for _ in 0..2 {
        pgtide_ok(&["cleanup", "--source", &src, "--target", &dst, "--dir", d]);
    }
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 't_follow_slot'"
        )
        .await,
        0
    );
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_publication WHERE pubname = 'pgtide_t_follow_slot'"
        )
        .await,
        0
    );
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_replication_origin WHERE roname = 'pgtide_t_follow_slot'"
        )
        .await,
        0
    );
}

/// Every transaction committed at or before endpos is applied, none after; a SIGKILL during
/// apply and a rerun of follow apply nothing twice.
#[tokio::test(flavor = "multi_thread")]
async fn endpos_is_exact_and_apply_survives_sigkill() {
    let (src, dst) = fresh_db_pair("t_follow_endpos").await;
    exec(
        &src,
        "CREATE TABLE e (id int PRIMARY KEY, v text); INSERT INTO e VALUES (0, 'copied');",
    )
    .await;
    let dir = workdir("follow-endpos");
    let d = dir.to_str().unwrap();
    // The copy is slowed so that the changes and the endpos are in place before apply starts.
    let child = spawn_pgtide(
        &[
            "clone",
            "--follow",
            "--source",
            &src,
            "--target",
            &dst,
            "--dir",
            d,
            "--slot-name",
            "t_follow_endpos_slot",
        ],
        &[("FAILPOINTS", "copy.before_commit=sleep(2000)")],
    );
    wait_for_slot(&dir);
    let client = connect(&src).await;
    let mut endpos = String::new();
    for id in 1..=50 {
        client
            .execute("INSERT INTO e VALUES ($1, 'streamed')", &[&id])
            .await
            .unwrap();
        if id == 25 {
            endpos = current_lsn(&src).await;
        }
    }
    pgtide_ok(&["sentinel", "set", "endpos", &endpos, "--dir", d]);
    let out = wait_exit(child, 120);
    assert!(
        out.status.success(),
        "clone --follow failed:\n{}",
        text(&out)
    );
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM e").await,
        26,
        "rows 0..=25 and nothing after endpos"
    );
    assert_eq!(scalar_i64(&dst, "SELECT max(id)::bigint FROM e").await, 25);

    // More changes; follow is SIGKILLed while it applies (inside its slowed commit), then
    // rerun: every row once, identical to the source.
    for id in 51..=100 {
        client
            .execute("INSERT INTO e VALUES ($1, 'later')", &[&id])
            .await
            .unwrap();
        client
            .execute("UPDATE e SET v = v || '+' WHERE id = $1", &[&(id - 50)])
            .await
            .unwrap();
    }
    let end = current_lsn(&src).await;
    let mut child = spawn_pgtide(
        &[
            "follow", "--source", &src, "--target", &dst, "--dir", d, "--endpos", &end,
        ],
        &[("FAILPOINTS", "apply.before_commit=sleep(5000)")],
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "follow ended before it could be killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let out = pgtide_ok(&[
        "follow", "--source", &src, "--target", &dst, "--dir", d, "--endpos", &end,
    ]);
    assert!(out.contains("reached endpos"), "{out}");
    assert_identical(&src, &dst);
    pgtide_ok(&["stream", "cleanup", "--source", &src, "--dir", d]);
}

/// A column added on the source stops apply before the first change that carries it, with the
/// table and the fix named; once the target has the column, follow continues to identical.
#[tokio::test(flavor = "multi_thread")]
async fn schema_drift_stops_apply_with_the_fix() {
    let (src, dst) = fresh_db_pair("t_follow_drift").await;
    exec(
        &src,
        "CREATE TABLE d (id int PRIMARY KEY, v text); INSERT INTO d VALUES (0, 'copied');",
    )
    .await;
    let dir = workdir("follow-drift");
    let d = dir.to_str().unwrap();
    let child = spawn_pgtide(
        &[
            "clone",
            "--follow",
            "--source",
            &src,
            "--target",
            &dst,
            "--dir",
            d,
            "--slot-name",
            "t_follow_drift_slot",
        ],
        &[],
    );
    wait_for_slot(&dir);
    exec(&src, "INSERT INTO d VALUES (1, 'before the change')").await;
    exec(&src, "ALTER TABLE d ADD COLUMN extra text").await;
    exec(&src, "INSERT INTO d VALUES (2, 'after the change', 'x')").await;
    let endpos = current_lsn(&src).await;
    pgtide_ok(&["sentinel", "set", "endpos", &endpos, "--dir", d]);
    let out = wait_exit(child, 120);
    assert!(
        !out.status.success(),
        "apply should stop on schema drift:\n{}",
        text(&out)
    );
    let message = text(&out);
    assert!(
        message.contains("schema drift on public.d")
            && message.contains("\"extra\"")
            && message.contains("ALTER TABLE"),
        "{message}"
    );
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM d WHERE id = 2").await,
        0,
        "nothing after the drift is applied"
    );

    exec(&dst, "ALTER TABLE d ADD COLUMN extra text").await;
    pgtide_ok(&[
        "follow", "--source", &src, "--target", &dst, "--dir", d, "--endpos", &endpos,
    ]);
    assert_identical(&src, &dst);
    pgtide_ok(&["stream", "cleanup", "--source", &src, "--dir", d]);
}

/// The target session of apply dies (as in a target restart): follow reconnects, resumes from
/// the origin and ends identical.
#[tokio::test(flavor = "multi_thread")]
async fn apply_reconnects_after_losing_the_target() {
    let (src, dst) = fresh_db_pair("t_follow_lost").await;
    exec(
        &src,
        "CREATE TABLE l (id int PRIMARY KEY, n int); INSERT INTO l VALUES (0, 0);",
    )
    .await;
    let dir = workdir("follow-lost");
    let d = dir.to_str().unwrap();
    let child = spawn_pgtide(
        &[
            "clone",
            "--follow",
            "--source",
            &src,
            "--target",
            &dst,
            "--dir",
            d,
            "--slot-name",
            "t_follow_lost_slot",
        ],
        &[("FAILPOINTS", "apply.before_commit=sleep(300)")],
    );
    wait_for_slot(&dir);
    let client = connect(&src).await;
    for id in 1..=40 {
        client
            .execute("INSERT INTO l VALUES ($1, 0)", &[&id])
            .await
            .unwrap();
        client
            .execute("UPDATE l SET n = n + 1 WHERE id = 0", &[])
            .await
            .unwrap();
    }
    let applied_something = "SELECT count(*) FROM pg_replication_origin_status
                             WHERE external_id = 'pgtide_t_follow_lost_slot' AND remote_lsn > '0/0'";
    let deadline = Instant::now() + Duration::from_secs(120);
    while scalar_i64(&dst, applied_something).await == 0 {
        assert!(Instant::now() < deadline, "apply never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let killed = scalar_i64(
        &admin_uri("target"),
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                              WHERE datname = 't_follow_lost' AND application_name = 'pgtide') t",
    )
    .await;
    assert!(killed >= 1, "no apply session to terminate");
    for id in 41..=60 {
        client
            .execute("INSERT INTO l VALUES ($1, 0)", &[&id])
            .await
            .unwrap();
    }
    let endpos = current_lsn(&src).await;
    pgtide_ok(&["sentinel", "set", "endpos", &endpos, "--dir", d]);
    let out = wait_exit(child, 120);
    assert!(
        out.status.success(),
        "clone --follow failed:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains("reconnecting to the target"),
        "{}",
        text(&out)
    );
    assert_identical(&src, &dst);
    pgtide_ok(&["stream", "cleanup", "--source", &src, "--dir", d]);
}
