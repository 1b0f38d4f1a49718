//! The cutover fence's holes (issue 16, item 3), on servers of the test's own (the shared
//! clusters run with max_prepared_transactions = 0): a prepared transaction belongs to no
//! session, survives the fence and could commit after endpos, so cutover stops naming it, with
//! the fix, and lifts the fence; once it is finished, cutover migrates its change too.

mod common;

use common::*;
use pgtide::failpoints::CUTOVER_AFTER_ENDPOS;
use tokio_postgres::error::SqlState;

const SOURCE_CONF: &str = "wal_level = logical\nmax_replication_slots = 8\nmax_wal_senders = 8\nmax_prepared_transactions = 4\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_prepared_transaction_stops_cutover_until_it_is_finished() {
    let AppServers {
        source: _source,
        target: _target,
        src,
        dst,
    } = app_servers("fence", SOURCE_CONF, "", "").await;
    exec(
        &src,
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 500) g;
         GRANT ALL ON t TO app_writer;",
    )
    .await;
    let dir = workdir("cutover-fence");
    let d = dir.to_str().unwrap();
    let child = clone_follow_until_ready(&src, &dst, d, "fence_slot").await;

    exec(
        &src,
        "BEGIN; INSERT INTO t VALUES (1000, 'prepared'); PREPARE TRANSACTION 'pgtide_test_gid'",
    )
    .await;
    let cutover = [
        "cutover", "--source", &src, "--target", &dst, "--dir", d, "--fence",
    ];
    let out = pgtide_fails(&cutover);
    assert!(
        out.contains("'pgtide_test_gid' (prepared")
            && out.contains("COMMIT PREPARED 'gid' or ROLLBACK PREPARED 'gid'")
            && out.contains("The fence is lifted"),
        "{out}"
    );
    // Lifted: the application role can write on the source again.
    let writer = connect(&format!(
        "postgres://app_writer:writer-secret@{}",
        src.split_once('@').unwrap().1
    ))
    .await;
    writer
        .batch_execute("INSERT INTO t VALUES (1001, 'after the refusal')")
        .await
        .unwrap();
    drop(writer);

    exec(&src, "COMMIT PREPARED 'pgtide_test_gid'").await;
    let out = pgtide_ok(&cutover);
    assert!(out.contains("cutover complete"), "{out}");
    let out = wait_exit(child, 120);
    assert!(out.status.success(), "{}", text(&out));
    assert_identical(&src, &dst);
    assert_eq!(
        scalar_string(
            &dst,
            "SELECT string_agg(v, ', ' ORDER BY id) FROM t WHERE id >= 1000"
        )
        .await,
        "prepared, after the refusal"
    );
    pgtide_ok(&Args::cutover(&src, &dst, d).arg("--unfence"));
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}

/// The other holes: an application logged in as pgtide's own role is ended and cannot write
/// again; a superuser (never fenced by default, and named in the output) who writes after the
/// fence is caught by the leak check, which keeps the fence; run again, cutover migrates that
/// write too and completes.
#[tokio::test(flavor = "multi_thread")]
async fn the_fence_holds_pgtides_own_role_and_reports_a_superuser_write_after_it() {
    let AppServers {
        source: _source,
        target: _target,
        src,
        dst,
    } = app_servers(
        "leak",
        SOURCE_CONF,
        "",
        "CREATE ROLE dba SUPERUSER LOGIN PASSWORD 'dba-secret';",
    )
    .await;
    exec(
        &src,
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 500) g;
         GRANT ALL ON t TO app_writer;",
    )
    .await;
    let dir = workdir("cutover-leak");
    let d = dir.to_str().unwrap();
    let child = clone_follow_until_ready(&src, &dst, d, "leak_slot").await;

    // An application logged in as the role pgtide uses, writing until it is stopped.
    let same_role = connect(&src).await;
    let writer = tokio::spawn(async move {
        let mut id = 10_000;
        loop {
            id += 1;
            if let Err(e) = same_role
                .batch_execute(&format!("INSERT INTO t VALUES ({id}, 'same role')"))
                .await
            {
                return e;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });
    // A superuser with a write in flight, committed once endpos is pinned.
    let dba_uri = format!(
        "postgres://dba:dba-secret@{}",
        src.split_once('@').unwrap().1
    );
    let dba = connect(&dba_uri).await;
    dba.batch_execute("BEGIN; INSERT INTO t VALUES (9000, 'superuser after the fence')")
        .await
        .unwrap();
    let cutover = Args::cutover(&src, &dst, d).args(&["--fence", "--timeout", "60s"]);
    let failpoint = format!("{CUTOVER_AFTER_ENDPOS}=sleep(6000)");
    let leaking = spawn_pgtide(&cutover, &[("FAILPOINTS", failpoint.as_str())]);
    wait_for_endpos(d, 60).await;
    // The running follow reads endpos every half second: once it has, the write is past the
    // end it applies (one taken before would be reported too, without its table's name).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    dba.batch_execute("COMMIT").await.unwrap();
    let out = wait_exit(leaking, 120);
    let all = text(&out);
    assert!(!out.status.success(), "the leak went unnoticed:\n{all}");
    assert!(
        all.contains("the fence leaked: 1 change(s) in 1 transaction(s) committed after endpos")
            && all.contains(r#"on "public"."t" on the source"#)
            && all.contains("The fence is kept")
            && all.contains("dba can still write"),
        "{all}"
    );
    let error = writer.await.unwrap();
    assert!(
        error.code() == Some(&SqlState::ADMIN_SHUTDOWN) || error.is_closed(),
        "the same-role session was not ended: {error:?}"
    );
    // Kept: neither a new session of pgtide's role nor the application can write.
    for uri in [
        src.clone(),
        format!(
            "postgres://app_writer:writer-secret@{}",
            src.split_once('@').unwrap().1
        ),
    ] {
        let refused = connect(&uri)
            .await
            .batch_execute("INSERT INTO t VALUES (9999, 'through the fence')")
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
            "{refused:?}"
        );
    }
    // Run again (the follow stopped at the first endpos): the leaked write is migrated.
    let out = pgtide_ok(&cutover);
    assert!(out.contains("cutover complete"), "{out}");
    let out = wait_exit(child, 60);
    assert!(out.status.success(), "{}", text(&out));
    assert_identical(&src, &dst);
    assert_eq!(
        scalar_string(&dst, "SELECT v FROM t WHERE id = 9000").await,
        "superuser after the fence"
    );
    pgtide_ok(&Args::cutover(&src, &dst, d).arg("--unfence"));
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}

/// PgBouncer in front of the source, run as the postgres OS user (it refuses root); killed
/// when dropped.
struct Pooler {
    child: std::process::Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl Pooler {
    /// Pools database `app` of the server at `port`, in transaction mode.
    fn start(name: &str, server_port: u16) -> Self {
        let bin =
            std::env::var("PGTIDE_PGBOUNCER_BIN").unwrap_or_else(|_| "/usr/sbin/pgbouncer".into());
        assert!(
            std::path::Path::new(&bin).exists(),
            "pgbouncer is not installed at {bin}: run the tests through scripts/test.sh, which installs it"
        );
        let dir =
            std::env::temp_dir().join(format!("pgtide-pgbouncer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        std::fs::write(
            dir.join("users.txt"),
            format!(
                "\"postgres\" \"{}\"\n\"app_writer\" \"writer-secret\"\n",
                password()
            ),
        )
        .unwrap();
        write_ini(&dir, port, server_port);
        std::process::Command::new("chown")
            .args(["-R", "postgres:", dir.to_str().unwrap()])
            .status()
            .unwrap();
        let child = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", &bin])
            .arg(dir.join("pgbouncer.ini"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Listening once the port answers.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "pgbouncer did not start: see {}",
                dir.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Pooler { child, dir, port }
    }

    /// Rewrites pgbouncer.ini with database `app` on the server at `server_port` (read at
    /// start and at RELOAD).
    fn point_at(&self, server_port: u16) {
        write_ini(&self.dir, self.port, server_port);
    }

    fn uri(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
    }
}

fn write_ini(dir: &std::path::Path, port: u16, server_port: u16) {
    {
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\napp = host=127.0.0.1 port={server_port} dbname=app\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {}\nadmin_users = postgres\npool_mode = transaction\n\
                 logfile = {}\n",
                port,
                dir.join("users.txt").display(),
                dir.join("pgbouncer.log").display()
            ),
        )
        .unwrap();
    }
}

impl Drop for Pooler {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill")
            .args(["-f", &self.dir.join("pgbouncer.ini").display().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn port_of(uri: &str) -> u16 {
    uri.rsplit_once(':')
        .unwrap()
        .1
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// `--pgbouncer … --pgbouncer-reload`: the application, writing through PgBouncer, never sees
/// an error across the switch: its queries wait while the pooler is paused, and run on the
/// target after the RELOAD of a pgbouncer.ini already pointing there. Every write it was told
/// committed is on the target.
#[tokio::test(flavor = "multi_thread")]
async fn the_application_waits_in_pgbouncer_across_the_switch() {
    let AppServers {
        source: _source,
        target: _target,
        src,
        dst,
    } = app_servers("pooler", SOURCE_CONF, "", "").await;
    exec(
        &src,
        "CREATE TABLE t (id bigserial PRIMARY KEY, v text);
         INSERT INTO t (v) SELECT 'seed' FROM generate_series(1, 500);
         GRANT ALL ON t, t_id_seq TO app_writer;",
    )
    .await;
    let pooler = Pooler::start("switch", port_of(&src));
    let dir = workdir("cutover-pooler");
    let d = dir.to_str().unwrap();
    let child = clone_follow_until_ready(&src, &dst, d, "pooler_slot").await;
    let app_uri = pooler.uri("app_writer", "app");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let app = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let app = connect(&app_uri).await;
            let mut committed = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Err(e) = app.batch_execute("INSERT INTO t (v) VALUES ('app')").await {
                    return Err((committed, e));
                }
                committed += 1;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Ok(committed)
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    // The new configuration waits in the file until pgtide's RELOAD.
    pooler.point_at(port_of(&dst));
    let admin = pooler.uri("postgres", "pgbouncer");
    let cutover = Args::cutover(&src, &dst, d).args(&[
        "--fence",
        "--timeout",
        "60s",
        "--pgbouncer",
        &admin,
        "--pgbouncer-reload",
    ]);
    // SIGKILLed with the pooler paused and the source fenced: the application waits in the
    // pooler; the rerun finds the pooler paused already and finishes the switch.
    kill_after_endpos(&cutover, d).await;
    let out = pgtide_ok(&cutover);
    assert!(out.contains("cutover complete"), "{out}");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let committed = match app.await.unwrap() {
        Ok(committed) => committed,
        Err((committed, e)) => {
            panic!("the application saw an error after {committed} writes: {e:?}\n{out}")
        }
    };
    let out = wait_exit(child, 60);
    assert!(out.status.success(), "{}", text(&out));
    let on_target = scalar_i64(&dst, "SELECT count(*) FROM t WHERE v = 'app'").await;
    let on_source = scalar_i64(&src, "SELECT count(*) FROM t WHERE v = 'app'").await;
    assert_eq!(
        on_target, committed,
        "every acknowledged write is on the target"
    );
    assert!(
        on_source > 0 && on_source < committed,
        "the writes did not move from the source ({on_source}) to the target ({committed})"
    );
    pgtide_ok(&Args::cutover(&src, &dst, d).arg("--unfence"));
    pgtide_ok(&Args::cleanup(&src, &dst, d));
}
