//! Schemas as users really have them (issue 10, items 16–23): odd names, filters that leave
//! dependents behind, sequences shared by defaults, a source search_path, a target prepared by
//! its DBA (an empty schema, a pre-installed extension), pgcopydb-style filters files, noisy
//! servers. Each runs the real pgtide against the real clusters.

mod common;

use common::*;

fn clone_args<'a>(src: &'a str, dst: &'a str, dir: &'a str) -> Vec<&'a str> {
    vec!["clone", "--source", src, "--target", dst, "--dir", dir]
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
