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
    pgtide_ok(&[
        "clone",
        "--source",
        &full,
        "--target",
        &dst,
        "--dir",
        dir.to_str().unwrap(),
    ]);
    pgtide_ok(&["verify", "--source", &full, "--target", &dst]);

    // verify-full against an address the certificate does not name is refused.
    let wrong_name = tls_uri(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", ca()),
    );
    let out = pgtide_fails(&["verify", "--source", &wrong_name, "--target", &dst]);
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
    pgtide_ok(&["verify", "--source", &ca_only, "--target", &dst]);

    // require encrypts without verifying; disable is refused by the server's hostnossl rule.
    pgtide_ok(&[
        "verify",
        "--source",
        &tls_uri("127.0.0.1", "sslmode=require"),
        "--target",
        &dst,
    ]);
    let out = pgtide_fails(&[
        "verify",
        "--source",
        &tls_uri("127.0.0.1", "sslmode=disable"),
        "--target",
        &dst,
    ]);
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
    let out = pgtide_fails(&["verify", "--source", &untrusted, "--target", &dst]);
    assert!(
        out.contains("TLS failed") || out.contains("certificate"),
        "{out}"
    );

    // verify-ca without any root certificate says how to give one.
    let out = pgtide_fails(&[
        "verify",
        "--source",
        &tls_uri("localhost", "sslmode=verify-ca"),
        "--target",
        &dst,
    ]);
    assert!(
        out.contains("needs a root certificate") && out.contains("sslrootcert"),
        "{out}"
    );
}
