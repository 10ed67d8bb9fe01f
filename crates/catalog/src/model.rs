//! The records the catalog keeps: repository identity, backups, their files and archived WAL.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use crate::{CatalogError, Lsn};

/// The cluster a repository serves; fixed when the repository is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoIdentity {
    /// `pg_control`'s database system identifier.
    pub system_identifier: u64,
    /// PostgreSQL major version, e.g. 16.
    pub pg_major: u32,
    /// Page size in bytes (`block_size`).
    pub block_size: u32,
    /// WAL segment size in bytes (`wal_segment_size`).
    pub wal_segment_size: u32,
    /// Pages per relation segment file (`RELSEG_SIZE`).
    pub blocks_per_segment: u32,
}

/// Kind of backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackupType {
    /// Every file, whole.
    Full,
    /// Pages changed since the last full backup.
    Diff,
    /// Pages changed since the previous backup of any type.
    Incr,
}

/// Where a backup is in its life, as in pg_rman.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackupStatus {
    /// Being taken.
    Running,
    /// Finished, not yet validated.
    Done,
    /// Validated.
    Ok,
    /// Failed while being taken.
    Error,
    /// Validation found damage.
    Corrupt,
    /// Being deleted.
    Deleting,
}

/// How long a pinned backup is kept whatever the retention policy says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    /// Until `pgkeep unpin`.
    Forever,
    /// Until this time has passed; from then on the policy alone decides.
    Until(DateTime<Utc>),
}

impl Pin {
    /// Whether the pin still holds at `now`.
    pub fn holds_at(self, now: DateTime<Utc>) -> bool {
        match self {
            Pin::Forever => true,
            Pin::Until(t) => now < t,
        }
    }
}

/// Kind of file-system entry in a backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link (tablespaces under `pg_tblspc`).
    Symlink,
}

/// Kind of file in the WAL archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalKind {
    /// A complete WAL segment.
    Segment,
    /// A `*.partial` segment left at a timeline switch.
    Partial,
    /// A `*.backup` history file written by the backup stop call.
    Backup,
    /// A `NNNNNNNN.history` timeline history file.
    History,
}

macro_rules! text_enum {
    ($ty:ident, $what:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The text form used in the catalog and the metadata files.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = CatalogError;

            fn from_str(s: &str) -> Result<Self, CatalogError> {
                match s {
                    $($text => Ok($ty::$variant),)+
                    _ => Err(CatalogError::InvalidValue {
                        what: $what,
                        value: s.to_string(),
                        expected: Self::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", "),
                    }),
                }
            }
        }
    };
}

text_enum!(BackupType, "backup type", { Full => "full", Diff => "diff", Incr => "incr" });
text_enum!(BackupStatus, "backup status", {
    Running => "RUNNING",
    Done => "DONE",
    Ok => "OK",
    Error => "ERROR",
    Corrupt => "CORRUPT",
    Deleting => "DELETING",
});
text_enum!(FileKind, "file kind", { File => "file", Dir => "dir", Symlink => "symlink" });
text_enum!(WalKind, "wal file kind", {
    Segment => "segment",
    Partial => "partial",
    Backup => "backup",
    History => "history",
});

impl BackupType {
    /// Last character of a backup label of this type: `F`, `D` or `I`.
    pub fn label_suffix(self) -> char {
        match self {
            BackupType::Full => 'F',
            BackupType::Diff => 'D',
            BackupType::Incr => 'I',
        }
    }
}

impl BackupStatus {
    /// Whether a backup in this status may move to `next`. This is the one place transitions are
    /// decided: RUNNING->DONE, RUNNING->ERROR, DONE->OK, DONE->CORRUPT, OK->CORRUPT,
    /// CORRUPT->OK (re-validation), OK->OK, and any status to DELETING; everything else is refused.
    pub fn can_become(self, next: BackupStatus) -> bool {
        use BackupStatus as S;
        matches!(
            (self, next),
            (_, S::Deleting)
                | (S::Running, S::Done)
                | (S::Running, S::Error)
                | (S::Done, S::Ok)
                | (S::Done, S::Corrupt)
                | (S::Ok, S::Corrupt)
                | (S::Corrupt, S::Ok)
                | (S::Ok, S::Ok)
        )
    }

    /// Whether restore may use a backup in this status (DONE or OK).
    pub fn is_restorable(self) -> bool {
        matches!(self, BackupStatus::Done | BackupStatus::Ok)
    }
}

/// One backup. Times are kept to the microsecond, PostgreSQL's precision; finer parts are dropped
/// when the record is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupRecord {
    /// Unique label, e.g. `20261121-101500F`.
    pub label: String,
    /// Full, differential or incremental.
    pub backup_type: BackupType,
    /// Where the backup is in its life.
    pub status: BackupStatus,
    /// Label of the backup this one builds on (None for a full backup).
    pub parent: Option<String>,
    /// Timeline the backup started on (`START TIMELINE` of the backup label).
    pub timeline: u32,
    /// LSN returned by the start call.
    pub start_lsn: Lsn,
    /// LSN returned by the stop call.
    pub stop_lsn: Option<Lsn>,
    /// WAL segment holding `start_lsn`.
    pub start_wal: String,
    /// WAL segment holding `stop_lsn`.
    pub stop_wal: Option<String>,
    /// When the backup started.
    pub start_time: DateTime<Utc>,
    /// When the backup finished.
    pub end_time: Option<DateTime<Utc>>,
    /// Earliest valid point-in-time recovery target: the server's clock right after the stop call.
    pub recovery_time: Option<DateTime<Utc>>,
    /// Bytes of cluster files the backup represents.
    pub data_bytes: u64,
    /// Bytes this backup added to the repository.
    pub stored_bytes: u64,
    /// Number of files in the backup.
    pub files: u64,
    /// `server_version_num` of the cluster.
    pub pg_version_num: u32,
    /// `pg_control`'s database system identifier.
    pub system_identifier: u64,
    /// Page size in bytes.
    pub block_size: u32,
    /// Whether the cluster has data checksums on.
    pub data_checksums: bool,
    /// Process id of the pgkeep that took the backup.
    pub pid: u32,
    /// Host the backup was taken on.
    pub hostname: String,
    /// Pages whose checksum failed while being read.
    pub page_checksum_failures: u64,
    /// Why the backup failed or was found corrupt.
    pub error: Option<String>,
    /// Whether the backup was copied from a standby (its primary switched WAL for it).
    pub from_standby: bool,
    /// Set by `pgkeep pin`: retention never removes the backup while the pin holds.
    pub pinned: Option<Pin>,
}

impl BackupRecord {
    /// Whether the backup is pinned at `now`.
    pub fn pinned_at(&self, now: DateTime<Utc>) -> bool {
        self.pinned.is_some_and(|p| p.holds_at(now))
    }
}

/// One entry of a backup: a file, a directory or a symbolic link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRecord {
    /// Path relative to PGDATA, `/`-separated (tablespace files under `pg_tblspc/<oid>/...`).
    pub path: String,
    /// File, directory or symbolic link.
    pub kind: FileKind,
    /// Size in bytes of the raw stored stream: the file's size as backed up, except for
    /// page-delta files, where it is the length of the delta stream (the file itself is
    /// `n_blocks` pages long). Validation compares the decompressed object against this size and
    /// `crc32c`, whatever the kind of object.
    pub size: u64,
    /// `st_mode` as recorded.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
    /// Target of a symbolic link (tablespaces).
    pub link_target: Option<String>,
    /// CRC-32C of the stored raw bytes (for page-delta files: of the stored delta stream); None
    /// for directories and symbolic links.
    pub crc32c: Option<u32>,
    /// SHA-256 of the file's full content as backed up (for page-delta files: of the whole file
    /// as read, so `restore --delta` can compare); None for directories and symbolic links.
    pub sha256: Option<[u8; 32]>,
    /// Compressed bytes this backup added to the repository for the file (0 when `stored_in`
    /// names an ancestor).
    pub stored_size: u64,
    /// Label of the backup whose repository object holds the content (this backup, or an
    /// ancestor for unchanged files; the record is then a copy of that backup's); None for
    /// directories and symbolic links.
    pub stored_in: Option<String>,
    /// Length in blocks, for relation files.
    pub n_blocks: Option<u64>,
    /// Stored as a page delta against the parent chain (diff/incr relation files).
    pub page_delta: bool,
    /// Where in a bundle object of `stored_in` the content lies; None when the content is an
    /// object of its own (`backup/<stored_in>/data/<path>.lz4`).
    pub bundle: Option<Bundled>,
}

/// A file's place in a bundle: the object `backup/<label>/bundle/<id>` holds the lz4 frames of
/// many small files one after another, and this one's frame is `length` bytes from `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bundled {
    /// The bundle's number within its backup.
    pub id: u32,
    /// Where the file's frame starts in the bundle.
    pub offset: u64,
    /// The frame's length in bytes (compressed).
    pub length: u64,
}

/// One file of the WAL archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalRecord {
    /// File name as PostgreSQL gave it, e.g. `000000010000000000000002`.
    pub name: String,
    /// Segment, partial segment, backup history or timeline history.
    pub kind: WalKind,
    /// Timeline named by the file.
    pub timeline: u32,
    /// Segment number, for segments and partial segments.
    pub segno: Option<u64>,
    /// Size in bytes of the file as archived.
    pub size: u64,
    /// CRC-32C of the stored bytes.
    pub crc32c: u32,
    /// SHA-256 of the file's content.
    pub sha256: [u8; 32],
    /// Compressed bytes in the repository.
    pub stored_size: u64,
    /// When it was archived.
    pub archived_at: DateTime<Utc>,
}

/// Outcome of [`crate::Catalog::insert_wal`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalInsert {
    /// The row was added.
    Inserted,
    /// A row with that name was already there; it is returned unchanged.
    AlreadyPresent(WalRecord),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_table() {
        use BackupStatus as S;
        // Rows: from; columns: to, both in the order RUNNING DONE OK ERROR CORRUPT DELETING.
        let order = [
            S::Running,
            S::Done,
            S::Ok,
            S::Error,
            S::Corrupt,
            S::Deleting,
        ];
        let table = [
            [0, 1, 0, 1, 0, 1], // RUNNING
            [0, 0, 1, 0, 1, 1], // DONE
            [0, 0, 1, 0, 1, 1], // OK
            [0, 0, 0, 0, 0, 1], // ERROR
            [0, 0, 1, 0, 0, 1], // CORRUPT
            [0, 0, 0, 0, 0, 1], // DELETING
        ];
        assert_eq!(order, S::ALL);
        for (from, row) in order.iter().zip(table) {
            for (to, allowed) in order.iter().zip(row) {
                assert_eq!(from.can_become(*to), allowed == 1, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn restorable() {
        let restorable: Vec<_> = BackupStatus::ALL
            .iter()
            .filter(|s| s.is_restorable())
            .collect();
        assert_eq!(restorable, [&BackupStatus::Done, &BackupStatus::Ok]);
    }

    #[test]
    fn text_forms_round_trip() {
        for &t in BackupType::ALL {
            assert_eq!(t.as_str().parse::<BackupType>().unwrap(), t);
        }
        for &s in BackupStatus::ALL {
            assert_eq!(s.as_str().parse::<BackupStatus>().unwrap(), s);
        }
        for &k in FileKind::ALL {
            assert_eq!(k.as_str().parse::<FileKind>().unwrap(), k);
        }
        for &k in WalKind::ALL {
            assert_eq!(k.as_str().parse::<WalKind>().unwrap(), k);
        }
        let labels: String = BackupType::ALL.iter().map(|t| t.label_suffix()).collect();
        assert_eq!(labels, "FDI");
        assert_eq!(
            "weekly".parse::<BackupType>().unwrap_err().to_string(),
            "invalid backup type \"weekly\", expected one of full, diff, incr"
        );
        assert!("ok".parse::<BackupStatus>().is_err());
    }
}

/// One restore drill (`pgkeep drill`): the backup restored into a sandbox, how long restore and
/// recovery took and how far recovery got.
#[derive(Clone, Debug, PartialEq)]
pub struct DrillRecord {
    /// Label of the backup the drill restored.
    pub backup_label: String,
    /// When the drill began.
    pub started_at: DateTime<Utc>,
    /// Whether every step and check passed.
    pub passed: bool,
    /// Seconds to rebuild the data directory; None when the restore did not finish.
    pub restore_seconds: Option<f64>,
    /// Seconds from starting the server to its promotion; None when recovery did not finish.
    pub recovery_seconds: Option<f64>,
    /// Where replay ended ("redo done at").
    pub recovered_lsn: Option<Lsn>,
    /// Commit time of the last transaction replayed.
    pub recovered_time: Option<DateTime<Utc>>,
    /// Seconds between the point reached and the end of the drill's recovery.
    pub rpo_seconds: Option<f64>,
    /// What failed, on one line; None for a drill that passed.
    pub message: Option<String>,
}

impl DrillRecord {
    /// The text stored in the `status` column.
    pub fn status_str(&self) -> &'static str {
        if self.passed {
            "passed"
        } else {
            "failed"
        }
    }

    /// Restore plus recovery: how long it took to get a server back (the RTO), when both ended.
    pub fn rto_seconds(&self) -> Option<f64> {
        Some(self.restore_seconds? + self.recovery_seconds?)
    }
}
