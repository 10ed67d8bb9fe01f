//! Which files of a data directory a backup skips, and how to recognise
//! relation data files (to find unlogged and temporary relations).
//!
//! Paths are relative to the data directory and use '/' separators;
//! tablespace files look like `pg_tblspc/16390/PG_15_202209061/5/16391`.

use std::collections::BTreeSet;

use crate::bytes::canonical_u32;

/// What a backup does with one entry of the data directory.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Disposition {
    /// Leave it out, and everything below it.
    Skip,
    /// Keep the directory itself (its permissions matter) but none of its contents.
    KeepDirOnly,
    /// Back it up (and, for a directory, look at its entries one by one).
    Keep,
}

/// Directories at the data directory's root whose contents PostgreSQL removes
/// or rebuilds at start (`excludeDirContents`, src/backend/backup/basebackup.c).
const EXCLUDE_DIR_CONTENTS: [&str; 7] = [
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
];

/// Files at the root that must not come back on restore: server state, and
/// the files a backup or restore writes itself (`excludeFiles` in
/// basebackup.c, plus the recovery signal files that pgkeep's restore writes).
const EXCLUDE_ROOT_FILES: [&str; 7] = [
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "postmaster.pid",
    "postmaster.opts",
    "recovery.signal",
    "standby.signal",
];

/// Temporary files PostgreSQL may leave anywhere (`excludeFiles`, and
/// `pg_internal.init*`, relcache init files rebuilt at start, by prefix).
const EXCLUDE_FILES_ANYWHERE: [&str; 2] = ["postgresql.auto.conf.tmp", "current_logfiles.tmp"];
const RELCACHE_INIT_PREFIX: &str = "pg_internal.init";

/// `PG_TEMP_FILE_PREFIX` / `PG_TEMP_FILES_DIR`: sort and hash spill files and their directories.
const TEMP_FILE_PREFIX: &str = "pgsql_tmp";

/// Directories kept empty under `pg_wal`: `archive_status` (all versions)
/// and `summaries` (PG 17 WAL summaries), as basebackup.c sends them.
const WAL_DIRS_KEPT_EMPTY: [&str; 2] = ["archive_status", "summaries"];

/// What a backup does with `rel_path` (see the module doc for the form).
///
/// The answer for an entry does not depend on whether the caller stopped
/// descending at an ancestor: everything below a skipped or kept-empty
/// directory is [`Disposition::Skip`]. `pg_wal` itself is `Keep` so a walker
/// reaches `pg_wal/archive_status`, which is `KeepDirOnly`; every segment is
/// `Skip`, as WAL comes from the archive.
///
/// Unlogged relations are not decided here, since that needs the sibling
/// files: see [`unlogged_relfilenodes`] and [`is_unlogged_skip`].
pub fn classify(rel_path: &str, is_dir: bool) -> Disposition {
    let parts: Vec<&str> = rel_path.split('/').filter(|p| !p.is_empty()).collect();
    let Some((&name, parents)) = parts.split_last() else {
        return Disposition::Keep;
    };

    // basebackup.c skips these by name at any depth, files and directories alike.
    if parts.iter().any(|p| p.starts_with(TEMP_FILE_PREFIX)) {
        return Disposition::Skip;
    }

    // Only the root's directories are special; a directory of the same name
    // inside a tablespace would be user data.
    match parts.as_slice() {
        [dir] if EXCLUDE_DIR_CONTENTS.contains(dir) => {
            return if is_dir {
                Disposition::KeepDirOnly
            } else {
                Disposition::Keep
            };
        }
        [dir, ..] if EXCLUDE_DIR_CONTENTS.contains(dir) => return Disposition::Skip,
        ["pg_wal"] => return Disposition::Keep,
        ["pg_wal", sub] if is_dir && WAL_DIRS_KEPT_EMPTY.contains(sub) => {
            return Disposition::KeepDirOnly
        }
        ["pg_wal", ..] => return Disposition::Skip,
        [file] if EXCLUDE_ROOT_FILES.contains(file) => return Disposition::Skip,
        _ => {}
    }

    if EXCLUDE_FILES_ANYWHERE.contains(&name) || name.starts_with(RELCACHE_INIT_PREFIX) {
        return Disposition::Skip;
    }
    // Temporary relations belong to sessions that end at restart
    // (basebackup.c checks only inside database directories).
    if !is_dir && is_database_dir(parents) && is_temp_relation_name(name) {
        return Disposition::Skip;
    }
    Disposition::Keep
}

/// A relation fork (`ForkNumber`, src/include/common/relpath.h).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Fork {
    /// The relation's data: `16384`.
    Main,
    /// Free space map: `16384_fsm`.
    Fsm,
    /// Visibility map: `16384_vm`.
    Vm,
    /// Initialization fork of an unlogged relation: `16384_init`.
    Init,
}

impl Fork {
    /// The file name suffix, `""` for the main fork.
    pub fn suffix(self) -> &'static str {
        match self {
            Fork::Main => "",
            Fork::Fsm => "_fsm",
            Fork::Vm => "_vm",
            Fork::Init => "_init",
        }
    }

    /// The fork named by a suffix without its underscore (`forkname_chars`,
    /// src/common/relpath.c, which does not accept "main").
    fn from_name(name: &str) -> Option<Fork> {
        match name {
            "fsm" => Some(Fork::Fsm),
            "vm" => Some(Fork::Vm),
            "init" => Some(Fork::Init),
            _ => None,
        }
    }
}

/// A relation data file name, parsed: `<relfilenode>[_fork][.<segno>]`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct RelFile {
    pub relfilenode: u32,
    pub fork: Fork,
    /// Which 1 GiB (by default) segment file: 0 for the file without a `.N` suffix.
    pub segno: u32,
}

impl RelFile {
    /// The file name, the inverse of [`parse_relation_file_name`].
    pub fn file_name(&self) -> String {
        if self.segno == 0 {
            format!("{}{}", self.relfilenode, self.fork.suffix())
        } else {
            format!("{}{}.{}", self.relfilenode, self.fork.suffix(), self.segno)
        }
    }
}

/// `Some` when `rel_path` is a relation data file: `base/<dboid>/<file>`,
/// `global/<file>` or `pg_tblspc/<oid>/<versiondir>/<dboid>/<file>`, with
/// `<file>` = `<digits>[_fsm|_vm|_init][.<digits>]`. Returns the database
/// directory (e.g. `base/5`, `global`) and the parsed name.
///
/// Numbers must be written as PostgreSQL writes them (no leading zeros, no
/// `.0` suffix); anything else is not a relation file and is copied whole.
pub fn parse_relation_path(rel_path: &str) -> Option<(String, RelFile)> {
    let parts: Vec<&str> = rel_path.split('/').collect();
    let (&file, parents) = parts.split_last()?;
    if !(is_database_dir(parents) || parents == ["global"]) {
        return None;
    }
    let rel = parse_relation_file_name(file)?;
    Some((parents.join("/"), rel))
}

/// Parses a relation file name such as `16384`, `16384_vm` or `16384.2`
/// (the shape `parse_filename_for_nontemp_relation` accepts, src/common/relpath.c,
/// limited to the canonical spelling).
pub fn parse_relation_file_name(name: &str) -> Option<RelFile> {
    let (stem, segno) = match name.split_once('.') {
        Some((stem, segno)) => (stem, Some(canonical_u32(segno)?)),
        None => (name, None),
    };
    // A written ".0" would be a second name for segment 0.
    if segno == Some(0) {
        return None;
    }
    let (node, fork) = match stem.split_once('_') {
        Some((node, fork)) => (node, Fork::from_name(fork)?),
        None => (stem, Fork::Main),
    };
    let relfilenode = canonical_u32(node)?;
    if relfilenode == 0 {
        return None;
    }
    Some(RelFile {
        relfilenode,
        fork,
        segno: segno.unwrap_or(0),
    })
}

/// Whether `file_name` is a temporary relation's file:
/// `t<digits>_<digits>[_fsm|_vm|_init][.<digits>]`.
///
/// Port of `looks_like_temp_rel_name`, src/backend/storage/file/fd.c.
pub fn is_temp_relation_name(file_name: &str) -> bool {
    let Some(rest) = file_name.strip_prefix('t') else {
        return false;
    };
    let Some(rest) = strip_digits(rest) else {
        return false;
    };
    let Some(rest) = rest.strip_prefix('_') else {
        return false;
    };
    let Some(mut rest) = strip_digits(rest) else {
        return false;
    };
    if let Some(after) = rest.strip_prefix('_') {
        let fork_len = after.find('.').unwrap_or(after.len());
        let (fork, tail) = after.split_at(fork_len);
        if Fork::from_name(fork).is_none() {
            return false;
        }
        rest = tail;
    }
    if let Some(after) = rest.strip_prefix('.') {
        let Some(tail) = strip_digits(after) else {
            return false;
        };
        rest = tail;
    }
    rest.is_empty()
}

/// Relfilenodes that have an `_init` fork among `file_names`, the entries of
/// one database directory: those relations are unlogged.
pub fn unlogged_relfilenodes<'a, I>(file_names: I) -> BTreeSet<u32>
where
    I: IntoIterator<Item = &'a str>,
{
    file_names
        .into_iter()
        .filter_map(parse_relation_file_name)
        .filter(|rel| rel.fork == Fork::Init)
        .map(|rel| rel.relfilenode)
        .collect()
}

/// Whether a backup skips `file` because its relation is unlogged: every
/// fork but `_init` is left out, and restore rebuilds the main fork from the
/// init fork (as basebackup.c and `ResetUnloggedRelations` do). `unlogged`
/// comes from [`unlogged_relfilenodes`] for the file's database directory.
pub fn is_unlogged_skip(file: &RelFile, unlogged: &BTreeSet<u32>) -> bool {
    file.fork != Fork::Init && unlogged.contains(&file.relfilenode)
}

/// `base/<oid>` or `pg_tblspc/<oid>/<version dir>/<oid>`.
fn is_database_dir(parts: &[&str]) -> bool {
    let oid = |s: &str| canonical_u32(s).is_some();
    match parts {
        ["base", db] => oid(db),
        ["pg_tblspc", spc, version, db] => oid(spc) && version.starts_with("PG_") && oid(db),
        _ => false,
    }
}

/// `s` without its leading ASCII digits, or `None` when it has none.
fn strip_digits(s: &str) -> Option<&str> {
    let rest = s.trim_start_matches(|c: char| c.is_ascii_digit());
    (rest.len() < s.len()).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Disposition::{Keep, KeepDirOnly, Skip};

    #[test]
    fn classify_follows_basebackup() {
        let cases = [
            ("", true, Keep),
            ("base", true, Keep),
            ("base/5", true, Keep),
            ("base/5/16384", false, Keep),
            ("base/5/16384_init", false, Keep),
            ("global/pg_control", false, Keep),
            ("PG_VERSION", false, Keep),
            ("postgresql.auto.conf", false, Keep),
            ("pg_wal", true, Keep),
            ("pg_wal/", true, Keep),
            ("pg_wal/000000010000000000000001", false, Skip),
            ("pg_wal/00000002.history", false, Skip),
            ("pg_wal/archive_status", true, KeepDirOnly),
            (
                "pg_wal/archive_status/000000010000000000000001.ready",
                false,
                Skip,
            ),
            ("pg_wal/summaries", true, KeepDirOnly),
            ("pg_wal/summaries/x.summary", false, Skip),
            ("pg_wal/archive_status", false, Skip),
            ("pg_stat_tmp", true, KeepDirOnly),
            ("pg_stat_tmp/pgss_query_texts.stat", false, Skip),
            ("pg_replslot", true, KeepDirOnly),
            ("pg_replslot/slot1", true, Skip),
            ("pg_replslot/slot1/state", false, Skip),
            ("pg_dynshmem", true, KeepDirOnly),
            ("pg_notify/0000", false, Skip),
            ("pg_serial", true, KeepDirOnly),
            ("pg_snapshots/00000003-0000001B-1", false, Skip),
            ("pg_subtrans/0000", false, Skip),
            ("pg_xact/0000", false, Keep),
            ("pg_tblspc/16390/PG_15_202209061/pg_notify", true, Keep),
            ("postgresql.auto.conf.tmp", false, Skip),
            ("current_logfiles.tmp", false, Skip),
            ("current_logfiles", false, Keep),
            ("global/pg_internal.init", false, Skip),
            ("base/5/pg_internal.init", false, Skip),
            ("base/5/pg_internal.init.12345", false, Skip),
            ("backup_label", false, Skip),
            ("backup_label.old", false, Keep),
            ("tablespace_map", false, Skip),
            ("backup_manifest", false, Skip),
            ("postmaster.pid", false, Skip),
            ("postmaster.opts", false, Skip),
            ("recovery.signal", false, Skip),
            ("standby.signal", false, Skip),
            ("base/5/backup_label", false, Keep),
            ("base/pgsql_tmp", true, Skip),
            ("base/pgsql_tmp/pgsql_tmp1234.0", false, Skip),
            ("pg_tblspc/16390/PG_15_202209061/pgsql_tmp", true, Skip),
            ("pg_tblspc/16390/PG_15_202209061/pgsql_tmp/x", false, Skip),
            ("base/5/t3_16384", false, Skip),
            ("base/5/t3_16384_fsm.1", false, Skip),
            (
                "pg_tblspc/16390/PG_15_202209061/5/t12_16391_vm",
                false,
                Skip,
            ),
            ("global/t3_16384", false, Keep),
            ("t3_16384", false, Keep),
            ("base/5/t3_16384", true, Keep),
            ("base/5/t3_16384_main", false, Keep),
        ];
        for (path, is_dir, want) in cases {
            assert_eq!(classify(path, is_dir), want, "{path} (dir: {is_dir})");
        }
    }

    #[test]
    fn temp_relation_names() {
        for yes in [
            "t3_16384",
            "t3_16384_fsm",
            "t3_16384_vm",
            "t3_16384_init",
            "t3_16384.1",
            "t3_16384_vm.12",
            "t03_016384",
        ] {
            assert!(is_temp_relation_name(yes), "{yes}");
        }
        for no in [
            "",
            "t",
            "t3",
            "t3_",
            "t_16384",
            "3_16384",
            "t3_16384_",
            "t3_16384_main",
            "t3_16384_fsmx",
            "t3_16384.",
            "t3_16384.1a",
            "t3_16384..1",
            "16384",
            "T3_16384",
            "t3_16384_fsm_vm",
            "t٣_16384",
        ] {
            assert!(!is_temp_relation_name(no), "{no}");
        }
    }

    #[test]
    fn relation_paths() {
        let rel = |relfilenode, fork, segno| RelFile {
            relfilenode,
            fork,
            segno,
        };
        assert_eq!(
            parse_relation_path("base/5/16384"),
            Some(("base/5".to_owned(), rel(16384, Fork::Main, 0)))
        );
        assert_eq!(
            parse_relation_path("base/5/16384_fsm.3"),
            Some(("base/5".to_owned(), rel(16384, Fork::Fsm, 3)))
        );
        assert_eq!(
            parse_relation_path("global/1260"),
            Some(("global".to_owned(), rel(1260, Fork::Main, 0)))
        );
        assert_eq!(
            parse_relation_path("pg_tblspc/16390/PG_15_202209061/5/16391_init"),
            Some((
                "pg_tblspc/16390/PG_15_202209061/5".to_owned(),
                rel(16391, Fork::Init, 0)
            ))
        );
        for no in [
            "",
            "16384",
            "base/16384",
            "base/5/16384/1",
            "base/x/16384",
            "base/05/16384",
            "base/5/PG_VERSION",
            "base/5/pg_filenode.map",
            "base/5/t3_16384",
            "base/5/016384",
            "base/5/0",
            "base/5/16384.0",
            "base/5/16384.01",
            "base/5/16384_main",
            "base/5/16384_vm_fsm",
            "base/5/16384.1.1",
            "base/5/99999999999",
            "global/pg_control",
            "global/5/16384",
            "pg_tblspc/16390/5/16391",
            "pg_tblspc/16390/15_2022/5/16391",
            "pg_tblspc/x/PG_15_202209061/5/16391",
            "pg_wal/16384",
        ] {
            assert_eq!(parse_relation_path(no), None, "{no}");
        }
    }

    #[test]
    fn file_name_round_trips() {
        for name in [
            "16384",
            "16384_fsm",
            "16384_vm.2",
            "1_init",
            "4294967295.4294967295",
        ] {
            let rel = parse_relation_file_name(name).unwrap();
            assert_eq!(rel.file_name(), name);
        }
    }

    #[test]
    fn unlogged_relations_skip_all_forks_but_init() {
        let names = [
            "16384",
            "16384_fsm",
            "16384_vm",
            "16384_init",
            "16385",
            "16385.1",
            "PG_VERSION",
        ];
        let unlogged = unlogged_relfilenodes(names);
        assert_eq!(unlogged, BTreeSet::from([16384]));
        let skip = |name| is_unlogged_skip(&parse_relation_file_name(name).unwrap(), &unlogged);
        assert!(skip("16384"));
        assert!(skip("16384_fsm"));
        assert!(skip("16384_vm"));
        assert!(skip("16384.1"));
        assert!(!skip("16384_init"));
        assert!(!skip("16385"));
        assert!(!skip("16385.1"));
    }
}
