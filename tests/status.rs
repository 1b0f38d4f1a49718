//! `pgtide status` against a real follow with a known backlog: positions, lag in bytes and
//! seconds (> 0 while behind, 0 once caught up), and pg_stat_replication on the source agreeing
//! with the applied position it reports.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgtide::failpoints::{APPLY_BEFORE_COMMIT, COPY_BEFORE_COMMIT};
use serde_json::Value;

fn status(d: &str, src: &str, dst: &str) -> Value {
    let out = pgtide_ok_stdout(&[
        "status", "--json", "--dir", d, "--source", src, "--target", dst,
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// GET /metrics over plain HTTP/1.0; returns the body.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// The value of one sample line (`name value` or `name{labels} value`).
fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn lsn(v: &Value) -> u64 {
    let text = v.as_str().unwrap_or_else(|| panic!("not an LSN: {v}"));
    let (hi, lo) = text.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_backlog_lag_and_catch_up() {
    let (src, dst) = fresh_db_pair("t_status").await;
    exec(&src, "CREATE TABLE s (id int PRIMARY KEY, v text)").await;
    let dir = workdir("status");
    let d = dir.to_str().unwrap();
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let metrics_addr = format!("127.0.0.1:{port}");
    // Every apply commit waits 1.5 s: a backlog builds up and drains in a few batches.
    let child = spawn_pgtide(
        &[
            clone_follow_args(&src, &dst, d, "t_status_slot"),
            vec!["--metrics-addr", &metrics_addr],
        ]
        .concat(),
        &[(
            "FAILPOINTS",
            format!("{APPLY_BEFORE_COMMIT}=sleep(1500)").as_str(),
        )],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if dir.join("state.db").exists() && status(d, &src, &dst)["phase"] == "following" {
            break;
        }
        assert!(Instant::now() < deadline, "follow never started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let client = connect(&src).await;
    let mut before_last = String::new();
    for id in 1..=200 {
        if id == 200 {
            before_last = current_lsn(&src).await;
        }
        client
            .execute("INSERT INTO s VALUES ($1, 'backlog')", &[&id])
            .await
            .unwrap();
    }
    let last = current_lsn(&src).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let behind = status(d, &src, &dst);
    assert_eq!(behind["phase"], "following", "{behind}");
    assert!(behind["error"].is_null(), "{behind}");
    assert_eq!(behind["tables_done"], 1, "{behind}");
    assert_eq!(behind["tables_total"], 1, "{behind}");
    assert!(
        lsn(&behind["source_lsn"]) >= lsn(&Value::String(last.clone())),
        "{behind}"
    );
    assert!(behind["lag_bytes"].as_u64().unwrap() > 0, "{behind}");
    assert!(behind["lag_seconds"].as_f64().unwrap() > 0.0, "{behind}");
    assert!(
        lsn(&behind["applied_lsn"]) < lsn(&Value::String(last.clone())),
        "{behind}"
    );
    assert!(
        behind["verdict"]
            .as_str()
            .unwrap()
            .starts_with("ready to cut over")
            || behind["verdict"]
                .as_str()
                .unwrap()
                .starts_with("catching up"),
        "{behind}"
    );
    // The metrics endpoint tells the same story while behind.
    let body = scrape(port);
    assert_eq!(metric(&body, "pgtide_tables_total"), Some(1.0), "{body}");
    assert!(metric(&body, "pgtide_lag_bytes").unwrap() > 0.0, "{body}");
    assert!(metric(&body, "pgtide_lag_seconds").is_some(), "{body}");
    assert!(metric(&body, "pgtide_applied_lsn").unwrap() > 0.0, "{body}");
    assert!(
        body.contains("pgtide_phase{phase=\"following\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE pgtide_apply_changes_per_second gauge"),
        "{body}"
    );
    assert!(!body.contains(&password()), "{body}");
    let text = pgtide_ok_stdout(&["status", "--dir", d, "--source", &src, "--target", &dst]);
    assert!(text.contains("verdict") && text.contains("lag"), "{text}");
    assert!(!text.contains(&password()), "{text}");

    // Caught up: lag 0 s although the source keeps its position. The last insert committed
    // after `before_last`; `last` may lie further on, past WAL that other databases of the
    // shared test source wrote meanwhile, which no apply ever reaches.
    let deadline = Instant::now() + Duration::from_secs(60);
    let caught_up = loop {
        let s = status(d, &src, &dst);
        if s["lag_seconds"].as_f64() == Some(0.0)
            && lsn(&s["applied_lsn"]) > lsn(&Value::String(before_last.clone()))
            && scalar_i64(&dst, "SELECT count(*) FROM s").await == 200
        {
            break s;
        }
        assert!(Instant::now() < deadline, "never caught up: {s}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        caught_up["verdict"]
            .as_str()
            .unwrap()
            .starts_with("ready to cut over"),
        "{caught_up}"
    );
    assert!(
        caught_up["apply_changes_per_second"].as_f64().unwrap() > 0.0,
        "{caught_up}"
    );
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM s").await, 200);

    // pg_stat_replication on the source reports what status calls applied (durably on the
    // target), once the next standby status update has gone out.
    let replay = "SELECT coalesce(r.replay_lsn::text, '') FROM pg_stat_replication r
                  JOIN pg_replication_slots s ON s.active_pid = r.pid
                  WHERE s.slot_name = 't_status_slot' AND r.application_name = 'pgtide'";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(d, &src, &dst);
        let on_source = scalar_string(&admin_uri("source"), replay).await;
        if !on_source.is_empty() && lsn(&Value::String(on_source.clone())) == lsn(&s["applied_lsn"])
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pg_stat_replication replay_lsn {on_source:?} never matched status {s}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    set_endpos_now(d, &src);
    let mut child = child;
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "follow did not stop at endpos");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // --watch refreshes: off a terminal each refresh is appended.
    // Each report asks both servers: on a loaded machine one can take a second, so the test
    // waits for the second report rather than for a fixed time.
    let mut watching = spawn_pgtide(
        &[
            "status", "--watch", "300ms", "--dir", d, "--source", &src, "--target", &dst,
        ],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut refreshes = 0;
    while refreshes < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        refreshes = watching.output_so_far().matches("verdict").count();
        assert!(
            watching.try_wait().unwrap().is_none(),
            "status --watch exited:\n{}",
            watching.output_so_far()
        );
    }
    watching.kill().unwrap();
    assert!(
        refreshes >= 2,
        "--watch printed {refreshes} reports in 60 s"
    );
    let stopped = status(d, &src, &dst);
    assert_eq!(stopped["phase"], "stopped at endpos", "{stopped}");
    assert!(
        stopped["verdict"]
            .as_str()
            .unwrap()
            .starts_with("stopped at endpos"),
        "{stopped}"
    );
    pgtide_ok(&Args::cleanup(&src, &dst, d));
    assert_eq!(status(d, &src, &dst)["phase"], "done");
    // A whole migration ran with the password in both URIs: no file pgtide wrote holds it.
    assert_no_file_holds_password(&dir);
}

/// `--log-format json` with debug logging on a clone whose URIs carry the password: every line
/// is a JSON object, the copy lines name their table in a span, and the password appears in no
/// log line and in no file of the work dir.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_name_their_table_and_never_hold_the_password() {
    let (src, dst) = fresh_db_pair("t_logs").await;
    exec(
        &src,
        "CREATE TABLE logged (id int PRIMARY KEY, v text);
         INSERT INTO logged SELECT g, 'v' FROM generate_series(1, 1000) g;",
    )
    .await;
    assert!(
        src.contains(&password()),
        "the test needs URIs that carry the password"
    );
    let dir = workdir("logs");
    let d = dir.to_str().unwrap();
    let mut command = pgtide_command(&[
        "--log-format",
        "json",
        "clone",
        "--source",
        &src,
        "--target",
        &dst,
        "--dir",
        d,
    ]);
    command.env("RUST_LOG", "debug");
    let out = command.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut copy_lines = 0;
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(entry["level"].is_string(), "{line}");
        if line.contains("\"copy\"") && line.contains("public.logged") {
            copy_lines += 1;
        }
    }
    assert!(
        copy_lines > 0,
        "no log line names the copied table in its span:\n{stderr}"
    );
    assert!(!stderr.contains(&password()), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&password()));
    assert_no_file_holds_password(&dir);
}

/// During a (slowed) clone, status shows the copying phase, the parts in flight, tables done
/// out of the total and the size to copy; afterwards, done.
#[tokio::test(flavor = "multi_thread")]
async fn status_shows_clone_progress() {
    let (src, dst) = fresh_db_pair("t_status_clone").await;
    exec(
        &src,
        "CREATE TABLE a (id int PRIMARY KEY, pad text);
         INSERT INTO a SELECT g, repeat('a', 100) FROM generate_series(1, 20000) g;
         CREATE TABLE b (id int PRIMARY KEY);
         INSERT INTO b SELECT g FROM generate_series(1, 100) g;",
    )
    .await;
    let dir = workdir("status-clone");
    let d = dir.to_str().unwrap();
    let child = spawn_pgtide(
        &Args::clone(&src, &dst, d).args(&["--table-jobs", "1"]),
        &[(
            "FAILPOINTS",
            format!("{COPY_BEFORE_COMMIT}=sleep(1500)").as_str(),
        )],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let during = loop {
        if dir.join("state.db").exists() {
            let s = status(d, &src, &dst);
            if s["phase"] == "copying" && !s["in_flight"].as_array().unwrap().is_empty() {
                break s;
            }
        }
        assert!(Instant::now() < deadline, "never saw the copy in flight");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(during["tables_total"], 2, "{during}");
    assert!(during["tables_done"].as_u64().unwrap() < 2, "{during}");
    assert!(during["bytes_total"].as_u64().unwrap() > 0, "{during}");
    assert!(
        during["in_flight"][0]["table"]
            .as_str()
            .unwrap()
            .starts_with("public."),
        "{during}"
    );
    assert!(
        during["verdict"]
            .as_str()
            .unwrap()
            .starts_with("cloning (copying)"),
        "{during}"
    );
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let after = status(d, &src, &dst);
    assert_eq!(after["phase"], "done", "{after}");
    assert_eq!(after["tables_done"], 2, "{after}");
    assert!(after["rows_copied"].as_u64().unwrap() >= 20100, "{after}");
}
