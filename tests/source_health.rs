//! Issue 13, item 3: the source is never harmed by an idle or stopped follower. An idle
//! database's slot keeps moving while another database writes (keepalive positions reported
//! as flushed when nothing received is pending: invariant 12); the snapshot and copy sessions
//! survive a role's idle_in_transaction_session_timeout and statement_timeout; and a slot
//! lost to max_slot_wal_keep_size is a clear stop, said by follow, status and check.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgtide::failpoints::COPY_AFTER_COMMIT;

const MB: i64 = 1024 * 1024;

/// WAL the slot keeps on the source: pg_current_wal_lsn() - restart_lsn.
async fn retained(admin: &str, slot: &str) -> i64 {
    scalar_i64(
        admin,
        &format!(
            "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), -1)::bigint
             FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ),
    )
    .await
}

/// Writes about `kb_per_tick` kB of random (incompressible) rows into `table` of `uri` every
/// 50 ms for `secs` seconds, with a CHECKPOINT (and so a running-xacts record) every 5 s on
/// `admin`; returns the largest retained WAL of `slot` seen meanwhile.
async fn write_for(uri: &str, admin: &str, slot: &str, secs: u64, kb_per_tick: u32) -> i64 {
    let client = connect(uri).await;
    let admin_client = connect(admin).await;
    let start = Instant::now();
    let mut last_checkpoint = Instant::now();
    let mut largest = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        client
            .batch_execute(&format!(
                "INSERT INTO log (payload)
                 SELECT (SELECT string_agg(md5(random()::text || g::text || i::text), '')
                         FROM generate_series(1, 32) i)
                 FROM generate_series(1, {kb_per_tick}) g"
            ))
            .await
            .unwrap();
        if last_checkpoint.elapsed() >= Duration::from_secs(5) {
            admin_client.batch_execute("CHECKPOINT").await.unwrap();
            last_checkpoint = Instant::now();
            largest = largest.max(retained(admin, slot).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    largest
}

/// Issue 13's "done when": one idle database is migrated with clone --follow while another
/// database of the same source server writes for a minute; the slot's restart_lsn keeps up
/// (retained WAL stays under a few MB). Before keepalive positions were reported as flushed,
/// the slot kept every byte written since its creation. A server of the test's own: a long
/// transaction of another test on the shared cluster would hold restart_lsn back.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_database_slot_keeps_up_while_another_database_writes() {
    let server = PrivateServer::start_with("idle-slot", "wal_level = logical\n");
    let src = fresh_db(&server.uri, "t_sh_idle").await;
    let busy = fresh_db(&server.uri, "t_sh_busy").await;
    let dst = fresh_db(&admin_uri("target"), "t_sh_idle").await;
    exec(
        &src,
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 1000) g;",
    )
    .await;
    exec(
        &busy,
        "CREATE TABLE log (id bigserial PRIMARY KEY, payload text)",
    )
    .await;
    let dir = workdir("idle-slot");
    let d = dir.to_str().unwrap();
    let slot = "t_sh_idle_slot";
    let child = spawn_pgtide(&clone_follow_args(&src, &dst, d, slot), &[]);
    wait_for_slot(&dir);
    let wal_before = current_lsn(&server.uri).await;
    let largest = write_for(&busy, &server.uri, slot, 60, 25).await;
    let written = scalar_i64(
        &server.uri,
        &format!("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{wal_before}')::bigint"),
    )
    .await;
    // A last running-xacts record, then a few status intervals for the slot to pass it.
    exec(&server.uri, "CHECKPOINT").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = retained(&server.uri, slot).await;
    while last >= 16 * MB && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        last = retained(&server.uri, slot).await;
    }
    println!(
        "WAL written by the other database: {:.1} MB; slot retained at most {:.1} MB during the run, {:.1} MB at the end",
        written as f64 / MB as f64,
        largest as f64 / MB as f64,
        last as f64 / MB as f64
    );
    assert!(
        written > 16 * MB,
        "the other database wrote only {written} bytes: the test proves nothing"
    );
    assert!(
        (0..16 * MB).contains(&last),
        "the idle slot retains {last} bytes of WAL after {written} written elsewhere"
    );
    set_endpos_now(d, &src);
    let out = wait_exit(child, 300);
    assert!(
        out.status.success(),
        "clone --follow failed:\n{}",
        text(&out)
    );
    assert_identical(&src, &dst);
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}

/// Issue 13's "done when": idle_in_transaction_session_timeout = 5s (and statement_timeout =
/// 5s) on the source role, and a copy that takes longer (five tables, one worker, each part
/// held 1.5 s after it lands): the snapshot-holding walsender and the copy sessions set both
/// to 0 for themselves, so every part imports the snapshot and the result is identical. The
/// role is the test's own, so the shared cluster's other tests never see the settings.
#[tokio::test(flavor = "multi_thread")]
async fn role_timeouts_on_the_source_do_not_kill_a_long_copy() {
    let (src_admin_db, dst) = fresh_db_pair("t_sh_timeouts").await;
    exec(
        &admin_uri("source"),
        &format!(
            "DROP ROLE IF EXISTS t_sh_role;
             CREATE ROLE t_sh_role LOGIN SUPERUSER REPLICATION PASSWORD '{}';
             ALTER ROLE t_sh_role SET idle_in_transaction_session_timeout = '5s';
             ALTER ROLE t_sh_role SET statement_timeout = '5s';",
            password()
        ),
    )
    .await;
    let src = src_admin_db.replacen("://postgres:", "://t_sh_role:", 1);
    assert_ne!(
        src, src_admin_db,
        "cannot build the role's URI from {src_admin_db}"
    );
    assert_eq!(
        scalar_string(
            &src,
            "SELECT current_setting('idle_in_transaction_session_timeout')"
        )
        .await,
        "5s",
        "the role's setting reaches its sessions"
    );
    exec(
        &src_admin_db,
        "CREATE TABLE t1 (id int PRIMARY KEY, v text); CREATE TABLE t2 (id int PRIMARY KEY, v text);
         CREATE TABLE t3 (id int PRIMARY KEY, v text); CREATE TABLE t4 (id int PRIMARY KEY, v text);
         CREATE TABLE t5 (id int PRIMARY KEY, v text);
         INSERT INTO t1 SELECT g, md5(g::text) FROM generate_series(1, 2000) g;
         INSERT INTO t2 SELECT * FROM t1; INSERT INTO t3 SELECT * FROM t1;
         INSERT INTO t4 SELECT * FROM t1; INSERT INTO t5 SELECT * FROM t1;",
    )
    .await;
    let dir = workdir("role-timeouts");
    let d = dir.to_str().unwrap();
    let started = Instant::now();
    let child = spawn_pgtide(
        &[
            clone_follow_args(&src, &dst, d, "t_sh_timeouts_slot"),
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
        &src_admin_db,
        "UPDATE t1 SET v = 'changed' WHERE id <= 10; DELETE FROM t5 WHERE id > 1990;",
    )
    .await;
    // The copy outlasts the timeouts before the end is pinned.
    let deadline = Instant::now() + Duration::from_secs(120);
    while parts_done(&dir) < 5 {
        assert!(Instant::now() < deadline, "the copy never finished");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        started.elapsed() > Duration::from_secs(6),
        "the copy took {:?}: not longer than the 5 s timeouts",
        started.elapsed()
    );
    set_endpos_now(d, &src);
    let out = wait_exit(child, 300);
    let all = text(&out);
    assert!(out.status.success(), "clone --follow failed:\n{all}");
    assert!(
        !all.contains("idle-in-transaction") && !all.contains("statement timeout"),
        "{all}"
    );
    assert_identical(&src_admin_db, &dst);
    pgtide_ok(&Args::cleanup(&src, &dst, d));
    exec(&admin_uri("source"), "DROP ROLE IF EXISTS t_sh_role").await;
}

/// status --json shows the slot's retained WAL against max_slot_wal_keep_size; a follower
/// stopped while the source writes more than that loses its slot, and then follow stops with
/// the slot's name, why and the way out (never retried), and status and check say it is lost.
/// A server of the test's own: the limit is set in its postgresql.conf.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_lost_to_max_slot_wal_keep_size_is_a_clear_stop() {
    let server = PrivateServer::start_with(
        "slot-lost",
        "wal_level = logical\nmax_slot_wal_keep_size = 32MB\nmax_wal_size = 64MB\nmin_wal_size = 32MB\n",
    );
    let src = fresh_db(&server.uri, "t_sh_lost").await;
    let dst = fresh_db(&admin_uri("target"), "t_sh_lost").await;
    exec(
        &src,
        "CREATE TABLE log (id bigserial PRIMARY KEY, payload text);
         INSERT INTO log (payload) VALUES ('first');",
    )
    .await;
    let dir = workdir("slot-lost");
    let d = dir.to_str().unwrap();
    let slot = "t_sh_lost_slot";
    let mut child = spawn_pgtide(&clone_follow_args(&src, &dst, d, slot), &[]);
    wait_for_slot(&dir);
    let status = |d: &str| -> serde_json::Value {
        let out = pgtide_ok_stdout(&[
            "status", "--json", "--dir", d, "--source", &src, "--target", &dst,
        ]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(d);
        if s["phase"] == "following" {
            assert_eq!(s["slot_wal_limit_bytes"], 32 * MB, "{s}");
            assert!(s["slot_retained_bytes"].is_u64(), "{s}");
            assert_eq!(s["slot_wal_status"], "reserved", "{s}");
            assert!(s["source_wal_bytes_per_second"].is_number(), "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "never following: {s}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The follower stops; the source writes more than the limit and checkpoints.
    child.kill().unwrap();
    let _ = child.wait_with_output();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        exec(
            &src,
            "INSERT INTO log (payload)
             SELECT (SELECT string_agg(md5(random()::text || g::text || i::text), '')
                     FROM generate_series(1, 32) i)
             FROM generate_series(1, 20000) g;
             SELECT pg_switch_wal();",
        )
        .await;
        exec(&server.uri, "CHECKPOINT").await;
        let wal_status = scalar_string(
            &server.uri,
            &format!("SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        )
        .await;
        if wal_status == "lost" {
            break;
        }
        assert!(Instant::now() < deadline, "the slot is still {wal_status}");
    }
    let out = pgtide_fails(&["follow", "--source", &src, "--target", &dst, "--dir", d]);
    assert!(out.contains(slot), "{out}");
    assert!(out.contains("max_slot_wal_keep_size"), "{out}");
    assert!(out.contains("pgtide cleanup"), "{out}");
    assert!(out.contains("clone --follow"), "{out}");
    assert!(
        !out.contains("reconnecting"),
        "a lost slot is never retried: {out}"
    );
    let s = status(d);
    assert!(
        s["slot_lost"]
            .as_str()
            .is_some_and(|w| w.contains("max_slot_wal_keep_size")),
        "{s}"
    );
    assert!(
        s["verdict"].as_str().is_some_and(|v| v.contains("lost")),
        "{s}"
    );
    let human = pgtide_ok_stdout(&["status", "--dir", d, "--source", &src, "--target", &dst]);
    assert!(human.contains("lost"), "{human}");
    let check = text(&pgtide(&["check", "--source", &src, "--target", &dst]));
    assert!(check.contains(&format!("{slot} (lost")), "{check}");
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}
