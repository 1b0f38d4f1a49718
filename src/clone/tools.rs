//! Which pg_dump / pg_restore pgtide runs. pg_dump must be at least the source's major version
//! (an older one refuses a newer server), and PostgreSQL recommends the newer server's pg_dump
//! for an upgrade: so `PGTIDE_PG_BIN`, when set, is the operator's explicit choice (used or
//! refused, never second-guessed); otherwise pgtide reads the version of every pair on the
//! PATH and in the usual install directories and takes the target's major if present, else the
//! newest one between the source's and the target's (a pg_restore newer than the target writes
//! settings the target does not know), else the newest one at least the source's (restored
//! through `restore_script`). Clone and check both ask this module, so they agree.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

/// The environment variable naming the operator's bin directory.
pub const PG_BIN_ENV: &str = "PGTIDE_PG_BIN";

/// A directory holding pg_dump and pg_restore, with the pair's version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub dir: PathBuf,
    /// pg_dump's version as it prints it (`18.6`).
    pub version: String,
    /// The pair's major version (the lower of the two tools', should they differ).
    pub major: u32,
}

/// The pair pgtide runs: pg_dump and pg_restore from one directory.
#[derive(Clone, Debug)]
pub struct PgTools {
    pub chosen: Candidate,
    /// Whether it came from `PGTIDE_PG_BIN` rather than the search.
    pub explicit: bool,
    /// The target's major, when known: a pair newer than it restores through
    /// `restore_script`.
    pub target_major: Option<u32>,
}

impl PgTools {
    /// Whether pg_restore is of a newer major than the target (its fixed `SET` header may name
    /// settings the target does not know).
    pub fn newer_than_target(&self) -> bool {
        self.target_major.is_some_and(|t| self.chosen.major > t)
    }

    /// The path of one tool of the pair (`pg_dump`, `pg_restore`).
    pub fn path(&self, tool: &str) -> PathBuf {
        self.chosen.dir.join(tool)
    }

    /// "pg_dump 18.6 (/usr/lib/postgresql/18/bin/pg_dump)": what check and the log print.
    pub fn describe(&self) -> String {
        let restore = match self.target_major {
            Some(target) if self.newer_than_target() => format!(
                "; newer than the target (PostgreSQL {target}): restores through psql, leaving out the settings the target lacks"
            ),
            _ => String::new(),
        };
        format!(
            "pg_dump {} ({}), pg_restore from the same directory{}{restore}",
            self.chosen.version,
            self.path("pg_dump").display(),
            if self.explicit {
                " (PGTIDE_PG_BIN)"
            } else {
                ""
            }
        )
    }
}

/// Why no pair fits: what check prints as the message and the fix, and clone as its error.
#[derive(Debug, thiserror::Error)]
#[error("{message}: {fix}")]
pub struct NoTools {
    pub message: String,
    pub fix: String,
}

/// The fix when no pg_dump fits the source.
pub fn fix(source_major: u32) -> String {
    format!(
        "install the PostgreSQL {source_major} client tools (or newer), or set {PG_BIN_ENV} to their bin directory"
    )
}

/// The choice, over candidates already read: the pair of the target's major if it is at least
/// the source's, else the newest between the source's and the target's major, else the newest
/// at least the source's; among pairs of one major the newest minor, then the first found (the
/// PATH comes first).
pub fn choose(
    candidates: &[Candidate],
    source_major: u32,
    target_major: Option<u32>,
) -> Option<&Candidate> {
    let fitting = || candidates.iter().filter(move |c| c.major >= source_major);
    if let Some(target) = target_major.filter(|t| *t >= source_major) {
        if let Some(c) = newest(fitting().filter(|c| c.major == target)) {
            return Some(c);
        }
        if let Some(c) = newest(fitting().filter(|c| c.major <= target)) {
            return Some(c);
        }
    }
    newest(fitting())
}

/// The newest of the candidates (major, then minor); the first found among equals.
fn newest<'a>(candidates: impl Iterator<Item = &'a Candidate>) -> Option<&'a Candidate> {
    let key = |c: &Candidate| (c.major, minor(&c.version));
    candidates.fold(None, |best, c| match best {
        Some(b) if key(b) >= key(c) => Some(b),
        _ => Some(c),
    })
}

/// The minor version of `18.6` (6); 0 for `18beta1` or `18devel`.
fn minor(version: &str) -> u32 {
    version
        .split_once('.')
        .and_then(|(_, rest)| leading_number(rest))
        .unwrap_or(0)
}

fn leading_number(text: &str) -> Option<u32> {
    let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The version word of `pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)`: `15.18`.
pub fn parse_version(output: &str) -> Option<(String, u32)> {
    output.split_whitespace().find_map(|word| {
        let major = leading_number(word)?;
        Some((word.to_string(), major))
    })
}

/// Finds the pair to run for a source (and target) of these majors; see the module doc.
pub async fn find(source_major: u32, target_major: Option<u32>) -> Result<PgTools, NoTools> {
    if let Some(dir) = std::env::var_os(PG_BIN_ENV).filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        let chosen = read_pair(&dir).await.map_err(|message| NoTools {
            message: format!("{PG_BIN_ENV}={}: {message}", dir.display()),
            fix: fix(source_major),
        })?;
        if chosen.major < source_major {
            return Err(NoTools {
                message: format!(
                    "{PG_BIN_ENV}={} holds pg_dump / pg_restore version {}, older than the source server (PostgreSQL {source_major}), which they cannot dump",
                    dir.display(),
                    chosen.version
                ),
                fix: fix(source_major),
            });
        }
        return Ok(PgTools {
            chosen,
            explicit: true,
            target_major,
        });
    }
    let mut candidates = Vec::new();
    for dir in search_dirs().await {
        match read_pair(&dir).await {
            Ok(c) => candidates.push(c),
            Err(e) => tracing::debug!("not using the client tools in {}: {e}", dir.display()),
        }
    }
    match choose(&candidates, source_major, target_major) {
        Some(c) => Ok(PgTools {
            chosen: c.clone(),
            explicit: false,
            target_major,
        }),
        None => {
            let found: Vec<String> = candidates
                .iter()
                .map(|c| format!("{} in {}", c.version, c.dir.display()))
                .collect();
            Err(NoTools {
                message: format!(
                    "no pg_dump / pg_restore of PostgreSQL {source_major} or newer on the PATH or in the usual install directories (found: {})",
                    if found.is_empty() {
                        "none".to_string()
                    } else {
                        found.join(", ")
                    }
                ),
                fix: fix(source_major),
            })
        }
    }
}

/// The real directories that hold a pg_dump, PATH first, each once. A pg_dump that resolves to
/// a program of another name is a wrapper (Debian's /usr/bin/pg_dump is pg_wrapper, which picks
/// a version by itself): left out, the real binaries are found under their own directory.
async fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for (parent, prefix) in [
        ("/usr/lib/postgresql", ""),
        ("/usr", "pgsql-"),
        ("/opt/homebrew/opt", "postgresql@"),
        ("/usr/local/opt", "postgresql@"),
    ] {
        dirs.extend(
            subdirs(Path::new(parent), prefix)
                .into_iter()
                .map(|d| d.join("bin")),
        );
    }
    dirs.push(PathBuf::from("/usr/local/pgsql/bin"));
    let mut seen = HashSet::new();
    let mut real = Vec::new();
    for dir in dirs {
        let Ok(resolved) = tokio::fs::canonicalize(dir.join("pg_dump")).await else {
            continue;
        };
        if resolved.file_name().is_some_and(|n| n == "pg_dump")
            && let Some(parent) = resolved.parent()
            && seen.insert(parent.to_path_buf())
        {
            real.push(parent.to_path_buf());
        }
    }
    real
}

/// `parent/<prefix>*` directories, sorted (a missing parent has none).
fn subdirs(parent: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// Reads the versions of the pair in `dir`; the error says why it is not usable.
async fn read_pair(dir: &Path) -> Result<Candidate, String> {
    let (dump_version, dump_major) = tool_version(&dir.join("pg_dump")).await?;
    let (_, restore_major) = tool_version(&dir.join("pg_restore")).await?;
    Ok(Candidate {
        dir: dir.to_path_buf(),
        version: dump_version,
        major: dump_major.min(restore_major),
    })
}

/// `tool --version`, bounded in time (a hung program is not a candidate).
async fn tool_version(path: &Path) -> Result<(String, u32), String> {
    let run = Command::new(path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(format!("cannot run {}: {e}", path.display())),
        Err(_) => {
            return Err(format!(
                "{} --version did not answer in 10 s",
                path.display()
            ));
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    parse_version(&text).ok_or_else(|| {
        format!(
            "cannot read the version of {} from \"{}\"",
            path.display(),
            text.trim()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(dir: &str, version: &str) -> Candidate {
        let (version, major) = parse_version(version).unwrap();
        Candidate {
            dir: PathBuf::from(dir),
            version,
            major,
        }
    }

    fn chosen(cands: &[Candidate], source: u32, target: Option<u32>) -> Option<&str> {
        choose(cands, source, target).map(|c| c.dir.to_str().unwrap())
    }

    #[test]
    fn versions_are_read_as_the_tools_print_them() {
        assert_eq!(
            parse_version("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(("15.18".into(), 15))
        );
        assert_eq!(
            parse_version("pg_restore (PostgreSQL) 18beta1"),
            Some(("18beta1".into(), 18))
        );
        assert_eq!(parse_version("pg_dump (PostgreSQL)"), None);
        assert_eq!(minor("18.6"), 6);
        assert_eq!(minor("18beta1"), 0);
    }

    #[test]
    fn the_targets_major_wins_when_it_can_dump_the_source() {
        let cands = [c("/p15", "15.18"), c("/p18", "18.6"), c("/p17", "17.2")];
        assert_eq!(chosen(&cands, 16, Some(17)), Some("/p17"));
        assert_eq!(chosen(&cands, 17, Some(18)), Some("/p18"));
        assert_eq!(chosen(&cands, 15, Some(15)), Some("/p15"));
    }

    #[test]
    fn else_the_newest_at_least_the_sources() {
        let cands = [c("/p15", "15.18"), c("/p18", "18.6"), c("/p17", "17.2")];
        // No pair of the target's major: the newest not newer than the target...
        assert_eq!(chosen(&cands, 13, Some(16)), Some("/p15"));
        assert_eq!(chosen(&cands, 14, Some(16)), Some("/p15"));
        // ... else the newest (its restore goes through restore_script).
        assert_eq!(chosen(&cands, 16, Some(16)), Some("/p18"));
        assert_eq!(chosen(&cands, 12, None), Some("/p18"));
        // A target older than the source does not pull an older pg_dump in.
        assert_eq!(chosen(&cands, 17, Some(15)), Some("/p18"));
        // Nothing new enough.
        assert_eq!(chosen(&[c("/p15", "15.18")], 16, Some(18)), None);
        assert_eq!(chosen(&[], 12, Some(18)), None);
    }

    #[test]
    fn among_one_major_the_newest_minor_then_the_first_found() {
        let cands = [c("/a", "18.1"), c("/b", "18.6"), c("/c", "18.6")];
        assert_eq!(chosen(&cands, 16, Some(18)), Some("/b"));
        assert_eq!(chosen(&cands, 16, None), Some("/b"));
    }

    #[test]
    fn a_pair_is_as_old_as_its_older_tool() {
        let pair = Candidate {
            major: 15,
            ..c("/mixed", "18.6")
        };
        assert_eq!(chosen(&[pair], 16, Some(18)), None);
    }
}
