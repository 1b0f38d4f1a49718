//! The follow process's liveness in state.db, which cutover reads while it waits for endpos:
//! a heartbeat thread, and how the follow stopped.

use std::time::Duration;

use anyhow::Result;

use crate::state::StateDb;

/// Heartbeat seconds: cutover takes a follow whose heartbeat is older than
/// `LIVENESS_TIMEOUT` for dead.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How old a follow's heartbeat may get before cutover says that apply is not running.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(5);

/// The follow process's liveness in state.db: a heartbeat every second from a thread of its
/// own (so a busy or blocked async runtime does not fake a death), until dropped or the
/// process dies; `stopped` records how it ended. Cutover reads it while it waits, so that a
/// dead follow is reported within seconds, not at the end of --timeout.
pub(super) struct Liveness {
    state: StateDb,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Liveness {
    pub(super) fn start(state: &StateDb) -> Result<Self> {
        let pid = std::process::id();
        state.follow_started(pid)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (beat_state, beat_stop) = (state.clone(), stop.clone());
        std::thread::Builder::new()
            .name("pgtide-heartbeat".into())
            .spawn(move || {
                while !beat_stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(HEARTBEAT);
                    if let Err(e) = beat_state.follow_heartbeat(pid) {
                        tracing::warn!("cannot record the follow heartbeat: {e:#}");
                    }
                }
            })?;
        Ok(Liveness {
            state: state.clone(),
            stop,
        })
    }

    /// Records that this follow stopped: at endpos (None) or on an error.
    pub(super) fn stopped(&self, error: Option<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self
            .state
            .follow_stopped(std::process::id(), error.as_deref())
        {
            tracing::warn!("cannot record that the follow stopped: {e:#}");
        }
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
