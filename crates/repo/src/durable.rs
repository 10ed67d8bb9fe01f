//! Making many writes durable with their errors reported: [`FsSync`], a directory descriptor
//! opened before the writes for a later `syncfs(2)`, and [`syncfs_reports_errors`], whether the
//! running kernel's syncfs can report anything at all.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A directory's descriptor, opened before the writes that a later [`FsSync::syncfs`] is to
/// make durable.
///
/// Since Linux 5.8 `syncfs(2)` fails when writeback on the filesystem failed, but only for
/// failures after the descriptor it is given was opened: the kernel samples the filesystem's
/// error counter (`s_wb_err`, an errseq) at open. pgkeep starts writeback of each file as it
/// writes it, long before the final sync, so a descriptor opened just before the syncfs would
/// miss an error hit in between and call lost data durable. Open this first, sync through it
/// later; each error is reported once per descriptor. On older kernels syncfs reports nothing
/// ([`syncfs_reports_errors`]): fsync each file instead.
#[derive(Debug)]
pub struct FsSync {
    dir: File,
    path: PathBuf,
}

impl FsSync {
    /// Opens `dir` now; errors of writeback after this point reach [`FsSync::syncfs`].
    pub fn open(dir: &Path) -> io::Result<FsSync> {
        Ok(FsSync {
            dir: File::open(dir)?,
            path: dir.to_owned(),
        })
    }

    /// The directory as it was named when opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `syncfs(2)` of the filesystem holding the directory: everything written to it is on disk
    /// when this returns Ok, and, where [`syncfs_reports_errors`], an error is returned if any
    /// writeback on it failed since [`FsSync::open`].
    pub fn syncfs(&self) -> io::Result<()> {
        // SAFETY: a plain system call on a descriptor `self` keeps open.
        if unsafe { libc::syncfs(self.dir.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Whether `syncfs(2)` reports writeback errors on the running kernel: Linux 5.8 and later.
/// Before that it returns 0 whatever happened, and only an fsync of each file tells.
pub fn syncfs_reports_errors() -> bool {
    static REPORTS: OnceLock<bool> = OnceLock::new();
    *REPORTS.get_or_init(|| kernel_release().is_some_and(|r| release_at_least(&r, 5, 8)))
}

/// `uname -r`, or `None` when uname fails.
fn kernel_release() -> Option<String> {
    // SAFETY: utsname is plain bytes, valid zeroed; uname fills it or fails.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8(bytes).ok()
}

/// Whether a release such as "6.1.0-18-amd64" is `major.minor` or later; a release that does not
/// start with two numbers is taken for older, so the careful path is chosen.
fn release_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_compare_by_major_then_minor() {
        for (release, new_enough) in [
            ("5.8.0", true),
            ("5.7.19", false),
            ("5.10.0-28-amd64", true),
            ("6.18.44-fc-v857", true),
            ("4.19.0", false),
            ("3.10.0-1160.el7.x86_64", false),
            ("", false),
            ("linux", false),
        ] {
            assert_eq!(release_at_least(release, 5, 8), new_enough, "{release}");
        }
    }

    #[test]
    fn the_descriptor_outlives_the_name_it_was_opened_by() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let sync = FsSync::open(&root).unwrap();
        std::fs::rename(&root, dir.path().join("moved")).unwrap();
        // The same filesystem is reached through the descriptor, not the path.
        sync.syncfs().unwrap();
        assert!(FsSync::open(&root).is_err());
    }
}
