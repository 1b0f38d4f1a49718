//! `pgtide status`: prints `status::collect` once, as text or JSON, or refreshes it with
//! `--watch`. No lock: it only reads the work dir and asks the servers.

use std::io::{IsTerminal, Write};

use anyhow::Result;

use crate::cli::StatusArgs;
use crate::observe::status::{self, Servers};

pub async fn run(args: StatusArgs) -> Result<()> {
    let state = crate::state::StateDb::open_in_dir(&args.dir)?;
    let databases = crate::server::databases_of(&args.dir)?;
    let servers = servers_of(&state, &args.source, &args.target)?;
    let terminal = std::io::stdout().is_terminal();
    loop {
        // A whole-server work dir: a line per database and the total.
        let (json, text) = if databases.is_empty() {
            let report = status::collect(&args.dir, &state, &servers).await?;
            let mut json = serde_json::to_value(&report)?;
            let mut text = status::render(&args.dir, &report);
            if let Some(window) = args.since {
                let points = state.history_since(crate::state::now() - window.as_secs_f64())?;
                text.push_str(&crate::observe::history::trend(&points, window));
                json["history"] = serde_json::to_value(&points)?;
            }
            // After `cutover --reverse`: the reverse stream's own status, its servers swapped.
            if let Some(reverse) = reverse_status(&args.dir, &servers).await? {
                text.push_str(&format!(
                    "reverse stream (target → source): {}\n",
                    reverse.1
                ));
                json["reverse"] = reverse.0;
            }
            (json.to_string(), text)
        } else {
            let report = status::collect_server(&databases, &servers).await?;
            let mut json = serde_json::to_value(&report)?;
            let mut text = status::render_server(&args.dir, &report);
            if let Some(window) = args.since {
                let since = crate::state::now() - window.as_secs_f64();
                for (db, dir) in &databases {
                    let Ok(db_state) = crate::state::StateDb::open_in_dir(dir) else {
                        continue;
                    };
                    let points = db_state.history_since(since)?;
                    text.push_str(&format!(
                        "{}: {}",
                        db.name,
                        crate::observe::history::trend(&points, window)
                    ));
                    json["history"][&db.name] = serde_json::to_value(&points)?;
                }
            }
            // After `cutover --reverse`: each database's reverse stream.
            for (db, dir) in &databases {
                let in_db = |info: &Option<crate::conninfo::ConnInfo>| {
                    info.as_ref()
                        .map(|info| crate::server::in_database(info, &db.name))
                };
                let servers = Servers {
                    source: in_db(&servers.source),
                    target: in_db(&servers.target),
                };
                if let Some(reverse) = reverse_status(dir, &servers).await? {
                    text.push_str(&format!(
                        "reverse stream of {} (target → source): {}\n",
                        db.name, reverse.1
                    ));
                    json["reverse"][&db.name] = reverse.0;
                }
            }
            (json.to_string(), text)
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

/// The reverse stream's status (JSON, with `rolled_back`) and its verdict, if the work dir has
/// one.
async fn reverse_status(
    dir: &std::path::Path,
    servers: &Servers,
) -> Result<Option<(serde_json::Value, String)>> {
    let Some(state) = crate::cutover::reverse::state_of(dir)? else {
        return Ok(None);
    };
    let reverse_servers =
        Servers::from_state(&state, servers.target.clone(), servers.source.clone());
    let report = status::collect(
        &crate::cutover::reverse::dir_of(dir),
        &state,
        &reverse_servers,
    )
    .await?;
    let rolled_back = state.rolled_back()?;
    let verdict = match &rolled_back {
        Some(done) => format!("rolled back: applied through the target's {}", done.endpos),
        None => status::verdict(&report).replace("cut over", "roll back"),
    };
    let mut json = serde_json::to_value(&report)?;
    json["rolled_back"] = serde_json::to_value(&rolled_back)?;
    json["verdict"] = serde_json::Value::String(verdict.clone());
    Ok(Some((json, verdict)))
}

/// `pgtide serve`: the dashboard of a work dir, until interrupted.
pub async fn serve(args: crate::cli::ServeArgs) -> Result<()> {
    let state = crate::state::StateDb::open_in_dir(&args.dir)?;
    // A whole-server work dir: each database has its own state (and the page a line each).
    let whole_server = !crate::server::databases_of(&args.dir)?.is_empty();
    let servers = servers_of(&state, &args.source, &args.target)?;
    let bound = crate::observe::http::serve(
        &args.http_addr,
        args.dir.clone(),
        (!whole_server).then_some(state),
        servers,
        args.http_token.clone(),
    )
    .await?;
    println!(
        "serving the dashboard of {} on http://{bound}/ (Ctrl-C stops)",
        args.dir.display()
    );
    tokio::signal::ctrl_c().await?;
    // A cutover asked over HTTP is finished, not cut short.
    crate::observe::http::wait_for_actions().await;
    Ok(())
}

/// The servers status asks: `--source` / `--target` when given, else the work dir's records.
fn servers_of(
    state: &crate::state::StateDb,
    source: &Option<String>,
    target: &Option<String>,
) -> Result<Servers> {
    let parse = |value: &Option<String>, which: &str| -> Result<_> {
        value
            .as_deref()
            .map(|v| super::parse_conninfo(v, which))
            .transpose()
    };
    Ok(Servers::from_state(
        state,
        parse(source, "source")?,
        parse(target, "target")?,
    ))
}
