//! The cutover fence's holes (issue 16, item 3), on servers of the test's own (the shared
//! clusters run with max_prepared_transactions = 0): a prepared transaction belongs to no
//! session, survives the fence and could commit after endpos, so cutover stops naming it, with
//! the fix, and lifts the fence; once it is finished, cutover migrates its change too.

mod common;

use common::*;

const SOURCE_CONF: &str = "wal_level = logical\nmax_replication_slots = 8\nmax_wal_senders = 8\nmax_prepared_transactions = 4\n";

/// The URI of database `db` on a private server.
fn db_of(server: &PrivateServer, db: &str) -> String {
    let base = server.uri.rsplit_once('/').unwrap().0;
    format!("{base}/{db}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prepared_transaction_stops_cutover_until_it_is_finished() {
    let source = PrivateServer::start_with("fence-source", SOURCE_CONF);
    let target = PrivateServer::start_with("fence-target", "");
    for server in [&source, &target] {
        exec(&server.uri, "CREATE DATABASE app").await;
        exec(
            &server.uri,
            "CREATE ROLE app_writer LOGIN PASSWORD 'writer-secret'",
        )
        .await;
    }
    let (src, dst) = (db_of(&source, "app"), db_of(&target, "app"));
    exec(
        &src,
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 500) g;
         GRANT ALL ON t TO app_writer;",
    )
    .await;
    let dir = workdir("cutover-fence");
    let d = dir.to_str().unwrap();
    let mut child = spawn_pgtide(&clone_follow_args(&src, &dst, d, "fence_slot"), &[]);
    wait_for_status(
        &["--dir", d, "--source", &src, "--target", &dst],
        120,
        &mut child,
        |json| says_ready(json, "/verdict"),
    )
    .await;

    exec(
        &src,
        "BEGIN; INSERT INTO t VALUES (1000, 'prepared'); PREPARE TRANSACTION 'pgtide_test_gid'",
    )
    .await;
    let cutover = [
        "cutover", "--source", &src, "--target", &dst, "--dir", d, "--fence",
    ];
    let out = pgtide_fails(&cutover);
    assert!(
        out.contains("'pgtide_test_gid' (prepared")
            && out.contains("COMMIT PREPARED 'gid' or ROLLBACK PREPARED 'gid'")
            && out.contains("The fence is lifted"),
        "{out}"
    );
    // Lifted: the application role can write on the source again.
    let writer = connect(&format!(
        "postgres://app_writer:writer-secret@{}",
        src.split_once('@').unwrap().1
    ))
    .await;
    writer
        .batch_execute("INSERT INTO t VALUES (1001, 'after the refusal')")
        .await
        .unwrap();
    drop(writer);

    exec(&src, "COMMIT PREPARED 'pgtide_test_gid'").await;
    let out = pgtide_ok(&cutover);
    assert!(out.contains("cutover complete"), "{out}");
    let out = wait_exit(child, 120);
    assert!(out.status.success(), "{}", text(&out));
    assert_identical(&src, &dst);
    assert_eq!(
        scalar_string(
            &dst,
            "SELECT string_agg(v, ', ' ORDER BY id) FROM t WHERE id >= 1000"
        )
        .await,
        "prepared, after the refusal"
    );
    pgtide_ok(&[
        "cutover",
        "--unfence",
        "--source",
        &src,
        "--target",
        &dst,
        "--dir",
        d,
    ]);
    pgtide_ok(&["cleanup", "--source", &src, "--target", &dst, "--dir", d]);
}
