//! The catalog's error type.

use std::path::PathBuf;

/// Result of catalog operations.
pub type Result<T> = std::result::Result<T, CatalogError>;

/// Everything that can go wrong in the catalog or while reading its metadata files.
///
/// Messages are one lower-case line naming the object; an underlying SQLite or I/O error is the
/// `source`, not repeated in the message, so `{:#}` of an anyhow chain reads naturally.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The catalog file is not there.
    #[error("catalog {} does not exist", path.display())]
    Missing {
        /// Catalog file.
        path: PathBuf,
    },
    /// [`crate::Catalog::create`] found a file already in place.
    #[error("catalog {} already exists", path.display())]
    AlreadyExists {
        /// Catalog file.
        path: PathBuf,
    },
    /// The file exists but is not a pgkeep catalog.
    #[error("{} is not a pgkeep catalog: {reason}", path.display())]
    NotACatalog {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// The catalog was written by a newer pgkeep.
    #[error(
        "catalog {} has schema version {found}, newer than version {supported} known to this pgkeep: upgrade pgkeep",
        path.display()
    )]
    SchemaTooNew {
        /// Catalog file.
        path: PathBuf,
        /// Version found in the file.
        found: i64,
        /// Newest version this build knows.
        supported: u32,
    },
    /// The catalog holds data this build cannot make sense of.
    #[error("catalog {} is damaged: {what}", path.display())]
    Damaged {
        /// Catalog file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// SQLite would not use write-ahead logging for the file, which concurrent writers need.
    #[error(
        "catalog {} cannot use write-ahead logging (journal mode stayed {mode}): keep the repository on a local file system",
        path.display()
    )]
    JournalMode {
        /// Catalog file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
    /// An SQLite call failed.
    #[error("catalog {}: {action}", path.display())]
    Sqlite {
        /// Catalog file.
        path: PathBuf,
        /// What was being done, e.g. "reading backup 20261121-101500F".
        action: String,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// A file-system call failed.
    #[error("{action} {}", path.display())]
    Io {
        /// What was being done, e.g. "creating catalog".
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// No backup has this label.
    #[error("backup {label} not found")]
    BackupNotFound {
        /// Backup label.
        label: String,
    },
    /// A backup with this label is already recorded.
    #[error("backup {label} already exists")]
    BackupExists {
        /// Backup label.
        label: String,
    },
    /// [`crate::BackupStatus::can_become`] refused a status change.
    #[error("backup {label} cannot go from {from} to {to}")]
    BadTransition {
        /// Backup label.
        label: String,
        /// Current status.
        from: crate::BackupStatus,
        /// Refused status.
        to: crate::BackupStatus,
    },
    /// Deleting a backup that another backup builds on.
    #[error("backup {label} is the parent of backup {child}: delete {child} first")]
    HasChildren {
        /// Backup that was to be deleted.
        label: String,
        /// A backup whose parent it is.
        child: String,
    },
    /// The same path was given twice for one backup.
    #[error("file {path} is recorded twice in backup {label}")]
    DuplicateFile {
        /// Backup label.
        label: String,
        /// Path relative to PGDATA.
        path: String,
    },
    /// No archived WAL file has this name.
    #[error("wal file {name} not found")]
    WalNotFound {
        /// WAL file name.
        name: String,
    },
    /// A text value that names none of an enum's variants.
    #[error("invalid {what} {value:?}, expected one of {expected}")]
    InvalidValue {
        /// What the value was meant to be, e.g. "backup type".
        what: &'static str,
        /// The value found.
        value: String,
        /// The accepted values, comma-separated.
        expected: String,
    },
    /// A `backup.ini` or `manifest` text that does not parse.
    #[error("{file}{}: {message}", line.map(|n| format!(" line {n}")).unwrap_or_default())]
    Meta {
        /// Which format: "backup.ini" or "manifest".
        file: &'static str,
        /// 1-based line number, when the problem is on one line.
        line: Option<usize>,
        /// What is wrong there.
        message: String,
    },
}
