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
