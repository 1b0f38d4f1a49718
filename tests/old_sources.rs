//! Sources (and targets) PostgreSQL 12 and 13 end to end (issue 11): 12 cannot publish a
//! partitioned table, pgoutput before 14 has no logical messages (the endpos marker must still
//! end a follow on an idle source), and check says what they lack. The tests run clone
//! --follow, cutover and verify (or check) against the real version clusters scripts/test.sh
//! starts (majors 12, 13, 16 and 18:
//! `PGTIDE_TEST_MAJORS="12 13 16 18" scripts/test.sh --test old_sources`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;

use common::*;
use pgtide::failpoints::COPY_BEFORE_COMMIT;

/// A partitioned `orders` (list partitions, a default one, and a sub-partitioned one whose
/// leaves are two levels down) and a plain table, with rows.
const PARTITIONED: &str = "
CREATE TABLE orders (id int NOT NULL, region text NOT NULL, amount numeric, note text,
                     PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');
CREATE TABLE orders_us PARTITION OF orders FOR VALUES IN ('us');
CREATE TABLE orders_apac PARTITION OF orders FOR VALUES IN ('apac') PARTITION BY RANGE (id);
CREATE TABLE orders_apac_low PARTITION OF orders_apac FOR VALUES FROM (MINVALUE) TO (2000);
CREATE TABLE orders_apac_high PARTITION OF orders_apac FOR VALUES FROM (2000) TO (MAXVALUE);
CREATE TABLE orders_other PARTITION OF orders DEFAULT;
INSERT INTO orders SELECT g, (ARRAY['eu', 'us', 'apac', 'mars'])[1 + g % 4], g * 1.5, md5(g::text)
  FROM generate_series(1, 4000) g;
CREATE TABLE plain (id int PRIMARY KEY, v text);
INSERT INTO plain SELECT g, md5(g::text)::uuid::text FROM generate_series(1, 200) g;
";

/// Analyzes the whole database now, so that no autoanalyze of these tables or of the catalogs
/// (a transaction the stream would carry as an empty BEGIN/COMMIT before 15) comes later: the
/// idle tests must reach endpos by the marker alone.
const QUIET: &str = "ANALYZE";

/// A pgtide child that is killed when the test ends, passed or failed: a failed test must
/// not leave a follower holding its slot and origin for the next run.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts pgtide with its output in `log` (read when it ends, never piped unread). The tests'
/// environment gives it pg_dump 15, which dumps 12 and 13 and restores into 12 to 18.
fn spawn_logged(args: &[&str], env: &[(&str, &str)], log: &Path) -> Running {
    let file = std::fs::File::create(log).unwrap();
    let mut cmd = pgtide_command(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Running(
        cmd.stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("cannot start pgtide"),
    )
}

/// Waits for a logged pgtide to exit 0 within `secs`; returns its log.
fn wait_ok(running: Running, log: &Path, secs: u64) -> String {
    let mut running = running;
    let child = &mut running.0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "pgtide did not finish in {secs} s:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(log).unwrap_or_default();
    assert!(status.success(), "pgtide failed:\n{out}");
    out
}

/// `pgtide cutover` with this `--verify` mode; must complete with identical tables.
fn cutover(src: &str, dst: &str, dir: &str, verify: &str) -> String {
    let out = pgtide_command(&Args::cutover(src, dst, dir).args(&[
        "--timeout",
        "120s",
        "--verify",
        verify,
    ]))
    .output()
    .unwrap();
    let all = text(&out);
    assert!(out.status.success(), "cutover failed:\n{all}");
    assert!(all.contains("cutover complete"), "{all}");
    assert!(all.contains("tables identical"), "{all}");
    all
}

/// Every table of [`PARTITIONED`] holds the same rows on both sides, leaf by leaf (rows as
/// text, in one order). Used where `verify` cannot judge yet: against an 18 target it counts
/// the NOT NULL constraints 18 catalogs (and older sources do not) as differences.
async fn assert_same_rows(src: &str, dst: &str) {
    for table in [
        "orders_eu",
        "orders_us",
        "orders_apac_low",
        "orders_apac_high",
        "orders_other",
        "plain",
    ] {
        let sql = format!(
            "SELECT count(*)::text || ' ' || coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '')
               FROM {table} t"
        );
        let (a, b) = (
            scalar_string(src, &sql).await,
            scalar_string(dst, &sql).await,
        );
        assert_eq!(a, b, "{table} differs");
    }
}

/// Changes to the partitioned table while clone --follow runs: inserts through the parent
/// and straight into leaves (two levels down too), updates inside a leaf, rows moved across
/// partitions (a DELETE from one leaf and an INSERT into another on the source), deletes.
async fn partition_traffic(src: &str) {
    let client = connect(src).await;
    for i in 0..40 {
        let id = 10_000 + i;
        client
            .batch_execute(&format!(
                "INSERT INTO orders VALUES ({id}, 'eu', {i}, 'parent');
                 INSERT INTO orders_us VALUES ({id} + 10000, 'us', {i}, 'leaf');
                 INSERT INTO orders_apac_high VALUES ({id}, 'apac', {i}, 'leaf of a leaf');
                 UPDATE orders SET amount = amount + 1 WHERE id = {i} + 1;
                 UPDATE orders SET region = 'us', note = 'moved' WHERE id = {id} AND region = 'eu';
                 UPDATE orders SET id = -id WHERE id = {id} AND region = 'apac';
                 DELETE FROM orders WHERE id = {} ;
                 UPDATE plain SET v = v || '!' WHERE id = {};",
                200 + i * 4,
                1 + i
            ))
            .await
            .unwrap();
    }
    // A row that moves across partitions and back, and one that moves into the default one.
    client
        .batch_execute(
            "UPDATE orders SET region = 'eu' WHERE id = 1 AND region = 'us';
             UPDATE orders SET region = 'us' WHERE id = 1 AND region = 'eu';
             UPDATE orders SET region = 'pluto' WHERE id = 2 AND region = 'apac';",
        )
        .await
        .unwrap();
}

/// Waits until clone --follow has created its slot; fails at once with the log when pgtide
/// exited before.
fn wait_for_slot_of(running: &mut Running, dir: &Path, log: &Path) {
    let child = &mut running.0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while state_count_or_zero(
        dir,
        "SELECT count(*) FROM meta WHERE key = 'stream.startpos'",
    ) == 0
    {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "pgtide exited ({status}) before creating its slot:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was never created"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn dir_str(dir: &Path) -> &str {
    dir.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn partitioned_source_12_follows_into_18() {
    let (src, dst) = fresh_db_pair_between(&version_uri(12), &version_uri(18), "t_v12_parts").await;
    exec(&src, PARTITIONED).await;
    let dir: PathBuf = workdir("v12-parts");
    let d = dir_str(&dir);
    let log = std::env::temp_dir().join(format!("pgtide-v12-parts-{}.log", std::process::id()));
    // Every copied part waits a little, so the traffic overlaps the copy.
    let mut child = spawn_logged(
        &clone_follow_args(&src, &dst, d, "t_v12_parts_slot"),
        &[
            (
                "FAILPOINTS",
                format!("{COPY_BEFORE_COMMIT}=sleep(100)").as_str(),
            ),
            ("PGTIDE_PG_BIN", client18_bin().to_str().unwrap()),
        ],
        &log,
    );
    wait_for_slot_of(&mut child, &dir, &log);
    partition_traffic(&src).await;
    // PostgreSQL 12 publishes the leaf partitions, never a partitioned table.
    let published = scalar_string(
        &src,
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables
          WHERE pubname = 'pgtide_t_v12_parts_slot' AND schemaname <> 'pgtide'",
    )
    .await;
    assert_eq!(
        published,
        "orders_apac_high,orders_apac_low,orders_eu,orders_other,orders_us,plain"
    );
    cutover(&src, &dst, d, "checksums");
    let out = wait_ok(child, &log, 120);
    assert!(out.contains("reached endpos"), "{out}");
    assert_same_rows(&src, &dst).await;
    assert_eq!(
        scalar_string(
            &dst,
            "SELECT tableoid::regclass::text || ' ' || note FROM orders WHERE id = 10000"
        )
        .await,
        "orders_us moved"
    );
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM orders_other WHERE region = 'pluto'"
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_source_13_reaches_endpos_on_16() {
    let (src, dst) = fresh_db_pair_between(&version_uri(13), &version_uri(16), "t_v13_idle").await;
    exec(&src, PARTITIONED).await;
    exec(&src, QUIET).await;
    let dir = workdir("v13-idle");
    let d = dir_str(&dir);
    let log = std::env::temp_dir().join(format!("pgtide-v13-idle-{}.log", std::process::id()));
    let mut child = spawn_logged(
        &clone_follow_args(&src, &dst, d, "t_v13_idle_slot"),
        &[],
        &log,
    );
    wait_for_slot_of(&mut child, &dir, &log);
    // One transaction in the stream, then nothing: endpos lies after the last transaction of
    // this database, so only the marker transaction can show that nothing before it is left.
    exec(&src, "UPDATE plain SET v = 'after the slot' WHERE id = 1").await;
    cutover(&src, &dst, d, "checksums");
    let out = wait_ok(child, &log, 120);
    assert!(out.contains("reached endpos"), "{out}");
    assert_identical(&src, &dst);
    assert_eq!(
        scalar_string(&dst, "SELECT v FROM plain WHERE id = 1").await,
        "after the slot"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn source_12_into_target_12() {
    let v12 = version_uri(12);
    let (src, dst) = fresh_db_pair_between(&v12, &v12, "t_v12_same").await;
    exec(&src, PARTITIONED).await;
    let dir = workdir("v12-same");
    let d = dir_str(&dir);
    let log = std::env::temp_dir().join(format!("pgtide-v12-same-{}.log", std::process::id()));
    let mut child = spawn_logged(
        &clone_follow_args(&src, &dst, d, "t_v12_same_slot"),
        &[],
        &log,
    );
    wait_for_slot_of(&mut child, &dir, &log);
    partition_traffic(&src).await;
    cutover(&src, &dst, d, "checksums");
    let out = wait_ok(child, &log, 120);
    assert!(out.contains("reached endpos"), "{out}");
    assert_identical(&src, &dst);
    // status and cleanup on a 12 source and target.
    let status = pgtide_ok(&["status", "--dir", d, "--source", &src, "--target", &dst]);
    assert!(
        !status.contains("not asked") && status.contains("of WAL on the source"),
        "{status}"
    );
    assert!(status.contains("stopped at endpos"), "{status}");
    pgtide_ok(&Args::cleanup(&src, &dst, d));
    assert_eq!(
        scalar_i64(
            &v12,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 't_v12_same_slot'"
        )
        .await,
        0
    );
}

/// `check` against a source: its output.
fn check(src: &str, dst: &str) -> String {
    let out = pgtide_command(&["check", "--source", src, "--target", dst])
        .output()
        .unwrap();
    text(&out)
}

#[tokio::test(flavor = "multi_thread")]
async fn check_says_what_12_and_13_sources_lack() {
    let messages = "pgoutput has no logical messages";
    let leaves = "publishes the leaf partitions";
    let (src, dst) = fresh_db_pair_between(&version_uri(12), &version_uri(18), "t_v12_check").await;
    exec(&src, PARTITIONED).await;
    let out = check(&src, &dst);
    assert!(out.contains(messages) && out.contains(leaves), "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    let (src, dst) = fresh_db_pair_between(&version_uri(13), &version_uri(18), "t_v13_check").await;
    exec(&src, PARTITIONED).await;
    let out = check(&src, &dst);
    assert!(out.contains(messages) && !out.contains(leaves), "{out}");
    let (src, dst) = fresh_db_pair_between(&version_uri(16), &version_uri(18), "t_v16_check").await;
    exec(&src, PARTITIONED).await;
    let out = check(&src, &dst);
    assert!(!out.contains(messages) && !out.contains(leaves), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_receive_reaches_endpos_on_an_idle_12_source() {
    let v12 = version_uri(12);
    let src = fresh_db(&v12, "t_v12_receive").await;
    exec(&src, PARTITIONED).await;
    exec(&src, QUIET).await;
    let dir = workdir("v12-receive");
    let d = dir_str(&dir);
    pgtide_ok(&[
        "stream",
        "setup",
        "--source",
        &src,
        "--dir",
        d,
        "--slot-name",
        "t_v12_receive_slot",
    ]);
    // WAL after the slot, none of it in this database: only the receiver's marker
    // transaction can show that nothing up to endpos is left.
    exec(&v12, "SELECT pg_logical_emit_message(false, 'walgen', 'x')").await;
    let endpos = current_lsn(&src).await;
    let out = pgtide_command(&[
        "stream", "receive", "--source", &src, "--dir", d, "--endpos", &endpos,
    ])
    .timeout_output(60);
    assert!(out.contains(&format!("reached endpos {endpos}")), "{out}");
    assert!(spool_show(&dir).is_empty());
    pgtide_ok(&["stream", "cleanup", "--source", &src, "--dir", d]);
}

/// Runs a command to its end within `secs` (killed after); its output, or the failure.
trait TimeoutOutput {
    fn timeout_output(self, secs: u64) -> String;
}

impl TimeoutOutput for std::process::Command {
    fn timeout_output(mut self, secs: u64) -> String {
        let log = std::env::temp_dir().join(format!(
            "pgtide-old-sources-{}-{}.log",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let child = self
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        wait_ok(Running(child), &log, secs)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn append_only_partitioned_table_on_12() {
    let v12 = version_uri(12);
    let (src, dst) = fresh_db_pair_between(&v12, &v12, "t_v12_append").await;
    // A log-like partitioned table without a primary key, declared --append-only: on 12 its
    // leaves are what the INSERT/TRUNCATE-only publication names.
    exec(
        &src,
        "CREATE TABLE events (at int NOT NULL, what text) PARTITION BY RANGE (at);
         CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (0) TO (1000);
         CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM (1000) TO (2000);
         INSERT INTO events SELECT g, 'seed' FROM generate_series(0, 1999, 7) g;
         CREATE TABLE plain (id int PRIMARY KEY, v text); INSERT INTO plain VALUES (1, 'a');",
    )
    .await;
    let check_out = pgtide_command(&[
        "check",
        "--source",
        &src,
        "--target",
        &dst,
        "--append-only",
        "events",
    ])
    .output()
    .unwrap();
    assert!(check_out.status.success(), "{}", text(&check_out));
    let dir = workdir("v12-append");
    let d = dir_str(&dir);
    let log = std::env::temp_dir().join(format!("pgtide-v12-append-{}.log", std::process::id()));
    let mut child = spawn_logged(
        &[
            clone_follow_args(&src, &dst, d, "t_v12_append_slot"),
            vec!["--append-only", "events"],
        ]
        .concat(),
        &[],
        &log,
    );
    wait_for_slot_of(&mut child, &dir, &log);
    exec(
        &src,
        "INSERT INTO events SELECT g, 'live' FROM generate_series(3, 1999, 11) g;
         UPDATE plain SET v = 'b';",
    )
    .await;
    // The leaves, not the partitioned table, are in the INSERT/TRUNCATE-only publication.
    assert_eq!(
        scalar_string(
            &src,
            "SELECT string_agg(pubname || ':' || tablename, ',' ORDER BY pubname, tablename)
               FROM pg_publication_tables WHERE pubname LIKE 'pgtide_t_v12_append_slot%'
                AND schemaname <> 'pgtide'"
        )
        .await,
        "pgtide_t_v12_append_slot:plain,pgtide_t_v12_append_slot_append:events_1,pgtide_t_v12_append_slot_append:events_2"
    );
    cutover(&src, &dst, d, "checksums");
    let out = wait_ok(child, &log, 120);
    assert!(out.contains("reached endpos"), "{out}");
    assert_identical(&src, &dst);
}

/// pg_restore 17+ sets transaction_timeout, which 16 does not know (seen: 13 -> 16 with the
/// client tools 18 failed in the schema restore). With tools newer than the target, check says
/// the restore goes through psql, and a clone does so, leaving out only that setting.
#[tokio::test(flavor = "multi_thread")]
async fn pg_restore_18_restores_into_a_target_before_17() {
    let (src, dst) = fresh_db_pair_between(&version_uri(13), &version_uri(16), "t_v13_tools").await;
    exec(
        &src,
        "CREATE TABLE plain (id int PRIMARY KEY, v text NOT NULL DEFAULT 'x');
         CREATE VIEW plain_v AS SELECT id FROM plain; INSERT INTO plain (id) VALUES (1), (2);",
    )
    .await;
    let with_18 = |args: &[&str]| {
        pgtide_command(args)
            .env("PGTIDE_PG_BIN", client18_bin())
            .output()
            .unwrap()
    };
    let out = with_18(&["check", "--source", &src, "--target", &dst, "--offline"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("newer than the target (PostgreSQL 16): restores through psql"),
        "{}",
        text(&out)
    );
    let dir = workdir("v13-tools");
    let out = with_18(&Args::clone(&src, &dst, dir.to_str().unwrap()));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out)
            .contains("leaving out the settings the target does not know: transaction_timeout"),
        "{}",
        text(&out)
    );
    assert_identical(&src, &dst);
}

/// Schema changes on a 12 source, whose pgoutput has no logical messages: the capture writes
/// them as rows of its published log table, apply replays them in order. A column added and
/// renamed, a table created and filled in its creating transaction, a new leaf partition
/// (12 publishes leaves: the capture adds it); cleanup removes the capture and its table.
#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_on_a_12_source_arrive_through_the_log_table() {
    let v12 = version_uri(12);
    let (src, dst) = fresh_db_pair_between(&v12, &v12, "t_v12_ddl").await;
    exec(&src, PARTITIONED).await;
    let dir = workdir("v12-ddl");
    let d = dir_str(&dir);
    let log = std::env::temp_dir().join(format!("pgtide-v12-ddl-{}.log", std::process::id()));
    let mut child = spawn_logged(
        &clone_follow_args(&src, &dst, d, "t_v12_ddl_slot"),
        &[],
        &log,
    );
    wait_for_slot_of(&mut child, &dir, &log);
    // Schema changes are replayed from the end of the copy on (a change during the copy
    // stops the clone, see tests/ddl.rs): wait until apply runs.
    let applied = "SELECT count(*) FROM pg_replication_origin_status
                   WHERE external_id = 'pgtide_t_v12_ddl_slot' AND remote_lsn > '0/0'";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while scalar_i64(&dst, applied).await == 0 {
        assert!(std::time::Instant::now() < deadline, "apply never started");
        exec(&src, "UPDATE plain SET v = v WHERE id = 1").await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    for sql in [
        "ALTER TABLE plain ADD COLUMN extra int DEFAULT 5",
        "UPDATE plain SET extra = id WHERE id < 50",
        "ALTER TABLE plain RENAME COLUMN v TO label",
        "BEGIN; CREATE TABLE fresh (id int PRIMARY KEY, v text); INSERT INTO fresh SELECT g, 'f' FROM generate_series(1, 30) g; COMMIT",
        "DELETE FROM fresh WHERE id > 25",
        "ALTER TABLE orders DETACH PARTITION orders_other",
        "CREATE TABLE orders_mars PARTITION OF orders FOR VALUES IN ('mars')",
        "INSERT INTO orders VALUES (90001, 'mars', 1, 'new leaf'), (90002, 'eu', 2, 'eu')",
    ] {
        exec(&src, sql).await;
    }
    cutover(&src, &dst, d, "checksums");
    let out = wait_ok(child, &log, 120);
    assert!(out.contains("replayed schema change"), "{out}");
    assert_identical(&src, &dst);
    for table in ["plain", "fresh", "orders_mars", "orders_eu", "orders_other"] {
        let sql = format!("SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t");
        assert_eq!(
            scalar_string(&src, &sql).await,
            scalar_string(&dst, &sql).await,
            "{table} differs"
        );
    }
    pgtide_ok(&Args::cleanup(&src, &dst, d));
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgtide'"
        )
        .await,
        0
    );
}
