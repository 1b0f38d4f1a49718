//! Watching a migration without touching it: `status` (the report and its one-line verdict),
//! `metrics` (the Prometheus endpoint built on the same report), `progress` (the terminal bars
//! and the log writer that keeps them intact), `slot_wal` (what the slot costs the source: retained
//! WAL against `max_slot_wal_keep_size`, shared with `check`). Everything here reads state.db, asks the spool
//! (through `spool.rs`) and the servers; nothing here changes a migration.

pub mod history;
pub mod http;
pub mod metrics;
pub mod progress;
pub mod slot_wal;
pub mod status;
