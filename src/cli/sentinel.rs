//! `pgtide sentinel get|set`: the operator's handle on a running follow (it re-reads the
//! sentinel every half second). No lock: it only reads and writes sentinel rows.

use anyhow::{Result, anyhow, bail};
use serde_json::json;

use crate::cli::{SentinelCommand, SentinelSetArgs};
use crate::pg::{self, Lsn, Side};
use crate::state::StateDb;

pub async fn run(command: SentinelCommand) -> Result<()> {
    match command {
        SentinelCommand::Get { dir } => {
            let state = StateDb::open_in_dir(&dir)?;
            let sentinel = state.sentinel()?;
            let positions = state.stream_positions()?;
            let startpos = state.stream()?.and_then(|stream| stream.startpos);
            let text = |lsn: Option<Lsn>| lsn.map(|lsn| lsn.to_string());
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "startpos": text(startpos),
                    "endpos": text(sentinel.endpos),
                    "apply": sentinel.apply,
                    "received_lsn": text(positions.received),
                    "spooled_lsn": text(positions.flushed),
                    "applied_lsn": text(sentinel.applied_lsn),
                }))?
            );
            Ok(())
        }
        SentinelCommand::Set(SentinelSetArgs {
            dir,
            what,
            lsn,
            current,
            source,
        }) => {
            let state = StateDb::open_in_dir(&dir)?;
            match what.as_str() {
                // A long-running follower past its endpos keeps following once it is cleared.
                "endpos" if lsn.as_deref() == Some("none") && !current => {
                    state.clear_endpos()?;
                    println!("endpos cleared: follow runs until an endpos is set again");
                }
                "endpos" => {
                    let endpos: Lsn = match (lsn, current) {
                        (Some(text), false) => text.parse().map_err(|e: String| anyhow!(e))?,
                        (None, true) => {
                            let source = source.ok_or_else(|| {
                                anyhow!("--current needs --source (or PGTIDE_SOURCE_PGURI)")
                            })?;
                            let source = super::parse_conninfo(&source, "source")?;
                            let client = pg::connect(&source, Side::Source, "sentinel").await?;
                            let text: String = client
                                // The insert position, not the flush position: with synchronous_commit = off
                                // a commit is visible before its WAL is flushed, and endpos must cover it.
                                .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                                .await?
                                .get(0);
                            text.parse().map_err(|e: String| anyhow!(e))?
                        }
                        _ => bail!("give either an LSN (such as 0/3000060) or --current"),
                    };
                    crate::follow::set_endpos(&state, endpos)?;
                    println!("endpos set to {endpos}");
                }
                "apply" => {
                    state.switch_apply_on()?;
                    println!("apply switched on");
                }
                other => bail!("unknown sentinel field \"{other}\": use endpos or apply"),
            }
            Ok(())
        }
    }
}
