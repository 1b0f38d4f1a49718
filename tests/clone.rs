//! End-to-end tests of `pgtide clone` and `pgtide verify` against the real clusters.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgtide::failpoints::{COPY_AFTER_COMMIT, COPY_BEFORE_COMMIT, INDEX_AFTER_STATEMENT};

/// Every object kind of the hard-case fixture arrives, and verify proves the rows identical.
#[tokio::test(flavor = "multi_thread")]
async fn clone_copies_every_hard_case_identically() {
    let (src, dst) = fresh_db_pair("t_hard").await;
    exec(&src, &hard_cases_sql()).await;
    let dir = workdir("hard");
    let out = pgtide_ok(&Args::clone(&src, &dst, dir.to_str().unwrap()).args(&[
        "--table-jobs",
        "2",
        "--index-jobs",
        "2",
    ]));
    assert!(out.contains("clone finished"), "{out}");
    assert_identical(&src, &dst);

    // Every index, constraint, trigger, view, rule and extension exists on the target.
    for sql in [
        "SELECT count(*) FROM pg_indexes WHERE schemaname IN ('public', 'sales')",
        "SELECT count(*) FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace WHERE n.nspname IN ('public', 'sales')",
        "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal",
        "SELECT count(*) FROM pg_views WHERE schemaname = 'sales'",
        "SELECT count(*) FROM pg_extension WHERE extname = 'hstore'",
        "SELECT count(*) FROM pg_inherits",
    ] {
        let (s, t) = (scalar_i64(&src, sql).await, scalar_i64(&dst, sql).await);
        assert_eq!(s, t, "{sql}: source {s}, target {t}");
        assert!(
            s > 0,
            "{sql} found nothing on the source: the fixture is wrong"
        );
    }
    // Constraints kept their properties (deferrable unique, exclusion, FK, check).
    let defs = "SELECT string_agg(conname || ' ' || pg_get_constraintdef(oid) || condeferrable || condeferred, ',' ORDER BY conname) FROM pg_constraint WHERE connamespace IN (SELECT oid FROM pg_namespace WHERE nspname IN ('public','sales'))";
    assert_eq!(
        scalar_string(&src, defs).await,
        scalar_string(&dst, defs).await
    );
    // The materialized view is populated, the large object and sequences carried over.
    assert_eq!(
        scalar_i64(&dst, "SELECT sum(n)::bigint FROM sales.status_counts").await,
        20000
    );
    let lo = "SELECT md5(lo_get(424242))";
    assert_eq!(scalar_string(&src, lo).await, scalar_string(&dst, lo).await);
    assert_eq!(
        scalar_string(&dst, "SELECT obj_description(424242, 'pg_largeobject')").await,
        "a large object the clone must carry"
    );
    for seq in [
        "standalone_seq",
        "sales.customers_id_seq",
        "never_called_seq",
        "hard_types_id_seq",
    ] {
        let sql = format!("SELECT nextval('{seq}')");
        assert_eq!(
            scalar_i64(&src, &sql).await,
            scalar_i64(&dst, &sql).await,
            "{seq}"
        );
    }
    // The generated column was computed on the target, not copied (it cannot be).
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM hard_types WHERE doubled IS DISTINCT FROM n * 2"
        )
        .await,
        0
    );
    // No pgtide leftovers on the target.
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgtide'"
        )
        .await,
        0
    );
    // state.db has a progress row with start and end for every step.
    assert_eq!(
        state_query_i64(
            &dir,
            "SELECT count(*) FROM steps WHERE status = 'done' AND done_at >= started_at"
        ),
        9
    );

    // The catalog in state.db records every constraint of the copied tables.
    assert_eq!(
        state_query_i64(&dir, "SELECT count(*) FROM constraints"),
        scalar_i64(&src, "SELECT count(*) FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname IN ('public', 'sales')").await
    );
    // Every table was vacuumed and analyzed on the target, most of them while others copied.
    assert_eq!(
        state_query_i64(
            &dir,
            "SELECT count(*) FROM tables WHERE vacuumed_at IS NULL"
        ),
        0
    );
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname IN ('public', 'sales') AND c.reltuples < 0").await,
        0,
        "a table was never analyzed"
    );

    // verify is able to fail: one changed value in one row is found and named.
    exec(
        &dst,
        "UPDATE uuid_pk SET v = v || ' ' WHERE id = md5('u7')::uuid",
    )
    .await;
    let out = pgtide_fails(&Args::verify(&src, &dst));
    assert!(
        out.contains("public.uuid_pk") && out.contains("DIFFERENT"),
        "{out}"
    );
    let json = pgtide(&Args::verify(&src, &dst).args(&["--json"]));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["all_match"], false);
    // Counts alone cannot see that change; the checksum does.
    pgtide_ok(&Args::verify(&src, &dst).args(&["--counts-only"]));
}

/// A table larger than the threshold is copied as several ctid ranges and arrives whole.
#[tokio::test(flavor = "multi_thread")]
async fn split_table_is_copied_in_parts() {
    let (src, dst) = fresh_db_pair("t_split").await;
    exec(
        &src,
        "CREATE TABLE big (id int PRIMARY KEY, pad text, t text);
         INSERT INTO big SELECT i, repeat('x', 200), CASE WHEN i % 500 = 0 THEN repeat(md5(i::text), 300) END
         FROM generate_series(1, 30000) i;
         DELETE FROM big WHERE id % 7 = 0;
         CREATE TABLE small (id int);
         INSERT INTO small VALUES (1);",
    )
    .await;
    let dir = workdir("split");
    pgtide_ok(&Args::clone(&src, &dst, dir.to_str().unwrap()).args(&[
        "--split-tables-larger-than",
        "1MB",
        "--table-jobs",
        "3",
    ]));
    let parts = state_query_i64(
        &dir,
        "SELECT count(*) FROM parts p JOIN tables t ON t.oid = p.table_oid WHERE t.table_name = 'big'",
    );
    assert!(
        parts >= 5,
        "big should be split into at least 5 parts, got {parts}"
    );
    assert_eq!(
        state_query_i64(
            &dir,
            "SELECT count(*) FROM parts p JOIN tables t ON t.oid = p.table_oid WHERE t.table_name = 'small'"
        ),
        1
    );
    assert_eq!(
        state_query_i64(
            &dir,
            "SELECT sum(rows) FROM parts p JOIN tables t ON t.oid = p.table_oid WHERE t.table_name = 'big'"
        ),
        30000 - 30000 / 7
    );
    assert_identical(&src, &dst);
}

/// `--split-tables-larger-than auto` (the default) splits a table that outweighs its share of
/// the data when the servers have cores for more streams: told with --copy-cores, or measured
/// on these servers, which share this machine's cores (never more streams than it has).
#[tokio::test(flavor = "multi_thread")]
async fn auto_split_follows_the_cores() {
    let (src, dst) = fresh_db_pair("t_autosplit").await;
    // About 80 MB of heap (rows of ~1.3 kB stay inline), and a small table beside it.
    exec(
        &src,
        "CREATE TABLE big (id int PRIMARY KEY, pad text);
         INSERT INTO big SELECT i, repeat(md5(i::text), 40) FROM generate_series(1, 60000) i;
         CREATE TABLE small (id int PRIMARY KEY);
         INSERT INTO small SELECT generate_series(1, 1000);",
    )
    .await;
    let parts_of = |dir: &std::path::Path, table: &str| {
        state_query_i64(
            dir,
            &format!(
                "SELECT count(*) FROM parts p JOIN tables t ON t.oid = p.table_oid WHERE t.table_name = '{table}'"
            ),
        )
    };
    // Four cores told: 80 MB in parts of at least 32 MB is two parts; small stays whole.
    let told = workdir("autosplit_told");
    let out = pgtide_ok(&Args::clone(&src, &dst, told.to_str().unwrap()).args(&[
        "--table-jobs",
        "4",
        "--copy-cores",
        "4",
    ]));
    assert!(out.contains("planning the copy for 4 cores"), "{out}");
    assert_eq!(parts_of(&told, "big"), 2);
    assert_eq!(parts_of(&told, "small"), 1);
    assert_identical(&src, &dst);

    // Measured: the plan follows what the probe found, within this machine's cores.
    let dst2 = fresh_db(&admin_uri("target"), "t_autosplit_measured").await;
    let measured = workdir("autosplit_measured");
    let out = pgtide_ok(
        &Args::clone(&src, &dst2, measured.to_str().unwrap()).args(&["--table-jobs", "4"]),
    );
    let streams: usize = out
        .split("planning ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no measured plan in the log:\n{out}"));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let plan = out
        .lines()
        .find(|l| l.contains("measured the cores"))
        .unwrap_or_default();
    println!("{plan}");
    assert!(
        (1..=cores).contains(&streams),
        "{streams} streams on {cores} cores:\n{out}"
    );
    assert_eq!(parts_of(&measured, "big"), if streams >= 2 { 2 } else { 1 });
    assert_identical(&src, &dst2);

    // 0 never splits, whatever the cores.
    let dst3 = fresh_db(&admin_uri("target"), "t_autosplit_never").await;
    let never = workdir("autosplit_never");
    pgtide_ok(&Args::clone(&src, &dst3, never.to_str().unwrap()).args(&[
        "--split-tables-larger-than",
        "0",
        "--copy-cores",
        "4",
    ]));
    assert_eq!(parts_of(&never, "big"), 1);
    assert_identical(&src, &dst3);
}

/// The copy reads the snapshot, not the live table: rows committed after the snapshot that
/// pgtide is handed (`--snapshot`) are not copied.
#[tokio::test(flavor = "multi_thread")]
async fn clone_uses_the_given_snapshot() {
    let (src, dst) = fresh_db_pair("t_snap").await;
    exec(
        &src,
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100);",
    )
    .await;
    let holder = connect(&src).await;
    holder
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let snapshot: String = holder
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .unwrap()
        .get(0);
    exec(
        &src,
        "INSERT INTO t SELECT generate_series(101, 150); DELETE FROM t WHERE id <= 10;",
    )
    .await;
    let dir = workdir("snap");
    pgtide_ok(&Args::clone(&src, &dst, dir.to_str().unwrap()).args(&["--snapshot", &snapshot]));
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM t").await, 100);
    assert_eq!(scalar_i64(&dst, "SELECT min(id)::bigint FROM t").await, 1);
    holder.batch_execute("COMMIT").await.unwrap();
}

/// Filters: an excluded schema and table are not created, an excluded table's data is not
/// copied (its schema is), and verify with the same filters agrees.
#[tokio::test(flavor = "multi_thread")]
async fn filters_select_what_is_copied() {
    let (src, dst) = fresh_db_pair("t_filters").await;
    exec(
        &src,
        "CREATE SCHEMA scratch; CREATE TABLE scratch.tmp (id int);
         CREATE TABLE keep (id int PRIMARY KEY); INSERT INTO keep SELECT generate_series(1, 10);
         CREATE TABLE skipped (id int PRIMARY KEY);
         CREATE TABLE audit_log (id int PRIMARY KEY, msg text); INSERT INTO audit_log SELECT i, 'm' FROM generate_series(1, 50) i;",
    )
    .await;
    let dir = workdir("filters");
    std::fs::create_dir_all(&dir).unwrap();
    let filters = dir.join("filters.ini");
    std::fs::write(&filters, "[exclude-schema]\nscratch\n[exclude-table]\npublic.skipped\n[exclude-table-data]\npublic.audit_log\n").unwrap();
    let f = filters.to_str().unwrap();
    pgtide_ok(&Args::clone(&src, &dst, dir.join("w").to_str().unwrap()).args(&["--filters", f]));
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM keep").await, 10);
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM audit_log").await, 0);
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'audit_log_pkey'"
        )
        .await,
        1
    );
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_class WHERE relname IN ('skipped', 'tmp')"
        )
        .await,
        0
    );
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'scratch'"
        )
        .await,
        0
    );
    let out = pgtide_ok(&Args::verify(&src, &dst).args(&["--filters", f]));
    assert!(out.contains("identical"), "{out}");
}

/// A crash right after a part's target commit (before state.db heard of it): the resumed clone
/// finds the part on the target and copies nothing twice.
#[tokio::test(flavor = "multi_thread")]
async fn resume_after_crash_between_target_commit_and_state_update() {
    let (src, dst) = fresh_db_pair("t_crash_commit").await;
    let mut sql = String::new();
    for i in 0..8 {
        sql.push_str(&format!(
            "CREATE TABLE t{i} (id int PRIMARY KEY, v text); INSERT INTO t{i} SELECT g, md5(g::text) FROM generate_series(1, {}) g;",
            1000 * (i + 1)
        ));
    }
    exec(&src, &sql).await;
    let dir = workdir("crash-commit");
    let d = dir.to_str().unwrap();
    let out = pgtide_command(&Args::clone(&src, &dst, d).args(&["--table-jobs", "1"]))
        .env(
            "FAILPOINTS",
            format!("{COPY_AFTER_COMMIT}=3*off->panic").as_str(),
        )
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the failpoint should have stopped the clone: {}",
        text(&out)
    );
    let done_before = state_query_i64(&dir, "SELECT count(*) FROM parts WHERE status = 'done'");
    assert_eq!(done_before, 3, "three parts finished before the crash");
    assert_eq!(
        state_query_i64(&dir, "SELECT count(*) FROM parts WHERE status = 'running'"),
        1
    );

    let refused = pgtide_fails(&Args::clone(&src, &dst, d));
    assert!(refused.contains("--resume"), "{refused}");

    pgtide_ok(&Args::clone(&src, &dst, d).args(&["--table-jobs", "2", "--resume"]));
    assert_identical(&src, &dst);
    // The part committed before the crash was found on the target, not copied again.
    assert_eq!(state_query_i64(&dir, "SELECT max(attempts) FROM parts"), 1);
    assert_eq!(
        state_query_i64(&dir, "SELECT count(*) FROM parts WHERE status = 'done'"),
        8
    );
    // Steps done before the crash were not run again.
    assert_eq!(
        state_query_i64(&dir, "SELECT attempts FROM steps WHERE name = 'pre-data'"),
        1
    );
}

/// SIGKILL in the middle of the data step, then --resume: identical result, and nothing that
/// was done before the kill was done again.
#[tokio::test(flavor = "multi_thread")]
async fn resume_after_sigkill_during_copy() {
    let (src, dst) = fresh_db_pair("t_sigkill").await;
    let mut sql = String::new();
    for i in 0..10 {
        sql.push_str(&format!(
            "CREATE TABLE k{i} (id int PRIMARY KEY, v text); CREATE INDEX ON k{i} (v); INSERT INTO k{i} SELECT g, md5(g::text) FROM generate_series(1, {}) g;",
            2000 + 100 * i
        ));
    }
    exec(&src, &sql).await;
    let dir = workdir("sigkill");
    let d = dir.to_str().unwrap();
    let mut child = pgtide_command(&Args::clone(&src, &dst, d).args(&["--table-jobs", "1"]))
        .env(
            "FAILPOINTS",
            format!("{COPY_BEFORE_COMMIT}=sleep(300)").as_str(),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "the clone never reached the data step"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the clone ended before it could be killed"
        );
        let done = parts_done(&dir);
        if done >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done_at_kill = state_query_i64(&dir, "SELECT count(*) FROM parts WHERE status = 'done'");
    assert!(done_at_kill < 10, "the kill came too late to test anything");

    pgtide_ok(&Args::clone(&src, &dst, d).args(&["--resume"]));
    assert_identical(&src, &dst);
    // Parts done before the kill ran once; at most the one in flight ran twice.
    assert!(state_query_i64(&dir, "SELECT count(*) FROM parts WHERE attempts > 1") <= 1);
    assert!(state_query_i64(&dir, "SELECT count(*) FROM parts WHERE attempts = 1") >= done_at_kill);
    assert_eq!(
        state_query_i64(&dir, "SELECT count(*) FROM indexes WHERE status = 'done'"),
        20
    );
}

/// Many unique constraints on one table built by several index workers at once: each
/// `ADD CONSTRAINT … USING INDEX` waits for the other builds instead of deadlocking with them.
#[tokio::test(flavor = "multi_thread")]
async fn parallel_index_builds_on_one_table() {
    let (src, dst) = fresh_db_pair("t_many_idx").await;
    let mut sql = String::new();
    for t in 0..3 {
        sql.push_str(&format!(
            "CREATE TABLE m{t} (id int PRIMARY KEY, a int UNIQUE, b int UNIQUE, c int UNIQUE, d text, e text);
             CREATE INDEX ON m{t} (d); CREATE INDEX ON m{t} (e, d);
             INSERT INTO m{t} SELECT g, g, -g, g * 2, md5(g::text), md5(g::text) FROM generate_series(1, 20000) g;"
        ));
    }
    exec(&src, &sql).await;
    let dir = workdir("many-idx");
    pgtide_ok(&Args::clone(&src, &dst, dir.to_str().unwrap()).args(&[
        "--table-jobs",
        "3",
        "--index-jobs",
        "4",
    ]));
    assert_identical(&src, &dst);
}

/// A crash between `CREATE UNIQUE INDEX` and `ADD CONSTRAINT … USING INDEX`: the resumed clone
/// keeps the built index and attaches the constraint.
#[tokio::test(flavor = "multi_thread")]
async fn resume_after_crash_between_unique_index_and_constraint() {
    let (src, dst) = fresh_db_pair("t_crash_idx").await;
    exec(&src, "CREATE TABLE p (id int PRIMARY KEY, v text); INSERT INTO p SELECT g, 'v' FROM generate_series(1, 1000) g;").await;
    let dir = workdir("crash-idx");
    let d = dir.to_str().unwrap();
    let out = pgtide_command(&Args::clone(&src, &dst, d).args(&["--index-jobs", "1"]))
        .env(
            "FAILPOINTS",
            format!("{INDEX_AFTER_STATEMENT}=panic").as_str(),
        )
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the failpoint should have stopped the clone: {}",
        text(&out)
    );
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'p_pkey'"
        )
        .await,
        1
    );
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_constraint WHERE conname = 'p_pkey'"
        )
        .await,
        0
    );
    pgtide_ok(&Args::clone(&src, &dst, d).args(&["--resume"]));
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_constraint WHERE conname = 'p_pkey' AND contype = 'p'"
        )
        .await,
        1
    );
    assert_identical(&src, &dst);
}

/// REPLICA IDENTITY USING INDEX is part of the index's entry in pg_dump, which the index
/// workers replace: the clone must set it again (found by the differential fuzzer, seed 4:
/// the target's UPDATEs failed once a publication covered the table).
#[tokio::test(flavor = "multi_thread")]
async fn replica_identity_using_index_survives_the_clone() {
    let (src, dst) = fresh_db_pair("t_replident").await;
    exec(
        &src,
        "CREATE TABLE u (k int NOT NULL, v text); CREATE UNIQUE INDEX u_k ON u (k);
         ALTER TABLE u REPLICA IDENTITY USING INDEX u_k;
         CREATE TABLE p (id int PRIMARY KEY, k int NOT NULL UNIQUE);
         ALTER TABLE p REPLICA IDENTITY USING INDEX p_k_key;
         CREATE TABLE f (a int, b text); ALTER TABLE f REPLICA IDENTITY FULL;
         INSERT INTO u VALUES (1, 'a'); INSERT INTO p VALUES (1, 1); INSERT INTO f VALUES (1, 'x');",
    )
    .await;
    let dir = workdir("replident");
    pgtide_ok(&Args::clone(&src, &dst, dir.to_str().unwrap()));
    let identities = "SELECT string_agg(c.relname || ':' || c.relreplident::text || ':' ||
                             coalesce((SELECT i.indexrelid::regclass::text FROM pg_index i
                                       WHERE i.indrelid = c.oid AND i.indisreplident), '-'), ' ' ORDER BY c.relname)
                      FROM pg_class c WHERE c.relname IN ('u', 'p', 'f')";
    assert_eq!(
        scalar_string(&dst, identities).await,
        "f:f:- p:i:p_k_key u:i:u_k"
    );
    assert_eq!(
        scalar_string(&src, identities).await,
        scalar_string(&dst, identities).await
    );
    assert_identical(&src, &dst);
}
