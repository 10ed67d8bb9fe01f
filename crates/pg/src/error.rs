//! The one error type of this crate: what was wrong with the bytes or text a parser was handed.

use crate::lsn::Lsn;

/// Why a PostgreSQL file, name or value could not be read.
///
/// Messages start lower-case and name the object, so callers can wrap them
/// with the path they read (`"reading {path}: {err}"`) and print one line.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// An LSN string that is not in PostgreSQL's `X/X` form.
    #[error("invalid LSN {0:?}: expected two hex numbers of 1 to 8 digits, as in \"16/B374D848\"")]
    InvalidLsn(String),

    /// A timeline ID that is not a decimal number from 1 to 4294967295.
    #[error("invalid timeline ID {0:?}: expected a decimal number from 1 to 4294967295")]
    InvalidTimeline(String),

    /// A WAL segment size PostgreSQL would refuse (`initdb --wal-segsize`).
    #[error("invalid WAL segment size {0} bytes: must be a power of two from 1 MiB to 1 GiB")]
    InvalidWalSegSize(u64),

    /// A file name that is not a WAL segment, partial segment, backup history or timeline history name.
    #[error("invalid WAL file name {name:?}: {reason}")]
    InvalidWalFileName { name: String, reason: String },

    /// Input shorter than the structure it should hold.
    #[error("{what} is too short: {got} bytes, need at least {needed}")]
    TooShort {
        what: &'static str,
        needed: usize,
        got: usize,
    },

    /// A WAL page magic that no supported PostgreSQL major version (12 to 18) writes.
    #[error("invalid WAL magic 0x{0:04X} in segment header: not written by PostgreSQL 12 to 18")]
    UnknownWalMagic(u16),

    /// A WAL segment header with a known magic but a wrong field.
    #[error("invalid WAL segment header: {0}")]
    InvalidSegmentHeader(String),

    /// A `pg_control` whose format version this crate does not know.
    #[error(
        "unsupported pg_control version {0}: pgkeep reads versions 1201, 1300, 1700 and 1800 (PostgreSQL 12 to 18)"
    )]
    UnsupportedControlVersion(u32),

    /// A `pg_control` whose stored CRC-32C does not match its contents.
    #[error("pg_control CRC mismatch: stored 0x{stored:08X}, computed 0x{computed:08X}")]
    ControlCrcMismatch { stored: u32, computed: u32 },

    /// A `pg_control` with a correct CRC but a value that cannot be right.
    #[error("invalid pg_control: {0}")]
    InvalidControlFile(String),

    /// A `backup_label` line that cannot be read.
    #[error("invalid backup_label line {line}: {reason}")]
    InvalidBackupLabel { line: usize, reason: String },

    /// A timeline history file line that cannot be read.
    #[error("invalid timeline history file {tli:08X}.history line {line}: {reason}")]
    InvalidHistory {
        tli: u32,
        line: usize,
        reason: String,
    },

    /// A WAL record PostgreSQL's own reader would refuse, or one this crate cannot decode.
    #[error("invalid WAL record at {lsn}: {reason}")]
    InvalidWalRecord { lsn: Lsn, reason: String },

    /// A WAL page whose header does not fit the stream it is read in.
    #[error("invalid WAL page at {lsn}: {reason}")]
    InvalidWalPage { lsn: Lsn, reason: String },

    /// Zeros where a record should start: the WAL written so far ends here.
    #[error("no WAL record at {lsn}: the WAL written so far ends there")]
    EndOfWal { lsn: Lsn },

    /// A `backup_label` without a line PostgreSQL always writes.
    #[error("backup_label has no {0:?} line")]
    MissingBackupLabelField(&'static str),
}
