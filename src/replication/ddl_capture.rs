//! DDL capture on the source: event triggers that put each schema change into the change
//! stream **in its transaction**, so that apply replays it exactly at its place in the commit
//! order (DESIGN.md, "Schema changes during follow").
//!
//! What is installed (all named `pgtide…`, removed by [`remove`], invariant 8), in a `pgtide`
//! schema on the source:
//! - `ddl_capture_<tag>()`, the event trigger function, runs as the role that ran the DDL: it
//!   reads that session's `search_path` and hands it to
//! - `ddl_emit_<tag>(search_path)`, `SECURITY DEFINER` (pgtide's role): it reads the query,
//!   the role, the commands (`pg_event_trigger_ddl_commands`, which fails outside an event
//!   trigger, so it cannot be called to forge a message), adds a new table to the
//!   publication in the same transaction (so its rows are in the stream from its first one),
//!   flags what cannot be replayed faithfully, and writes the message: a transactional
//!   logical message (14+), or a row of the published log table `ddl_log_<tag>` where pgoutput
//!   has no messages (12, 13);
//! - a token in an owner-only table: a message's prefix carries it, so a role that may call
//!   `pg_logical_emit_message` cannot make apply run SQL of its choosing on the target;
//! - three event triggers: `ddl_command_end` (the message), `sql_drop` and `table_rewrite`
//!   (what they learn is kept in transaction-local settings for the message).

use anyhow::{Context, Result, bail};
use tokio_postgres::Client;

use crate::pg::{ServerVersion, quote_literal};

/// The prefix of every DDL message (the token follows it).
const PREFIX: &str = "pgtide_ddl:";

/// The prefix of this migration's DDL messages.
pub fn message_prefix(token: &str) -> String {
    format!("{PREFIX}{token}")
}

/// The capture installed for a slot, as recorded in state.db.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Capture {
    /// The secret part of the messages' prefix.
    pub token: String,
    /// The published log table (schema, name) the messages are rows of, on sources whose
    /// pgoutput has no logical messages (12, 13).
    pub log_table: Option<(String, String)>,
}

/// The suffix of the installed objects' names: the slot's name, shortened with a hash when
/// the longest object name would pass PostgreSQL's 63 bytes.
fn tag(slot: &str) -> String {
    if slot.len() <= 40 {
        return slot.to_string();
    }
    let hash = slot.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{}_{:07x}", &slot[..32], hash & 0xfff_ffff)
}

/// Whether the source lets pgtide's role install the capture: event triggers need a
/// superuser. `Err` carries the reason and the fix.
pub async fn check_privileges(client: &Client) -> Result<()> {
    let row = client
        .query_one(
            "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .context("cannot read pgtide's role on the source")?;
    if !row.get::<_, bool>(0) {
        bail!(
            "DDL capture needs a superuser on the source (CREATE EVENT TRIGGER is reserved to superusers): connect as one, or pass --no-ddl-capture (schema changes on the source then stop apply until you run them on the target)"
        );
    }
    Ok(())
}

/// Installs the capture for `slot` (replacing an earlier one of the same slot). With a
/// publication, new tables are added to it as they are created (pgoutput; wal2json streams
/// every table it is told at START_REPLICATION, see the README).
pub async fn install(
    client: &Client,
    slot: &str,
    publication: Option<&str>,
    version: ServerVersion,
) -> Result<Capture> {
    check_privileges(client).await?;
    let tag = tag(slot);
    let token = random_token(client).await?;
    let log_table = (!version.has_pgoutput_messages())
        .then(|| ("pgtide".to_string(), format!("ddl_log_{tag}")));
    let emit = match &log_table {
        Some((_, table)) => format!("INSERT INTO pgtide.{table} (message) VALUES (message);"),
        None => format!(
            "PERFORM pg_catalog.pg_logical_emit_message(true, {}, message);",
            quote_literal(&message_prefix(&token))
        ),
    };
    let kinds = if version.can_publish_partitioned() {
        "'{r,p}'"
    } else {
        "'{r}'"
    };
    let publish = match publication {
        Some(name) => format!(
            "IF command.object_type = 'table' AND command.classid = 'pg_catalog.pg_class'::regclass THEN
                SELECT c.relkind, c.relpersistence,
                       c.relreplident = 'f' OR EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid
                           AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident))) AS identified,
                       EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                               WHERE p.pubname = {pub} AND pr.prrelid = c.oid)
                       OR EXISTS (SELECT 1 FROM pg_publication_tables p WHERE p.pubname = {pub}
                           AND p.schemaname = n.nspname AND p.tablename = c.relname) AS is_published
                  INTO relation
                  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = command.objid;
                IF FOUND AND relation.relpersistence = 'p' AND relation.relkind = ANY ({kinds}::\"char\"[])
                   AND NOT relation.is_published AND (relation.relkind = 'p' OR relation.identified) THEN
                    -- Never make the application's DDL fail: a table that cannot be added is
                    -- named in the message, and apply stops there with the fix.
                    BEGIN
                        PERFORM set_config('pgtide.capturing', 'on', true);
                        EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', {pub}, command.objid::regclass);
                        PERFORM set_config('pgtide.capturing', 'off', true);
                        published := published || to_jsonb(command.object_identity);
                    EXCEPTION WHEN OTHERS THEN
                        PERFORM set_config('pgtide.capturing', 'off', true);
                        publish_failed := publish_failed || to_jsonb(command.object_identity || ': ' || SQLERRM);
                    END;
                    -- Published by a later command (it got a primary key) or created with
                    -- rows (CREATE TABLE AS): rows written before are not in the stream.
                    IF command.command_tag <> 'CREATE TABLE' THEN
                        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', command.objid::regclass) INTO has_rows;
                        IF has_rows THEN
                            late_with_rows := late_with_rows || to_jsonb(command.object_identity);
                        END IF;
                    END IF;
                ELSIF FOUND AND relation.relpersistence = 'p' AND relation.relkind = 'r'
                   AND NOT relation.is_published AND NOT relation.identified THEN
                    unpublished := unpublished || to_jsonb(command.object_identity);
                END IF;
            END IF;",
            pub = quote_literal(name),
        ),
        None => String::new(),
    };
    let sql = format!(
        r#"
CREATE SCHEMA IF NOT EXISTS pgtide;
GRANT USAGE ON SCHEMA pgtide TO PUBLIC;
DROP TABLE IF EXISTS pgtide.ddl_token_{tag};
CREATE TABLE pgtide.ddl_token_{tag} (token text NOT NULL);
REVOKE ALL ON pgtide.ddl_token_{tag} FROM PUBLIC;
INSERT INTO pgtide.ddl_token_{tag} VALUES ({token});
{log_table_sql}
CREATE OR REPLACE FUNCTION pgtide.ddl_emit_{tag}(session_search_path text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $pgtide$
DECLARE
    command record;
    relation record;
    commands jsonb := '[]';
    published jsonb := '[]';
    late_with_rows jsonb := '[]';
    publish_failed jsonb := '[]';
    unpublished jsonb := '[]';
    has_rows boolean;
    dropped jsonb := coalesce(nullif(current_setting('pgtide.dropped', true), ''), '[]')::jsonb;
    rewritten oid[] := coalesce(nullif(current_setting('pgtide.rewritten', true), ''), '{{}}')::oid[];
    unsafe text;
    message text;
BEGIN
    FOR command IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        -- pgtide's own publication changes (this function's, a table sync's) and temporary
        -- objects are not the application's schema.
        IF command.object_type LIKE 'publication%'
               AND (command.object_identity LIKE 'pgtide\_%' OR command.object_identity LIKE '% in publication pgtide\_%')
           OR command.schema_name = 'pg_temp' THEN
            CONTINUE;
        END IF;
        commands := commands || jsonb_build_object('tag', command.command_tag, 'type', command.object_type,
            'schema', command.schema_name, 'identity', command.object_identity, 'in_extension', command.in_extension);
        {publish}
    END LOOP;
    PERFORM set_config('pgtide.dropped', '', true);
    PERFORM set_config('pgtide.rewritten', '', true);
    dropped := coalesce((SELECT jsonb_agg(d) FROM jsonb_array_elements(dropped) d WHERE NOT (d->>'temporary')::boolean), '[]');
    IF jsonb_array_length(commands) = 0 AND jsonb_array_length(dropped) = 0 THEN
        RETURN;
    END IF;
    -- A column added in this transaction whose existing rows get a value that the target
    -- would compute differently (a volatile or time-dependent default, an identity): the
    -- table's rewrite is not in the change stream.
    SELECT string_agg(format('%s.%I', a.attrelid::regclass, a.attname), ', ') INTO unsafe
      FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE a.attrelid IN (SELECT objid FROM pg_event_trigger_ddl_commands() WHERE object_type = 'table')
       AND a.attnum > 0 AND NOT a.attisdropped
       AND a.xmin::text = (txid_current() % 4294967296)::text
       AND (a.atthasmissing OR a.attrelid = ANY (rewritten))
       AND (a.attidentity <> '' OR (d.oid IS NOT NULL AND a.attgenerated = ''
            AND pg_get_expr(d.adbin, d.adrelid) !~ '^(''([^'']|'''')*''(::[a-z ]+)?|-?[0-9.]+(::[a-z ]+)?|true|false|NULL(::[a-z ]+)?)$'))
       AND current_query() ~* '\mADD\M';
    message := jsonb_build_object(
        'v', 1,
        'query', current_query(),
        'search_path', session_search_path,
        'role', CASE WHEN current_setting('role') = 'none' THEN session_user::text ELSE current_setting('role') END,
        'commands', commands,
        'dropped', dropped,
        'published', published,
        'late_with_rows', late_with_rows,
        'unpublished', unpublished,
        'publish_failed', publish_failed,
        'unsafe', unsafe)::text;
    {emit}
END
$pgtide$;
REVOKE ALL ON FUNCTION pgtide.ddl_emit_{tag}(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtide.ddl_emit_{tag}(text) TO PUBLIC;
CREATE OR REPLACE FUNCTION pgtide.ddl_capture_{tag}() RETURNS event_trigger
LANGUAGE plpgsql AS $pgtide$
BEGIN
    IF pg_catalog.current_setting('pgtide.capturing', true) = 'on' THEN
        RETURN;
    END IF;
    IF tg_event = 'table_rewrite' THEN
        PERFORM pg_catalog.set_config('pgtide.rewritten',
            (coalesce(nullif(pg_catalog.current_setting('pgtide.rewritten', true), ''), '{{}}')::pg_catalog.oid[]
             || pg_catalog.pg_event_trigger_table_rewrite_oid())::text, true);
    ELSIF tg_event = 'sql_drop' THEN
        PERFORM pg_catalog.set_config('pgtide.dropped',
            (coalesce(nullif(pg_catalog.current_setting('pgtide.dropped', true), ''), '[]')::pg_catalog.jsonb
             || coalesce((SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('type', object_type,
                    'schema', schema_name, 'identity', object_identity, 'temporary', is_temporary))
                  FROM pg_catalog.pg_event_trigger_dropped_objects() WHERE original), '[]'))::text, true);
    ELSE
        PERFORM pgtide.ddl_emit_{tag}(pg_catalog.current_setting('search_path'));
    END IF;
END
$pgtide$;
GRANT EXECUTE ON FUNCTION pgtide.ddl_capture_{tag}() TO PUBLIC;
DROP EVENT TRIGGER IF EXISTS pgtide_ddl_end_{tag};
DROP EVENT TRIGGER IF EXISTS pgtide_ddl_drop_{tag};
DROP EVENT TRIGGER IF EXISTS pgtide_ddl_rewrite_{tag};
CREATE EVENT TRIGGER pgtide_ddl_end_{tag} ON ddl_command_end EXECUTE PROCEDURE pgtide.ddl_capture_{tag}();
CREATE EVENT TRIGGER pgtide_ddl_drop_{tag} ON sql_drop EXECUTE PROCEDURE pgtide.ddl_capture_{tag}();
CREATE EVENT TRIGGER pgtide_ddl_rewrite_{tag} ON table_rewrite EXECUTE PROCEDURE pgtide.ddl_capture_{tag}();
"#,
        token = quote_literal(&token),
        log_table_sql = match &log_table {
            Some((_, table)) => format!(
                "CREATE TABLE IF NOT EXISTS pgtide.{table} (id bigserial PRIMARY KEY, message text NOT NULL);
                 REVOKE ALL ON pgtide.{table} FROM PUBLIC;"
            ),
            None => String::new(),
        },
    );
    client
        .batch_execute(&format!("BEGIN; {sql} COMMIT;"))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot install DDL capture on the source: {}. Fix the cause, or pass --no-ddl-capture",
                crate::pg::describe(&e)
            )
        })?;
    if let (Some((schema, table)), Some(publication)) = (&log_table, publication) {
        client
            .batch_execute(&format!(
                "ALTER PUBLICATION {} ADD TABLE {}.{}",
                crate::pg::quote_ident(publication),
                crate::pg::quote_ident(schema),
                crate::pg::quote_ident(table)
            ))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot publish the DDL log table on the source: {}",
                    crate::pg::describe(&e)
                )
            })?;
    }
    tracing::info!(
        "DDL capture installed on the source (event triggers pgtide_ddl_*_{tag}); schema changes are replayed on the target in commit order"
    );
    Ok(Capture { token, log_table })
}

/// A random token from the source (gen_random_uuid needs 13+; md5 of random() is enough for
/// a value no other role can read).
async fn random_token(client: &Client) -> Result<String> {
    let row = client
        .query_one(
            "SELECT md5(random()::text || clock_timestamp()::text || pg_backend_pid()::text)",
            &[],
        )
        .await
        .context("cannot draw the DDL capture token on the source")?;
    Ok(row.get(0))
}

/// Removes the capture of `slot` (idempotent; the `pgtide` schema goes when nothing else of
/// pgtide's is left in it). Whether anything was there.
pub async fn remove(client: &Client, slot: &str) -> Result<bool> {
    let tag = tag(slot);
    let existed: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname LIKE 'pgtide\\_ddl\\_%' AND evtname LIKE '%' || $1)",
            &[&format!("_{tag}")],
        )
        .await
        .context("cannot read the source's event triggers")?
        .get(0);
    client
        .batch_execute(&format!(
            "DROP EVENT TRIGGER IF EXISTS pgtide_ddl_end_{tag};
             DROP EVENT TRIGGER IF EXISTS pgtide_ddl_drop_{tag};
             DROP EVENT TRIGGER IF EXISTS pgtide_ddl_rewrite_{tag};
             DROP FUNCTION IF EXISTS pgtide.ddl_capture_{tag}();
             DROP FUNCTION IF EXISTS pgtide.ddl_emit_{tag}(text);
             DROP TABLE IF EXISTS pgtide.ddl_token_{tag};
             DROP TABLE IF EXISTS pgtide.ddl_log_{tag};
             DO $$ BEGIN
                 IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgtide')
                    AND NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pgtide')
                    AND NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'pgtide') THEN
                     DROP SCHEMA pgtide;
                 END IF;
             END $$;"
        ))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot remove DDL capture from the source: {}",
                crate::pg::describe(&e)
            )
        })?;
    Ok(existed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_fit_postgres_identifiers() {
        assert_eq!(tag("pgtide_abc"), "pgtide_abc");
        let long = "a".repeat(56);
        let t = tag(&long);
        assert!(format!("pgtide_ddl_rewrite_{t}").len() <= 63, "{t}");
        assert_ne!(tag(&"a".repeat(55)), t);
    }
}
