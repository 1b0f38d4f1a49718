//! Across server versions: pgtide picks a pg_dump / pg_restore pair that can dump the source
//! (the target's major when found, never an explicit PGTIDE_PG_BIN overridden), and verify
//! compares what a migration preserves whatever each major's catalogs say (PG18 catalogs NOT
//! NULL as constraints), while a real difference is still reported.
//! Needs the version clusters of scripts/test.sh (`PGTIDE_TEST_MAJORS` with 12 16 17 18).

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The operator's PGTIDE_PG_BIN of scripts/test.sh: Debian's PostgreSQL 15 client tools.
fn debian15_bin() -> PathBuf {
    let bin = PathBuf::from(
        std::env::var("PGTIDE_PG_BIN").expect("PGTIDE_PG_BIN is not set: run scripts/test.sh"),
    );
    let out = std::process::Command::new(bin.join("pg_dump"))
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(version.contains(") 15."), "expected pg_dump 15: {version}");
    bin
}

/// A PATH as on a Debian machine with PostgreSQL 15 installed: /usr/bin (whose pg_dump is
/// Debian's pg_wrapper, which runs 15) first, then `extra`.
fn path_with(extra: &Path) -> String {
    format!("/usr/local/bin:/usr/bin:/bin:{}", extra.display())
}

/// The `check` line for pg_dump: (level, the rest of the line and its fix line).
fn pg_dump_line(out: &str) -> String {
    let mut lines = out.lines();
    while let Some(line) = lines.next() {
        if line.contains("local pg_dump") {
            return format!("{line}\n{}", lines.next().unwrap_or(""));
        }
    }
    panic!("no local pg_dump line in:\n{out}");
}

/// The target holds nothing of the source's (and nothing of pgtide's).
async fn assert_target_untouched(target: &str) {
    let created = scalar_i64(
        target,
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'",
    )
    .await
        + scalar_i64(
            target,
            "SELECT count(*) FROM pg_namespace WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'public', 'pg_toast')
               AND nspname NOT LIKE 'pg\\_temp\\_%' AND nspname NOT LIKE 'pg\\_toast\\_temp\\_%'",
        )
        .await;
    assert_eq!(created, 0, "the target was changed");
}

/// PGTIDE_PG_BIN unset, Debian's wrapper (15) first on the PATH and the client tools 18 later:
/// for a 17 source and an 18 target pgtide takes the 18 pair (check says so, clone logs it)
/// and the clone works.
#[tokio::test(flavor = "multi_thread")]
async fn without_pg_bin_the_targets_pg_dump_is_found() {
    let (src, dst) =
        fresh_db_pair_between(&version_uri(17), &version_uri(18), "t_vc_tools_path").await;
    exec(
        &src,
        "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);
         INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g;",
    )
    .await;
    let client18 = client18_bin();
    let path = path_with(&client18);
    let dir = workdir("vc-tools-path");
    let d = dir.to_str().unwrap();

    let out = pgtide_command(&["check", "--offline", "--source", &src, "--target", &dst])
        .env_remove("PGTIDE_PG_BIN")
        .env("PATH", &path)
        .output()
        .unwrap();
    let all = text(&out);
    let line = pg_dump_line(&all);
    assert!(
        line.starts_with("OK") && line.contains("pg_dump 18."),
        "check should report pg_dump 18:\n{all}"
    );
    assert!(
        line.contains(&client18.join("pg_dump").display().to_string()),
        "check should name the client tools 18:\n{all}"
    );

    let out = pgtide_command(&Args::clone(&src, &dst, d))
        .env_remove("PGTIDE_PG_BIN")
        .env("PATH", &path)
        .env("PGTIDE_LOG", "info")
        .output()
        .unwrap();
    let all = text(&out);
    assert!(out.status.success(), "clone failed:\n{all}");
    let used: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("using pg_dump"))
        .collect();
    assert_eq!(used.len(), 1, "logged once:\n{all}");
    assert!(
        used[0].contains("pg_dump 18.")
            && used[0].contains(&client18.join("pg_dump").display().to_string()),
        "{all}"
    );
    assert_eq!(scalar_i64(&dst, "SELECT count(*) FROM items").await, 100);
    assert_identical(&src, &dst);
    let _ = std::fs::remove_dir_all(&dir);
}

/// PGTIDE_PG_BIN is the operator's choice: pointing at the 15 tools for a 16 source, check and
/// clone fail with the fix (even with good tools on the PATH), and nothing is created.
#[tokio::test(flavor = "multi_thread")]
async fn an_explicit_pg_bin_too_old_is_refused_with_the_fix() {
    let (src, dst) =
        fresh_db_pair_between(&version_uri(16), &version_uri(18), "t_vc_tools_old").await;
    exec(&src, "CREATE TABLE items (id int PRIMARY KEY)").await;
    let old = debian15_bin();
    let path = path_with(&client18_bin());
    let fix = "install the PostgreSQL 16 client tools (or newer), or set PGTIDE_PG_BIN to their bin directory";
    let dir = workdir("vc-tools-old");
    let d = dir.to_str().unwrap();

    let out = pgtide_command(&["check", "--offline", "--source", &src, "--target", &dst])
        .env("PGTIDE_PG_BIN", &old)
        .env("PATH", &path)
        .output()
        .unwrap();
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    let line = pg_dump_line(&all);
    assert!(line.starts_with("FAIL"), "{all}");
    assert!(
        line.contains(&old.display().to_string()) && line.contains("15."),
        "the message names the tools and their version:\n{all}"
    );
    assert!(line.contains(fix), "{all}");

    let out = pgtide_command(&Args::clone(&src, &dst, d))
        .env("PGTIDE_PG_BIN", &old)
        .env("PATH", &path)
        .output()
        .unwrap();
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains(fix), "{all}");
    assert!(all.contains("nothing was created"), "{all}");
    assert_target_untouched(&dst).await;
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        )
        .await,
        0,
        "no slot left on the source"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Everything a migration must preserve, in the forms each major catalogs differently: NOT NULL
/// (constraints in PG18's pg_constraint), CHECK, foreign keys (one to a partitioned table),
/// unique and exclusion constraints, a partitioned table with bounds and a default partition,
/// identity and generated columns, defaults, domains with constraints, inheritance.
const SCHEMA: &str = "
CREATE DOMAIN posint AS int NOT NULL DEFAULT 1 CHECK (VALUE > 0);
CREATE TABLE parent (id int PRIMARY KEY, name text NOT NULL UNIQUE);
CREATE TABLE wide_docs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    parent_id int NOT NULL REFERENCES parent (id) ON DELETE CASCADE,
    title text NOT NULL CHECK (length(title) > 0),
    body text DEFAULT 'none',
    price numeric(10,2) NOT NULL DEFAULT 0,
    total numeric GENERATED ALWAYS AS (price * 2) STORED,
    rank posint,
    created timestamptz NOT NULL DEFAULT now(),
    updated timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
    code varchar(10) COLLATE \"C\",
    tags text[] DEFAULT '{}'::text[],
    UNIQUE (parent_id, title),
    CONSTRAINT price_sane CHECK (price >= 0 AND price < 1000000) NOT VALID
);
CREATE INDEX wide_docs_lower_title ON wide_docs (lower(title)) WHERE body IS NOT NULL;
CREATE TABLE counters (id int GENERATED BY DEFAULT AS IDENTITY (START WITH 10 INCREMENT BY 5) PRIMARY KEY, n int);
CREATE TABLE bookings (
    id int PRIMARY KEY,
    room int NOT NULL,
    during tsrange NOT NULL,
    EXCLUDE USING gist (during WITH &&)
);
CREATE TABLE events (
    id bigint NOT NULL,
    at date NOT NULL,
    kind text NOT NULL DEFAULT 'x',
    parent_id int REFERENCES parent (id),
    PRIMARY KEY (id, at),
    CHECK (id > 0)
) PARTITION BY RANGE (at);
CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE events_default PARTITION OF events DEFAULT;
CREATE TABLE event_refs (
    id int PRIMARY KEY,
    event_id bigint,
    event_at date,
    FOREIGN KEY (event_id, event_at) REFERENCES events (id, at)
);
CREATE SEQUENCE extras_seq START 100;
CREATE TABLE extras (
    id int PRIMARY KEY,
    a int,
    b text COLLATE \"C\",
    due date DEFAULT (CURRENT_DATE + 7),
    seq_val bigint DEFAULT nextval('public.extras_seq'),
    parent_id int DEFAULT 1,
    CONSTRAINT extras_a_b_key UNIQUE (a, b) DEFERRABLE INITIALLY DEFERRED,
    CONSTRAINT extras_a_check CHECK (a IS NULL OR a > 0) NO INHERIT,
    CONSTRAINT extras_parent_fkey FOREIGN KEY (parent_id) REFERENCES parent (id)
        MATCH FULL ON UPDATE SET DEFAULT ON DELETE SET NULL DEFERRABLE
);
CREATE INDEX extras_include ON extras (a DESC NULLS LAST) INCLUDE (b);
CREATE INDEX extras_hash ON extras USING hash (b);
CREATE INDEX extras_brin ON extras USING brin (due);
CREATE INDEX extras_opclass ON extras (b text_pattern_ops) WHERE a BETWEEN 1 AND 10;
CREATE TABLE base_log (id int NOT NULL, msg text NOT NULL);
CREATE TABLE child_log (extra int NOT NULL) INHERITS (base_log);
INSERT INTO parent VALUES (1, 'one'), (2, 'two');
INSERT INTO wide_docs (parent_id, title, price, rank) SELECT 1 + g % 2, 'doc ' || g, g, g FROM generate_series(1, 50) g;
INSERT INTO counters (n) SELECT g FROM generate_series(1, 5) g;
INSERT INTO bookings VALUES (1, 1, '[2025-01-01, 2025-01-02)'), (2, 1, '[2025-01-02, 2025-01-03)');
INSERT INTO events VALUES (1, '2024-05-01', 'a', 1), (2, '2025-05-01', 'b', NULL), (3, '2030-01-01', 'c', 2);
INSERT INTO event_refs VALUES (1, 1, '2024-05-01'), (2, NULL, NULL);
INSERT INTO extras (id, a, b) VALUES (1, 1, 'x'), (2, NULL, 'y');
INSERT INTO base_log VALUES (1, 'a');
INSERT INTO child_log VALUES (2, 'b', 3);
";

/// Clones the schema from `source_major` to 18 with pg_dump 18, verifies identical, then drops
/// a NOT NULL on the target: verify reports that column.
async fn verify_across(source_major: u32) {
    let name = format!("t_vc_verify_{source_major}");
    // The PostgreSQL 15 cluster is the suite's own source.
    let source_admin = match source_major {
        15 => admin_uri("source"),
        major => version_uri(major),
    };
    let (src, dst) = fresh_db_pair_between(&source_admin, &version_uri(18), &name).await;
    exec(&src, SCHEMA).await;
    let dir = workdir(&format!("vc-verify-{source_major}"));
    let out = pgtide_command(&Args::clone(&src, &dst, dir.to_str().unwrap()))
        .env("PGTIDE_PG_BIN", client18_bin())
        .output()
        .unwrap();
    assert!(out.status.success(), "clone failed:\n{}", text(&out));
    assert_identical(&src, &dst);

    exec(
        &dst,
        "ALTER TABLE public.wide_docs ALTER COLUMN updated DROP NOT NULL",
    )
    .await;
    let out = pgtide_fails(&Args::verify(&src, &dst));
    let reported: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("public.wide_docs.updated"))
        .collect();
    assert!(
        reported.len() == 1 && reported[0].contains("NOT NULL"),
        "verify should report the NOT NULL of wide_docs.updated:\n{out}"
    );
    assert!(out.contains("; 1 differ"), "only that difference:\n{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_16_to_18_knows_not_null_constraints() {
    verify_across(16).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_17_to_18_knows_not_null_constraints() {
    verify_across(17).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_15_to_18_knows_not_null_constraints() {
    verify_across(15).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_18_to_18_knows_not_null_constraints() {
    verify_across(18).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_12_to_18_knows_not_null_constraints() {
    verify_across(12).await;
}

/// The comparisons that know each major's catalogs still report what a migration lost: a
/// column's type and default, a domain's NOT NULL (a constraint on 18, typnotnull before) and
/// CHECK, a partition detached, a foreign key dropped; nothing else.
#[tokio::test(flavor = "multi_thread")]
async fn verify_16_to_18_still_reports_real_differences() {
    let (src, dst) =
        fresh_db_pair_between(&version_uri(16), &version_uri(18), "t_vc_verify_real").await;
    exec(&src, SCHEMA).await;
    let dir = workdir("vc-verify-real");
    let out = pgtide_command(&Args::clone(&src, &dst, dir.to_str().unwrap()))
        .env("PGTIDE_PG_BIN", client18_bin())
        .output()
        .unwrap();
    assert!(out.status.success(), "clone failed:\n{}", text(&out));
    assert_identical(&src, &dst);

    exec(
        &dst,
        "ALTER TABLE public.parent ALTER COLUMN name TYPE varchar(100);
         ALTER TABLE public.extras ALTER COLUMN due SET DEFAULT CURRENT_DATE;
         ALTER DOMAIN public.posint DROP NOT NULL;
         ALTER TABLE public.events DETACH PARTITION public.events_default;
         ALTER TABLE public.event_refs DROP CONSTRAINT event_refs_event_id_event_at_fkey;",
    )
    .await;
    let out = pgtide_fails(&Args::verify(&src, &dst));
    for (kind, name) in [
        ("column", "public.parent.name"),
        ("column", "public.extras.due"),
        ("domain", "public.posint"),
        ("partition", "public.events_default"),
        (
            "constraint",
            "public.event_refs.event_refs_event_id_event_at_fkey",
        ),
    ] {
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with(&format!("{kind} {name}:"))),
            "verify should report {kind} {name}:\n{out}"
        );
    }
    assert!(out.contains("; 5 differ"), "only those differences:\n{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
