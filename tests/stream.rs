//! The change stream against the real source: slot and snapshot, a workload of every change
//! kind through both plugins, feedback, and faults (walsender terminated, SIGKILL, slot busy).

mod common;

use std::collections::HashSet;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use pgtide::failpoints::SPOOL_BEFORE_COMMIT;
use serde_json::Value;

fn interrupt(child: &Child) {
    let ok = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

async fn wait_for(what: &str, secs: u64, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn of_kind<'a>(changes: &'a [Value], kind: &str) -> Vec<&'a Value> {
    changes.iter().filter(|c| c["kind"] == kind).collect()
}

fn on_table<'a>(changes: &'a [Value], kind: &str, table: &str) -> Vec<&'a Value> {
    changes
        .iter()
        .filter(|c| c["kind"] == kind && c["table"] == table)
        .collect()
}

/// Every change kind arrives in the spool, complete, once, in commit order, with exact
/// values; memory stays bounded through a large transaction.
async fn workload_through(plugin: &str, db: &str, bulk_rows: i64) {
    let (src, _dst) = fresh_db_pair(db).await;
    exec(
        &src,
        "CREATE TABLE w (id int PRIMARY KEY, v text, big text, n numeric);
         CREATE TABLE full_t (a int, b text); ALTER TABLE full_t REPLICA IDENTITY FULL;
         CREATE TABLE parted (id int, k int, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
         CREATE TABLE parted_low PARTITION OF parted FOR VALUES FROM (0) TO (100);
         CREATE TABLE parted_high PARTITION OF parted FOR VALUES FROM (100) TO (200);
         CREATE TABLE bulk (id int PRIMARY KEY, pad text);",
    )
    .await;
    let dir = workdir(db);
    let d = dir.to_str().unwrap();
    let slot = format!("{db}_slot");
    pgtide_ok(&[
        "stream",
        "setup",
        "--source",
        &src,
        "--dir",
        d,
        "--plugin",
        plugin,
        "--slot-name",
        &slot,
    ]);

    let client = connect(&src).await;
    let big: String = client
        .query_one(
            "SELECT string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 1000) g",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    client
        .execute("INSERT INTO w VALUES (1, 'one', $1, 123456789012345678901234567890.000000000000000000001), (2, 'two', NULL, 'NaN')", &[&big])
        .await
        .unwrap();
    for sql in [
        "UPDATE w SET v = 'uno' WHERE id = 1",
        "UPDATE w SET id = 20 WHERE id = 2",
        "DELETE FROM w WHERE id = 20",
        "INSERT INTO full_t VALUES (1, 'a')",
        "UPDATE full_t SET b = 'b' WHERE a = 1",
        "DELETE FROM full_t",
        "INSERT INTO parted VALUES (1, 50), (2, 150)",
        "BEGIN; INSERT INTO w VALUES (99, 'rolled back'); ROLLBACK",
        "SELECT pg_logical_emit_message(true, 'pgtide-test', 'hello')",
        "TRUNCATE w",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    client
        .execute(
            "INSERT INTO bulk SELECT g, 'p' FROM generate_series(1, $1::bigint) g",
            &[&bulk_rows],
        )
        .await
        .unwrap();
    let endpos = current_lsn(&src).await;

    // Receive, watching the receiver's memory.
    let mut child = spawn_pgtide(
        &[
            "stream", "receive", "--source", &src, "--dir", d, "--endpos", &endpos,
        ],
        &[],
    );
    let mut max_rss_kb = 0u64;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let status_file =
            std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
        if let Some(kb) = status_file
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
        {
            max_rss_kb = max_rss_kb.max(kb.parse().unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = child.wait_with_output().unwrap();
    assert!(status.success(), "receive failed: {}", text(&output));
    assert!(
        text(&output).contains("reached endpos"),
        "{}",
        text(&output)
    );
    assert!(
        max_rss_kb < 200 * 1024,
        "receiver RSS peaked at {max_rss_kb} kB for a {bulk_rows}-row transaction"
    );

    let changes = spool_show(&dir);
    // 11 committed transactions (the rolled-back one is absent), commits in increasing order.
    let commits = of_kind(&changes, "commit");
    assert_eq!(commits.len(), 11, "commits: {commits:?}");
    let commit_lsns: Vec<u64> = commits
        .iter()
        .map(|c| {
            let (hi, lo) = c["end_lsn"].as_str().unwrap().split_once('/').unwrap();
            (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
        })
        .collect();
    assert!(
        commit_lsns.windows(2).all(|w| w[0] < w[1]),
        "commits out of order: {commit_lsns:?}"
    );
    assert_eq!(of_kind(&changes, "begin").len(), 11);
    assert!(!changes.iter().any(|c| c["new"]["v"] == "rolled back"));

    let inserts = on_table(&changes, "insert", "w");
    assert_eq!(inserts.len(), 2);
    assert_eq!(inserts[0]["new"]["v"], "one");
    assert_eq!(inserts[0]["new"]["big"], big.as_str());
    assert_eq!(
        inserts[0]["new"]["n"],
        "123456789012345678901234567890.000000000000000000001"
    );
    if plugin == "pgoutput" {
        assert_eq!(inserts[1]["new"]["n"], "NaN");
    } else {
        // wal2json prints numeric NaN as JSON null: a limitation of the plugin, documented
        // in the README (use pgoutput for such tables).
        assert_eq!(inserts[1]["new"]["n"], Value::Null);
    }
    assert_eq!(inserts[1]["new"]["big"], Value::Null);
    let updates = on_table(&changes, "update", "w");
    assert_eq!(updates.len(), 2);
    // The TOASTed column the update did not touch is marked unchanged, never NULL.
    assert_eq!(updates[0]["new"]["v"], "uno");
    assert_eq!(
        updates[0]["new"]["big"],
        serde_json::json!({"unchanged_toast": true})
    );
    // A key change carries the old key.
    assert_eq!(updates[1]["old"]["id"], "2");
    assert_eq!(updates[1]["new"]["id"], "20");
    let deletes = on_table(&changes, "delete", "w");
    assert_eq!(deletes.len(), 1);
    assert_eq!(deletes[0]["old"]["id"], "20");
    // REPLICA IDENTITY FULL: the whole old row.
    let full_updates = on_table(&changes, "update", "full_t");
    assert_eq!(full_updates.len(), 1);
    assert_eq!(full_updates[0]["old"]["b"], "a");
    assert_eq!(full_updates[0]["new"]["b"], "b");
    assert_eq!(on_table(&changes, "delete", "full_t")[0]["old"]["b"], "b");
    // Partitioned table: changes arrive for the leaf partitions.
    assert_eq!(on_table(&changes, "insert", "parted_low").len(), 1);
    assert_eq!(on_table(&changes, "insert", "parted_high").len(), 1);
    let messages = of_kind(&changes, "message");
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["prefix"], "pgtide-test");
    assert_eq!(messages[0]["content"], "hello");
    let truncates = of_kind(&changes, "truncate");
    assert_eq!(truncates.len(), 1);
    assert!(truncates[0].to_string().contains("w"), "{}", truncates[0]);
    // The large transaction: every row once.
    let bulk = on_table(&changes, "insert", "bulk");
    assert_eq!(bulk.len() as i64, bulk_rows);
    let ids: HashSet<&str> = bulk
        .iter()
        .map(|c| c["new"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len() as i64, bulk_rows);
    // Every change carries its xid, and row changes their table.
    assert!(
        changes
            .iter()
            .filter(|c| c["kind"] != "relation")
            .all(|c| c["xid"].is_u64())
    );

    // Feedback: the slot's confirmed position reached the last spooled commit.
    let confirmed = scalar_string(
        &src,
        &format!("SELECT (confirmed_flush_lsn >= '{}'::pg_lsn)::text FROM pg_replication_slots WHERE slot_name = '{slot}'", commits.last().unwrap()["end_lsn"].as_str().unwrap()),
    )
    .await;
    assert_eq!(confirmed, "true");
    // The spool size is recorded for status.
    let conn = rusqlite::Connection::open(dir.join("state.db")).unwrap();
    let bytes: String = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'spool.bytes'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(bytes.parse::<u64>().unwrap() > 0);

    let out = pgtide_ok(&["stream", "cleanup", "--source", &src, "--dir", d]);
    assert!(out.contains("dropped slot"), "{out}");
    // Cleanup is idempotent.
    pgtide_ok(&[
        "stream",
        "cleanup",
        "--source",
        &src,
        "--dir",
        d,
        "--slot-name",
        &slot,
    ]);
    assert_eq!(
        scalar_i64(
            &src,
            &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'")
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pgoutput_workload_arrives_complete_and_in_order() {
    workload_through("pgoutput", "t_stream_pgoutput", 1_000_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wal2json_workload_arrives_complete_and_in_order() {
    workload_through("wal2json", "t_stream_wal2json", 100_000).await;
}

/// Rows written after the slot's snapshot are absent from a read under it and present in the
/// stream; rows written before are the other way round.
#[tokio::test(flavor = "multi_thread")]
async fn slot_snapshot_splits_copy_and_stream() {
    let (src, _dst) = fresh_db_pair("t_stream_snap").await;
    exec(
        &src,
        "CREATE TABLE s (id int PRIMARY KEY, tag text); INSERT INTO s VALUES (1, 'before');",
    )
    .await;
    let slot = "t_stream_snap_slot";
    // stdout read line by line as the holder prints it: its own pipe, not spawn_pgtide's drain.
    let mut holder = pgtide_command(&["snapshot", "--source", &src, "--slot-name", slot])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start pgtide");
    let mut stdout = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut snapshot = String::new();
    for _ in 0..10 {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        if let Some(name) = line.strip_prefix("snapshot:") {
            snapshot = name.trim().to_string();
        }
        if line.starts_with("consistent LSN:") {
            break;
        }
    }
    assert!(
        !snapshot.is_empty(),
        "pgtide snapshot printed no snapshot name"
    );
    exec(&src, "INSERT INTO s VALUES (2, 'after')").await;
    let reader = connect(&src).await;
    reader
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{snapshot}'"
        ))
        .await
        .unwrap();
    let tags: Vec<String> = reader
        .query("SELECT tag FROM s ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tags, vec!["before"]);
    reader.batch_execute("COMMIT").await.unwrap();
    interrupt(&holder);
    assert!(holder.wait().unwrap().success());

    let dir = workdir("stream-snap");
    let d = dir.to_str().unwrap();
    let endpos = current_lsn(&src).await;
    pgtide_ok(&[
        "stream",
        "receive",
        "--source",
        &src,
        "--dir",
        d,
        "--slot-name",
        slot,
        "--endpos",
        &endpos,
    ]);
    let tags: Vec<String> = on_table(&spool_show(&dir), "insert", "s")
        .iter()
        .map(|c| c["new"]["tag"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(tags, vec!["after"]);
    pgtide_ok(&["stream", "cleanup", "--source", &src, "--dir", d]);
}

/// pg_stat_replication shows pgtide with the positions it reported while it streams.
#[tokio::test(flavor = "multi_thread")]
async fn feedback_is_visible_in_pg_stat_replication() {
    let (src, _dst) = fresh_db_pair("t_stream_feedback").await;
    exec(&src, "CREATE TABLE f (id int PRIMARY KEY);").await;
    let dir = workdir("stream-feedback");
    let d = dir.to_str().unwrap();
    let slot = "t_stream_feedback_slot";
    pgtide_ok(&[
        "stream",
        "setup",
        "--source",
        &src,
        "--dir",
        d,
        "--slot-name",
        slot,
    ]);
    let child = spawn_pgtide(&["stream", "receive", "--source", &src, "--dir", d], &[]);
    // A position inside the transaction, before its commit: once the commit is flushed, the
    // reported positions are past it.
    let writer = connect(&src).await;
    writer
        .batch_execute("BEGIN; INSERT INTO f SELECT generate_series(1, 100)")
        .await
        .unwrap();
    let after_insert: String = writer
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    writer.batch_execute("COMMIT").await.unwrap();
    let query = format!(
        "SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid
         WHERE r.application_name = 'pgtide' AND s.slot_name = '{slot}'
           AND r.write_lsn >= '{after_insert}' AND r.flush_lsn >= '{after_insert}'"
    );
    wait_for(
        "pg_stat_replication to show pgtide's flush position",
        30,
        async || scalar_i64(&src, &query).await == 1,
    )
    .await;
    let confirmed = format!(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND confirmed_flush_lsn >= '{after_insert}'"
    );
    wait_for(
        "the slot's confirmed_flush_lsn to advance",
        30,
        async || scalar_i64(&src, &confirmed).await == 1,
    )
    .await;
    interrupt(&child);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("interrupted"), "{}", text(&out));
    pgtide_ok(&["stream", "cleanup", "--source", &src, "--dir", d]);
}

/// The walsender terminated mid-stream, then pgtide SIGKILLed and restarted: every
/// transaction ends up in the spool exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn reconnects_and_restarts_without_loss_or_duplicates() {
    let (src, _dst) = fresh_db_pair("t_stream_faults").await;
    exec(&src, "CREATE TABLE e (id int PRIMARY KEY, batch int);").await;
    let dir = workdir("stream-faults");
    let d = dir.to_str().unwrap();
    let slot = "t_stream_faults_slot";
    pgtide_ok(&[
        "stream",
        "setup",
        "--source",
        &src,
        "--dir",
        d,
        "--slot-name",
        slot,
    ]);
    let mut child = spawn_pgtide(&["stream", "receive", "--source", &src, "--dir", d], &[]);
    let active =
        format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active");
    wait_for("the slot to be active", 30, async || {
        scalar_i64(&src, &active).await == 1
    })
    .await;
    let writer = connect(&src).await;
    for batch in 0..90 {
        writer
            .execute(
                "INSERT INTO e SELECT g, $1 FROM generate_series($1 * 200 + 1, $1 * 200 + 200) g",
                &[&batch],
            )
            .await
            .unwrap();
        if batch == 30 {
            // Look the pid up first: a terminate call inside the join could be pushed down
            // onto every backend, this test's own session included.
            let pid = scalar_i64(
                &src,
                &format!(
                    "SELECT active_pid::bigint FROM pg_replication_slots WHERE slot_name = '{slot}'"
                ),
            )
            .await;
            let terminated =
                scalar_string(&src, &format!("SELECT pg_terminate_backend({pid})::text")).await;
            assert_eq!(terminated, "true", "no walsender of pgtide to terminate");
            // pgtide reconnects by itself: the slot becomes active under a new walsender.
            let reconnected = format!(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active AND active_pid <> {pid}"
            );
            wait_for("pgtide to reconnect", 30, async || {
                scalar_i64(&src, &reconnected).await == 1
            })
            .await;
        }
        if batch == 60 {
            child.kill().unwrap(); // SIGKILL
            let out = child.wait_with_output().unwrap();
            assert!(
                text(&out).contains("reconnecting"),
                "no reconnect after the walsender was terminated:\n{}",
                text(&out)
            );
            child = spawn_pgtide(&["stream", "receive", "--source", &src, "--dir", d], &[]);
        }
    }
    interrupt(&child);
    child.wait().unwrap();
    let endpos = current_lsn(&src).await;
    pgtide_ok(&[
        "stream", "receive", "--source", &src, "--dir", d, "--endpos", &endpos,
    ]);
    let changes = spool_show(&dir);
    let inserts = on_table(&changes, "insert", "e");
    let ids: HashSet<&str> = inserts
        .iter()
        .map(|c| c["new"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(inserts.len(), 90 * 200, "every row exactly once");
    assert_eq!(ids.len(), 90 * 200);
    assert_eq!(of_kind(&changes, "commit").len(), 90);
    pgtide_ok(&["stream", "cleanup", "--source", &src, "--dir", d]);
}

/// A second consumer of a busy slot gets a clear error naming the other process.
#[tokio::test(flavor = "multi_thread")]
async fn busy_slot_is_a_clear_error() {
    let (src, target) = fresh_db_pair("t_stream_busy").await;
    exec(&src, "CREATE TABLE b (id int PRIMARY KEY);").await;
    let dir = workdir("stream-busy");
    let d = dir.to_str().unwrap();
    let slot = "t_stream_busy_slot";
    pgtide_ok(&[
        "stream",
        "setup",
        "--source",
        &src,
        "--dir",
        d,
        "--slot-name",
        slot,
    ]);
    let child = spawn_pgtide(&["stream", "receive", "--source", &src, "--dir", d], &[]);
    let active =
        format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active");
    wait_for("the slot to be active", 30, async || {
        scalar_i64(&src, &active).await == 1
    })
    .await;
    let other = workdir("stream-busy-2");
    let out = pgtide_fails(&[
        "stream",
        "receive",
        "--source",
        &src,
        "--dir",
        other.to_str().unwrap(),
        "--slot-name",
        slot,
    ]);
    assert!(
        out.contains("is in use by another process") && out.contains("PID"),
        "{out}"
    );
    assert!(!out.contains(&password()), "{out}");
    interrupt(&child);
    child.wait_with_output().unwrap();
    pgtide_ok(&["stream", "cleanup", "--source", &src, "--dir", d]);

    // A source without wal_level=logical (our target cluster) is refused with the fix.
    let out = pgtide_fails(&[
        "stream",
        "setup",
        "--source",
        &target,
        "--dir",
        workdir("stream-nolog").to_str().unwrap(),
        "--slot-name",
        "t_nolog",
    ]);
    assert!(
        out.contains("wal_level is replica") && out.contains("wal_level = logical"),
        "{out}"
    );
}

/// The replication client logs in with MD5 and cleartext passwords (SCRAM is what every other
/// test uses) and speaks TLS with certificate and host-name checks.
#[tokio::test(flavor = "multi_thread")]
async fn replication_login_methods_and_tls() {
    let (src, _dst) = fresh_db_pair("t_stream_auth").await;
    exec(&src, "CREATE TABLE a (id int PRIMARY KEY);").await;
    let admin = connect(&admin_uri("source")).await;
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS pgtide_md5; DROP ROLE IF EXISTS pgtide_plain;
             SET password_encryption = 'md5'; CREATE ROLE pgtide_md5 LOGIN REPLICATION PASSWORD 'md5-secret-1';
             RESET password_encryption; CREATE ROLE pgtide_plain LOGIN REPLICATION PASSWORD 'plain-secret-2';",
        )
        .await
        .unwrap();
    let slot = "t_stream_auth_slot";
    let setup_dir = workdir("stream-auth");
    pgtide_ok(&[
        "stream",
        "setup",
        "--source",
        &src,
        "--dir",
        setup_dir.to_str().unwrap(),
        "--slot-name",
        slot,
    ]);
    let port =
        std::env::var("PGTIDE_SOURCE_PORT").expect("PGTIDE_SOURCE_PORT: run scripts/test.sh");
    for (user, password) in [
        ("pgtide_md5", "md5-secret-1"),
        ("pgtide_plain", "plain-secret-2"),
    ] {
        exec(
            &src,
            &format!("INSERT INTO a SELECT coalesce(max(id), 0) + 1 FROM a; -- {user}"),
        )
        .await;
        let uri = format!("postgres://{user}:{password}@127.0.0.1:{port}/t_stream_auth");
        let dir = workdir(&format!("stream-auth-{user}"));
        let endpos = current_lsn(&src).await;
        pgtide_ok(&[
            "stream",
            "receive",
            "--source",
            &uri,
            "--dir",
            dir.to_str().unwrap(),
            "--slot-name",
            slot,
            "--endpos",
            &endpos,
        ]);
        let wrong = format!("postgres://{user}:not-it@127.0.0.1:{port}/t_stream_auth");
        let out = pgtide_fails(&[
            "stream",
            "receive",
            "--source",
            &wrong,
            "--dir",
            dir.to_str().unwrap(),
            "--endpos",
            &endpos,
        ]);
        assert!(
            out.contains("cannot log in to the source server") && !out.contains(password),
            "{out}"
        );
    }
    // TLS with verify-full on the replication connection, then a host name the certificate
    // does not name.
    let ca = std::env::var("PGTIDE_TEST_CA").expect("PGTIDE_TEST_CA: run scripts/test.sh");
    exec(&src, "INSERT INTO a VALUES (1000)").await;
    let endpos = current_lsn(&src).await;
    let tls_dir = workdir("stream-auth-tls");
    let full = format!(
        "postgres://postgres:{}@localhost:{port}/t_stream_auth?sslmode=verify-full&sslrootcert={ca}",
        password()
    );
    pgtide_ok(&[
        "stream",
        "receive",
        "--source",
        &full,
        "--dir",
        tls_dir.to_str().unwrap(),
        "--slot-name",
        slot,
        "--endpos",
        &endpos,
    ]);
    assert!(
        spool_show(&tls_dir)
            .iter()
            .any(|c| c["new"]["id"] == "1000")
    );
    let wrong_host = full.replace("@localhost:", "@127.0.0.1:");
    let out = pgtide_fails(&[
        "stream",
        "receive",
        "--source",
        &wrong_host,
        "--dir",
        tls_dir.to_str().unwrap(),
        "--endpos",
        &endpos,
    ]);
    assert!(
        out.contains("TLS failed on the replication connection"),
        "{out}"
    );
    pgtide_ok(&[
        "stream",
        "cleanup",
        "--source",
        &src,
        "--dir",
        setup_dir.to_str().unwrap(),
    ]);
}

/// Invariant 1: a spool write that fails leaves the slot's confirmed position at or before the
/// last durable commit, and a rerun receives the rest exactly once. Also: the publication
/// follows --filters, and a work dir refuses another source server.
#[tokio::test(flavor = "multi_thread")]
async fn flushed_never_passes_durable_and_filters_apply() {
    let (src, dst) = fresh_db_pair("t_stream_durable").await;
    exec(
        &src,
        "CREATE TABLE keep (id int PRIMARY KEY); CREATE TABLE skip (id int PRIMARY KEY);",
    )
    .await;
    let dir = workdir("stream-durable");
    std::fs::create_dir_all(&dir).unwrap();
    let filters = dir.join("filters.ini");
    std::fs::write(&filters, "[exclude-table]\npublic.skip\n").unwrap();
    let d = dir.join("w");
    let d = d.to_str().unwrap();
    let slot = "t_stream_durable_slot";
    pgtide_ok(&[
        "stream",
        "setup",
        "--source",
        &src,
        "--dir",
        d,
        "--slot-name",
        slot,
        "--filters",
        filters.to_str().unwrap(),
    ]);
    let writer = connect(&src).await;
    let lsn_of = |row: tokio_postgres::Row| -> u64 {
        let text: String = row.get(0);
        let (hi, lo) = text.split_once('/').unwrap();
        (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
    };
    // Each committed `keep` row with a WAL position at or after its commit.
    let mut committed_by = Vec::new();
    for i in 0..60 {
        writer
            .execute("INSERT INTO keep VALUES ($1)", &[&i])
            .await
            .unwrap();
        let after = writer
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap();
        committed_by.push((i, lsn_of(after)));
        writer
            .execute("INSERT INTO skip VALUES ($1)", &[&i])
            .await
            .unwrap();
    }
    // The first spool batch takes 1.5 s to become durable while status updates go out every
    // second; the second batch fails. The receiver must stop, and must not have reported
    // anything beyond the first batch as flushed.
    let mut child = pgtide_command(&["stream", "receive", "--source", &src, "--dir", d])
        .env(
            "FAILPOINTS",
            format!("{SPOOL_BEFORE_COMMIT}=1*sleep(1500)->panic").as_str(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // More changes while the first batch is held up: they make the second batch (which fails)
    // whatever the scheduling.
    for i in 60..70 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer
            .execute("INSERT INTO keep VALUES ($1)", &[&i])
            .await
            .unwrap();
        let after = writer
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap();
        committed_by.push((i, lsn_of(after)));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the receiver did not stop after its spool writer failed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !status.success(),
        "the failpoint should have stopped the receiver"
    );
    // What the spool holds durably: rows of transactions whose commit is spooled.
    let mut durable_rows = HashSet::new();
    let mut open = Vec::new();
    for c in spool_show(&dir.join("w")) {
        match c["kind"].as_str().unwrap() {
            "insert" if c["table"] == "keep" => {
                open.push(c["new"]["id"].as_str().unwrap().parse::<i32>().unwrap())
            }
            "commit" => durable_rows.extend(open.drain(..)),
            _ => {}
        }
    }
    let confirmed = writer
        .query_one(&format!("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{slot}'"), &[])
        .await
        .unwrap();
    let confirmed = lsn_of(confirmed);
    // Every row committed at or before the position the source was told is flushed must be
    // durable in the spool (the filtered table's empty transactions legitimately move the
    // position past the last spooled commit).
    for (id, committed_before) in &committed_by {
        if *committed_before <= confirmed {
            assert!(
                durable_rows.contains(id),
                "row {id} was acknowledged to the source but is not durable in the spool"
            );
        }
    }

    let endpos = current_lsn(&src).await;
    pgtide_ok(&[
        "stream", "receive", "--source", &src, "--dir", d, "--endpos", &endpos,
    ]);
    let changes = spool_show(&dir.join("w"));
    let keep: HashSet<&str> = on_table(&changes, "insert", "keep")
        .iter()
        .map(|c| c["new"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        on_table(&changes, "insert", "keep").len(),
        70,
        "every insert exactly once"
    );
    assert_eq!(keep.len(), 70);
    assert!(
        on_table(&changes, "insert", "skip").is_empty(),
        "the filtered table is not published"
    );

    // The target cluster is another server: the work dir refuses it.
    let out = pgtide_fails(&["stream", "receive", "--source", &dst, "--dir", d]);
    assert!(
        out.contains("is not the server this work dir streams from"),
        "{out}"
    );
    pgtide_ok(&["stream", "cleanup", "--source", &src, "--dir", d]);
}

/// A table without a primary key or replica identity is refused before anything is created:
/// published as it is, its updates would fail on the source.
#[tokio::test(flavor = "multi_thread")]
async fn tables_without_replica_identity_are_refused() {
    let (src, _dst) = fresh_db_pair("t_stream_noident").await;
    exec(
        &src,
        "CREATE TABLE ok (id int PRIMARY KEY); CREATE TABLE bare (a int, b text);",
    )
    .await;
    let dir = workdir("stream-noident");
    let out = pgtide_fails(&[
        "stream",
        "setup",
        "--source",
        &src,
        "--dir",
        dir.to_str().unwrap(),
        "--slot-name",
        "t_noident",
    ]);
    assert!(
        out.contains("public.bare")
            && out.contains("ALTER TABLE public.bare REPLICA IDENTITY FULL")
            && !out.contains("public.ok"),
        "{out}"
    );
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 't_noident'"
        )
        .await,
        0
    );
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_publication WHERE pubname = 'pgtide_t_noident'"
        )
        .await,
        0
    );
    // The fix it names works.
    exec(&src, "ALTER TABLE public.bare REPLICA IDENTITY FULL").await;
    pgtide_ok(&[
        "stream",
        "setup",
        "--source",
        &src,
        "--dir",
        dir.to_str().unwrap(),
        "--slot-name",
        "t_noident",
    ]);
    pgtide_ok(&[
        "stream",
        "cleanup",
        "--source",
        &src,
        "--dir",
        dir.to_str().unwrap(),
    ]);
}
