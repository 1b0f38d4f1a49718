//! clone --follow and follow against the real clusters: a live source copied and caught up,
//! endpos honoured exactly, values that broke other tools, and SIGKILL during apply.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgtide::failpoints::{APPLY_BEFORE_COMMIT, COPY_BEFORE_COMMIT};
use tokio_postgres::error::SqlState;

/// Tricky values: quotes, backslashes, bytea, bigints above 2^53, numeric(38,10), NaN and
/// ±Infinity, NULLs that are updated and deleted again.
const TRICKY: &str = "
    CREATE TABLE tricky (id bigint PRIMARY KEY, t text, b bytea, n numeric(38,10), f float8, big text);
    CREATE TABLE twins (a int, b text);
    ALTER TABLE twins REPLICA IDENTITY FULL;
    INSERT INTO twins VALUES (1, 'same'), (1, 'same'), (2, NULL);
    INSERT INTO tricky VALUES (1, 'seed', NULL, 1, 1, (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 300) g));
    CREATE TABLE people (id int PRIMARY KEY, email text UNIQUE);
    INSERT INTO people VALUES (1, 'a'), (2, 'b');
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
    // Two rows swap a unique value in one transaction: merged into one multi-row UPDATE the
    // swap conflicts midway, so apply must replay that batch one row at a time.
    client
        .batch_execute(
            "BEGIN; UPDATE people SET email = 'tmp' WHERE id = 1; UPDATE people SET email = 'a' WHERE id = 2;
             UPDATE people SET email = 'b' WHERE id = 1; COMMIT",
        )
        .await
        .unwrap();
    // A partitioned table: changes arrive for its leaf partitions, including an update that
    // moves a row to another partition (a delete there and an insert here).
    client
        .batch_execute(
            "INSERT INTO events SELECT i, date '2024-03-01' + (i % 30), 'live ' || i FROM generate_series(100001, 100100) i;
             UPDATE events SET payload = payload || ' (seen)' WHERE id BETWEEN 100001 AND 100020;
             UPDATE events SET created = date '2030-01-01' WHERE id = 100021;
             DELETE FROM events WHERE id BETWEEN 100090 AND 100100;
             UPDATE events SET payload = 'old row updated' WHERE id = 7;",
        )
        .await
        .unwrap();
    // Rows of every hard-case type go through apply, in a table whose key is a GENERATED
    // ALWAYS identity and which has a generated column.
    client
        .batch_execute(
            "INSERT INTO hard_types (uid, n, f4, f8, big_text, doc, blob, ints, texts, m, p, addr, r, fr, tsr, ts, tstz, d, iv, h)
               SELECT gen_random_uuid(), n, f4, f8, big_text, doc, blob, ints, texts, m, p, addr, r, fr, tsr, ts, tstz, d, iv, h
               FROM hard_types WHERE id <= 30;
             UPDATE hard_types SET n = 7, texts = texts || ARRAY['more'] WHERE id > 300;
             UPDATE hard_types SET big_text = big_text || 'x' WHERE id IN (10, 20);
             DELETE FROM hard_types WHERE id IN (5, 305);",
        )
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
    // pgbench's tables too, with pgbench writing while the clone and apply run.
    let init = pgbench(&source_port(), "t_follow", &["-i", "-q", "-s", "1"])
        .wait_with_output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    exec(&src, "ALTER TABLE pgbench_history REPLICA IDENTITY FULL").await;
    let dir = workdir("follow");
    let d = dir.to_str().unwrap();
    // Slow every copied part a little so that the traffic overlaps the copy.
    let child = spawn_pgtide(
        &[
            clone_follow_args(&src, &dst, d, "t_follow_slot"),
            vec!["--table-jobs", "2"],
        ]
        .concat(),
        &[(
            "FAILPOINTS",
            format!("{COPY_BEFORE_COMMIT}=sleep(150)").as_str(),
        )],
    );
    wait_for_slot(&dir);
    let load = pgbench(&source_port(), "t_follow", &["-n", "-c", "2", "-T", "4"]);
    traffic(&src, 60).await;
    let load = load.wait_with_output().unwrap();
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
    // Sequences move too; follow sets them at endpos.
    exec(
        &src,
        "SELECT nextval('standalone_seq'); SELECT nextval('sales.customers_id_seq');",
    )
    .await;
    // The writes have stopped: cutover pins endpos, waits for this follow to reach it, sets
    // the sequences and verifies.
    let out = pgtide_ok(&Args::cutover(&src, &dst, d).args(&["--timeout", "150s"]));
    assert!(
        out.contains("cutover complete") && out.contains("tables identical"),
        "{out}"
    );
    let out = wait_exit(child, 180);
    assert!(
        out.status.success(),
        "clone --follow failed:\n{}",
        text(&out)
    );
    assert!(text(&out).contains("reached endpos"), "{}", text(&out));
    // The unique swap in `people` made a merged statement fail; the batch was replayed.
    assert!(
        text(&out).contains("replaying the batch one row at a time"),
        "{}",
        text(&out)
    );
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
        pgtide_ok(&Args::cleanup(&src, &dst, d));
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
    // The source's pgtide publication was never copied to the target.
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_publication WHERE pubname LIKE 'pgtide%'"
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
        &clone_follow_args(&src, &dst, d, "t_follow_endpos_slot"),
        &[(
            "FAILPOINTS",
            format!("{COPY_BEFORE_COMMIT}=sleep(2000)").as_str(),
        )],
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
        &[(
            "FAILPOINTS",
            format!("{APPLY_BEFORE_COMMIT}=sleep(5000)").as_str(),
        )],
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

/// Without DDL capture (`--no-ddl-capture`), a column added on the source stops apply before
/// the first change that carries it, with the table and the fix named; once the target has the
/// column, follow continues to identical.
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
            clone_follow_args(&src, &dst, d, "t_follow_drift_slot"),
            vec!["--no-ddl-capture"],
        ]
        .concat(),
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
        &clone_follow_args(&src, &dst, d, "t_follow_lost_slot"),
        &[(
            "FAILPOINTS",
            format!("{APPLY_BEFORE_COMMIT}=sleep(300)").as_str(),
        )],
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
    if killed == 0 {
        let mut child = child;
        child.kill().ok();
        panic!(
            "no apply session to terminate:\n{}",
            text(&child.wait_with_output().unwrap())
        );
    }
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

/// A small deterministic generator for the kill moments (the seed is printed on failure).
fn next_random(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    *seed >> 33
}

/// Ten SIGKILLs at random moments of one clone --follow run while the source takes traffic:
/// during the slowed copy (partial tables are copied again under a new snapshot whose LSN apply
/// honours), during index builds, receive and apply. Each is followed by `clone --follow
/// --resume`; the final state is identical to the source: nothing lost, nothing applied twice.
#[tokio::test(flavor = "multi_thread")]
async fn clone_follow_survives_ten_sigkills() {
    let (src, dst) = fresh_db_pair("t_soak").await;
    exec(
        &src,
        "CREATE TABLE big (id int PRIMARY KEY, v bigint, pad text);
         INSERT INTO big SELECT g, 0, repeat('p', 200) FROM generate_series(1, 60000) g;
         CREATE INDEX big_v ON big (v);
         CREATE TABLE events (id bigserial PRIMARY KEY, note text);
         CREATE TABLE bag (a int, b text);
         ALTER TABLE bag REPLICA IDENTITY FULL;
         INSERT INTO bag SELECT g % 10, 'x' FROM generate_series(1, 100) g;
         CREATE TABLE small (k text PRIMARY KEY, n int);
         INSERT INTO small SELECT 'k' || g, g FROM generate_series(1, 100) g;",
    )
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let src = src.clone();
        tokio::spawn(async move {
            let client = connect(&src).await;
            let mut i: i32 = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let mut sql = format!(
                    "BEGIN; UPDATE big SET v = v + 1 WHERE id = {}; INSERT INTO events (note) VALUES ('e{i}');",
                    (i * 7919) % 60000 + 1
                );
                if i % 7 == 0 {
                    sql += &format!(
                        "DELETE FROM bag WHERE ctid = (SELECT ctid FROM bag WHERE a = {} LIMIT 1); INSERT INTO bag VALUES ({}, 'y{i}');",
                        i % 10,
                        i % 10
                    );
                }
                if i % 11 == 0 {
                    sql += "UPDATE small SET k = k || 'x' WHERE k = (SELECT min(k) FROM small);";
                }
                if i % 13 == 0 {
                    sql += &format!(
                        "DELETE FROM big WHERE id = {}; INSERT INTO big VALUES ({}, 1, 'new');",
                        (i * 31) % 60000 + 1,
                        100_000 + i
                    );
                }
                sql += "COMMIT;";
                client.batch_execute(&sql).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            i
        })
    };
    let dir = workdir("soak");
    let d = dir.to_str().unwrap();
    let base = [
        "clone",
        "--follow",
        "--source",
        &src,
        "--target",
        &dst,
        "--dir",
        d,
        "--slot-name",
        "t_soak_slot",
        "--table-jobs",
        "2",
        "--split-tables-larger-than",
        "2MB",
    ];
    let seed0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut seed = seed0;
    let mut log = String::new();
    for round in 0..10 {
        let mut args = base.to_vec();
        if round > 0 {
            args.push("--resume");
        }
        // The first rounds slow every copied part, so that kills land in the copy; later ones
        // let the clone finish, so that kills land in receive and apply.
        let slow_copy = format!("{COPY_BEFORE_COMMIT}=sleep(300)");
        let env: &[(&str, &str)] = if round < 5 {
            &[("FAILPOINTS", slow_copy.as_str())]
        } else {
            &[]
        };
        let mut child = spawn_pgtide(&args, env);
        let wait = 300 + next_random(&mut seed) % 2_500;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let finished = child.try_wait().unwrap();
        child.kill().ok();
        let out = child.wait_with_output().unwrap();
        assert!(
            finished.is_none(),
            "round {round}: pgtide ended before its kill (seed {seed0}):\n{}",
            text(&out)
        );
        log += &format!("round {round}: killed after {wait} ms\n");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let transactions = traffic.await.unwrap();
    set_endpos_now(d, &src);
    let mut args = base.to_vec();
    args.push("--resume");
    let out = wait_exit(spawn_pgtide(&args, &[]), 180);
    assert!(
        out.status.success(),
        "the final resume failed (seed {seed0}):\n{log}{}",
        text(&out)
    );
    assert!(
        transactions > 100,
        "the traffic ran {transactions} transactions"
    );
    assert_identical(&src, &dst);
}

/// cutover --fence: the application role is made read-only on the source and its session
/// ended, endpos is pinned, the running clone --follow reaches it, sequences are copied, verify
/// says identical and the downtime window is printed; --unfence restores the role. A cutover
/// that fails (here: verify finds a row changed by hand on the target) lifts its fence.
#[tokio::test(flavor = "multi_thread")]
async fn cutover_fences_catches_up_verifies_and_unfences_on_failure() {
    let (src, dst) = fresh_db_pair("t_cutover").await;
    let app_password = "app-secret-4711";
    // Roles are not part of a database dump: the application role exists on both servers, as
    // an operator creates it (pg_dumpall --roles-only) before migrating.
    let role = format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 't_cutover_app') THEN
             CREATE ROLE t_cutover_app LOGIN PASSWORD '{app_password}';
           END IF;
         END $$;"
    );
    exec(&admin_uri("target"), &role).await;
    exec(
        &src,
        &format!(
            "{role}
             CREATE TABLE orders (id bigserial PRIMARY KEY, item text);
             GRANT ALL ON orders, orders_id_seq TO t_cutover_app;
             INSERT INTO orders (item) SELECT 'seed ' || g FROM generate_series(1, 100) g;"
        ),
    )
    .await;
    let app_uri = |uri: &str| {
        let (_, rest) = uri.split_once('@').unwrap();
        format!("postgres://t_cutover_app:{app_password}@{rest}")
    };
    let app_src = app_uri(&src);
    let dir = workdir("cutover");
    let d = dir.to_str().unwrap();
    let child = spawn_pgtide(&clone_follow_args(&src, &dst, d, "t_cutover_slot"), &[]);
    wait_for_slot(&dir);
    // The application writes until the fence stops it.
    let app = connect(&app_src).await;
    let writer = tokio::spawn(async move {
        let mut committed = 0u64;
        loop {
            match app
                .execute("INSERT INTO orders (item) VALUES ('live')", &[])
                .await
            {
                Ok(_) => committed += 1,
                Err(e) => return (committed, e),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // Let the clone finish and apply catch up with some of the traffic.
    let deadline = Instant::now() + Duration::from_secs(60);
    let applied = "SELECT count(*) FROM pg_replication_origin_status
                   WHERE external_id = 'pgtide_t_cutover_slot' AND remote_lsn > '0/0'";
    while scalar_i64(&dst, applied).await == 0 {
        if Instant::now() > deadline {
            let mut child = child;
            child.kill().ok();
            panic!(
                "apply never started:\n{}",
                text(&child.wait_with_output().unwrap())
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = pgtide_ok(&Args::cutover(&src, &dst, d).args(&["--fence", "--timeout", "60s"]));
    eprintln!("{out}");
    assert!(out.contains("cutover complete"), "{out}");
    assert!(out.contains("write downtime"), "{out}");
    assert!(out.contains("tables identical"), "{out}");
    assert!(out.contains("t_cutover_app"), "{out}");
    let (committed, error) = writer.await.unwrap();
    assert!(committed > 0, "the application never wrote");
    // The fence ends the session with pg_terminate_backend: the server sends FATAL 57P01
    // (admin_shutdown) and closes the socket. Which error the application's next call gets
    // depends on where the session was when the signal came (the race this test once lost,
    // when it matched tokio-postgres's Display, which is the bare "db error" for any server
    // error):
    // - inside the INSERT (or with it already sent): the FATAL is the reply to the query, an
    //   error from the server with SQLSTATE 57P01;
    // - idle, in the writer's sleep: the FATAL arrives unasked, tokio-postgres's connection
    //   task ends on it, and the next INSERT fails as "connection closed" (is_closed), as it
    //   also does when the socket is gone before the query's reply is read.
    // Anything else (a read-only refusal, a timeout, another server error) is not the fence
    // ending the session.
    assert!(
        error.code() == Some(&SqlState::ADMIN_SHUTDOWN) || error.is_closed(),
        "the application's session was not ended by the fence: {error:?}"
    );
    let out = wait_exit(child, 60);
    assert!(
        out.status.success(),
        "clone --follow failed:\n{}",
        text(&out)
    );
    assert_identical(&src, &dst);
    let last = "SELECT last_value FROM orders_id_seq";
    assert_eq!(scalar_i64(&dst, last).await, scalar_i64(&src, last).await);
    // The fenced role cannot write on the source any more.
    let app = connect(&app_src).await;
    let refused = app
        .execute("INSERT INTO orders (item) VALUES ('after')", &[])
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("read-only") || format!("{refused:?}").contains("25006"),
        "{refused:?}"
    );
    pgtide_ok(&Args::cutover(&src, &dst, d).arg("--unfence"));
    let app = connect(&app_src).await;
    app.execute("INSERT INTO orders (item) VALUES ('unfenced')", &[])
        .await
        .unwrap();

    // A failing cutover (the target diverged by hand) lifts its fence and says so. No follow
    // runs now, so cutover applies to endpos itself first.
    exec(
        &dst,
        "UPDATE orders SET item = 'changed by hand' WHERE id = 1",
    )
    .await;
    let err = pgtide_fails(&Args::cutover(&src, &dst, d).args(&["--fence", "--timeout", "60s"]));
    assert!(err.contains("verify found differences"), "{err}");
    assert!(err.contains("fence is lifted"), "{err}");
    assert!(!err.contains(&password()), "{err}");
    let app = connect(&app_src).await;
    app.execute("INSERT INTO orders (item) VALUES ('writable again')", &[])
        .await
        .unwrap();
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}

/// The target server is restarted (pg_ctl restart) while apply runs: follow reconnects,
/// resumes from the origin and ends identical. The target is a server of this test's own.
#[tokio::test(flavor = "multi_thread")]
async fn apply_survives_a_target_restart() {
    let (src, _) = fresh_db_pair("t_restart").await;
    let server = PrivateServer::start("restart");
    let dst = server.uri.clone();
    exec(
        &src,
        "CREATE TABLE r (id int PRIMARY KEY, n int); INSERT INTO r VALUES (0, 0);",
    )
    .await;
    let dir = workdir("follow-restart");
    let d = dir.to_str().unwrap();
    let child = spawn_pgtide(
        &clone_follow_args(&src, &dst, d, "t_restart_slot"),
        &[(
            "FAILPOINTS",
            format!("{APPLY_BEFORE_COMMIT}=sleep(200)").as_str(),
        )],
    );
    wait_for_slot(&dir);
    let client = connect(&src).await;
    let traffic = |from: i32| {
        let client = &client;
        async move {
            for id in from..from + 40 {
                client
                    .batch_execute(&format!(
                        "INSERT INTO r VALUES ({id}, 0); UPDATE r SET n = n + 1 WHERE id = 0"
                    ))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    traffic(1).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while scalar_i64(
        &dst,
        "SELECT count(*) FROM pg_replication_origin_status WHERE remote_lsn > '0/0'",
    )
    .await
        == 0
    {
        assert!(Instant::now() < deadline, "apply never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.restart();
    traffic(100).await;
    let endpos = current_lsn(&src).await;
    pgtide_ok(&["sentinel", "set", "endpos", &endpos, "--dir", d]);
    let out = wait_exit(child, 120);
    assert!(
        out.status.success(),
        "follow did not survive the restart:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains("reconnecting to the target"),
        "{}",
        text(&out)
    );
    assert_identical(&src, &dst);
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}

/// --replica-identity-full sets FULL on a table without a key (pgtide runs the ALTER); an
/// --append-only table is published for INSERT and TRUNCATE only: an UPDATE on it works on the
/// source (it would fail in a full publication) and is, as declared, not replicated.
#[tokio::test(flavor = "multi_thread")]
async fn replica_identity_full_and_append_only_tables() {
    let (src, dst) = fresh_db_pair("t_identity").await;
    exec(
        &src,
        "CREATE TABLE keyed (id int PRIMARY KEY, v int);
         CREATE TABLE bag (a int, b text);
         CREATE TABLE log (at int, line text);
         INSERT INTO keyed VALUES (1, 0); INSERT INTO bag VALUES (1, 'x'), (2, 'y');
         INSERT INTO log VALUES (0, 'copied');",
    )
    .await;
    // Without either option the keyless tables are refused before anything is created.
    let dir = workdir("identity");
    let d = dir.to_str().unwrap();
    let out = pgtide_fails(&Args::clone_follow(&src, &dst, d, "t_identity_slot"));
    assert!(
        out.contains("public.bag") && out.contains("public.log") && out.contains("--append-only"),
        "{out}"
    );
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 't_identity_slot'"
        )
        .await,
        0
    );
    let child = spawn_pgtide(
        // --resume on a work dir where nothing started yet starts the migration (what a
        // supervisor restarting the same command relies on).
        &[
            clone_follow_args(&src, &dst, d, "t_identity_slot"),
            vec![
                "--replica-identity-full",
                "--append-only",
                "public.log",
                "--resume",
            ],
        ]
        .concat(),
        &[],
    );
    wait_for_slot(&dir);
    assert_eq!(
        scalar_string(
            &src,
            "SELECT relreplident::text FROM pg_class WHERE oid = 'bag'::regclass"
        )
        .await,
        "f"
    );
    assert_eq!(
        scalar_i64(&src, "SELECT count(*) FROM pg_publication WHERE pubname = 'pgtide_t_identity_slot_append' AND pubinsert AND NOT pubupdate AND NOT pubdelete AND pubtruncate").await,
        1
    );
    exec(
        &src,
        "UPDATE keyed SET v = 5; UPDATE bag SET b = 'z' WHERE a = 1; DELETE FROM bag WHERE a = 2;
         INSERT INTO log VALUES (1, 'one'), (2, 'two');
         UPDATE log SET line = 'changed on the source only' WHERE at = 1;",
    )
    .await;
    set_endpos_now(d, &src);
    let out = wait_exit(child, 120);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("UPDATEs and DELETEs are not replicated"),
        "{}",
        text(&out)
    );
    assert_eq!(
        scalar_i64(&dst, "SELECT v::bigint FROM keyed WHERE id = 1").await,
        5
    );
    assert_eq!(
        scalar_string(&dst, "SELECT string_agg(a || b, ',' ORDER BY a) FROM bag").await,
        "1z"
    );
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM log").await, 3);
    assert_eq!(
        scalar_string(&dst, "SELECT line FROM log WHERE at = 1").await,
        "one",
        "the update of an append-only table is not replicated, as declared"
    );
    pgtide_ok(&Args::cleanup(&src, &dst, d));
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_publication WHERE pubname LIKE 'pgtide_t_identity_slot%'"
        )
        .await,
        0
    );
}

/// An LSN's position ("16/B374D848") as a number.
fn lsn_value(lsn: &str) -> u64 {
    let (high, low) = lsn.split_once('/').expect("an LSN");
    (u64::from_str_radix(high, 16).unwrap() << 32) | u64::from_str_radix(low, 16).unwrap()
}

/// A clone --follow killed before any table was copied re-copies every table on resume, under
/// a snapshot later than every change spooled so far: apply skips them all, commits nothing,
/// and the origin does not move. Status must still see apply caught up (a whole-server run
/// waits for every database to say "ready"), and the spool must not keep them.
#[tokio::test(flavor = "multi_thread")]
async fn a_resume_that_recopies_every_table_is_caught_up_when_everything_is_skipped() {
    let (src, dst) = fresh_db_pair("t_skipped_resume").await;
    exec(
        &src,
        "CREATE TABLE tick (id int PRIMARY KEY);
         CREATE TABLE accounts (id int PRIMARY KEY, balance bigint);
         INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 2000) g;",
    )
    .await;
    let dir = workdir("skipped-resume");
    let d = dir.to_str().unwrap();
    let slow = format!("{COPY_BEFORE_COMMIT}=sleep(60000)");
    // Two apply lanes: batches that skip everything must not be handed to a lane, where
    // nothing counts them as durable.
    let mut child = spawn_pgtide(
        &[
            clone_follow_args(&src, &dst, d, "t_skipped_resume_slot"),
            vec!["--apply-jobs", "2"],
        ]
        .concat(),
        &[("FAILPOINTS", slow.as_str())],
    );
    wait_for_slot(&dir);
    // Changes after the slot, all spooled before the kill: enough transactions to fill
    // batches that apply hands to its lanes.
    exec(
        &src,
        "UPDATE accounts SET balance = balance + 1 WHERE id % 10 = 0",
    )
    .await;
    exec(
        &src,
        "DO $$ BEGIN FOR i IN 1..3000 LOOP
           UPDATE accounts SET balance = balance + 1 WHERE id = 1 + i % 2000; COMMIT;
         END LOOP; END $$",
    )
    .await;
    // The last transaction commits after `before_last`: once the spool's flushed position
    // passes it, everything is spooled (the insert position itself may stay ahead of any
    // commit the stream reports).
    let before_last = lsn_value(&current_lsn(&src).await);
    exec(&src, "INSERT INTO accounts VALUES (5000, 7)").await;
    wait_for_status(&["--dir", d], 60, &mut child, |json| {
        json["spooled_lsn"]
            .as_str()
            .is_some_and(|spooled| lsn_value(spooled) > before_last)
    })
    .await;
    assert_eq!(parts_done(&dir), 0, "killed before any part was copied");
    child.kill().unwrap();
    child.wait().unwrap();

    let mut child = spawn_pgtide(
        &[
            clone_follow_args(&src, &dst, d, "t_skipped_resume_slot"),
            vec!["--resume"],
        ]
        .concat(),
        &[],
    );
    wait_for_status(
        &["--dir", d, "--source", &src, "--target", &dst],
        90,
        &mut child,
        |json| says_ready(json, "/verdict"),
    )
    .await;
    finish_at_current_position(child, &src, d);
    assert_identical(&src, &dst);
}
