//! Connection strings end to end: every way of giving the password works, and the password
//! never reaches a child's command line.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use pgtide::failpoints::COPY_BEFORE_COMMIT;

fn without_password(uri: &str) -> String {
    uri.replace(&format!(":{}@", password()), "@")
}

#[tokio::test(flavor = "multi_thread")]
async fn password_from_env_pgpass_and_key_value_strings() {
    let (src, dst) = fresh_db_pair("t_conn").await;
    exec(
        &src,
        "CREATE TABLE a (id int PRIMARY KEY); INSERT INTO a SELECT generate_series(1, 5);",
    )
    .await;
    let dir = workdir("conn");
    std::fs::create_dir_all(&dir).unwrap();

    // PGPASSWORD with URIs that carry no password, given through the PGTIDE_*_PGURI variables.
    let out = pgtide_command(&["verify", "--counts-only"])
        .env("PGTIDE_SOURCE_PGURI", without_password(&src))
        .env("PGTIDE_TARGET_PGURI", without_password(&src))
        .env("PGPASSWORD", password())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // A pgpass file (PGPASSFILE) and key=value strings.
    let port = |uri: &str| {
        uri.rsplit_once(':')
            .unwrap()
            .1
            .split('/')
            .next()
            .unwrap()
            .to_string()
    };
    let pgpass = dir.join("pgpass");
    std::fs::write(&pgpass, format!("127.0.0.1:*:*:postgres:{}\n", password())).unwrap();
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let kv = |uri: &str| {
        format!(
            "host=127.0.0.1 port={} dbname=t_conn user=postgres sslmode=prefer",
            port(uri)
        )
    };
    let out = pgtide_command(&Args::clone(
        &kv(&src),
        &kv(&dst),
        dir.join("w").to_str().unwrap(),
    ))
    .env("PGPASSFILE", &pgpass)
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_identical(&src, &dst);

    // A pgpass file readable by others is ignored, as libpq does: the login then fails.
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = pgtide_command(&Args::verify(&kv(&src), &kv(&dst)))
        .env("PGPASSFILE", &pgpass)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot log in to the source server"),
        "{}",
        text(&out)
    );
}

/// pg_dump and pg_restore get the password through their environment, never their argv: a
/// wrapper records what they were started with.
#[tokio::test(flavor = "multi_thread")]
async fn children_never_see_the_password_in_argv() {
    let (src, dst) = fresh_db_pair("t_argv").await;
    exec(
        &src,
        "CREATE TABLE a (id int PRIMARY KEY); INSERT INTO a VALUES (1);",
    )
    .await;
    let dir = workdir("argv");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real_bin = std::process::Command::new("sh")
        .args(["-c", "ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1"])
        .output()
        .unwrap();
    let real_bin = String::from_utf8(real_bin.stdout)
        .unwrap()
        .trim()
        .to_string();
    let log = dir.join("argv.log");
    for tool in ["pg_dump", "pg_restore"] {
        let wrapper = bin.join(tool);
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\necho \"{tool} $*\" >> {log}\n[ -n \"$PGPASSWORD\" ] && echo \"{tool} has PGPASSWORD\" >> {log}\nexec {real_bin}/{tool} \"$@\"\n",
                log = log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = pgtide_command(&Args::clone(&src, &dst, dir.join("w").to_str().unwrap()))
        .env("PGTIDE_PG_BIN", &bin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let recorded = std::fs::read_to_string(&log).unwrap();
    assert!(
        recorded.contains("pg_dump") && recorded.contains("pg_restore --dbname"),
        "{recorded}"
    );
    assert!(recorded.contains("pg_restore has PGPASSWORD"), "{recorded}");
    assert!(
        !recorded.contains(&password()),
        "a password reached a child's argv:\n{recorded}"
    );
}

/// Ctrl-C (SIGINT) stops the clone cleanly with a message saying how to resume, and --resume
/// finishes it.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_stops_cleanly_and_resume_finishes() {
    let (src, dst) = fresh_db_pair("t_sigint").await;
    let mut sql = String::new();
    for i in 0..6 {
        sql.push_str(&format!("CREATE TABLE s{i} (id int PRIMARY KEY); INSERT INTO s{i} SELECT generate_series(1, 1000);"));
    }
    exec(&src, &sql).await;
    let dir = workdir("sigint");
    let d = dir.to_str().unwrap();
    let child = pgtide_command(&Args::clone(&src, &dst, d).args(&["--table-jobs", "1"]))
        .env(
            "FAILPOINTS",
            format!("{COPY_BEFORE_COMMIT}=sleep(400)").as_str(),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while parts_done(&dir) < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the clone never copied a table"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("interrupted") && text(&out).contains("--resume"),
        "{}",
        text(&out)
    );
    // The copy in flight was rolled back on the target: no session of pgtide is left there.
    let sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgtide'";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while scalar_i64(&dst, sessions).await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "pgtide sessions left on the target"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    pgtide_ok(&Args::clone(&src, &dst, d).args(&["--resume"]));
    assert_identical(&src, &dst);
}
