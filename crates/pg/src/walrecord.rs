//! WAL records: walk the pages of consecutive WAL segments, reassemble records that span pages
//! and segments, and decode each record's header and block references (PostgreSQL 12 to 18).
//!
//! This is what a changed-block map needs from WAL, and no more: which relation blocks a record
//! touches, its resource manager and info bits, and its main data (for the few records that
//! change storage outside block references). Layouts are those of src/include/access/xlogrecord.h
//! and src/include/access/xlog_internal.h; the checks are those `DecodeXLogRecord`,
//! `XLogReaderValidatePageHeader` and `ValidXLogRecord` (src/backend/access/transam/xlogreader.c)
//! make, so bytes PostgreSQL's own reader would refuse are refused here too, with an error that
//! names the LSN. Nothing here panics on bad bytes: the caller falls back on any error.

use std::ops::ControlFlow;

use crate::bytes::{u16_at, u32_at, u64_at};
use crate::error::FormatError;
use crate::exclude::Fork;
use crate::lsn::Lsn;
use crate::wal::{parse_segment_header, WalSegSize, SEGMENT_HEADER_SIZE};

/// A relation's physical identity (`RelFileNode` in 12 to 15, `RelFileLocator` from 16,
/// src/include/storage/relfilelocator.h): tablespace, database and relfilenode, three `Oid`s.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct RelFileLocator {
    pub spc_oid: u32,
    pub db_oid: u32,
    pub rel_number: u32,
}

/// `DEFAULTTABLESPACE_OID` (src/include/catalog/pg_tablespace.dat): `base/`.
pub const DEFAULT_TABLESPACE_OID: u32 = 1663;
/// `GLOBALTABLESPACE_OID` (src/include/catalog/pg_tablespace.dat): `global/`.
pub const GLOBAL_TABLESPACE_OID: u32 = 1664;

impl RelFileLocator {
    /// The locator of relation file `rel_number` in database directory `db_dir`, as
    /// [`crate::parse_relation_path`] returns it: `base/<db>`, `global` or
    /// `pg_tblspc/<spc>/<version>/<db>` (`GetRelationPath`, src/common/relpath.c).
    pub fn of_db_dir(db_dir: &str, rel_number: u32) -> Option<RelFileLocator> {
        let oid = |s: &str| crate::bytes::canonical_u32(s);
        let parts: Vec<&str> = db_dir.split('/').collect();
        let (spc_oid, db_oid) = match parts.as_slice() {
            ["base", db] => (DEFAULT_TABLESPACE_OID, oid(db)?),
            ["global"] => (GLOBAL_TABLESPACE_OID, 0),
            ["pg_tblspc", spc, _, db] => (oid(spc)?, oid(db)?),
            _ => return None,
        };
        Some(RelFileLocator {
            spc_oid,
            db_oid,
            rel_number,
        })
    }
}

/// Size of a `RelFileNode` / `RelFileLocator` in WAL: three 4-byte `Oid`s.
pub const REL_FILE_LOCATOR_SIZE: usize = 12;

/// How a full-page image is compressed (`bimg_info`, src/include/access/xlogrecord.h).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ImageCompression {
    None,
    /// `BKPIMAGE_IS_COMPRESSED` in 12 to 14, `BKPIMAGE_COMPRESS_PGLZ` from 15.
    Pglz,
    /// `BKPIMAGE_COMPRESS_LZ4`, 15 and later.
    Lz4,
    /// `BKPIMAGE_COMPRESS_ZSTD`, 15 and later.
    Zstd,
}

/// A full-page image carried by a block reference (`XLogRecordBlockImageHeader`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct BlockImage {
    /// Bytes of image data in the record.
    pub length: u16,
    /// Bytes of the page before the hole (the unused middle of the page, left out).
    pub hole_offset: u16,
    /// Length of the hole; 0 when the image has none.
    pub hole_length: u16,
    pub compression: ImageCompression,
    /// `BKPIMAGE_APPLY`: redo restores the page from the image.
    pub apply: bool,
}

/// One block a record touches (`XLogRecordBlockHeader` and what follows it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct BlockRef {
    /// The block reference id, 0 to `XLR_MAX_BLOCK_ID`.
    pub id: u8,
    pub rel: RelFileLocator,
    pub fork: Fork,
    pub block: u32,
    /// `BKPBLOCK_WILL_INIT`: redo initializes the page from scratch.
    pub will_init: bool,
    /// Bytes of rmgr-specific data for this block (`BKPBLOCK_HAS_DATA` when non-zero).
    pub data_length: u16,
    pub image: Option<BlockImage>,
}

/// A decoded WAL record: its header, block references and main data.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct WalRecord {
    /// Where the record starts.
    pub lsn: Lsn,
    /// Where it ends (`EndRecPtr`): the LSN the pages it touched carry.
    pub end: Lsn,
    /// `xl_xid`.
    pub xid: u32,
    /// `xl_prev`: the start of the record before it.
    pub prev: Lsn,
    /// `xl_info`: the high four bits are the rmgr's, the low four generic flags.
    pub info: u8,
    /// `xl_rmid`: the resource manager (`RmgrId`, src/include/access/rmgrlist.h).
    pub rmid: u8,
    /// Block references in increasing id order.
    pub blocks: Vec<BlockRef>,
    /// `XLR_BLOCK_ID_ORIGIN`: the replication origin.
    pub origin: Option<u16>,
    /// `XLR_BLOCK_ID_TOPLEVEL_XID` (14 and later): the top-level transaction of a subtransaction.
    pub toplevel_xid: Option<u32>,
    /// The rmgr's main data.
    pub main_data: Vec<u8>,
}

/// `XLR_RMGR_INFO_MASK` (src/include/access/xlogrecord.h): the rmgr's bits of `xl_info`.
const XLR_RMGR_INFO_MASK: u8 = 0xF0;
/// `XLR_SPECIAL_REL_UPDATE` (src/include/access/xlogrecord.h): the record changes relation files
/// in ways its block references do not show (storage created, truncated, databases copied).
const XLR_SPECIAL_REL_UPDATE: u8 = 0x01;

/// `RM_XLOG_ID` (src/include/access/rmgrlist.h) and `XLOG_SWITCH`
/// (src/include/catalog/pg_control.h): the rest of the segment after this record is unused.
const RM_XLOG_ID: u8 = 0;
const XLOG_SWITCH: u8 = 0x40;

impl WalRecord {
    /// The rmgr's own bits of `xl_info` (the record type within its rmgr).
    pub fn rmgr_info(&self) -> u8 {
        self.info & XLR_RMGR_INFO_MASK
    }

    /// Whether the record changes relation files beyond its block references
    /// (`XLR_SPECIAL_REL_UPDATE`).
    pub fn special_rel_update(&self) -> bool {
        self.info & XLR_SPECIAL_REL_UPDATE != 0
    }

    /// Whether this is `XLOG_SWITCH`: the next record starts in the next segment.
    pub fn is_switch(&self) -> bool {
        self.rmid == RM_XLOG_ID && self.rmgr_info() == XLOG_SWITCH
    }
}

/// What the decoder must know of the cluster that wrote the WAL.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct WalFormat {
    /// The PostgreSQL major version (12 to 18); bit layouts differ between them.
    pub pg_major: u32,
    /// The data page size (`BLCKSZ`), which full-page images are checked against.
    pub block_size: u32,
}

/// `SizeOfXLogRecord` (src/include/access/xlogrecord.h): `xl_tot_len` 4, `xl_xid` 4, `xl_prev`
/// 8, `xl_info` 1, `xl_rmid` 1, 2 bytes of padding, `xl_crc` 4.
pub const RECORD_HEADER_SIZE: usize = 24;
/// `offsetof(XLogRecord, xl_crc)`: the CRC covers the header up to here.
const CRC_OFFSET: usize = 20;

/// `XLR_MAX_BLOCK_ID` and the reserved block ids (src/include/access/xlogrecord.h).
const XLR_MAX_BLOCK_ID: u8 = 32;
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
/// Added in PostgreSQL 14; an invalid block id before.
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;

/// `fork_flags` bits (src/include/access/xlogrecord.h).
const BKPBLOCK_FORK_MASK: u8 = 0x0F;
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_HAS_DATA: u8 = 0x20;
const BKPBLOCK_WILL_INIT: u8 = 0x40;
const BKPBLOCK_SAME_REL: u8 = 0x80;

/// `bimg_info` bits (src/include/access/xlogrecord.h). `BKPIMAGE_HAS_HOLE` is 0x01 in every
/// major; the rest moved in PostgreSQL 15, which added lz4 and zstd.
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
const BKPIMAGE_IS_COMPRESSED_12: u8 = 0x02;
const BKPIMAGE_APPLY_12: u8 = 0x04;
const BKPIMAGE_APPLY_15: u8 = 0x02;
const BKPIMAGE_COMPRESS_PGLZ_15: u8 = 0x04;
const BKPIMAGE_COMPRESS_LZ4_15: u8 = 0x08;
const BKPIMAGE_COMPRESS_ZSTD_15: u8 = 0x10;

/// The fork of a `ForkNumber` (src/include/common/relpath.h: `MAIN_FORKNUM` 0, `FSM_FORKNUM` 1,
/// `VISIBILITYMAP_FORKNUM` 2, `INIT_FORKNUM` 3, the same in 12 to 18).
pub fn fork_from_number(n: u32) -> Option<Fork> {
    match n {
        0 => Some(Fork::Main),
        1 => Some(Fork::Fsm),
        2 => Some(Fork::Vm),
        3 => Some(Fork::Init),
        _ => None,
    }
}

/// A `RelFileNode` / `RelFileLocator` written at `offset` of `bytes`, or None when too short.
pub fn rel_file_locator_at(bytes: &[u8], offset: usize) -> Option<RelFileLocator> {
    Some(RelFileLocator {
        spc_oid: u32_at(bytes, offset)?,
        db_oid: u32_at(bytes, offset.checked_add(4)?)?,
        rel_number: u32_at(bytes, offset.checked_add(8)?)?,
    })
}

/// Decodes one whole record (`bytes` is exactly `xl_tot_len` long) that starts at `lsn` and
/// ends at `end`: checks its CRC, then reads the block references as `DecodeXLogRecord` does.
pub fn decode_record(
    bytes: &[u8],
    lsn: Lsn,
    end: Lsn,
    format: WalFormat,
) -> Result<WalRecord, FormatError> {
    let bad = |reason: String| FormatError::InvalidWalRecord { lsn, reason };
    let header = bytes.get(..RECORD_HEADER_SIZE).ok_or_else(|| {
        bad(format!(
            "{} bytes is shorter than a record header",
            bytes.len()
        ))
    })?;
    let field32 = |offset| u32_at(header, offset).unwrap_or(0);
    let tot_len = field32(0) as usize;
    if tot_len != bytes.len() {
        return Err(bad(format!(
            "xl_tot_len {tot_len} but {} bytes were assembled",
            bytes.len()
        )));
    }
    // ValidXLogRecord: the CRC covers the data after the header, then the header up to xl_crc.
    let stored = field32(CRC_OFFSET);
    let computed = crc32c::crc32c_append(
        crc32c::crc32c(&bytes[RECORD_HEADER_SIZE..]),
        &header[..CRC_OFFSET],
    );
    if stored != computed {
        return Err(bad(format!(
            "incorrect resource manager data checksum: stored 0x{stored:08X}, computed 0x{computed:08X}"
        )));
    }
    let mut record = WalRecord {
        lsn,
        end,
        xid: field32(4),
        prev: Lsn(u64_at(header, 8).unwrap_or(0)),
        info: header[16],
        rmid: header[17],
        blocks: Vec::new(),
        origin: None,
        toplevel_xid: None,
        main_data: Vec::new(),
    };
    let mut r = Cursor {
        bytes,
        pos: RECORD_HEADER_SIZE,
        lsn,
    };
    // Bytes of block data, images and main data the headers announce; they follow the headers.
    let mut data_total: u64 = 0;
    let mut main_len: u64 = 0;
    let mut prev_rel: Option<RelFileLocator> = None;
    while (r.remaining() as u64) > data_total {
        let id = r.u8()?;
        match id {
            XLR_BLOCK_ID_DATA_SHORT => {
                main_len = u64::from(r.u8()?);
                data_total += main_len;
                break;
            }
            XLR_BLOCK_ID_DATA_LONG => {
                main_len = u64::from(r.u32()?);
                data_total += main_len;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => record.origin = Some(r.u16()?),
            XLR_BLOCK_ID_TOPLEVEL_XID if format.pg_major >= 14 => {
                record.toplevel_xid = Some(r.u32()?);
            }
            0..=XLR_MAX_BLOCK_ID => {
                if record.blocks.last().is_some_and(|b| id <= b.id) {
                    return Err(bad(format!("out-of-order block_id {id}")));
                }
                let block = r.block_ref(id, format, &mut prev_rel)?;
                data_total += u64::from(block.data_length);
                data_total += block.image.map_or(0, |i| u64::from(i.length));
                record.blocks.push(block);
            }
            _ => return Err(bad(format!("invalid block_id {id}"))),
        }
    }
    let remaining = r.remaining() as u64;
    if remaining != data_total {
        return Err(bad(format!(
            "its headers announce {data_total} bytes of data but {remaining} follow"
        )));
    }
    // Main data comes last, after every block's image and data.
    record.main_data = bytes[bytes.len() - main_len as usize..].to_vec();
    Ok(record)
}

/// Reads the record header fields in order, failing with the record's LSN when they run out.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    lsn: Lsn,
}

impl Cursor<'_> {
    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let chunk = self
            .bytes
            .get(self.pos..)
            .and_then(|rest| rest.first_chunk::<N>())
            .ok_or(FormatError::InvalidWalRecord {
                lsn: self.lsn,
                reason: "record too short for its block headers".into(),
            })?;
        self.pos += N;
        Ok(*chunk)
    }

    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, FormatError> {
        self.take::<2>().map(u16::from_ne_bytes)
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        self.take::<4>().map(u32::from_ne_bytes)
    }

    /// An `XLogRecordBlockHeader` after its id byte, with its image header, relation and block.
    fn block_ref(
        &mut self,
        id: u8,
        format: WalFormat,
        prev_rel: &mut Option<RelFileLocator>,
    ) -> Result<BlockRef, FormatError> {
        let lsn = self.lsn;
        let bad = |reason: String| FormatError::InvalidWalRecord {
            lsn,
            reason: format!("block {id}: {reason}"),
        };
        let fork_flags = self.u8()?;
        let data_length = self.u16()?;
        let fork_number = fork_flags & BKPBLOCK_FORK_MASK;
        let fork = fork_from_number(u32::from(fork_number))
            .ok_or_else(|| bad(format!("unknown fork number {fork_number}")))?;
        let has_data = fork_flags & BKPBLOCK_HAS_DATA != 0;
        if has_data != (data_length != 0) {
            return Err(bad(format!(
                "BKPBLOCK_HAS_DATA is {has_data} but data_length is {data_length}"
            )));
        }
        let image = if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
            Some(self.image(format, &bad)?)
        } else {
            None
        };
        let rel = if fork_flags & BKPBLOCK_SAME_REL != 0 {
            prev_rel.ok_or_else(|| bad("BKPBLOCK_SAME_REL set but no previous rel".into()))?
        } else {
            let raw = self.take::<REL_FILE_LOCATOR_SIZE>()?;
            let rel =
                rel_file_locator_at(&raw, 0).ok_or_else(|| bad("short relation locator".into()))?;
            *prev_rel = Some(rel);
            rel
        };
        Ok(BlockRef {
            id,
            rel,
            fork,
            block: self.u32()?,
            will_init: fork_flags & BKPBLOCK_WILL_INIT != 0,
            data_length,
            image,
        })
    }

    /// An `XLogRecordBlockImageHeader` (and `XLogRecordBlockCompressHeader` when the image is
    /// compressed and has a hole), with `DecodeXLogRecord`'s consistency checks.
    fn image(
        &mut self,
        format: WalFormat,
        bad: &dyn Fn(String) -> FormatError,
    ) -> Result<BlockImage, FormatError> {
        let length = self.u16()?;
        let hole_offset = self.u16()?;
        let info = self.u8()?;
        let (compression, apply) = if format.pg_major >= 15 {
            let compression = match info
                & (BKPIMAGE_COMPRESS_PGLZ_15 | BKPIMAGE_COMPRESS_LZ4_15 | BKPIMAGE_COMPRESS_ZSTD_15)
            {
                0 => ImageCompression::None,
                BKPIMAGE_COMPRESS_PGLZ_15 => ImageCompression::Pglz,
                BKPIMAGE_COMPRESS_LZ4_15 => ImageCompression::Lz4,
                BKPIMAGE_COMPRESS_ZSTD_15 => ImageCompression::Zstd,
                _ => {
                    return Err(bad(format!(
                        "bimg_info 0x{info:02X} names two compressions"
                    )))
                }
            };
            (compression, info & BKPIMAGE_APPLY_15 != 0)
        } else {
            let compression = if info & BKPIMAGE_IS_COMPRESSED_12 != 0 {
                ImageCompression::Pglz
            } else {
                ImageCompression::None
            };
            (compression, info & BKPIMAGE_APPLY_12 != 0)
        };
        let compressed = compression != ImageCompression::None;
        let has_hole = info & BKPIMAGE_HAS_HOLE != 0;
        let block_size = format.block_size;
        let hole_length = if has_hole && compressed {
            self.u16()?
        } else if has_hole {
            u16::try_from(block_size.saturating_sub(u32::from(length))).unwrap_or(u16::MAX)
        } else {
            0
        };
        let whole = u32::from(length) == block_size;
        if has_hole && (hole_offset == 0 || hole_length == 0 || whole) {
            return Err(bad(format!(
                "BKPIMAGE_HAS_HOLE set, but hole offset {hole_offset} length {hole_length} block image length {length}"
            )));
        }
        if !has_hole && (hole_offset != 0 || hole_length != 0) {
            return Err(bad(format!(
                "BKPIMAGE_HAS_HOLE not set, but hole offset {hole_offset} length {hole_length}"
            )));
        }
        if compressed && whole {
            return Err(bad(format!(
                "BKPIMAGE_COMPRESSED set, but block image length {length}"
            )));
        }
        if !has_hole && !compressed && !whole {
            return Err(bad(format!(
                "neither BKPIMAGE_HAS_HOLE nor BKPIMAGE_COMPRESSED set, but block image length is {length}"
            )));
        }
        if u32::from(hole_offset) + u32::from(hole_length) > block_size
            || u32::from(length) > block_size
        {
            return Err(bad(format!(
                "image of {length} bytes with a hole of {hole_length} at {hole_offset} does not fit a {block_size}-byte page"
            )));
        }
        Ok(BlockImage {
            length,
            hole_offset,
            hole_length,
            compression,
            apply,
        })
    }
}

/// `SizeOfXLogShortPHD` (src/include/access/xlog_internal.h): `xlp_magic` 2, `xlp_info` 2,
/// `xlp_tli` 4, `xlp_pageaddr` 8, `xlp_rem_len` 4, MAXALIGNed to 24.
pub const SHORT_PAGE_HEADER_SIZE: usize = 24;

/// `xlp_info` bits (src/include/access/xlog_internal.h).
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;
/// Set on the page where an incomplete record was abandoned (crash recovery found its tail
/// missing) and new WAL written over the space its continuation would have used.
const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
const XLP_ALL_FLAGS: u16 = 0x000F;

/// Records start at `MAXALIGN`ed positions: 8 bytes on every platform PostgreSQL supports.
fn max_align(n: u64) -> u64 {
    n.div_ceil(8).saturating_mul(8)
}

/// Decodes the records of consecutive WAL segments of one cluster, fed in order. A record may
/// start in one segment and end in a later one; the stream carries it over. The first segment
/// may open with the tail of a record begun earlier: that tail is skipped, and
/// [`WalStream::first_record`] says where the first whole record starts.
#[derive(Debug)]
pub struct WalStream {
    block_size: u32,
    layout: Option<Layout>,
    /// The segment number the next push must hold.
    next_segno: Option<u64>,
    /// A record begun but not finished.
    pending: Option<Pending>,
    /// The start of the last record decoded, which the next one's `xl_prev` must name.
    prev: Option<Lsn>,
    /// Where the first whole record starts, once found.
    first_record: Option<Lsn>,
    /// Pages before this LSN hold nothing (the rest of a segment after `XLOG_SWITCH`).
    skip_until: Lsn,
}

/// What the first segment's long header said; every later page must agree.
#[derive(Clone, Copy, Debug)]
struct Layout {
    magic: u16,
    pg_major: u32,
    system_identifier: u64,
    seg: WalSegSize,
    page_size: usize,
}

#[derive(Debug)]
struct Pending {
    start: Lsn,
    tot_len: usize,
    bytes: Vec<u8>,
}

/// Where one segment's walk stopped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SegmentEnd {
    /// Every page was read; the next segment continues the stream.
    Read,
    /// The callback asked to stop.
    Stopped,
}

impl WalStream {
    /// A stream for a cluster whose data pages are `block_size` bytes.
    pub fn new(block_size: u32) -> WalStream {
        WalStream {
            block_size,
            layout: None,
            next_segno: None,
            pending: None,
            prev: None,
            first_record: None,
            skip_until: Lsn::INVALID,
        }
    }

    /// Where the first whole record of the stream starts (after the tail of a record begun
    /// before the first segment); None until one is found.
    pub fn first_record(&self) -> Option<Lsn> {
        self.first_record
    }

    /// The PostgreSQL major version whose WAL this is, once a segment has been read.
    pub fn pg_major(&self) -> Option<u32> {
        self.layout.map(|l| l.pg_major)
    }

    /// Walks one whole segment, the one after the last pushed, handing each record completed in
    /// it to `on_record` (which may stop the walk). A record not finished at the segment's end
    /// waits for the next push.
    pub fn push_segment(
        &mut self,
        bytes: &[u8],
        on_record: &mut dyn FnMut(WalRecord) -> ControlFlow<()>,
    ) -> Result<SegmentEnd, FormatError> {
        let header = parse_segment_header(bytes)?;
        let seg = header.seg_size()?;
        let segno = header.segno();
        let start = header.page_addr;
        let page_fault = |reason: String| FormatError::InvalidWalPage { lsn: start, reason };
        let layout = *self.layout.get_or_insert(Layout {
            magic: header.magic,
            pg_major: header.pg_major,
            system_identifier: header.system_identifier,
            seg,
            page_size: header.wal_block_size as usize,
        });
        if header.magic != layout.magic
            || header.system_identifier != layout.system_identifier
            || seg != layout.seg
            || header.wal_block_size as usize != layout.page_size
        {
            return Err(page_fault(
                "segment written by another cluster or version than the one before".into(),
            ));
        }
        if bytes.len() as u64 != seg.bytes() {
            return Err(page_fault(format!(
                "segment is {} bytes, its header says {}",
                bytes.len(),
                seg.bytes()
            )));
        }
        if let Some(expected) = self.next_segno {
            if segno != expected {
                return Err(page_fault(format!(
                    "segment {segno:X} does not follow segment {:X}",
                    expected.wrapping_sub(1)
                )));
            }
        }
        self.next_segno = Some(segno.saturating_add(1));
        for (i, page) in bytes.chunks_exact(layout.page_size).enumerate() {
            let addr = Lsn(start.0 + (i * layout.page_size) as u64);
            if addr < self.skip_until {
                continue;
            }
            if self.walk_page(page, addr, i == 0, layout, on_record)? == SegmentEnd::Stopped {
                return Ok(SegmentEnd::Stopped);
            }
        }
        Ok(SegmentEnd::Read)
    }

    /// Checks one page's header, finishes a record carried over from the page before, then
    /// decodes every record that starts on the page.
    fn walk_page(
        &mut self,
        page: &[u8],
        addr: Lsn,
        first_in_segment: bool,
        layout: Layout,
        on_record: &mut dyn FnMut(WalRecord) -> ControlFlow<()>,
    ) -> Result<SegmentEnd, FormatError> {
        let page_fault = |reason: String| FormatError::InvalidWalPage { lsn: addr, reason };
        let magic = u16_at(page, 0).unwrap_or(0);
        let info = u16_at(page, 2).unwrap_or(0);
        let page_addr = Lsn(u64_at(page, 8).unwrap_or(0));
        let rem_len = u32_at(page, 16).unwrap_or(0) as usize;
        if magic != layout.magic {
            return Err(page_fault(format!(
                "magic 0x{magic:04X}, the segment's is 0x{:04X}",
                layout.magic
            )));
        }
        if info & !XLP_ALL_FLAGS != 0 {
            return Err(page_fault(format!(
                "xlp_info 0x{info:04X} has unknown flag bits"
            )));
        }
        if page_addr != addr {
            return Err(page_fault(format!(
                "page address {page_addr} is not the page's"
            )));
        }
        let long = info & XLP_LONG_HEADER != 0;
        if long != first_in_segment {
            return Err(page_fault(format!(
                "long header flag is {long} on a page {} the first of its segment",
                if first_in_segment {
                    "that is"
                } else {
                    "that is not"
                }
            )));
        }
        let header_size = if long {
            SEGMENT_HEADER_SIZE
        } else {
            SHORT_PAGE_HEADER_SIZE
        };
        let page_len = page.len();
        let mut off = header_size;
        let contrecord = info & XLP_FIRST_IS_CONTRECORD != 0;

        if let Some(mut pending) = self.pending.take() {
            if !contrecord {
                if info & XLP_FIRST_IS_OVERWRITE_CONTRECORD == 0 {
                    return Err(page_fault(format!(
                        "no continuation of the record at {} on the page after it",
                        pending.start
                    )));
                }
                // The record was never finished: recovery wrote new WAL where its tail would
                // be, beginning with XLOG_OVERWRITE_CONTRECORD. Nothing was replayed from it.
                self.prev = None;
            } else {
                let missing = pending.tot_len - pending.bytes.len();
                if rem_len != missing {
                    return Err(page_fault(format!(
                        "invalid contrecord length {rem_len}, the record at {} needs {missing} more bytes",
                        pending.start
                    )));
                }
                let n = missing.min(page_len - off);
                pending.bytes.extend_from_slice(&page[off..off + n]);
                off += n;
                if pending.bytes.len() < pending.tot_len {
                    self.pending = Some(pending);
                    return Ok(SegmentEnd::Read);
                }
                let end = Lsn(addr.0 + off as u64);
                if self.finish(pending, end, layout, on_record)? == SegmentEnd::Stopped {
                    return Ok(SegmentEnd::Stopped);
                }
                if self.skip_until > end {
                    // XLOG_SWITCH: the rest of the segment is unused.
                    return Ok(SegmentEnd::Read);
                }
                off = max_align(off as u64) as usize;
            }
        } else if contrecord {
            if self.first_record.is_some() {
                return Err(page_fault(
                    "page continues a record, but no record was left unfinished".into(),
                ));
            }
            // The stream starts inside a record begun in an earlier segment: skip its tail.
            let available = page_len - off;
            if rem_len > available {
                return Ok(SegmentEnd::Read);
            }
            off = max_align((off + rem_len) as u64) as usize;
        }

        while off < page_len {
            let lsn = Lsn(addr.0 + off as u64);
            self.first_record.get_or_insert(lsn);
            let tot_len = u32_at(page, off).unwrap_or(0) as usize;
            if tot_len == 0 {
                return Err(FormatError::EndOfWal { lsn });
            }
            if tot_len < RECORD_HEADER_SIZE {
                return Err(FormatError::InvalidWalRecord {
                    lsn,
                    reason: format!(
                        "invalid record length {tot_len}: expected at least {RECORD_HEADER_SIZE}"
                    ),
                });
            }
            let n = tot_len.min(page_len - off);
            let pending = Pending {
                start: lsn,
                tot_len,
                bytes: page[off..off + n].to_vec(),
            };
            off += n;
            if n < tot_len {
                self.pending = Some(pending);
                break;
            }
            let end = Lsn(addr.0 + off as u64);
            if self.finish(pending, end, layout, on_record)? == SegmentEnd::Stopped {
                return Ok(SegmentEnd::Stopped);
            }
            if self.skip_until > end {
                // XLOG_SWITCH: the rest of the segment is unused.
                break;
            }
            off = max_align(off as u64) as usize;
        }
        Ok(SegmentEnd::Read)
    }

    /// Decodes a reassembled record, checks that it follows the one before, and hands it on.
    fn finish(
        &mut self,
        pending: Pending,
        end: Lsn,
        layout: Layout,
        on_record: &mut dyn FnMut(WalRecord) -> ControlFlow<()>,
    ) -> Result<SegmentEnd, FormatError> {
        let format = WalFormat {
            pg_major: layout.pg_major,
            block_size: self.block_size,
        };
        let record = decode_record(&pending.bytes, pending.start, end, format)?;
        if let Some(prev) = self.prev {
            if record.prev != prev {
                return Err(FormatError::InvalidWalRecord {
                    lsn: record.lsn,
                    reason: format!(
                        "xl_prev {} is not the record before it, at {prev}",
                        record.prev
                    ),
                });
            }
        }
        self.prev = Some(record.lsn);
        if record.is_switch() {
            // The next record starts at the next segment boundary (after the segment the switch
            // record ends in); the pages between are padding.
            let seg = layout.seg.bytes();
            self.skip_until = Lsn(end.0.saturating_sub(1) / seg * seg + seg);
        }
        Ok(match on_record(record) {
            ControlFlow::Continue(()) => SegmentEnd::Read,
            ControlFlow::Break(()) => SegmentEnd::Stopped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PAGE: usize = 8192;
    const SEG: usize = 1 << 20;
    const SYSID: u64 = 7_300_000_000_000_000_001;
    const REL_A: RelFileLocator = RelFileLocator {
        spc_oid: 1663,
        db_oid: 5,
        rel_number: 16384,
    };
    const REL_B: RelFileLocator = RelFileLocator {
        spc_oid: 16400,
        db_oid: 16401,
        rel_number: 16402,
    };

    fn format(pg_major: u32) -> WalFormat {
        WalFormat {
            pg_major,
            block_size: 8192,
        }
    }

    fn magic(pg_major: u32) -> u16 {
        (0xD000..=0xD1FF)
            .find(|&m| crate::wal::pg_major_for_wal_magic(m) == Some(pg_major))
            .unwrap()
    }

    /// A whole record: header with `prev`, `body` after it, and the CRC PostgreSQL computes.
    fn record(rmid: u8, info: u8, prev: u64, body: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; RECORD_HEADER_SIZE];
        r[0..4].copy_from_slice(&((RECORD_HEADER_SIZE + body.len()) as u32).to_ne_bytes());
        r[4..8].copy_from_slice(&742u32.to_ne_bytes());
        r[8..16].copy_from_slice(&prev.to_ne_bytes());
        r[16] = info;
        r[17] = rmid;
        r.extend_from_slice(body);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&r[RECORD_HEADER_SIZE..]), &r[..20]);
        r[20..24].copy_from_slice(&crc.to_ne_bytes());
        r
    }

    fn rel_bytes(rel: RelFileLocator) -> Vec<u8> {
        [rel.spc_oid, rel.db_oid, rel.rel_number]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect()
    }

    /// Block header bytes: id, fork_flags, data_length, optional image header, rel, block.
    fn block_header(
        id: u8,
        fork_flags: u8,
        data_length: u16,
        image: Option<(u16, u16, u8, Option<u16>)>,
        rel: Option<RelFileLocator>,
        block: u32,
    ) -> Vec<u8> {
        let mut b = vec![id, fork_flags];
        b.extend_from_slice(&data_length.to_ne_bytes());
        if let Some((len, hole_offset, info, hole_length)) = image {
            b.extend_from_slice(&len.to_ne_bytes());
            b.extend_from_slice(&hole_offset.to_ne_bytes());
            b.push(info);
            if let Some(h) = hole_length {
                b.extend_from_slice(&h.to_ne_bytes());
            }
        }
        if let Some(rel) = rel {
            b.extend_from_slice(&rel_bytes(rel));
        }
        b.extend_from_slice(&block.to_ne_bytes());
        b
    }

    /// The header of a block reference to one block of `rel`, without data or image.
    fn touch(rel: RelFileLocator, block: u32) -> Vec<u8> {
        block_header(0, 0, 0, None, Some(rel), block)
    }

    /// Records laid out in WAL as PostgreSQL writes them: pages with short headers, a long one
    /// at each segment start, records MAXALIGNed, continuations flagged with their remaining
    /// length. Returns the segments (starting at segment `first`) and each record's start.
    fn lay_out(
        pg_major: u32,
        first: u64,
        n_segs: usize,
        records: &[(u8, u8, Vec<u8>)],
    ) -> (Vec<Vec<u8>>, Vec<Lsn>) {
        let base = first * SEG as u64;
        let mut wal = vec![0u8; n_segs * SEG];
        let header = |wal: &mut Vec<u8>, at: usize, rem: usize| {
            let long = at.is_multiple_of(SEG);
            let mut info: u16 = if rem > 0 { XLP_FIRST_IS_CONTRECORD } else { 0 };
            if long {
                info |= XLP_LONG_HEADER;
            }
            let h = &mut wal[at..at + 40];
            h[0..2].copy_from_slice(&magic(pg_major).to_ne_bytes());
            h[2..4].copy_from_slice(&info.to_ne_bytes());
            h[4..8].copy_from_slice(&1u32.to_ne_bytes());
            h[8..16].copy_from_slice(&(base + at as u64).to_ne_bytes());
            h[16..20].copy_from_slice(&(rem as u32).to_ne_bytes());
            if long {
                h[24..32].copy_from_slice(&SYSID.to_ne_bytes());
                h[32..36].copy_from_slice(&(SEG as u32).to_ne_bytes());
                h[36..40].copy_from_slice(&(PAGE as u32).to_ne_bytes());
                40
            } else {
                24
            }
        };
        for at in (0..wal.len()).step_by(PAGE) {
            header(&mut wal, at, 0);
        }
        let mut pos = 0usize;
        let mut prev = 0u64;
        let mut starts = Vec::new();
        for (rmid, info, body) in records {
            if pos.is_multiple_of(PAGE) {
                pos += header(&mut wal, pos, 0);
            }
            let start = base + pos as u64;
            let bytes = record(*rmid, *info, prev, body);
            let mut i = 0;
            while i < bytes.len() {
                if pos.is_multiple_of(PAGE) {
                    pos += header(&mut wal, pos, bytes.len() - i);
                }
                let n = (bytes.len() - i).min(PAGE - pos % PAGE);
                wal[pos..pos + n].copy_from_slice(&bytes[i..i + n]);
                pos += n;
                i += n;
            }
            starts.push(Lsn(start));
            prev = start;
            pos = max_align(pos as u64) as usize;
            if *rmid == RM_XLOG_ID && info & 0xF0 == XLOG_SWITCH {
                pos = pos.div_ceil(SEG) * SEG;
            }
        }
        (wal.chunks(SEG).map(<[u8]>::to_vec).collect(), starts)
    }

    /// Every record of `segments`, or the first error.
    fn read_all(segments: &[Vec<u8>]) -> (Vec<WalRecord>, Result<(), FormatError>) {
        let mut stream = WalStream::new(8192);
        let mut out = Vec::new();
        for s in segments {
            if let Err(e) = stream.push_segment(s, &mut |r| {
                out.push(r);
                ControlFlow::Continue(())
            }) {
                return (out, Err(e));
            }
        }
        (out, Ok(()))
    }

    #[test]
    fn decodes_block_references_images_and_main_data() {
        for pg_major in 12..=18 {
            let mut body = Vec::new();
            // Block 0: image with a hole (uncompressed: hole length is what is missing), data.
            body.extend(block_header(
                0,
                0x10 | 0x20,
                3,
                Some((8000, 100, 0x01, None)),
                Some(REL_A),
                7,
            ));
            // Block 1: same relation, visibility map, will init, no data.
            body.extend(block_header(1, 0x80 | 0x40 | 2, 0, None, None, 0));
            // Block 3: another relation, a compressed image with a hole (compress header).
            let compressed = if pg_major >= 15 {
                0x01 | 0x08
            } else {
                0x01 | 0x02
            };
            body.extend(block_header(
                3,
                0x10,
                0,
                Some((500, 200, compressed, Some(300))),
                Some(REL_B),
                4_000_000,
            ));
            body.extend([253, 9, 0]); // origin 9
            if pg_major >= 14 {
                body.extend([252, 1, 2, 0, 0]); // top-level xid 513
            }
            body.extend([255, 5]); // main data, short form
            body.extend(vec![0u8; 8000 + 3 + 500]);
            body.extend(b"hello");
            let bytes = record(10, 0x80, 0x1000, &body);
            let lsn = Lsn(0x2000);
            let end = Lsn(0x2000 + bytes.len() as u64);
            let r = decode_record(&bytes, lsn, end, format(pg_major)).unwrap();
            assert_eq!(
                (r.rmid, r.info, r.xid, r.prev),
                (10, 0x80, 742, Lsn(0x1000))
            );
            assert_eq!(r.end, end);
            assert_eq!(r.origin, Some(9));
            assert_eq!(r.toplevel_xid, (pg_major >= 14).then_some(513));
            assert_eq!(r.main_data, b"hello");
            let ids: Vec<_> = r
                .blocks
                .iter()
                .map(|b| (b.id, b.rel, b.fork, b.block))
                .collect();
            assert_eq!(
                ids,
                [
                    (0, REL_A, Fork::Main, 7),
                    (1, REL_A, Fork::Vm, 0),
                    (3, REL_B, Fork::Main, 4_000_000)
                ]
            );
            let img0 = r.blocks[0].image.unwrap();
            assert_eq!((img0.hole_offset, img0.hole_length), (100, 192));
            assert_eq!(img0.compression, ImageCompression::None);
            assert!(r.blocks[1].will_init && r.blocks[1].image.is_none());
            let img3 = r.blocks[3 - 1].image.unwrap();
            assert_eq!(img3.hole_length, 300);
            let want = if pg_major >= 15 {
                ImageCompression::Lz4
            } else {
                ImageCompression::Pglz
            };
            assert_eq!(img3.compression, want, "PostgreSQL {pg_major}");
        }
    }

    #[test]
    fn locators_of_database_directories() {
        let at = |dir| RelFileLocator::of_db_dir(dir, 9).map(|r| (r.spc_oid, r.db_oid));
        assert_eq!(at("base/5"), Some((1663, 5)));
        assert_eq!(at("global"), Some((1664, 0)));
        assert_eq!(
            at("pg_tblspc/16400/PG_15_202209061/16401"),
            Some((16400, 16401))
        );
        assert_eq!(at("base"), None);
        assert_eq!(at("base/05"), None);
    }

    #[test]
    fn bimg_info_bits_moved_in_15() {
        // 0x05 is HAS_HOLE | APPLY before 15, HAS_HOLE | COMPRESS_PGLZ from 15 (which then needs
        // a compress header): the same bytes decode differently, as PostgreSQL's readers do.
        let mut body = block_header(0, 0x10, 0, Some((8000, 100, 0x05, None)), Some(REL_A), 1);
        body.extend(vec![0u8; 8000]);
        let bytes = record(10, 0, 0, &body);
        let r = decode_record(&bytes, Lsn(8), Lsn(9), format(14)).unwrap();
        let img = r.blocks[0].image.unwrap();
        assert!(img.apply && img.compression == ImageCompression::None);
        assert!(decode_record(&bytes, Lsn(8), Lsn(9), format(15)).is_err());
    }

    #[test]
    fn refusals_name_the_lsn() {
        let err = |body: &[u8], major: u32| {
            let bytes = record(10, 0, 0, body);
            decode_record(
                &bytes,
                Lsn(0x1_0000_0028),
                Lsn(0x1_0000_0100),
                format(major),
            )
            .unwrap_err()
            .to_string()
        };
        assert_eq!(
            err(&[252, 1, 0, 0, 0], 13),
            "invalid WAL record at 1/28: invalid block_id 252"
        );
        let mut two = block_header(1, 0, 0, None, Some(REL_A), 1);
        two.extend(block_header(0, 0, 0, None, Some(REL_A), 2));
        assert!(err(&two, 15).contains("out-of-order block_id 0"));
        assert!(err(&block_header(0, 0x80, 0, None, None, 1), 15).contains("SAME_REL"));
        assert!(err(&block_header(0, 0x20, 0, None, Some(REL_A), 1), 15).contains("HAS_DATA"));
        assert!(err(&block_header(0, 0x04, 0, None, Some(REL_A), 1), 15).contains("fork number 4"));
        // Announces 4 bytes of block data that are not there.
        assert!(err(&block_header(0, 0x20, 4, None, Some(REL_A), 1), 15).contains("announce 4"));
        // A flipped bit is caught by the CRC.
        let mut bytes = record(10, 0, 0, &touch(REL_A, 1));
        bytes[30] ^= 1;
        let e = decode_record(&bytes, Lsn(0x28), Lsn(0x50), format(15)).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("invalid WAL record at 0/28: incorrect resource manager data checksum"));
    }

    #[test]
    fn records_span_pages_and_segments() {
        // Records of growing size, some longer than a page, until well into a second segment.
        let records: Vec<_> = (0..300u32)
            .map(|i| {
                let mut body = touch(REL_A, i);
                body.extend([254]);
                let main = (i as usize * 97) % 20_000;
                body.extend((main as u32).to_ne_bytes());
                body.extend(vec![i as u8; main]);
                (10u8, 0u8, body)
            })
            .collect();
        let (segments, starts) = lay_out(15, 3, 4, &records);
        assert!(
            starts.last().unwrap().0 > 4 * SEG as u64,
            "reaches the second segment"
        );
        let (got, end) = read_all(&segments);
        assert!(
            matches!(end, Err(FormatError::EndOfWal { .. })),
            "ends where the zeros start: {end:?}"
        );
        assert_eq!(got.len(), records.len());
        for (i, r) in got.iter().enumerate() {
            assert_eq!(r.lsn, starts[i]);
            assert_eq!(r.blocks[0].block, i as u32);
            assert_eq!(r.main_data.len(), (i * 97) % 20_000);
        }
        // Read from the second segment alone: the record spanning into it is skipped.
        let (tail, _) = read_all(&segments[1..]);
        let first = got.iter().position(|r| r.lsn.0 >= 4 * SEG as u64).unwrap();
        assert_eq!(tail[0].lsn, got[first].lsn);
        assert!(
            got[first - 1].end.0 > 4 * SEG as u64,
            "one record spans the segments"
        );
        // Segments must come in order.
        let mut stream = WalStream::new(8192);
        stream
            .push_segment(&segments[1], &mut |_| ControlFlow::Continue(()))
            .ok();
        let e = stream
            .push_segment(&segments[0], &mut |_| ControlFlow::Continue(()))
            .unwrap_err();
        assert!(e.to_string().contains("does not follow segment 4"), "{e}");
    }

    #[test]
    fn a_switch_skips_the_rest_of_its_segment() {
        let records = vec![
            (10u8, 0u8, touch(REL_A, 1)),
            (RM_XLOG_ID, XLOG_SWITCH, Vec::new()),
            (10, 0, touch(REL_B, 2)),
            (RM_XLOG_ID, XLOG_SWITCH, Vec::new()),
        ];
        let (segments, starts) = lay_out(17, 8, 3, &records);
        assert_eq!(starts[2].0, 9 * SEG as u64 + 40);
        let (got, end) = read_all(&segments);
        assert!(matches!(end, Err(FormatError::EndOfWal { lsn }) if lsn.0 == 10 * SEG as u64 + 40));
        let blocks: Vec<_> = got
            .iter()
            .flat_map(|r| r.blocks.iter().map(|b| b.block))
            .collect();
        assert_eq!(blocks, [1, 2]);
        assert!(got[1].is_switch());
    }

    #[test]
    fn damage_in_a_stream_is_an_error_naming_the_lsn() {
        let records: Vec<_> = (0..500).map(|i| (10u8, 0u8, touch(REL_A, i))).collect();
        let (mut segments, starts) = lay_out(16, 1, 1, &records);
        let at = (starts[20].0 as usize % SEG) + 30;
        segments[0][at] ^= 0x40;
        let (got, end) = read_all(&segments);
        assert_eq!(got.len(), 20);
        let e = end.unwrap_err().to_string();
        assert!(e.contains(&format!("at {}", starts[20])), "{e}");
        // A page address from another place (a recycled segment's old page).
        let (mut segments, _) = lay_out(16, 1, 1, &records);
        segments[0][PAGE + 8] ^= 1;
        let e = read_all(&segments).1.unwrap_err().to_string();
        assert!(
            e.starts_with("invalid WAL page at 0/102000: page address"),
            "{e}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Bytes with a valid CRC and length reach the block-header decoding: never a panic.
        #[test]
        fn random_record_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..400), major in 12u32..=18) {
            let bytes = record(10, 0, 0, &body);
            let _ = decode_record(&bytes, Lsn(0x28), Lsn(0x28), format(major));
            let _ = decode_record(&body, Lsn(0x28), Lsn(0x28), format(major));
        }

        /// A real-looking stream with bytes overwritten anywhere: an error or records, never a panic.
        #[test]
        fn damaged_segments_never_panic(hits in proptest::collection::vec((0usize..2 * SEG, any::<u8>()), 1..20)) {
            let records: Vec<_> = (0..40u32).map(|i| {
                let mut body = touch(REL_A, i);
                body.extend([254]);
                body.extend(((i * 3001) % 9000).to_ne_bytes());
                body.extend(vec![1u8; ((i * 3001) % 9000) as usize]);
                (10u8, 0u8, body)
            }).collect();
            let (mut segments, _) = lay_out(15, 2, 2, &records);
            for (at, v) in hits {
                segments[at / SEG][at % SEG] = v;
            }
            let _ = read_all(&segments);
        }
    }
}
