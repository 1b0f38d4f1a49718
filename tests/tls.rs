//! TLS: the source cluster serves a certificate for "localhost" signed by a throwaway CA and
//! refuses non-TLS TCP connections to the database `tls_only` (scripts/clusters.sh).

mod common;

use common::*;

fn ca() -> String {
    std::env::var("PGTIDE_TEST_CA").expect("PGTIDE_TEST_CA is not set: run scripts/test.sh")
}

fn source_port() -> String {
    std::env::var("PGTIDE_SOURCE_PORT").expect("PGTIDE_SOURCE_PORT is not set: run scripts/test.sh")
}

/// The source's tls_only database as `host`, with a query string.
fn tls_uri(host: &str, query: &str) -> String {
    format!(
        "postgres://postgres:{}@{host}:{}/tls_only?{query}",
        password(),
        source_port()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sslmodes_against_a_tls_only_source() {
    // Set up the database over the Unix socket (trust), which the hostnossl rule does not cover.
    let admin = connect(&admin_uri("source")).await;
    admin
        .batch_execute("DROP DATABASE IF EXISTS tls_only WITH (FORCE)")
        .await
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE tls_only")
        .await
        .unwrap();
    let socket_dir = std::env::var("PGTIDE_CLUSTERS_DIR")
        .expect("PGTIDE_CLUSTERS_DIR is not set: run scripts/test.sh");
    let local = format!(
        "host={socket_dir} port={} user=postgres dbname=tls_only",
        source_port()
    );
    let (client, conn) = tokio_postgres::connect(&local, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute("CREATE TABLE a (id int PRIMARY KEY, v text); INSERT INTO a SELECT g, md5(g::text) FROM generate_series(1, 500) g;")
        .await
        .unwrap();
    let target_admin = connect(&admin_uri("target")).await;
    target_admin
        .batch_execute("DROP DATABASE IF EXISTS tls_only WITH (FORCE)")
        .await
        .unwrap();
    target_admin
        .batch_execute("CREATE DATABASE tls_only")
        .await
        .unwrap();
    let dst = db_uri("target", "tls_only");

    // verify-full with the right CA and host name: the whole clone (pg_dump included) works.
    let full = tls_uri(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", ca()),
    );
    let dir = workdir("tls");
    pgtide_ok(&Args::clone(&full, &dst, dir.to_str().unwrap()));
    pgtide_ok(&Args::verify(&full, &dst));

    // verify-full against an address the certificate does not name is refused.
    let wrong_name = tls_uri(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", ca()),
    );
    let out = pgtide_fails(&Args::verify(&wrong_name, &dst));
    assert!(
        out.contains("TLS failed") || out.contains("certificate"),
        "{out}"
    );
    assert!(!out.contains(&password()), "{out}");

    // verify-ca checks the chain only, so the same address is accepted.
    let ca_only = tls_uri(
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={}", ca()),
    );
    pgtide_ok(&Args::verify(&ca_only, &dst));

    // require encrypts without verifying; disable is refused by the server's hostnossl rule.
    pgtide_ok(&Args::verify(
        &tls_uri("127.0.0.1", "sslmode=require"),
        &dst,
    ));
    let out = pgtide_fails(&Args::verify(
        &tls_uri("127.0.0.1", "sslmode=disable"),
        &dst,
    ));
    assert!(
        out.contains("no encryption") || out.contains("pg_hba.conf"),
        "{out}"
    );

    // verify-full with a CA that did not sign the server certificate is refused.
    let other_ca = dir.join("other-ca.crt");
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=other CA",
            "-keyout",
        ])
        .arg(dir.join("other-ca.key"))
        .arg("-out")
        .arg(&other_ca)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let untrusted = tls_uri(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", other_ca.display()),
    );
    let out = pgtide_fails(&Args::verify(&untrusted, &dst));
    assert!(
        out.contains("TLS failed") || out.contains("certificate"),
        "{out}"
    );

    // verify-ca without any root certificate says how to give one.
    let out = pgtide_fails(&Args::verify(
        &tls_uri("localhost", "sslmode=verify-ca"),
        &dst,
    ));
    assert!(
        out.contains("needs a root certificate") && out.contains("sslrootcert"),
        "{out}"
    );
}

/// clone --follow from a source the role can only reach over TLS with a client certificate
/// (pg_hba `hostssl … cert`), verify-full: the normal connections, the replication connection
/// and pg_dump all use it. The same with a host name the certificate does not name is refused
/// before anything is created.
#[tokio::test(flavor = "multi_thread")]
async fn clone_follow_over_tls_with_a_client_certificate() {
    let (src, dst) = fresh_db_pair("t_tls_follow").await;
    exec(
        &admin_uri("source"),
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgtide_cert') THEN
             CREATE ROLE pgtide_cert LOGIN SUPERUSER REPLICATION;
           END IF;
         END $$;",
    )
    .await;
    exec(
        &src,
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'copied');",
    )
    .await;
    let cert = std::env::var("PGTIDE_TEST_CLIENT_CERT")
        .expect("PGTIDE_TEST_CLIENT_CERT: run scripts/test.sh");
    let key = std::env::var("PGTIDE_TEST_CLIENT_KEY")
        .expect("PGTIDE_TEST_CLIENT_KEY: run scripts/test.sh");
    let cert_source = |host: &str| {
        format!(
            "postgres://pgtide_cert@{host}:{}/t_tls_follow?sslmode=verify-full&sslrootcert={}&sslcert={cert}&sslkey={key}",
            source_port(),
            ca()
        )
    };
    let dir = workdir("tls-follow");
    let d = dir.to_str().unwrap();
    let wrong = cert_source("127.0.0.1");
    let out = pgtide_fails(&Args::clone_follow(&wrong, &dst, d, "t_tls_slot"));
    assert!(
        out.contains("127.0.0.1") && out.to_lowercase().contains("certificate"),
        "{out}"
    );
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 't_tls_slot'"
        )
        .await,
        0
    );

    let source = cert_source("localhost");
    let child = spawn_pgtide(&Args::clone_follow(&source, &dst, d, "t_tls_slot"), &[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // The walsender serving pgtide runs over TLS.
    while scalar_i64(
        &admin_uri("source"),
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.usename = 'pgtide_cert' AND a.backend_type = 'walsender' AND s.ssl",
    )
    .await
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no TLS walsender for pgtide"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    exec(&src, "INSERT INTO t SELECT g, 'streamed' FROM generate_series(2, 50) g; UPDATE t SET v = 'updated' WHERE id = 1;").await;
    set_endpos_now(d, &source);
    let out = wait_exit(child, 120);
    assert!(out.status.success(), "{}", text(&out));
    assert_identical(&src, &dst);
    // pgtide's publication stays on the source: the target never gets a copy of it.
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM pg_publication").await,
        0
    );
    pgtide_ok(&Args::cleanup(&source, &dst, d));
}
