//! The work dir: where state.db, the schema dump and the lock file live. Holding the lock for
//! the whole run is what refuses a second pgtide on the same directory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::spool::SpoolWriter;
use crate::state::StateDb;

/// The default work dir when neither --dir nor PGTIDE_DIR is given (documented in README).
pub const DEFAULT_DIR: &str = "./pgtide-work";

/// An open, locked work dir. The lock is released when this value is dropped (or the process
/// dies: it is an OS file lock, never a stale pid file).
pub struct WorkDir {
    pub path: PathBuf,
    pub state: StateDb,
    _lock: File,
}

impl WorkDir {
    /// Creates the directory if needed, takes the lock, opens state.db.
    pub fn open(path: &Path, command: &str) -> Result<Self> {
        std::fs::create_dir_all(path).with_context(|| {
            format!(
                "cannot create the work dir {}: choose another with --dir or PGTIDE_DIR",
                path.display()
            )
        })?;
        let lock_path = path.join("pgtide.lock");
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .with_context(|| format!("cannot open the lock file {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                let holder = holder.trim();
                bail!(
                    "another pgtide is already using the work dir {} ({}). Wait for it to finish or stop it, or give this run another --dir.",
                    path.display(),
                    if holder.is_empty() {
                        "lock held".to_string()
                    } else {
                        holder.to_string()
                    }
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()));
            }
        }
        lock.set_len(0)?;
        lock.seek(SeekFrom::Start(0))?;
        writeln!(
            lock,
            "pid {} running `pgtide {command}`",
            std::process::id()
        )?;
        lock.flush()?;
        let state = StateDb::open(&path.join("state.db"))?;
        Ok(WorkDir {
            path: path.to_path_buf(),
            state,
            _lock: lock,
        })
    }

    /// Opens the spool for appending, recording its size in state.db (status shows it).
    pub fn spool_writer(&self) -> Result<SpoolWriter> {
        let state = self.state.clone();
        SpoolWriter::open(
            &self.path,
            Box::new(move |bytes| {
                let _ = state.record_spool_bytes(bytes);
            }),
        )
    }
}
