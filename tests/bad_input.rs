//! Bad input gets a clear error that names the problem and the fix, a non-zero exit, and never
//! the password.

mod common;

use std::time::{Duration, Instant};

use common::*;

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
        .env("FAILPOINTS", "copy.before_commit=sleep(5000)")
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
    let out = pgtide(&["clone", "--source", &src, "--target", &dst, "--dir", d]);
    assert!(out.status.success(), "{}", text(&out));
    // Simulate an unfinished clone, then resume it against other databases.
    let conn = rusqlite::Connection::open(dir.join("state.db")).unwrap();
    conn.execute(
        "UPDATE meta SET value = 'running' WHERE key = 'clone.status'",
        [],
    )
    .unwrap();
    drop(conn);
    let out = pgtide_fails(&[
        "clone", "--source", &src2, "--target", &dst2, "--dir", d, "--resume",
    ]);
    assert!(out.contains("belongs to another migration"), "{out}");
    assert_no_password(&out);
}
