//! Restoring with a pg_restore newer than the target server. pg_restore writes a fixed header
//! of `SET` lines for every server it might meet (`SET transaction_timeout = 0;` from 17 on);
//! a target of an older major rejects the settings it does not know, and with
//! `--exit-on-error` the restore stops there. PostgreSQL's answer is to use the target's own
//! client tools; when only newer ones exist (a 16 → 16 move with client tools 18, say),
//! pgtide has pg_restore write the script, leaves out exactly those `SET` lines of settings
//! the target lacks, and runs the rest with the same directory's psql in one transaction,
//! stopping at the first error.

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::conninfo::ConnInfo;

/// The name of the setting a script line sets, when the line is a plain top-level
/// `SET name = value;` (what pg_restore's header holds); None for every other line.
pub fn set_line_setting(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("SET ")?;
    let (name, value) = rest.split_once(" = ")?;
    let plain_name = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    (plain_name && value.ends_with(';') && !value.contains('\n')).then_some(name)
}

/// Runs `pg_restore <args> -f -` and pipes its script into `psql --single-transaction` on
/// the target, leaving out the `SET` lines of settings not in `known`. `args` are pg_restore's
/// arguments without a target connection (no `--dbname`, `--single-transaction` or
/// `--exit-on-error`: psql carries those). Returns the settings left out.
pub async fn restore_through_psql(
    pg_restore: &Path,
    psql: &Path,
    args: &[String],
    target: &ConnInfo,
    known: &HashSet<String>,
) -> Result<Vec<String>> {
    let mut restore = Command::new(pg_restore);
    restore
        .args(args)
        .arg("--file=-")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut restore = restore
        .spawn()
        .with_context(|| format!("cannot run {}", pg_restore.display()))?;
    let mut load = Command::new(psql);
    load.args([
        "--no-psqlrc",
        "--quiet",
        "--single-transaction",
        "--set=ON_ERROR_STOP=1",
        "--file=-",
    ])
    .arg(format!(
        "--dbname={}",
        target.libpq_conninfo_without_password()
    ))
    .envs(target.child_env())
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut load = load
        .spawn()
        .with_context(|| format!("cannot run {}", psql.display()))?;

    let script = restore.stdout.take().context("pg_restore's output")?;
    let mut into_psql = load.stdin.take().context("psql's input")?;
    let mut lines = BufReader::new(script);
    let mut line = Vec::new();
    let mut left_out: Vec<String> = Vec::new();
    let mut psql_gone = false;
    loop {
        line.clear();
        if lines.read_until(b'\n', &mut line).await? == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        if let Some(name) = set_line_setting(text.trim_end_matches(['\n', '\r']))
            && !known.contains(name)
        {
            if !left_out.iter().any(|n| n == name) {
                left_out.push(name.to_string());
            }
            continue;
        }
        if !psql_gone && into_psql.write_all(&line).await.is_err() {
            // psql stopped on an error: its stderr says which; drain pg_restore to the end.
            psql_gone = true;
        }
    }
    drop(into_psql);
    let restore_out = restore.wait_with_output().await?;
    let load_out = load.wait_with_output().await?;
    if !load_out.status.success() {
        bail!(
            "psql failed ({}) restoring pg_restore's script: {}",
            load_out.status,
            String::from_utf8_lossy(&load_out.stderr).trim()
        );
    }
    if !restore_out.status.success() {
        bail!(
            "pg_restore failed ({}): {}",
            restore_out.status,
            String::from_utf8_lossy(&restore_out.stderr).trim()
        );
    }
    Ok(left_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_lines_of_the_header_are_recognised() {
        assert_eq!(
            set_line_setting("SET transaction_timeout = 0;"),
            Some("transaction_timeout")
        );
        assert_eq!(
            set_line_setting("SET client_encoding = 'UTF8';"),
            Some("client_encoding")
        );
        // Not a plain header line: left alone.
        assert_eq!(
            set_line_setting("SELECT pg_catalog.set_config('search_path', '', false);"),
            None
        );
        assert_eq!(set_line_setting("SET search_path TO public;"), None);
        assert_eq!(set_line_setting("    SET x = 1;"), None);
        assert_eq!(set_line_setting("SET \"Odd\" = 1;"), None);
        assert_eq!(set_line_setting("SET x = 1"), None);
    }
}
