//! Repository key layout, in one place.
//!
//! ```text
//! catalog.db                                         SQLite catalog (local repositories)
//! storage.ini                                        what `init` probed of an object store
//! probe/<pid>                                        the probe's object, deleted after it
//! archive/<sysid>/<timeline+log>/<segment>.lz4       WAL segments, .partial and .backup files
//! archive/<sysid>/<NNNNNNNN>.history.lz4             timeline history files
//! backup/<label>/<name>                              backup.ini, manifest, backup_label, ...
//! backup/<label>/status/<seq>-<STATUS>               each later status change, newest wins
//! backup/<label>/data/<path>.lz4                     cluster files, path relative to PGDATA
//! backup/<label>/bundle/<id>                         small cluster files, their lz4 frames
//!                                                    one after another (the manifest says where)
//! ```
//! WAL is keyed by system identifier (decimal, as `pg_controldata` prints it) so segments of two
//! clusters can never be mixed up, and grouped by their first 16 hex digits so no directory
//! grows past 256 segments of 16 MiB (more only with smaller segments).

/// The SQLite catalog, at the repository root.
pub const CATALOG_FILE: &str = "catalog.db";

/// What `init` found an object store can do (whether it enforces conditional creates).
pub const STORAGE_INFO: &str = "storage.ini";

/// The object `init` writes twice to probe conditional creates, then deletes.
pub fn storage_probe(pid: u32) -> String {
    format!("probe/{pid}")
}

const ARCHIVE: &str = "archive";
const BACKUP: &str = "backup";
/// Everything of the WAL archive lies under this prefix.
pub const ARCHIVE_PREFIX: &str = ARCHIVE;
/// Everything of the backups lies under this prefix.
pub const BACKUP_PREFIX: &str = BACKUP;
const LZ4: &str = ".lz4";
const STATUS: &str = "status";
const PIN: &str = "pin";
/// Segment names start with 24 hex digits, of which the first 16 name the directory.
const SEGMENT_NAME_LEN: usize = 24;
const DIR_NAME_LEN: usize = 16;

/// `archive/<sysid>/<first 16 chars of name>/<name>.lz4` for names of at least 24 chars
/// (segments, `.partial`, `.backup`), `archive/<sysid>/<name>.lz4` for shorter ones (history).
pub fn wal(system_identifier: u64, wal_file_name: &str) -> String {
    match wal_dir(wal_file_name) {
        Some(dir) => format!("{ARCHIVE}/{system_identifier}/{dir}/{wal_file_name}{LZ4}"),
        None => format!("{ARCHIVE}/{system_identifier}/{wal_file_name}{LZ4}"),
    }
}

/// `archive/<sysid>`: every WAL object of one cluster lives under it.
pub fn wal_prefix(system_identifier: u64) -> String {
    format!("{ARCHIVE}/{system_identifier}")
}

/// Inverse of [`wal`] for listing: the WAL file name if `key` is a WAL object key.
pub fn wal_name_from_key(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(ARCHIVE)?.strip_prefix('/')?;
    let (sysid, rest) = rest.split_once('/')?;
    if sysid.is_empty() || !sysid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (dir, file) = match rest.split_once('/') {
        Some((dir, file)) => (Some(dir), file),
        None => (None, rest),
    };
    let name = file.strip_suffix(LZ4)?;
    if name.is_empty() || name.contains('/') || wal_dir(name) != dir {
        return None;
    }
    Some(name)
}

/// `backup/<label>`: everything of one backup.
pub fn backup_prefix(label: &str) -> String {
    format!("{BACKUP}/{label}")
}

/// `backup/<label>/data/<path>.lz4`, `path` relative to PGDATA and '/'-separated.
pub fn backup_file(label: &str, path: &str) -> String {
    format!("{BACKUP}/{label}/data/{path}{LZ4}")
}

/// `backup/<label>/bundle/<id>`: one bundle of small files of backup `label`.
pub fn backup_bundle(label: &str, id: u32) -> String {
    format!("{BACKUP}/{label}/bundle/{id}")
}

/// Inverse of [`backup_file`] for listing: the PGDATA-relative path if `key` is a data file of
/// backup `label`.
pub fn backup_path_from_key<'k>(label: &str, key: &'k str) -> Option<&'k str> {
    let rest = key.strip_prefix(BACKUP)?.strip_prefix('/')?;
    let rest = rest.strip_prefix(label)?.strip_prefix("/data/")?;
    rest.strip_suffix(LZ4).filter(|path| !path.is_empty())
}

/// `backup/<label>/<name>`, e.g. backup.ini, manifest, backup_label, tablespace_map.
pub fn backup_meta(label: &str, name: &str) -> String {
    format!("{BACKUP}/{label}/{name}")
}

/// `backup/<label>/status`: the status changes of a backup since its `backup.ini` was written.
pub fn backup_status_prefix(label: &str) -> String {
    format!("{BACKUP}/{label}/{STATUS}")
}

/// `backup/<label>/status/<seq>-<status>`, `seq` zero-padded so keys sort in order of change.
pub fn backup_status(label: &str, seq: u64, status: &str) -> String {
    format!("{BACKUP}/{label}/{STATUS}/{seq:010}-{status}")
}

/// `backup/<label>/pin`, the pin changes of one backup.
pub fn backup_pin_prefix(label: &str) -> String {
    format!("{BACKUP}/{label}/{PIN}")
}

/// `backup/<label>/pin/<seq>`: one pin change (its content: `forever`, the time it ends, or
/// `none`), `seq` zero-padded so keys sort in order of change.
pub fn backup_pin(label: &str, seq: u64) -> String {
    format!("{BACKUP}/{label}/{PIN}/{seq:010}")
}

/// Inverse of [`backup_pin`]: the label and sequence number of a pin key.
pub fn backup_pin_from_key(key: &str) -> Option<(&str, u64)> {
    let rest = key.strip_prefix(BACKUP)?.strip_prefix('/')?;
    let (label, rest) = rest.split_once('/')?;
    let seq = rest.strip_prefix(PIN)?.strip_prefix('/')?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((label, seq.parse().ok()?))
}

/// Inverse of [`backup_status`]: the label, sequence number and status of a status key.
pub fn backup_status_from_key(key: &str) -> Option<(&str, u64, &str)> {
    let rest = key.strip_prefix(BACKUP)?.strip_prefix('/')?;
    let (label, rest) = rest.split_once('/')?;
    let name = rest.strip_prefix(STATUS)?.strip_prefix('/')?;
    let (seq, status) = name.split_once('-')?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) || status.is_empty() {
        return None;
    }
    Some((label, seq.parse().ok()?, status))
}

/// The directory a WAL file goes in, `None` for files kept flat (history files). `get` rather
/// than slicing, so a malformed non-ASCII name cannot panic.
fn wal_dir(wal_file_name: &str) -> Option<&str> {
    if wal_file_name.len() < SEGMENT_NAME_LEN {
        return None;
    }
    wal_file_name.get(..DIR_NAME_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_keys_round_trip() {
        let sysid = 7_302_014_532_123_456_789;
        for (name, key) in [
            (
                "000000010000000A000000FE",
                "archive/7302014532123456789/000000010000000A/000000010000000A000000FE.lz4",
            ),
            (
                "000000010000000A000000FE.partial",
                "archive/7302014532123456789/000000010000000A/000000010000000A000000FE.partial.lz4",
            ),
            (
                "000000010000000000000002.00000028.backup",
                "archive/7302014532123456789/0000000100000000/000000010000000000000002.00000028.backup.lz4",
            ),
            ("00000002.history", "archive/7302014532123456789/00000002.history.lz4"),
        ] {
            assert_eq!(wal(sysid, name), key);
            assert_eq!(wal_name_from_key(key), Some(name));
        }
        assert_eq!(wal_prefix(sysid), "archive/7302014532123456789");
    }

    #[test]
    fn other_keys_are_not_wal() {
        for key in [
            "archive/1/000000010000000A000000FE.lz4",
            "archive/1/0000000100000009/000000010000000A000000FE.lz4",
            "archive/1/0000000100000000/00000002.history.lz4",
            "archive/1/00000002.history",
            "archive/x/00000002.history.lz4",
            "archive//00000002.history.lz4",
            "archive/1/.lz4",
            "backup/L/data/base/1/2.lz4",
            "catalog.db",
        ] {
            assert_eq!(wal_name_from_key(key), None, "{key}");
        }
        // Multi-byte characters where the directory would be cut must not panic.
        let odd = "aéééééééééééé";
        assert_eq!(wal(1, odd), format!("archive/1/{odd}.lz4"));
        assert_eq!(wal_name_from_key(&wal(1, odd)), Some(odd));
    }

    #[test]
    fn backup_keys() {
        assert_eq!(backup_prefix("20261121-101500F"), "backup/20261121-101500F");
        assert_eq!(
            backup_bundle("20261121-101500F", 7),
            "backup/20261121-101500F/bundle/7"
        );
        let key = backup_file("20261121-101500F", "base/5/16384.1");
        assert_eq!(key, "backup/20261121-101500F/data/base/5/16384.1.lz4");
        assert_eq!(
            backup_path_from_key("20261121-101500F", &key),
            Some("base/5/16384.1")
        );
        assert_eq!(backup_path_from_key("20261121-1015", &key), None);
        assert_eq!(
            backup_meta("20261121-101500F", "backup_label"),
            "backup/20261121-101500F/backup_label"
        );
        assert_eq!(CATALOG_FILE, "catalog.db");
    }

    #[test]
    fn status_keys_round_trip_and_sort_in_order() {
        let k9 = backup_status("20261121-101500F", 9, "OK");
        let k10 = backup_status("20261121-101500F", 10, "CORRUPT");
        assert_eq!(k9, "backup/20261121-101500F/status/0000000009-OK");
        assert!(k9 < k10);
        assert_eq!(
            backup_status_from_key(&k10),
            Some(("20261121-101500F", 10, "CORRUPT"))
        );
        assert_eq!(backup_status_prefix("L"), "backup/L/status");
        assert_eq!(backup_pin("L", 3), "backup/L/pin/0000000003");
        assert_eq!(
            backup_pin_from_key("backup/L/pin/0000000003"),
            Some(("L", 3))
        );
        assert_eq!(backup_pin_from_key("backup/L/pin/x"), None);
        for other in [
            "backup/L/backup.ini",
            "backup/L/status/x-OK",
            "backup/L/status/1-",
        ] {
            assert_eq!(backup_status_from_key(other), None, "{other}");
        }
    }
}
