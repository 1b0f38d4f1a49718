//! Watching a migration without touching it: `status` (the report and its one-line verdict),
//! `metrics` (the Prometheus endpoint built on the same report), `progress` (the terminal bars
//! and the log writer that keeps them intact). Everything here reads state.db, asks the spool
//! (through `spool.rs`) and the servers; nothing here changes a migration.

pub mod metrics;
pub mod progress;
pub mod status;
