//! A whole-server migration (issue 15, item 2): `clone --follow --all-databases` moves the
//! roles and every database of a server of the test's own (pgbench writing to one of them
//! during the copy, a SIGKILL in the middle of it), one `cutover` ends every database's
//! pipeline, and `cleanup` removes every slot. The servers are private: an all-databases run
//! on the shared clusters would take every other test's databases and roles along.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgtide::failpoints::COPY_BEFORE_COMMIT;

const CONF: &str = "wal_level = logical\nmax_replication_slots = 12\nmax_wal_senders = 20\nmax_connections = 100\n";

/// The URI of database `db` on a private server, as `user` with `secret`.
fn uri_of(server: &PrivateServer, user: &str, secret: &str, db: &str) -> String {
    let (_, rest) = server.uri.split_once('@').unwrap();
    let (host, _) = rest.rsplit_once('/').unwrap();
    format!("postgres://{user}:{secret}@{host}/{db}")
}

fn port_of(server: &PrivateServer) -> String {
    let (_, rest) = server.uri.split_once('@').unwrap();
    let (host, _) = rest.rsplit_once('/').unwrap();
    host.rsplit_once(':').unwrap().1.to_string()
}

/// Parts copied so far in every database's work dir under the server's `dir`.
fn parts_done_anywhere(dir: &std::path::Path) -> i64 {
    let Ok(entries) = std::fs::read_dir(dir.join("databases")) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| parts_done(&e.path()))
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_with_three_databases_and_its_roles_moves_in_one_cutover() {
    let source = PrivateServer::start_with("server-source", CONF);
    let target = PrivateServer::start_with("server-target", CONF);
    let src = |db: &str| uri_of(&source, "postgres", &password(), db);
    let dst = |db: &str| uri_of(&target, "postgres", &password(), db);

    // One statement at a time: CREATE DATABASE cannot run in a multi-statement batch.
    for statement in "CREATE ROLE app_owner LOGIN PASSWORD 'owner-secret';
         CREATE ROLE app_group NOLOGIN;
         CREATE ROLE app_reader LOGIN PASSWORD 'reader-secret' IN ROLE app_group;
         ALTER ROLE app_reader SET work_mem = '12MB';
         CREATE ROLE migrator LOGIN SUPERUSER PASSWORD 'source-side';
         CREATE DATABASE shop OWNER app_owner;
         CREATE DATABASE crm OWNER app_owner CONNECTION LIMIT 50;
         ALTER DATABASE crm SET statement_timeout = '1min';
         COMMENT ON DATABASE crm IS 'the customers';
         REVOKE CONNECT ON DATABASE crm FROM PUBLIC;
         GRANT CONNECT ON DATABASE crm TO app_reader;
         CREATE DATABASE bench;
         ALTER ROLE app_reader IN DATABASE shop SET search_path = shop, public"
        .split(';')
    {
        exec(&src("postgres"), statement).await;
    }
    // The migration role exists on the target already, with its own password.
    exec(
        &dst("postgres"),
        "CREATE ROLE migrator LOGIN SUPERUSER PASSWORD 'target-side'",
    )
    .await;
    exec(
        &src("shop"),
        "SET ROLE app_owner;
         CREATE SCHEMA shop;
         CREATE TABLE shop.orders (id bigserial PRIMARY KEY, item text NOT NULL, qty int, note text);
         INSERT INTO shop.orders (item, qty, note) SELECT 'item ' || g, g % 7, repeat(md5(g::text), 20) FROM generate_series(1, 20000) g;
         CREATE INDEX ON shop.orders (item);
         GRANT USAGE ON SCHEMA shop TO app_group;
         GRANT SELECT ON shop.orders TO app_group;",
    )
    .await;
    exec(
        &src("crm"),
        "CREATE TABLE customers (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text, tags text[]);
         INSERT INTO customers (name, tags) SELECT 'c' || g, ARRAY['a', 'b\"' || g] FROM generate_series(1, 5000) g;
         ALTER TABLE customers OWNER TO app_owner;
         GRANT SELECT ON customers TO app_reader;",
    )
    .await;
    let init = pgbench(&port_of(&source), "bench", &["-i", "-q", "-s", "2"])
        .wait_with_output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    exec(
        &src("bench"),
        "ALTER TABLE pgbench_history REPLICA IDENTITY FULL",
    )
    .await;

    let dir = workdir("server");
    let d = dir.to_str().unwrap();
    let source_admin = src("postgres");
    let target_as_migrator = uri_of(&target, "migrator", "target-side", "postgres");

    // The plan first: read-only, every database with its tables, an estimate and the WAL.
    let plan: serde_json::Value = serde_json::from_str(&pgtide_ok_stdout(&[
        "plan",
        "--all-databases",
        "--follow",
        "--json",
        "--source",
        &source_admin,
        "--target",
        &target_as_migrator,
        "--dir",
        d,
        "--table-jobs",
        "2",
    ]))
    .unwrap();
    let planned: Vec<&str> = plan["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|db| db["name"].as_str().unwrap())
        .collect();
    // Largest first (crm and postgres differ by less than their catalogs' noise).
    assert_eq!(planned[..2], ["bench", "shop"], "{plan}");
    assert!(planned.contains(&"crm") && planned.contains(&"postgres") && planned.len() == 4);
    let bench = &plan["databases"][0];
    assert_eq!(bench["create_on_target"], true, "{plan}");
    assert_eq!(
        bench["tables"][0]["table"], "public.pgbench_accounts",
        "{plan}"
    );
    assert!(
        bench["tables"][0]["heap_bytes"].as_i64().unwrap() > 20_000_000,
        "{plan}"
    );
    assert_eq!(bench["indexes"], 3, "{plan}");
    assert!(plan["roles_to_copy"].as_u64().unwrap() >= 4, "{plan}");
    assert!(!plan["samples"].as_array().unwrap().is_empty(), "{plan}");
    let estimate = plan["estimate"]["seconds"].as_f64().unwrap();
    assert!(estimate > 0.0 && estimate < 600.0, "{plan}");
    assert!(
        plan["wal"]["verdict"].as_str().unwrap().contains("WAL"),
        "{plan}"
    );
    assert!(
        plan["connections"]["source"].as_u64().unwrap() >= 2 + 2 * 4,
        "{plan}"
    );
    let dry_run = pgtide_ok_stdout(&[
        "clone",
        "--dry-run",
        "--source",
        &src("bench"),
        "--target",
        &uri_of(&target, "migrator", "target-side", "postgres"),
        "--dir",
        d,
    ]);
    assert!(
        dry_run.contains("read-only")
            && dry_run.contains("public.pgbench_accounts")
            && dry_run.contains("estimate: about"),
        "{dry_run}"
    );
    println!("{dry_run}");
    assert_eq!(
        scalar_i64(
            &dst("postgres"),
            "SELECT count(*) FROM pg_database WHERE datname IN ('bench', 'shop', 'crm')"
        )
        .await,
        0,
        "the plan created nothing"
    );
    assert!(!dir.exists(), "the plan wrote no work dir");
    let run = |resume: bool, slow: bool| {
        let mut args = vec![
            "clone",
            "--follow",
            "--all-databases",
            "--source",
            &source_admin,
            "--target",
            &target_as_migrator,
            "--dir",
            d,
            "--table-jobs",
            "2",
            "--index-jobs",
            "2",
            "--apply-jobs",
            "8",
        ];
        if resume {
            args.push("--resume");
        }
        let slow_copy = format!("{COPY_BEFORE_COMMIT}=sleep(400)");
        let env: Vec<(&str, &str)> = if slow {
            vec![("FAILPOINTS", slow_copy.as_str())]
        } else {
            vec![]
        };
        spawn_pgtide(&args, &env)
    };

    // pgbench writes to one database while the others copy; pgtide is killed mid-copy.
    let mut child = run(false, true);
    let load = pgbench(&port_of(&source), "bench", &["-n", "-c", "2", "-T", "12"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while parts_done_anywhere(&dir) < 2 {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            child.kill().ok();
            panic!("the copy never started:\n{}", child.output_so_far());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let status = pgtide_ok(&["status", "--dir", d]);
    println!("{status}");
    for db in ["shop", "crm", "bench", "postgres", "total"] {
        assert!(
            status.lines().any(|l| l.starts_with(db)),
            "no line for {db}:\n{status}"
        );
    }

    let mut child = run(true, false);
    let load = load.wait_with_output().unwrap();
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
    // Every database applying: the server's verdict says ready.
    let json = wait_for_status(&["--dir", d], 180, &mut child, |json| {
        says_ready(json, "/total/verdict")
    })
    .await;
    assert_eq!(json["databases"].as_array().unwrap().len(), 4, "{json}");
    // --apply-jobs is the server's: 8 lanes shared out, 2 for each of the 4 databases.
    for entry in std::fs::read_dir(dir.join("databases")).unwrap() {
        let db = entry.unwrap().path();
        assert_eq!(
            state_query_i64(
                &db,
                "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'apply.jobs'"
            ),
            2,
            "{}",
            db.display()
        );
    }
    exec(
        &src("shop"),
        "INSERT INTO shop.orders (item, qty) VALUES ('after the copy', 1)",
    )
    .await;

    let out = pgtide_ok(&[
        "cutover",
        "--source",
        &source_admin,
        "--target",
        &target_as_migrator,
        "--dir",
        d,
        "--fence",
    ]);
    assert!(out.contains("cutover complete for 4 databases"), "{out}");
    assert!(out.contains("write downtime"), "{out}");
    println!("{out}");
    let out = wait_exit(child, 120);
    assert!(out.status.success(), "{}", text(&out));
    // The fence holds in every database: an application role cannot write on the source.
    let owner = connect(&uri_of(&source, "app_owner", "owner-secret", "shop")).await;
    let refused = owner
        .batch_execute("INSERT INTO shop.orders (item) VALUES ('after the fence')")
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
        "{refused}"
    );

    // verify across the server: every database and the roles (the fence's own setting on
    // the source is not a difference); a role changed on the target is.
    let verify = |extra: Option<&'static str>| {
        let mut args = vec![
            "verify",
            "--source",
            source_admin.as_str(),
            "--target",
            target_as_migrator.as_str(),
            "--dir",
            d,
        ];
        args.extend(extra);
        args
    };
    let out = pgtide_ok(&verify(None));
    assert!(
        out.contains("the server's 4 databases and its roles are identical")
            && out.contains("password hashes included")
            && out.contains("== database bench =="),
        "{out}"
    );
    exec(&dst("postgres"), "ALTER ROLE app_reader CONNECTION LIMIT 3").await;
    let out = pgtide_fails(&verify(Some("--counts-only")));
    assert!(
        out.contains("DIFFERENT: role app_reader: source has"),
        "{out}"
    );
    exec(
        &dst("postgres"),
        "ALTER ROLE app_reader CONNECTION LIMIT -1",
    )
    .await;

    // The fence holds every database until lifted (before the roles are compared: it is a
    // setting of theirs on the source), and lifting it works for every database.
    let out = pgtide_ok(&[
        "cutover",
        "--unfence",
        "--source",
        &source_admin,
        "--target",
        &target_as_migrator,
        "--dir",
        d,
    ]);
    assert!(
        out.contains("fence lifted on the source in database shop"),
        "{out}"
    );
    // Every database identical by content.
    for db in ["shop", "crm", "bench", "postgres"] {
        assert_identical(&src(db), &dst(db));
    }
    // The roles log in with their source passwords; the migration role keeps its own.
    for (user, secret, db) in [
        ("app_owner", "owner-secret", "shop"),
        ("app_reader", "reader-secret", "crm"),
        ("migrator", "target-side", "postgres"),
    ] {
        assert!(
            can_log_in(&uri_of(&target, user, secret, db)).await,
            "{user} cannot log in to the target's {db}"
        );
    }
    assert!(!can_log_in(&uri_of(&target, "migrator", "source-side", "postgres")).await);
    // Memberships, role settings, grants and database properties as on the source.
    let facts = [
        (
            "postgres",
            "SELECT pg_has_role('app_reader', 'app_group', 'MEMBER')::text",
        ),
        (
            "postgres",
            "SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole WHERE r.rolname = 'app_reader' AND s.setdatabase = 0",
        ),
        (
            "postgres",
            "SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole JOIN pg_database d ON d.oid = s.setdatabase WHERE r.rolname = 'app_reader' AND d.datname = 'shop'",
        ),
        (
            "shop",
            "SELECT has_table_privilege('app_reader', 'shop.orders', 'SELECT')::text",
        ),
        (
            "crm",
            "SELECT has_table_privilege('app_reader', 'customers', 'SELECT')::text",
        ),
        (
            "postgres",
            "SELECT string_agg(format('%s %s %s %s %s', datname, pg_get_userbyid(datdba), datconnlimit, pg_encoding_to_char(encoding), datcollate), '; ' ORDER BY datname) FROM pg_database WHERE datname IN ('shop', 'crm', 'bench')",
        ),
        (
            "postgres",
            "SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase WHERE d.datname = 'crm' AND s.setrole = 0",
        ),
        (
            "postgres",
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = 'crm'",
        ),
        (
            "postgres",
            "SELECT has_database_privilege('app_owner', 'crm', 'CONNECT')::text || has_database_privilege('app_reader', 'crm', 'CONNECT')::text || has_database_privilege('app_group', 'crm', 'CONNECT')::text",
        ),
        ("crm", "SELECT last_value::text FROM customers_id_seq"),
    ];
    for (db, sql) in facts {
        assert_eq!(
            scalar_string(&dst(db), sql).await,
            scalar_string(&src(db), sql).await,
            "{db}: {sql}"
        );
    }
    assert_eq!(
        scalar_string(
            &dst("shop"),
            "SELECT item FROM shop.orders ORDER BY id DESC LIMIT 1"
        )
        .await,
        "after the copy"
    );

    let out = pgtide_ok(&[
        "cleanup",
        "--source",
        &source_admin,
        "--target",
        &target_as_migrator,
        "--dir",
        d,
    ]);
    assert!(out.matches("dropped").count() >= 4, "{out}");
    assert_eq!(
        scalar_i64(
            &src("postgres"),
            "SELECT count(*) FROM pg_replication_slots"
        )
        .await,
        0
    );
    assert_no_file_holds_password(&dir);
}

/// Waits until new sessions of the target see max_wal_size at `value` (MB).
async fn wait_max_wal_size(uri: &str, value: &str, child: &mut PgtideChild) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while scalar_string(
        uri,
        "SELECT setting FROM pg_settings WHERE name = 'max_wal_size'",
    )
    .await
        != value
    {
        assert!(
            child.try_wait().unwrap().is_none() && Instant::now() < deadline,
            "max_wal_size never became {value}:\n{}",
            child.output_so_far()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `--fast-restore` in a whole-server run is the server's: on during every database's copy,
/// restored (exactly) before any database applies, by the resumed run after a SIGKILL, and by
/// `cleanup` after one.
#[tokio::test(flavor = "multi_thread")]
async fn fast_restore_settings_hold_for_every_copy_and_always_go_back() {
    let source = PrivateServer::start_with("server-fast-source", CONF);
    let target = PrivateServer::start_with("server-fast-target", CONF);
    let src = |db: &str| uri_of(&source, "postgres", &password(), db);
    let dst = |db: &str| uri_of(&target, "postgres", &password(), db);
    for db in ["one", "two"] {
        exec(&src("postgres"), &format!("CREATE DATABASE {db}")).await;
        exec(
            &src(db),
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 3000) g;
             CREATE TABLE u (id int PRIMARY KEY); INSERT INTO u VALUES (1);",
        )
        .await;
    }
    let before = server_settings(&dst("postgres")).await;
    let slow_copy = format!("{COPY_BEFORE_COMMIT}=sleep(1500)");
    let run = |dir: &str, extra: &[&str], slow: bool| {
        let source_admin = src("postgres");
        let target_admin = dst("postgres");
        let mut args = vec![
            "clone",
            "--all-databases",
            "--exclude-database",
            "postgres",
            "--fast-restore",
            "--source",
            &source_admin,
            "--target",
            &target_admin,
            "--dir",
            dir,
            "--table-jobs",
            "2",
        ];
        args.extend_from_slice(extra);
        let env: Vec<(&str, &str)> = if slow {
            vec![("FAILPOINTS", slow_copy.as_str())]
        } else {
            vec![]
        };
        spawn_pgtide(&args, &env)
    };

    // A follow: killed while the settings are on; the resumed run restores them first, sets
    // them for what is left to copy, and restores them before any database applies.
    let dir_a = workdir("server-fast-a");
    let a = dir_a.to_str().unwrap();
    let mut child = run(a, &["--follow"], true);
    wait_max_wal_size(&dst("postgres"), "4096", &mut child).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_ne!(server_settings(&dst("postgres")).await, before);
    let mut child = run(a, &["--follow", "--resume"], false);
    wait_for_status(&["--dir", a], 120, &mut child, |json| {
        says_ready(json, "/total/verdict")
    })
    .await;
    let during_apply = server_settings(&dst("postgres")).await;
    assert_eq!(
        during_apply,
        before,
        "{}",
        differences(&before, &during_apply)
    );
    child.kill().unwrap();
    child.wait().unwrap();
    for db in ["one", "two"] {
        exec(&src(db), "INSERT INTO u VALUES (2)").await;
    }
    pgtide_ok(&[
        "cutover",
        "--source",
        &src("postgres"),
        "--target",
        &dst("postgres"),
        "--dir",
        a,
    ]);
    for db in ["one", "two"] {
        assert_identical(&src(db), &dst(db));
    }
    pgtide_ok(&[
        "cleanup",
        "--source",
        &src("postgres"),
        "--target",
        &dst("postgres"),
        "--dir",
        a,
    ]);

    // A plain clone killed with the settings on: cleanup puts them back exactly.
    let dir_b = workdir("server-fast-b");
    let b = dir_b.to_str().unwrap();
    let mut child = run(b, &["--drop-if-exists"], true);
    wait_max_wal_size(&dst("postgres"), "4096", &mut child).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let out = pgtide_ok(&[
        "cleanup",
        "--source",
        &src("postgres"),
        "--target",
        &dst("postgres"),
        "--dir",
        b,
    ]);
    assert!(
        out.contains("settings changed by --fast-restore restored"),
        "{out}"
    );
    let after = server_settings(&dst("postgres")).await;
    assert_eq!(after, before, "{}", differences(&before, &after));
}

/// `cutover --reverse` for a whole server (issue 16): one reverse stream per database, the
/// application writing to the target in two databases while `reverse follow` runs (one
/// process for both, SIGKILLed once), then one `rollback`: every database on the source
/// holds what the target had, the source is writable, the target fenced, and `cleanup`
/// leaves no slot, origin or publication on either server.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_cutover_with_reverse_streams_rolls_back_every_database() {
    let source = PrivateServer::start_with("server-rev-source", CONF);
    let target = PrivateServer::start_with("server-rev-target", CONF);
    let src = |db: &str| uri_of(&source, "postgres", &password(), db);
    let dst = |db: &str| uri_of(&target, "postgres", &password(), db);
    let app = |server: &PrivateServer, db: &str| uri_of(server, "app", "app-secret", db);
    exec(
        &src("postgres"),
        "CREATE ROLE app LOGIN PASSWORD 'app-secret'",
    )
    .await;
    for db in ["one", "two"] {
        exec(&src("postgres"), &format!("CREATE DATABASE {db}")).await;
        exec(
            &src(db),
            "CREATE TABLE t (id bigserial PRIMARY KEY, v text);
             INSERT INTO t (v) SELECT md5(g::text) FROM generate_series(1, 1000) g;
             GRANT ALL ON t, t_id_seq TO app;",
        )
        .await;
    }
    let dir = workdir("server-reverse");
    let d = dir.to_str().unwrap();
    let (source_admin, target_admin) = (src("postgres"), dst("postgres"));
    let servers = [
        "--source",
        &source_admin,
        "--target",
        &target_admin,
        "--dir",
        d,
    ];
    let clone = [
        &[
            "clone",
            "--follow",
            "--all-databases",
            "--exclude-database",
            "postgres",
        ][..],
        &servers,
    ]
    .concat();
    let mut child = spawn_pgtide(&clone, &[]);
    wait_for_status(&["--dir", d], 120, &mut child, |json| {
        says_ready(json, "/total/verdict")
    })
    .await;
    let out = pgtide_ok(&[&["cutover", "--fence", "--reverse"][..], &servers].concat());
    assert!(
        out.contains("reverse stream:    one: slot")
            && out.contains("reverse stream:    two: slot"),
        "{out}"
    );
    let out = wait_exit(child, 60);
    assert!(out.status.success(), "{}", text(&out));

    let follow = [&["reverse", "follow"][..], &servers].concat();
    let mut reverse = spawn_pgtide(&follow, &[]);
    let write = |round: i32| {
        let (one, two) = (app(&target, "one"), app(&target, "two"));
        async move {
            for uri in [one, two] {
                let client = connect(&uri).await;
                for i in 0..40 {
                    client
                        .batch_execute(&format!(
                            "INSERT INTO t (v) VALUES ('target {round} {i}');
                             UPDATE t SET v = v || '+' WHERE id = {};
                             DELETE FROM t WHERE id = {}",
                            round * 100 + i + 1,
                            round * 100 + i + 500
                        ))
                        .await
                        .unwrap();
                }
            }
        }
    };
    write(1).await;
    wait_for_status(&["--dir", d], 120, &mut reverse, |json| {
        ["one", "two"].iter().all(|db| {
            json.pointer(&format!("/reverse/{db}/verdict"))
                .and_then(|v| v.as_str())
                .is_some_and(|v| v.starts_with("ready to roll back"))
        })
    })
    .await;
    reverse.kill().unwrap();
    reverse.wait().unwrap();
    write(2).await;
    let reverse = spawn_pgtide(&follow, &[]);
    write(3).await;

    let out = pgtide_ok(&[&["rollback", "--timeout", "120s"][..], &servers].concat());
    assert!(out.contains("rollback complete for 2 databases"), "{out}");
    let out = wait_exit(reverse, 60);
    assert!(out.status.success(), "{}", text(&out));
    for db in ["one", "two"] {
        assert_identical(&src(db), &dst(db));
        connect(&app(&source, db))
            .await
            .batch_execute("INSERT INTO t (v) VALUES ('back on the source')")
            .await
            .unwrap();
        let refused = connect(&app(&target, db))
            .await
            .batch_execute("INSERT INTO t (v) VALUES ('fenced')")
            .await
            .unwrap_err();
        assert!(format!("{refused:?}").contains("25006"), "{refused:?}");
    }
    let again = pgtide_ok(&[&["rollback"][..], &servers].concat());
    assert!(again.contains("already rolled back"), "{again}");
    pgtide_ok(&[&["cleanup"][..], &servers].concat());
    for uri in [src("one"), src("two"), dst("one"), dst("two")] {
        assert_eq!(
            scalar_i64(&uri, "SELECT count(*) FROM pg_replication_slots").await,
            0
        );
        assert_eq!(
            scalar_i64(&uri, "SELECT count(*) FROM pg_replication_origin").await,
            0
        );
        assert_eq!(
            scalar_i64(&uri, "SELECT count(*) FROM pg_publication").await,
            0
        );
    }
}
