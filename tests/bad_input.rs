//! Bad input gets a clear error that names the problem and the fix, a non-zero exit, and never
//! the password.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgtide::failpoints::COPY_BEFORE_COMMIT;

fn assert_no_password(output: &str) {
    let password = password();
    assert!(
        !output.contains(&password),
        "the password leaked into the output:\n{output}"
    );
}

fn clone_args<'a>(src: &'a str, dst: &'a str, dir: &'a str) -> Vec<&'a str> {
    vec!["clone", "--source", src, "--target", dst, "--dir", dir]
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_uri_is_named() {
    let dst = db_uri("target", "postgres");
    let dir = workdir("bad-uri");
    let out = pgtide_fails(&clone_args(
        "postgres://u:hunter2secret@localhost:notaport/db",
        &dst,
        dir.to_str().unwrap(),
    ));
    assert!(
        out.contains("--source is not a valid connection string") && out.contains("invalid port"),
        "{out}"
    );
    assert!(!out.contains("hunter2secret"), "{out}");
    let out = pgtide_fails(&clone_args(
        "host=localhost sslmode=always password=hunter2secret",
        &dst,
        dir.to_str().unwrap(),
    ));
    assert!(
        out.contains("invalid sslmode") && !out.contains("hunter2secret"),
        "{out}"
    );
    assert_no_password(&out);
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_source_says_so() {
    let dst = db_uri("target", "postgres");
    let dir = workdir("unreachable");
    let src = format!("postgres://postgres:{}@127.0.0.1:1/postgres", password());
    let out = pgtide_fails(&clone_args(&src, &dst, dir.to_str().unwrap()));
    assert!(
        out.contains("cannot connect to the source server at 127.0.0.1:1"),
        "{out}"
    );
    assert!(out.contains("Is PostgreSQL running"), "{out}");
    assert_no_password(&out);
    // connect_timeout bounds the whole set-up: a local listener that accepts but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let t0 = Instant::now();
    let src = format!("postgres://postgres@127.0.0.1:{port}/postgres?connect_timeout=2");
    let out = pgtide_fails(&clone_args(&src, &dst, dir.to_str().unwrap()));
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "connect_timeout was not honoured"
    );
    assert!(
        out.contains("no answer within connect_timeout (2 s)"),
        "{out}"
    );
    drop(silent);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_is_named_without_echoing_it() {
    let dst = db_uri("target", "postgres");
    let dir = workdir("wrong-password");
    let src = db_uri("source", "postgres").replace(&password(), "not-the-password-42");
    let out = pgtide_fails(&clone_args(&src, &dst, dir.to_str().unwrap()));
    assert!(
        out.contains("cannot log in to the source server") && out.contains("password"),
        "{out}"
    );
    assert!(!out.contains("not-the-password-42"), "{out}");
    assert_no_password(&out);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_database_is_named() {
    let dst = db_uri("target", "postgres");
    let dir = workdir("missing-db");
    let src = db_uri("source", "no_such_database");
    let out = pgtide_fails(&clone_args(&src, &dst, dir.to_str().unwrap()));
    assert!(
        out.contains("database \"no_such_database\" does not exist"),
        "{out}"
    );
    assert_no_password(&out);
}

#[tokio::test(flavor = "multi_thread")]
async fn target_not_empty_needs_drop_if_exists() {
    let (src, dst) = fresh_db_pair("t_not_empty").await;
    exec(&src, "CREATE TABLE a (id int PRIMARY KEY); INSERT INTO a VALUES (1), (2);
                CREATE TABLE b (id int PRIMARY KEY, a_id int REFERENCES a(id)); INSERT INTO b VALUES (1, 1);").await;
    exec(
        &dst,
        "CREATE TABLE a (id int PRIMARY KEY, junk text); INSERT INTO a VALUES (99, 'old');
                CREATE TABLE b (id int, a_id int REFERENCES a(id));",
    )
    .await;
    let dir = workdir("not-empty");
    let d = dir.to_str().unwrap();
    let out = pgtide_fails(&clone_args(&src, &dst, d));
    assert!(
        out.contains("target database is not empty") && out.contains("--drop-if-exists"),
        "{out}"
    );
    assert_no_password(&out);
    // The refusal created nothing and left the target as it was.
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM a WHERE id = 99").await,
        1
    );
    let mut args = clone_args(&src, &dst, d);
    args.extend(["--drop-if-exists", "--restart"]);
    pgtide_ok(&args);
    assert_identical(&src, &dst);
}

#[tokio::test(flavor = "multi_thread")]
async fn second_pgtide_on_the_same_work_dir_is_refused() {
    let (src, dst) = fresh_db_pair("t_lock").await;
    exec(
        &src,
        "CREATE TABLE a (id int); INSERT INTO a SELECT generate_series(1, 10);",
    )
    .await;
    let dir = workdir("lock");
    let d = dir.to_str().unwrap();
    let mut first = pgtide_command(&clone_args(&src, &dst, d))
        .env(
            "FAILPOINTS",
            format!("{COPY_BEFORE_COMMIT}=sleep(5000)").as_str(),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(dir.join("pgtide.lock"))
        .unwrap_or_default()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the first pgtide never took the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = pgtide_fails(&clone_args(&src, &dst, d));
    assert!(
        out.contains("another pgtide is already using the work dir"),
        "{out}"
    );
    assert!(out.contains(&format!("pid {}", first.id())), "{out}");
    assert_no_password(&out);
    first.kill().unwrap();
    first.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_filters_are_reported() {
    let (src, dst) = fresh_db_pair("t_bad_filters").await;
    exec(&src, "CREATE TABLE a (id int);").await;
    let dir = workdir("bad-filters");
    std::fs::create_dir_all(&dir).unwrap();
    let syntax = dir.join("syntax.ini");
    std::fs::write(&syntax, "[exclude-table]\npublic.a extra\n").unwrap();
    let mut args = clone_args(&src, &dst, "unused");
    let wd = dir.join("w");
    args[6] = wd.to_str().unwrap();
    let mut a = args.clone();
    a.extend(["--filters", syntax.to_str().unwrap()]);
    let out = pgtide_fails(&a);
    assert!(out.contains("line 2"), "{out}");
    let missing = dir.join("missing.ini");
    std::fs::write(&missing, "[exclude-table]\npublic.does_not_exist\n").unwrap();
    let mut a = args.clone();
    a.extend(["--filters", missing.to_str().unwrap()]);
    let out = pgtide_fails(&a);
    assert!(
        out.contains("public.does_not_exist, which does not exist on the source"),
        "{out}"
    );
    // Nothing was created on the target.
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM pg_class WHERE relname = 'a'").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn work_dir_of_another_migration_is_refused() {
    let (src, dst) = fresh_db_pair("t_other_a").await;
    let (src2, dst2) = fresh_db_pair("t_other_b").await;
    exec(&src, "CREATE TABLE a (id int);").await;
    exec(&src2, "CREATE TABLE a (id int);").await;
    let dir = workdir("other-migration");
    let d = dir.to_str().unwrap();
    let out = pgtide(&Args::clone(&src, &dst, d));
    assert!(out.status.success(), "{}", text(&out));
    // Simulate an unfinished clone, then resume it against other databases.
    let conn = rusqlite::Connection::open(dir.join("state.db")).unwrap();
    conn.execute(
        "UPDATE meta SET value = 'running' WHERE key = 'clone.status'",
        [],
    )
    .unwrap();
    drop(conn);
    let out = pgtide_fails(&Args::clone(&src2, &dst2, d).args(&["--resume"]));
    assert!(out.contains("belongs to another migration"), "{out}");
    assert_no_password(&out);
}

/// clone --follow runs the preflight before it creates anything: a source without
/// wal_level=logical, a role without REPLICATION, a source whose slots are all used, and
/// missing client tools are each named with their fix, and nothing is left behind.
#[tokio::test(flavor = "multi_thread")]
async fn clone_follow_preflight_names_each_hazard() {
    let (src, dst) = fresh_db_pair("t_preflight").await;
    exec(&src, "CREATE TABLE p (id int PRIMARY KEY)").await;
    let dir = workdir("preflight");
    let d = dir.to_str().unwrap();
    let follow = |source: &str| {
        vec![
            "clone".to_string(),
            "--follow".into(),
            "--source".into(),
            source.to_string(),
            "--target".into(),
            dst.clone(),
            "--dir".into(),
            d.to_string(),
            "--slot-name".into(),
            "t_preflight_slot".into(),
        ]
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        pgtide_fails(&refs)
    };

    // wal_level: the target cluster (wal_level = replica) as the source.
    let (replica_src, _) = (db_uri("target", "t_preflight"), ());
    let out = run(follow(&replica_src));
    assert!(
        out.contains("wal_level") && out.contains("ALTER SYSTEM SET wal_level = logical"),
        "{out}"
    );
    assert!(out.contains("nothing was created"), "{out}");
    assert_no_password(&out);

    // A role without REPLICATION.
    exec(
        &admin_uri("source"),
        &format!(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 't_preflight_user') THEN
                 CREATE ROLE t_preflight_user LOGIN PASSWORD '{}';
               END IF;
             END $$;",
            password()
        ),
    )
    .await;
    exec(&src, "GRANT SELECT ON p TO t_preflight_user").await;
    let (_, rest) = src.split_once('@').unwrap();
    let limited = format!("postgres://t_preflight_user:{}@{rest}", password());
    let out = run(follow(&limited));
    assert!(
        out.contains("neither REPLICATION nor SUPERUSER") && out.contains("REPLICATION"),
        "{out}"
    );
    assert_no_password(&out);

    // pg_dump / pg_restore not found.
    let mut command = pgtide_command(&follow(&src).iter().map(String::as_str).collect::<Vec<_>>());
    command.env("PGTIDE_PG_BIN", "/nonexistent/bin");
    let out = command.output().unwrap();
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("local pg_dump") && all.contains("PGTIDE_PG_BIN"),
        "{all}"
    );

    // Nothing of any attempt is left on the source, and the work dir takes a good run.
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 't_preflight_slot'"
        )
        .await,
        0
    );
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_publication WHERE pubname LIKE 'pgtide_t_preflight%'"
        )
        .await,
        0
    );
    // The role granted on the source is missing on the target: named before anything is created.
    let out = pgtide_fails(&Args::clone(&src, &dst, d));
    assert!(
        out.contains("target roles")
            && out.contains("t_preflight_user")
            && out.contains("--no-acl"),
        "{out}"
    );
    pgtide_ok(&[
        "clone", "--no-acl", "--source", &src, "--target", &dst, "--dir", d,
    ]);
}

/// A source whose replication slots are all in use: check and clone --follow say so, with the
/// fix, before creating anything.
#[tokio::test(flavor = "multi_thread")]
async fn slot_limit_reached_is_named() {
    let server =
        PrivateServer::start_with("slots", "wal_level = logical\nmax_replication_slots = 1\n");
    let src = server.uri.clone();
    exec(&src, "CREATE TABLE s (id int PRIMARY KEY)").await;
    exec(
        &src,
        "SELECT pg_create_logical_replication_slot('someone_elses', 'pgoutput')",
    )
    .await;
    let (_, dst) = fresh_db_pair("t_slots").await;
    let dir = workdir("slots");
    let d = dir.to_str().unwrap();
    let out = pgtide_fails(&["check", "--source", &src, "--dir", d]);
    assert!(
        out.contains("FAIL  source replication slots") && out.contains("max_replication_slots"),
        "{out}"
    );
    let out = pgtide_fails(&Args::clone_follow(&src, &dst, d, "t_slots_slot"));
    assert!(out.contains("all 1 replication slots are in use"), "{out}");
    assert!(out.contains("max_replication_slots"), "{out}");
    assert_no_password(&out);
    assert_eq!(
        scalar_i64(&src, "SELECT count(*) FROM pg_publication").await,
        0,
        "nothing was created"
    );
}

/// A host name that does not resolve is named as such.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_host_is_named() {
    let dir = workdir("unknown-host");
    let out = pgtide_fails(&Args::clone(
        "postgres://postgres:hunter2secret@no-such-host.invalid:5432/db",
        &db_uri("target", "postgres"),
        dir.to_str().unwrap(),
    ));
    assert!(out.contains("no-such-host.invalid"), "{out}");
    assert!(!out.contains("hunter2secret"), "{out}");
    assert_no_password(&out);
}

/// `pgtide follow` checks what concerns it (both servers, replication, origins) first.
#[tokio::test(flavor = "multi_thread")]
async fn follow_checks_its_servers_first() {
    let (src, _) = fresh_db_pair("t_follow_check").await;
    let dir = workdir("follow-check");
    let out = pgtide_fails(&[
        "follow",
        "--source",
        &src,
        "--target",
        "postgres://postgres:hunter2secret@127.0.0.1:1/db?connect_timeout=2",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    assert!(
        out.contains("target connection") && out.contains("nothing was created"),
        "{out}"
    );
    assert!(!out.contains("hunter2secret"), "{out}");
    assert_no_password(&out);
}
