//! Apply on the databases users really have (issue 10): source session settings, char(n) and
//! TOAST in REPLICA IDENTITY FULL tables, flip-flop updates, GENERATED ALWAYS identity columns,
//! wide rows, a snapshot-killing idle timeout, a restart after a dropped column, and a
//! truncate that cascaded on the source. Each case replays through `clone --follow` into a real
//! target and ends compared by content with the source.

mod common;

use std::time::Duration;

use common::*;
use pgtide::failpoints::{COPY_AFTER_COMMIT, COPY_BEFORE_COMMIT};

/// Items 1 and 8: the source database's own DateStyle, IntervalStyle, bytea_output,
/// extra_float_digits and TimeZone reach every session, the walsender's included; values
/// decoded in those styles would be parsed differently by apply. And an
/// idle_in_transaction_session_timeout of 1 s would kill the session holding the exported
/// snapshot while the copy runs (each part here takes 1.5 s).
#[tokio::test(flavor = "multi_thread")]
async fn source_session_settings_neither_alter_values_nor_kill_the_snapshot() {
    let (src, dst) = fresh_db_pair("t_apply_settings").await;
    exec(
        &src,
        "ALTER DATABASE t_apply_settings SET intervalstyle = 'sql_standard';
         ALTER DATABASE t_apply_settings SET datestyle = 'SQL, DMY';
         ALTER DATABASE t_apply_settings SET bytea_output = 'escape';
         ALTER DATABASE t_apply_settings SET extra_float_digits = -3;
         ALTER DATABASE t_apply_settings SET timezone = 'Asia/Kathmandu';
         ALTER DATABASE t_apply_settings SET idle_in_transaction_session_timeout = '1s';",
    )
    .await;
    exec(
        &src,
        "CREATE TABLE vals (id int PRIMARY KEY, iv interval, d date, ts timestamptz, t time,
                            b bytea, f float8, r real, m money);
         CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);
         CREATE TABLE c (id int PRIMARY KEY);
         INSERT INTO a VALUES (1); INSERT INTO b VALUES (1); INSERT INTO c VALUES (1);
         INSERT INTO vals VALUES (1, '1 day', '2024-01-02', '2024-01-02 03:04:05+00', '01:02',
                                  '\\x00ff', 1.5, 2.5, 3);",
    )
    .await;
    let dir = workdir("apply-settings");
    let d = dir.to_str().unwrap();
    let child = spawn_pgtide(
        &[
            clone_follow_args(&src, &dst, d, "t_apply_settings_slot"),
            vec!["--table-jobs", "1"],
        ]
        .concat(),
        &[(
            "FAILPOINTS",
            format!("{COPY_AFTER_COMMIT}=sleep(1500)").as_str(),
        )],
    );
    wait_for_slot(&dir);
    exec(
        &src,
        "INSERT INTO vals VALUES
           (2, '-1 day -2 hours', '2024-02-29', '2024-03-10 02:30:00.123456+05:45', '23:59:59.5',
            '\\x000102fffe5c27', 0.1, 1.1, 12.34),
           (3, '1 year 2 mons -3 days 04:05:06.789', '0044-03-15 BC', 'infinity', '00:00',
            '', 1e-300, 3.4e38, -0.01),
           (4, '-00:00:01', 'epoch', '1999-12-31 23:59:59.999999-08', '12:00', NULL,
            -2.2250738585072014e-308, 1.17549435e-38, NULL);
         UPDATE vals SET iv = iv * 2, f = f / 3, r = r / 3 WHERE id = 1;",
    )
    .await;
    finish_at_current_position(child, &src, d);
    assert_identical(&src, &dst);
    assert_eq!(
        scalar_string(&dst, "SELECT iv::text FROM vals WHERE id = 2").await,
        "-1 days -02:00:00",
        "the interval arrives as the same interval"
    );
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}

/// Items 2, 4 and 7: REPLICA IDENTITY FULL rows matched through their column types (char(n)
/// padding), a FULL-identity self-assignment of TOASTed columns, a GENERATED ALWAYS identity
/// column outside the key (and as the key); and a FULL-identity change that matches nothing on
/// the target stops apply instead of passing.
#[tokio::test(flavor = "multi_thread")]
async fn full_identity_char_toast_and_generated_always_columns() {
    let (src, dst) = fresh_db_pair("t_apply_full").await;
    exec(
        &src,
        "CREATE TABLE legacy (code char(8), qty int, note varchar(10));
         ALTER TABLE legacy REPLICA IDENTITY FULL;
         INSERT INTO legacy VALUES ('AB', 1, 'x'), ('CD', 5, NULL), ('EF', 7, 'keep');
         CREATE TABLE docs (big1 text, big2 text);
         ALTER TABLE docs ALTER big1 SET STORAGE EXTERNAL, ALTER big2 SET STORAGE EXTERNAL;
         ALTER TABLE docs REPLICA IDENTITY FULL;
         INSERT INTO docs SELECT string_agg(md5(g::text), ''), string_agg(md5((-g)::text), '')
           FROM generate_series(1, 500) g;
         CREATE TABLE t2 (id int GENERATED ALWAYS AS IDENTITY, code text PRIMARY KEY, v int);
         INSERT INTO t2 (code, v) VALUES ('a', 1), ('b', 1);
         CREATE TABLE t3 (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v int);
         INSERT INTO t3 (v) VALUES (1), (2);
         CREATE TABLE t4 (id int GENERATED ALWAYS AS IDENTITY, v int);
         ALTER TABLE t4 REPLICA IDENTITY FULL;
         INSERT INTO t4 (v) VALUES (1), (1);",
    )
    .await;
    let dir = workdir("apply-full");
    let d = dir.to_str().unwrap();
    let child = spawn_pgtide(&clone_follow_args(&src, &dst, d, "t_apply_full_slot"), &[]);
    wait_for_slot(&dir);
    exec(
        &src,
        "UPDATE legacy SET qty = 2 WHERE code = 'AB';
         DELETE FROM legacy WHERE code = 'CD';
         UPDATE docs SET big1 = big1, big2 = big2;
         UPDATE docs SET big1 = big1;
         UPDATE t2 SET v = 2;
         BEGIN; UPDATE t2 SET v = 3 WHERE code = 'a'; UPDATE t2 SET v = 4 WHERE code = 'a'; COMMIT;
         UPDATE t2 SET code = 'c' WHERE code = 'b';
         INSERT INTO t2 (code, v) VALUES ('d', 9);
         UPDATE t3 SET v = v + 10;
         UPDATE t4 SET v = 2 WHERE ctid = (SELECT min(ctid) FROM t4);
         INSERT INTO legacy VALUES ('GH', 1, 'new');
         UPDATE legacy SET code = 'IJ' WHERE code = 'GH';",
    )
    .await;
    finish_at_current_position(child, &src, d);
    assert_identical(&src, &dst);
    assert_eq!(
        scalar_string(
            &dst,
            "SELECT string_agg(code || qty, ',' ORDER BY code) FROM legacy"
        )
        .await,
        "AB2,EF7,IJ1"
    );

    // The target diverges by hand: a FULL-identity update of the row it lost must stop apply
    // with the table named, never end as a success.
    exec(&dst, "DELETE FROM legacy WHERE code = 'EF'").await;
    exec(&src, "UPDATE legacy SET qty = 8 WHERE code = 'EF'").await;
    let end = current_lsn(&src).await;
    let out = pgtide_fails(&[
        "follow", "--source", &src, "--target", &dst, "--dir", d, "--endpos", &end,
    ]);
    assert!(
        out.contains("\"public\".\"legacy\"") && out.contains("no matching row"),
        "{out}"
    );
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}

/// Sequential and index scans of a table on the target, as pg_stat_user_tables counts them.
async fn scans(dst: &str, table: &str) -> (i64, i64) {
    let client = connect(dst).await;
    let row = client
        .query_one(
            "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = $1",
            &[&table],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Issue 14 item 3: a REPLICA IDENTITY FULL table without a primary key whose target has a
/// unique btree index on a nullable column (so it cannot be the replica identity, which is
/// why the table is FULL). The index is made on the source and cloned, as a user's own index
/// would be (verify compares indexes, so a target-only index would differ by design). A
/// 2,000-row transaction of updates and deletes, rows whose indexed column is NULL, and rows
/// with a TOASTed value must apply identically, through the index: the target's seq_scan
/// count must not grow with the changes. A second table has only indexes pgtide must not use
/// (hash, a non-default opclass, partial, expression): its changes fall back to the full-row
/// comparison and still apply.
#[tokio::test(flavor = "multi_thread")]
async fn full_identity_uses_a_covering_btree_index_on_the_target() {
    let (src, dst) = fresh_db_pair("t_apply_full_index").await;
    exec(
        &src,
        "CREATE TABLE ledger (id int, label text, amount numeric(12,2), paid boolean, memo text, doc text);
         ALTER TABLE ledger ALTER doc SET STORAGE EXTERNAL;
         ALTER TABLE ledger REPLICA IDENTITY FULL;
         INSERT INTO ledger SELECT CASE WHEN g % 10000 = 0 THEN NULL ELSE g END, 'row ' || g,
             g * 1.5, g % 2 = 0, CASE WHEN g % 3 = 0 THEN NULL ELSE 'm' || g END,
             CASE WHEN g % 500 = 0 THEN repeat(md5(g::text), 200) ELSE 'short' END
           FROM generate_series(1, 50000) g;
         CREATE UNIQUE INDEX ledger_id ON ledger (id);
         CREATE INDEX ledger_paid_label_memo ON ledger (paid, label, memo);
         CREATE TABLE notes (k int, body text);
         ALTER TABLE notes REPLICA IDENTITY FULL;
         INSERT INTO notes SELECT g, 'b' || g FROM generate_series(1, 200) g;
         CREATE INDEX notes_hash ON notes USING hash (k);
         CREATE INDEX notes_pattern ON notes (body text_pattern_ops);
         CREATE INDEX notes_partial ON notes (k) WHERE k > 0;
         CREATE INDEX notes_expr ON notes (lower(body));
         CREATE TABLE tick (id int PRIMARY KEY);
         ANALYZE;",
    )
    .await;
    let dir = workdir("apply-full-index");
    let d = dir.to_str().unwrap();
    let mut child = spawn_pgtide(
        &clone_follow_args(&src, &dst, d, "t_apply_full_index_slot"),
        &[],
    );
    wait_for_slot(&dir);
    wait_applied(&src, &dst, "t_apply_full_index_slot", &mut child).await;
    exec(&dst, "ANALYZE ledger; ANALYZE notes").await;
    let (ledger_seq, ledger_idx) = scans(&dst, "ledger").await;
    let (notes_seq, _) = scans(&dst, "notes").await;

    let started = std::time::Instant::now();
    exec(
        &src,
        "BEGIN;
         UPDATE ledger SET amount = amount + 1, memo = 'u' || id WHERE id BETWEEN 1001 AND 2500;
         DELETE FROM ledger WHERE id BETWEEN 3001 AND 3500;
         INSERT INTO tick VALUES (2);
         COMMIT;",
    )
    .await;
    wait_until_applied(&dst, "SELECT count(*) FROM tick WHERE id = 2").await;
    let elapsed = started.elapsed();
    eprintln!(
        "full_identity_uses_a_covering_btree_index_on_the_target: the 2,000-row FULL-identity transaction was applied in {:.3} s",
        elapsed.as_secs_f64()
    );
    exec(
        &src,
        "UPDATE ledger SET paid = NOT paid WHERE id IS NULL;
         DELETE FROM ledger WHERE id IS NULL AND label = 'row 50000';
         UPDATE ledger SET doc = doc || 'x' WHERE id = 4500;
         UPDATE ledger SET label = label || '!' WHERE id = 5000;
         DELETE FROM ledger WHERE id = 5500;
         UPDATE notes SET body = body || '!' WHERE k <= 20;
         DELETE FROM notes WHERE k > 190;",
    )
    .await;
    // The follower exits at endpos: its session's statistics reach pg_stat_user_tables.
    finish_at_current_position(child, &src, d);
    let (ledger_seq_after, ledger_idx_after) = scans(&dst, "ledger").await;
    let (notes_seq_after, _) = scans(&dst, "notes").await;
    eprintln!(
        "ledger: seq_scan {ledger_seq} -> {ledger_seq_after}, idx_scan {ledger_idx} -> {ledger_idx_after}; notes: seq_scan {notes_seq} -> {notes_seq_after}"
    );
    assert!(
        ledger_seq_after - ledger_seq < 50,
        "the FULL-identity changes were matched by sequential scans: {ledger_seq} -> {ledger_seq_after}"
    );
    assert!(
        ledger_idx_after - ledger_idx >= 2_000,
        "the index was not used: idx_scan {ledger_idx} -> {ledger_idx_after}"
    );
    assert!(
        notes_seq_after - notes_seq >= 30,
        "notes has no usable index, its changes must fall back to the full-row match: {notes_seq} -> {notes_seq_after}"
    );
    assert_identical(&src, &dst);
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM ledger WHERE id IS NULL AND paid = (substr(label, 5)::int % 2 <> 0)").await,
        4
    );
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}

/// Waits until a count on the target is 1: apply has reached a known change.
async fn wait_until_applied(dst: &str, count_sql: &str) {
    let client = connect(dst).await;
    for _ in 0..600 {
        // The table may not exist yet while the clone runs.
        if let Ok(row) = client.query_one(count_sql, &[]).await
            && row.get::<_, i64>(0) == 1
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("apply never reached the change counted by {count_sql}");
}

/// Item 3: flip-flop updates of REPLICA IDENTITY FULL partitions, each value going away and
/// coming back within the stream, interleaved with other tables' changes and WAL switches,
/// then endpos. The divergence was intermittent because it depended on where a target
/// transaction ended: one holding only FULL-identity changes (sent one statement per row) was
/// committed without them, they went out with a later batch or never. Looped, and ended with
/// such a batch on purpose.
#[tokio::test(flavor = "multi_thread")]
async fn flip_flop_updates_on_full_identity_partitions() {
    for round in 0..3 {
        let name = format!("t_apply_flip{round}");
        let (src, dst) = fresh_db_pair(&name).await;
        exec(
            &src,
            "CREATE TABLE pay (id int, part int, amount numeric(6,2), note text) PARTITION BY LIST (part);
             CREATE TABLE pay0 PARTITION OF pay FOR VALUES IN (0);
             CREATE TABLE pay1 PARTITION OF pay FOR VALUES IN (1);
             CREATE TABLE pay2 PARTITION OF pay FOR VALUES IN (2);
             CREATE TABLE pay3 PARTITION OF pay FOR VALUES IN (3);
             ALTER TABLE pay0 REPLICA IDENTITY FULL; ALTER TABLE pay1 REPLICA IDENTITY FULL;
             ALTER TABLE pay2 REPLICA IDENTITY FULL; ALTER TABLE pay3 REPLICA IDENTITY FULL;
             INSERT INTO pay SELECT g, g % 4, CASE WHEN g % 500 = 0 THEN 11.99 ELSE g % 97 END, 'n'
               FROM generate_series(1, 20000) g;
             CREATE TABLE other (id serial PRIMARY KEY, v int);
             INSERT INTO other (v) SELECT g FROM generate_series(1, 100) g;",
        )
        .await;
        let dir = workdir(&format!("apply-flip{round}"));
        let d = dir.to_str().unwrap();
        let child = spawn_pgtide(
            &clone_follow_args(&src, &dst, d, &format!("{name}_slot")),
            &[],
        );
        // Some rounds run while the copy is still going, some after.
        let client = connect(&src).await;
        for i in 0..6 {
            if i == 1 {
                wait_for_slot(&dir);
            }
            if i == 3 {
                // The later rounds are applied live, batched by timing.
                client
                    .batch_execute("INSERT INTO other (id, v) VALUES (-2, -2)")
                    .await
                    .unwrap();
                wait_until_applied(&dst, "SELECT count(*) FROM other WHERE id = -2").await;
            }
            client
                .batch_execute("INSERT INTO other (v) VALUES (1)")
                .await
                .unwrap();
            client
                .batch_execute("UPDATE pay SET amount = 11.95 WHERE amount = 11.99")
                .await
                .unwrap();
            client
                .batch_execute("DELETE FROM other WHERE id = (SELECT min(id) FROM other)")
                .await
                .unwrap();
            if i % 2 == 0 {
                client
                    .batch_execute("SELECT pg_switch_wal()")
                    .await
                    .unwrap();
            }
            client
                .batch_execute(
                    "UPDATE pay SET amount = 11.99 WHERE amount = 11.95;
                     BEGIN; UPDATE pay SET note = 'a' WHERE amount = 11.99;
                     UPDATE pay SET note = 'n' WHERE amount = 11.99; COMMIT;",
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100 * i)).await;
        }
        // A last transaction of FULL-identity changes only, alone in its target transaction
        // (apply is caught up and idle by then): such a batch once committed without sending
        // them.
        client
            .batch_execute("INSERT INTO other (id, v) VALUES (-1, -1)")
            .await
            .unwrap();
        wait_until_applied(&dst, "SELECT count(*) FROM other WHERE id = -1").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        client
            .batch_execute("UPDATE pay SET note = 'last' WHERE amount = 11.99")
            .await
            .unwrap();
        finish_at_current_position(child, &src, d);
        assert_eq!(
            scalar_i64(&dst, "SELECT count(*) FROM pay WHERE note = 'last'").await,
            40,
            "round {round}"
        );
        assert_eq!(
            scalar_i64(&dst, "SELECT count(*) FROM pay WHERE amount = 11.95").await,
            0,
            "round {round}"
        );
        assert_identical(&src, &dst);
        pgtide_ok(&Args::cleanup(&src, &dst, d));
    }
}

/// The peak resident memory (VmHWM) of a running process in MiB, None once it has exited.
fn peak_rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some(kb / 1024)
}

/// Item 6 and invariant 4: one transaction of 1,100 rows of 512 kB bytea (1.1 GB as text) is
/// applied in statements capped in bytes (one statement of it would pass the server's 1 GB
/// message limit) and pgtide's memory stays bounded whatever the rows' width.
#[tokio::test(flavor = "multi_thread")]
async fn wide_rows_are_applied_in_bounded_statements_and_memory() {
    let (src, dst) = fresh_db_pair("t_apply_wide").await;
    exec(
        &src,
        "CREATE TABLE wide (id int PRIMARY KEY, b bytea); INSERT INTO wide VALUES (0, '\\x00');",
    )
    .await;
    let dir = workdir("apply-wide");
    let d = dir.to_str().unwrap();
    let child = spawn_pgtide(&clone_follow_args(&src, &dst, d, "t_apply_wide_slot"), &[]);
    let pid = child.id();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watcher = {
        let peak = peak.clone();
        std::thread::spawn(move || {
            loop {
                let Some(now) = peak_rss_mib(pid) else {
                    return;
                };
                peak.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    wait_for_slot(&dir);
    exec(
        &src,
        "INSERT INTO wide SELECT g, decode(repeat(lpad(to_hex(g), 8, '0'), 131072), 'hex')
           FROM generate_series(1, 1100) g;
         DELETE FROM wide WHERE id % 100 = 0;",
    )
    .await;
    finish_at_current_position(child, &src, d);
    watcher.join().unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("pgtide peak RSS: {peak} MiB");
    assert!(peak > 0, "the process was never measured");
    assert!(peak < 800, "pgtide's peak RSS was {peak} MiB");
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM wide").await, 1089);
    assert_identical(&src, &dst);
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}

/// Item 9: a column dropped on both sides, then pgtide killed and restarted: apply reads the
/// spool's relation descriptions again and must use the last one of each table, not stop on
/// the stale one that still names the dropped column (nor on a table dropped since).
#[tokio::test(flavor = "multi_thread")]
async fn restart_after_a_dropped_column_and_table() {
    let (src, dst) = fresh_db_pair("t_apply_dropcol").await;
    exec(
        &src,
        "CREATE TABLE t (id int PRIMARY KEY, a int, b int); INSERT INTO t VALUES (0, 0, 0);
         CREATE TABLE gone (id int PRIMARY KEY); INSERT INTO gone VALUES (0);",
    )
    .await;
    let dir = workdir("apply-dropcol");
    let d = dir.to_str().unwrap();
    let mut child = spawn_pgtide(
        &clone_follow_args(&src, &dst, d, "t_apply_dropcol_slot"),
        &[],
    );
    wait_for_slot(&dir);
    exec(
        &src,
        "INSERT INTO t VALUES (1, 1, 1); INSERT INTO gone VALUES (1);",
    )
    .await;
    wait_until_applied(&dst, "SELECT count(*) FROM t WHERE id = 1").await;
    wait_until_applied(&dst, "SELECT count(*) FROM gone WHERE id = 1").await;
    // The source drops a column and a table; DDL capture replays both on the target.
    exec(&src, "ALTER TABLE t DROP COLUMN b; DROP TABLE gone").await;
    exec(
        &src,
        "INSERT INTO t VALUES (2, 2); UPDATE t SET a = 5 WHERE id = 0",
    )
    .await;
    wait_until_applied(&dst, "SELECT count(*) FROM t WHERE id = 2").await;
    child.kill().unwrap();
    child.wait().unwrap();
    exec(
        &src,
        "INSERT INTO t VALUES (3, 3); UPDATE t SET a = 6 WHERE id = 1",
    )
    .await;
    let end = current_lsn(&src).await;
    let out = pgtide_ok(&[
        "follow", "--source", &src, "--target", &dst, "--dir", d, "--endpos", &end,
    ]);
    assert!(out.contains("reached endpos"), "{out}");
    assert_identical(&src, &dst);
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}

/// Item 10: `TRUNCATE parent CASCADE` committed between the slot's snapshot and the resync
/// snapshot of the child (clone --follow killed before the child was copied, then resumed):
/// the child's fresh copy already reflects the truncate and the rows inserted after it; the
/// replayed truncate must not empty it again (nor fail on the foreign key between them).
#[tokio::test(flavor = "multi_thread")]
async fn truncate_cascade_before_a_resynced_child_keeps_its_copy() {
    let (src, dst) = fresh_db_pair("t_apply_trunc").await;
    exec(
        &src,
        "CREATE TABLE parent (id int PRIMARY KEY, pad text);
         CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent);
         INSERT INTO parent SELECT g, repeat('p', 200) FROM generate_series(1, 20000) g;
         INSERT INTO child SELECT g, g FROM generate_series(1, 100) g;",
    )
    .await;
    let dir = workdir("apply-trunc");
    let d = dir.to_str().unwrap();
    // One table at a time, largest (parent) first; each part lingers after its commit.
    let mut child = spawn_pgtide(
        &[
            clone_follow_args(&src, &dst, d, "t_apply_trunc_slot"),
            vec!["--table-jobs", "1"],
        ]
        .concat(),
        &[(
            "FAILPOINTS",
            format!("{COPY_AFTER_COMMIT}=sleep(3000)").as_str(),
        )],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while parts_done(&dir) < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the parent was never copied"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    exec(
        &src,
        "TRUNCATE parent CASCADE;
         INSERT INTO parent VALUES (1, 'after'), (2, 'after');
         INSERT INTO child VALUES (1, 1), (2, 2), (3, 1);",
    )
    .await;
    let child = spawn_pgtide(
        &[
            clone_follow_args(&src, &dst, d, "t_apply_trunc_slot"),
            vec!["--resume"],
        ]
        .concat(),
        &[],
    );
    exec(&src, "INSERT INTO child VALUES (4, 2)").await;
    finish_at_current_position(child, &src, d);
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM child").await, 4);
    assert_identical(&src, &dst);
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}

/// `clone --follow --restart` on a work dir whose earlier run recorded a slot: refused until
/// `cleanup` dropped that slot; after it, the new run records its own slot (the clone's reset
/// once erased it again, leaving apply without a slot) and ends identical.
#[tokio::test(flavor = "multi_thread")]
async fn clone_follow_restart_needs_cleanup_then_starts_over() {
    let (src, dst) = fresh_db_pair("t_apply_restart").await;
    exec(
        &src,
        "CREATE TABLE r (id int PRIMARY KEY); INSERT INTO r SELECT generate_series(1, 10);",
    )
    .await;
    let dir = workdir("apply-restart");
    let d = dir.to_str().unwrap();
    let mut child = spawn_pgtide(
        &clone_follow_args(&src, &dst, d, "t_apply_restart_slot"),
        &[],
    );
    wait_for_slot(&dir);
    child.kill().unwrap();
    child.wait().unwrap();
    let restart = [
        clone_follow_args(&src, &dst, d, "t_apply_restart_slot"),
        vec!["--restart", "--drop-if-exists"],
    ]
    .concat();
    let out = pgtide_fails(&restart);
    assert!(out.contains("pgtide cleanup"), "{out}");
    pgtide_ok(&Args::cleanup(&src, &dst, d));
    let child = spawn_pgtide(&restart, &[]);
    wait_for_slot(&dir);
    exec(&src, "INSERT INTO r VALUES (11)").await;
    finish_at_current_position(child, &src, d);
    assert_identical(&src, &dst);
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}

/// Whether the copy of the first (largest) table is under way: one part running.
fn big_is_being_copied(dir: &std::path::Path) -> bool {
    state_count_or_zero(dir, "SELECT count(*) FROM parts WHERE status = 'running'") == 1
}

/// Found by the fuzzer: a TRUNCATE committed on the source while the copy runs, of a table not
/// copied yet. TRUNCATE is not MVCC-safe: the copy's snapshot sees the table empty while the
/// stream still carries the updates made before the truncate, and apply stopped on them
/// ("found no matching row"). The copy notices the rewritten table and, in a clone --follow,
/// copies it again under a new snapshot at a known LSN; a plain clone stops with the fix.
#[tokio::test(flavor = "multi_thread")]
async fn truncate_during_the_copy_resyncs_the_table() {
    let (src, dst) = fresh_db_pair("t_apply_trunc_copy").await;
    exec(
        &src,
        "CREATE TABLE big (id int PRIMARY KEY, pad text);
         CREATE TABLE small (id int PRIMARY KEY, v int);
         INSERT INTO big SELECT g, repeat('b', 200) FROM generate_series(1, 20000) g;
         INSERT INTO small SELECT g, 0 FROM generate_series(1, 100) g;",
    )
    .await;
    let dir = workdir("apply-trunc-copy");
    let d = dir.to_str().unwrap();
    // One table at a time, the big one first, each part lingering before its commit: small is
    // copied after the truncate below.
    let child = spawn_pgtide(
        &[
            clone_follow_args(&src, &dst, d, "t_apply_trunc_copy_slot"),
            vec!["--table-jobs", "1"],
        ]
        .concat(),
        &[(
            "FAILPOINTS",
            format!("{COPY_BEFORE_COMMIT}=sleep(3000)").as_str(),
        )],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !big_is_being_copied(&dir) {
        assert!(std::time::Instant::now() < deadline, "big was never copied");
        std::thread::sleep(Duration::from_millis(20));
    }
    exec(&src, "UPDATE small SET v = 1 WHERE id <= 10").await;
    exec(
        &src,
        "TRUNCATE small; INSERT INTO small VALUES (1000, 7), (1001, 8);",
    )
    .await;
    exec(&src, "UPDATE small SET v = 9 WHERE id = 1000").await;
    let out = finish_at_current_position(child, &src, d);
    assert!(out.contains("truncated or rewritten"), "{out}");
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM small").await, 2);
    assert_identical(&src, &dst);
    pgtide_ok(&Args::cleanup(&src, &dst, d));

    // A plain clone cannot mix snapshots: it stops, naming the table and the fix.
    exec(&dst, "DROP TABLE big, small").await;
    let dir = workdir("apply-trunc-copy-plain");
    let d = dir.to_str().unwrap();
    let child = spawn_pgtide(
        &Args::clone(&src, &dst, d).args(&["--table-jobs", "1"]),
        &[(
            "FAILPOINTS",
            format!("{COPY_BEFORE_COMMIT}=sleep(3000)").as_str(),
        )],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !big_is_being_copied(&dir) {
        assert!(std::time::Instant::now() < deadline, "big was never copied");
        std::thread::sleep(Duration::from_millis(20));
    }
    exec(&src, "TRUNCATE small").await;
    let out = wait_exit(child, 120);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("small") && all.contains("truncated or rewritten") && all.contains("--resume"),
        "{all}"
    );
}

/// Insert runs of 32 rows or more are loaded with COPY (text format): every value arrives as
/// the source has it, whatever it holds (backslashes, tabs, newlines, carriage returns, the
/// text `\N`, empty strings, NULLs, hex bytea, arrays and json with escapes, a domain, a
/// numeric with a typmod), into identity ALWAYS and generated columns and partitions, and
/// statements after a COPY in the same target transaction see its rows.
#[tokio::test(flavor = "multi_thread")]
async fn insert_runs_are_copied_with_every_value_intact() {
    let (src, dst) = fresh_db_pair("t_apply_copy").await;
    exec(
        &src,
        "CREATE DOMAIN positive AS int CHECK (VALUE > 0);
         CREATE TABLE vals (id int PRIMARY KEY, t text, b bytea, j jsonb, arr text[], d positive,
                            n numeric(10, 2), g int GENERATED ALWAYS AS (id * 2) STORED,
                            ident bigint GENERATED ALWAYS AS IDENTITY);
         CREATE TABLE parted (id int, region text, note text, PRIMARY KEY (id, region))
           PARTITION BY LIST (region);
         CREATE TABLE parted_eu PARTITION OF parted FOR VALUES IN ('eu');
         CREATE TABLE parted_us PARTITION OF parted FOR VALUES IN ('us');",
    )
    .await;
    let dir = workdir("apply-copy");
    let d = dir.to_str().unwrap();
    let child = spawn_pgtide(
        &clone_follow_args(&src, &dst, d, "t_apply_copy_slot"),
        &[("PGTIDE_LOG", "info,pgtide::apply::statements=debug")],
    );
    wait_for_slot(&dir);
    exec(
        &src,
        r#"BEGIN;
         INSERT INTO vals (id, t, b, j, arr, d, n)
           SELECT i,
                  CASE i % 8 WHEN 0 THEN E'back\\slash' WHEN 1 THEN E'tab\there' WHEN 2 THEN E'new\nline'
                             WHEN 3 THEN E'carriage\rreturn' WHEN 4 THEN '\N' WHEN 5 THEN ''
                             WHEN 6 THEN NULL ELSE E'all\\\t\n\r\\N' || repeat('x', i) END,
                  CASE WHEN i % 5 = 0 THEN NULL ELSE decode(md5(i::text), 'hex') || '\x5c090a0d'::bytea END,
                  jsonb_build_object('k', E'q\"uote\\back\tslash\n', 'i', i),
                  ARRAY[E'a\"b', E'c\\d', NULL, E'tab\tnl\n', '{}'],
                  i, i / 3.0
           FROM generate_series(1, 200) i;
         UPDATE vals SET t = t || ' updated' WHERE id % 10 = 0;
         INSERT INTO parted SELECT i, CASE WHEN i % 2 = 0 THEN 'eu' ELSE 'us' END, E'n\\' || i
           FROM generate_series(1, 100) i;
         DELETE FROM parted WHERE id % 7 = 0;
         COMMIT;"#,
    )
    .await;
    let out = finish_at_current_position(child, &src, d);
    assert_identical(&src, &dst);
    assert!(
        out.contains(r#"inserted rows into "public"."vals" with COPY"#)
            && out.contains(r#"inserted rows into "public"."parted_eu" with COPY"#),
        "the insert runs did not go through COPY:\n{out}"
    );
    assert_eq!(
        scalar_string(&dst, "SELECT t FROM vals WHERE id = 4").await,
        "\\N",
        "the text \\N stays text, not NULL"
    );
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM vals WHERE t IS NULL").await,
        scalar_i64(&src, "SELECT count(*) FROM vals WHERE t IS NULL").await
    );
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}
