//! Schema through pg_dump / pg_restore: pre-data (types, tables without indexes, views…) before
//! the copy, post-data (foreign keys, triggers, rules, partitioned-parent indexes, …) after it,
//! minus the indexes and constraints that pgtide's own index workers build. The selection is
//! made with `pg_restore --use-list`; the password travels in the child's environment only.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

use crate::clone::filters::Filters;
use crate::conninfo::ConnInfo;

/// Which half of the schema a dump holds.
#[derive(Clone, Copy, Debug)]
pub enum Section {
    PreData,
    PostData,
}

impl Section {
    fn flag(self) -> &'static str {
        match self {
            Section::PreData => "--section=pre-data",
            Section::PostData => "--section=post-data",
        }
    }
    pub fn file_stem(self) -> &'static str {
        match self {
            Section::PreData => "pre-data",
            Section::PostData => "post-data",
        }
    }
}

/// Where pg_dump / pg_restore are found: `PGTIDE_PG_BIN` if set, else the PATH.
pub fn pg_tool(name: &str) -> PathBuf {
    match std::env::var_os("PGTIDE_PG_BIN") {
        Some(dir) => Path::new(&dir).join(name),
        None => PathBuf::from(name),
    }
}

/// The major version of a client tool (`pg_dump (PostgreSQL) 15.18` → 15).
pub async fn tool_major_version(name: &str) -> Result<u32> {
    let path = pg_tool(name);
    let output = Command::new(&path).arg("--version").output().await.with_context(|| {
        format!(
            "cannot run {}: install the PostgreSQL client tools (apt-get install postgresql-client) or point PGTIDE_PG_BIN at their directory",
            path.display()
        )
    })?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .find_map(|w| w.split('.').next().and_then(|m| m.parse::<u32>().ok()))
        .with_context(|| {
            format!(
                "cannot read the version of {} from \"{}\"",
                path.display(),
                text.trim()
            )
        })
}

/// Runs a pg tool, returning its stdout; a failure carries its stderr (which never holds the
/// password: it is only in the environment).
async fn run_tool(name: &str, args: &[String], conn: &ConnInfo) -> Result<Vec<u8>> {
    let path = pg_tool(name);
    let mut cmd = Command::new(&path);
    cmd.args(args)
        .envs(conn.child_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // A pgtide killed with SIGKILL cannot kill its children: the kernel does it, so that no
    // orphaned pg_restore keeps changing the target while a resumed run works on it.
    // SAFETY: prctl is async-signal-safe and touches only the child being started.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    tracing::debug!("running {} {}", path.display(), args.join(" "));
    let output = cmd.output().await.with_context(|| {
        format!(
            "cannot run {}: is the PostgreSQL client installed?",
            path.display()
        )
    })?;
    if !output.status.success() {
        bail!(
            "{name} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}

/// Dumps one section of the source schema, as of `snapshot`, into `dir/<section>.dump`.
pub async fn dump(
    source: &ConnInfo,
    snapshot: &str,
    filters: &Filters,
    section: Section,
    dir: &Path,
) -> Result<PathBuf> {
    let file = dir.join(format!("{}.dump", section.file_stem()));
    let tmp = dir.join(format!("{}.dump.partial", section.file_stem()));
    let mut args = vec![
        "--format=custom".to_string(),
        section.flag().to_string(),
        format!("--snapshot={snapshot}"),
        format!("--file={}", tmp.display()),
        format!("--dbname={}", source.libpq_conninfo_without_password()),
    ];
    args.extend(filters.pg_dump_args());
    run_tool("pg_dump", &args, source)
        .await
        .with_context(|| format!("cannot dump the source schema ({})", section.file_stem()))?;
    std::fs::rename(&tmp, &file)?;
    Ok(file)
}

/// One line of `pg_restore --list`: `id; catalog-oid object-oid DESC schema name owner`.
#[derive(Debug, Clone)]
pub struct TocEntry {
    pub line: String,
    pub object_oid: Option<u32>,
    pub desc: String,
}

/// Lists a dump's table of contents.
pub async fn list(dump_file: &Path, conn: &ConnInfo) -> Result<Vec<TocEntry>> {
    let out = run_tool(
        "pg_restore",
        &["--list".to_string(), dump_file.display().to_string()],
        conn,
    )
    .await?;
    Ok(parse_toc(&String::from_utf8_lossy(&out)))
}

pub fn parse_toc(text: &str) -> Vec<TocEntry> {
    text.lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|line| {
            let after_id = line.split_once(';').map(|x| x.1).unwrap_or("").trim_start();
            let mut words = after_id.split_whitespace();
            let _catalog = words.next();
            let object_oid = words.next().and_then(|w| w.parse().ok());
            let rest: Vec<&str> = words.collect();
            // DESC is one to three words (e.g. "FK CONSTRAINT", "MATERIALIZED VIEW DATA").
            let desc = [
                "MATERIALIZED VIEW DATA",
                "FK CONSTRAINT",
                "INDEX ATTACH",
                "DEFAULT ACL",
                "SEQUENCE OWNED BY",
                "SEQUENCE SET",
                "TABLE DATA",
                "CHECK CONSTRAINT",
                "EVENT TRIGGER",
                "ROW SECURITY",
                "LARGE OBJECT",
                "MATERIALIZED VIEW",
                "TABLE ATTACH",
                "PUBLICATION TABLE",
            ]
            .iter()
            .find(|d| rest.join(" ").starts_with(*d))
            .map(|d| d.to_string())
            .unwrap_or_else(|| rest.first().map(|s| s.to_string()).unwrap_or_default());
            TocEntry {
                line: line.to_string(),
                object_oid,
                desc,
            }
        })
        .collect()
}

/// pgtide's publications (`pgtide_<slot>`, invariant 8) exist on the source only: pg_dump
/// sees them, the target must not get them.
pub fn is_pgtide_publication(e: &TocEntry) -> bool {
    // "PUBLICATION - <name> <owner>" and "PUBLICATION TABLE <schema> <name> <table> <owner>":
    // the publication's name is the second word after the kind.
    e.desc.starts_with("PUBLICATION")
        && e.line
            .split_once(e.desc.as_str())
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .is_some_and(|name| name.starts_with("pgtide_"))
}

/// Options of a pg_restore run.
pub struct RestoreOptions<'a> {
    pub skip_object_oids: &'a HashSet<u32>,
    pub clean: bool,
    pub no_owner: bool,
    pub no_acl: bool,
}

/// Restores `dump_file` on the target in one transaction (so a crash leaves all or nothing),
/// leaving out the TOC entries whose object OID is in `skip_object_oids`.
pub async fn restore(dump_file: &Path, target: &ConnInfo, opts: &RestoreOptions<'_>) -> Result<()> {
    let entries = list(dump_file, target).await?;
    let mut use_list = String::new();
    for e in &entries {
        let skip = matches!(e.desc.as_str(), "INDEX" | "CONSTRAINT")
            && e.object_oid
                .is_some_and(|oid| opts.skip_object_oids.contains(&oid));
        if skip {
            use_list.push_str(";pgtide builds it: ");
        } else if is_pgtide_publication(e) {
            use_list.push_str(";pgtide's own, source only: ");
        }
        use_list.push_str(&e.line);
        use_list.push('\n');
    }
    let list_file = dump_file.with_extension("list");
    std::fs::write(&list_file, use_list)
        .with_context(|| format!("cannot write {}", list_file.display()))?;
    let mut args = vec![
        format!("--dbname={}", target.libpq_conninfo_without_password()),
        format!("--use-list={}", list_file.display()),
        "--exit-on-error".to_string(),
        "--single-transaction".to_string(),
    ];
    if opts.clean {
        args.push("--clean".into());
        args.push("--if-exists".into());
    }
    if opts.no_owner {
        args.push("--no-owner".into());
    }
    if opts.no_acl {
        args.push("--no-acl".into());
    }
    args.push(dump_file.display().to_string());
    run_tool("pg_restore", &args, target)
        .await
        .with_context(|| format!("cannot restore {} on the target", dump_file.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toc_lines() {
        let toc = parse_toc(
            ";\n; Archive created at\n215; 1259 16386 TABLE public accounts postgres\n3210; 2606 16400 CONSTRAINT public accounts accounts_pkey postgres\n3300; 2606 16410 FK CONSTRAINT public b b_fk postgres\n3400; 0 16420 MATERIALIZED VIEW DATA public mv postgres\n",
        );
        assert_eq!(toc.len(), 4);
        assert_eq!(toc[0].desc, "TABLE");
        assert_eq!(toc[1].object_oid, Some(16400));
        assert_eq!(toc[1].desc, "CONSTRAINT");
        assert_eq!(toc[2].desc, "FK CONSTRAINT");
        assert_eq!(toc[3].desc, "MATERIALIZED VIEW DATA");
    }

    #[test]
    fn pgtide_publications_are_left_out() {
        let toc = parse_toc(
            "3500; 6104 16430 PUBLICATION - pgtide_mig1 postgres\n3501; 6106 16431 PUBLICATION TABLE public pgtide_mig1 t postgres\n3502; 6104 16432 PUBLICATION - app_pub postgres\n3503; 6106 16433 PUBLICATION TABLE public app_pub pgtide_notes postgres\n",
        );
        assert!(is_pgtide_publication(&toc[0]));
        assert!(is_pgtide_publication(&toc[1]));
        assert!(!is_pgtide_publication(&toc[2]));
        // A user's publication of a table whose name starts with pgtide_ is restored.
        assert!(!is_pgtide_publication(&toc[3]));
    }
}
