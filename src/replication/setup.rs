//! Publication and slot setup, the one place that decides what a migration publishes: the
//! `PublicationPlan` (which tables, partitions listed as the plugin and the source's version
//! need, which are append-only) that `stream setup`, `snapshot`, `clone --follow` and `check`
//! share; then the checks before anything is created, the publication(s), the slot, and the
//! stream record in state.db (invariant 6: refusals come before anything exists).

use anyhow::{Result, anyhow, bail};
use tokio_postgres::Client;

use super::Plugin;
use super::conn::ReplicationConnection;
use super::slot::{self, Partitions};
use crate::clone::filters::Filters;
use crate::conninfo::ConnInfo;
use crate::pg::{self, Side};
use crate::state::StreamRecord;

/// What a migration publishes, decided here and nowhere else.
#[derive(Clone, Debug, Default)]
pub struct PublicationPlan {
    /// Every published table (append-only ones included).
    pub tables: Vec<(String, String)>,
    /// Included tables whose changes are not followed (`[exclude-table-data]`).
    pub not_followed: Vec<(String, String)>,
    /// The published tables declared append-only: their own INSERT/TRUNCATE-only publication.
    pub append_only: Vec<(String, String)>,
}

impl PublicationPlan {
    /// The replicated tables the filters include (partitions as the plugin and the source's
    /// version need them, see [`Partitions`]), except the `[exclude-table-data]` ones. Those
    /// are created empty on the target and their changes are NOT followed: their rows are not
    /// on the target, so the first UPDATE or DELETE of a pre-existing row could not be
    /// applied, and replicating only the new rows would leave a partial table that looks
    /// complete. No table is append-only yet: see [`Self::declare_append_only`].
    pub async fn decide(client: &Client, plugin: Plugin, filters: &Filters) -> Result<Self> {
        let version = pg::ServerVersion::of(client).await?;
        let (tables, not_followed) =
            slot::replicated_tables(client, Partitions::published_by(plugin, version))
                .await?
                .into_iter()
                .filter(|(schema, table)| filters.includes_table(schema, table))
                .partition(|(schema, table)| filters.copies_data(schema, table));
        Ok(PublicationPlan {
            tables,
            not_followed,
            append_only: Vec::new(),
        })
    }

    /// Marks the published tables named by `--append-only` (a partitioned table names its
    /// published leaves); an error names what is not a published table.
    pub async fn declare_append_only(&mut self, client: &Client, names: &[String]) -> Result<()> {
        self.append_only = slot::append_only_published(client, &self.tables, names).await?;
        Ok(())
    }

    /// The published tables that are not append-only: they need a replica identity.
    pub fn regular(&self) -> Vec<(String, String)> {
        self.tables
            .iter()
            .filter(|t| !self.append_only.contains(t))
            .cloned()
            .collect()
    }
}

/// How tables are published: those without a primary key (the operator's
/// `--replica-identity-full` and `--append-only`), and those created during follow (DDL
/// capture, unless `--no-ddl-capture`).
#[derive(Clone, Debug, Default)]
pub struct IdentityChoice {
    pub replica_identity_full: bool,
    pub append_only: Vec<String>,
    /// Install the DDL capture (pgoutput only: wal2json streams the tables named when it
    /// starts).
    pub ddl_capture: bool,
}

/// Refuses, before anything is created, to publish tables without a replica identity, naming
/// each table and the fix.
async fn refuse_tables_without_identity(
    client: &Client,
    tables: &[(String, String)],
) -> Result<()> {
    let list = slot::tables_without_identity(client, tables).await?;
    if list.is_empty() {
        return Ok(());
    }
    bail!(
        "{} table(s) have no primary key and no replica identity: {}. Once replicated, an UPDATE or DELETE on them would fail on the source. Give each a primary key, or run on the source: {} (or exclude them with --filters). Nothing was created.",
        list.len(),
        list.join(", "),
        list.iter()
            .map(|t| format!("ALTER TABLE {t} REPLICA IDENTITY FULL;"))
            .collect::<Vec<_>>()
            .join(" ")
    );
}

/// The publications the work dir's stream reads (by default the slot's one).
pub fn recorded_publications(stream: &StreamRecord) -> Vec<String> {
    stream
        .publications
        .clone()
        .unwrap_or_else(|| vec![slot::publication_name(&stream.slot)])
}

/// The output plugin a stream is set up with, and what its operator accepted of it.
#[derive(Clone, Copy, Debug)]
pub struct PluginChoice {
    pub plugin: Plugin,
    /// --wal2json-nan-as-null: NaN / ±Infinity of nullable numeric and float columns may
    /// arrive as NULL.
    pub nan_as_null: bool,
    /// The stream will be applied by this command (clone --follow): columns wal2json cannot
    /// carry are refused now. A stream only spooled (stream setup, snapshot) gets a warning,
    /// and apply refuses it later unless accepted.
    pub applied: bool,
}

/// With wal2json, refuses (before anything is created) tables whose nullable numeric or
/// float columns would silently turn NaN / ±Infinity into NULL, unless accepted or the stream
/// is only spooled here; warns about NOT NULL ones (apply stops there).
async fn refuse_inexact_wal2json(
    client: &Client,
    tables: &[(String, String)],
    choice: PluginChoice,
) -> Result<()> {
    use crate::replication::wal2json as w;
    if choice.plugin != Plugin::Wal2json {
        return Ok(());
    }
    let columns = w::inexact_columns(client, tables).await?;
    if columns.iter().any(|c| c.not_null) {
        tracing::warn!("{}", w::not_null_message(&columns));
    }
    if columns.iter().any(|c| !c.not_null) {
        match (choice.nan_as_null, choice.applied) {
            (true, _) => tracing::warn!("{}", w::nullable_message(&columns, true)),
            (false, false) => tracing::warn!(
                "{}; `follow` will refuse to apply this stream unless given --wal2json-nan-as-null",
                w::nullable_message(&columns, false)
            ),
            (false, true) => bail!(
                "{}. Nothing was created. Fix: {}",
                w::nullable_message(&columns, false),
                w::NULLABLE_FIX
            ),
        }
    }
    Ok(())
}

/// What a slot publishes: every selected table, the append-only ones in their own
/// INSERT/TRUNCATE-only publication.
pub struct Published {
    pub tables: Vec<(String, String)>,
    pub publications: Vec<String>,
}

/// Checks what a slot needs on the source and creates the publication(s) (pgoutput). Tables
/// without a replica identity are refused (naming each and the fix) unless the operator chose
/// `--replica-identity-full` (pgtide sets it) or `--append-only` for them.
pub async fn prepare_source(
    source: &ConnInfo,
    choice: PluginChoice,
    slot_name: &str,
    filters: &Filters,
    identity: &IdentityChoice,
) -> Result<Published> {
    slot::check_slot_name(slot_name)?;
    let client = pg::connect(source, Side::Source, "stream setup").await?;
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        bail!(
            "the source's wal_level is {wal_level}, logical decoding needs logical: set wal_level = logical in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart the source server"
        );
    }
    let plugin = choice.plugin;
    pg::catalog::check_filters_name_real_objects(&client, filters).await?;
    let mut plan = PublicationPlan::decide(&client, plugin, filters).await?;
    if !plan.not_followed.is_empty() {
        tracing::warn!("{}", slot::not_followed_notice(&plan.not_followed));
    }
    plan.declare_append_only(&client, &identity.append_only)
        .await?;
    if !plan.append_only.is_empty() && plugin != Plugin::Pgoutput {
        bail!(
            "--append-only needs --plugin pgoutput (it publishes those tables for INSERT and TRUNCATE only; wal2json has no publications)"
        );
    }
    let regular = plan.regular();
    let PublicationPlan {
        tables,
        append_only,
        ..
    } = plan;
    if identity.replica_identity_full {
        for table in slot::tables_without_identity(&client, &regular).await? {
            client
                .batch_execute(&format!("ALTER TABLE {table} REPLICA IDENTITY FULL"))
                .await
                .map_err(|e| {
                    anyhow!(
                        "cannot set REPLICA IDENTITY FULL on {table} (--replica-identity-full): {}. Run it as the table's owner, or give the table a primary key.",
                        pg::describe(&e)
                    )
                })?;
            tracing::info!("{table}: REPLICA IDENTITY FULL (--replica-identity-full)");
        }
    }
    refuse_tables_without_identity(&client, &regular).await?;
    refuse_inexact_wal2json(&client, &tables, choice).await?;
    let mut publications = Vec::new();
    if plugin == Plugin::Pgoutput {
        if !regular.is_empty() || append_only.is_empty() {
            let name = slot::create_publication(
                &client,
                &slot::publication_name(slot_name),
                &regular,
                None,
            )
            .await?;
            tracing::info!("publication {name} publishes {} tables", regular.len());
            publications.push(name);
        }
        if !append_only.is_empty() {
            let name = slot::create_publication(
                &client,
                &slot::append_publication_name(slot_name),
                &append_only,
                Some("insert, truncate"),
            )
            .await?;
            tracing::warn!(
                "publication {name} publishes {} append-only table(s) for INSERT and TRUNCATE only: their UPDATEs and DELETEs are not replicated",
                append_only.len()
            );
            publications.push(name);
        }
    }
    Ok(Published {
        tables,
        publications,
    })
}

/// Creates the publication and the slot and records the stream in state.db (slot, plugin,
/// start position, source, published tables, system identifier): what `stream receive`,
/// `follow` and `cleanup` read back. With `export`, the returned connection holds the slot's
/// exported snapshot until it is closed.
pub async fn create_recorded_slot(
    source: &ConnInfo,
    state: &crate::state::StateDb,
    slot_name: &str,
    choice: PluginChoice,
    filters: &Filters,
    identity: &IdentityChoice,
    export: bool,
) -> Result<(ReplicationConnection, slot::CreatedSlot)> {
    let Published {
        tables,
        publications,
    } = prepare_source(source, choice, slot_name, filters, identity).await?;
    let plugin = choice.plugin;
    // Installed before the slot exists, so that no schema change falls between the slot's
    // snapshot and the capture: one made before the slot is consistent is in its snapshot.
    let capture = install_ddl_capture(source, slot_name, plugin, &publications, identity).await?;
    state.record_ddl_capture(capture.as_ref())?;
    let mut conn = ReplicationConnection::connect(source).await?;
    let system = slot::identify_system(&mut conn).await?;
    let created = slot::create_slot(&mut conn, slot_name, plugin, export).await?;
    state.record_stream(&StreamRecord {
        slot: slot_name.to_string(),
        plugin,
        wal2json_nan_as_null: choice.nan_as_null,
        startpos: Some(created.consistent_point),
        source_uri: Some(source.redacted()),
        tables: Some(tables),
        publications: Some(publications),
        system_id: Some(system.system_id),
    })?;
    state.record_filters(filters)?;
    Ok((conn, created))
}

/// Installs the DDL capture when asked and possible (see [`super::ddl_capture`]).
async fn install_ddl_capture(
    source: &ConnInfo,
    slot_name: &str,
    plugin: Plugin,
    publications: &[String],
    identity: &IdentityChoice,
) -> Result<Option<super::ddl_capture::Capture>> {
    if !identity.ddl_capture {
        tracing::info!(
            "DDL capture off (--no-ddl-capture): a schema change on the source stops apply until it is made on the target"
        );
        return Ok(None);
    }
    if plugin != Plugin::Pgoutput {
        tracing::warn!(
            "DDL capture needs --plugin pgoutput (wal2json streams only the tables named when it starts): a schema change on the source stops apply until it is made on the target"
        );
        return Ok(None);
    }
    let client = pg::connect(source, Side::Source, "DDL capture").await?;
    if let Err(why) = super::ddl_capture::check_privileges(&client).await {
        tracing::warn!("no DDL capture: {why:#}");
        return Ok(None);
    }
    let version = pg::ServerVersion::of(&client).await?;
    let publication = publications.first().map(String::as_str);
    super::ddl_capture::install(&client, slot_name, publication, version)
        .await
        .map(Some)
}

/// The stream `stream receive` continues: the work dir's, or an existing slot it adopts
/// (`--slot-name`, e.g. one `pgtide snapshot` created; its start, tables and publications are
/// not known, so the tables are decided by the plan and recorded). Returns it with the tables
/// it carries.
pub async fn stream_to_receive(
    source: &ConnInfo,
    state: &crate::state::StateDb,
    dir: &std::path::Path,
    slot_name: Option<&str>,
    plugin: Plugin,
) -> Result<(StreamRecord, Vec<(String, String)>)> {
    let stream = match (state.stream()?, slot_name) {
        (Some(recorded), Some(asked)) if recorded.slot != asked => bail!(
            "the work dir {} streams from slot \"{}\", not \"{asked}\": use another --dir",
            dir.display(),
            recorded.slot
        ),
        (Some(recorded), _) => recorded,
        (None, Some(asked)) => {
            slot::check_slot_name(asked)?;
            // An adopted slot: its start, tables and publications are not known here.
            let adopted = StreamRecord {
                slot: asked.to_string(),
                plugin,
                wal2json_nan_as_null: state.wal2json_nan_as_null()?,
                startpos: None,
                source_uri: Some(source.redacted()),
                tables: None,
                publications: None,
                system_id: None,
            };
            state.record_stream(&adopted)?;
            adopted
        }
        (None, None) => bail!(
            "the work dir {} has no stream: run `pgtide stream setup` first, or give --slot-name to adopt an existing slot",
            dir.display()
        ),
    };
    let plugin = stream.plugin;
    let tables: Vec<(String, String)> = match &stream.tables {
        Some(tables) => tables.clone(),
        None => {
            let client = pg::connect(source, Side::Source, "stream tables").await?;
            let filters = state.recorded_filters()?.unwrap_or_default();
            let tables = PublicationPlan::decide(&client, plugin, &filters)
                .await?
                .tables;
            state.record_stream_tables(&tables)?;
            tables
        }
    };
    Ok((stream, tables))
}

/// `pgtide snapshot`: the publication(s) and a slot exporting its snapshot, recorded nowhere;
/// the returned connection holds the snapshot until it is closed.
pub async fn create_exported_slot(
    source: &ConnInfo,
    choice: PluginChoice,
    slot_name: &str,
    filters: &Filters,
    identity: &IdentityChoice,
) -> Result<(ReplicationConnection, slot::CreatedSlot)> {
    prepare_source(source, choice, slot_name, filters, identity).await?;
    let mut conn = ReplicationConnection::connect(source).await?;
    let created = slot::create_slot(&mut conn, slot_name, choice.plugin, true).await?;
    Ok((conn, created))
}

/// Drops a stream's slot and publication(s) (both idempotent, invariant 8); whether the slot
/// existed.
pub async fn drop_stream(source: &ConnInfo, slot_name: &str) -> Result<bool> {
    let client = pg::connect(source, Side::Source, "cleanup").await?;
    // The capture first: a schema change made meanwhile would otherwise fail on a missing
    // publication.
    if super::ddl_capture::remove(&client, slot_name).await? {
        tracing::info!("DDL capture removed from the source");
    }
    let mut conn = ReplicationConnection::connect(source).await?;
    let dropped = slot::drop_slot(&mut conn, slot_name).await?;
    conn.close().await;
    slot::drop_publication(&client, slot_name).await?;
    Ok(dropped)
}
