//! One backup at a time per repository: an advisory lock on a local file (inside a local
//! repository, beside the catalog of an S3 one).

use crate::config::RepoConfig;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use anyhow::{bail, Context, Result};

/// Held for the life of a backup; the kernel releases it when the process dies, so a killed
/// backup never blocks the next one.
pub struct BackupLock {
    _file: File,
}

impl BackupLock {
    /// Take the lock or fail naming the backup that holds it.
    pub fn acquire(repo: &RepoConfig, holder: &str) -> Result<BackupLock> {
        let path = repo.lock_file();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let mut who = String::new();
            let _ = file.read_to_string(&mut who);
            bail!(
                "another backup is running in {}: {}; wait for it to finish",
                repo.describe(),
                who.trim()
            );
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{holder}")?;
        Ok(BackupLock { _file: file })
    }
}
