//! pgtide: move a live PostgreSQL database to another server. See DESIGN.md for the pipeline.

use clap::Parser;
use tracing_subscriber::EnvFilter;

use pgtide::cli::{self, Cli, Command, LogFormat};

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("PGTIDE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // tokio-postgres logs every statement it prepares or sends, with its parameters, at debug
    // level, password hashes of `copy roles` included: those modules never below info,
    // whatever PGTIDE_LOG asks (secrets stay out of logs; its protocol trace stays available).
    let filter = ["query", "simple_query", "prepare"]
        .iter()
        .filter_map(|module| format!("tokio_postgres::{module}=info").parse().ok())
        .fold(filter, |filter, cap| filter.add_directive(cap));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(log_colour())
        .with_writer(pgtide::observe::progress::log_writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Colour in the logs only for a person at a terminal: never when stderr is a file or a pipe
/// (log files and journald would get escape codes), nor with NO_COLOR set (no-color.org: any
/// non-empty value).
fn log_colour() -> bool {
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    std::io::stderr().is_terminal() && !no_color
}

/// Keeps the resident memory close to what is in use (invariant 4: memory bounded). Wide rows
/// pass through buffers of several MB (a statement's values, a spool batch, a read); glibc's
/// default raises its mmap threshold after the first such buffer is freed, so later ones come
/// from the heap arenas and stay resident once freed, one arena per thread that touched them.
/// A fixed 1 MB threshold returns every large buffer to the system when it is freed, and two
/// arenas bound what the runtime's threads keep. Measured on one 6,000 x 128 kB transaction
/// (`LIVE=1 BURST=W scripts/bench-cpu.sh`): peak RSS 287 MB with glibc's defaults, 138 MB with
/// these.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn bound_allocator_memory() {
    // SAFETY: mallopt only changes the allocator's tuning; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn bound_allocator_memory() {}

fn main() -> std::process::ExitCode {
    bound_allocator_memory();
    // Everything pgtide writes (the work dir 0700; state.db, the spool, the dumps 0600) is for
    // its user alone: schema dumps and spooled rows are the database's data.
    // SAFETY: umask only changes this process's file creation mask.
    unsafe {
        libc::umask(0o077);
    }
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let _failpoints = fail::FailScenario::setup();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Clone(args) => cli::clone::run(args).await,
            Command::Plan(args) => cli::clone::plan(args).await,
            Command::Verify(args) => cli::verify::run(args).await,
            Command::Snapshot(args) => cli::stream::snapshot(args).await,
            Command::Stream(cli::StreamCommand::Setup(args)) => cli::stream::setup(args).await,
            Command::Stream(cli::StreamCommand::Receive(args)) => cli::stream::receive(args).await,
            Command::Stream(cli::StreamCommand::Cleanup(args)) => cli::stream::cleanup(args).await,
            Command::Spool(cli::SpoolCommand::Show(args)) => cli::spool::show(args),
            Command::Ddl(command) => cli::ddl::run(command),
            Command::Follow(args) => cli::follow::run(args).await,
            Command::Sentinel(command) => cli::sentinel::run(command).await,
            Command::Cleanup(args) => cli::cleanup::cleanup(args).await,
            Command::Copy(cli::CopyCommand::Sequences(args)) => cli::copy::sequences(args).await,
            Command::Copy(cli::CopyCommand::Roles(args)) => cli::copy::roles(args).await,
            Command::Cutover(args) => cli::cutover::run(args).await,
            Command::Rollback(args) => cli::reverse::rollback(args).await,
            Command::Serve(args) => cli::status::serve(args).await,
            Command::Reverse(cli::ReverseCommand::Follow(args)) => cli::reverse::follow(args).await,
            Command::Reverse(cli::ReverseCommand::Status(args)) => cli::reverse::status(args).await,
            Command::Status(args) => cli::status::run(args).await,
            Command::Check(args) => cli::check::run(args).await,
        }
    });
    pgtide::pg::log_notice_count();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
