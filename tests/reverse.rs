//! A cutover you can undo (issue 16): `cutover --reverse --fence` under traffic, the
//! application writing to the target (inserts, updates, deletes, TOASTed values, sequence
//! use) while `reverse follow` applies it to the source and is SIGKILLed once, then
//! `rollback`: the source holds exactly what the target had, its sequences are not behind,
//! and the application writes to the source again. On servers of the test's own: the reverse
//! stream needs wal_level = logical on the target.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use tokio_postgres::error::SqlState;

const CONF: &str = "wal_level = logical\nmax_replication_slots = 8\nmax_wal_senders = 8\n";

/// The same server as `uri`, logged in as the application role.
fn as_app(uri: &str) -> String {
    format!(
        "postgres://app_writer:writer-secret@{}",
        uri.split_once('@').unwrap().1
    )
}

/// The application: inserts (using the sequence), updates, deletes and TOASTed rewrites
/// until `stop` is set or a statement fails (the fence ends it). Returns what it committed
/// and the error that stopped it, if one did.
async fn application(
    uri: String,
    tag: &'static str,
    stop: Arc<AtomicBool>,
) -> (u64, Option<tokio_postgres::Error>) {
    let app = connect(&uri).await;
    let mut committed = 0u64;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let sql = match i % 5 {
            0 => format!(
                "UPDATE docs SET body = repeat(md5('{tag}{i}'), 300) WHERE id = {}",
                i % 50 + 1
            ),
            1 => "DELETE FROM items WHERE id = (SELECT min(id) FROM items)".to_string(),
            2 => format!(
                "UPDATE items SET n = n + 1, v = '{tag} {i}' WHERE id = (SELECT max(id) FROM items)"
            ),
            _ => format!("INSERT INTO items (v) VALUES ('{tag} {i}')"),
        };
        match app.batch_execute(&sql).await {
            Ok(()) => committed += 1,
            Err(e) => return (committed, Some(e)),
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    (committed, None)
}

/// Runs the application against `uri` for `millis`, and returns what it committed.
async fn write_for(uri: &str, tag: &'static str, millis: u64) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let app = tokio::spawn(application(uri.to_string(), tag, stop.clone()));
    tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
    stop.store(true, Ordering::Relaxed);
    let (committed, error) = app.await.unwrap();
    assert!(
        error.is_none(),
        "the application failed on {tag}: {error:?}"
    );
    assert!(committed > 0, "the application wrote nothing on {tag}");
    committed
}

fn is_read_only(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cutover_with_a_reverse_stream_rolls_back_with_nothing_lost() {
    let AppServers {
        source: _source,
        target: _target,
        src,
        dst,
    } = app_servers("reverse", CONF, CONF, "").await;
    exec(
        &src,
        "CREATE TABLE items (id bigserial PRIMARY KEY, v text, n int NOT NULL DEFAULT 0);
         CREATE TABLE docs (id int PRIMARY KEY, body text);
         INSERT INTO items (v) SELECT 'seed ' || g FROM generate_series(1, 2000) g;
         INSERT INTO docs SELECT g, repeat(md5(g::text), 300) FROM generate_series(1, 50) g;
         GRANT ALL ON items, docs, items_id_seq TO app_writer;",
    )
    .await;
    let dir = workdir("reverse");
    let d = dir.to_str().unwrap();
    // check says whether the target can carry a reverse stream.
    let checked = text(&pgtide(&[
        "check", "--source", &src, "--target", &dst, "--dir", d,
    ]));
    assert!(
        checked.contains("target reverse stream")
            && checked.contains("`cutover --reverse` can keep a rollback possible"),
        "{checked}"
    );
    let servers = ["--source", &src, "--target", &dst, "--dir", d];
    let mut child = spawn_pgtide(&clone_follow_args(&src, &dst, d, "rev_slot"), &[]);
    // The application writes on the source until the fence ends it.
    let forward_app = tokio::spawn(application(
        as_app(&src),
        "source",
        Arc::new(AtomicBool::new(false)),
    ));
    wait_for_status(&servers, 120, &mut child, |json| {
        says_ready(json, "/verdict")
    })
    .await;

    let cutover = [
        &["cutover"][..],
        &servers,
        &["--fence", "--reverse", "--timeout", "120s"],
    ]
    .concat();
    // SIGKILLed once fenced with endpos pinned: the rerun finishes the cutover.
    kill_after_endpos(&cutover, d).await;
    let out = pgtide_ok(&cutover);
    eprintln!("{out}");
    assert!(
        out.contains("cutover complete") && out.contains("reverse stream:    slot rev_slot_rev"),
        "{out}"
    );
    let (committed, error) = forward_app.await.unwrap();
    assert!(committed > 0, "the application never wrote on the source");
    let error = error.expect("the fence did not stop the application");
    assert!(
        error.code() == Some(&SqlState::ADMIN_SHUTDOWN) || error.is_closed(),
        "{error:?}"
    );
    let out = wait_exit(child, 60);
    assert!(out.status.success(), "{}", text(&out));
    assert_identical(&src, &dst);
    // The forward slot is gone (it would hold the source's WAL); the reverse one is there.
    assert_eq!(
        scalar_i64(&src, "SELECT count(*) FROM pg_replication_slots").await,
        0
    );
    assert_eq!(
        scalar_string(
            &dst,
            "SELECT string_agg(slot_name, ',') FROM pg_replication_slots"
        )
        .await,
        "rev_slot_rev"
    );
    // The application cannot write on the fenced source.
    let refused = connect(&as_app(&src))
        .await
        .batch_execute("INSERT INTO items (v) VALUES ('fenced')")
        .await
        .unwrap_err();
    assert!(is_read_only(&refused), "{refused:?}");
    // A rerun of the completed cutover changes nothing.
    let again = pgtide_ok(&cutover);
    assert!(again.contains("already done earlier"), "{again}");

    // The echo filter: a transaction on the target under the forward apply's origin (as the
    // forward apply wrote them) is not sent back. The same row is on the source, so an echo
    // would stop the reverse apply on a duplicate key.
    // (Three statements of their own: the origin is the session's when the INSERT commits.)
    let forward_apply = connect(&dst).await;
    for sql in [
        "SELECT pg_replication_origin_session_setup('pgtide_rev_slot')",
        "INSERT INTO docs VALUES (100000, 'echo')",
        "SELECT pg_replication_origin_session_reset()",
    ] {
        forward_apply.batch_execute(sql).await.unwrap();
    }
    drop(forward_apply);
    exec(
        &src,
        "BEGIN READ WRITE; INSERT INTO docs VALUES (100000, 'echo'); COMMIT",
    )
    .await;

    // The application moves to the target; the reverse stream follows it, killed once.
    let reverse_follow = [&["reverse", "follow"][..], &servers].concat();
    let mut reverse = spawn_pgtide(&reverse_follow, &[]);
    write_for(&as_app(&dst), "target-1", 2500).await;
    wait_for_status(&servers, 120, &mut reverse, |json| {
        json.pointer("/reverse/verdict")
            .and_then(|v| v.as_str())
            .is_some_and(|v| v.starts_with("ready to roll back"))
    })
    .await;
    reverse.kill().unwrap();
    let killed = reverse.wait_with_output().unwrap();
    assert!(!killed.status.success());
    write_for(&as_app(&dst), "target-2", 1500).await;
    let reverse = spawn_pgtide(&reverse_follow, &[]);
    write_for(&as_app(&dst), "target-3", 1500).await;
    exec(
        &dst,
        "SELECT nextval('items_id_seq') FROM generate_series(1, 25)",
    )
    .await;

    let rollback = [&["rollback"][..], &servers, &["--timeout", "120s"]].concat();
    // SIGKILLed once the target is fenced and its endpos pinned: the rerun finishes it.
    kill_after_endpos(&rollback, &format!("{d}/reverse")).await;
    let out = pgtide_ok(&rollback);
    eprintln!("{out}");
    assert!(
        out.contains("rollback complete") && out.contains("tables identical"),
        "{out}"
    );
    let out = wait_exit(reverse, 60);
    assert!(out.status.success(), "reverse follow: {}", text(&out));
    assert_identical(&src, &dst);
    let last = "SELECT last_value FROM items_id_seq";
    let (on_source, on_target) = (scalar_i64(&src, last).await, scalar_i64(&dst, last).await);
    assert!(
        on_source >= on_target,
        "source sequence {on_source} behind the target's {on_target}"
    );
    // The source takes the application back; the target is fenced.
    connect(&as_app(&src))
        .await
        .batch_execute("INSERT INTO items (v) VALUES ('back on the source')")
        .await
        .unwrap();
    let refused = connect(&as_app(&dst))
        .await
        .batch_execute("INSERT INTO items (v) VALUES ('fenced target')")
        .await
        .unwrap_err();
    assert!(is_read_only(&refused), "{refused:?}");
    let status = pgtide_ok_stdout(&[&["status", "--json"][..], &servers[..]].concat());
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(
        status.pointer("/reverse/rolled_back/endpos").is_some(),
        "{status}"
    );
    // A rerun of the finished rollback changes nothing.
    let again = pgtide_ok(&rollback);
    assert!(again.contains("already rolled back"), "{again}");

    pgtide_ok(&[&["rollback", "--unfence"][..], &servers].concat());
    connect(&as_app(&dst))
        .await
        .batch_execute("INSERT INTO items (v) VALUES ('target unfenced')")
        .await
        .unwrap();
    pgtide_ok(&[&["cleanup"][..], &servers].concat());
    for uri in [&src, &dst] {
        assert_eq!(
            scalar_i64(uri, "SELECT count(*) FROM pg_replication_slots").await,
            0
        );
        assert_eq!(
            scalar_i64(uri, "SELECT count(*) FROM pg_replication_origin").await,
            0
        );
        assert_eq!(
            scalar_i64(uri, "SELECT count(*) FROM pg_publication").await,
            0
        );
    }
}
