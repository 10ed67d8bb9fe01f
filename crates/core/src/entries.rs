//! The rules a backup's file list must keep before anything acts on it: every path stays inside
//! the data directory, and nothing is ever written through a link that leads out of it.
//!
//! A manifest or catalog row is data from disk, possibly damaged or written by someone else. A
//! restore run as root writes wherever these paths lead, so `catalog rebuild`, `validate` and
//! `restore` refuse a list that breaks them, naming the backup and the entry.

use std::collections::HashMap;

use anyhow::{bail, Result};
use pgkeep_catalog::{FileKind, FileRecord};

/// Check the file list of backup `label`. Rules:
/// - a path is relative, '/'-separated, without empty, `.` or `..` components, and appears once;
/// - links are allowed anywhere, but only a tablespace link (`pg_tblspc/<oid>`, whose target
///   must be an absolute path without `..`) may have entries under it, and no entry lies under
///   a file.
pub fn check_entries(label: &str, files: &[FileRecord]) -> Result<()> {
    let mut kinds: HashMap<&str, FileKind> = HashMap::with_capacity(files.len());
    for f in files {
        if let Err(why) = check_path(&f.path) {
            bail!(
                "backup {label} lists an unsafe entry {:?}: {why}; the repository metadata was damaged or tampered with, restore another backup",
                f.path
            );
        }
        if kinds.insert(f.path.as_str(), f.kind).is_some() {
            bail!(
                "backup {label} lists entry {:?} twice: the repository metadata was damaged or tampered with, restore another backup",
                f.path
            );
        }
        if f.kind == FileKind::Symlink && tablespace_oid(&f.path).is_some() {
            let target = f.link_target.as_deref().unwrap_or_default();
            if !target.starts_with('/') || target.split('/').any(|c| c == "..") {
                bail!(
                    "backup {label} records tablespace link {} to {target:?}, which is not an absolute path: the repository metadata was damaged or tampered with",
                    f.path
                );
            }
        }
    }
    for f in files {
        let mut at = 0;
        while let Some(i) = f.path[at..].find('/') {
            let ancestor = &f.path[..at + i];
            match kinds.get(ancestor) {
                Some(FileKind::Symlink) if tablespace_oid(ancestor).is_none() => bail!(
                    "backup {label} lists {:?} under the link {ancestor:?}: restoring it would write outside the data directory; the repository metadata was damaged or tampered with",
                    f.path
                ),
                Some(FileKind::File) => bail!(
                    "backup {label} lists {:?} under the file {ancestor:?}: the repository metadata was damaged or tampered with",
                    f.path
                ),
                _ => {}
            }
            at += i + 1;
        }
    }
    Ok(())
}

/// The OID of a tablespace link path `pg_tblspc/<digits>`.
pub fn tablespace_oid(path: &str) -> Option<u32> {
    let oid = path.strip_prefix("pg_tblspc/")?;
    if oid.is_empty() || !oid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    oid.parse().ok()
}

fn check_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("the path is empty");
    }
    if path.starts_with('/') {
        return Err("the path is absolute");
    }
    if path.contains('\0') || path.contains('\n') {
        return Err("the path holds a NUL or newline");
    }
    for c in path.split('/') {
        match c {
            "" => return Err("the path has an empty component"),
            "." | ".." => return Err("the path has a . or .. component"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: FileKind, link: Option<&str>) -> FileRecord {
        FileRecord {
            path: path.into(),
            kind,
            size: 0,
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime: 0,
            link_target: link.map(Into::into),
            crc32c: None,
            sha256: None,
            stored_size: 0,
            stored_in: None,
            n_blocks: None,
            page_delta: false,
            bundle: None,
        }
    }

    fn good() -> Vec<FileRecord> {
        vec![
            entry("base", FileKind::Dir, None),
            entry("base/1", FileKind::Dir, None),
            entry("base/1/1259", FileKind::File, None),
            entry("pg_wal", FileKind::Symlink, Some("../wal")),
            entry("pg_tblspc", FileKind::Dir, None),
            entry("pg_tblspc/16384", FileKind::Symlink, Some("/srv/ts")),
            entry(
                "pg_tblspc/16384/PG_15_202209061/5/16385",
                FileKind::File,
                None,
            ),
            entry("global/pg_control", FileKind::File, None),
        ]
    }

    #[test]
    fn a_backups_own_list_passes() {
        check_entries("L", &good()).unwrap();
    }

    #[test]
    fn escapes_are_refused_naming_backup_and_entry() {
        let cases: Vec<(Vec<FileRecord>, &str)> = vec![
            (
                vec![entry("/etc/passwd", FileKind::File, None)],
                "\"/etc/passwd\"",
            ),
            (
                vec![entry("base/../../etc/passwd", FileKind::File, None)],
                "base/../../etc/passwd",
            ),
            (
                vec![
                    entry("evil", FileKind::Symlink, Some("/etc")),
                    entry("evil/passwd", FileKind::File, None),
                ],
                "under the link \"evil\"",
            ),
            (
                vec![
                    entry("pg_wal", FileKind::Symlink, Some("/etc")),
                    entry("pg_wal/passwd", FileKind::File, None),
                ],
                "under the link \"pg_wal\"",
            ),
            (
                vec![entry("pg_tblspc/1", FileKind::Symlink, Some("rel/dir"))],
                "not an absolute path",
            ),
            (
                vec![
                    entry("global/pg_control", FileKind::Symlink, Some("/etc/passwd")),
                    entry("global/pg_control", FileKind::File, None),
                ],
                "twice",
            ),
            (
                vec![
                    entry("PG_VERSION", FileKind::File, None),
                    entry("PG_VERSION/x", FileKind::File, None),
                ],
                "under the file",
            ),
            (
                vec![entry("base//1", FileKind::File, None)],
                "empty component",
            ),
        ];
        for (files, needle) in cases {
            let err = check_entries("20261130-010000F", &files)
                .unwrap_err()
                .to_string();
            assert!(err.contains("20261130-010000F"), "{err}");
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
