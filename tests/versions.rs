//! Major-version migrations end to end, the reason most users run an online migration: for a
//! source major and a target major of the same or a newer major (and a plugin), one cell runs
//! `clone --follow` under pgbench traffic plus a workload of hard changes (TOASTed values kept
//! and changed, keyless REPLICA IDENTITY FULL twins, a partitioned table with rows moved across
//! partitions, uuid keys, key updates, quotes and bytea, bigints above 2^53, numeric(38,10),
//! float NaN/±Infinity, truncate, a unique swap), then `cutover`, then compares every table by
//! count and content hash computed here (not only by pgtide's own verify).
//!
//! CI runs the cells below on every submission; `scripts/matrix.sh` runs every source 12–18
//! into every target of the same or a newer major through `matrix_cell`, whose cell comes from
//! `PGTIDE_MATRIX_CELL` (`SOURCE:TARGET[:PLUGIN]`; 14:17 when unset).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// The output plugin a cell streams with.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Plugin {
    Pgoutput,
    Wal2json,
}

impl Plugin {
    fn name(self) -> &'static str {
        match self {
            Plugin::Pgoutput => "pgoutput",
            Plugin::Wal2json => "wal2json",
        }
    }
}

/// One source major → target major migration.
#[derive(Clone, Copy, Debug)]
struct Cell {
    source: u32,
    target: u32,
    plugin: Plugin,
}

impl Cell {
    fn parse(text: &str) -> Cell {
        let parts: Vec<&str> = text.split(':').collect();
        let major = |s: &str| -> u32 {
            s.parse()
                .unwrap_or_else(|_| panic!("PGTIDE_MATRIX_CELL {text:?}: {s:?} is not a major"))
        };
        assert!(
            parts.len() == 2 || parts.len() == 3,
            "PGTIDE_MATRIX_CELL {text:?}: expected SOURCE:TARGET[:PLUGIN]"
        );
        let plugin = match parts.get(2).copied().unwrap_or("pgoutput") {
            "pgoutput" => Plugin::Pgoutput,
            "wal2json" => Plugin::Wal2json,
            other => panic!("PGTIDE_MATRIX_CELL {text:?}: unknown plugin {other:?}"),
        };
        Cell {
            source: major(parts[0]),
            target: major(parts[1]),
            plugin,
        }
    }

    /// A database name of its own, so cells run side by side on shared clusters.
    fn db_name(self) -> String {
        format!("t_v{}_{}_{}", self.source, self.target, self.plugin.name())
    }
}

/// The admin URI of the cluster that plays `role` for `major`: 15 is Debian's source/target
/// pair (the source has wal2json), the others the version clusters of scripts/test.sh.
fn cluster(major: u32, role: &str) -> String {
    if major == 15 {
        admin_uri(role)
    } else {
        version_uri(major)
    }
}

/// The schema of a cell, valid on every major from 12 (no gen_random_uuid before 13).
const SCHEMA: &str = "
    CREATE TABLE wide_docs (id bigint PRIMARY KEY, title text NOT NULL, body text, doc jsonb,
                            blob bytea, updated timestamptz NOT NULL DEFAULT '2024-01-01 00:00:00+00');
    INSERT INTO wide_docs
    SELECT i, 'doc ' || i,
           (SELECT string_agg(md5(i::text || g::text), '') FROM generate_series(1, 200) g),
           jsonb_build_object('i', i, 'tags', ARRAY['a', 'b'], 'f', 1.5e300),
           decode((SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 100) g), 'hex')
    FROM generate_series(1, 300) i;
    CREATE TABLE keyless (a int, b text);
    ALTER TABLE keyless REPLICA IDENTITY FULL;
    INSERT INTO keyless SELECT i % 20, 'dup ' || (i % 20) FROM generate_series(1, 400) i;
    CREATE TABLE orders (id bigint NOT NULL, created date NOT NULL, amount numeric(12, 2),
                         note text, PRIMARY KEY (id, created)) PARTITION BY RANGE (created);
    CREATE TABLE orders_2023 PARTITION OF orders FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
    CREATE TABLE orders_2024 PARTITION OF orders FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
    CREATE TABLE orders_other PARTITION OF orders DEFAULT;
    INSERT INTO orders SELECT i, date '2023-06-01' + (i % 400), i / 7.0, 'order ' || i
    FROM generate_series(1, 3000) i;
    CREATE TABLE uuid_keyed (id uuid PRIMARY KEY, v text NOT NULL);
    INSERT INTO uuid_keyed SELECT md5('u' || i)::uuid, 'value ' || i FROM generate_series(1, 1000) i;
    CREATE TABLE tricky (id bigint PRIMARY KEY, t text, b bytea, n numeric(38,10), f float8);
    INSERT INTO tricky VALUES (1, 'seed', NULL, 1, 1);
    CREATE TABLE people (id int PRIMARY KEY, email text UNIQUE);
    INSERT INTO people VALUES (1, 'a'), (2, 'b');
    CREATE TABLE scratch (v int);
    ALTER TABLE scratch REPLICA IDENTITY FULL;
    INSERT INTO scratch VALUES (1);
    CREATE SEQUENCE tickets START 10;
";

/// pgbench (Debian's, which talks to every major) against `uri`'s database.
fn pgbench(uri: &str, args: &[&str]) -> std::process::Child {
    let parsed: tokio_postgres::Config = uri.parse().expect("a test URI");
    let port = parsed.get_ports().first().copied().unwrap_or(5432);
    let db = parsed
        .get_dbname()
        .expect("a database in the URI")
        .to_string();
    std::process::Command::new(
        Path::new(&std::env::var("PGTIDE_PG_BIN").expect("PGTIDE_PG_BIN: run scripts/test.sh"))
            .join("pgbench"),
    )
    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
    .args(args)
    .arg(&db)
    .env("PGPASSWORD", password())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("cannot start pgbench")
}

fn pgbench_ok(uri: &str, args: &[&str]) {
    let out = pgbench(uri, args).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "pgbench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The hard changes, `rounds` times, each statement its own transaction but the swap.
async fn hard_changes(src: &str, rounds: i64) {
    let client = connect(src).await;
    for i in 0..rounds {
        let id = 9_007_199_254_740_993i64 + i; // above 2^53: a double cannot hold it
        client
            .execute(
                "INSERT INTO tricky VALUES ($1, $2, $3, $4::text::numeric, $5::text::float8)",
                &[
                    &id,
                    &format!("it's a \"quote\" \\ back\\slash {i}"),
                    &vec![0u8, 1, 2, 255, b'\\'],
                    &"1234567890123456789012345678.0123456789",
                    &["NaN", "Infinity", "-Infinity", "1e-300", "-0"][(i % 5) as usize],
                ],
            )
            .await
            .unwrap();
        if i % 3 == 0 {
            client
                .execute("UPDATE tricky SET id = id + 1000000 WHERE id = $1", &[&id])
                .await
                .unwrap();
        }
        // A non-TOAST column changes: the TOASTed body, doc and blob must stay as they are.
        client
            .execute(
                "UPDATE wide_docs SET title = title || '!', updated = updated + interval '1 s' WHERE id = $1",
                &[&(i % 300 + 1)],
            )
            .await
            .unwrap();
        // And a TOASTed value changes.
        client
            .execute(
                "UPDATE wide_docs SET body = md5(body) || body WHERE id = $1",
                &[&((i * 7) % 300 + 1)],
            )
            .await
            .unwrap();
        client
            .execute(
                "INSERT INTO wide_docs (id, title, body, blob)
                 SELECT $1::bigint, 'new', (SELECT string_agg(md5($1::bigint::text || g::text), '') FROM generate_series(1, 150) g),
                        decode(md5($1::bigint::text), 'hex')",
                &[&(1000 + i)],
            )
            .await
            .unwrap();
        // One of several identical keyless rows goes.
        client
            .execute(
                "DELETE FROM keyless WHERE ctid = (SELECT ctid FROM keyless WHERE a = $1 LIMIT 1)",
                &[&((i % 20) as i32)],
            )
            .await
            .unwrap();
        client
            .execute(
                "UPDATE keyless SET b = b || '+' WHERE a = $1",
                &[&(((i + 7) % 20) as i32)],
            )
            .await
            .unwrap();
        // Partitions: an insert, a row moved to another partition, a delete.
        client
            .execute(
                "INSERT INTO orders VALUES ($1::bigint, date '2024-03-01' + ($1::bigint % 30)::int, 1.25, 'live')",
                &[&(100_000 + i)],
            )
            .await
            .unwrap();
        client
            .execute(
                "UPDATE orders SET created = date '2030-01-01' WHERE id = $1",
                &[&(i * 11 % 3000 + 1)],
            )
            .await
            .unwrap();
        client
            .execute("DELETE FROM orders WHERE id = $1", &[&(i * 13 % 3000 + 1)])
            .await
            .unwrap();
        // A uuid key changes.
        client
            .execute(
                "UPDATE uuid_keyed SET id = md5('moved' || $1::text)::uuid, v = v || ' moved'
                  WHERE id = md5('u' || $1::text)::uuid",
                &[&(i + 1).to_string()],
            )
            .await
            .unwrap();
        client
            .execute("SELECT nextval('tickets')", &[])
            .await
            .unwrap();
    }
    client
        .batch_execute("TRUNCATE scratch; INSERT INTO scratch VALUES (42)")
        .await
        .unwrap();
    // A unique value swapped within one transaction.
    client
        .batch_execute(
            "BEGIN; UPDATE people SET email = 'tmp' WHERE id = 1; UPDATE people SET email = 'a' WHERE id = 2;
             UPDATE people SET email = 'b' WHERE id = 1; COMMIT",
        )
        .await
        .unwrap();
}

/// Every user table of `uri` (schema-qualified, in order).
async fn user_tables(uri: &str) -> Vec<String> {
    connect(uri)
        .await
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables
              WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Row count and a hash of the rows' text in a fixed order, with the output settings pinned
/// (the same text on every major from 12).
async fn table_fingerprint(uri: &str, table: &str) -> (i64, String) {
    let client = connect(uri).await;
    client
        .batch_execute(
            "SET extra_float_digits = 1; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres';
             SET TimeZone = 'UTC'; SET bytea_output = 'hex'",
        )
        .await
        .unwrap();
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '')
                   FROM {table} t"
            ),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// pgtide as a user with several client tool versions runs it: no PGTIDE_PG_BIN, the client
/// tools 18 on the PATH and Debian's 15 in their usual directory; pgtide picks a pg_dump and
/// pg_restore that fit both servers.
fn pgtide_in_version_env(args: &[&str]) -> std::process::Command {
    let mut cmd = pgtide_command(args);
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env_remove("PGTIDE_PG_BIN")
        .env("PATH", format!("{}:{path}", client18_bin().display()));
    cmd
}

/// Runs one cell; panics with the pgtide log on any difference.
async fn run_cell(cell: Cell) {
    let name = cell.db_name();
    let (src, dst) = fresh_db_pair_between(
        &cluster(cell.source, "source"),
        &cluster(cell.target, "target"),
        &name,
    )
    .await;
    exec(&src, SCHEMA).await;
    pgbench_ok(&src, &["-i", "-q", "-s", "1"]);
    exec(&src, "ALTER TABLE pgbench_history REPLICA IDENTITY FULL").await;

    let dir = workdir(&name);
    let d = dir.to_str().unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let log_path = dir.with_extension("log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut args = clone_follow_args(&src, &dst, d, &name);
    args.extend(["--table-jobs", "2"]);
    if cell.plugin == Plugin::Wal2json {
        args.extend(["--plugin", "wal2json"]);
    }
    let mut child = pgtide_in_version_env(&args)
        .env("FAILPOINTS", "copy.before_commit=sleep(100)")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("cannot start pgtide");
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_for_slot(&dir);
    let load = pgbench(&src, &["-n", "-c", "2", "-T", "3"]);
    hard_changes(&src, 40).await;
    let load = load.wait_with_output().unwrap();
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );

    let cutover = pgtide_in_version_env(&[
        "cutover",
        "--source",
        &src,
        "--target",
        &dst,
        "--dir",
        d,
        "--timeout",
        "240s",
    ])
    .output()
    .unwrap();
    let cutover_text = text(&cutover);
    assert!(
        cutover.status.success() && cutover_text.contains("cutover complete"),
        "{cell:?}: cutover failed:\n{cutover_text}\nclone --follow log:\n{}",
        log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "{cell:?}: clone --follow did not end after cutover:\n{}",
                log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "{cell:?}: clone --follow failed:\n{}",
        log_text()
    );
    assert!(log_text().contains("reached endpos"), "{}", log_text());

    // Every table, by count and content, compared here.
    let tables = user_tables(&src).await;
    assert!(tables.len() >= 13, "{tables:?}");
    assert_eq!(
        tables,
        user_tables(&dst).await,
        "{cell:?}: the tables differ"
    );
    for table in &tables {
        assert_eq!(
            table_fingerprint(&src, table).await,
            table_fingerprint(&dst, table).await,
            "{cell:?}: table {table} differs"
        );
    }
    assert_eq!(
        scalar_i64(&dst, "SELECT last_value FROM tickets").await,
        scalar_i64(&src, "SELECT last_value FROM tickets").await,
        "{cell:?}: the sequence was not carried"
    );
    pgtide_ok(&["cleanup", "--source", &src, "--target", &dst, "--dir", d]);
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        )
        .await,
        0
    );
    let _ = std::fs::remove_file(&log_path);
}

#[tokio::test(flavor = "multi_thread")]
async fn pg12_to_pg18() {
    run_cell(Cell::parse("12:18")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pg13_to_pg16() {
    run_cell(Cell::parse("13:16")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pg17_to_pg18() {
    run_cell(Cell::parse("17:18")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pg15_to_pg15() {
    run_cell(Cell::parse("15:15")).await;
}

/// The cell `scripts/matrix.sh` asks for in `PGTIDE_MATRIX_CELL`; 14 → 17 in CI.
#[tokio::test(flavor = "multi_thread")]
async fn matrix_cell() {
    let cell = std::env::var("PGTIDE_MATRIX_CELL").unwrap_or_else(|_| "14:17".to_string());
    run_cell(Cell::parse(&cell)).await;
}
