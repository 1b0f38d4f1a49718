//! The checks of the machine pgtide runs on: the client tools it needs and the free disk for
//! the work dir.

use std::path::{Path, PathBuf};

use super::{CheckId, CheckOptions, Report};
use crate::clone::tools;

/// The checks of this machine: pg_dump / pg_restore of the right version, room for the spool.
pub(super) async fn local_checks(
    r: &mut Report,
    source_major: u32,
    target_major: Option<u32>,
    source_size: Option<i64>,
    opts: &CheckOptions,
) {
    match tools::find(source_major, target_major).await {
        Ok(tools) => r.ok(CheckId::LocalPgDump, tools.describe()),
        Err(e) => r.fail(CheckId::LocalPgDump, e.message, e.fix),
    }
    match free_disk(&opts.dir) {
        Some(free) => {
            let need = source_size.unwrap_or(0).max(0) as u64;
            let text = format!(
                "{} free for the work dir {}; the source database is {}",
                crate::units::human_bytes(free),
                opts.dir.display(),
                crate::units::human_bytes(need)
            );
            if !opts.online || free >= need {
                r.ok(CheckId::LocalDisk, text);
            } else {
                r.warn(
                    CheckId::LocalDisk,
                    text,
                    "the spool holds the changes made during the copy until they are applied: give --dir a disk with room for them",
                );
            }
        }
        None => r.warn(
            CheckId::LocalDisk,
            format!("cannot tell the free space for {}", opts.dir.display()),
            "check that --dir is on a disk with room for the spool",
        ),
    }
}

/// Free bytes on the file system that holds `dir` (or its nearest existing parent).
pub(crate) fn free_disk(dir: &Path) -> Option<u64> {
    let mut path = dir.to_path_buf();
    while !path.exists() {
        path = path.parent()?.to_path_buf();
        if path.as_os_str().is_empty() {
            path = PathBuf::from(".");
        }
    }
    let c_path = std::ffi::CString::new(path.to_str()?).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stat a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}
