//! `pgtide follow --add-table / --resync / --remove-table` while a clone --follow runs and the
//! source keeps writing (issue 13, item 2): a table joins, is repaired, or leaves, the follow
//! never stops, and after cutover every followed table is identical; a join killed in the
//! middle and run again ends identical too.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use pgtide::failpoints::TABLE_SYNC_AFTER_COPY;

/// Application traffic until stopped: each statement list runs as one transaction, in turn,
/// with `{i}` replaced by the round number. Returns the rounds committed.
struct Traffic {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Traffic {
    async fn start(src: &str, transactions: &[&str]) -> Self {
        let client = connect(src).await;
        let transactions: Vec<String> = transactions.iter().map(|t| t.to_string()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut rounds = 0u64;
            while !stopped.load(Ordering::Relaxed) {
                for t in &transactions {
                    let sql = format!("BEGIN; {}; COMMIT", t.replace("{i}", &rounds.to_string()));
                    client.batch_execute(&sql).await.unwrap();
                }
                rounds += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            rounds
        });
        Traffic { stop, task }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

fn follow_request<'a>(
    src: &'a str,
    dst: &'a str,
    d: &'a str,
    flag: &'a str,
    table: &'a str,
) -> Args<'a> {
    Args::new(&[
        "follow", "--source", src, "--target", dst, "--dir", d, flag, table,
    ])
}

/// Cutover with the recorded filters; the clone --follow child ends at its endpos. Returns the
/// follow's log, and prints what apply said about table copies (how long it waited).
fn cutover_and_wait(src: &str, dst: &str, d: &str, child: PgtideChild) -> String {
    let out = pgtide_ok(&Args::cutover(src, dst, d).args(&["--timeout", "180s"]));
    assert!(out.contains("tables identical"), "{out}");
    let out = wait_exit(child, 60);
    let log = text(&out);
    assert!(
        out.status.success(),
        "clone --follow failed at its end:\n{log}"
    );
    for line in log
        .lines()
        .filter(|l| l.contains("apply: ") && l.contains("copy of"))
    {
        eprintln!("follow: {line}");
    }
    log
}

/// a. A table the filters left out joins while the follow runs and the application writes to
/// it and to followed tables in the same transactions; after cutover it is identical, with its
/// indexes and constraints, and so is every other table.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_left_out_joins_live_under_traffic() {
    let (src, dst) = fresh_db_pair("t_ts_add").await;
    exec(
        &src,
        "CREATE TABLE tick (id int PRIMARY KEY);
         CREATE TABLE a (id bigserial PRIMARY KEY, v int NOT NULL);
         CREATE TABLE x (id bigserial PRIMARY KEY, v int NOT NULL CHECK (v >= 0), note text UNIQUE);
         CREATE INDEX x_v ON x (v);
         INSERT INTO a (v) SELECT g FROM generate_series(1, 200) g;
         INSERT INTO x (v, note) SELECT g, 'seed ' || g FROM generate_series(1, 2000) g;",
    )
    .await;
    let filters = filters_file("ts-add", "[exclude-table]\npublic.x\n");
    let dir = workdir("ts-add");
    let d = dir.to_str().unwrap();
    let mut args = clone_follow_args(&src, &dst, d, "t_ts_add_slot");
    args.extend(["--filters", filters.to_str().unwrap()]);
    let mut child = spawn_pgtide(&args, &[]);
    wait_for_slot(&dir);
    wait_applied(&src, &dst, "t_ts_add_slot", &mut child).await;
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM pg_class WHERE relname = 'x'").await,
        0,
        "x was left out by the filters"
    );
    let traffic = Traffic::start(
        &src,
        &[
            "INSERT INTO a (v) VALUES ({i}); UPDATE x SET v = v + 1 WHERE id = {i} % 2000 + 1; INSERT INTO x (v, note) VALUES ({i}, 'live ' || {i})",
            "UPDATE a SET v = v + 1 WHERE id = {i} % 200 + 1",
            "DELETE FROM x WHERE id = 2000 - {i} % 1000; UPDATE a SET v = 0 WHERE id = {i} % 50 + 1",
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = pgtide_ok(&follow_request(&src, &dst, d, "--add-table", "x"));
    assert!(out.contains("public.x: joined the migration"), "{out}");
    assert!(out.contains("created on the target"), "{out}");
    // The follow keeps going: later changes of x arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rounds = traffic.stop().await;
    assert!(rounds > 10, "too little traffic: {rounds} rounds");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the follow stopped:\n{}",
        child.output_so_far()
    );
    // x is followed from now on: a second add is refused.
    let out = pgtide_fails(&follow_request(&src, &dst, d, "--add-table", "public.x"));
    assert!(out.contains("already followed"), "{out}");
    cutover_and_wait(&src, &dst, d, child);
    assert_identical(&src, &dst);
    let out = pgtide_ok(&Args::verify(&src, &dst).args(&["--dir", d]));
    assert!(out.contains("source and target are identical"), "{out}");
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'x'"
        )
        .await,
        3,
        "x's primary key, unique constraint and index are on the target"
    );
    pgtide_ok(&Args::cleanup(&src, &dst, d));
    let _ = std::fs::remove_file(filters);
}

/// b. A followed table damaged on the target is copied again while the application updates
/// it: the resync repairs it (an update of a row deleted on the target would stop apply) and
/// the follow never stops.
#[tokio::test(flavor = "multi_thread")]
async fn resync_repairs_a_damaged_table_under_traffic() {
    let (src, dst) = fresh_db_pair("t_ts_resync").await;
    exec(
        &src,
        "CREATE TABLE tick (id int PRIMARY KEY);
         CREATE TABLE parent (id int PRIMARY KEY);
         INSERT INTO parent SELECT generate_series(1, 10);
         CREATE TABLE y (id bigserial PRIMARY KEY, v int NOT NULL, p int REFERENCES parent);
         CREATE TABLE child (id int PRIMARY KEY, y_id bigint REFERENCES y);
         INSERT INTO y (v, p) SELECT g, g % 10 + 1 FROM generate_series(1, 3000) g;
         INSERT INTO child SELECT g, g FROM generate_series(1, 50) g;",
    )
    .await;
    let dir = workdir("ts-resync");
    let d = dir.to_str().unwrap();
    let mut child = spawn_pgtide(&clone_follow_args(&src, &dst, d, "t_ts_resync_slot"), &[]);
    wait_for_slot(&dir);
    wait_applied(&src, &dst, "t_ts_resync_slot", &mut child).await;
    // Damage on the target, in rows the traffic leaves alone until the resync is done.
    exec(
        &dst,
        "DELETE FROM y WHERE id <= 300 AND id % 7 = 0 AND id > 50;
         UPDATE y SET v = -1 WHERE id <= 300 AND id % 11 = 0;",
    )
    .await;
    let traffic = Traffic::start(
        &src,
        &[
            "UPDATE y SET v = v + 1 WHERE id = 301 + {i} % 2000; INSERT INTO y (v, p) VALUES ({i}, 1)",
            "DELETE FROM y WHERE id = 2999 - {i} % 500 AND id NOT IN (SELECT y_id FROM child); INSERT INTO tick VALUES (100 + {i})",
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = pgtide_ok(&follow_request(&src, &dst, d, "--resync", "y"));
    assert!(out.contains("public.y: copied again"), "{out}");
    let traffic = {
        traffic.stop().await;
        // Now the damaged rows are updated too: they must be back on the target.
        Traffic::start(
            &src,
            &["UPDATE y SET v = v + 1 WHERE id = {i} % 300 + 1; INSERT INTO y (v, p) VALUES ({i}, 2)"],
        )
        .await
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    traffic.stop().await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the follow stopped:\n{}",
        child.output_so_far()
    );
    cutover_and_wait(&src, &dst, d, child);
    assert_identical(&src, &dst);
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}

/// c. A removed table's later changes are not applied, the follow keeps running, and verify
/// and cutover leave it out (the recorded filters exclude it); wrong requests are refused with
/// the fix.
#[tokio::test(flavor = "multi_thread")]
async fn a_removed_table_is_left_alone_and_left_out() {
    let (src, dst) = fresh_db_pair("t_ts_remove").await;
    exec(
        &src,
        "CREATE TABLE tick (id int PRIMARY KEY);
         CREATE TABLE a (id int PRIMARY KEY, v int);
         CREATE TABLE z (id serial PRIMARY KEY, v int);
         INSERT INTO a SELECT g, g FROM generate_series(1, 100) g;
         INSERT INTO z (v) SELECT g FROM generate_series(1, 100) g;",
    )
    .await;
    let dir = workdir("ts-remove");
    let d = dir.to_str().unwrap();
    // Without DDL capture: the tables created below are not followed until added (with the
    // capture they join in their creating transaction, tests/ddl.rs).
    let mut child = spawn_pgtide(
        &[
            clone_follow_args(&src, &dst, d, "t_ts_remove_slot"),
            vec!["--no-ddl-capture"],
        ]
        .concat(),
        &[],
    );
    wait_for_slot(&dir);
    wait_applied(&src, &dst, "t_ts_remove_slot", &mut child).await;
    // Refusals name the problem and the fix; nothing is recorded for them.
    let out = pgtide_fails(&follow_request(&src, &dst, d, "--add-table", "nosuch"));
    assert!(
        out.contains("public.nosuch does not exist on the source"),
        "{out}"
    );
    let out = pgtide_fails(&follow_request(&src, &dst, d, "--add-table", "a"));
    assert!(
        out.contains("already followed") && out.contains("--resync public.a"),
        "{out}"
    );
    exec(
        &src,
        "CREATE TABLE nokey (v int); INSERT INTO nokey VALUES (1)",
    )
    .await;
    let out = pgtide_fails(&follow_request(&src, &dst, d, "--add-table", "nokey"));
    assert!(out.contains("REPLICA IDENTITY FULL"), "{out}");
    // A table created after the clone and not added is a real difference for verify.
    exec(&src, "DROP TABLE nokey").await;
    // A table whose foreign key names a table the target lacks cannot be created there: the
    // request is given up whole (nothing recorded, nothing published) and says why.
    exec(
        &src,
        "CREATE TABLE newparent (id int PRIMARY KEY); INSERT INTO newparent VALUES (1), (2);
         CREATE TABLE newchild (id int PRIMARY KEY, p int REFERENCES newparent);
         INSERT INTO newchild VALUES (1, 1), (2, 2);",
    )
    .await;
    let out = pgtide_fails(&follow_request(&src, &dst, d, "--add-table", "newchild"));
    assert!(
        out.contains("gave up") && out.contains("newparent"),
        "{out}"
    );
    assert_eq!(
        state_query_i64(&dir, "SELECT count(*) FROM table_sync"),
        0,
        "{out}"
    );
    // Both in one command, the referenced table first: both join.
    let out = pgtide_ok(
        &follow_request(&src, &dst, d, "--add-table", "newparent")
            .args(&["--add-table", "newchild"]),
    );
    assert!(
        out.contains("public.newparent: joined") && out.contains("public.newchild: joined"),
        "{out}"
    );
    exec(
        &src,
        "INSERT INTO newparent VALUES (3); INSERT INTO newchild VALUES (3, 3)",
    )
    .await;

    let out = pgtide_ok(&follow_request(&src, &dst, d, "--remove-table", "z"));
    assert!(
        out.contains("public.z: removed from the migration"),
        "{out}"
    );
    assert!(out.contains("kept"), "{out}");
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'pgtide_t_ts_remove_slot' AND tablename = 'z'"
        )
        .await,
        0
    );
    // Run again: nothing left to do, same answer.
    pgtide_ok(&follow_request(&src, &dst, d, "--remove-table", "z"));
    let out = pgtide_fails(&follow_request(&src, &dst, d, "--resync", "z"));
    assert!(out.contains("not followed"), "{out}");
    exec(
        &src,
        "INSERT INTO z (v) SELECT g FROM generate_series(1, 10) g; UPDATE z SET v = -v;
         INSERT INTO a VALUES (101, 101); UPDATE a SET v = 0 WHERE id = 1;",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the follow stopped:\n{}",
        child.output_so_far()
    );
    cutover_and_wait(&src, &dst, d, child);
    // z's target table is kept as it was when it left.
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM z").await, 100);
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM z WHERE v < 0").await,
        0
    );
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM a").await, 101);
    let out = pgtide_ok(&Args::verify(&src, &dst).args(&["--dir", d]));
    assert!(out.contains("source and target are identical"), "{out}");
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}

/// d. `follow --add-table` SIGKILLed after its copy committed on the target, before it
/// recorded the end: apply waits for the table meanwhile (the application keeps writing), and
/// the same command run again copies it under a later snapshot; everything ends identical.
#[tokio::test(flavor = "multi_thread")]
async fn an_add_killed_midway_and_run_again_ends_identical() {
    let (src, dst) = fresh_db_pair("t_ts_kill").await;
    exec(
        &src,
        "CREATE TABLE tick (id int PRIMARY KEY);
         CREATE TABLE a (id bigserial PRIMARY KEY, v int NOT NULL);
         CREATE SCHEMA side;
         CREATE TABLE side.x (id bigserial PRIMARY KEY, v int NOT NULL);
         INSERT INTO a (v) SELECT g FROM generate_series(1, 100) g;
         INSERT INTO side.x (v) SELECT g FROM generate_series(1, 1000) g;",
    )
    .await;
    let filters = filters_file("ts-kill", "[exclude-schema]\nside\n");
    let dir = workdir("ts-kill");
    let d = dir.to_str().unwrap();
    let mut args = clone_follow_args(&src, &dst, d, "t_ts_kill_slot");
    args.extend(["--filters", filters.to_str().unwrap()]);
    let mut child = spawn_pgtide(&args, &[]);
    wait_for_slot(&dir);
    wait_applied(&src, &dst, "t_ts_kill_slot", &mut child).await;
    let traffic = Traffic::start(
        &src,
        &[
            "INSERT INTO a (v) VALUES ({i}); UPDATE side.x SET v = v + 1 WHERE id = {i} % 1000 + 1",
            "INSERT INTO side.x (v) VALUES ({i}); DELETE FROM side.x WHERE id = 1000 - {i} % 500",
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failpoint = format!("{TABLE_SYNC_AFTER_COPY}=sleep(60000)");
    let mut add = spawn_pgtide(
        &follow_request(&src, &dst, d, "--add-table", "side.x"),
        &[("FAILPOINTS", failpoint.as_str())],
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    while !add.output_so_far().contains("copied") {
        assert!(
            Instant::now() < deadline && add.try_wait().unwrap().is_none(),
            "the add never copied:\n{}",
            add.output_so_far()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    add.kill().unwrap();
    add.wait().unwrap();
    assert_eq!(
        state_query_i64(
            &dir,
            "SELECT count(*) FROM table_sync WHERE stage = 'copying'"
        ),
        1
    );
    // Apply waits for side.x; the application goes on writing meanwhile.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the follow stopped:\n{}",
        child.output_so_far()
    );
    let out = pgtide_ok(&follow_request(&src, &dst, d, "--add-table", "side.x"));
    assert!(out.contains("side.x: joined the migration"), "{out}");
    assert!(out.contains("already on the target"), "{out}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    traffic.stop().await;
    let log = cutover_and_wait(&src, &dst, d, child);
    // Changes of side.x committed after the first snapshot came while its end was unknown:
    // apply rolled its batch back and waited instead of applying or skipping them.
    assert!(
        log.contains("apply: waiting for the copy of \"side\".\"x\""),
        "{log}"
    );
    assert_identical(&src, &dst);
    pgtide_ok(&Args::cleanup(&src, &dst, d));
    let _ = std::fs::remove_file(filters);
}
