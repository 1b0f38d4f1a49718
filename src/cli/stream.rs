//! `pgtide snapshot` and `pgtide stream setup|receive|cleanup`: the change stream on its own.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};

use crate::cli::{
    IdentityArgs, SnapshotArgs, StreamCleanupArgs, StreamReceiveArgs, StreamSetupArgs,
};
use crate::conninfo::ConnInfo;
use crate::pg::{self, Side};
use crate::replication::conn::ReplicationConnection;
use crate::replication::stream::{self, Ended, ReceiveOptions};
use crate::replication::{Plugin, slot};
use crate::state::StreamRecord;
use crate::workdir::WorkDir;

/// Refuses, before anything is created, to publish tables without a replica identity, naming
/// each table and the fix.
async fn refuse_tables_without_identity(
    client: &tokio_postgres::Client,
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
    client: &tokio_postgres::Client,
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
    filters: &crate::clone::filters::Filters,
    identity: &IdentityArgs,
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
    let (tables, not_followed) = slot::published_tables(&client, plugin, filters).await?;
    if !not_followed.is_empty() {
        tracing::warn!("{}", slot::not_followed_notice(&not_followed));
    }
    let append_only = slot::append_only_published(&client, &tables, &identity.append_only).await?;
    if !append_only.is_empty() && plugin != Plugin::Pgoutput {
        bail!(
            "--append-only needs --plugin pgoutput (it publishes those tables for INSERT and TRUNCATE only; wal2json has no publications)"
        );
    }
    let regular: Vec<(String, String)> = tables
        .iter()
        .filter(|t| !append_only.contains(t))
        .cloned()
        .collect();
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

pub async fn snapshot(args: SnapshotArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.source.source, "source")?;
    prepare_source(
        &source,
        PluginChoice {
            plugin: args.slot.plugin,
            nan_as_null: args.slot.wal2json_nan_as_null,
            applied: false,
        },
        &args.slot.slot_name,
        &super::load_filters(args.slot.filters.as_deref())?,
        &args.slot.identity,
    )
    .await?;
    let mut conn = ReplicationConnection::connect(&source).await?;
    let created =
        slot::create_slot(&mut conn, &args.slot.slot_name, args.slot.plugin, true).await?;
    let snapshot = created
        .snapshot
        .ok_or_else(|| anyhow!("the source exported no snapshot"))?;
    println!("slot:           {}", args.slot.slot_name);
    println!("snapshot:       {snapshot}");
    println!("consistent LSN: {}", created.consistent_point);
    println!(
        "The snapshot stays valid until this command is interrupted (Ctrl-C). The slot stays;"
    );
    println!(
        "drop it with `pgtide stream cleanup --slot-name {}`.",
        args.slot.slot_name
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    tokio::signal::ctrl_c().await?;
    conn.close().await;
    Ok(())
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
    filters: &crate::clone::filters::Filters,
    identity: &IdentityArgs,
    export: bool,
) -> Result<(ReplicationConnection, slot::CreatedSlot)> {
    let Published {
        tables,
        publications,
    } = prepare_source(source, choice, slot_name, filters, identity).await?;
    let plugin = choice.plugin;
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

pub async fn setup(args: StreamSetupArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.source.source, "source")?;
    let workdir = WorkDir::open(&args.dir, "stream setup")?;
    let state = &workdir.state;
    if let Some(existing) = state.stream_slot()? {
        bail!(
            "the work dir {} already has a stream on slot \"{existing}\": run `pgtide stream receive` to continue it, or `pgtide stream cleanup` first",
            args.dir.display()
        );
    }
    let filters = super::load_filters(args.slot.filters.as_deref())?;
    let (conn, created) = create_recorded_slot(
        &source,
        state,
        &args.slot.slot_name,
        PluginChoice {
            plugin: args.slot.plugin,
            nan_as_null: args.slot.wal2json_nan_as_null,
            applied: false,
        },
        &filters,
        &args.slot.identity,
        false,
    )
    .await?;
    conn.close().await;
    println!(
        "slot {} ({}) created; the stream starts at {}",
        args.slot.slot_name,
        args.slot.plugin.name(),
        created.consistent_point
    );
    Ok(())
}

pub async fn receive(args: StreamReceiveArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.source.source, "source")?;
    let workdir = WorkDir::open(&args.dir, "stream receive")?;
    let state = workdir.state.clone();
    let stream = match (state.stream()?, &args.slot_name) {
        (Some(recorded), Some(asked)) if &recorded.slot != asked => bail!(
            "the work dir {} streams from slot \"{}\", not \"{asked}\": use another --dir",
            args.dir.display(),
            recorded.slot
        ),
        (Some(recorded), _) => recorded,
        (None, Some(asked)) => {
            slot::check_slot_name(asked)?;
            // An adopted slot: its start, tables and publications are not known here.
            let adopted = StreamRecord {
                slot: asked.clone(),
                plugin: args.plugin,
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
            args.dir.display()
        ),
    };
    let plugin = stream.plugin;
    let start = stream.startpos.unwrap_or_default();
    let tables: Vec<(String, String)> = match &stream.tables {
        Some(tables) => tables.clone(),
        None => {
            let client = pg::connect(&source, Side::Source, "stream tables").await?;
            let filters = state.recorded_filters()?.unwrap_or_default();
            let (tables, _) = slot::published_tables(&client, plugin, &filters).await?;
            state.record_stream_tables(&tables)?;
            tables
        }
    };
    let mut spool = workdir.spool_writer()?;
    let opts = ReceiveOptions {
        publications: recorded_publications(&stream),
        slot: stream.slot,
        plugin,
        start,
        endpos: args.endpos,
        status_interval: Duration::from_secs(1),
        tables,
        system_id: stream.system_id,
        applied: None,
    };
    let ended = stream::receive(&source, &mut spool, &state, &opts).await;
    spool.close()?;
    match ended? {
        Ended::Endpos { flushed } => {
            println!(
                "reached endpos {}: spooled through {flushed}",
                args.endpos.unwrap_or_default()
            );
            Ok(())
        }
        Ended::Interrupted { flushed } => {
            println!("interrupted: spooled through {flushed}; rerun to continue");
            Ok(())
        }
    }
}

pub async fn cleanup(args: StreamCleanupArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.source.source, "source")?;
    let workdir = WorkDir::open(&args.dir, "stream cleanup")?;
    let state = &workdir.state;
    let slot_name = match (args.slot_name, state.stream_slot()?) {
        (Some(s), _) | (None, Some(s)) => s,
        (None, None) => bail!("no slot to drop: the work dir names none; give --slot-name"),
    };
    let mut conn = ReplicationConnection::connect(&source).await?;
    let dropped = slot::drop_slot(&mut conn, &slot_name).await?;
    conn.close().await;
    let client = pg::connect(&source, Side::Source, "cleanup").await?;
    slot::drop_publication(&client, &slot_name).await?;
    state.forget_stream()?;
    println!(
        "{} slot {slot_name} and publication {}",
        if dropped {
            "dropped"
        } else {
            "no slot to drop:"
        },
        slot::publication_name(&slot_name)
    );
    Ok(())
}
