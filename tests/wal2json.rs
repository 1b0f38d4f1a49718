//! clone --follow with --plugin wal2json against the real clusters: a live source caught up
//! and cut over with every hard case exact, a SIGKILL during apply of a wal2json spool and
//! --resume applying nothing twice, and the columns wal2json cannot carry refused before
//! anything is created.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgtide::failpoints::{APPLY_BEFORE_COMMIT, COPY_BEFORE_COMMIT};

/// The hard cases made carriable by wal2json: it prints numeric/real/double precision NaN and
/// ±Infinity as null, so those values are replaced and the columns made NOT NULL (a NaN there
/// would stop apply rather than become NULL; check only warns). Everything else stays: -0,
/// extreme exponents, huge numerics, bytea, arrays, json/jsonb, date/time infinities,
/// TOASTed values, partitions, FULL identities.
const CARRIABLE: &str = "
    UPDATE hard_types SET n = 0 WHERE n IS NULL OR n IN ('NaN', 'Infinity', '-Infinity');
    UPDATE hard_types SET f4 = 0 WHERE f4 IN ('NaN', 'Infinity', '-Infinity');
    UPDATE hard_types SET f8 = 0 WHERE f8 IN ('NaN', 'Infinity', '-Infinity');
    ALTER TABLE hard_types ALTER n SET NOT NULL, ALTER f4 SET NOT NULL, ALTER f8 SET NOT NULL;
    ALTER TABLE sales.orders ALTER amount SET NOT NULL;
    ALTER TABLE no_pk ALTER c SET NOT NULL;
    ALTER TABLE no_pk REPLICA IDENTITY FULL; ALTER TABLE slots REPLICA IDENTITY FULL;
    CREATE TABLE tricky (id bigint PRIMARY KEY, t text, b bytea, n numeric(38,10) NOT NULL,
                         f float8 NOT NULL, big text);
    INSERT INTO tricky VALUES (1, 'seed', NULL, 1, 1,
        (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 300) g));
    CREATE TABLE twins (a int, b text);
    ALTER TABLE twins REPLICA IDENTITY FULL;
    INSERT INTO twins VALUES (1, 'same'), (1, 'same'), (2, NULL);
    ALTER TABLE \"Mixed Case\" REPLICA IDENTITY FULL;
    CREATE TABLE people (id int PRIMARY KEY, email text UNIQUE);
    INSERT INTO people VALUES (1, 'a'), (2, 'b');
    CREATE TABLE by_index (a int NOT NULL, b text);
    CREATE UNIQUE INDEX by_index_a ON by_index (a);
    ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_a;
    INSERT INTO by_index SELECT g, 'row ' || g FROM generate_series(1, 10) g;
    CREATE TABLE parent_t (id int PRIMARY KEY);
    CREATE TABLE child_t (id int PRIMARY KEY, parent_id int REFERENCES parent_t (id));
    INSERT INTO parent_t VALUES (1), (2); INSERT INTO child_t VALUES (1, 1), (2, 2);
    CREATE TABLE scratch (v int); ALTER TABLE scratch REPLICA IDENTITY FULL;
    INSERT INTO scratch VALUES (1);
";

/// Writes every hard case while the copy and then apply run.
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
                    &[
                        "-0",
                        "1.7976931348623157e308",
                        "5e-324",
                        "0.30000000000000004",
                    ][(i % 4) as usize],
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
    }
    client
        .batch_execute(
            // One of two identical rows of a FULL-identity table goes, exactly one.
            "DELETE FROM twins WHERE ctid = (SELECT ctid FROM twins WHERE a = 1 LIMIT 1);
             UPDATE twins SET b = 'was null' WHERE a = 2;
             UPDATE twins SET b = NULL WHERE a = 2;
             DELETE FROM twins WHERE a = 2;
             -- REPLICA IDENTITY USING INDEX without a primary key: updates, a key change, a delete.
             UPDATE by_index SET b = 'changed' WHERE a = 1;
             -- REPLICA IDENTITY FULL with a primary key: found by the key.
             UPDATE \"Mixed Case\" SET \"Other Col\" = 'y' WHERE \"Col\" = 1;
             UPDATE \"Mixed Case\" SET \"Col\" = 100 WHERE \"Col\" = 2;
             DELETE FROM \"Mixed Case\" WHERE \"Col\" = 3;
             UPDATE by_index SET a = 100 WHERE a = 2;
             DELETE FROM by_index WHERE a = 3;
             -- TRUNCATE of a FULL table, then of two tables joined by a foreign key (wal2json
             -- sends one message per table: applied as one statement).
             TRUNCATE scratch; INSERT INTO scratch VALUES (42);
             TRUNCATE parent_t, child_t; INSERT INTO parent_t VALUES (7); INSERT INTO child_t VALUES (7, 7);",
        )
        .await
        .unwrap();
    // Two rows swap a unique value in one transaction.
    client
        .batch_execute(
            "BEGIN; UPDATE people SET email = 'tmp' WHERE id = 1; UPDATE people SET email = 'a' WHERE id = 2;
             UPDATE people SET email = 'b' WHERE id = 1; COMMIT",
        )
        .await
        .unwrap();
    // Leaf partitions, and a row moving to another partition.
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
    // Every hard-case type through apply, a GENERATED ALWAYS identity key and a generated
    // column (wal2json sends its value; the target computes its own); the edge values of
    // numeric and float, TOASTed text, jsonb and bytea updated and left unchanged.
    client
        .batch_execute(
            "INSERT INTO hard_types (uid, n, f4, f8, big_text, doc, blob, ints, texts, m, p, addr, r, fr, tsr, ts, tstz, d, iv, h)
               SELECT gen_random_uuid(), n, f4, f8, big_text, doc, blob, ints, texts, m, p, addr, r, fr, tsr, ts, tstz, d, iv, h
               FROM hard_types WHERE id <= 30;
             UPDATE hard_types SET n = 7, texts = texts || ARRAY['more'] WHERE id > 300;
             INSERT INTO hard_types (uid, n, f4, f8) VALUES
               ('00000000-0000-0000-0000-000000000001', '123456789012345678901234567890.123456789012345678901234567890', '-0', '-1.7976931348623157e+308'),
               ('00000000-0000-0000-0000-000000000002', '-0.000000000000000000000000000000000001', '3.4028235e+38', '5e-324'),
               ('00000000-0000-0000-0000-000000000003', '1e-130', '1.175494e-38', '-0');
             UPDATE hard_types SET big_text = big_text || 'x' WHERE id IN (10, 20);
             UPDATE hard_types SET m = 'happy' WHERE id IN (11, 12, 21);
             UPDATE hard_types SET iv = iv + interval '1 microsecond', ts = 'infinity' WHERE id = 3;
             DELETE FROM hard_types WHERE id IN (5, 305);",
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn clone_follow_wal2json_catches_up_a_live_source() {
    let (src, dst) = fresh_db_pair("t_w2j_follow").await;
    exec(&src, &hard_cases_sql()).await;
    exec(&src, CARRIABLE).await;
    let init = pgbench(&source_port(), "t_w2j_follow", &["-i", "-q", "-s", "1"])
        .wait_with_output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    exec(&src, "ALTER TABLE pgbench_history REPLICA IDENTITY FULL").await;
    let dir = workdir("w2j-follow");
    let d = dir.to_str().unwrap();
    // Slow every copied part a little so that the traffic overlaps the copy.
    let child = spawn_pgtide(
        &[
            clone_follow_args(&src, &dst, d, "t_w2j_slot"),
            vec!["--plugin", "wal2json", "--table-jobs", "2"],
        ]
        .concat(),
        &[(
            "FAILPOINTS",
            format!("{COPY_BEFORE_COMMIT}=sleep(150)").as_str(),
        )],
    );
    wait_for_slot(&dir);
    let load = pgbench(
        &source_port(),
        "t_w2j_follow",
        &["-n", "-c", "2", "-T", "4"],
    );
    traffic(&src, 40).await;
    let load = load.wait_with_output().unwrap();
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
    exec(&src, "SELECT nextval('standalone_seq')").await;
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
    assert_identical(&src, &dst);
    // The stream really was wal2json's, and status reads the work dir.
    let recorded = state_count_or_zero(
        &dir,
        "SELECT count(*) FROM meta WHERE key = 'stream.plugin' AND value = 'wal2json'",
    );
    assert_eq!(recorded, 1);
    pgtide_ok(&["status", "--dir", d]);
    // Spot checks of exact values on the target.
    let exact = |sql: &'static str| {
        let dst = dst.clone();
        async move { scalar_string(&dst, sql).await }
    };
    assert_eq!(
        exact("SELECT n::text || ' ' || f4::text || ' ' || f8::text FROM hard_types WHERE uid = '00000000-0000-0000-0000-000000000001'").await,
        "123456789012345678901234567890.123456789012345678901234567890 -0 -1.7976931348623157e+308"
    );
    assert_eq!(
        exact("SELECT n::text || ' ' || f4::text || ' ' || f8::text FROM hard_types WHERE uid = '00000000-0000-0000-0000-000000000002'").await,
        "-0.000000000000000000000000000000000001 3.4028235e+38 5e-324"
    );
    assert_eq!(
        exact("SELECT string_agg(DISTINCT f::text, ',' ORDER BY f::text) FROM tricky WHERE id > 1")
            .await,
        "-0,0.30000000000000004,1.7976931348623157e+308,5e-324"
    );
    assert_eq!(
        exact("SELECT encode(b, 'hex') FROM tricky WHERE id = 9007199254740994").await,
        "000102ff5c"
    );
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM tricky WHERE id = 1 AND length(big) = 9600"
        )
        .await,
        1,
        "an unchanged TOASTed value is never written as NULL"
    );
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM twins WHERE a = 1").await,
        1
    );
    assert_eq!(
        exact("SELECT string_agg(a || ':' || b, ',' ORDER BY a) FROM by_index WHERE a IN (1, 2, 3, 100)").await,
        "1:changed,100:row 2"
    );
    assert_eq!(
        exact("SELECT (SELECT string_agg(id::text, ',') FROM parent_t) || '/' || (SELECT string_agg(id::text, ',') FROM child_t)").await,
        "7/7"
    );
    assert_eq!(
        exact("SELECT created::text FROM events WHERE id = 100021").await,
        "2030-01-01"
    );
    for _ in 0..2 {
        pgtide_ok(&Args::cleanup(&src, &dst, d));
    }
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 't_w2j_slot'"
        )
        .await,
        0
    );
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_replication_origin WHERE roname = 'pgtide_t_w2j_slot'"
        )
        .await,
        0
    );
}

/// A SIGKILL while apply commits a wal2json spool, then `clone --follow --resume` (which
/// takes the plugin from the work dir): every change applied exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn wal2json_apply_survives_sigkill_and_resume() {
    let (src, dst) = fresh_db_pair("t_w2j_kill").await;
    exec(
        &src,
        "CREATE TABLE counter (id int PRIMARY KEY, v bigint NOT NULL, big text);
         INSERT INTO counter VALUES (1, 0, (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 300) g));
         CREATE TABLE log (seq int, note text);
         ALTER TABLE log REPLICA IDENTITY FULL;",
    )
    .await;
    let dir = workdir("w2j-kill");
    let d = dir.to_str().unwrap();
    let child = spawn_pgtide(
        &[
            clone_follow_args(&src, &dst, d, "t_w2j_kill_slot"),
            vec!["--plugin", "wal2json"],
        ]
        .concat(),
        &[(
            "FAILPOINTS",
            format!("{COPY_BEFORE_COMMIT}=sleep(1000);{APPLY_BEFORE_COMMIT}=sleep(700)").as_str(),
        )],
    );
    wait_for_slot(&dir);
    let client = connect(&src).await;
    // Writes before and while apply runs, each its own transaction; none is idempotent:
    // applied twice, the counter or the duplicate log rows would show it.
    let writes = |from: i64, to: i64| {
        let client = &client;
        async move {
            for i in from..to {
                client
                    .batch_execute(&format!(
                        "BEGIN; UPDATE counter SET v = v + 1 WHERE id = 1;
                         INSERT INTO log VALUES ({i}, 'dup'), ({i}, 'dup'); COMMIT"
                    ))
                    .await
                    .unwrap();
                if i % 4 == 0 {
                    client
                        .execute(
                            "DELETE FROM log WHERE ctid = (SELECT ctid FROM log WHERE seq = $1 LIMIT 1)",
                            &[&(i as i32)],
                        )
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
    };
    writes(0, 40).await;
    // Apply has started (the copy is done) and committed some batches, not all.
    let started = Instant::now();
    while state_count_or_zero(
        &dir,
        "SELECT count(*) FROM meta WHERE key = 'phase' AND value = 'following'",
    ) == 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "apply never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writes(40, 100).await;
    let mut child = child;
    assert!(
        child.try_wait().unwrap().is_none(),
        "clone --follow ended before it could be killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let applied = scalar_i64(&dst, "SELECT v FROM counter").await;
    assert!(applied < 100, "the kill came after everything was applied");
    // status reads the wal2json spool: the lag is the age of the oldest unapplied commit
    // (wal2json's commit timestamps), seconds, not decades.
    let status: serde_json::Value =
        serde_json::from_str(&pgtide_ok_stdout(&["status", "--dir", d, "--json"])).unwrap();
    let lag = status["lag_seconds"].as_f64().unwrap_or(-1.0);
    assert!((0.0..600.0).contains(&lag), "{status}");
    writes(100, 120).await;
    let end = current_lsn(&src).await;
    pgtide_ok(&["sentinel", "set", "endpos", &end, "--dir", d]);
    let out = pgtide_ok(
        &[
            clone_follow_args(&src, &dst, d, "t_w2j_kill_slot"),
            vec!["--resume"],
        ]
        .concat(),
    );
    assert!(out.contains("reached endpos"), "{out}");
    assert_eq!(scalar_i64(&dst, "SELECT v FROM counter").await, 120);
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM log").await,
        scalar_i64(&src, "SELECT count(*) FROM log").await
    );
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM counter WHERE length(big) = 9600"
        )
        .await,
        1
    );
    assert_identical(&src, &dst);
    // A resume naming the other plugin is refused: the spool is wal2json's.
    let out = pgtide_fails(
        &[
            clone_follow_args(&src, &dst, d, "t_w2j_kill_slot"),
            vec!["--resume", "--plugin", "pgoutput"],
        ]
        .concat(),
    );
    assert!(out.contains("with --plugin wal2json"), "{out}");
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}

/// wal2json prints numeric/real/double precision NaN and ±Infinity as null: check and
/// `clone --follow --plugin wal2json` name the nullable columns and refuse before anything is
/// created; with --wal2json-nan-as-null they proceed, and a NaN in a NOT NULL column stops
/// apply instead of being written wrong.
#[tokio::test(flavor = "multi_thread")]
async fn wal2json_refuses_columns_it_cannot_carry() {
    let (src, dst) = fresh_db_pair("t_w2j_nan").await;
    exec(
        &src,
        "CREATE TABLE m (id int PRIMARY KEY, n numeric, f float8 NOT NULL, ok numeric[], label text);
         CREATE DOMAIN exact_num AS numeric;
         CREATE TABLE fine (id int PRIMARY KEY, d exact_num, g numeric GENERATED ALWAYS AS (d * 2) STORED);
         INSERT INTO m VALUES (1, 1.5, 2.5, '{NaN}', 'x');",
    )
    .await;
    let out = pgtide_fails(&[
        "check", "--source", &src, "--target", &dst, "--plugin", "wal2json",
    ]);
    assert!(
        out.contains("public.m.n") && out.contains("cannot carry NaN"),
        "{out}"
    );
    assert!(
        out.contains("NOT NULL column(s) public.m.f"),
        "a NOT NULL column is a warning: {out}"
    );
    assert!(
        !out.contains("public.m.ok") && !out.contains("public.fine"),
        "arrays, domains and generated columns are exact: {out}"
    );
    // pgoutput carries them exactly: no such finding.
    let out = pgtide(&["check", "--source", &src, "--target", &dst]);
    assert!(!text(&out).contains("public.m.n"), "{}", text(&out));

    // A stream only spooled (stream setup) is not refused, but follow will not apply it.
    let sdir = workdir("w2j-nan-stream");
    let sd = sdir.to_str().unwrap();
    let out = pgtide_ok(&[
        "stream",
        "setup",
        "--source",
        &src,
        "--dir",
        sd,
        "--plugin",
        "wal2json",
        "--slot-name",
        "t_w2j_nan_stream",
    ]);
    assert!(
        out.contains("public.m.n")
            && out.contains("`follow` will refuse")
            && !out.contains("accepted"),
        "{out}"
    );
    let out = pgtide_fails(&["follow", "--source", &src, "--target", &dst, "--dir", sd]);
    assert!(
        out.contains("public.m.n") && out.contains("Nothing was applied"),
        "{out}"
    );
    pgtide_ok(&["stream", "cleanup", "--source", &src, "--dir", sd]);

    let dir = workdir("w2j-nan");
    let d = dir.to_str().unwrap();
    let args = [
        clone_follow_args(&src, &dst, d, "t_w2j_nan_slot"),
        vec!["--plugin", "wal2json"],
    ]
    .concat();
    let out = pgtide_fails(&args);
    assert!(
        out.contains("public.m.n") && out.contains("--plugin pgoutput"),
        "{out}"
    );
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 't_w2j_nan_slot'"
        )
        .await,
        0,
        "nothing was created"
    );
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        )
        .await,
        0
    );

    // Accepted: the migration runs; a NaN in the NOT NULL column arrives as null and apply
    // stops there rather than write something else.
    let child = spawn_pgtide(
        &[args.clone(), vec!["--wal2json-nan-as-null"]].concat(),
        &[],
    );
    wait_for_slot(&dir);
    exec(
        &src,
        "INSERT INTO m VALUES (2, 'NaN', 'NaN', '{1}', 'nan row')",
    )
    .await;
    let out = wait_exit(child, 120);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("null value") && text(&out).contains("most likely NaN, Infinity"),
        "{}",
        text(&out)
    );
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM m WHERE id = 2").await,
        0,
        "no wrong value was written"
    );
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}
