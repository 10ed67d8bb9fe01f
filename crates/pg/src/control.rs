//! `global/pg_control`: the cluster's identity, latest checkpoint and
//! compile-time settings, read from its raw bytes for PostgreSQL 12 to 18.

use crate::bytes::{u32_at, u64_at};
use crate::error::FormatError;
use crate::lsn::Lsn;
use crate::wal::{TimelineId, WalSegSize};

/// `PG_CONTROL_FILE_SIZE`: PostgreSQL pads `pg_control` with zeros to this
/// size, whatever the version, so a read of the wrong version fails on
/// content rather than on length.
pub const PG_CONTROL_FILE_SIZE: usize = 8192;

/// The fields of `ControlFileData` (src/include/catalog/pg_control.h) that
/// pgkeep needs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ControlFile {
    /// Unique per cluster, also stamped on every WAL segment.
    pub system_identifier: u64,
    /// `PG_CONTROL_VERSION`: 1201 (PG 12), 1300 (13 to 16), 1700 (17), 1800 (18).
    pub pg_control_version: u32,
    /// `CATALOG_VERSION_NO`, a `YYYYMMDDN` number that changes with every catalog change.
    pub catalog_version_no: u32,
    /// `DBState`; see [`ControlFile::state_name`].
    pub state: u32,
    /// Where the latest checkpoint record starts.
    pub checkpoint: Lsn,
    /// Where replay from the latest checkpoint starts (`checkPointCopy.redo`).
    pub checkpoint_redo: Lsn,
    /// Timeline of the latest checkpoint (`checkPointCopy.ThisTimeLineID`).
    pub checkpoint_timeline: TimelineId,
    /// `BLCKSZ`: data page size.
    pub block_size: u32,
    /// `RELSEG_SIZE`: blocks per relation segment file (`.1`, `.2`, ...).
    pub blocks_per_segment: u32,
    /// `XLOG_BLCKSZ`: WAL page size.
    pub wal_block_size: u32,
    /// WAL segment size in bytes.
    pub wal_segment_size: u32,
    /// 0 when data pages carry no checksums, else the checksum algorithm version (1).
    pub data_checksum_version: u32,
}

// Field offsets in ControlFileData on a 64-bit platform (8-byte aligned
// int64 and double). Every layout from PG 12 to 18 shares these: the
// fields that came and went in between (float4ByVal gone in 13, wal_level
// added to CheckPoint in 17, default_char_signedness added in 18) fill padding
// or sit after data_checksum_version.
const OFF_SYSTEM_IDENTIFIER: usize = 0;
const OFF_PG_CONTROL_VERSION: usize = 8;
const OFF_CATALOG_VERSION_NO: usize = 12;
const OFF_STATE: usize = 16;
const OFF_CHECKPOINT: usize = 32;
/// `checkPointCopy` starts at 40; `redo` is its first field and the timeline follows.
const OFF_CHECKPOINT_REDO: usize = 40;
const OFF_CHECKPOINT_TIMELINE: usize = 48;
const OFF_FLOAT_FORMAT: usize = 208;
const OFF_BLCKSZ: usize = 216;
const OFF_RELSEG_SIZE: usize = 220;
const OFF_XLOG_BLCKSZ: usize = 224;
const OFF_XLOG_SEG_SIZE: usize = 228;
const OFF_DATA_CHECKSUM_VERSION: usize = 252;

/// `FLOATFORMAT_VALUE`, stored so a reader can tell its layout matches.
const FLOAT_FORMAT: f64 = 1_234_567.0;

/// Offset of the `crc` field, the last one, per `pg_control_version`. The
/// CRC covers every byte before it.
fn crc_offset(pg_control_version: u32) -> Option<usize> {
    match pg_control_version {
        // 256: data_checksum_version ends; 32 bytes of mock_authentication_nonce follow.
        1201 | 1300 | 1700 => Some(288),
        // PG 18 puts the bool default_char_signedness before the nonce, and
        // the crc is then aligned up from 289 to 292.
        1800 => Some(292),
        _ => None,
    }
}

impl ControlFile {
    /// Reads `pg_control` bytes (normally all [`PG_CONTROL_FILE_SIZE`] of
    /// them; only the used part is required).
    ///
    /// Verifies the CRC-32C PostgreSQL stores over the bytes before the
    /// `crc` field (`ReadControlFile`, src/backend/access/transam/xlog.c), and
    /// refuses a file from another byte order, a 32-bit build or an unknown
    /// version rather than read fields at the wrong offsets.
    pub fn parse(bytes: &[u8]) -> Result<ControlFile, FormatError> {
        let too_short = |needed: usize| FormatError::TooShort {
            what: "pg_control",
            needed,
            got: bytes.len(),
        };
        let version = u32_at(bytes, OFF_PG_CONTROL_VERSION)
            .ok_or_else(|| too_short(OFF_CATALOG_VERSION_NO))?;
        let crc_at = match crc_offset(version) {
            Some(offset) => offset,
            None if crc_offset(version.swap_bytes()).is_some() => {
                return Err(FormatError::InvalidControlFile(format!(
                    "version {} reads as {} in the other byte order: the file comes from a machine of different endianness",
                    version,
                    version.swap_bytes()
                )))
            }
            None => return Err(FormatError::UnsupportedControlVersion(version)),
        };
        let stored = u32_at(bytes, crc_at).ok_or_else(|| too_short(crc_at + 4))?;
        let covered = bytes.get(..crc_at).ok_or_else(|| too_short(crc_at + 4))?;
        let computed = crc32c::crc32c(covered);
        if stored != computed {
            return Err(FormatError::ControlCrcMismatch { stored, computed });
        }

        // From here on every read is inside `covered`, which is long enough.
        let u32_field = |offset| u32_at(covered, offset).ok_or_else(|| too_short(crc_at + 4));
        let u64_field = |offset| u64_at(covered, offset).ok_or_else(|| too_short(crc_at + 4));

        let float_format = f64::from_bits(u64_field(OFF_FLOAT_FORMAT)?);
        if float_format != FLOAT_FORMAT {
            return Err(FormatError::InvalidControlFile(format!(
                "float format check value is {float_format}, not {FLOAT_FORMAT}: the file was written with a different struct layout (a 32-bit build?)"
            )));
        }

        let control = ControlFile {
            system_identifier: u64_field(OFF_SYSTEM_IDENTIFIER)?,
            pg_control_version: version,
            catalog_version_no: u32_field(OFF_CATALOG_VERSION_NO)?,
            state: u32_field(OFF_STATE)?,
            checkpoint: Lsn(u64_field(OFF_CHECKPOINT)?),
            checkpoint_redo: Lsn(u64_field(OFF_CHECKPOINT_REDO)?),
            checkpoint_timeline: TimelineId(u32_field(OFF_CHECKPOINT_TIMELINE)?),
            block_size: u32_field(OFF_BLCKSZ)?,
            blocks_per_segment: u32_field(OFF_RELSEG_SIZE)?,
            wal_block_size: u32_field(OFF_XLOG_BLCKSZ)?,
            wal_segment_size: u32_field(OFF_XLOG_SEG_SIZE)?,
            data_checksum_version: u32_field(OFF_DATA_CHECKSUM_VERSION)?,
        };
        control.check_settings()?;
        Ok(control)
    }

    /// Whether data pages carry checksums (`initdb -k`).
    pub fn data_checksums(&self) -> bool {
        self.data_checksum_version != 0
    }

    /// The WAL segment size; [`ControlFile::parse`] has already checked it.
    pub fn wal_seg_size(&self) -> Result<WalSegSize, FormatError> {
        WalSegSize::new(u64::from(self.wal_segment_size))
    }

    /// Whether `state` is `DB_IN_PRODUCTION`: what a running primary's pg_control says.
    pub fn in_production(&self) -> bool {
        self.state == 6
    }

    /// Whether `state` is `DB_IN_ARCHIVE_RECOVERY`: what a running standby's pg_control says.
    pub fn in_archive_recovery(&self) -> bool {
        self.state == 5
    }

    /// `state` in the words `pg_controldata` uses ("shut down", "in production", ...).
    pub fn state_name(&self) -> &'static str {
        // DBState, src/include/catalog/pg_control.h; wording from dbState()
        // in src/bin/pg_controldata/pg_controldata.c.
        match self.state {
            0 => "starting up",
            1 => "shut down",
            2 => "shut down in recovery",
            3 => "shutting down",
            4 => "in crash recovery",
            5 => "in archive recovery",
            6 => "in production",
            _ => "unrecognized status code",
        }
    }

    /// Refuses sizes no PostgreSQL build can have, so callers can divide by them.
    fn check_settings(&self) -> Result<(), FormatError> {
        let bad = |what: &str, value: u32| {
            Err(FormatError::InvalidControlFile(format!(
                "{what} {value} is not possible"
            )))
        };
        // configure --with-blocksize allows 1 to 32 kB, --with-wal-blocksize 1 to 64 kB.
        if !self.block_size.is_power_of_two() || !(1024..=32768).contains(&self.block_size) {
            return bad("block size", self.block_size);
        }
        if self.blocks_per_segment == 0 {
            return bad("blocks per segment", self.blocks_per_segment);
        }
        if !self.wal_block_size.is_power_of_two() || !(1024..=65536).contains(&self.wal_block_size)
        {
            return bad("WAL block size", self.wal_block_size);
        }
        if WalSegSize::new(u64::from(self.wal_segment_size)).is_err() {
            return bad("WAL segment size", self.wal_segment_size);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pg_control as PostgreSQL of the given control version writes it.
    fn control_bytes(version: u32) -> Vec<u8> {
        let mut b = vec![0u8; PG_CONTROL_FILE_SIZE];
        let put32 =
            |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        let put64 =
            |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        put64(&mut b, OFF_SYSTEM_IDENTIFIER, 7_000_000_000_000_000_042);
        put32(&mut b, OFF_PG_CONTROL_VERSION, version);
        put32(&mut b, OFF_CATALOG_VERSION_NO, 202_307_071);
        put32(&mut b, OFF_STATE, 6);
        put64(&mut b, OFF_CHECKPOINT, 0x0100_0060);
        put64(&mut b, OFF_CHECKPOINT_REDO, 0x0100_0028);
        put32(&mut b, OFF_CHECKPOINT_TIMELINE, 3);
        put64(&mut b, OFF_FLOAT_FORMAT, FLOAT_FORMAT.to_bits());
        put32(&mut b, OFF_BLCKSZ, 8192);
        put32(&mut b, OFF_RELSEG_SIZE, 131_072);
        put32(&mut b, OFF_XLOG_BLCKSZ, 8192);
        put32(&mut b, OFF_XLOG_SEG_SIZE, 64 << 20);
        put32(&mut b, OFF_DATA_CHECKSUM_VERSION, 1);
        stamp_crc(&mut b, crc_offset(version).unwrap_or(288));
        b
    }

    /// Stores the CRC-32C of the bytes before `crc_at` at `crc_at`, as PostgreSQL does.
    fn stamp_crc(b: &mut [u8], crc_at: usize) {
        let crc = crc32c::crc32c(&b[..crc_at]);
        b[crc_at..crc_at + 4].copy_from_slice(&crc.to_ne_bytes());
    }

    #[test]
    fn parses_every_supported_version() {
        for version in [1201, 1300, 1700, 1800] {
            let c = ControlFile::parse(&control_bytes(version)).unwrap();
            assert_eq!(c.pg_control_version, version);
            assert_eq!(c.system_identifier, 7_000_000_000_000_000_042);
            assert_eq!(c.catalog_version_no, 202_307_071);
            assert_eq!(c.state_name(), "in production");
            assert_eq!(c.checkpoint, Lsn(0x0100_0060));
            assert_eq!(c.checkpoint_redo, Lsn(0x0100_0028));
            assert_eq!(c.checkpoint_timeline, TimelineId(3));
            assert_eq!(c.block_size, 8192);
            assert_eq!(c.blocks_per_segment, 131_072);
            assert_eq!(c.wal_block_size, 8192);
            assert_eq!(c.wal_seg_size(), WalSegSize::new(64 << 20));
            assert!(c.data_checksums());
        }
    }

    #[test]
    fn only_the_used_part_is_needed() {
        let b = control_bytes(1800);
        assert!(ControlFile::parse(&b[..296]).is_ok());
        assert_eq!(
            ControlFile::parse(&b[..290]).unwrap_err().to_string(),
            "pg_control is too short: 290 bytes, need at least 296"
        );
        assert!(matches!(
            ControlFile::parse(&b[..4]),
            Err(FormatError::TooShort { got: 4, .. })
        ));
    }

    #[test]
    fn crc_mismatch_is_reported() {
        let mut b = control_bytes(1300);
        b[OFF_BLCKSZ] ^= 1;
        let err = ControlFile::parse(&b).unwrap_err();
        assert!(
            matches!(err, FormatError::ControlCrcMismatch { .. }),
            "{err}"
        );
        assert!(err
            .to_string()
            .starts_with("pg_control CRC mismatch: stored 0x"));
    }

    #[test]
    fn the_crc_offset_follows_the_version() {
        // A 1300 file relabelled 1800 (CRC recomputed at 288) must not pass:
        // the 1800 reader looks for the CRC at 292.
        let mut b = control_bytes(1300);
        b[OFF_PG_CONTROL_VERSION..OFF_PG_CONTROL_VERSION + 4]
            .copy_from_slice(&1800u32.to_ne_bytes());
        stamp_crc(&mut b, 288);
        assert!(matches!(
            ControlFile::parse(&b),
            Err(FormatError::ControlCrcMismatch { .. })
        ));
    }

    #[test]
    fn unknown_and_byte_swapped_versions() {
        let b = control_bytes(1100);
        assert_eq!(
            ControlFile::parse(&b),
            Err(FormatError::UnsupportedControlVersion(1100))
        );
        let b = control_bytes(1300u32.swap_bytes());
        let err = ControlFile::parse(&b).unwrap_err().to_string();
        assert!(err.contains("different endianness"), "{err}");
    }

    #[test]
    fn impossible_settings_are_refused() {
        let mut b = control_bytes(1700);
        b[OFF_BLCKSZ..OFF_BLCKSZ + 4].copy_from_slice(&0u32.to_ne_bytes());
        stamp_crc(&mut b, 288);
        assert_eq!(
            ControlFile::parse(&b).unwrap_err().to_string(),
            "invalid pg_control: block size 0 is not possible"
        );
    }

    #[test]
    fn wrong_float_format_means_wrong_layout() {
        let mut b = control_bytes(1300);
        b[OFF_FLOAT_FORMAT..OFF_FLOAT_FORMAT + 8].copy_from_slice(&0u64.to_ne_bytes());
        stamp_crc(&mut b, 288);
        let err = ControlFile::parse(&b).unwrap_err().to_string();
        assert!(err.contains("float format"), "{err}");
    }
}
