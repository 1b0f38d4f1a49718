//! `pgtide ddl show|skip|retry`: reads and records the operator's decision on the schema
//! change apply stopped on (see `apply::ddl`); the next follow acts on it.

use anyhow::{Result, bail};

use crate::cli::DdlCommand;
use crate::state::{DdlDecision, StateDb};

pub fn run(command: DdlCommand) -> Result<()> {
    let (dir, decision) = match command {
        DdlCommand::Show(args) => (args.dir, None),
        DdlCommand::Skip(args) => (args.dir, Some(DdlDecision::Skip)),
        DdlCommand::Retry(args) => (args.dir, Some(DdlDecision::Replay)),
    };
    let path = dir.join("state.db");
    if !path.exists() {
        bail!(
            "{} is not a pgtide work dir (no state.db): check --dir",
            dir.display()
        );
    }
    let state = StateDb::open(&path)?;
    let stop = state.ddl_stop()?;
    match (decision, stop) {
        (None, stop) => {
            match &stop {
                Some(stop) => println!(
                    "apply stopped at schema change {}: {}\nstatement: {}\nrun `pgtide ddl skip` or `pgtide ddl retry`, then start the follow again",
                    stop.id,
                    stop.reason,
                    stop.statement.trim()
                ),
                None => println!("apply is not stopped at a schema change"),
            }
            for (id, decision) in state.ddl_decisions()? {
                println!(
                    "decided: {id} {}",
                    match decision {
                        DdlDecision::Skip => "skip",
                        DdlDecision::Replay => "retry",
                    }
                );
            }
        }
        (Some(_), None) => bail!(
            "apply is not stopped at a schema change in {}: nothing to decide (`pgtide ddl show` prints the state)",
            dir.display()
        ),
        (Some(decision), Some(stop)) => {
            state.decide_ddl(stop.id, decision)?;
            println!(
                "schema change {} will be {} when the follow starts again: {}",
                stop.id,
                match decision {
                    DdlDecision::Skip => "skipped",
                    DdlDecision::Replay => "replayed as captured",
                },
                stop.statement.trim()
            );
        }
    }
    Ok(())
}
