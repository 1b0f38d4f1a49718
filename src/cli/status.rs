//! `pgtide status`: prints `status::collect` once, as text or JSON, or refreshes it with
//! `--watch`. No lock: it only reads the work dir and asks the servers.

use std::io::{IsTerminal, Write};

use anyhow::Result;

use crate::cli::StatusArgs;
use crate::observe::status::{self, Servers};

pub async fn run(args: StatusArgs) -> Result<()> {
    let state = crate::state::StateDb::open_in_dir(&args.dir)?;
    let databases = crate::server::databases_of(&args.dir)?;
    let parse = |value: &Option<String>, which: &str| -> Result<_> {
        value
            .as_deref()
            .map(|v| super::parse_conninfo(v, which))
            .transpose()
    };
    let servers = Servers::from_state(
        &state,
        parse(&args.source, "source")?,
        parse(&args.target, "target")?,
    );
    let terminal = std::io::stdout().is_terminal();
    loop {
        // A whole-server work dir: a line per database and the total.
        let (json, text) = if databases.is_empty() {
            let report = status::collect(&args.dir, &state, &servers).await?;
            (
                serde_json::to_string(&report)?,
                status::render(&args.dir, &report),
            )
        } else {
            let report = status::collect_server(&databases, &servers).await?;
            (
                serde_json::to_string(&report)?,
                status::render_server(&args.dir, &report),
            )
        };
        let mut out = std::io::stdout().lock();
        if args.json {
            writeln!(out, "{json}")?;
        } else {
            if args.watch.is_some() && terminal {
                // Redraw in place: home the cursor and clear the screen.
                write!(out, "\x1b[H\x1b[2J")?;
            }
            write!(out, "{text}")?;
            if args.watch.is_some() && !terminal {
                writeln!(out)?;
            }
        }
        out.flush()?;
        drop(out);
        match args.watch {
            None => return Ok(()),
            Some(interval) => tokio::time::sleep(interval).await,
        }
    }
}
