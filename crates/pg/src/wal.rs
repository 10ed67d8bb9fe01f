//! WAL naming and sizing: timelines, segment sizes, the four kinds of file in
//! `pg_wal` and the archive, and the long page header that opens every segment.

use std::fmt;
use std::str::FromStr;

use crate::bytes::{u16_at, u32_at, u64_at, upper_hex8};
use crate::error::FormatError;
use crate::lsn::Lsn;

/// A timeline ID (`TimeLineID`). A cluster starts on timeline 1 and every
/// promotion or point-in-time recovery starts a new one.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct TimelineId(pub u32);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for TimelineId {
    type Err = FormatError;

    /// Parses the decimal form PostgreSQL prints (`START TIMELINE: 1`,
    /// `recovery_target_timeline = '3'`). Timeline 0 does not exist.
    fn from_str(s: &str) -> Result<TimelineId, FormatError> {
        match crate::bytes::canonical_u32(s) {
            Some(tli) if tli != 0 => Ok(TimelineId(tli)),
            _ => Err(FormatError::InvalidTimeline(s.to_owned())),
        }
    }
}

/// Size of a WAL segment file: a power of two from 1 MiB to 1 GiB, chosen at
/// `initdb --wal-segsize` time (`IsValidWalSegSize`, src/include/access/xlog_internal.h).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct WalSegSize(u32);

const MIN_WAL_SEG_SIZE: u64 = 1 << 20;
const MAX_WAL_SEG_SIZE: u64 = 1 << 30;

impl WalSegSize {
    /// The 16 MiB PostgreSQL uses unless told otherwise.
    pub const DEFAULT: WalSegSize = WalSegSize(16 << 20);

    /// A segment size of `bytes`, if PostgreSQL would accept it.
    pub fn new(bytes: u64) -> Result<WalSegSize, FormatError> {
        let valid =
            bytes.is_power_of_two() && (MIN_WAL_SEG_SIZE..=MAX_WAL_SEG_SIZE).contains(&bytes);
        match u32::try_from(bytes) {
            Ok(size) if valid => Ok(WalSegSize(size)),
            _ => Err(FormatError::InvalidWalSegSize(bytes)),
        }
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }

    /// Segments per 4 GiB "xlog id" (`XLogSegmentsPerXLogId`): the middle
    /// eight hex digits of a segment name count these, the last eight count
    /// segments within one.
    pub fn segments_per_xlog_id(self) -> u64 {
        0x1_0000_0000 / self.bytes()
    }
}

impl Default for WalSegSize {
    fn default() -> WalSegSize {
        WalSegSize::DEFAULT
    }
}

/// The name of a file PostgreSQL writes to `pg_wal` and hands to `archive_command`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum WalFileName {
    /// A complete segment: `000000010000000000000002`.
    Segment { tli: TimelineId, segno: u64 },
    /// The last, incomplete segment of a timeline left by promotion:
    /// `000000010000000000000002.partial`.
    Partial { tli: TimelineId, segno: u64 },
    /// A backup history file written by `pg_backup_stop`, named after the
    /// backup's start segment and the start offset inside it:
    /// `000000010000000000000002.00000028.backup`.
    Backup {
        tli: TimelineId,
        segno: u64,
        offset: u32,
    },
    /// A timeline history file written at promotion: `00000002.history`.
    History { tli: TimelineId },
}

impl WalFileName {
    /// Parses a WAL, partial, backup history or timeline history file name.
    ///
    /// Only upper-case hex is accepted, as PostgreSQL writes (`XLogFileName`,
    /// `BackupHistoryFileName`, `TLHistoryFileName` in xlog_internal.h), and
    /// the within-xlog-id part of a segment must be below
    /// `seg.segments_per_xlog_id()`, so every name has exactly one parse.
    pub fn parse(name: &str, seg: WalSegSize) -> Result<WalFileName, FormatError> {
        let invalid = |reason: String| FormatError::InvalidWalFileName {
            name: name.to_owned(),
            reason,
        };
        let bytes = name.as_bytes();
        if let Some(tli) = bytes.strip_suffix(b".history") {
            let tli = upper_hex8(tli).ok_or_else(|| {
                invalid(
                    "a timeline history name is 8 upper-case hex digits and \".history\"".into(),
                )
            })?;
            let tli = nonzero_timeline(tli).map_err(invalid)?;
            return Ok(WalFileName::History { tli });
        }
        if let Some(segment) = bytes.strip_suffix(b".partial") {
            let (tli, segno) = parse_segment(segment, seg).map_err(invalid)?;
            return Ok(WalFileName::Partial { tli, segno });
        }
        if let Some(rest) = bytes.strip_suffix(b".backup") {
            let shape = "a backup history name is a segment name, '.', 8 upper-case hex digits and \".backup\"";
            let (segment, offset) = match rest.split_at_checked(SEGMENT_NAME_LEN) {
                Some((segment, [b'.', offset @ ..])) => (segment, offset),
                _ => return Err(invalid(shape.into())),
            };
            let (tli, segno) = parse_segment(segment, seg).map_err(invalid)?;
            let offset = upper_hex8(offset).ok_or_else(|| invalid(shape.into()))?;
            if u64::from(offset) >= seg.bytes() {
                return Err(invalid(format!(
                    "start offset 0x{offset:08X} is not inside a {} segment",
                    size_text(seg)
                )));
            }
            return Ok(WalFileName::Backup { tli, segno, offset });
        }
        let (tli, segno) = parse_segment(bytes, seg).map_err(invalid)?;
        Ok(WalFileName::Segment { tli, segno })
    }

    /// The file name, the inverse of [`WalFileName::parse`].
    pub fn to_name(&self, seg: WalSegSize) -> String {
        match *self {
            WalFileName::Segment { tli, segno } => segment_name(tli, segno, seg),
            WalFileName::Partial { tli, segno } => {
                format!("{}.partial", segment_name(tli, segno, seg))
            }
            WalFileName::Backup { tli, segno, offset } => {
                format!("{}.{offset:08X}.backup", segment_name(tli, segno, seg))
            }
            WalFileName::History { tli } => format!("{:08X}.history", tli.0),
        }
    }

    /// The timeline the file belongs to.
    pub fn timeline(&self) -> TimelineId {
        match *self {
            WalFileName::Segment { tli, .. }
            | WalFileName::Partial { tli, .. }
            | WalFileName::Backup { tli, .. }
            | WalFileName::History { tli } => tli,
        }
    }

    /// The segment number, for every kind but timeline history files.
    pub fn segno(&self) -> Option<u64> {
        match *self {
            WalFileName::Segment { segno, .. }
            | WalFileName::Partial { segno, .. }
            | WalFileName::Backup { segno, .. } => Some(segno),
            WalFileName::History { .. } => None,
        }
    }
}

/// The 24-hex-digit name of WAL segment `segno` on timeline `tli` (`XLogFileName`):
/// `%08X%08X%08X` of the timeline, `segno / segments_per_xlog_id` and
/// `segno % segments_per_xlog_id`.
pub fn segment_name(tli: TimelineId, segno: u64, seg: WalSegSize) -> String {
    let per_id = seg.segments_per_xlog_id();
    format!("{:08X}{:08X}{:08X}", tli.0, segno / per_id, segno % per_id)
}

/// The long page header at the start of every WAL segment
/// (`XLogLongPageHeaderData`, src/include/access/xlog_internal.h).
/// PostgreSQL writes it in native endianness.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SegmentHeader {
    /// `xlp_magic`: the WAL format version, one per PostgreSQL major version.
    pub magic: u16,
    /// `xlp_info`: page flag bits.
    pub info: u16,
    /// `xlp_tli`: timeline of the first record on the page. After a
    /// promotion the first segment of the new timeline still carries the old
    /// timeline here, so do not compare it with the file name's timeline.
    pub timeline: TimelineId,
    /// `xlp_pageaddr`: WAL position of this page, the start of the segment.
    pub page_addr: Lsn,
    /// `xlp_sysid`: the cluster's system identifier, as in `pg_control`.
    pub system_identifier: u64,
    /// `xlp_seg_size`: the segment size in bytes.
    pub segment_size: u32,
    /// `xlp_xlog_blcksz`: the WAL page size in bytes.
    pub wal_block_size: u32,
    /// The PostgreSQL major version that writes `magic`.
    pub pg_major: u32,
}

impl SegmentHeader {
    /// Number of the segment this header opens (its page address over the segment size).
    pub fn segno(&self) -> u64 {
        self.page_addr.0 / u64::from(self.segment_size.max(1))
    }

    /// Segment size as a [`WalSegSize`]; [`parse_segment_header`] has checked it.
    pub fn seg_size(&self) -> Result<WalSegSize, FormatError> {
        WalSegSize::new(u64::from(self.segment_size))
    }
}

/// `SizeOfXLogLongPHD`: the long header is 40 bytes on every platform
/// PostgreSQL supports (MAXALIGN of 36 bytes of fields).
pub const SEGMENT_HEADER_SIZE: usize = 40;

/// `XLP_LONG_HEADER`: this page starts with the long header.
const XLP_LONG_HEADER: u16 = 0x0002;
/// `XLP_ALL_FLAGS`: every `xlp_info` bit PostgreSQL 12 to 18 define
/// (0x0008, `XLP_FIRST_IS_OVERWRITE_CONTRECORD`, was back-patched to all of them).
const XLP_ALL_FLAGS: u16 = 0x000F;

/// The PostgreSQL major version whose WAL carries `magic` (`XLOG_PAGE_MAGIC`
/// in each release branch's src/include/access/xlog_internal.h).
pub fn pg_major_for_wal_magic(magic: u16) -> Option<u32> {
    match magic {
        0xD101 => Some(12),
        0xD106 => Some(13),
        0xD10D => Some(14),
        0xD110 => Some(15),
        0xD113 => Some(16),
        0xD116 => Some(17),
        0xD118 => Some(18),
        _ => None,
    }
}

/// Parses the first bytes of a WAL segment: a known magic, the long-header
/// flag, no unknown flag bits, a valid segment size and WAL page size, and a
/// page address at a segment boundary (the checks of
/// `XLogReaderValidatePageHeader`, src/backend/access/transam/xlogreader.c,
/// that need nothing but the header).
pub fn parse_segment_header(bytes: &[u8]) -> Result<SegmentHeader, FormatError> {
    let too_short = || FormatError::TooShort {
        what: "WAL segment header",
        needed: SEGMENT_HEADER_SIZE,
        got: bytes.len(),
    };
    let head = bytes.get(..SEGMENT_HEADER_SIZE).ok_or_else(too_short)?;
    let field32 = |offset| u32_at(head, offset).ok_or_else(too_short);

    let magic = u16_at(head, 0).ok_or_else(too_short)?;
    let pg_major = pg_major_for_wal_magic(magic).ok_or(FormatError::UnknownWalMagic(magic))?;
    let info = u16_at(head, 2).ok_or_else(too_short)?;
    let timeline = TimelineId(field32(4)?);
    let page_addr = Lsn(u64_at(head, 8).ok_or_else(too_short)?);
    // Bytes 16..20 are xlp_rem_len and 20..24 padding: not needed here.
    let system_identifier = u64_at(head, 24).ok_or_else(too_short)?;
    let segment_size = field32(32)?;
    let wal_block_size = field32(36)?;

    let bad = |reason: String| Err(FormatError::InvalidSegmentHeader(reason));
    if info & XLP_LONG_HEADER == 0 {
        return bad(format!(
            "xlp_info 0x{info:04X} lacks the long-header flag, so this is not the first page of a segment"
        ));
    }
    if info & !XLP_ALL_FLAGS != 0 {
        return bad(format!("xlp_info 0x{info:04X} has unknown flag bits"));
    }
    let seg = match WalSegSize::new(u64::from(segment_size)) {
        Ok(seg) => seg,
        Err(_) => {
            return bad(format!(
                "segment size {segment_size} is not a power of two from 1 MiB to 1 GiB"
            ))
        }
    };
    // configure's --with-wal-blocksize allows 1 to 64 kB.
    if !wal_block_size.is_power_of_two() || !(1024..=65536).contains(&wal_block_size) {
        return bad(format!(
            "WAL block size {wal_block_size} is not a power of two from 1 kB to 64 kB"
        ));
    }
    if page_addr.segment_offset(seg) != 0 {
        return bad(format!(
            "page address {page_addr} is not at the start of a {} segment",
            size_text(seg)
        ));
    }
    Ok(SegmentHeader {
        magic,
        info,
        timeline,
        page_addr,
        system_identifier,
        segment_size,
        wal_block_size,
        pg_major,
    })
}

const SEGMENT_NAME_LEN: usize = 24;

/// Timeline and segment number of a 24-digit segment name, or why not.
fn parse_segment(name: &[u8], seg: WalSegSize) -> Result<(TimelineId, u64), String> {
    let shape = || "a segment name is 24 upper-case hex digits".to_owned();
    if name.len() != SEGMENT_NAME_LEN {
        return Err(shape());
    }
    let (tli, rest) = name.split_at(8);
    let (log, seg_in_log) = rest.split_at(8);
    let (Some(tli), Some(log), Some(seg_in_log)) =
        (upper_hex8(tli), upper_hex8(log), upper_hex8(seg_in_log))
    else {
        return Err(shape());
    };
    let tli = nonzero_timeline(tli)?;
    let per_id = seg.segments_per_xlog_id();
    if u64::from(seg_in_log) >= per_id {
        return Err(format!(
            "last 8 digits {seg_in_log:08X} exceed the {per_id} segments per xlog id of {} segments",
            size_text(seg)
        ));
    }
    Ok((tli, u64::from(log) * per_id + u64::from(seg_in_log)))
}

fn nonzero_timeline(tli: u32) -> Result<TimelineId, String> {
    if tli == 0 {
        Err("timeline 0 does not exist".to_owned())
    } else {
        Ok(TimelineId(tli))
    }
}

/// "16 MiB" style text for messages.
fn size_text(seg: WalSegSize) -> String {
    format!("{} MiB", seg.bytes() >> 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mib(n: u64) -> WalSegSize {
        WalSegSize::new(n << 20).unwrap()
    }

    #[test]
    fn seg_size_bounds() {
        assert_eq!(WalSegSize::new(16 << 20), Ok(WalSegSize::DEFAULT));
        assert_eq!(mib(1).bytes(), 1 << 20);
        assert_eq!(mib(1024).bytes(), 1 << 30);
        for bad in [0, 1, 512 << 10, 3 << 20, 2 << 30, u64::MAX] {
            assert_eq!(
                WalSegSize::new(bad),
                Err(FormatError::InvalidWalSegSize(bad))
            );
        }
        assert_eq!(WalSegSize::DEFAULT.segments_per_xlog_id(), 256);
        assert_eq!(mib(1).segments_per_xlog_id(), 4096);
        assert_eq!(mib(1024).segments_per_xlog_id(), 4);
    }

    #[test]
    fn timeline_text() {
        assert_eq!(TimelineId(12).to_string(), "12");
        assert_eq!("3".parse(), Ok(TimelineId(3)));
        for bad in ["0", "", "-1", "03", "x", "4294967296"] {
            assert_eq!(
                bad.parse::<TimelineId>(),
                Err(FormatError::InvalidTimeline(bad.to_owned()))
            );
        }
    }

    #[test]
    fn parses_each_kind() {
        let seg = WalSegSize::DEFAULT;
        let tli = TimelineId(1);
        assert_eq!(
            WalFileName::parse("000000010000000000000002", seg),
            Ok(WalFileName::Segment { tli, segno: 2 })
        );
        assert_eq!(
            WalFileName::parse("000000010000000000000002.partial", seg),
            Ok(WalFileName::Partial { tli, segno: 2 })
        );
        assert_eq!(
            WalFileName::parse("000000010000000000000002.00000028.backup", seg),
            Ok(WalFileName::Backup {
                tli,
                segno: 2,
                offset: 0x28
            })
        );
        assert_eq!(
            WalFileName::parse("0000000A.history", seg),
            Ok(WalFileName::History {
                tli: TimelineId(10)
            })
        );
        // Second xlog id: segno = 1 * 256 + 0xFF with 16 MiB segments.
        assert_eq!(
            WalFileName::parse("0000000300000001000000FF", seg),
            Ok(WalFileName::Segment {
                tli: TimelineId(3),
                segno: 511
            })
        );
    }

    #[test]
    fn segment_part_depends_on_segment_size() {
        let name = "000000010000000000000100";
        assert!(WalFileName::parse(name, WalSegSize::DEFAULT).is_err());
        assert_eq!(
            WalFileName::parse(name, mib(1)).unwrap().segno(),
            Some(0x100)
        );
        assert_eq!(
            segment_name(TimelineId(1), 0x100, WalSegSize::DEFAULT),
            "000000010000000100000000"
        );
        assert_eq!(
            segment_name(TimelineId(1), 5, mib(1024)),
            "000000010000000100000001"
        );
    }

    #[test]
    fn rejects_what_postgresql_never_writes() {
        let seg = WalSegSize::DEFAULT;
        for bad in [
            "",
            "00000001000000000000000",
            "0000000100000000000000020",
            "00000001000000000000000a",
            "000000000000000000000002",
            "00000001000000000000000G",
            "000000010000000000000002.PARTIAL",
            "000000010000000000000002.partial.partial",
            "000000010000000000000002.0000028.backup",
            "000000010000000000000002.00000028.backup.backup",
            "000000010000000000000002-00000028.backup",
            "000000010000000000000002.01000000.backup",
            "00000000.history",
            "0000001.history",
            "0000000a.history",
            "é00000010000000000000002",
            "00000001000000000000000é",
            ".history",
            ".backup",
        ] {
            let err = WalFileName::parse(bad, seg).unwrap_err();
            assert!(
                matches!(&err, FormatError::InvalidWalFileName { name, .. } if name == bad),
                "{bad:?}: {err}"
            );
        }
        let err = WalFileName::parse("000000010000000000000100", seg).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid WAL file name \"000000010000000000000100\": last 8 digits 00000100 exceed the 256 segments per xlog id of 16 MiB segments"
        );
    }

    #[test]
    fn accessors() {
        let seg = WalSegSize::DEFAULT;
        let backup = WalFileName::parse("000000020000000100000003.00A00028.backup", seg).unwrap();
        assert_eq!(backup.timeline(), TimelineId(2));
        assert_eq!(backup.segno(), Some(259));
        assert_eq!(
            backup.to_name(seg),
            "000000020000000100000003.00A00028.backup"
        );
        let history = WalFileName::History {
            tli: TimelineId(0x1F),
        };
        assert_eq!(history.segno(), None);
        assert_eq!(history.to_name(seg), "0000001F.history");
    }

    #[test]
    fn magic_to_major() {
        assert_eq!(pg_major_for_wal_magic(0xD101), Some(12));
        assert_eq!(pg_major_for_wal_magic(0xD110), Some(15));
        assert_eq!(pg_major_for_wal_magic(0xD118), Some(18));
        assert_eq!(pg_major_for_wal_magic(0xD098), None);
        assert_eq!(pg_major_for_wal_magic(0xD000), None);
    }

    /// A long header as PostgreSQL 16 would write it for segment `segno`.
    fn header(magic: u16, info: u16, segno: u64, seg_size: u32, blcksz: u32) -> Vec<u8> {
        let mut b = vec![0u8; SEGMENT_HEADER_SIZE];
        b[0..2].copy_from_slice(&magic.to_ne_bytes());
        b[2..4].copy_from_slice(&info.to_ne_bytes());
        b[4..8].copy_from_slice(&2u32.to_ne_bytes());
        b[8..16].copy_from_slice(&(segno * u64::from(seg_size)).to_ne_bytes());
        b[24..32].copy_from_slice(&7_300_000_000_000_000_001u64.to_ne_bytes());
        b[32..36].copy_from_slice(&seg_size.to_ne_bytes());
        b[36..40].copy_from_slice(&blcksz.to_ne_bytes());
        b
    }

    #[test]
    fn parses_a_segment_header() {
        let h = parse_segment_header(&header(0xD113, 0x0006, 7, 16 << 20, 8192)).unwrap();
        assert_eq!(h.pg_major, 16);
        assert_eq!(h.timeline, TimelineId(2));
        assert_eq!(h.page_addr, Lsn(0x0700_0000));
        assert_eq!(h.segno(), 7);
        assert_eq!(h.system_identifier, 7_300_000_000_000_000_001);
        assert_eq!(h.seg_size(), Ok(WalSegSize::DEFAULT));
        assert_eq!(h.wal_block_size, 8192);
    }

    #[test]
    fn segment_header_errors_name_the_problem() {
        let err = |b: &[u8]| parse_segment_header(b).unwrap_err().to_string();
        assert_eq!(
            err(&header(0xD000, 2, 1, 16 << 20, 8192)),
            "invalid WAL magic 0xD000 in segment header: not written by PostgreSQL 12 to 18"
        );
        assert!(err(&header(0xD110, 0x0001, 1, 16 << 20, 8192)).contains("long-header flag"));
        assert!(err(&header(0xD110, 0x0012, 1, 16 << 20, 8192)).contains("unknown flag bits"));
        assert!(err(&header(0xD110, 2, 1, 3 << 20, 8192)).contains("segment size 3145728"));
        assert!(err(&header(0xD110, 2, 1, 16 << 20, 1000)).contains("WAL block size 1000"));
        let mut off_boundary = header(0xD110, 2, 1, 16 << 20, 8192);
        off_boundary[8..16].copy_from_slice(&0x0100_2000u64.to_ne_bytes());
        assert!(err(&off_boundary).contains("page address 0/1002000"));
        assert_eq!(
            err(&[0x10, 0xD1]),
            "WAL segment header is too short: 2 bytes, need at least 40"
        );
    }
}
