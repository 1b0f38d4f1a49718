//! The follow engine's one endpos rule: endpos is pinned only at or after what the target has
//! applied (`set_endpos`, used by sentinel and cutover too), and a running follow re-reads it
//! from the sentinel every half second, asking the source for the endpos marker
//! (`replication::marker`) so that apply knows when nothing before endpos is still to come.

use std::time::Duration;

use anyhow::{Result, bail};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::conninfo::ConnInfo;
use crate::pg::Lsn;
use crate::replication::marker::EndposMarker;
use crate::state::StateDb;

/// Pins endpos, refusing one behind the position the target has already applied: the
/// transactions between them are on the target and cannot be taken back.
pub fn set_endpos(state: &StateDb, endpos: Lsn) -> Result<()> {
    if let Some(applied) = state.applied_lsn()?
        && endpos < applied
    {
        bail!(
            "endpos {endpos} is behind the position the target has already applied, {applied}: the transactions committed between them are on the target and cannot be taken back. Give an endpos at or after {applied} (`pgtide sentinel set endpos --current` takes the source's current position)"
        );
    }
    state.set_endpos(endpos)
}

/// Follows the sentinel's endpos every half second into the returned channel (apply's stop
/// rule) and, once one is set, has the marker written after it. Abort the task to stop.
pub(super) fn follow_sentinel(
    state: &StateDb,
    source: &ConnInfo,
) -> Result<(JoinHandle<()>, watch::Receiver<Option<Lsn>>)> {
    let (endpos_tx, endpos_rx) = watch::channel(state.endpos()?);
    let state = state.clone();
    let marker = EndposMarker::new(source);
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Ok(endpos) = state.endpos() {
                endpos_tx.send_if_modified(|current| {
                    let changed = *current != endpos;
                    *current = endpos;
                    changed
                });
                // Once the source is past endpos, a marker transaction after it lets apply
                // see that nothing committed before endpos is still to come.
                if let Some(endpos) = endpos {
                    marker.request(endpos);
                }
            }
        }
    });
    Ok((task, endpos_rx))
}
