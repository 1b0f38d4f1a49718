//! `pgtide snapshot` and `pgtide stream setup|receive|cleanup`: the change stream on its own.
//! The setup itself (what is published, the slot, the stream record) is
//! `replication::setup`; the receive loop `replication::stream`.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};

use crate::cli::{SnapshotArgs, StreamCleanupArgs, StreamReceiveArgs, StreamSetupArgs};
use crate::replication::setup;
use crate::replication::slot;
use crate::replication::stream::{self, Ended, ReceiveOptions};
use crate::workdir::WorkDir;

pub async fn snapshot(args: SnapshotArgs) -> Result<()> {
    let source = super::parse_conninfo(&args.source.source, "source")?;
    let (conn, created) = setup::create_exported_slot(
        &source,
        setup::PluginChoice {
            plugin: args.slot.plugin,
            nan_as_null: args.slot.wal2json_nan_as_null,
            applied: false,
        },
        &args.slot.slot_name,
        &super::load_filters(args.slot.filters.as_deref())?,
        &super::identity(&args.slot.identity),
    )
    .await?;
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
    let (conn, created) = setup::create_recorded_slot(
        &source,
        state,
        &args.slot.slot_name,
        setup::PluginChoice {
            plugin: args.slot.plugin,
            nan_as_null: args.slot.wal2json_nan_as_null,
            applied: false,
        },
        &filters,
        &super::identity(&args.slot.identity),
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
    let (stream, tables) = setup::stream_to_receive(
        &source,
        &state,
        &args.dir,
        args.slot_name.as_deref(),
        args.plugin,
    )
    .await?;
    let plugin = stream.plugin;
    let start = stream.startpos.unwrap_or_default();
    let mut spool = workdir.spool_writer()?;
    let opts = ReceiveOptions {
        publications: setup::recorded_publications(&stream),
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
    let dropped = setup::drop_stream(&source, &slot_name).await?;
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
