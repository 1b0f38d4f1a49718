//! pgtide: move a live PostgreSQL database to another server with seconds of downtime.
//! The library holds every stage (see DESIGN.md for the pipeline); `main.rs` is the CLI.

pub mod apply;
pub mod cli;
pub mod clone;
pub mod conninfo;
pub mod cutover;
pub mod decode;
pub mod errors;
pub mod failpoints;
pub mod follow;
pub mod observe;
pub mod pg;
pub mod plan;
pub mod preflight;
pub mod replication;
pub mod roles;
pub mod server;
pub mod spool;
pub mod state;
pub mod units;
pub mod verify;
pub mod workdir;
