//! The end of an online migration against the real clusters: the recorded filters honoured
//! after the clone (follow's end, cutover, verify --dir), `[exclude-table-data]` tables not
//! followed, a dead follow noticed by cutover at once, materialized views compared and
//! refreshed, an endpos behind the applied position refused.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgtide::failpoints::APPLY_BEFORE_COMMIT;

/// Writes on the source (a change after the slot's snapshot, in the table `tick` each test
/// creates) and waits until apply has
/// committed it on the target.
async fn wait_applied(src: &str, dst: &str, slot: &str, child: &mut std::process::Child) {
    exec(src, "INSERT INTO tick VALUES (1)").await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let applied = format!(
        "SELECT count(*) FROM pg_replication_origin_status
         WHERE external_id = 'pgtide_{slot}' AND remote_lsn > '0/0'"
    );
    while scalar_i64(dst, &applied).await == 0 {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            child.kill().ok();
            let mut out = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                e.read_to_string(&mut out).ok();
            }
            panic!("apply never started:\n{out}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A filters file outside the work dir.
fn filters_file(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "pgtide-test-{name}-filters-{}.ini",
        std::process::id()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

/// Item 5: an `[exclude-table-data]` table is created empty and not published, so the first
/// UPDATE of one of its source rows does not stop apply; check and clone say so.
#[tokio::test(flavor = "multi_thread")]
async fn exclude_table_data_tables_are_created_empty_and_not_followed() {
    let (src, dst) = fresh_db_pair("t_xdata").await;
    exec(
        &src,
        "CREATE TABLE tick (id int PRIMARY KEY);
         CREATE TABLE keep (id int PRIMARY KEY, v text);
         CREATE TABLE audit (id int PRIMARY KEY, v text);
         INSERT INTO keep SELECT g, 'k' FROM generate_series(1, 10) g;
         INSERT INTO audit SELECT g, 'a' FROM generate_series(1, 10) g;",
    )
    .await;
    let filters = filters_file("xdata", "[exclude-table-data]\npublic.audit\n");
    let f = filters.to_str().unwrap();
    let check = text(&pgtide(&[
        "check",
        "--source",
        &src,
        "--target",
        &dst,
        "--filters",
        f,
    ]));
    assert!(
        check.contains("public.audit") && check.contains("not followed"),
        "check does not name the table whose changes are not followed:\n{check}"
    );
    let dir = workdir("xdata");
    let d = dir.to_str().unwrap();
    let mut args = clone_follow_args(&src, &dst, d, "t_xdata_slot");
    args.extend(["--filters", f]);
    let mut child = spawn_pgtide(&args, &[]);
    wait_for_slot(&dir);
    wait_applied(&src, &dst, "t_xdata_slot", &mut child).await;
    exec(
        &src,
        "UPDATE audit SET v = 'changed' WHERE id = 1;
         INSERT INTO audit VALUES (11, 'new');
         INSERT INTO keep VALUES (11, 'new');",
    )
    .await;
    pgtide_ok(&[
        "sentinel",
        "set",
        "endpos",
        "--current",
        "--source",
        &src,
        "--dir",
        d,
    ]);
    let out = wait_exit(child, 90);
    let all = text(&out);
    assert!(out.status.success(), "clone --follow failed:\n{all}");
    assert!(
        all.contains("public.audit") && all.contains("not followed"),
        "clone does not name the table whose changes are not followed:\n{all}"
    );
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM keep").await, 11);
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM audit").await, 0);
    let published = scalar_i64(
        &src,
        "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'pgtide_t_xdata_slot' AND tablename = 'audit'",
    )
    .await;
    assert_eq!(published, 0, "public.audit is published");
    pgtide_ok(&["cleanup", "--source", &src, "--target", &dst, "--dir", d]);
    let _ = std::fs::remove_file(filters);
}

/// Item 12: the filters given to clone --follow are recorded and honoured by follow's end,
/// cutover (sequences and verify) and `verify --dir`; a --sequence-offset does not fail verify.
#[tokio::test(flavor = "multi_thread")]
async fn recorded_filters_are_honoured_by_follow_cutover_and_verify() {
    let (src, dst) = fresh_db_pair("t_recfilt").await;
    exec(
        &src,
        "CREATE TABLE tick (id int PRIMARY KEY);
         CREATE SCHEMA scratch;
         CREATE SEQUENCE scratch.counter;
         SELECT nextval('scratch.counter');
         CREATE TABLE scratch.notes (id int PRIMARY KEY);
         CREATE TABLE orders (id bigserial PRIMARY KEY, item text);
         INSERT INTO orders (item) SELECT 'seed' FROM generate_series(1, 20);
         CREATE TABLE tmp (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY);
         INSERT INTO tmp SELECT FROM generate_series(1, 5);",
    )
    .await;
    let filters = filters_file(
        "recfilt",
        "[exclude-schema]\nscratch\n[exclude-table]\npublic.tmp\n",
    );
    let dir = workdir("recfilt");
    let d = dir.to_str().unwrap();
    let mut args = clone_follow_args(&src, &dst, d, "t_recfilt_slot");
    args.extend(["--filters", filters.to_str().unwrap()]);
    let mut child = spawn_pgtide(&args, &[]);
    wait_for_slot(&dir);
    wait_applied(&src, &dst, "t_recfilt_slot", &mut child).await;
    exec(
        &src,
        "INSERT INTO orders (item) SELECT 'live' FROM generate_series(1, 7);",
    )
    .await;
    // No --filters here: cutover uses the ones the migration recorded.
    let out = pgtide_ok(&[
        "cutover",
        "--source",
        &src,
        "--target",
        &dst,
        "--dir",
        d,
        "--timeout",
        "60s",
        "--sequence-offset",
        "1000",
    ]);
    assert!(out.contains("tables identical"), "{out}");
    let out = wait_exit(child, 60);
    assert!(
        out.status.success(),
        "clone --follow failed at its end:\n{}",
        text(&out)
    );
    let last = "SELECT last_value FROM orders_id_seq";
    assert_eq!(
        scalar_i64(&dst, last).await,
        scalar_i64(&src, last).await + 1000
    );
    let out = pgtide_ok(&["verify", "--source", &src, "--target", &dst, "--dir", d]);
    assert!(out.contains("source and target are identical"), "{out}");
    // copy sequences with the work dir: the recorded filters, the offset recorded for verify.
    pgtide_ok(&[
        "copy",
        "sequences",
        "--source",
        &src,
        "--target",
        &dst,
        "--dir",
        d,
        "--offset",
        "2000",
    ]);
    assert_eq!(
        scalar_i64(&dst, last).await,
        scalar_i64(&src, last).await + 2000
    );
    pgtide_ok(&["verify", "--source", &src, "--target", &dst, "--dir", d]);
    // Other filters than the recorded ones are refused, naming the fix.
    let other = filters_file("recfilt-other", "[exclude-table]\npublic.tmp\n");
    let out = pgtide_fails(&[
        "verify",
        "--source",
        &src,
        "--target",
        &dst,
        "--dir",
        d,
        "--filters",
        other.to_str().unwrap(),
    ]);
    assert!(
        out.contains("differs from the filters this migration recorded"),
        "{out}"
    );
    let _ = std::fs::remove_file(other);
    // Without the work dir, verify knows neither the filters nor the offset: it says so.
    let out = pgtide_fails(&["verify", "--source", &src, "--target", &dst]);
    assert!(out.contains("public.tmp"), "{out}");
    pgtide_ok(&["cleanup", "--source", &src, "--target", &dst, "--dir", d]);
    let _ = std::fs::remove_file(filters);
}

/// Item 13: a follow that dies while cutover waits for it is noticed within seconds, not at
/// the end of --timeout.
#[tokio::test(flavor = "multi_thread")]
async fn cutover_notices_at_once_that_follow_died() {
    let (src, dst) = fresh_db_pair("t_deadfollow").await;
    exec(
        &src,
        "CREATE TABLE tick (id int PRIMARY KEY);
         CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'x' FROM generate_series(1, 10) g;",
    )
    .await;
    let dir = workdir("deadfollow");
    let d = dir.to_str().unwrap();
    // Every apply commit takes 8 s: the follow cannot reach the cutover's endpos before it
    // is killed below.
    let mut child = spawn_pgtide(
        &clone_follow_args(&src, &dst, d, "t_deadfollow_slot"),
        &[(
            "FAILPOINTS",
            format!("{APPLY_BEFORE_COMMIT}=sleep(8000)").as_str(),
        )],
    );
    wait_for_slot(&dir);
    wait_applied(&src, &dst, "t_deadfollow_slot", &mut child).await;
    exec(&src, "INSERT INTO t VALUES (11, 'late')").await;
    let cutover = spawn_pgtide(
        &[
            "cutover",
            "--source",
            &src,
            "--target",
            &dst,
            "--dir",
            d,
            "--timeout",
            "300s",
        ],
        &[],
    );
    // Once cutover has pinned endpos it waits for the follow; then the follow dies.
    let deadline = Instant::now() + Duration::from_secs(30);
    while state_query_i64(
        &dir,
        "SELECT count(*) FROM meta WHERE key = 'sentinel.endpos'",
    ) == 0
    {
        assert!(Instant::now() < deadline, "cutover never pinned endpos");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    let out = wait_exit(cutover, 40);
    let all = text(&out);
    assert!(!out.status.success(), "cutover succeeded:\n{all}");
    assert!(
        killed.elapsed() < Duration::from_secs(20),
        "cutover took {:?} to notice:\n{all}",
        killed.elapsed()
    );
    assert!(all.contains("apply is not running"), "{all}");
    pgtide_ok(&["cleanup", "--source", &src, "--target", &dst, "--dir", d]);
}

/// Item 13, the error path: a follow that stops on an apply error while cutover waits is
/// reported at once, with that error.
#[tokio::test(flavor = "multi_thread")]
async fn cutover_names_the_error_the_follow_stopped_on() {
    let (src, dst) = fresh_db_pair("t_failfollow").await;
    exec(
        &src,
        "CREATE TABLE tick (id int PRIMARY KEY);
         CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'x' FROM generate_series(1, 10) g;",
    )
    .await;
    let dir = workdir("failfollow");
    let d = dir.to_str().unwrap();
    // Every apply commit takes 8 s: the transaction that breaks apply (below) is reached well
    // after cutover has started waiting.
    let mut child = spawn_pgtide(
        &clone_follow_args(&src, &dst, d, "t_failfollow_slot"),
        &[(
            "FAILPOINTS",
            format!("{APPLY_BEFORE_COMMIT}=sleep(8000)").as_str(),
        )],
    );
    wait_for_slot(&dir);
    wait_applied(&src, &dst, "t_failfollow_slot", &mut child).await;
    // The target diverges; the source then commits one transaction apply commits (and sleeps
    // 8 s on), then, a second later, the update that finds no row on the target.
    exec(&dst, "DELETE FROM t WHERE id = 1").await;
    exec(&src, "INSERT INTO tick VALUES (2)").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    exec(&src, "UPDATE t SET v = 'y' WHERE id = 1").await;
    let started = Instant::now();
    let cutover = spawn_pgtide(
        &[
            "cutover",
            "--source",
            &src,
            "--target",
            &dst,
            "--dir",
            d,
            "--timeout",
            "300s",
        ],
        &[],
    );
    let out = wait_exit(cutover, 60);
    let all = text(&out);
    assert!(!out.status.success(), "cutover succeeded:\n{all}");
    assert!(
        all.contains("apply is not running") && all.contains("found no matching row"),
        "cutover does not say that apply stopped, and on what:\n{all}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "cutover took {:?}",
        started.elapsed()
    );
    let out = wait_exit(child, 30);
    assert!(!out.status.success(), "{}", text(&out));
    pgtide_ok(&["cleanup", "--source", &src, "--target", &dst, "--dir", d]);
}

/// Item 14: materialized views are compared and reported as such; --refresh-matviews
/// refreshes them on the target before verify.
#[tokio::test(flavor = "multi_thread")]
async fn matviews_are_compared_and_refreshed_on_cutover() {
    let (src, dst) = fresh_db_pair("t_matview").await;
    exec(
        &src,
        "CREATE TABLE tick (id int PRIMARY KEY);
         CREATE TABLE orders (id int PRIMARY KEY, amount int);
         INSERT INTO orders SELECT g, g FROM generate_series(1, 10) g;
         CREATE MATERIALIZED VIEW totals AS SELECT count(*) AS n, sum(amount) AS total FROM orders;",
    )
    .await;
    let dir = workdir("matview");
    let d = dir.to_str().unwrap();
    let mut child = spawn_pgtide(&clone_follow_args(&src, &dst, d, "t_matview_slot"), &[]);
    wait_for_slot(&dir);
    wait_applied(&src, &dst, "t_matview_slot", &mut child).await;
    exec(
        &src,
        "INSERT INTO orders SELECT g, g FROM generate_series(11, 20) g;
         REFRESH MATERIALIZED VIEW totals;",
    )
    .await;
    let out = pgtide_ok(&[
        "cutover",
        "--source",
        &src,
        "--target",
        &dst,
        "--dir",
        d,
        "--timeout",
        "60s",
        "--refresh-matviews",
    ]);
    assert!(
        out.contains("1 materialized view") && out.contains("refreshed"),
        "{out}"
    );
    assert_eq!(
        scalar_i64(&dst, "SELECT total FROM totals").await,
        210,
        "the target's matview was not refreshed"
    );
    let out = wait_exit(child, 60);
    assert!(out.status.success(), "{}", text(&out));
    // The source's matview is emptied (the tables stay identical): verify lists it as a
    // differing materialized view, apart from the tables, and passes.
    exec(&src, "REFRESH MATERIALIZED VIEW totals WITH NO DATA").await;
    let out = pgtide_ok(&["verify", "--source", &src, "--target", &dst]);
    assert!(
        out.contains("public.totals") && out.contains("differs (materialized view)"),
        "{out}"
    );
    assert!(
        out.contains("1 materialized view compared: 0 identical, 1 differs (public.totals)"),
        "{out}"
    );
    pgtide_ok(&["cleanup", "--source", &src, "--target", &dst, "--dir", d]);
}

/// Item 15: an endpos behind what the target has applied is refused, naming both positions.
#[tokio::test(flavor = "multi_thread")]
async fn endpos_behind_the_applied_position_is_refused() {
    let (src, dst) = fresh_db_pair("t_oldendpos").await;
    exec(
        &src,
        "CREATE TABLE tick (id int PRIMARY KEY);
         CREATE TABLE t (id int PRIMARY KEY);
         INSERT INTO t SELECT generate_series(1, 10);",
    )
    .await;
    let dir = workdir("oldendpos");
    let d = dir.to_str().unwrap();
    let mut child = spawn_pgtide(&clone_follow_args(&src, &dst, d, "t_oldendpos_slot"), &[]);
    wait_for_slot(&dir);
    wait_applied(&src, &dst, "t_oldendpos_slot", &mut child).await;
    // The follow records the position durable on the target every second.
    let deadline = Instant::now() + Duration::from_secs(30);
    while state_query_i64(
        &dir,
        "SELECT count(*) FROM meta WHERE key = 'apply.durable_lsn' AND value <> '0/0'",
    ) == 0
    {
        assert!(
            Instant::now() < deadline,
            "the follow never recorded its position"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let err = pgtide_fails(&["sentinel", "set", "endpos", "0/100", "--dir", d]);
    assert!(
        err.contains("0/100") && err.contains("applied"),
        "the refusal does not name both positions:\n{err}"
    );
    assert_eq!(
        state_query_i64(
            &dir,
            "SELECT count(*) FROM meta WHERE key = 'sentinel.endpos'"
        ),
        0,
        "the refused endpos was recorded"
    );
    pgtide_ok(&[
        "sentinel",
        "set",
        "endpos",
        "--current",
        "--source",
        &src,
        "--dir",
        d,
    ]);
    let out = wait_exit(child, 60);
    assert!(out.status.success(), "{}", text(&out));
    pgtide_ok(&["cleanup", "--source", &src, "--target", &dst, "--dir", d]);
}
