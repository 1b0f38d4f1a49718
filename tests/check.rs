//! `pgtide check` against the real clusters: each hazard is found with its fix, an offline
//! check skips what only follow needs, and a check that fails exits non-zero without ever
//! printing the password.

mod common;

use common::*;
use serde_json::Value;

fn findings(out: &str) -> Vec<Value> {
    let start = out.find('[').unwrap_or_else(|| panic!("no JSON in: {out}"));
    let end = out.rfind(']').unwrap();
    serde_json::from_str(&out[start..=end]).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn finding<'a>(all: &'a [Value], check: &str) -> &'a Value {
    all.iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no check {check} in {all:?}"))
}

fn with_user(uri: &str, user: &str) -> String {
    let (_, rest) = uri.split_once('@').unwrap();
    format!("postgres://{user}:{}@{rest}", password())
}

#[tokio::test(flavor = "multi_thread")]
async fn check_finds_each_hazard_with_its_fix() {
    let (src, dst) = fresh_db_pair("t_check").await;
    exec(
        &src,
        "CREATE TABLE fine (id int PRIMARY KEY);
         CREATE TABLE bare (v int);
         CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY);
         CREATE MATERIALIZED VIEW mv AS SELECT count(*) FROM fine;
         SELECT lo_from_bytea(0, 'blob');
         CREATE TABLE secret (id int PRIMARY KEY);",
    )
    .await;
    exec(&dst, "CREATE TABLE already_here (id int)").await;
    let dir = workdir("check");
    let d = dir.to_str().unwrap();

    // Online (the default), as a superuser: the table without identity fails, with its fix.
    let out = pgtide_fails(&[
        "check", "--source", &src, "--target", &dst, "--dir", d, "--json",
    ]);
    assert!(!out.contains(&password()), "{out}");
    let all = findings(&out);
    let identity = finding(&all, "source replica identity");
    assert_eq!(identity["level"], "FAIL", "{identity}");
    assert!(
        identity["fix"]
            .as_str()
            .unwrap()
            .contains("ALTER TABLE public.bare REPLICA IDENTITY FULL"),
        "{identity}"
    );
    assert_eq!(finding(&all, "source unlogged tables")["level"], "WARN");
    assert!(
        finding(&all, "source unlogged tables")["message"]
            .as_str()
            .unwrap()
            .contains("public.scratch")
    );
    assert_eq!(finding(&all, "source materialized views")["level"], "WARN");
    assert_eq!(finding(&all, "source large objects")["level"], "WARN");
    assert_eq!(finding(&all, "source wal_level")["level"], "OK");
    assert_eq!(finding(&all, "target empty")["level"], "FAIL");
    assert_eq!(finding(&all, "local pg_dump")["level"], "OK");
    assert!(
        finding(&all, "source version")["message"]
            .as_str()
            .unwrap()
            .contains("PostgreSQL 15")
    );

    // Apply lanes need target connections only: more than the target has fails there, with
    // the option to lower named, while the source's budget is the copy's.
    let out = pgtide_fails(&[
        "check",
        "--source",
        &src,
        "--target",
        &dst,
        "--dir",
        d,
        "--json",
        "--apply-jobs",
        "100000",
    ]);
    let all = findings(&out);
    let target = finding(&all, "target connections");
    assert_eq!(target["level"], "FAIL", "{target}");
    assert!(
        target["message"].as_str().unwrap().contains("100002")
            && target["fix"].as_str().unwrap().contains("--apply-jobs"),
        "{target}"
    );
    assert_eq!(finding(&all, "source connections")["level"], "OK");

    // Offline: replica identities do not matter; --drop-if-exists turns the non-empty target
    // into a warning, so the check passes.
    let out = pgtide_ok(&[
        "check",
        "--offline",
        "--drop-if-exists",
        "--source",
        &src,
        "--target",
        &dst,
        "--dir",
        d,
    ]);
    assert!(!out.contains("replica identity"), "{out}");
    assert!(out.contains("WARN") && out.contains("fix:"), "{out}");
    assert!(out.contains("all checks passed"), "{out}");

    // wal2json asked for (it is installed on the test source), and a pgtide slot left by an
    // earlier run: a warning with how to resume or clean up.
    exec(
        &src,
        "SELECT pg_create_logical_replication_slot('pgtide_t_check_leftover', 'pgoutput')",
    )
    .await;
    let out = pgtide_fails(&[
        "check", "--plugin", "wal2json", "--source", &src, "--target", &dst, "--dir", d, "--json",
    ]);
    let all = findings(&out);
    assert_eq!(finding(&all, "source wal2json")["level"], "OK");
    let leftovers = finding(&all, "source earlier runs");
    assert_eq!(leftovers["level"], "WARN");
    assert!(
        leftovers["message"]
            .as_str()
            .unwrap()
            .contains("pgtide_t_check_leftover"),
        "{leftovers}"
    );
    assert!(
        leftovers["fix"]
            .as_str()
            .unwrap()
            .contains("pgtide cleanup"),
        "{leftovers}"
    );
    exec(
        &src,
        "SELECT pg_drop_replication_slot('pgtide_t_check_leftover')",
    )
    .await;

    // The source alone: a connection test that names the server version.
    let out = pgtide_ok(&["check", "--offline", "--source", &src, "--dir", d]);
    assert!(
        out.contains("OK    source version") && out.contains("PostgreSQL 15"),
        "{out}"
    );

    // A role without REPLICATION that cannot read one table.
    exec(
        &admin_uri("source"),
        &format!(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 't_check_limited') THEN
                 CREATE ROLE t_check_limited LOGIN PASSWORD '{}';
               END IF;
             END $$;",
            password()
        ),
    )
    .await;
    exec(
        &src,
        "GRANT SELECT ON fine, bare, scratch TO t_check_limited; REVOKE ALL ON secret FROM t_check_limited;",
    )
    .await;
    let limited = with_user(&src, "t_check_limited");
    let out = pgtide_fails(&["check", "--source", &limited, "--dir", d, "--json"]);
    let all = findings(&out);
    let replication = finding(&all, "source REPLICATION");
    assert_eq!(replication["level"], "FAIL");
    let fix = replication["fix"].as_str().unwrap();
    assert!(
        fix.starts_with("ALTER ROLE")
            && fix.contains("t_check_limited")
            && fix.contains("REPLICATION"),
        "{fix}"
    );
    let read = finding(&all, "source read access");
    assert_eq!(read["level"], "FAIL");
    assert!(
        read["message"].as_str().unwrap().contains("public.secret"),
        "{read}"
    );
    assert!(
        read["fix"]
            .as_str()
            .unwrap()
            .contains("GRANT SELECT ON public.secret"),
        "{read}"
    );
    assert!(!out.contains(&password()), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_wal_level_old_tools_and_unreachable_servers() {
    let (_, dst) = fresh_db_pair("t_check_wal").await;
    let dir = workdir("check-wal");
    let d = dir.to_str().unwrap();
    // The target cluster runs with wal_level = replica: as a source for follow it must fail.
    let out = pgtide_fails(&["check", "--source", &dst, "--dir", d, "--json"]);
    let all = findings(&out);
    let wal = finding(&all, "source wal_level");
    assert_eq!(wal["level"], "FAIL");
    assert!(
        wal["fix"].as_str().unwrap().contains("wal_level = logical"),
        "{wal}"
    );

    // pg_dump older than the server.
    let bin = std::env::temp_dir().join(format!("pgtide-old-tools-{}", std::process::id()));
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["pg_dump", "pg_restore"] {
        let path = bin.join(tool);
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho '{tool} (PostgreSQL) 11.22'\n"),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut command = pgtide_command(&["check", "--offline", "--source", &dst, "--dir", d]);
    command.env("PGTIDE_PG_BIN", &bin);
    let out = command.output().unwrap();
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("FAIL  local pg_dump") && all.contains("version 11"),
        "{all}"
    );
    assert!(all.contains("PGTIDE_PG_BIN"), "{all}");
    let _ = std::fs::remove_dir_all(&bin);

    // An unreachable target is a FAIL line, not a crash.
    let out = pgtide_fails(&[
        "check",
        "--offline",
        "--source",
        &dst,
        "--target",
        "postgres://postgres@127.0.0.1:1/postgres?connect_timeout=2",
        "--dir",
        d,
    ]);
    assert!(out.contains("FAIL  target connection"), "{out}");
}

/// The work dir is created 0700 and everything in it 0600: dumps and spooled rows are data.
#[tokio::test(flavor = "multi_thread")]
async fn work_dir_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let (src, dst) = fresh_db_pair("t_private").await;
    exec(
        &src,
        "CREATE TABLE p (id int PRIMARY KEY); INSERT INTO p VALUES (1);",
    )
    .await;
    let dir = workdir("private");
    let d = dir.to_str().unwrap();
    pgtide_ok(&Args::clone(&src, &dst, d));
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "work dir mode {mode:o}");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", path.display());
        files += 1;
    }
    assert!(files >= 3, "state.db, the lock and the dumps");
}

/// An endpos that is not an LSN is refused with the expected form.
#[test]
fn invalid_endpos_is_named() {
    let dir = workdir("bad-lsn");
    let d = dir.to_str().unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let out = pgtide_fails(&[
        "follow",
        "--source",
        "postgres://x@127.0.0.1:1/db",
        "--target",
        "postgres://x@127.0.0.1:1/db",
        "--dir",
        d,
        "--endpos",
        "12345",
    ]);
    assert!(
        out.contains("invalid LSN \"12345\"") && out.contains("16/B374D848"),
        "{out}"
    );
    // The same for the sentinel of a migration's work dir.
    std::fs::write(dir.join("state.db"), b"").unwrap();
    let out = pgtide_fails(&["sentinel", "set", "endpos", "not-an-lsn", "--dir", d]);
    assert!(out.contains("invalid LSN \"not-an-lsn\""), "{out}");
    // A valid endpos is set, and `none` clears it (a follower then keeps following).
    pgtide_ok(&["sentinel", "set", "endpos", "16/B374D848", "--dir", d]);
    let get = pgtide_ok_stdout(&["sentinel", "get", "--dir", d]);
    assert!(get.contains("\"endpos\": \"16/B374D848\""), "{get}");
    pgtide_ok(&["sentinel", "set", "endpos", "none", "--dir", d]);
    let get = pgtide_ok_stdout(&["sentinel", "get", "--dir", d]);
    assert!(get.contains("\"endpos\": null"), "{get}");
}

/// Tables and indexes in a tablespace the target lacks: check fails with the fix, and
/// `--no-tablespaces` puts them in the target's default (the clone then restores exactly).
#[tokio::test(flavor = "multi_thread")]
async fn a_tablespace_the_target_lacks_is_refused_or_left_out() {
    let (src, dst) = fresh_db_pair("t_check_space").await;
    let location = std::env::temp_dir().join(format!("pgtide-space-{}", std::process::id()));
    std::fs::create_dir_all(&location).unwrap();
    let chown = std::process::Command::new("chown")
        .args(["postgres:", location.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(chown.success());
    exec(&src, "DROP TABLESPACE IF EXISTS t_check_space").await;
    exec(
        &src,
        &format!(
            "CREATE TABLESPACE t_check_space LOCATION '{}'",
            location.display()
        ),
    )
    .await;
    exec(
        &src,
        "CREATE TABLE placed (id int PRIMARY KEY USING INDEX TABLESPACE t_check_space, v text) TABLESPACE t_check_space;
         INSERT INTO placed SELECT g, 'v' || g FROM generate_series(1, 100) g;",
    )
    .await;
    let dir = workdir("check-space");
    let d = dir.to_str().unwrap();
    let out = pgtide_fails(&[
        "check", "--source", &src, "--target", &dst, "--dir", d, "--json",
    ]);
    let all = findings(&out);
    let space = finding(&all, "target tablespaces");
    assert_eq!(space["level"], "FAIL", "{space}");
    assert!(
        space["message"].as_str().unwrap().contains("t_check_space")
            && space["fix"].as_str().unwrap().contains("--no-tablespaces"),
        "{space}"
    );
    let out = pgtide(&[
        "check",
        "--source",
        &src,
        "--target",
        &dst,
        "--dir",
        d,
        "--json",
        "--no-tablespaces",
    ]);
    let all = findings(&text(&out));
    assert_eq!(finding(&all, "target tablespaces")["level"], "OK");
    pgtide_ok(&Args::clone(&src, &dst, d).arg("--no-tablespaces"));
    assert_identical(&src, &dst);
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_class WHERE reltablespace <> 0 AND relname LIKE 'placed%'"
        )
        .await,
        0
    );
    exec(&src, "DROP TABLE placed").await;
    exec(&src, "DROP TABLESPACE t_check_space").await;
}
