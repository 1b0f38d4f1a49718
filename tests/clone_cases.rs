//! Schemas as users really have them (issue 10, items 16–23): odd names, filters that leave
//! dependents behind, sequences shared by defaults, a source search_path, a target prepared by
//! its DBA (an empty schema, a pre-installed extension), pgcopydb-style filters files, noisy
//! servers. Each runs the real pgtide against the real clusters.

mod common;

use common::*;
use pgtide::failpoints::CLONE_BEFORE_DUMP;

/// Writes a filters file into `dir`; returns its path.
fn write_filters(dir: &std::path::Path, text: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("filters.ini");
    std::fs::write(&file, text).unwrap();
    file.to_str().unwrap().to_string()
}

fn clone_args<'a>(src: &'a str, dst: &'a str, dir: &'a str) -> Vec<&'a str> {
    vec!["clone", "--source", src, "--target", dst, "--dir", dir]
}

/// Item 16: a schema whose name holds a space does not make pgtide's own publication look
/// like a user's one: clone --follow leaves it on the source only and reaches endpos.
#[tokio::test(flavor = "multi_thread")]
async fn schema_with_a_space_follows_without_pgtide_publication_on_target() {
    let (src, dst) = fresh_db_pair("t_c16").await;
    exec(
        &src,
        "CREATE SCHEMA \"a b\"; CREATE TABLE \"a b\".\"t x\" (id int PRIMARY KEY, v text);
         INSERT INTO \"a b\".\"t x\" SELECT i, 'v' FROM generate_series(1, 10) i;",
    )
    .await;
    let dir = workdir("c16");
    let d = dir.to_str().unwrap();
    let child = spawn_pgtide(&clone_follow_args(&src, &dst, d, "t_c16_slot"), &[]);
    wait_for_slot(&dir);
    exec(&src, "INSERT INTO \"a b\".\"t x\" VALUES (11, 'streamed')").await;
    let endpos = current_lsn(&src).await;
    pgtide_ok(&["sentinel", "set", "endpos", &endpos, "--dir", d]);
    let out = wait_exit(child, 120);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM pg_publication").await,
        0,
        "pgtide's publication must stay on the source"
    );
    assert_eq!(
        scalar_i64(&dst, "SELECT count(*) FROM \"a b\".\"t x\"").await,
        11
    );
    assert_identical(&src, &dst);
    pgtide_ok(&["stream", "cleanup", "--source", &src, "--dir", d]);
}

/// Item 17: excluding a table that a view and a foreign key depend on is refused before
/// anything is created, naming each dependent and the fix; excluding those too works.
#[tokio::test(flavor = "multi_thread")]
async fn excluding_a_table_with_dependents_is_refused_with_the_fix() {
    let (src, dst) = fresh_db_pair("t_c17").await;
    exec(
        &src,
        "CREATE TABLE a (id int PRIMARY KEY); INSERT INTO a VALUES (1);
         CREATE TABLE b (id int PRIMARY KEY, a_id int CONSTRAINT b_a_fk REFERENCES a);
         CREATE VIEW v AS SELECT id FROM a;
         CREATE TABLE c (id int PRIMARY KEY); INSERT INTO c VALUES (1);",
    )
    .await;
    let dir = workdir("c17");
    let f = write_filters(&dir, "[exclude-table]\npublic.a\n");
    let w = dir.join("w");
    let mut args = clone_args(&src, &dst, w.to_str().unwrap());
    args.extend(["--filters", &f]);
    let out = pgtide_fails(&args);
    assert!(
        out.contains("public.v") && out.contains("b_a_fk") && out.contains("[exclude-table]"),
        "each dependent and the fix are named: {out}"
    );
    assert!(
        !out.contains("pg_restore"),
        "refused before pg_restore: {out}"
    );
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        )
        .await,
        0,
        "nothing was created"
    );
    let check = pgtide_fails(&[
        "check",
        "--offline",
        "--source",
        &src,
        "--target",
        &dst,
        "--filters",
        &f,
        "--dir",
        w.to_str().unwrap(),
    ]);
    assert!(check.contains("public.v"), "{check}");

    let f = write_filters(&dir, "[exclude-table]\npublic.a\npublic.b\npublic.v\n");
    let mut args = clone_args(&src, &dst, w.to_str().unwrap());
    args.extend(["--filters", &f]);
    pgtide_ok(&args);
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM c").await, 1);
}

/// Item 18: an included table whose default draws from a sequence it does not own brings that
/// sequence along, set to its source value.
#[tokio::test(flavor = "multi_thread")]
async fn include_only_table_brings_the_sequence_its_default_uses() {
    let (src, dst) = fresh_db_pair("t_c18").await;
    exec(
        &src,
        "CREATE SEQUENCE shared_ids; CREATE SEQUENCE unrelated;
         CREATE TABLE t (id int PRIMARY KEY DEFAULT nextval('shared_ids'), v text);
         INSERT INTO t (v) SELECT 'x' FROM generate_series(1, 7);
         CREATE TABLE other (id int);",
    )
    .await;
    let dir = workdir("c18");
    let f = write_filters(&dir, "[include-only-table]\npublic.t\n");
    let w = dir.join("w");
    let mut args = clone_args(&src, &dst, w.to_str().unwrap());
    args.extend(["--filters", &f]);
    pgtide_ok(&args);
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM t").await, 7);
    assert_eq!(
        scalar_i64(&dst, "SELECT last_value FROM shared_ids").await,
        7
    );
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_class WHERE relname IN ('other', 'unrelated')"
        )
        .await,
        0
    );
}

/// Item 19: the source database's search_path names the schema of a type used by an index
/// predicate and expression; the definitions pgtide reads are qualified all the same.
#[tokio::test(flavor = "multi_thread")]
async fn source_search_path_does_not_leak_into_definitions() {
    let (src, dst) = fresh_db_pair("t_c19").await;
    exec(
        &src,
        "CREATE SCHEMA s; CREATE TYPE s.state AS ENUM ('new', 'done');
         CREATE TABLE job (id int PRIMARY KEY, st s.state NOT NULL,
                           CONSTRAINT job_one_new EXCLUDE USING btree (id WITH =) WHERE (st = 'new'::s.state));
         CREATE INDEX job_open ON job (id) WHERE st = 'new'::s.state;
         CREATE INDEX job_expr ON job ((st = 'done'::s.state));
         INSERT INTO job SELECT i, CASE WHEN i % 2 = 0 THEN 'new' ELSE 'done' END::s.state FROM generate_series(1, 20) i;
         ALTER DATABASE t_c19 SET search_path = public, s;",
    )
    .await;
    let dir = workdir("c19");
    pgtide_ok(&clone_args(&src, &dst, dir.to_str().unwrap()));
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_indexes WHERE indexname IN ('job_open', 'job_expr', 'job_one_new')"
        )
        .await,
        3
    );
    assert_identical(&src, &dst);
}

/// Item 20: a target whose DBA created the (empty) schema already is used as it is.
#[tokio::test(flavor = "multi_thread")]
async fn existing_empty_schema_on_the_target_is_used() {
    let (src, dst) = fresh_db_pair("t_c20").await;
    exec(
        &src,
        "CREATE SCHEMA app; COMMENT ON SCHEMA app IS 'the application';
         CREATE TABLE app.t (id int PRIMARY KEY); INSERT INTO app.t VALUES (1), (2);",
    )
    .await;
    exec(&dst, "CREATE SCHEMA app").await;
    let dir = workdir("c20");
    let out = pgtide_ok(&clone_args(&src, &dst, dir.to_str().unwrap()));
    assert!(
        out.contains("schema app exists on the target already"),
        "{out}"
    );
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM app.t").await, 2);
    assert_eq!(
        scalar_string(&dst, "SELECT obj_description('app'::regnamespace)").await,
        "the application",
        "pgtide's role owns the schema: the source's comment is set"
    );
    assert_identical(&src, &dst);
}

/// The URI of `uri`'s server and database as another user (same test password).
fn with_user(uri: &str, user: &str) -> String {
    let (_, rest) = uri.split_once('@').unwrap();
    format!("postgres://{user}:{}@{rest}", password())
}

/// Item 21: an extension a superuser installed on the target is not the user's data: the
/// target counts as empty, it is neither recreated, commented nor dropped (the clone's role
/// does not own it), with or without --drop-if-exists. A schema the superuser created is used
/// as it is, without the comment its owner alone may set.
#[tokio::test(flavor = "multi_thread")]
async fn extension_preinstalled_on_the_target_is_left_alone() {
    let (src, dst) = fresh_db_pair("t_c21").await;
    exec(
        &src,
        "CREATE EXTENSION hstore; CREATE TABLE t (id int PRIMARY KEY, h hstore);
         INSERT INTO t VALUES (1, 'a=>1'), (2, 'b=>2');
         CREATE SCHEMA app; COMMENT ON SCHEMA app IS 'the application';
         CREATE TABLE app.u (id int PRIMARY KEY); INSERT INTO app.u VALUES (1);",
    )
    .await;
    exec(
        &dst,
        &format!(
            "CREATE EXTENSION hstore;
             DO $$ BEGIN CREATE ROLE t_c21_user LOGIN PASSWORD '{}'; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             GRANT CREATE ON DATABASE t_c21 TO t_c21_user; GRANT CREATE, USAGE ON SCHEMA public TO t_c21_user;
             CREATE SCHEMA app; GRANT CREATE, USAGE ON SCHEMA app TO t_c21_user;",
            password()
        ),
    )
    .await;
    let user_dst = with_user(&dst, "t_c21_user");
    let dir = workdir("c21");
    let w = dir.to_str().unwrap();
    let check = pgtide_ok(&[
        "check",
        "--offline",
        "--source",
        &src,
        "--target",
        &user_dst,
        "--dir",
        w,
        "--no-owner",
        "--no-acl",
    ]);
    assert!(check.contains("target empty"), "{check}");
    let mut args = clone_args(&src, &user_dst, w);
    args.extend(["--no-owner", "--no-acl"]);
    pgtide_ok(&args);
    assert_identical(&src, &dst);

    let mut again = args.clone();
    again.extend(["--restart", "--drop-if-exists"]);
    pgtide_ok(&again);
    assert_identical(&src, &dst);
    assert_eq!(
        scalar_string(
            &dst,
            "SELECT extowner::regrole::text FROM pg_extension WHERE extname = 'hstore'"
        )
        .await,
        "postgres",
        "the superuser's extension is still there, untouched"
    );
}

/// Item 22: a filters file as pgcopydb users write it: `;` and `#` comment lines, a trailing
/// comment, a quoted name holding `#`, materialized views excluded or left unpopulated.
#[tokio::test(flavor = "multi_thread")]
async fn pgcopydb_style_filters_with_materialized_views() {
    let (src, dst) = fresh_db_pair("t_c22").await;
    exec(
        &src,
        "CREATE TABLE base (id int PRIMARY KEY); INSERT INTO base SELECT generate_series(1, 5);
         CREATE TABLE \"odd#name\" (id int PRIMARY KEY);
         CREATE MATERIALIZED VIEW mv_gone AS SELECT count(*) AS n FROM base;
         CREATE MATERIALIZED VIEW mv_empty AS SELECT max(id) AS m FROM base;
         CREATE MATERIALIZED VIEW mv_kept AS SELECT sum(id) AS s FROM base;",
    )
    .await;
    let dir = workdir("c22");
    let f = write_filters(
        &dir,
        "; pgcopydb comment\n# another comment\n[exclude-table]\n  ; indented comment\npublic.mv_gone\npublic.\"odd#name\"   # trailing comment\n[exclude-table-data]\npublic.mv_empty\n",
    );
    let w = dir.join("w");
    let mut args = clone_args(&src, &dst, w.to_str().unwrap());
    args.extend(["--filters", &f]);
    pgtide_ok(&args);
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_class WHERE relname IN ('mv_gone', 'odd#name')"
        )
        .await,
        0
    );
    assert_eq!(
        scalar_string(
            &dst,
            "SELECT string_agg(relname || '=' || relispopulated, ',' ORDER BY relname) FROM pg_class WHERE relname LIKE 'mv%'"
        )
        .await,
        "mv_empty=false,mv_kept=true"
    );
    assert_eq!(scalar_i64(&dst, "SELECT s FROM mv_kept").await, 15);
}

/// Item 23: thousands of server notices (here from an index expression) are not logged one
/// by one at the default level; a count says how many there were.
#[tokio::test(flavor = "multi_thread")]
async fn server_notices_are_counted_not_logged() {
    let (src, dst) = fresh_db_pair("t_c23").await;
    exec(
        &src,
        "CREATE FUNCTION noisy(i int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS
           $$ BEGIN RAISE NOTICE 'noisy row % %', i, repeat('x', 200); RETURN i; END $$;
         CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 500);
         CREATE INDEX t_noisy ON t (noisy(id));",
    )
    .await;
    let dir = workdir("c23");
    let out = pgtide_ok(&clone_args(&src, &dst, dir.to_str().unwrap()));
    assert!(
        !out.contains("noisy row"),
        "notices must not be logged at the default level: {}",
        &out[..out.len().min(3000)]
    );
    let counted: u64 = out
        .split(" server notices received")
        .next()
        .and_then(|before| before.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no notice count in: {out}"));
    assert!(counted >= 500, "one notice per indexed row at least: {out}");
    assert_eq!(
        scalar_i64(
            &dst,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 't_noisy'"
        )
        .await,
        1
    );
}

/// Item 23: `--append-only` takes a table name exactly as `check` prints it.
#[tokio::test(flavor = "multi_thread")]
async fn append_only_accepts_the_name_check_prints() {
    let (src, dst) = fresh_db_pair("t_c23_append").await;
    exec(
        &src,
        "CREATE TABLE \"Odd Name\" (v int); CREATE TABLE plain_log (v int);",
    )
    .await;
    let dir = workdir("c23-append");
    let d = dir.to_str().unwrap();
    let out = pgtide_fails(&["check", "--source", &src, "--target", &dst, "--dir", d]);
    assert!(out.contains("public.\"Odd Name\""), "{out}");
    let out = pgtide(&[
        "check",
        "--source",
        &src,
        "--target",
        &dst,
        "--dir",
        d,
        "--append-only",
        "public.\"Odd Name\"",
        "--append-only",
        "public.plain_log",
    ]);
    let all = text(&out);
    assert!(
        all.contains("source append-only tables") && !all.contains("no such table"),
        "{all}"
    );
    assert!(
        all.lines()
            .any(|l| l.starts_with("OK") && l.contains("source replica identity")),
        "{all}"
    );
}

/// Item 18, the schema side: a kept table whose default draws from a sequence (and whose
/// column has a type) in a schema the filters leave out is refused with the fix, where
/// pg_restore would stop halfway.
#[tokio::test(flavor = "multi_thread")]
async fn kept_table_using_an_excluded_schema_is_refused() {
    let (src, dst) = fresh_db_pair("t_c18_schema").await;
    exec(
        &src,
        "CREATE SCHEMA ids; CREATE SEQUENCE ids.shared; CREATE TYPE ids.color AS ENUM ('red');
         CREATE TABLE t (id int PRIMARY KEY DEFAULT nextval('ids.shared'), c ids.color);
         CREATE TABLE u (id serial PRIMARY KEY);",
    )
    .await;
    let dir = workdir("c18-schema");
    let f = write_filters(&dir, "[exclude-schema]\nids\n");
    let out = pgtide_fails(&[
        "check",
        "--offline",
        "--source",
        &src,
        "--target",
        &dst,
        "--filters",
        &f,
        "--dir",
        dir.join("w").to_str().unwrap(),
    ]);
    let line = out
        .lines()
        .find(|l| l.contains("source filters"))
        .unwrap_or_else(|| panic!("no filters finding: {out}"));
    assert!(
        line.starts_with("FAIL") && line.contains("ids.shared") && line.contains("ids.color"),
        "{out}"
    );
    assert!(
        !line.contains("ids.owned"),
        "an owned sequence is dumped with its table: {out}"
    );
}

/// Found by the fuzzer (seed 55): pg_dump locks every table it dumps, one after the other (and
/// the catalog read's table sizes lock them too); an application transaction that locks two of
/// them the other way round (`TRUNCATE a, b`) can make pgtide's session the victim of a
/// deadlock. That is transient: the read runs again.
///
/// Who loses a deadlock is whoever's `deadlock_timeout` fires while the cycle exists, so the
/// test makes pgtide's session close the cycle, after the application already waits: pg_dump
/// locks t1, t2, t3 in that order (by OID); `holder` keeps t2 until the application waits for
/// t1; only then does pg_dump reach t3, which the application holds. The application's own
/// deadlock check is put off (`deadlock_timeout` 10 min), so pgtide's session is the victim
/// however slow the machine is.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_read_losing_a_deadlock_to_the_application_is_retried() {
    let (src, dst) = fresh_db_pair("t_c_deadlock").await;
    exec(
        &src,
        "CREATE TABLE t1 (id int PRIMARY KEY); CREATE TABLE t2 (id int PRIMARY KEY);
         CREATE TABLE t3 (id int PRIMARY KEY);
         INSERT INTO t1 VALUES (1); INSERT INTO t2 VALUES (2); INSERT INTO t3 VALUES (3);",
    )
    .await;
    let dir = workdir("c-deadlock");
    let d = dir.to_str().unwrap();
    let child = spawn_pgtide(
        &clone_args(&src, &dst, d),
        &[(
            "FAILPOINTS",
            format!("{CLONE_BEFORE_DUMP}=sleep(3000)").as_str(),
        )],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let catalog_read = || {
        state_count_or_zero(
            &dir,
            "SELECT count(*) FROM steps WHERE name = 'catalog' AND status = 'done'",
        ) == 1
    };
    while !catalog_read() {
        assert!(
            std::time::Instant::now() < deadline,
            "the catalog was never read"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // The catalog is read and pgtide sleeps before pg_dump: take t2 and t3 now.
    let holder = connect(&src).await;
    holder
        .batch_execute("SET deadlock_timeout = '10min'; BEGIN; LOCK t2 IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let app = connect(&src).await;
    app.batch_execute("SET deadlock_timeout = '10min'; BEGIN; LOCK t3 IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let app_pid: i32 = app
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let watcher = connect(&src).await;
    // pg_dump (any session but the test's own) waits for t2, which `holder` keeps.
    wait_for_lock_waiter(&watcher, "t2", |pid| pid != app_pid, deadline).await;
    // The application now waits for t1, which pg_dump holds: no cycle yet (pg_dump waits for
    // `holder`, who waits for nobody).
    let app_task = tokio::spawn(async move {
        app.batch_execute("LOCK t1 IN ACCESS EXCLUSIVE MODE; COMMIT")
            .await
            .map(|()| app)
    });
    wait_for_lock_waiter(&watcher, "t1", |pid| pid == app_pid, deadline).await;
    // `holder` lets go of t2: pg_dump takes it and waits for t3, closing the cycle. Its
    // deadlock check is the only one due, so pgtide's session is the victim.
    holder.batch_execute("COMMIT").await.unwrap();
    let app = app_task
        .await
        .unwrap()
        .expect("the application's transaction must not be the deadlock victim");
    drop(app);
    let out = wait_exit(child, 120);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("lost a deadlock"), "{all}");
    assert_identical(&src, &dst);
}

/// Waits until a session accepted by `is_waiter` waits for a lock on `public.<table>` of the
/// deadlock test's database.
async fn wait_for_lock_waiter(
    watcher: &tokio_postgres::Client,
    table: &str,
    is_waiter: impl Fn(i32) -> bool,
    deadline: std::time::Instant,
) {
    let sql = format!(
        "SELECT coalesce(array_agg(l.pid), '{{}}') FROM pg_locks l
           JOIN pg_database d ON d.oid = l.database AND d.datname = 't_c_deadlock'
          WHERE l.locktype = 'relation' AND NOT l.granted
            AND l.relation = (SELECT c.oid FROM pg_class c WHERE c.relname = '{table}')"
    );
    loop {
        let pids: Vec<i32> = watcher.query_one(&sql, &[]).await.unwrap().get(0);
        if pids.into_iter().any(&is_waiter) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nobody waited for {table}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// verify compares each table's replica identity (what logical replication from the new
/// server, a reverse stream included, matches rows by): a target that lost one is reported.
#[tokio::test(flavor = "multi_thread")]
async fn verify_compares_replica_identities() {
    let (src, dst) = fresh_db_pair("t_c_replident").await;
    exec(
        &src,
        "CREATE TABLE f (a int, b text); ALTER TABLE f REPLICA IDENTITY FULL;
         CREATE TABLE u (id int NOT NULL, v int); CREATE UNIQUE INDEX u_id ON u (id);
         ALTER TABLE u REPLICA IDENTITY USING INDEX u_id;
         INSERT INTO f VALUES (1, 'x'); INSERT INTO u VALUES (1, 1);",
    )
    .await;
    let dir = workdir("c-replident");
    let d = dir.to_str().unwrap();
    pgtide_ok(&clone_args(&src, &dst, d));
    let out = pgtide_ok(&Args::verify(&src, &dst));
    assert!(
        out.contains("2 replica identities compared; 0 differ"),
        "{out}"
    );
    exec(&dst, "ALTER TABLE f REPLICA IDENTITY DEFAULT").await;
    let out = pgtide_fails(&Args::verify(&src, &dst));
    assert!(
        out.contains("replica identity public.f: source full / target default"),
        "{out}"
    );
}

/// `--toast-compression`: by default the copy stores TOASTed values with lz4 on a target that
/// has it (the values and the schema are the same, only their storage differs); `keep` leaves
/// the target's default (pglz); the column attribute is never changed.
#[tokio::test(flavor = "multi_thread")]
async fn toast_compression_is_lz4_by_default_and_keep_leaves_the_target_default() {
    let fill = "CREATE TABLE docs (id int PRIMARY KEY, body text);
         INSERT INTO docs SELECT g, repeat(md5(g::text), 400) FROM generate_series(1, 30) g;";
    let methods =
        "SELECT string_agg(DISTINCT coalesce(pg_column_compression(body), 'none'), ',') FROM docs";
    let (src, dst) = fresh_db_pair("t_toast_lz4").await;
    exec(&src, fill).await;
    assert_eq!(scalar_string(&src, methods).await, "pglz");
    let dir = workdir("toast-lz4");
    pgtide_ok(&Args::clone(&src, &dst, dir.to_str().unwrap()));
    assert_eq!(scalar_string(&dst, methods).await, "lz4");
    assert_eq!(
        scalar_string(
            &dst,
            "SELECT attcompression::text FROM pg_attribute WHERE attrelid = 'docs'::regclass AND attname = 'body'"
        )
        .await,
        ""
    );
    assert_identical(&src, &dst);

    let (src, dst) = fresh_db_pair("t_toast_keep").await;
    exec(&src, fill).await;
    let dir = workdir("toast-keep");
    pgtide_ok(
        &Args::clone(&src, &dst, dir.to_str().unwrap()).args(&["--toast-compression", "keep"]),
    );
    assert_eq!(scalar_string(&dst, methods).await, "pglz");
    assert_identical(&src, &dst);
}
