//! The dashboard and its HTTP API (issue 17): `clone --follow --http-addr` serves the status,
//! the recorded history and the metrics of the running follow; the page, loaded in headless
//! Chromium (Debian's package), shows the phase, the verdict and a lag chart with points; and
//! the history survives a restart of pgtide (a later `follow` serves the earlier points too).

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

/// A GET over plain HTTP/1.1: the response head (lower-cased) and body.
fn http_get(addr: &str, path: &str) -> Option<(String, String)> {
    http(addr, "GET", path, None)
}

/// A request over plain HTTP/1.1 (with a bearer token): the response head (lower-cased) and
/// body.
fn http(addr: &str, method: &str, path: &str, token: Option<&str>) -> Option<(String, String)> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((head.to_lowercase(), body.to_string()))
}

fn get_json(addr: &str, path: &str) -> serde_json::Value {
    let (head, body) = http_get(addr, path).unwrap_or_else(|| panic!("no answer on {path}"));
    assert!(head.starts_with("http/1.1 200"), "{path}: {head}\n{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {body}"))
}

/// The address a pgtide child's dashboard listens on (it is started on port 0, so that no
/// other process can take a port picked beforehand), read from its log.
async fn dashboard_addr(child: &mut PgtideChild) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = child.output_so_far();
        if let Some(rest) = log.split("on http://").nth(1)
            && let Some(addr) = rest.split('/').next()
        {
            return addr.to_string();
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            child.kill().ok();
            panic!(
                "no dashboard address in the log:\n{}",
                child.output_so_far()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the history holds `n` points recorded after `after` (unix seconds).
async fn wait_for_points(
    addr: &str,
    after: f64,
    n: usize,
    child: &mut PgtideChild,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some((head, body)) = http_get(addr, "/api/history?since=0")
            && head.starts_with("http/1.1 200")
        {
            let history: serde_json::Value = serde_json::from_str(&body).unwrap();
            let recent = history["points"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["at"].as_f64().unwrap() > after)
                .count();
            if recent >= n {
                return history;
            }
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            child.kill().ok();
            panic!(
                "the history never got {n} points:\n{}",
                child.output_so_far()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The page as headless Chromium renders it (scripts run, the API fetched), and a
/// screenshot of it at `screenshot`.
fn browse(addr: &str, screenshot: &std::path::Path) -> String {
    let chromium = std::env::var("PGTIDE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "Chromium is not installed at {chromium}: run the tests through scripts/test.sh, which installs it"
    );
    let url = format!("http://{addr}/");
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=10000",
        "--window-size=1280,1000",
    ];
    let dom = std::process::Command::new(&chromium)
        .args(common)
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .expect("cannot run chromium");
    assert!(dom.status.success(), "chromium failed: {}", text(&dom));
    let shot = std::process::Command::new(&chromium)
        .args(common)
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(&url)
        .output()
        .expect("cannot run chromium");
    assert!(shot.status.success(), "chromium failed: {}", text(&shot));
    String::from_utf8_lossy(&dom.stdout).into_owned()
}

/// The rendered page shows the phase, the verdict and a lag chart with at least two points.
fn assert_page_shows(dom: &str, phase: &str, verdict: &str) {
    assert!(
        dom.contains(&format!(r#"<span id="phase">{phase}</span>"#)),
        "{dom}"
    );
    assert!(
        dom.contains(r#"<div id="verdict" class="ready">"#) && dom.contains(verdict),
        "{dom}"
    );
    let points = dom
        .split(r#"id="lag-seconds""#)
        .nth(1)
        .and_then(|rest| rest.split(r#"points=""#).nth(1))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default();
    assert!(
        points.split_whitespace().count() >= 2,
        "the lag chart has no line: points=\"{points}\"\n{dom}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_and_its_api_show_a_follow_and_keep_its_history_across_a_restart() {
    let (src, dst) = fresh_db_pair("t_dashboard").await;
    exec(
        &src,
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 2000) g;",
    )
    .await;
    let dir = workdir("dashboard");
    let d = dir.to_str().unwrap();
    let mut args = clone_follow_args(&src, &dst, d, "t_dashboard_slot");
    args.extend(["--http-addr", "127.0.0.1:0"]);
    let mut child = spawn_pgtide(&args, &[]);
    let addr = dashboard_addr(&mut child).await;
    wait_for_status(&["--dir", d], 120, &mut child, |json| {
        says_ready(json, "/verdict")
    })
    .await;
    for i in 0..10 {
        exec(
            &src,
            &format!("INSERT INTO t VALUES ({}, 'live')", 10_000 + i),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for_points(&addr, 0.0, 3, &mut child).await;

    // The API: the status --json object, read-only, no secret, with its headers.
    let (head, body) = http_get(&addr, "/api/status").unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    for header in [
        "x-content-type-options: nosniff",
        "x-frame-options: deny",
        "content-security-policy:",
        "cache-control: no-store",
    ] {
        assert!(head.contains(header), "{header} missing: {head}");
    }
    assert!(
        !body.contains(&password()),
        "the status serves the password"
    );
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["phase"], "following", "{status}");
    assert!(
        status["verdict"]
            .as_str()
            .unwrap()
            .starts_with("ready to cut over"),
        "{status}"
    );
    assert_eq!(status["slot"], "t_dashboard_slot");
    let history = get_json(&addr, "/api/history?since=-3600");
    let point = &history["points"][0];
    for key in [
        "at",
        "phase",
        "lag_bytes",
        "lag_seconds",
        "spool_bytes",
        "bytes_copied",
        "bytes_total",
    ] {
        assert!(point.get(key).is_some(), "{key} missing from {point}");
    }
    let (_, metrics) = http_get(&addr, "/metrics").unwrap();
    assert!(metrics.contains("pgtide_"), "{metrics}");
    // Without a token the API is read-only.
    let (head, body) = http(&addr, "POST", "/api/verify", None).unwrap();
    assert!(
        head.starts_with("http/1.1 403") && body.contains("--http-token"),
        "{head}\n{body}"
    );

    let shots = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dom = browse(&addr, &shots.join("dashboard.png"));
    assert_page_shows(&dom, "following", "ready to cut over");
    assert!(
        std::fs::metadata(shots.join("dashboard.png"))
            .unwrap()
            .len()
            > 10_000
    );

    // A restart: the history recorded before it is still served, new points are added.
    child.kill().unwrap();
    child.wait().unwrap();
    let restarted = pgtide_now();
    let token = "a-token-of-the-test-0123456789";
    let mut follow = spawn_pgtide(
        &[
            "follow",
            "--source",
            &src,
            "--target",
            &dst,
            "--dir",
            d,
            "--http-addr",
            "127.0.0.1:0",
            "--http-token",
            token,
        ],
        &[],
    );
    let addr = dashboard_addr(&mut follow).await;
    let history = wait_for_points(&addr, restarted, 2, &mut follow).await;
    let before = history["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["at"].as_f64().unwrap() < restarted)
        .count();
    assert!(
        before >= 3,
        "the history before the restart is gone: {history}"
    );
    // Caught up again before the page is read (a slow restart may still be catching up).
    wait_for_status(&["--dir", d], 120, &mut follow, |json| {
        says_ready(json, "/verdict")
    })
    .await;
    let dom = browse(&addr, &shots.join("dashboard-restarted.png"));
    assert_page_shows(&dom, "following", "ready to cut over");
    // The same history in the terminal.
    let trend = pgtide_ok(&["status", "--dir", d, "--since", "1h"]);
    assert!(
        trend.contains("trend over 1h (") && trend.contains("lag at most"),
        "{trend}"
    );
    let trend: serde_json::Value = serde_json::from_str(&pgtide_ok_stdout(&[
        "status", "--dir", d, "--since", "1h", "--json",
    ]))
    .unwrap();
    assert!(trend["history"].as_array().unwrap().len() >= 5, "{trend}");

    // With the token: the actions run the CLI's code, and the cutover ends the follow.
    let (head, _) = http(
        &addr,
        "POST",
        "/api/verify",
        Some("not-the-token-0123456789"),
    )
    .unwrap();
    assert!(head.starts_with("http/1.1 401"), "{head}");
    let (head, body) = http(&addr, "POST", "/api/verify", Some(token)).unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}\n{body}");
    let verified: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(verified["all_match"], true, "{verified}");
    exec(
        &src,
        "INSERT INTO t VALUES (20000, 'just before the cutover')",
    )
    .await;
    let (head, body) = http(&addr, "POST", "/api/cutover", Some(token)).unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}\n{body}");
    let cut: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        cut["verdict"]
            .as_str()
            .unwrap()
            .contains("tables identical"),
        "{cut}"
    );
    let out = wait_exit(follow, 60);
    assert!(out.status.success(), "{}", text(&out));
    let log = text(&out);
    assert!(
        log.contains("dashboard: Cutover asked over HTTP") && !log.contains(token),
        "{log}"
    );
    assert_identical(&src, &dst);

    // `pgtide serve`: the same for the stopped run.
    let mut serve = spawn_pgtide(
        &[
            "serve",
            "--dir",
            d,
            "--http-addr",
            "127.0.0.1:0",
            "--source",
            &src,
            "--target",
            &dst,
        ],
        &[],
    );
    let serve_addr = dashboard_addr(&mut serve).await;
    let served = get_json(&serve_addr, "/api/history?since=0");
    assert!(served["points"].as_array().unwrap().len() >= 5, "{served}");
    serve.kill().unwrap();
    serve.wait().unwrap();
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}

fn pgtide_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Two databases in one run (`clone --follow --all-databases --http-addr`): the API has a
/// status per database and the total, a history per database; the page shows the total's
/// verdict, a line per database and the chart of the largest lag. Private servers: an
/// all-databases run on the shared clusters would take every other test's databases along.
#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_of_a_whole_server_shows_every_database() {
    let conf = "wal_level = logical\nmax_replication_slots = 12\nmax_wal_senders = 20\n";
    let source = PrivateServer::start_with("dashboard-server-source", conf);
    let target = PrivateServer::start_with("dashboard-server-target", "");
    for db in ["alpha", "beta"] {
        exec(&source.uri, &format!("CREATE DATABASE {db}")).await;
        exec(
            &source.db_uri(db),
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 1000) g;",
        )
        .await;
    }
    let dir = workdir("dashboard-server");
    let d = dir.to_str().unwrap();
    let mut child = spawn_pgtide(
        &[
            "clone",
            "--follow",
            "--all-databases",
            "--exclude-database",
            "postgres",
            "--source",
            &source.uri,
            "--target",
            &target.uri,
            "--dir",
            d,
            "--http-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    let addr = dashboard_addr(&mut child).await;
    wait_for_status(&["--dir", d], 120, &mut child, |json| {
        says_ready(json, "/total/verdict")
    })
    .await;
    // Two points for each database.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        // A transient error (a state.db being written) is retried like an empty answer.
        let history: serde_json::Value = http_get(&addr, "/api/history?since=0")
            .and_then(|(_, body)| serde_json::from_str(&body).ok())
            .unwrap_or_default();
        let databases = history["databases"].as_array().cloned().unwrap_or_default();
        if databases.len() == 2
            && databases
                .iter()
                .all(|db| db["points"].as_array().is_some_and(|p| p.len() >= 2))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no history per database: {history}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status = get_json(&addr, "/api/status");
    let names: Vec<&str> = status["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|db| db["database"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{status}");
    assert!(
        names.contains(&"alpha") && names.contains(&"beta"),
        "{status}"
    );
    assert!(
        status["total"]["verdict"]
            .as_str()
            .unwrap()
            .starts_with("ready to cut over"),
        "{status}"
    );
    let shots = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dom = browse(&addr, &shots.join("dashboard-server.png"));
    assert_page_shows(&dom, "following", "ready to cut over");
    assert!(
        dom.contains("<td>alpha</td>")
            && dom.contains("<td>beta</td>")
            && dom.contains("2 databases"),
        "{dom}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    pgtide_ok(&[
        "cleanup",
        "--source",
        &source.uri,
        "--target",
        &target.uri,
        "--dir",
        d,
    ]);
}
