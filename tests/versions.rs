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
use pgtide::failpoints::COPY_BEFORE_COMMIT;

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
    /// The apply lanes of the cell: three when the two majors add up to an odd number (13 → 16,
    /// 17 → 18, 15 → 18 with wal2json in CI; half of scripts/matrix.sh), one otherwise, so that
    /// parallel apply meets every kind of target; `PGTIDE_MATRIX_APPLY_JOBS=N` sets it for all.
    fn apply_jobs(self) -> String {
        match std::env::var("PGTIDE_MATRIX_APPLY_JOBS") {
            Ok(jobs) => jobs,
            Err(_) if (self.source + self.target) % 2 == 1 => "3".to_string(),
            Err(_) => "1".to_string(),
        }
    }

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

/// Float values of the hard changes: the edges, and with wal2json only finite ones (it prints
/// NaN and ±Infinity as JSON null: check refuses such columns unless told
/// `--wal2json-nan-as-null`, which the wal2json cells pass).
fn hard_floats(plugin: Plugin) -> [&'static str; 5] {
    match plugin {
        Plugin::Pgoutput => ["NaN", "Infinity", "-Infinity", "1e-300", "-0"],
        Plugin::Wal2json => ["1e-300", "-0", "1.7976931348623157e308", "5e-324", "0.1"],
    }
}

/// The hard changes, `rounds` times, each statement its own transaction but the swap.
async fn hard_changes(src: &str, rounds: i64, plugin: Plugin) {
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
                    &hard_floats(plugin)[(i % 5) as usize],
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
              WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'pgtide') ORDER BY 1",
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
    if cell.source >= 14 {
        // Every larger transaction is streamed before its commit (pgoutput, 14+): the large
        // one below, with its rolled-back savepoint, is staged and applied ahead on every
        // version.
        exec(
            &src,
            &format!("ALTER DATABASE {name} SET logical_decoding_work_mem = '64kB'"),
        )
        .await;
    }

    let dir = workdir(&name);
    let d = dir.to_str().unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let log_path = dir.with_extension("log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut args = clone_follow_args(&src, &dst, d, &name);
    let apply_jobs = cell.apply_jobs();
    args.extend(["--table-jobs", "2", "--apply-jobs", &apply_jobs]);
    if cell.plugin == Plugin::Wal2json {
        args.extend(["--plugin", "wal2json", "--wal2json-nan-as-null"]);
    }
    let mut child = pgtide_in_version_env(&args)
        .env(
            "FAILPOINTS",
            format!("{COPY_BEFORE_COMMIT}=sleep(100)").as_str(),
        )
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("cannot start pgtide");
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_for_slot(&dir);
    let load = pgbench(&src, &["-n", "-c", "2", "-T", "3"]);
    hard_changes(&src, 40, cell.plugin).await;
    exec(
        &src,
        "BEGIN;
         UPDATE pgbench_accounts SET filler = 'streamed' WHERE aid <= 3000;
         SAVEPOINT s; UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid <= 3000; ROLLBACK TO s;
         UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid > 97000;
         COMMIT;",
    )
    .await;
    let load = load.wait_with_output().unwrap();
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );

    let cutover = pgtide_in_version_env(&Args::cutover(&src, &dst, d).args(&["--timeout", "240s"]))
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
    pgtide_ok(&Args::cleanup(&src, &dst, d));
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

#[tokio::test(flavor = "multi_thread")]
async fn pg15_to_pg15_wal2json() {
    run_cell(Cell::parse("15:15:wal2json")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pg15_to_pg18_wal2json() {
    run_cell(Cell::parse("15:18:wal2json")).await;
}

/// The cell `scripts/matrix.sh` asks for in `PGTIDE_MATRIX_CELL`; 16 → 16 in CI (client tools
/// newer than the target).
#[tokio::test(flavor = "multi_thread")]
async fn matrix_cell() {
    let cell = std::env::var("PGTIDE_MATRIX_CELL").unwrap_or_else(|_| "16:16".to_string());
    run_cell(Cell::parse(&cell)).await;
}

/// The 60 column types of the type matrix, each with four edge values (low, high, special,
/// typical); a NULL row and a TOAST-sized row are added by `type_matrix`. Valid on 12+.
const TYPE_MATRIX: &[(&str, &str, [&str; 4])] = &[
    ("c_int2", "smallint", ["-32768", "32767", "0", "7"]),
    (
        "c_int4",
        "integer",
        ["-2147483648", "2147483647", "0", "42"],
    ),
    (
        "c_int8",
        "bigint",
        [
            "-9223372036854775808",
            "9223372036854775807",
            "9007199254740993",
            "1",
        ],
    ),
    (
        "c_num",
        "numeric",
        [
            "-1e-130",
            "123456789012345678901234567890.123456789012345678901234567890",
            "NaN",
            "0.10",
        ],
    ),
    (
        "c_num_38_10",
        "numeric(38,10)",
        [
            "-9999999999999999999999999999.9999999999",
            "9999999999999999999999999999.9999999999",
            "0.0000000001",
            "1.5",
        ],
    ),
    (
        "c_real",
        "real",
        ["-3.4028235e38", "1.175494e-38", "NaN", "-0"],
    ),
    (
        "c_float8",
        "double precision",
        ["-Infinity", "Infinity", "5e-324", "0.30000000000000004"],
    ),
    (
        "c_money",
        "money",
        [
            "-92233720368547758.08",
            "92233720368547758.07",
            "0",
            "12.34",
        ],
    ),
    (
        "c_text",
        "text",
        [
            "",
            "it's a \"quote\" \\ back\\slash",
            "ünïcødé ✓ 𝄞",
            "line1\nline2\ttab",
        ],
    ),
    (
        "c_varchar",
        "varchar(10)",
        ["", "0123456789", "a,b{c}", " spaced "],
    ),
    ("c_char", "char(8)", ["", "AB", "abcdefgh", " x"]),
    ("c_qchar", "\"char\"", ["a", "z", "\\", "q"]),
    ("c_name", "name", ["", "a name", "ünï", "x"]),
    (
        "c_bytea",
        "bytea",
        ["\\x", "\\x00ff5c27", "\\x5c5c", "\\xdeadbeef"],
    ),
    ("c_bool", "boolean", ["false", "true", "true", "false"]),
    (
        "c_date",
        "date",
        ["-infinity", "infinity", "0001-01-01 BC", "2024-02-29"],
    ),
    (
        "c_time",
        "time",
        ["00:00:00", "24:00:00", "23:59:59.999999", "12:34:56"],
    ),
    (
        "c_timetz",
        "timetz",
        [
            "00:00:00+15:59",
            "24:00:00-15:59",
            "12:00:00+05:30",
            "01:02:03+00",
        ],
    ),
    (
        "c_ts",
        "timestamp",
        [
            "-infinity",
            "infinity",
            "4713-01-01 00:00:00 BC",
            "2024-02-29 12:34:56.789012",
        ],
    ),
    (
        "c_tstz",
        "timestamptz",
        [
            "-infinity",
            "infinity",
            "294276-12-31 23:59:59.999999+00",
            "2024-02-29 12:34:56.789012+05:30",
        ],
    ),
    (
        "c_interval",
        "interval",
        [
            "-178000000 years",
            "178000000 years",
            "-1 day -02:00:00",
            "1 mon 2 days 03:04:05.678",
        ],
    ),
    (
        "c_uuid",
        "uuid",
        [
            "00000000-0000-0000-0000-000000000000",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "123e4567-e89b-12d3-a456-426614174000",
        ],
    ),
    (
        "c_json",
        "json",
        [
            "{}",
            "{\"a\": [1, 2.50, null], \"a\": \"dup key kept\"}",
            "\"\\u00e9\\n\"",
            "[1e400, -0]",
        ],
    ),
    (
        "c_jsonb",
        "jsonb",
        [
            "{}",
            "{\"nested\": {\"deep\": [true, false, null]}}",
            "\"\\u00e9\\n\"",
            "[1.0e3, -0.0]",
        ],
    ),
    (
        "c_xml",
        "xml",
        [
            "<a/>",
            "<doc><p x=\"1\">text &amp; more</p></doc>",
            "plain text",
            "<?xml version=\"1.0\"?><r/>",
        ],
    ),
    (
        "c_inet",
        "inet",
        ["0.0.0.0/0", "255.255.255.255", "::1/128", "192.168.1.5/24"],
    ),
    (
        "c_cidr",
        "cidr",
        ["0.0.0.0/0", "255.255.255.255/32", "::/0", "10.0.0.0/8"],
    ),
    (
        "c_macaddr",
        "macaddr",
        [
            "00:00:00:00:00:00",
            "ff:ff:ff:ff:ff:ff",
            "08:00:2b:01:02:03",
            "01:23:45:67:89:ab",
        ],
    ),
    (
        "c_macaddr8",
        "macaddr8",
        [
            "00:00:00:00:00:00:00:00",
            "ff:ff:ff:ff:ff:ff:ff:ff",
            "08:00:2b:01:02:03:04:05",
            "01:23:45:67:89:ab:cd:ef",
        ],
    ),
    (
        "c_point",
        "point",
        ["(0,0)", "(1e300,-1e300)", "(NaN,Infinity)", "(1.5,2.5)"],
    ),
    (
        "c_line",
        "line",
        ["{1,-1,0}", "{1e10,1,-1e10}", "{0,1,5}", "{2,3,4}"],
    ),
    (
        "c_lseg",
        "lseg",
        [
            "[(0,0),(0,0)]",
            "[(1e300,1),(-1e300,2)]",
            "[(1,2),(3,4)]",
            "[(0.5,0.5),(1,1)]",
        ],
    ),
    (
        "c_box",
        "box",
        [
            "(0,0),(0,0)",
            "(1e300,1e300),(-1e300,-1e300)",
            "(1,1),(0,0)",
            "(2,3),(1,1)",
        ],
    ),
    (
        "c_path",
        "path",
        [
            "[(0,0)]",
            "((0,0),(1,1),(2,0))",
            "[(1,2),(3,4),(5,6)]",
            "((1,1),(2,2))",
        ],
    ),
    (
        "c_polygon",
        "polygon",
        [
            "((0,0))",
            "((0,0),(1e300,0),(0,1e300))",
            "((1,1),(2,2),(3,1))",
            "((0,0),(0,1),(1,1),(1,0))",
        ],
    ),
    (
        "c_circle",
        "circle",
        [
            "<(0,0),0>",
            "<(1e300,1e300),1e300>",
            "<(1,2),3>",
            "<(0.5,0.5),0.25>",
        ],
    ),
    (
        "c_bit",
        "bit(8)",
        ["00000000", "11111111", "10101010", "00000001"],
    ),
    (
        "c_varbit",
        "bit varying",
        [
            "",
            "1",
            "1010101010101010101010101010101010101010101010101010101010101010101",
            "01",
        ],
    ),
    (
        "c_tsvector",
        "tsvector",
        [
            "",
            "'a':1A 'b':2B,3C 'quote''s':4",
            "'ünï' 'x'",
            "fat:1 rat:2",
        ],
    ),
    (
        "c_tsquery",
        "tsquery",
        ["a", "(a & b) | !c", "'x' <-> 'y'", "fat:* & rat"],
    ),
    (
        "c_int4range",
        "int4range",
        ["empty", "(,)", "[-2147483648,2147483647)", "[1,10)"],
    ),
    (
        "c_int8range",
        "int8range",
        [
            "empty",
            "(,)",
            "[-9223372036854775808,9223372036854775807)",
            "[5,6)",
        ],
    ),
    (
        "c_numrange",
        "numrange",
        ["empty", "(,)", "[-1e100,1e100]", "(0.1,0.2]"],
    ),
    (
        "c_daterange",
        "daterange",
        [
            "empty",
            "[-infinity,infinity)",
            "[2000-01-01,)",
            "[2024-02-28,2024-03-01)",
        ],
    ),
    (
        "c_tsrange",
        "tsrange",
        [
            "empty",
            "(,)",
            "[-infinity,infinity]",
            "[2024-01-01 00:00,2024-01-02 00:00)",
        ],
    ),
    (
        "c_tstzrange",
        "tstzrange",
        [
            "empty",
            "(,)",
            "[-infinity,infinity]",
            "[2024-01-01 00:00+00,2024-01-02 00:00+05)",
        ],
    ),
    (
        "c_int_arr",
        "integer[]",
        [
            "{}",
            "{{1,2},{3,4}}",
            "{NULL,-2147483648,2147483647}",
            "[0:2]={7,8,9}",
        ],
    ),
    (
        "c_text_arr",
        "text[]",
        [
            "{}",
            "{\"a,b\",\"quote\\\"d\",NULL,\"back\\\\slash\"}",
            "{\"\",\" \",\"NULL\"}",
            "{ünï,x}",
        ],
    ),
    (
        "c_num_arr",
        "numeric[]",
        [
            "{}",
            "{NaN,1e-100,-0.0}",
            "{123456789012345678901234567890}",
            "{1.50}",
        ],
    ),
    (
        "c_jsonb_arr",
        "jsonb[]",
        [
            "{}",
            "{\"{\\\"a\\\": 1}\",\"[]\"}",
            "{NULL}",
            "{\"\\\"s\\\"\"}",
        ],
    ),
    (
        "c_uuid_arr",
        "uuid[]",
        [
            "{}",
            "{00000000-0000-0000-0000-000000000000}",
            "{NULL}",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
        ],
    ),
    (
        "c_bytea_arr",
        "bytea[]",
        ["{}", "{\"\\\\x00ff\"}", "{NULL,\"\\\\x\"}", "{\"\\\\x5c\"}"],
    ),
    (
        "c_bool_arr",
        "boolean[]",
        ["{}", "{t,f,NULL}", "{t}", "{f}"],
    ),
    (
        "c_ts_arr",
        "timestamptz[]",
        [
            "{}",
            "{infinity,-infinity}",
            "{\"2024-02-29 12:00:00+00\"}",
            "{NULL}",
        ],
    ),
    ("c_enum", "tm_mood", ["sad", "happy", "ok", "sad"]),
    ("c_domain", "tm_positive", ["1", "2147483647", "42", "7"]),
    (
        "c_composite",
        "tm_address",
        [
            "(,)",
            "(\"Main St, \\\"North\\\"\",00000)",
            "(\"\",\"\")",
            "(Elm,12345)",
        ],
    ),
    ("c_oid", "oid", ["0", "4294967295", "1", "12345"]),
    (
        "c_pg_lsn",
        "pg_lsn",
        ["0/0", "FFFFFFFF/FFFFFFFF", "16/B374D848", "0/1"],
    ),
    (
        "c_float4_arr",
        "real[]",
        ["{}", "{NaN,Infinity,-Infinity}", "{-0,1e-45}", "{1.5}"],
    ),
];

/// The type matrix table: an id key, then one column per `TYPE_MATRIX` entry.
fn type_matrix_ddl(table: &str) -> String {
    let cols: Vec<String> = TYPE_MATRIX
        .iter()
        .map(|(name, ty, _)| format!("{name} {ty}"))
        .collect();
    format!(
        "CREATE TABLE {table} (id bigint NOT NULL, {})",
        cols.join(", ")
    )
}

/// The columns whose NaN / ±Infinity wal2json prints as JSON null (plain numeric, real and
/// double precision): through wal2json the matrix gives them finite values instead.
const WAL2JSON_NAN_COLUMNS: &[&str] = &["c_num", "c_real", "c_float8"];

/// An edge value as the plugin can carry it (see `WAL2JSON_NAN_COLUMNS`).
fn carried_value(name: &str, value: &'static str, plugin: Plugin) -> &'static str {
    let special = ["NaN", "Infinity", "-Infinity"].contains(&value);
    if plugin == Plugin::Wal2json && special && WAL2JSON_NAN_COLUMNS.contains(&name) {
        "-1.5e-30"
    } else {
        value
    }
}

/// An INSERT of row `id` with value set `set` (0..4) of every column; set 4 is all NULL and
/// set 5 puts TOAST-sized values in the text, bytea and jsonb columns on top of set 3.
fn type_matrix_insert(table: &str, id: i64, set: usize, plugin: Plugin) -> String {
    let values: Vec<String> = TYPE_MATRIX
        .iter()
        .map(|(name, ty, edge)| match set {
            4 => "NULL".to_string(),
            5 if *name == "c_text" => {
                "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g)".to_string()
            }
            5 if *name == "c_bytea" => {
                "decode((SELECT string_agg(md5(g::text), '') FROM generate_series(1, 300) g), 'hex')"
                    .to_string()
            }
            5 if *name == "c_jsonb" => {
                "(SELECT jsonb_agg(md5(g::text)) FROM generate_series(1, 300) g)".to_string()
            }
            _ => format!(
                "E'{}'::{ty}",
                carried_value(name, edge[set.min(3)], plugin)
                    .replace('\\', "\\\\")
                    .replace('\'', "''")
            ),
        })
        .collect();
    format!("INSERT INTO {table} VALUES ({id}, {})", values.join(", "))
}

const TYPE_MATRIX_TYPES: &str = "
    CREATE TYPE tm_mood AS ENUM ('sad', 'ok', 'happy');
    CREATE DOMAIN tm_positive AS integer CHECK (VALUE > 0);
    CREATE TYPE tm_address AS (street text, zip text);
";

/// 60 column types with edge values survive clone --follow, changes during follow (inserts,
/// every column updated to another row's values, key updates, deletes; a keyed table and a
/// REPLICA IDENTITY FULL one, where rows are matched by every column) and cutover.
async fn type_matrix(cell: Cell) {
    assert_eq!(TYPE_MATRIX.len(), 60);
    let name = format!(
        "t_tm_{}_{}_{}",
        cell.source,
        cell.target,
        cell.plugin.name()
    );
    let (src, dst) = fresh_db_pair_between(
        &cluster(cell.source, "source"),
        &cluster(cell.target, "target"),
        &name,
    )
    .await;
    let mut setup = vec![
        TYPE_MATRIX_TYPES.to_string(),
        type_matrix_ddl("tm_keyed"),
        "ALTER TABLE tm_keyed ADD PRIMARY KEY (id)".to_string(),
        type_matrix_ddl("tm_full"),
        "ALTER TABLE tm_full REPLICA IDENTITY FULL".to_string(),
    ];
    for table in ["tm_keyed", "tm_full"] {
        for set in 0..6 {
            setup.push(type_matrix_insert(table, set as i64 + 1, set, cell.plugin));
        }
    }
    exec(&src, &(setup.join(";\n") + ";")).await;

    let dir = workdir(&name);
    let d = dir.to_str().unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let log_path = dir.with_extension("log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut args = clone_follow_args(&src, &dst, d, &name);
    if cell.plugin == Plugin::Wal2json {
        args.extend(["--plugin", "wal2json", "--wal2json-nan-as-null"]);
    }
    let mut child = pgtide_in_version_env(&args)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("cannot start pgtide");
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_for_slot(&dir);
    let client = connect(&src).await;
    let all_columns = TYPE_MATRIX
        .iter()
        .map(|(n, _, _)| *n)
        .collect::<Vec<_>>()
        .join(", ");
    for table in ["tm_keyed", "tm_full"] {
        let mut changes = Vec::new();
        // Every value set inserted again during follow.
        for set in 0..6 {
            changes.push(type_matrix_insert(
                table,
                100 + set as i64,
                set,
                cell.plugin,
            ));
        }
        // Every column of a row takes another row's values (NULL to edge, edge to NULL, TOAST
        // to small and back).
        for (row, from) in [(1, 5), (2, 4), (3, 6), (5, 1), (6, 2), (104, 103)] {
            changes.push(format!(
                "UPDATE {table} SET ({all_columns}) = (SELECT {all_columns} FROM {table} WHERE id = {from}) WHERE id = {row}"
            ));
        }
        // One column changes and the TOASTed ones stay.
        changes.push(format!(
            "UPDATE {table} SET c_int4 = c_int4 / 2 WHERE id IN (4, 105)"
        ));
        changes.push(format!("UPDATE {table} SET id = id + 1000 WHERE id = 102"));
        changes.push(format!("DELETE FROM {table} WHERE id IN (100, 101)"));
        for sql in changes {
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }
    let cutover = pgtide_in_version_env(&Args::cutover(&src, &dst, d).args(&["--timeout", "240s"]))
        .output()
        .unwrap();
    let cutover_text = text(&cutover);
    assert!(
        cutover.status.success() && cutover_text.contains("cutover complete"),
        "{cell:?}: cutover failed:\n{cutover_text}\nclone --follow log:\n{}",
        log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cell:?}: clone --follow did not end:\n{}", log_text());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for table in ["tm_keyed", "tm_full"] {
        let source = table_fingerprint(&src, table).await;
        assert_eq!(source.0, 10, "{table}: the workload's rows");
        assert_eq!(
            source,
            table_fingerprint(&dst, table).await,
            "{cell:?}: {table} differs:\n{}",
            log_text()
        );
    }
    pgtide_ok(&Args::cleanup(&src, &dst, d));
    let _ = std::fs::remove_file(&log_path);
}

#[tokio::test(flavor = "multi_thread")]
async fn type_matrix_pg12_to_pg18_pgoutput() {
    type_matrix(Cell::parse("12:18")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn type_matrix_pg15_to_pg15_pgoutput() {
    type_matrix(Cell::parse("15:15")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn type_matrix_pg15_to_pg18_wal2json() {
    type_matrix(Cell::parse("15:18:wal2json")).await;
}
