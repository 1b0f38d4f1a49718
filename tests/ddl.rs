//! Schema changes during follow (DDL capture): made on the source under traffic, replayed on
//! the target at their place in the commit order; what cannot be replayed faithfully stops
//! apply with the statement and the fix, and `pgtide ddl skip|retry` decides; cleanup removes
//! the capture.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// Waits until the target's origin is past the source's current position: everything
/// committed so far is applied.
async fn wait_caught_up(src: &str, dst: &str, slot: &str, child: &mut PgtideChild) {
    let lsn = current_lsn(src).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let sql = format!(
        "SELECT count(*) FROM pg_replication_origin_status
         WHERE external_id = 'pgtide_{slot}' AND remote_lsn >= '{lsn}'"
    );
    // The origin moves only with a commit after `lsn`.
    exec(src, "INSERT INTO tick VALUES (DEFAULT)").await;
    while scalar_i64(dst, &sql).await == 0 {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            child.kill().ok();
            child.wait().ok();
            panic!("apply did not catch up:\n{}", child.output_so_far());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `pg_dump --schema-only` of a database without pgtide's own objects and without the lines
/// that differ by nature (the server's version banner).
fn schema_dump(uri: &str) -> String {
    let bin = std::path::PathBuf::from(std::env::var("PGTIDE_PG_BIN").expect("PGTIDE_PG_BIN"));
    let out = std::process::Command::new(bin.join("pg_dump"))
        .args([
            "--schema-only",
            "--no-comments",
            "--exclude-schema=pgtide",
            "-d",
            uri,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One block per object ("--\n-- Name: …"): pgtide's publications and event triggers go
    // whole; `\restrict` lines carry a random key.
    let dump = String::from_utf8(out.stdout).unwrap();
    let body = dump
        .split("-- PostgreSQL database dump complete")
        .next()
        .unwrap_or_default()
        .to_string();
    body.split("\n--\n-- Name: ")
        .filter(|block| !block.contains("pgtide"))
        .flat_map(|block| block.lines())
        .filter(|l| {
            !l.starts_with("-- Dumped")
                && !l.contains("restrict ")
                && !l.trim().is_empty()
                && l.trim() != "--"
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The tables' comments (pg_dump --no-comments leaves them out of the comparison above).
async fn comments(uri: &str) -> String {
    scalar_string(
        uri,
        "SELECT coalesce(string_agg(c.relname || '=' || d.description, ',' ORDER BY c.relname), '')
           FROM pg_description d JOIN pg_class c ON c.oid = d.objoid AND d.classoid = 'pg_class'::regclass
          WHERE d.objsubid = 0",
    )
    .await
}

/// Writes to `orders` and `tick` until stopped: inserts, updates and deletes of rows, whatever
/// the columns are at the moment (only `id` is never changed).
fn traffic(src: &str, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let src = src.to_string();
    tokio::spawn(async move {
        let client = connect(&src).await;
        let mut n = 1_000_000i64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            client
                .batch_execute(&format!(
                    "INSERT INTO orders (id) VALUES ({n}); UPDATE orders SET id = id WHERE id = {}; DELETE FROM orders WHERE id = {};",
                    n - 3,
                    n - 7
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (n - 1_000_000) as u64
    })
}

/// The done-when test of issue 13: under traffic, the source adds and drops columns, renames a
/// column and a table, creates an index (CONCURRENTLY), creates and fills a new table (in its
/// creating transaction and after), a partitioned table with a partition, a schema with a
/// table, a view, a function, a sequence, comments, a type change and constraints; apply never
/// stops; after cutover the data and `pg_dump --schema-only` are identical.
#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_under_traffic_are_replayed_in_order() {
    let (src, dst) = fresh_db_pair("t_ddl").await;
    exec(
        &src,
        "CREATE TABLE tick (id serial PRIMARY KEY);
         CREATE TABLE orders (id bigint PRIMARY KEY, a int DEFAULT 1, b text DEFAULT 'b');
         CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO orders SELECT g, g, 'x' FROM generate_series(1, 500) g;
         INSERT INTO items SELECT g, 'i' || g FROM generate_series(1, 100) g;",
    )
    .await;
    let dir = workdir("ddl");
    let d = dir.to_str().unwrap();
    let mut child = spawn_pgtide(&clone_follow_args(&src, &dst, d, "t_ddl_slot"), &[]);
    wait_for_slot(&dir);
    wait_caught_up(&src, &dst, "t_ddl_slot", &mut child).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = traffic(&src, stop.clone());
    let changes = [
        "ALTER TABLE orders ADD COLUMN note text DEFAULT 'n'",
        "UPDATE orders SET note = 'noted ' || id WHERE id % 3 = 0",
        "ALTER TABLE orders DROP COLUMN b",
        "ALTER TABLE orders RENAME COLUMN a TO amount",
        "ALTER TABLE items RENAME TO products",
        "INSERT INTO products VALUES (1000, 'renamed')",
        "CREATE INDEX CONCURRENTLY orders_amount_idx ON orders (amount)",
        "BEGIN; CREATE TABLE fresh (id int PRIMARY KEY, v text); INSERT INTO fresh SELECT g, 'f' FROM generate_series(1, 50) g; COMMIT",
        "INSERT INTO fresh SELECT g, 'later' FROM generate_series(51, 80) g; UPDATE fresh SET v = 'upd' WHERE id < 10; DELETE FROM fresh WHERE id > 75",
        "CREATE TABLE events (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)",
        "CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
        "INSERT INTO events SELECT g, date '2026-03-01' + g FROM generate_series(1, 40) g",
        "CREATE SCHEMA reporting; CREATE TABLE reporting.daily (d date PRIMARY KEY, n int NOT NULL DEFAULT 0)",
        "INSERT INTO reporting.daily SELECT date '2026-01-01' + g, g FROM generate_series(1, 30) g",
        "ALTER TABLE orders ALTER COLUMN amount TYPE bigint",
        "UPDATE orders SET note = 'x' WHERE note IS NULL; ALTER TABLE orders ALTER COLUMN note SET NOT NULL",
        "ALTER TABLE orders ADD CONSTRAINT amount_positive CHECK (amount > 0) NOT VALID",
        "ALTER TABLE orders ALTER COLUMN amount SET DEFAULT 7",
        "COMMENT ON TABLE orders IS 'the orders'",
        // Replayed, but never shown in a log line (invariant 7).
        "COMMENT ON TABLE products IS 'password: hunter2'",
        "CREATE VIEW big_orders AS SELECT id, amount FROM orders WHERE amount > 100",
        "CREATE FUNCTION order_count() RETURNS bigint LANGUAGE sql AS $$ SELECT count(*) FROM orders $$",
        "CREATE SEQUENCE invoice_no START 500",
        "ALTER TABLE fresh ADD COLUMN w int; INSERT INTO fresh VALUES (1000, 'multi', 1)",
        "CREATE TABLE gone (id int PRIMARY KEY); INSERT INTO gone VALUES (1)",
        "DROP TABLE gone",
        "DROP INDEX CONCURRENTLY orders_amount_idx",
        "CREATE SCHEMA scratch; CREATE TABLE scratch.t (id int PRIMARY KEY); DROP SCHEMA scratch CASCADE",
        "CREATE TABLE events_2027 (LIKE events INCLUDING ALL)",
        "ALTER TABLE events ATTACH PARTITION events_2027 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')",
        "INSERT INTO events VALUES (1, '2027-05-01'), (2, '2027-06-01')",
        "CREATE UNIQUE INDEX products_v ON products (v)",
    ];
    for sql in changes {
        exec(&src, sql).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 20, "the traffic wrote only {written} times");
    wait_caught_up(&src, &dst, "t_ddl_slot", &mut child).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "apply stopped:\n{}",
        child.output_so_far()
    );
    let out = pgtide_ok(&Args::cutover(&src, &dst, d).args(&["--timeout", "120s"]));
    assert!(out.contains("cutover complete"), "{out}");
    let out = wait_exit(child, 120);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("replayed schema change"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("hunter2"), "{}", text(&out));
    assert_identical(&src, &dst);
    for table in [
        "orders",
        "products",
        "fresh",
        "events",
        "events_2027",
        "reporting.daily",
    ] {
        let sql = format!("SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t");
        assert_eq!(
            scalar_string(&src, &sql).await,
            scalar_string(&dst, &sql).await,
            "{table} differs"
        );
    }
    assert_eq!(schema_dump(&src), schema_dump(&dst));
    assert_eq!(comments(&src).await, comments(&dst).await);
    // cleanup removes the capture from the source.
    pgtide_ok(&Args::cleanup(&src, &dst, d));
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'pgtide%'"
        )
        .await,
        0
    );
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgtide'"
        )
        .await,
        0
    );
}

/// What cannot be replayed faithfully stops apply with the statement, the reason and the
/// fix, and the operator decides: a column added with a volatile default (its values come
/// from the source's table rewrite, which is not in the stream) is skipped after the operator
/// made the target's column equal; DDL run inside a DO block is replayed as captured with
/// `pgtide ddl retry`. Nothing is lost or applied twice around the stops.
#[tokio::test(flavor = "multi_thread")]
async fn unsafe_schema_changes_stop_and_the_operator_decides() {
    let (src, dst) = fresh_db_pair("t_ddl_stop").await;
    exec(
        &src,
        "CREATE TABLE tick (id serial PRIMARY KEY);
         CREATE TABLE orders (id bigint PRIMARY KEY, amount int);
         INSERT INTO orders SELECT g, g FROM generate_series(1, 200) g;",
    )
    .await;
    let dir = workdir("ddl_stop");
    let d = dir.to_str().unwrap();
    let mut child = spawn_pgtide(&clone_follow_args(&src, &dst, d, "t_ddl_stop_slot"), &[]);
    wait_for_slot(&dir);
    wait_caught_up(&src, &dst, "t_ddl_stop_slot", &mut child).await;
    exec(
        &src,
        "ALTER TABLE orders ADD COLUMN created timestamptz DEFAULT clock_timestamp()",
    )
    .await;
    exec(&src, "INSERT INTO orders (id, amount) VALUES (1002, 2)").await;
    let out = wait_exit(child, 60);
    let log = text(&out);
    assert!(!out.status.success(), "apply did not stop:\n{log}");
    assert!(
        log.contains("apply stopped at the schema change")
            && log.contains("clock_timestamp()")
            && log.contains("public.orders.created")
            && log.contains("pgtide ddl skip"),
        "{log}"
    );
    // Nothing of the stopped transaction or after it was applied.
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM orders WHERE id > 1000").await,
        0
    );
    let show = pgtide_ok(&["ddl", "show", "--dir", d]);
    assert!(show.contains("clock_timestamp()"), "{show}");
    // status says where apply stopped and what to do.
    let status: serde_json::Value = serde_json::from_str(&pgtide_ok_stdout(&[
        "status", "--json", "--dir", d, "--source", &src, "--target", &dst,
    ]))
    .unwrap();
    assert!(
        status["ddl_stopped"]["statement"]
            .as_str()
            .is_some_and(|s| s.contains("clock_timestamp()"))
            && status["verdict"].as_str().is_some_and(|v| v
                .starts_with("stopped at schema change")
                && v.contains("pgtide ddl skip"))
            && status["ddl_capture"] == true,
        "{status}"
    );
    // The operator makes the target's column equal by hand, then skips the change.
    let values = scalar_string(
        &src,
        "SELECT string_agg(format('(%s, %L::timestamptz)', id, created), ',') FROM orders WHERE id <= 200",
    )
    .await;
    exec(
        &dst,
        &format!(
            "ALTER TABLE orders ADD COLUMN created timestamptz DEFAULT clock_timestamp();
             UPDATE orders o SET created = v.c FROM (VALUES {values}) v(id, c) WHERE o.id = v.id"
        ),
    )
    .await;
    pgtide_ok(&["ddl", "skip", "--dir", d]);
    // A schema change inside a DO block: stopped, then replayed as captured.
    exec(
        &src,
        "DO $$ BEGIN EXECUTE 'CREATE TABLE made_in_do (id int PRIMARY KEY, v text)'; END $$",
    )
    .await;
    exec(&src, "INSERT INTO made_in_do VALUES (1, 'one'), (2, 'two')").await;
    let follow = Args::new(&["follow", "--source", &src, "--target", &dst, "--dir", d]);
    let out = wait_exit(spawn_pgtide(&follow, &[]), 60);
    let log = text(&out);
    assert!(
        !out.status.success() && log.contains("DO") && log.contains("pgtide ddl skip"),
        "{log}"
    );
    // Every transaction before the stopped one is committed (the skipped change's, and the
    // insert after it), nothing of the stopped one.
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM orders WHERE id > 1000").await,
        1
    );
    pgtide_ok(&["ddl", "retry", "--dir", d]);
    // Ownership given to a role the target lacks: the target refuses, apply stops naming it.
    exec(
        &src,
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 't_ddl_source_only') THEN
             CREATE ROLE t_ddl_source_only;
           END IF;
         END $$",
    )
    .await;
    exec(&src, "ALTER TABLE made_in_do OWNER TO t_ddl_source_only").await;
    let out = wait_exit(spawn_pgtide(&follow, &[]), 60);
    let log = text(&out);
    assert!(
        !out.status.success()
            && log.contains("the target refused it")
            && log.contains("t_ddl_source_only"),
        "{log}"
    );
    pgtide_ok(&["ddl", "skip", "--dir", d]);
    let mut child = spawn_pgtide(&follow, &[]);
    exec(&src, "UPDATE made_in_do SET v = 'uno' WHERE id = 1").await;
    wait_caught_up(&src, &dst, "t_ddl_stop_slot", &mut child).await;
    let out = pgtide_ok(&Args::cutover(&src, &dst, d).args(&["--timeout", "120s"]));
    assert!(out.contains("cutover complete"), "{out}");
    let out = wait_exit(child, 120);
    assert!(out.status.success(), "{}", text(&out));
    assert_identical(&src, &dst);
    for table in ["orders", "made_in_do"] {
        let sql = format!("SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t");
        assert_eq!(
            scalar_string(&src, &sql).await,
            scalar_string(&dst, &sql).await,
            "{table} differs"
        );
    }
}

/// A table created without a primary key is not published (its UPDATEs would fail on the
/// source); when it gets one, the capture publishes it, but its earlier rows are not in the
/// stream: apply stops naming `follow --resync`; `follow --resync` (copying the table under a
/// snapshot of its own) and `ddl retry` bring it to identical, changes made meanwhile included.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_given_its_primary_key_later_is_resynced() {
    let (src, dst) = fresh_db_pair("t_ddl_late").await;
    exec(&src, "CREATE TABLE tick (id serial PRIMARY KEY)").await;
    let dir = workdir("ddl_late");
    let d = dir.to_str().unwrap();
    let mut child = spawn_pgtide(&clone_follow_args(&src, &dst, d, "t_ddl_late_slot"), &[]);
    wait_for_slot(&dir);
    wait_caught_up(&src, &dst, "t_ddl_late_slot", &mut child).await;
    exec(
        &src,
        "CREATE TABLE late (id int, v text); INSERT INTO late SELECT g, 'x' FROM generate_series(1, 20) g",
    )
    .await;
    exec(&src, "ALTER TABLE late ADD PRIMARY KEY (id)").await;
    let out = wait_exit(child, 60);
    let log = text(&out);
    assert!(
        !out.status.success()
            && log.contains("without a primary key")
            && log.contains("joined the publication only now")
            && log.contains("--resync public.late"),
        "{log}"
    );
    // Changes of the table keep coming while no follow runs.
    exec(
        &src,
        "UPDATE late SET v = 'y' WHERE id < 5; INSERT INTO late VALUES (21, 'z')",
    )
    .await;
    // The fix as the error gives it: copy the table now, then replay the change.
    pgtide_ok(&[
        "follow",
        "--source",
        &src,
        "--target",
        &dst,
        "--dir",
        d,
        "--resync",
        "public.late",
    ]);
    pgtide_ok(&["ddl", "retry", "--dir", d]);
    let follow = Args::new(&["follow", "--source", &src, "--target", &dst, "--dir", d]);
    let mut child = spawn_pgtide(&follow, &[]);
    wait_caught_up(&src, &dst, "t_ddl_late_slot", &mut child).await;
    exec(&src, "UPDATE late SET v = 'w' WHERE id = 7").await;
    exec(&src, "DELETE FROM late WHERE id = 20").await;
    let out = pgtide_ok(&Args::cutover(&src, &dst, d).args(&["--timeout", "120s"]));
    assert!(out.contains("cutover complete"), "{out}");
    let out = wait_exit(child, 120);
    assert!(out.status.success(), "{}", text(&out));
    let sql = "SELECT count(*)::text || md5(string_agg(t::text, ',' ORDER BY t::text)) FROM late t";
    assert_eq!(
        scalar_string(&src, sql).await,
        scalar_string(&dst, sql).await
    );
    assert_identical(&src, &dst);
}
