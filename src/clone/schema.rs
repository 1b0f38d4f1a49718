//! Schema through pg_dump / pg_restore: pre-data (types, tables without indexes, views…) before
//! the copy, post-data (foreign keys, triggers, rules, partitioned-parent indexes, …) after it,
//! minus the indexes and constraints that pgtide's own index workers build. The selection is
//! made with `pg_restore --use-list`; the password travels in the child's environment only.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

use crate::clone::filters::Filters;
use crate::clone::restore_script;
use crate::clone::tools::PgTools;
use crate::conninfo::ConnInfo;

/// Which half of the schema a dump holds.
#[derive(Clone, Copy, Debug)]
pub enum Section {
    PreData,
    PostData,
    /// Both halves in one dump (`follow --add-table` creates one table whole, in one restore).
    Whole,
}

impl Section {
    fn flag(self) -> &'static str {
        match self {
            Section::PreData => "--section=pre-data",
            Section::PostData => "--section=post-data",
            Section::Whole => "--schema-only",
        }
    }
    pub fn file_stem(self) -> &'static str {
        match self {
            Section::PreData => "pre-data",
            Section::PostData => "post-data",
            Section::Whole => "schema",
        }
    }
}

/// Runs a pg tool, returning its stdout; a failure carries its stderr (which never holds the
/// password: it is only in the environment).
async fn run_tool(
    tools: &PgTools,
    name: &str,
    args: &[String],
    conn: &ConnInfo,
) -> Result<Vec<u8>> {
    let path = tools.path(name);
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
    tools: &PgTools,
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
    let mut attempt = 1;
    loop {
        match run_tool(tools, "pg_dump", &args, source).await {
            Ok(_) => break,
            // pg_dump locks every table it dumps; an application transaction that locks two
            // of them the other way round (TRUNCATE a, b) can make it the victim of a deadlock
            // (40P01), a transient fault: the snapshot is still held, dump again.
            Err(e) if attempt < DUMP_ATTEMPTS && crate::pg::is_deadlock(&e) => {
                tracing::warn!(
                    "pg_dump ({}) lost a deadlock with a source session; dumping again (attempt {} of {DUMP_ATTEMPTS})",
                    section.file_stem(),
                    attempt + 1
                );
                attempt += 1;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "cannot dump the source schema ({})",
                    section.file_stem()
                )));
            }
        }
    }
    std::fs::rename(&tmp, &file)?;
    Ok(file)
}

/// How many times pg_dump runs when it loses deadlocks with the application.
const DUMP_ATTEMPTS: usize = 5;

/// One line of `pg_restore --list`: `id; catalog-oid object-oid DESC schema tag owner`. Only
/// the numbers and DESC are parsed out of it: schema, tag and owner are printed unquoted, so a
/// name with a space makes them ambiguous; `rest` keeps that text whole for exact comparisons.
#[derive(Debug, Clone)]
pub struct TocEntry {
    pub line: String,
    /// The OID of the system catalog that holds the object (`pg_class`, `pg_namespace`, …).
    pub catalog_oid: Option<u32>,
    pub object_oid: Option<u32>,
    pub desc: String,
    /// What follows DESC: `schema tag owner` (`-` for no schema).
    pub rest: String,
}

/// Lists a dump's table of contents.
pub async fn list(tools: &PgTools, dump_file: &Path, conn: &ConnInfo) -> Result<Vec<TocEntry>> {
    let out = run_tool(
        tools,
        "pg_restore",
        &["--list".to_string(), dump_file.display().to_string()],
        conn,
    )
    .await?;
    Ok(parse_toc(&String::from_utf8_lossy(&out)))
}

/// The DESC values of more than one word (e.g. "FK CONSTRAINT", "MATERIALIZED VIEW DATA");
/// a longer one comes before any of its prefixes.
const MULTI_WORD_DESCS: &[&str] = &[
    "MATERIALIZED VIEW DATA",
    "PUBLICATION TABLES IN SCHEMA",
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
    "FOREIGN TABLE",
    "FOREIGN DATA WRAPPER",
    "USER MAPPING",
    "OPERATOR CLASS",
    "OPERATOR FAMILY",
    "ACCESS METHOD",
    "PROCEDURAL LANGUAGE",
    "SHELL TYPE",
    "TEXT SEARCH CONFIGURATION",
    "TEXT SEARCH DICTIONARY",
    "TEXT SEARCH PARSER",
    "TEXT SEARCH TEMPLATE",
];

pub fn parse_toc(text: &str) -> Vec<TocEntry> {
    text.lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|line| {
            let after_id = line.split_once(';').map(|x| x.1).unwrap_or("").trim_start();
            let (catalog, after_catalog) = split_word(after_id);
            let (object, after_oids) = split_word(after_catalog);
            let after_oids = after_oids.trim_start_matches(' ');
            let desc = MULTI_WORD_DESCS
                .iter()
                .find(|d| {
                    after_oids
                        .strip_prefix(**d)
                        .is_some_and(|r| r.is_empty() || r.starts_with(' '))
                })
                .map(|d| d.to_string())
                .unwrap_or_else(|| split_word(after_oids).0.to_string());
            let rest = after_oids[desc.len().min(after_oids.len())..]
                .strip_prefix(' ')
                .unwrap_or("")
                .to_string();
            TocEntry {
                line: line.to_string(),
                catalog_oid: catalog.parse().ok(),
                object_oid: object.parse().ok(),
                desc,
                rest,
            }
        })
        .collect()
}

/// The first space-separated word of `text` and what follows it.
fn split_word(text: &str) -> (&str, &str) {
    let text = text.trim_start_matches(' ');
    match text.split_once(' ') {
        Some((word, rest)) => (word, rest),
        None => (text, ""),
    }
}

/// The TOC entries a restore leaves out, each with the reason written into the list file.
/// Objects are recognised by their catalog and OID on the source (never by a name parsed out
/// of a list line); comments, which have no OID in the list, by their exact tag.
#[derive(Debug, Default)]
pub struct LeaveOut {
    objects: HashMap<(u32, u32), String>,
    comments: HashMap<String, String>,
}

impl LeaveOut {
    /// Leaves out the object `oid` of the catalog `catalog_oid` (as on the source).
    pub fn object(&mut self, catalog_oid: u32, oid: u32, why: impl Into<String>) {
        self.objects.insert((catalog_oid, oid), why.into());
    }

    /// Leaves out the COMMENT entry whose tag is `tag`: the kind and the name as pg_dump
    /// quotes it (`EXTENSION hstore`, `SCHEMA "a b"`).
    pub fn comment(&mut self, tag: impl Into<String>, why: impl Into<String>) {
        self.comments.insert(tag.into(), why.into());
    }

    /// Why `entry` is left out, if it is.
    pub fn reason(&self, entry: &TocEntry) -> Option<&str> {
        if let (Some(catalog), Some(oid)) = (entry.catalog_oid, entry.object_oid)
            && let Some(why) = self.objects.get(&(catalog, oid))
        {
            return Some(why);
        }
        if entry.desc == "COMMENT" {
            // "- <tag> <owner>": the tag, then one word (the owner, empty for an extension).
            let tagged = entry.rest.strip_prefix("- ")?;
            return self
                .comments
                .iter()
                .find(|(tag, _)| {
                    tagged
                        .strip_prefix(tag.as_str())
                        .is_some_and(|owner| owner.is_empty() || owner.starts_with(' '))
                })
                .map(|(_, why)| why.as_str());
        }
        // pgtide's publications (`pgtide_<slot>`, invariant 8) exist on the source only; the
        // publication itself is also known by name ("- pgtide_x owner"), should its OID have
        // changed since the dump.
        let pgtide_own = (entry.desc == "PUBLICATION" && entry.rest.starts_with("- pgtide_"))
            // The DDL capture (replication::ddl_capture): its event triggers and the `pgtide`
            // schema's functions and tables ("<schema> <tag> <owner>"), their ACLs.
            || (entry.desc == "EVENT TRIGGER" && entry.rest.starts_with("- pgtide_ddl_"))
            || (entry.desc == "SCHEMA" && entry.rest.starts_with("- pgtide "))
            || (entry.desc == "ACL" && entry.rest.starts_with("- SCHEMA pgtide "))
            || entry.rest.starts_with("pgtide ");
        pgtide_own.then_some("pgtide's own, source only")
    }
}

/// Options of a pg_restore run.
pub struct RestoreOptions<'a> {
    pub tools: &'a PgTools,
    /// Indexes and constraints (by OID) that pgtide's index workers build.
    pub skip_object_oids: &'a HashSet<u32>,
    pub leave_out: &'a LeaveOut,
    pub clean: bool,
    pub no_owner: bool,
    pub no_acl: bool,
    pub no_tablespaces: bool,
}

/// Restores `dump_file` on the target in one transaction (so a crash leaves all or nothing),
/// leaving out the TOC entries whose object OID is in `skip_object_oids`.
pub async fn restore(dump_file: &Path, target: &ConnInfo, opts: &RestoreOptions<'_>) -> Result<()> {
    let entries = list(opts.tools, dump_file, target).await?;
    let mut use_list = String::new();
    for e in &entries {
        let skip = matches!(e.desc.as_str(), "INDEX" | "CONSTRAINT")
            && e.object_oid
                .is_some_and(|oid| opts.skip_object_oids.contains(&oid));
        if skip {
            use_list.push_str(";pgtide builds it: ");
        } else if let Some(why) = opts.leave_out.reason(e) {
            use_list.push_str(&format!(";{why}: "));
        }
        use_list.push_str(&e.line);
        use_list.push('\n');
    }
    let list_file = dump_file.with_extension("list");
    std::fs::write(&list_file, use_list)
        .with_context(|| format!("cannot write {}", list_file.display()))?;
    let mut args = vec![format!("--use-list={}", list_file.display())];
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
    if opts.no_tablespaces {
        args.push("--no-tablespaces".into());
    }
    args.push(dump_file.display().to_string());
    if opts.tools.newer_than_target() {
        return restore_through_script(dump_file, target, opts.tools, &args).await;
    }
    let mut args_with_target = vec![format!(
        "--dbname={}",
        target.libpq_conninfo_without_password()
    )];
    args_with_target.extend(args);
    args_with_target.extend([
        "--exit-on-error".to_string(),
        "--single-transaction".to_string(),
    ]);
    run_tool(opts.tools, "pg_restore", &args_with_target, target)
        .await
        .with_context(|| format!("cannot restore {} on the target", dump_file.display()))?;
    Ok(())
}

/// The restore when pg_restore is newer than the target (no client tools of a fitting major
/// were found): its script, minus the settings the target lacks, through psql.
async fn restore_through_script(
    dump_file: &Path,
    target: &ConnInfo,
    tools: &PgTools,
    args: &[String],
) -> Result<()> {
    let psql = tools.path("psql");
    if !psql.exists() {
        bail!(
            "pg_restore {} is newer than the target server and must restore through psql, but {} does not exist: install the target's PostgreSQL client tools, or psql next to pg_restore",
            tools.chosen.version,
            psql.display()
        );
    }
    let client = crate::pg::connect(target, crate::pg::Side::Target, "restore settings").await?;
    let known: HashSet<String> = client
        .query("SELECT name FROM pg_catalog.pg_settings", &[])
        .await
        .context("cannot read the target's settings")?
        .iter()
        .map(|row| row.get(0))
        .collect();
    drop(client);
    let left_out = restore_script::restore_through_psql(
        &tools.path("pg_restore"),
        &psql,
        args,
        target,
        &known,
    )
    .await
    .with_context(|| format!("cannot restore {} on the target", dump_file.display()))?;
    if !left_out.is_empty() {
        tracing::info!(
            "restored {} with pg_restore {} through psql, leaving out the settings the target does not know: {}",
            dump_file.display(),
            tools.chosen.version,
            left_out.join(", ")
        );
    }
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
    fn names_with_spaces_do_not_shift_the_fields() {
        let toc = parse_toc(
            "3501; 6106 16431 PUBLICATION TABLE a b pgtide_mig1 t x postgres\n3502; 0 0 COMMENT - EXTENSION hstore \n3503; 0 0 COMMENT - SCHEMA \"a b\" postgres\n3504; 2615 16500 SCHEMA - a b postgres\n",
        );
        assert_eq!(toc[0].desc, "PUBLICATION TABLE");
        assert_eq!(toc[0].catalog_oid, Some(6106));
        assert_eq!(toc[0].rest, "a b pgtide_mig1 t x postgres");
        let mut leave_out = LeaveOut::default();
        leave_out.object(6106, 16431, "pgtide's own, source only");
        leave_out.object(2615, 16500, "exists on the target");
        leave_out.comment("EXTENSION hstore", "installed on the target");
        leave_out.comment("SCHEMA a", "not this one");
        assert!(leave_out.reason(&toc[0]).is_some());
        assert_eq!(leave_out.reason(&toc[1]), Some("installed on the target"));
        assert_eq!(
            leave_out.reason(&toc[2]),
            None,
            "SCHEMA a is not SCHEMA \"a b\""
        );
        assert_eq!(leave_out.reason(&toc[3]), Some("exists on the target"));
        // Same OID, another catalog: a different object.
        leave_out.object(1259, 16431, "x");
        assert_eq!(leave_out.reason(&toc[0]), Some("pgtide's own, source only"));
    }

    #[test]
    fn pgtide_publication_is_known_by_name_too() {
        let toc = parse_toc(
            "3500; 6104 16430 PUBLICATION - pgtide_mig1 postgres\n3502; 6104 16432 PUBLICATION - app_pub postgres\n",
        );
        let leave_out = LeaveOut::default();
        assert!(leave_out.reason(&toc[0]).is_some());
        assert!(leave_out.reason(&toc[1]).is_none());
    }
}
