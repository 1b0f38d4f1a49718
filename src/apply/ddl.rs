//! DDL replay: a schema change captured on the source (see `replication::ddl_capture`) is run
//! on the target at its place in the commit order, inside the apply transaction that holds
//! its source transaction, with the source session's `search_path` and role. What cannot be
//! replayed faithfully stops apply with the statement, the reason and the fix; `pgtide ddl
//! skip|retry` records the operator's decision for the next run.

use std::collections::{HashMap, HashSet};

use anyhow::{Result, anyhow};
use tokio_postgres::Client;

use crate::clone::filters::{Filters, parse_table_name};
use crate::pg::sql_text::{self, Statement};
use crate::pg::{describe, quote_ident};
use crate::state::{DdlDecision, DdlId, DdlStop, StateDb};

/// Apply stopped at a schema change: not retried, not replayed row by row.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DdlStopped(pub String);

/// One captured schema change, as the source's event trigger wrote it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct DdlMessage {
    /// The top-level query string the change came from.
    pub query: String,
    /// The source session's search_path when it ran.
    pub search_path: String,
    /// The role it ran as.
    pub role: String,
    #[serde(default)]
    pub commands: Vec<CapturedObject>,
    #[serde(default)]
    pub dropped: Vec<CapturedObject>,
    /// Tables the trigger added to the publication (new tables).
    #[serde(default)]
    pub published: Vec<String>,
    /// Tables published by this change that already hold rows (they got a primary key, or
    /// were created by CREATE TABLE AS): rows written before are not in the stream.
    #[serde(default)]
    pub late_with_rows: Vec<String>,
    /// Tables the capture could not add to the publication, each with the source's error.
    #[serde(default)]
    pub publish_failed: Vec<String>,
    /// Tables created without a primary key or replica identity: not published.
    #[serde(default)]
    pub unpublished: Vec<String>,
    /// Columns whose existing rows the target would compute differently.
    #[serde(default, rename = "unsafe")]
    pub unsafe_columns: Option<String>,
}

/// An object a captured command created, altered or dropped.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct CapturedObject {
    #[serde(rename = "type")]
    pub object_type: String,
    pub schema: Option<String>,
    pub identity: String,
    #[serde(default)]
    pub tag: Option<String>,
    #[serde(default)]
    pub in_extension: bool,
}

/// What DDL replay needs from the work dir: how to recognize the capture's messages, the
/// migration's filters, the operator's decisions, and where to record a stop.
pub struct DdlRules {
    /// The prefix of this migration's DDL messages (with its token).
    pub prefix: Option<String>,
    /// The published log table carrying them where pgoutput has no messages (12, 13).
    pub log_table: Option<(String, String)>,
    pub filters: Filters,
    /// The tables the stream was set up with (they are followed whatever the filters say).
    published_at_start: HashSet<(String, String)>,
    decisions: HashMap<DdlId, DdlDecision>,
    state: Option<StateDb>,
}

impl DdlRules {
    /// The rules of a work dir.
    pub fn load(state: &StateDb) -> Result<Self> {
        let capture = state.ddl_capture()?;
        Ok(DdlRules {
            prefix: capture
                .as_ref()
                .map(|c| crate::replication::ddl_capture::message_prefix(&c.token)),
            log_table: capture.and_then(|c| c.log_table),
            filters: state.recorded_filters()?.unwrap_or_default(),
            published_at_start: state
                .stream()?
                .and_then(|s| s.tables)
                .unwrap_or_default()
                .into_iter()
                .collect(),
            decisions: state.ddl_decisions()?.into_iter().collect(),
            state: Some(state.clone()),
        })
    }

    /// Whether a relation is the DDL log table.
    pub fn is_log_table(&self, schema: &str, name: &str) -> bool {
        self.log_table
            .as_ref()
            .is_some_and(|(s, n)| s == schema && n == name)
    }

    /// Records the tables the capture published in the stream's table list: the migration
    /// follows them from now on (status, `follow --resync`, verify know them).
    fn record_published(&self, published: &[String]) -> Result<()> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        if published.is_empty() {
            return Ok(());
        }
        let mut tables = state.stream()?.and_then(|s| s.tables).unwrap_or_default();
        for name in published {
            if let Ok(t) = parse_table_name(name) {
                let entry = (t.schema, t.name);
                if !tables.contains(&entry) {
                    tables.push(entry);
                }
            }
        }
        state.record_stream_tables(&tables)
    }

    /// Records the stop and returns the error apply stops with.
    fn stop(&self, id: DdlId, message: &DdlMessage, reason: &str, fix: &str) -> anyhow::Error {
        let stop = DdlStop {
            id,
            statement: sql_text::shown(&message.query).into_owned(),
            reason: reason.to_string(),
        };
        if let Some(state) = &self.state
            && let Err(e) = state.record_ddl_stop(Some(&stop))
        {
            tracing::warn!("cannot record the schema change apply stopped on: {e:#}");
        }
        anyhow::Error::new(DdlStopped(format!(
            "apply stopped at the schema change {id} (run as {} on the source): {reason}. Statement: {}. Fix: {fix}. Nothing of its transaction was applied",
            message.role,
            sql_text::shown(&message.query)
        )))
    }
}

/// What to do with one captured change.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    Replay(Vec<String>),
    Skip(String),
    Stop { reason: String, fix: String },
}

/// The first words of the statements DDL replay runs.
const REPLAYED: [&str; 9] = [
    "CREATE", "ALTER", "DROP", "COMMENT", "GRANT", "REVOKE", "SECURITY", "REFRESH", "IMPORT",
];

const SKIP_FIX: &str = "make the same change on the target yourself, then run `pgtide ddl skip --dir <work dir>` and start the follow again";

/// Decides what to do with a captured change, by the rules in the module comment.
fn plan(
    message: &DdlMessage,
    filters: &Filters,
    decision: Option<DdlDecision>,
    replayed_in_transaction: &HashSet<String>,
) -> Plan {
    if decision == Some(DdlDecision::Skip) {
        return Plan::Skip("skipped by the operator (pgtide ddl skip)".into());
    }
    if replayed_in_transaction.contains(&message.query) {
        return Plan::Skip("replayed with an earlier statement of the same query string".into());
    }
    let objects: Vec<&CapturedObject> = message
        .commands
        .iter()
        .chain(&message.dropped)
        .filter(|o| !o.in_extension)
        .collect();
    let followed: Vec<bool> = objects.iter().map(|o| is_followed(o, filters)).collect();
    if !objects.is_empty() && followed.iter().all(|f| !f) {
        return Plan::Skip("its objects are left out by the migration's filters".into());
    }
    if followed.iter().any(|f| !f) {
        return Plan::Stop {
            reason: format!(
                "it changes objects the migration follows and objects its filters leave out ({})",
                objects
                    .iter()
                    .zip(&followed)
                    .filter(|(_, f)| !**f)
                    .map(|(o, _)| o.identity.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            fix: SKIP_FIX.into(),
        };
    }
    let statements = sql_text::split_statements(&message.query);
    let replayed: Vec<&Statement> = statements
        .iter()
        .filter(|s| {
            s.words
                .first()
                .is_some_and(|w| REPLAYED.contains(&w.as_str()))
                && !s.words.iter().take(4).any(|w| w == "SUBSCRIPTION")
        })
        .collect();
    if decision == Some(DdlDecision::Replay) {
        return Plan::Replay(if replayed.is_empty() {
            vec![message.query.clone()]
        } else {
            replayed
                .iter()
                .map(|s| sql_text::without_concurrently(s))
                .collect()
        });
    }
    if replayed.is_empty() {
        if statements
            .iter()
            .any(|s| s.words.iter().take(4).any(|w| w == "SUBSCRIPTION"))
        {
            return Plan::Skip("subscriptions are not created on the target".into());
        }
        return Plan::Stop {
            reason: format!(
                "the change ran inside a statement pgtide does not replay ({}): a function, a DO block or a procedure also changes rows, which arrive as row changes, so running it again would apply them twice",
                statements
                    .first()
                    .map(|s| s.words.join(" "))
                    .unwrap_or_default()
            ),
            fix: SKIP_FIX.into(),
        };
    }
    if !message.publish_failed.is_empty() {
        return Plan::Stop {
            reason: format!(
                "the capture could not add a new table to the publication on the source ({}): its changes are not in the stream",
                message.publish_failed.join("; ")
            ),
            fix: "fix the cause on the source, run `pgtide ddl retry --dir <work dir>`, start the follow again and run `pgtide follow --add-table <table>` to copy and follow it".into(),
        };
    }
    let late: Vec<&str> = message
        .late_with_rows
        .iter()
        .map(String::as_str)
        .filter(|t| parse_table_name(t).is_ok_and(|t| follows_table(filters, &t.schema, &t.name)))
        .collect();
    if !late.is_empty() {
        return Plan::Stop {
            reason: format!(
                "{} joined the publication only now (it got a primary key, or was created with its rows by CREATE TABLE AS / SELECT INTO) and already holds rows, which are not in the change stream",
                late.join(", ")
            ),
            fix: format!(
                "run `pgtide follow --resync {}` (it copies the table now, with no follow running), then `pgtide ddl retry --dir <work dir>` and start the follow again",
                late.join(" --resync ")
            ),
        };
    }
    if let Some(columns) = &message.unsafe_columns {
        return Plan::Stop {
            reason: format!(
                "it adds column(s) {columns} whose existing rows get values the target would compute differently (a volatile or time-dependent default, or an identity): the source's rewrite of the table is not in the change stream"
            ),
            fix: "run `pgtide ddl retry --dir <work dir>` to replay it anyway and then `pgtide follow --resync <table>` to copy the table again, or make the target's column equal yourself and run `pgtide ddl skip --dir <work dir>`; then start the follow again".into(),
        };
    }
    Plan::Replay(
        replayed
            .iter()
            .map(|s| sql_text::without_concurrently(s))
            .collect(),
    )
}

/// Whether the migration follows a captured object (its schema, and for a table or a table's
/// column the table, are included by the filters). Objects outside any schema (schemas are
/// judged by their name; extensions, roles…) are followed.
fn is_followed(object: &CapturedObject, filters: &Filters) -> bool {
    match object.object_type.as_str() {
        // pgtide's own publications ("pgtide_<slot>", "… in publication pgtide_<slot>"),
        // changed by `follow --add-table` and the capture: source only.
        t if t.starts_with("publication")
            && (object.identity.starts_with("pgtide_")
                || object.identity.contains(" in publication pgtide_")) =>
        {
            false
        }
        "schema" => filters.includes_schema(object.identity.trim_matches('"')),
        "table" | "table column" => {
            let identity = match object.object_type.as_str() {
                // "schema.table.column": the table is all but the last part.
                "table column" => object
                    .identity
                    .rsplit_once('.')
                    .map(|(t, _)| t)
                    .unwrap_or(&object.identity),
                _ => &object.identity,
            };
            match parse_table_name(identity) {
                Ok(t) => follows_table(filters, &t.schema, &t.name),
                Err(_) => true,
            }
        }
        _ => object
            .schema
            .as_deref()
            .is_none_or(|s| filters.includes_schema(s)),
    }
}

/// Whether the migration follows a table created during follow: unless its schema or its
/// name is excluded. `[include-only-table]` lists the tables of the start (a new partition of
/// an included partitioned table has a name of its own).
pub fn follows_table(filters: &Filters, schema: &str, name: &str) -> bool {
    filters.includes_schema(schema)
        && !filters
            .exclude_tables
            .iter()
            .any(|t| t.schema == schema && t.name == name)
}

/// Whether apply leaves a relation's changes aside: a table the trigger published that the
/// migration does not follow (see [`follows_table`]; `[exclude-table-data]` tables are created
/// but their rows are not followed), unless the stream was set up with it.
pub fn ignores_changes(rules: &DdlRules, schema: &str, name: &str) -> bool {
    rules.prefix.is_some()
        && !rules
            .published_at_start
            .contains(&(schema.to_string(), name.to_string()))
        && (!follows_table(&rules.filters, schema, name)
            || !rules.filters.copies_data(schema, name))
}

/// Replays one captured change on the target inside the open apply transaction, or skips it,
/// or stops. Returns whether anything ran (descriptions of the target's tables are stale
/// then).
pub async fn replay(
    target: &Client,
    rules: &DdlRules,
    id: DdlId,
    content: &[u8],
    replayed_in_transaction: &mut HashSet<String>,
) -> Result<bool> {
    let message: DdlMessage = serde_json::from_slice(content).map_err(|e| {
        anyhow::Error::new(DdlStopped(format!(
            "the schema change {id} in the stream cannot be read ({e}): report it with the source's version"
        )))
    })?;
    let decision = rules.decisions.get(&id).copied();
    match plan(&message, &rules.filters, decision, replayed_in_transaction) {
        Plan::Skip(why) => {
            tracing::info!(
                "schema change {id} not replayed ({why}): {}",
                sql_text::shown(&message.query)
            );
            Ok(false)
        }
        Plan::Stop { reason, fix } => {
            // Published on the source already: the migration follows them, so that
            // `follow --resync` accepts them before the change is replayed.
            rules.record_published(&message.published)?;
            Err(rules.stop(id, &message, &reason, &fix))
        }
        Plan::Replay(statements) => {
            for table in &message.unpublished {
                tracing::warn!(
                    "{table} was created on the source without a primary key or replica identity: its rows are not followed until it gets one (ALTER TABLE … ADD PRIMARY KEY or REPLICA IDENTITY FULL on the source); verify will show it differs"
                );
            }
            run_statements(target, &message, &statements)
                .await
                .map_err(|e| {
                    rules.stop(
                        id,
                        &message,
                        &format!("the target refused it: {e:#}"),
                        "make the target accept it (e.g. create the missing role or object), then start the follow again to retry; or make the change yourself and run `pgtide ddl skip --dir <work dir>`",
                    )
                })?;
            replayed_in_transaction.insert(message.query.clone());
            rules.record_published(&message.published)?;
            tracing::info!(
                "replayed schema change {id} on the target: {}",
                statements
                    .iter()
                    .map(|s| sql_text::shown(s))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            Ok(true)
        }
    }
}

/// Runs the statements in a savepoint, with the source's search_path and, when the target
/// has it and pgtide's role may use it, the source's role (so new objects get the same
/// owner); then puts the apply session back as it was.
async fn run_statements(
    target: &Client,
    message: &DdlMessage,
    statements: &[String],
) -> Result<()> {
    let err = |e: tokio_postgres::Error| anyhow!("{}", describe(&e));
    let role_usable: bool = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = $1
                 AND pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER'))",
            &[&message.role],
        )
        .await
        .map_err(err)?
        .get(0);
    let previous_path: String = target
        .query_one("SELECT pg_catalog.current_setting('search_path')", &[])
        .await
        .map_err(err)?
        .get(0);
    target
        .batch_execute("SAVEPOINT pgtide_ddl")
        .await
        .map_err(err)?;
    target
        .execute(
            "SELECT pg_catalog.set_config('search_path', $1, true)",
            &[&message.search_path],
        )
        .await
        .map_err(err)?;
    if role_usable {
        target
            .batch_execute(&format!("SET LOCAL ROLE {}", quote_ident(&message.role)))
            .await
            .map_err(err)?;
    } else {
        tracing::warn!(
            "the role {} that ran the schema change on the source does not exist on the target (or pgtide's role cannot use it): replaying it as pgtide's role",
            message.role
        );
    }
    for statement in statements {
        target.batch_execute(statement).await.map_err(|e| {
            anyhow!(
                "{} (statement: {})",
                describe(&e),
                sql_text::shown(statement)
            )
        })?;
    }
    target
        .batch_execute("RESET ROLE; RELEASE SAVEPOINT pgtide_ddl")
        .await
        .map_err(err)?;
    target
        .execute(
            "SELECT pg_catalog.set_config('search_path', $1, true)",
            &[&previous_path],
        )
        .await
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(query: &str, objects: &[(&str, &str)]) -> DdlMessage {
        DdlMessage {
            query: query.into(),
            search_path: "public".into(),
            role: "app".into(),
            commands: objects
                .iter()
                .map(|(t, i)| CapturedObject {
                    object_type: t.to_string(),
                    schema: i.split_once('.').map(|(s, _)| s.to_string()),
                    identity: i.to_string(),
                    tag: None,
                    in_extension: false,
                })
                .collect(),
            dropped: vec![],
            published: vec![],
            late_with_rows: vec![],
            publish_failed: vec![],
            unpublished: vec![],
            unsafe_columns: None,
        }
    }

    #[test]
    fn only_ddl_statements_of_a_query_string_are_replayed() {
        let m = message(
            "ALTER TABLE t ADD c int; INSERT INTO t VALUES (1); create index concurrently i on t (c)",
            &[("table", "public.t")],
        );
        assert_eq!(
            plan(&m, &Filters::default(), None, &HashSet::new()),
            Plan::Replay(vec![
                "ALTER TABLE t ADD c int".into(),
                "create index i on t (c)".into()
            ])
        );
        let seen = HashSet::from([m.query.clone()]);
        assert!(matches!(
            plan(&m, &Filters::default(), None, &seen),
            Plan::Skip(_)
        ));
    }

    #[test]
    fn ddl_inside_functions_and_unsafe_rewrites_stop_unless_decided() {
        let m = message("SELECT make_tables()", &[("table", "public.t")]);
        assert!(matches!(
            plan(&m, &Filters::default(), None, &HashSet::new()),
            Plan::Stop { .. }
        ));
        assert_eq!(
            plan(
                &m,
                &Filters::default(),
                Some(DdlDecision::Replay),
                &HashSet::new()
            ),
            Plan::Replay(vec!["SELECT make_tables()".into()])
        );
        let mut m = message("ALTER TABLE t ADD id serial", &[("table", "public.t")]);
        m.unsafe_columns = Some("public.t.id".into());
        assert!(matches!(
            plan(&m, &Filters::default(), None, &HashSet::new()),
            Plan::Stop { .. }
        ));
        assert!(matches!(
            plan(
                &m,
                &Filters::default(),
                Some(DdlDecision::Skip),
                &HashSet::new()
            ),
            Plan::Skip(_)
        ));
    }

    #[test]
    fn pgtide_publications_are_never_replayed() {
        let mut m = message(
            "ALTER PUBLICATION \"pgtide_s\" ADD TABLE \"public\".\"x\"",
            &[],
        );
        m.commands.push(CapturedObject {
            object_type: "publication relation".into(),
            schema: None,
            identity: "public.x in publication pgtide_s".into(),
            tag: None,
            in_extension: false,
        });
        assert!(matches!(
            plan(&m, &Filters::default(), None, &HashSet::new()),
            Plan::Skip(_)
        ));
    }

    #[test]
    fn filters_decide_per_object() {
        let filters = Filters::parse("[exclude-schema]\nscratch\n").unwrap();
        let m = message("CREATE TABLE scratch.t (a int)", &[("table", "scratch.t")]);
        assert!(matches!(
            plan(&m, &filters, None, &HashSet::new()),
            Plan::Skip(_)
        ));
        let m = message(
            "DROP TABLE scratch.t, public.u",
            &[("table", "scratch.t"), ("table", "public.u")],
        );
        assert!(matches!(
            plan(&m, &filters, None, &HashSet::new()),
            Plan::Stop { .. }
        ));
    }
}
