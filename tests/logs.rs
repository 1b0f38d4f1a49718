//! pgtide's logs are plain text when stderr is not a terminal: a log file or a pipe never gets
//! ANSI colour codes, even with NO_COLOR unset.

mod common;

use std::process::Stdio;

use common::*;

/// No escape byte (0x1b starts every ANSI colour sequence) in `bytes`.
fn assert_no_escape(what: &str, bytes: &[u8]) {
    assert!(
        !bytes.contains(&0x1b),
        "{what} holds ANSI escape codes:\n{}",
        String::from_utf8_lossy(bytes)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_to_a_file_or_a_pipe_have_no_colour() {
    let (src, dst) = fresh_db_pair("t_plain_logs").await;
    exec(
        &src,
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 100) g;",
    )
    .await;
    let dir = workdir("plain-logs");
    std::fs::create_dir_all(&dir).unwrap();
    // stderr to a file, as a service manager or `2> pgtide.log` has it.
    let log =
        std::env::temp_dir().join(format!("pgtide-test-plain-logs-{}.log", std::process::id()));
    let status = pgtide_command(&Args::clone(&src, &dst, dir.join("w").to_str().unwrap()))
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    let logged = std::fs::read(&log).unwrap();
    assert!(
        status.success(),
        "clone failed:\n{}",
        String::from_utf8_lossy(&logged)
    );
    // The file holds log lines (a test of an empty file would pass whatever pgtide did).
    assert!(
        String::from_utf8_lossy(&logged).contains("INFO"),
        "no log line in the file:\n{}",
        String::from_utf8_lossy(&logged)
    );
    assert_no_escape("the log file", &logged);
    // stdout and stderr to pipes, as when another program reads them.
    let out = pgtide_command(&Args::verify(&src, &dst))
        .env_remove("NO_COLOR")
        .env("PGTIDE_LOG", "debug")
        .output()
        .unwrap();
    assert!(out.status.success(), "verify failed:\n{}", text(&out));
    assert!(
        text(&out).contains("DEBUG") || text(&out).contains("INFO"),
        "no log line:\n{}",
        text(&out)
    );
    assert_no_escape("verify's stderr", &out.stderr);
    assert_no_escape("verify's stdout", &out.stdout);
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pgtide that writes far more than a pipe holds (64 kB) while the test is busy elsewhere
/// runs to its end: spawn_pgtide's children have their pipes read all along, not only at exit.
#[tokio::test(flavor = "multi_thread")]
async fn a_chatty_pgtide_never_blocks_on_its_pipes() {
    let (src, dst) = fresh_db_pair("t_chatty_logs").await;
    // Forty tables: each adds its own catalog queries and checksums to the trace.
    let tables = "DO $$ BEGIN FOR i IN 1..40 LOOP
                    EXECUTE format('CREATE TABLE t%s (id int PRIMARY KEY, v text)', i);
                  END LOOP; END $$;";
    exec(&src, tables).await;
    exec(
        &src,
        "INSERT INTO t1 SELECT g, 'row ' || g FROM generate_series(1, 1000) g",
    )
    .await;
    exec(&dst, tables).await;
    // trace: every protocol message of every connection is logged.
    let child = spawn_pgtide(&Args::verify(&src, &dst), &[("PGTIDE_LOG", "trace")]);
    // Nobody reads the output before the exit: with undrained pipes pgtide would block here.
    let out = wait_exit(child, 120);
    assert!(
        out.stderr.len() > 2 * 64 * 1024,
        "pgtide wrote only {} bytes to stderr: the test does not fill a pipe",
        out.stderr.len()
    );
    // verify ran to its end and found the target's t1 empty.
    let tail_of = |all: &str| all.lines().rev().take(30).collect::<Vec<_>>().join("\n");
    assert!(!out.status.success(), "{}", tail_of(&text(&out)));
    let all = text(&out);
    assert!(
        all.contains("public.t1") && all.contains("DIFFERENT"),
        "{}",
        tail_of(&all)
    );
}
