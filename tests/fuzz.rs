//! The differential fuzzer (DESIGN.md, "A differential oracle"): per seed, a random schema over
//! the type catalogue, random source settings and random DML in random-size transactions,
//! replicated by `clone --follow` into one target database and by a native subscription into
//! another; both must end identical to the source, table by table, row by row.
//!
//! `cargo test --test fuzz` (through scripts/test.sh) runs the CI subset: PGTIDE_FUZZ_SEEDS
//! seeds (default 20) from PGTIDE_FUZZ_FIRST_SEED (default 1), PGTIDE_FUZZ_JOBS at a time
//! (default 3). `scripts/fuzz.sh N [FIRST]` runs N seeds. A failing seed prints the seed, the
//! SQL and the first differing rows, and writes them to target/fuzz-failures/seed-N.sql.

mod common;
#[path = "fuzz/gen.rs"]
mod generator;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use generator::{Case, Features};
use pgtide::failpoints::COPY_BEFORE_COMMIT;

/// What every comparing session sets, whatever the database's defaults: the text form of
/// every value is then the same on all three sides.
const COMPARE_SETTINGS: &str = "SET DateStyle = 'ISO, MDY'; SET IntervalStyle = postgres;
    SET bytea_output = hex; SET extra_float_digits = 3; SET TimeZone = 'UTC';
    SET search_path = public; SET lc_monetary = 'C.UTF-8';";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
        .unwrap_or(default)
}

#[test]
fn differential_fuzz() {
    // PGTIDE_FUZZ_REPRO=a.sql,b.sql: run these scripts (as `Case::script` writes them,
    // hand-minimised for instance) instead of generated cases, one per seed.
    let repro: Option<Vec<String>> = std::env::var("PGTIDE_FUZZ_REPRO")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    let seeds = env_u64(
        "PGTIDE_FUZZ_SEEDS",
        repro.as_ref().map_or(20, |r| r.len() as u64),
    );
    let first = env_u64("PGTIDE_FUZZ_FIRST_SEED", 1);
    let jobs = env_u64("PGTIDE_FUZZ_JOBS", 3).max(1);
    let features = Features::from_env();
    eprintln!(
        "fuzz: seeds {first}..{} ({jobs} at a time), {}",
        first + seeds - 1,
        features.describe()
    );
    let queue = std::sync::Mutex::new((first..first + seeds).collect::<Vec<_>>());
    let failures = std::sync::Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                loop {
                    let Some(seed) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    let t0 = Instant::now();
                    let case = match &repro {
                        Some(files) => {
                            let path = &files[((seed - first) as usize) % files.len()];
                            Case::from_script(seed, &std::fs::read_to_string(path).unwrap())
                        }
                        None => generator::generate(seed, &features),
                    };
                    match rt.block_on(run_seed(&case)) {
                        Ok(times) => eprintln!(
                            "fuzz: seed {seed} ok ({:.1} s: {times})",
                            t0.elapsed().as_secs_f64()
                        ),
                        Err(report) => {
                            let path = write_failure(seed, &report);
                            eprintln!(
                                "fuzz: seed {seed} FAILED (written to {}):\n{report}",
                                path.display()
                            );
                            failures.lock().unwrap().push(seed);
                        }
                    }
                }
            });
        }
    });
    let mut failed = failures.into_inner().unwrap();
    failed.sort();
    eprintln!(
        "fuzz: {seeds} seeds in {:.0} s, {} failed",
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "seeds failed: {failed:?} (rerun one with PGTIDE_FUZZ_FIRST_SEED=N PGTIDE_FUZZ_SEEDS=1; see target/fuzz-failures/)"
    );
}

fn write_failure(seed: u64, report: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("seed-{seed}.sql"));
    std::fs::write(&path, report).unwrap();
    path
}

/// Errors carry the whole reproducible case.
fn fail(case: &Case, db: &str, what: String) -> String {
    format!("seed {}: {what}\n\n{}", case.seed, case.script(db))
}

async fn try_exec(uri: &str, sql: &str) -> Result<(), String> {
    let (client, conn) = tokio_postgres::connect(uri, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    tokio::spawn(conn);
    client
        .batch_execute(sql)
        .await
        .map_err(|e| format!("{}\nin:\n{sql}", db_error(&e)))
}

fn db_error(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| format!("{}: {}", d.code().code(), d.message()))
        .unwrap_or_else(|| e.to_string())
}

/// Drops a subscription a previous run left in `db` (its slot on the source too), then the db.
async fn drop_native_db(db: &str) {
    let admin = connect(&admin_uri("target")).await;
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
        .await
        .unwrap()
        .is_some();
    if exists {
        let client = connect(&db_uri("target", db)).await;
        let subs = client
            .query(
                "SELECT subname FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .unwrap();
        for s in subs {
            let name: String = s.get(0);
            // The source database may be gone: detach the slot first, drop it by hand below.
            let _ = client
                .batch_execute(&format!(
                    "ALTER SUBSCRIPTION {name} DISABLE; ALTER SUBSCRIPTION {name} SET (slot_name = NONE); DROP SUBSCRIPTION {name};"
                ))
                .await;
        }
        drop(client);
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await
            .unwrap();
    }
}

/// Where a seed's time went, for the log.
#[derive(Default)]
struct Times(Vec<(&'static str, Instant)>);

impl Times {
    fn mark(&mut self, what: &'static str) {
        self.0.push((what, Instant::now()));
    }
}

impl std::fmt::Display for Times {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for w in self.0.windows(2) {
            write!(f, "{} {:.1} ", w[1].0, (w[1].1 - w[0].1).as_secs_f64())?;
        }
        Ok(())
    }
}

async fn run_seed(case: &Case) -> Result<String, String> {
    let mut times = Times::default();
    times.mark("start");
    let db = format!("fz_{}", case.seed);
    let native_db = format!("fz_{}_n", case.seed);
    let sub = format!("fz_{}_sub", case.seed);
    let slot = format!("fz_{}_slot", case.seed);
    drop_native_db(&native_db).await;
    // fresh_db_pair drops the slots of the source database (the subscription's too).
    let (src, dst) = fresh_db_pair(&db).await;
    exec(
        &admin_uri("target"),
        &format!("CREATE DATABASE {native_db}"),
    )
    .await;
    let nat = db_uri("target", &native_db);
    let dir = workdir(&format!("fuzz-{}", case.seed));
    let d = dir.to_str().unwrap().to_string();

    // The source database's settings come first: every later session inherits them.
    for (k, v) in &case.settings {
        exec(
            &admin_uri("source"),
            &format!("ALTER DATABASE {db} SET {k} = {v}"),
        )
        .await;
    }
    try_exec(&src, &case.schema)
        .await
        .map_err(|e| fail(case, &db, format!("the schema failed on the source: {e}")))?;
    try_exec(&nat, &case.schema).await.map_err(|e| {
        fail(
            case,
            &db,
            format!("the schema failed on the native target: {e}"),
        )
    })?;
    try_exec(&src, &case.initial)
        .await
        .map_err(|e| fail(case, &db, format!("the initial rows failed: {e}")))?;

    // The native side: a publication with pgtide's semantics (FOR TABLE the ordinary and
    // partitioned tables, partitions through their parent), a subscription that copies.
    let tables: Vec<String> = user_tables(&src).await.into_iter().map(|t| t.0).collect();
    exec(
        &src,
        &format!("CREATE PUBLICATION fz_pub FOR TABLE {}", tables.join(", ")),
    )
    .await;
    let port = std::env::var("PGTIDE_SOURCE_PORT").expect("PGTIDE_SOURCE_PORT (scripts/test.sh)");
    exec(
        &nat,
        &format!(
            "CREATE SUBSCRIPTION {sub} CONNECTION 'host=127.0.0.1 port={port} dbname={db} user=postgres password={}' PUBLICATION fz_pub WITH (copy_data = true)",
            password()
        ),
    )
    .await;

    let failpoints = format!("{COPY_BEFORE_COMMIT}=sleep({})", case.copy_sleep_ms);
    let apply_jobs = apply_jobs(case.seed);
    let child = spawn_pgtide(
        &[
            clone_follow_args(&src, &dst, &d, &slot),
            vec!["--table-jobs", "2", "--index-jobs", "1"],
            vec!["--apply-jobs", apply_jobs.as_str()],
        ]
        .concat(),
        &[("FAILPOINTS", failpoints.as_str())],
    );
    times.mark("setup");
    let result = drive(case, &db, &src, &dst, &nat, &d, child, &mut times).await;
    // Whatever happened: the subscription and its slot go, pgtide cleans up after itself.
    let _ = try_exec(&nat, &format!("DROP SUBSCRIPTION IF EXISTS {sub}")).await;
    let _ = pgtide(&Args::cleanup(&src, &dst, &d));
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
        let drop_sql = format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)");
        let (source_admin, target_admin) = (admin_uri("source"), admin_uri("target"));
        let _ = tokio::join!(
            drop_native_db(&native_db),
            try_exec(&source_admin, &drop_sql),
            try_exec(&target_admin, &drop_sql),
        );
    }
    times.mark("cleanup");
    result.map(|()| times.to_string())
}

/// The apply lanes a seed runs with: even seeds apply with three lanes (parallel apply, held to
/// the same oracle), odd seeds with one; `PGTIDE_FUZZ_APPLY_JOBS=N` runs every seed with N.
/// Derived from the seed, so a failing seed reruns the same way.
fn apply_jobs(seed: u64) -> String {
    match std::env::var("PGTIDE_FUZZ_APPLY_JOBS") {
        Ok(jobs) => jobs,
        Err(_) if seed.is_multiple_of(2) => "3".to_string(),
        Err(_) => "1".to_string(),
    }
}

fn phase(dir: &str) -> String {
    rusqlite::Connection::open(PathBuf::from(dir).join("state.db"))
        .and_then(|c| {
            c.query_row("SELECT value FROM meta WHERE key = 'phase'", [], |r| {
                r.get(0)
            })
        })
        .unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    case: &Case,
    db: &str,
    src: &str,
    dst: &str,
    nat: &str,
    d: &str,
    mut child: PgtideChild,
    times: &mut Times,
) -> Result<(), String> {
    let dead = |child: PgtideChild, when: &str| {
        let out = wait_exit(child, 5);
        fail(
            case,
            db,
            format!("clone --follow exited {when}:\n{}", text(&out)),
        )
    };
    // The slot's consistent point: what is committed before it is copied, after it streamed.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !PathBuf::from(d).join("state.db").exists() || state_startpos(d).is_none() {
        if child.try_wait().unwrap().is_some() {
            return Err(dead(child, "before its slot existed"));
        }
        if Instant::now() > deadline {
            child.kill().ok();
            return Err(dead(child, "(killed: no slot after 60 s)"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    times.mark("slot");
    for t in &case.during_copy {
        try_exec(src, t)
            .await
            .map_err(|e| fail(case, db, format!("DML failed on the source: {e}")))?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while phase(d) != "following" {
        if child.try_wait().unwrap().is_some() {
            return Err(dead(child, "before it followed"));
        }
        if Instant::now() > deadline {
            child.kill().ok();
            return Err(dead(child, "(killed: not following after 120 s)"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    times.mark("copy");
    for t in &case.after_copy {
        try_exec(src, t)
            .await
            .map_err(|e| fail(case, db, format!("DML failed on the source: {e}")))?;
    }
    exec(src, "INSERT INTO public.fuzz_done VALUES (1)").await;
    let endpos = pgtide(&[
        "sentinel",
        "set",
        "endpos",
        "--current",
        "--dir",
        d,
        "--source",
        src,
    ]);
    if !endpos.status.success() {
        child.kill().ok();
        let _ = child.wait();
        return Err(fail(
            case,
            db,
            format!("sentinel set endpos failed:\n{}", text(&endpos)),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().ok();
            return Err(dead(child, "(killed: endpos not reached after 120 s)"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    times.mark("endpos");
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(fail(
            case,
            db,
            format!("clone --follow failed:\n{}", text(&out)),
        ));
    }

    // The native subscription is done when every table is synchronized and the marker row,
    // committed after all the DML, has arrived (the apply worker keeps commit order).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (client, conn) = tokio_postgres::connect(nat, tokio_postgres::NoTls)
            .await
            .map_err(|e| fail(case, db, db_error(&e)))?;
        tokio::spawn(conn);
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'),
                        (SELECT count(*) FROM public.fuzz_done)",
                &[],
            )
            .await
            .map_err(|e| fail(case, db, db_error(&e)))?;
        let (unsynced, done): (i64, i64) = (row.get(0), row.get(1));
        if unsynced == 0 && done == 1 {
            break;
        }
        if Instant::now() > deadline {
            return Err(fail(
                case,
                db,
                format!(
                    "the native subscription did not catch up in 120 s ({unsynced} tables not ready, marker {done}); see the target's log"
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    times.mark("native");
    // A throwaway check that the comparison catches a difference: PGTIDE_FUZZ_TAMPER=SQL runs
    // on the native target just before the comparison.
    if let Ok(sql) = std::env::var("PGTIDE_FUZZ_TAMPER") {
        try_exec(nat, &sql).await.map_err(|e| fail(case, db, e))?;
    }
    let mut diffs = Vec::new();
    let sides = [
        ("source", src),
        ("pgtide target", dst),
        ("native target", nat),
    ];
    let mut clients = Vec::new();
    for (_, uri) in sides {
        clients.push(compare_session(uri).await.map_err(|e| fail(case, db, e))?);
    }
    for (table, partitioned) in user_tables(src).await {
        // A digest per side first; the rows themselves only where they differ.
        let mut digests = Vec::new();
        for client in &clients {
            digests.push(
                read_table(client, &table, partitioned, true)
                    .await
                    .map_err(|e| fail(case, db, e))?,
            );
        }
        if digests.iter().all(|d| *d == digests[0]) {
            continue;
        }
        let source_rows = read_table(&clients[0], &table, partitioned, false)
            .await
            .map_err(|e| fail(case, db, e))?;
        for i in 1..3 {
            if digests[i] != digests[0] {
                let rows = read_table(&clients[i], &table, partitioned, false)
                    .await
                    .map_err(|e| fail(case, db, e))?;
                diffs.push(describe_diff(sides[i].0, &table, &source_rows, &rows));
            }
        }
    }
    times.mark("compare");
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(fail(
            case,
            db,
            format!(
                "{}\nclone --follow's output (PGTIDE_LOG=debug for more):\n{}",
                diffs.join("\n"),
                text(&out)
            ),
        ))
    }
}

/// The source's tables (quoted, qualified; partitions through their parent), and whether each
/// is partitioned: what pgtide publishes.
async fn user_tables(src: &str) -> Vec<(String, bool)> {
    connect(src)
        .await
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname), c.relkind = 'p' FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND n.nspname IN ('public', 'fz')
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn state_startpos(d: &str) -> Option<String> {
    rusqlite::Connection::open(PathBuf::from(d).join("state.db"))
        .and_then(|c| {
            c.query_row(
                "SELECT value FROM meta WHERE key = 'stream.startpos'",
                [],
                |r| r.get(0),
            )
        })
        .ok()
}

/// A session that prints every value the same way on every side.
async fn compare_session(uri: &str) -> Result<tokio_postgres::Client, String> {
    let (client, conn) = tokio_postgres::connect(uri, tokio_postgres::NoTls)
        .await
        .map_err(|e| db_error(&e))?;
    tokio::spawn(conn);
    client
        .batch_execute(COMPARE_SETTINGS)
        .await
        .map_err(|e| db_error(&e))?;
    Ok(client)
}

/// A table's rows as text, sorted (or, with `digest`, their count and md5 as one string);
/// a partitioned table's rows carry the partition they are in.
async fn read_table(
    client: &tokio_postgres::Client,
    table: &str,
    partitioned: bool,
    digest: bool,
) -> Result<Vec<String>, String> {
    let expr = if partitioned {
        "t.tableoid::regclass::text || ' ' || t::text"
    } else {
        "t::text"
    };
    let sql = if digest {
        format!(
            "SELECT count(*) || ' ' || coalesce(md5(string_agg(r, E'\\n' ORDER BY r COLLATE \"C\")), '')
             FROM (SELECT {expr} AS r FROM {table} t) s"
        )
    } else {
        format!("SELECT r FROM (SELECT {expr} AS r FROM {table} t) s ORDER BY r COLLATE \"C\"")
    };
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(|e| format!("cannot read {table}: {}", db_error(&e)))?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

fn clip(s: &str) -> String {
    if s.len() > 300 {
        let mut end = 300;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} bytes)", &s[..end], s.len())
    } else {
        s.to_string()
    }
}

fn describe_diff(side: &str, table: &str, expected: &[String], got: &[String]) -> String {
    let mut missing: Vec<&String> = Vec::new();
    let mut extra: Vec<&String> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < expected.len() || j < got.len() {
        match (expected.get(i), got.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                missing.push(a);
                i += 1;
            }
            (Some(_), Some(b)) => {
                extra.push(b);
                j += 1;
            }
            (Some(a), None) => {
                missing.push(a);
                i += 1;
            }
            (None, Some(b)) => {
                extra.push(b);
                j += 1;
            }
            (None, None) => break,
        }
    }
    let mut s = format!(
        "{side} differs from the source in {table}: {} rows there, {} on the source\n",
        got.len(),
        expected.len()
    );
    for r in missing.iter().take(5) {
        s.push_str(&format!("  only on the source: {}\n", clip(r)));
    }
    for r in extra.iter().take(5) {
        s.push_str(&format!("  only on the {side}: {}\n", clip(r)));
    }
    s
}
