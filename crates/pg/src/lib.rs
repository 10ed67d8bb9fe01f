//! PostgreSQL's on-disk formats as pgkeep needs them, for PostgreSQL 12 to 18:
//! LSNs and timelines, WAL segment sizes and file names, the long header of a
//! WAL segment, timeline history files, `pg_control`, data page headers and
//! checksums, WAL records and their block references, `backup_label`, and the rules for which files of a data
//! directory a backup skips. Every
//! function here is pure: parsers take the bytes or text they are handed,
//! never touch files or the network, and return a [`FormatError`] that names
//! what was wrong instead of panicking on bad input.

pub mod control;
pub mod error;
pub mod exclude;
pub mod history;
pub mod label;
pub mod lsn;
pub mod page;
pub mod wal;
pub mod walrecord;

mod bytes;

pub use control::{ControlFile, PG_CONTROL_FILE_SIZE};
pub use error::FormatError;
pub use exclude::{
    classify, is_temp_relation_name, is_unlogged_skip, parse_relation_file_name,
    parse_relation_path, unlogged_relfilenodes, Disposition, Fork, RelFile,
};
pub use history::{parse_history, timeline_path, HistoryEntry, TimelineSpan};
pub use label::BackupLabel;
pub use lsn::Lsn;
pub use page::{
    is_zero_page, pg_checksum_page, verify_page, PageHeader, PageVerdict, PAGE_HEADER_SIZE,
};
pub use wal::{
    parse_segment_header, pg_major_for_wal_magic, segment_name, SegmentHeader, TimelineId,
    WalFileName, WalSegSize, SEGMENT_HEADER_SIZE,
};
pub use walrecord::{
    decode_record, fork_from_number, rel_file_locator_at, BlockImage, BlockRef, ImageCompression,
    RelFileLocator, SegmentEnd, WalFormat, WalRecord, WalStream, DEFAULT_TABLESPACE_OID,
    GLOBAL_TABLESPACE_OID,
};
