//! The PostgreSQL servers of the tests: the clusters scripts/test.sh starts (URIs, fresh
//! databases, SQL one-liners) and servers of a test's own.

use std::path::PathBuf;
use std::process::Command;

use tokio_postgres::{Client, NoTls};

/// The admin URI of a cluster; a missing variable fails the test (never a silent pass).
pub fn admin_uri(which: &str) -> String {
    let var = format!("PGTIDE_TEST_{}", which.to_uppercase());
    std::env::var(&var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests with scripts/test.sh, which starts the PostgreSQL clusters")
    })
}

pub fn password() -> String {
    std::env::var("PGTIDE_TEST_PASSWORD")
        .expect("PGTIDE_TEST_PASSWORD is not set: run scripts/test.sh")
}

/// The URI of database `db` on the source or target cluster.
pub fn db_uri(which: &str, db: &str) -> String {
    let admin = admin_uri(which);
    let base = admin.rsplit_once('/').map(|x| x.0).unwrap_or(&admin);
    format!("{base}/{db}")
}

pub async fn connect(uri: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(uri, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect for the test: {e}"));
    tokio::spawn(conn);
    client
}

/// Creates (or re-creates) database `name` on both clusters; returns (source URI, target URI).
pub async fn fresh_db_pair(name: &str) -> (String, String) {
    fresh_db_pair_between(&admin_uri("source"), &admin_uri("target"), name).await
}

/// The admin URI of the test cluster of PostgreSQL `major` that scripts/test.sh starts
/// (`PGTIDE_TEST_MAJORS`); a missing one fails the test.
pub fn version_uri(major: u32) -> String {
    let var = format!("PGTIDE_TEST_PG{major}");
    std::env::var(&var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests with scripts/test.sh, which starts a PostgreSQL {major} cluster (PGTIDE_TEST_MAJORS)")
    })
}

/// The directory of the test cluster of PostgreSQL `major`'s server binaries.
pub fn version_bin(major: u32) -> PathBuf {
    let var = format!("PGTIDE_PG{major}_BIN");
    PathBuf::from(
        std::env::var(&var).unwrap_or_else(|_| panic!("{var} is not set: run scripts/test.sh")),
    )
}

/// The client tools 18 (pg_dump, pg_restore, psql) that scripts/install-pg.sh installs.
pub fn client18_bin() -> PathBuf {
    PathBuf::from(std::env::var("PGTIDE_TEST_CLIENT18_BIN").expect(
        "PGTIDE_TEST_CLIENT18_BIN is not set: run scripts/test.sh, which installs the client tools 18",
    ))
}

/// Replaces database `name` on the cluster at `admin` URI with an empty one (every server
/// version: no `DROP DATABASE … WITH (FORCE)` before 13), after dropping the slots and
/// origins a previous run of the test left; returns the database's URI.
pub async fn fresh_db(admin_uri: &str, name: &str) -> String {
    let admin = connect(admin_uri).await;
    // Slots pin a database: drop those a previous run of this test left.
    admin
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = $1 AND active",
            &[&name],
        )
        .await
        .unwrap();
    for _ in 0..50 {
        let active: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE database = $1 AND active",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        if active == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    admin
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1",
            &[&name],
        )
        .await
        .unwrap();
    // Replication origins are per cluster: drop the ones a previous run of this test left
    // (the tests name their slots after their database).
    admin
        .execute(
            "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname LIKE 'pgtide\\_' || $1 || '%'",
            &[&name],
        )
        .await
        .unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&name],
        )
        .await
        .unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let base = admin_uri.rsplit_once('/').map(|x| x.0).unwrap_or(admin_uri);
    format!("{base}/{name}")
}

/// Fresh databases `name` on the source cluster and the target cluster (`name_target` when
/// both are one cluster, as in a same-major version cell); returns (source URI, target URI).
pub async fn fresh_db_pair_between(
    source_admin: &str,
    target_admin: &str,
    name: &str,
) -> (String, String) {
    let source = fresh_db(source_admin, name).await;
    let target_name = if source_admin == target_admin {
        format!("{name}_target")
    } else {
        name.to_string()
    };
    let target = fresh_db(target_admin, &target_name).await;
    (source, target)
}

pub async fn exec(uri: &str, sql: &str) {
    connect(uri)
        .await
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("SQL failed: {e:?}\n{sql}"));
}

pub async fn scalar_i64(uri: &str, sql: &str) -> i64 {
    connect(uri).await.query_one(sql, &[]).await.unwrap().get(0)
}

pub async fn scalar_string(uri: &str, sql: &str) -> String {
    connect(uri).await.query_one(sql, &[]).await.unwrap().get(0)
}

/// The source's current WAL position, as text.
pub async fn current_lsn(uri: &str) -> String {
    // The insert position: with synchronous_commit = off (test clusters) the write position
    // can lag behind a commit that already returned.
    scalar_string(uri, "SELECT pg_current_wal_insert_lsn()::text").await
}

/// The target server's settings as new sessions get them, and its postgresql.auto.conf.
pub async fn server_settings(uri: &str) -> String {
    scalar_string(
        uri,
        "SELECT (SELECT string_agg(name || '=' || setting || '@' || source, ', ' ORDER BY name)
                 FROM pg_settings WHERE source NOT IN ('client', 'session'))
             || ' | auto.conf: ' ||
             coalesce((SELECT string_agg(name || '=' || setting, ', ' ORDER BY name)
                       FROM pg_file_settings WHERE sourcefile LIKE '%postgresql.auto.conf'), '')",
    )
    .await
}

/// The entries of two `server_settings` strings that differ.
pub fn differences(a: &str, b: &str) -> String {
    let set = |s: &str| {
        s.split(", ")
            .map(str::to_string)
            .collect::<std::collections::BTreeSet<_>>()
    };
    let (a, b) = (set(a), set(b));
    format!(
        "only before: {:?}; only after: {:?}",
        a.difference(&b).collect::<Vec<_>>(),
        b.difference(&a).collect::<Vec<_>>()
    )
}

/// Whether `uri` (with its user and password) can log in and run a query.
pub async fn can_log_in(uri: &str) -> bool {
    match tokio_postgres::connect(uri, NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            client.simple_query("SELECT 1").await.is_ok()
        }
        Err(_) => false,
    }
}

/// A PostgreSQL server of the test's own (the shared clusters must never be restarted under
/// the other tests): initdb as the postgres OS user in a temp dir, password auth on TCP.
pub struct PrivateServer {
    dir: PathBuf,
    bin: PathBuf,
    pub uri: String,
}

impl PrivateServer {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, "")
    }

    /// Starts a server with extra postgresql.conf lines.
    pub fn start_with(name: &str, extra_conf: &str) -> Self {
        let bin = PathBuf::from(
            std::env::var("PGTIDE_PG_BIN")
                .expect("PGTIDE_PG_BIN is not set: run the tests through scripts/test.sh"),
        );
        let dir =
            std::env::temp_dir().join(format!("pgtide-private-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, format!("{}\n", password())).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let as_postgres = |args: &[&str]| {
            let status = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .args(args)
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "{args:?} failed");
        };
        Command::new("chown")
            .args(["-R", "postgres:", dir.to_str().unwrap()])
            .status()
            .unwrap();
        let data = dir.join("data");
        as_postgres(&[
            bin.join("initdb").to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "-A",
            "scram-sha-256",
            &format!("--pwfile={}", pwfile.display()),
        ]);
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\nmax_replication_slots = 4\n",
            dir.display()
        );
        let mut existing = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        existing.push_str(&conf);
        existing.push_str(extra_conf);
        std::fs::write(data.join("postgresql.conf"), existing).unwrap();
        let server = PrivateServer {
            uri: format!(
                "postgres://postgres:{}@127.0.0.1:{port}/postgres",
                password()
            ),
            bin,
            dir,
        };
        server.pg_ctl(&["start"]);
        server
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.join("data");
        let log = self.dir.join("server.log");
        let status = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args([
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
            ])
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl {args:?} failed");
    }

    /// pg_ctl restart (fast shutdown: sessions are ended, as in a real restart).
    pub fn restart(&self) {
        self.pg_ctl(&["restart", "-m", "fast"]);
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args([
                "-D",
                self.dir.join("data").to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl PrivateServer {
    /// The URI of database `db` on this server, as its superuser.
    pub fn db_uri(&self, db: &str) -> String {
        let base = self.uri.rsplit_once('/').unwrap().0;
        format!("{base}/{db}")
    }
}

/// Two servers of the test's own for an application's migration: each with database `app`,
/// the role `app_writer` (password `writer-secret`) and whatever `roles` creates.
pub struct AppServers {
    pub source: PrivateServer,
    pub target: PrivateServer,
    /// Database `app` on each, as the superuser.
    pub src: String,
    pub dst: String,
}

pub async fn app_servers(
    name: &str,
    source_conf: &str,
    target_conf: &str,
    roles: &str,
) -> AppServers {
    let source = PrivateServer::start_with(&format!("{name}-source"), source_conf);
    let target = PrivateServer::start_with(&format!("{name}-target"), target_conf);
    for server in [&source, &target] {
        exec(&server.uri, "CREATE DATABASE app").await;
        exec(
            &server.uri,
            &format!("CREATE ROLE app_writer LOGIN PASSWORD 'writer-secret'; {roles}"),
        )
        .await;
    }
    let (src, dst) = (source.db_uri("app"), target.db_uri("app"));
    AppServers {
        source,
        target,
        src,
        dst,
    }
}
