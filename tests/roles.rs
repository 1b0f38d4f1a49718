//! `pgtide copy roles` (issue 15, item 1) from a PostgreSQL 16 server to a 17 one: roles log in
//! to the target with their source passwords, attributes, memberships (with 16's INHERIT and
//! SET options), settings and comments arrive, the role pgtide connects as and the bootstrap
//! superuser are left alone, a rerun changes nothing, and a source login that cannot read
//! password hashes is refused with the fix unless --no-role-passwords is given.
//! These clusters hold no other test's roles, so copying every role there is safe.

mod common;

use common::*;

/// The URI of `db` on the cluster of `admin`, as `user`.
fn uri_as(admin: &str, user: &str, password: &str, db: &str) -> String {
    let host = admin
        .split_once('@')
        .and_then(|(_, rest)| rest.rsplit_once('/'))
        .map(|(host, _)| host)
        .expect("an admin URI of the form postgres://user:password@host:port/db");
    let user = user.replace(' ', "%20");
    format!("postgres://{user}:{password}@{host}/{db}")
}

/// `pgtide copy roles` from `src` to `dst` with `extra` options; its output.
fn copy_roles(src: &str, dst: &str, extra: &[&str]) -> String {
    pgtide_ok(&[&["copy", "roles", "--source", src, "--target", dst], extra].concat())
}

const ROLES: &str = r#"t_roles_reader, t_roles_owner, t_roles_group, "t_roles Mixed", t_roles_migrator, t_roles_service_admin"#;

async fn membership_rows(uri: &str) -> i64 {
    scalar_i64(
        uri,
        "SELECT count(*) FROM pg_auth_members a JOIN pg_roles m ON m.oid = a.member
         WHERE m.rolname LIKE 't\\_roles%'",
    )
    .await
}

async fn settings_of(uri: &str, role: &str) -> String {
    scalar_string(
        uri,
        &format!(
            "SELECT coalesce(string_agg(coalesce(d.datname, '*') || ':' || s.setconfig::text, ' ' ORDER BY d.datname NULLS FIRST), '')
             FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
             LEFT JOIN pg_database d ON d.oid = s.setdatabase WHERE r.rolname = '{role}'"
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_are_copied_with_passwords_memberships_and_settings() {
    let src = version_uri(16);
    let dst = version_uri(17);
    for uri in [&src, &dst] {
        exec(uri, &format!("DROP ROLE IF EXISTS {ROLES}")).await;
    }
    exec(&src, "DROP DATABASE IF EXISTS t_roles_source_only").await;
    exec(&src, "CREATE DATABASE t_roles_source_only").await;
    exec(
        &src,
        r#"CREATE ROLE t_roles_group NOLOGIN;
           COMMENT ON ROLE t_roles_group IS 'the app''s group';
           CREATE ROLE t_roles_owner LOGIN CREATEDB CONNECTION LIMIT 7
             VALID UNTIL '2099-01-01 00:00:00+00' PASSWORD 'owner-secret';
           CREATE ROLE t_roles_reader LOGIN NOINHERIT PASSWORD 'reader-secret';
           CREATE ROLE "t_roles Mixed" LOGIN PASSWORD 'mixed-secret';
           GRANT t_roles_group TO t_roles_reader WITH ADMIN OPTION;
           GRANT pg_read_all_data TO t_roles_reader;
           GRANT t_roles_group TO "t_roles Mixed" WITH INHERIT FALSE, SET FALSE;
           ALTER ROLE t_roles_reader SET search_path = "$user", public, "My ""Schema""";
           ALTER ROLE t_roles_reader SET work_mem = '16MB';
           ALTER ROLE t_roles_owner IN DATABASE postgres SET statement_timeout = '30s';
           ALTER ROLE t_roles_owner IN DATABASE t_roles_source_only SET lock_timeout = '5s';
           CREATE ROLE t_roles_service_admin LOGIN;
           GRANT t_roles_service_admin TO t_roles_owner;
           CREATE ROLE t_roles_migrator LOGIN SUPERUSER PASSWORD 'source-side';
           GRANT t_roles_group TO t_roles_migrator;
           ALTER ROLE t_roles_migrator SET work_mem = '1MB';"#,
    )
    .await;
    // The migration role exists on the target with its own password; pgtide connects as it.
    exec(
        &dst,
        "CREATE ROLE t_roles_migrator LOGIN SUPERUSER PASSWORD 'target-side'",
    )
    .await;
    let pw = password();
    let target_as_migrator = uri_as(&dst, "t_roles_migrator", "target-side", "postgres");

    // A source login that cannot read pg_authid: refused with the fix, nothing changed.
    let reader_source = uri_as(&src, "t_roles_reader", "reader-secret", "postgres");
    let out = pgtide_fails(&[
        "copy",
        "roles",
        "--source",
        &reader_source,
        "--target",
        &target_as_migrator,
    ]);
    assert!(
        out.contains("--no-role-passwords") && out.contains("superuser"),
        "{out}"
    );
    assert!(
        !out.contains("reader-secret") && !out.contains(&pw),
        "{out}"
    );
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 't\\_roles%'"
        )
        .await,
        1,
        "a refused copy changes nothing"
    );

    let out = copy_roles(
        &src,
        &target_as_migrator,
        &["--exclude-role", "t_roles_service_admin"],
    );
    assert!(
        out.contains("left alone: t_roles_service_admin (--exclude-role)"),
        "{out}"
    );
    assert!(
        out.contains("left alone: t_roles_migrator (the role pgtide connects to the target as)")
            && out.contains("left alone: postgres (the target's bootstrap superuser)"),
        "{out}"
    );
    assert!(out.contains("roles: 4 created, 0 altered"), "{out}");
    assert!(
        out.contains("not set (the target has no such database): t_roles_owner in database t_roles_source_only"),
        "{out}"
    );
    assert!(
        !out.contains("SCRAM-SHA-256"),
        "a password hash in the output:\n{out}"
    );

    // Logins with the source passwords; the migration role keeps the target's.
    for (user, secret) in [
        ("t_roles_owner", "owner-secret"),
        ("t_roles_reader", "reader-secret"),
        ("t_roles Mixed", "mixed-secret"),
        ("t_roles_migrator", "target-side"),
    ] {
        assert!(
            can_log_in(&uri_as(&dst, user, secret, "postgres")).await,
            "{user} cannot log in to the target with {secret}"
        );
    }
    assert!(!can_log_in(&uri_as(&dst, "t_roles_migrator", "source-side", "postgres")).await);
    assert!(!can_log_in(&uri_as(&dst, "t_roles_group", "", "postgres")).await);

    // Attributes, comments, memberships and settings as on the source.
    let attributes = "SELECT string_agg(format('%s %s %s %s %s %s', rolname, rolcanlogin, rolinherit, rolcreatedb, rolconnlimit, rolvaliduntil), '; ' ORDER BY rolname)
                      FROM pg_roles WHERE rolname IN ('t_roles_group', 't_roles_owner', 't_roles_reader', 't_roles Mixed')";
    assert_eq!(
        scalar_string(&dst, attributes).await,
        scalar_string(&src, attributes).await
    );
    let comment =
        "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = 't_roles_group'";
    assert_eq!(scalar_string(&dst, comment).await, "the app's group");
    let memberships = "SELECT string_agg(format('%s>%s admin=%s inherit=%s set=%s', r.rolname, m.rolname, a.admin_option, a.inherit_option, a.set_option), '; ' ORDER BY r.rolname, m.rolname)
                       FROM pg_auth_members a JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member
                       WHERE m.rolname IN ('t_roles_reader', 't_roles Mixed')";
    assert_eq!(
        scalar_string(&dst, memberships).await,
        scalar_string(&src, memberships).await
    );
    assert_eq!(
        settings_of(&dst, "t_roles_reader").await,
        settings_of(&src, "t_roles_reader").await
    );
    assert_eq!(
        settings_of(&dst, "t_roles_owner").await,
        "postgres:{statement_timeout=30s}"
    );
    assert_eq!(settings_of(&dst, "t_roles_migrator").await, "");
    assert_eq!(
        membership_rows(&dst).await,
        3,
        "the migration role gained no membership"
    );

    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_roles WHERE rolname = 't_roles_service_admin'"
        )
        .await,
        0
    );

    // A rerun converges: nothing created, nothing granted twice. With every log on, no
    // password hash reaches the logs (tokio-postgres logs the statements it sends at debug).
    let child = spawn_pgtide(
        &[
            "copy",
            "roles",
            "--source",
            &src,
            "--target",
            &target_as_migrator,
            "--exclude-role",
            "t_roles_service_admin",
        ],
        &[("PGTIDE_LOG", "trace")],
    );
    let run = wait_exit(child, 60);
    let out = text(&run);
    assert!(run.status.success(), "{out}");
    assert!(
        out.contains("TRACE") && !out.contains("SCRAM-SHA-256") && !out.contains("PASSWORD"),
        "a password hash, or no trace, in the logs:\n{out}"
    );
    assert!(
        out.contains("roles: 0 created") && out.contains("memberships: 0 granted, 3 already there"),
        "{out}"
    );
    assert_eq!(membership_rows(&dst).await, 3);

    // Without passwords: a target password set by the DBA stays.
    exec(
        &dst,
        "ALTER ROLE t_roles_owner PASSWORD 'changed-on-target'",
    )
    .await;
    let out = copy_roles(
        &reader_source,
        &target_as_migrator,
        &[
            "--no-role-passwords",
            "--exclude-role",
            "t_roles_service_admin",
        ],
    );
    assert!(out.contains("0 passwords set"), "{out}");
    assert!(
        can_log_in(&uri_as(
            &dst,
            "t_roles_owner",
            "changed-on-target",
            "postgres"
        ))
        .await
    );

    for uri in [&src, &dst] {
        exec(uri, &format!("DROP ROLE IF EXISTS {ROLES}")).await;
    }
    exec(&src, "DROP DATABASE IF EXISTS t_roles_source_only").await;
}
