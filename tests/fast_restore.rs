//! `--fast-restore` (issue 15, item 3): the bulk-load settings are on while the copy runs, and
//! after a SIGKILL in the middle of it `cleanup`, or the resumed run, gives the target back
//! exactly the settings it had (pg_settings and postgresql.auto.conf compared), including one
//! the DBA had set with ALTER SYSTEM before. The target is the PostgreSQL 18 test cluster:
//! ALTER SYSTEM changes a whole server, and no other test compares that cluster's settings.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgtide::failpoints::COPY_BEFORE_COMMIT;

async fn setting(uri: &str, name: &str) -> String {
    scalar_string(
        uri,
        &format!("SELECT setting FROM pg_settings WHERE name = '{name}'"),
    )
    .await
}

/// Waits until a new session of the target sees `name` = `value` (a reload is asynchronous).
async fn wait_for_setting(uri: &str, name: &str, value: &str, child: &mut PgtideChild) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while setting(uri, name).await != value {
        assert!(
            child.try_wait().unwrap().is_none() && Instant::now() < deadline,
            "{name} never became {value} on the target:\n{}",
            child.output_so_far()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fast_restore_settings_are_restored_after_a_sigkill() {
    let target_admin = version_uri(18);
    // Settings the DBA made with ALTER SYSTEM: they must come back as they were, not be reset.
    // (The test clusters run with fsync, full_page_writes and synchronous_commit off; on here,
    // so that --fast-restore=unsafe visibly turns them off.)
    for statement in [
        "ALTER SYSTEM SET checkpoint_timeout = '7min'",
        "ALTER SYSTEM SET fsync = on",
        "ALTER SYSTEM SET full_page_writes = on",
        "ALTER SYSTEM SET synchronous_commit = on",
        "SELECT pg_reload_conf()",
    ] {
        exec(&target_admin, statement).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while setting(&target_admin, "checkpoint_timeout").await != "420"
        || setting(&target_admin, "fsync").await != "on"
    {
        assert!(
            Instant::now() < deadline,
            "the reload did not take: {}",
            scalar_string(
                &target_admin,
                "SELECT string_agg(name || '=' || setting || ' ' || coalesce(error, '') || ' ' || applied::text, '; ') FROM pg_file_settings WHERE name IN ('fsync', 'checkpoint_timeout')"
            )
            .await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = server_settings(&target_admin).await;

    let (src, dst) =
        fresh_db_pair_between(&admin_uri("source"), &target_admin, "t_fast_restore").await;
    exec(
        &src,
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 5000) i;
         CREATE TABLE u (id int PRIMARY KEY);
         INSERT INTO u SELECT generate_series(1, 100);",
    )
    .await;
    let slow_copy = format!("{COPY_BEFORE_COMMIT}=sleep(3000)");

    // 1. Killed while the unsafe settings are on; cleanup restores them.
    let dir = workdir("fast-restore-cleanup");
    let d = dir.to_str().unwrap();
    let mut child = spawn_pgtide(
        &[
            clone_follow_args(&src, &dst, d, "t_fast_restore_slot"),
            vec!["--fast-restore=unsafe", "--table-jobs", "1"],
        ]
        .concat(),
        &[("FAILPOINTS", slow_copy.as_str())],
    );
    wait_for_setting(&target_admin, "maintenance_work_mem", "524288", &mut child).await;
    assert_eq!(setting(&target_admin, "fsync").await, "off");
    assert_eq!(setting(&target_admin, "full_page_writes").await, "off");
    assert_eq!(setting(&target_admin, "synchronous_commit").await, "off");
    assert_eq!(setting(&target_admin, "checkpoint_timeout").await, "1800");
    child.kill().ok();
    let _ = child.wait_with_output();
    assert_ne!(server_settings(&target_admin).await, before);
    let out = pgtide_ok(&Args::cleanup(&src, &dst, d));
    assert!(
        out.contains("settings changed by --fast-restore restored"),
        "{out}"
    );
    assert_eq!(server_settings(&target_admin).await, before);
    // Twice is fine: nothing left to restore.
    pgtide_ok(&Args::cleanup(&src, &dst, d));
    assert_eq!(server_settings(&target_admin).await, before);

    // 2. Killed again; the resumed run (with --fast-restore: the first record is kept) ends
    //    with the settings restored before apply runs, and the data identical.
    let (src, dst) =
        fresh_db_pair_between(&admin_uri("source"), &target_admin, "t_fast_restore").await;
    exec(
        &src,
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 5000) i;",
    )
    .await;
    let dir = workdir("fast-restore-resume");
    let d = dir.to_str().unwrap();
    let args = [
        clone_follow_args(&src, &dst, d, "t_fast_restore_slot2"),
        vec!["--fast-restore", "--table-jobs", "1"],
    ]
    .concat();
    let mut child = spawn_pgtide(&args, &[("FAILPOINTS", slow_copy.as_str())]);
    wait_for_setting(&target_admin, "maintenance_work_mem", "524288", &mut child).await;
    assert_eq!(
        setting(&target_admin, "fsync").await,
        "on",
        "plain --fast-restore keeps fsync"
    );
    child.kill().ok();
    let _ = child.wait_with_output();
    let mut resume = args.clone();
    resume.push("--resume");
    let child = spawn_pgtide(&resume, &[]);
    exec(&src, "INSERT INTO t VALUES (5001, 'after the kill')").await;
    wait_for_slot(&dir);
    let all = finish_at_current_position(child, &src, d);
    let restored_at = all
        .find("restored the target's settings from before --fast-restore")
        .unwrap_or_else(|| panic!("no restore in the log:\n{all}"));
    let applying_at = all
        .find("applying the spooled changes")
        .unwrap_or_else(|| panic!("apply never started:\n{all}"));
    assert!(
        restored_at < applying_at,
        "apply ran with the bulk-load settings:\n{all}"
    );
    let after = server_settings(&target_admin).await;
    assert!(after == before, "{}", differences(&before, &after));
    assert_identical(&src, &dst);
    pgtide_ok(&Args::cleanup(&src, &dst, d));

    for name in [
        "checkpoint_timeout",
        "fsync",
        "full_page_writes",
        "synchronous_commit",
    ] {
        exec(&target_admin, &format!("ALTER SYSTEM RESET {name}")).await;
    }
    exec(&target_admin, "SELECT pg_reload_conf()").await;
}
