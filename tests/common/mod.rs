//! Helpers for the integration tests: every test gets its own pair of databases on the real
//! clusters that scripts/test.sh starts, and runs the real pgtide binary. By concern:
//! `servers` (clusters, databases, SQL), `process` (running pgtide), `args` (its command
//! lines), `workdir` (the work dir and state.db), `fixtures` (shared SQL); all re-exported, so
//! a test file needs only `use common::*;`.
#![allow(dead_code)]

pub mod args;
pub mod fixtures;
pub mod process;
pub mod servers;
pub mod workdir;

// Not every test file uses every concern.
#[allow(unused_imports)]
pub use args::*;
#[allow(unused_imports)]
pub use fixtures::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use servers::*;
#[allow(unused_imports)]
pub use workdir::*;
