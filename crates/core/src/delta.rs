//! The page-delta object format: the pages of one relation file that changed since the parent
//! backup, plus the file's length in blocks, as stored by diff and incr backups.
//!
//! A delta is a raw byte stream, stored like every other repository object inside an lz4 frame
//! written by `CompressWriter` (so `FileRecord.size` and `FileRecord.crc32c` of a page-delta
//! record are the length and CRC-32C of this raw stream, and validation checks it like any
//! object). All integers are little-endian.
//!
//! ```text
//! header   16 bytes   magic "PGKDELTA", format version u32 (2), block size u32
//! records  block number u32 (within this file), body length u32, then
//!            body length == block size: the page as is;
//!            body length <  block size: CRC-32C u32 of the page, then the page lz4-compressed
//!                                       with the parent chain's copy of the same block as
//!                                       dictionary ("based" page);
//! trailer  12 bytes   end mark u32 0xFFFFFFFF, page count u32 (n), file length in blocks u32
//! ```
//!
//! A page that changed in a few places (a tuple's xmax, one new index entry and the line pointers
//! it shifted) is mostly a copy of its old self, so a based page costs tens or hundreds of bytes
//! instead of a block: this is what makes an incremental after scattered updates small. Decoding
//! it needs the very bytes the backup used as dictionary, which restore has at hand (it lays the
//! deltas of a chain over the older content in order); the CRC-32C of the decoded page proves it.
//!
//! Version 1 (every record the block number and the page as is) is still read.
//!
//! Block numbers strictly increase and are below the file length; nothing follows the trailer.
//! The reader checks all of it and reports damage as a [`DeltaError`], never a panic.

use std::io::{self, ErrorKind, Read, Write};

use lz4_flex::block::{
    compress_into_with_dict, decompress_into_with_dict, get_maximum_output_size,
};

/// First bytes of every page delta.
pub const MAGIC: [u8; 8] = *b"PGKDELTA";
/// Format version this build writes.
pub const VERSION: u32 = 2;
/// Bytes before the first record.
pub const HEADER_LEN: u64 = 16;
/// Bytes of the trailer.
pub const TRAILER_LEN: u64 = 12;
/// Block number that marks the trailer; never a real block (relation files are shorter).
const END_MARK: u32 = u32::MAX;
/// A based page is kept only when it saves at least this much over the page as is.
const MIN_SAVING: usize = 64;

/// What is wrong with a page delta being read.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("not a pgkeep page delta (bad magic)")]
    BadMagic,
    #[error("page delta format version {0} is not supported: this pgkeep reads versions 1 and {VERSION}")]
    Version(u32),
    #[error("page delta holds {found}-byte pages, expected {expected}")]
    BlockSize { found: u32, expected: usize },
    #[error("page delta is truncated")]
    Truncated,
    #[error("page delta block {block} follows block {after}: blocks must increase")]
    Order { block: u32, after: u32 },
    #[error("page delta holds block {block} of a file {n_blocks} blocks long")]
    BeyondEnd { block: u32, n_blocks: u32 },
    #[error("page delta trailer counts {counted} pages, the delta holds {found}")]
    Count { counted: u32, found: u32 },
    #[error("page delta block {block} has a body of {len} bytes, more than a page")]
    BodyLength { block: u32, len: u32 },
    #[error("page delta block {block} does not decode against the older copy of that block")]
    Decode { block: u32 },
    #[error("page delta block {block} decodes to a page with the wrong CRC-32C")]
    PageCrc { block: u32 },
    #[error("bytes after the end of the page delta")]
    TrailingBytes,
    #[error(transparent)]
    Io(io::Error),
}

impl From<io::Error> for DeltaError {
    fn from(e: io::Error) -> Self {
        if e.kind() == ErrorKind::UnexpectedEof {
            DeltaError::Truncated
        } else {
            DeltaError::Io(e)
        }
    }
}

/// Writes a page delta into `inner`: header now, pages in increasing block order, trailer on
/// [`DeltaWriter::finish`].
pub struct DeltaWriter<W: Write> {
    inner: W,
    block_size: usize,
    pages: u32,
    based: u32,
    last: Option<u32>,
    /// Compressed body, then the page decoded back from it.
    packed: Vec<u8>,
    check: Vec<u8>,
}

impl<W: Write> DeltaWriter<W> {
    pub fn new(mut inner: W, block_size: usize) -> io::Result<Self> {
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(block_size as u32).to_le_bytes());
        inner.write_all(&header)?;
        Ok(DeltaWriter {
            inner,
            block_size,
            pages: 0,
            based: 0,
            last: None,
            packed: vec![0; get_maximum_output_size(block_size)],
            check: vec![0; block_size],
        })
    }

    /// Add block `block`; `page` must be one block long and blocks must come in increasing order.
    /// `base` is the parent chain's copy of the block, when it has one: the page is then stored
    /// as its difference from it if that is smaller.
    pub fn page(&mut self, block: u32, page: &[u8], base: Option<&[u8]>) -> io::Result<()> {
        if page.len() != self.block_size
            || base.is_some_and(|b| b.len() != self.block_size)
            || block == END_MARK
            || self.last.is_some_and(|l| block <= l)
        {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "page delta: block {block} of {} bytes after {:?}",
                    page.len(),
                    self.last
                ),
            ));
        }
        let packed = match base {
            Some(base) => self.based_body(page, base)?,
            None => None,
        };
        match packed {
            Some(n) => {
                let mut head = [0u8; 12];
                head[..4].copy_from_slice(&block.to_le_bytes());
                head[4..8].copy_from_slice(&(n as u32).to_le_bytes());
                head[8..].copy_from_slice(&crc32c::crc32c(page).to_le_bytes());
                self.inner.write_all(&head)?;
                self.inner.write_all(&self.packed[..n])?;
                self.based += 1;
            }
            None => {
                let mut head = [0u8; 8];
                head[..4].copy_from_slice(&block.to_le_bytes());
                head[4..].copy_from_slice(&(self.block_size as u32).to_le_bytes());
                self.inner.write_all(&head)?;
                self.inner.write_all(page)?;
            }
        }
        self.pages += 1;
        self.last = Some(block);
        Ok(())
    }

    /// Compress `page` against `base` into `self.packed`; the length if worth keeping. The
    /// body is decoded back and compared before it is used: restore must get this very page.
    fn based_body(&mut self, page: &[u8], base: &[u8]) -> io::Result<Option<usize>> {
        let n = compress_into_with_dict(page, &mut self.packed, base).map_err(io::Error::other)?;
        if n + MIN_SAVING > self.block_size {
            return Ok(None);
        }
        let round_trip = decompress_into_with_dict(&self.packed[..n], &mut self.check, base);
        if round_trip.ok() != Some(self.block_size) || self.check != page {
            return Ok(None);
        }
        Ok(Some(n))
    }

    /// Pages written so far.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Pages written so far as their difference from the parent chain's copy.
    pub fn based_pages(&self) -> u32 {
        self.based
    }

    /// Write the trailer for a file `n_blocks` long and hand back the inner writer.
    pub fn finish(mut self, n_blocks: u32) -> io::Result<W> {
        if self.last.is_some_and(|l| l >= n_blocks) {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "page delta: file of {n_blocks} blocks holds block {:?}",
                    self.last
                ),
            ));
        }
        let mut trailer = [0u8; TRAILER_LEN as usize];
        trailer[..4].copy_from_slice(&END_MARK.to_le_bytes());
        trailer[4..8].copy_from_slice(&self.pages.to_le_bytes());
        trailer[8..12].copy_from_slice(&n_blocks.to_le_bytes());
        self.inner.write_all(&trailer)?;
        Ok(self.inner)
    }
}

/// Reads a page delta, checking its structure as it goes: [`DeltaReader::next_block`] reads a
/// record, [`DeltaReader::page`] turns it into the page.
pub struct DeltaReader<R: Read> {
    inner: R,
    block_size: usize,
    version: u32,
    pages: u32,
    last: Option<u32>,
    n_blocks: Option<u32>,
    /// The current record's body and, for a based page, the CRC-32C of the page it decodes to.
    body: Vec<u8>,
    page_crc: Option<u32>,
}

impl<R: Read> DeltaReader<R> {
    /// Read the header; the delta must hold pages of `block_size` bytes.
    pub fn new(mut inner: R, block_size: usize) -> Result<Self, DeltaError> {
        let mut header = [0u8; HEADER_LEN as usize];
        inner.read_exact(&mut header)?;
        if header[..8] != MAGIC {
            return Err(DeltaError::BadMagic);
        }
        let version = le32(&header[8..12]);
        if version != 1 && version != VERSION {
            return Err(DeltaError::Version(version));
        }
        let found = le32(&header[12..16]);
        if found as usize != block_size {
            return Err(DeltaError::BlockSize {
                found,
                expected: block_size,
            });
        }
        Ok(DeltaReader {
            inner,
            block_size,
            version,
            pages: 0,
            last: None,
            n_blocks: None,
            body: Vec::with_capacity(block_size),
            page_crc: None,
        })
    }

    /// Read the next record and return its block number; None once the trailer has been read
    /// and checked and the stream has ended.
    pub fn next_block(&mut self) -> Result<Option<u32>, DeltaError> {
        if self.n_blocks.is_some() {
            return Ok(None);
        }
        let mut word = [0u8; 4];
        self.inner.read_exact(&mut word)?;
        let block = u32::from_le_bytes(word);
        if block == END_MARK {
            self.read_trailer()?;
            return Ok(None);
        }
        if let Some(after) = self.last.filter(|&l| block <= l) {
            return Err(DeltaError::Order { block, after });
        }
        let len = if self.version == 1 {
            self.block_size
        } else {
            self.inner.read_exact(&mut word)?;
            let len = u32::from_le_bytes(word);
            if len as usize > self.block_size || len == 0 {
                return Err(DeltaError::BodyLength { block, len });
            }
            len as usize
        };
        self.page_crc = if len < self.block_size {
            self.inner.read_exact(&mut word)?;
            Some(u32::from_le_bytes(word))
        } else {
            None
        };
        self.body.resize(len, 0);
        self.inner.read_exact(&mut self.body)?;
        self.pages += 1;
        self.last = Some(block);
        Ok(Some(block))
    }

    /// True when the current record is a based page: [`DeltaReader::page`] then needs the
    /// older copy of the block.
    pub fn is_based(&self) -> bool {
        self.page_crc.is_some()
    }

    /// The current record's page into `out` (one block long). `base` is the older copy of the
    /// block, read only for a based page.
    pub fn page(&self, base: &[u8], out: &mut [u8]) -> Result<(), DeltaError> {
        let block = self.last.unwrap_or(END_MARK);
        if out.len() != self.block_size {
            return Err(DeltaError::Io(io::Error::new(
                ErrorKind::InvalidInput,
                "page delta: page buffer is not one block long",
            )));
        }
        let Some(crc) = self.page_crc else {
            out.copy_from_slice(&self.body);
            return Ok(());
        };
        match decompress_into_with_dict(&self.body, out, base) {
            Ok(n) if n == self.block_size => {}
            _ => return Err(DeltaError::Decode { block }),
        }
        if crc32c::crc32c(out) != crc {
            return Err(DeltaError::PageCrc { block });
        }
        Ok(())
    }

    /// The file's length in blocks, once the trailer has been read.
    pub fn n_blocks(&self) -> Option<u32> {
        self.n_blocks
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    fn read_trailer(&mut self) -> Result<(), DeltaError> {
        let mut rest = [0u8; TRAILER_LEN as usize - 4];
        self.inner.read_exact(&mut rest)?;
        let counted = le32(&rest[..4]);
        let n_blocks = le32(&rest[4..8]);
        if counted != self.pages {
            return Err(DeltaError::Count {
                counted,
                found: self.pages,
            });
        }
        if let Some(block) = self.last.filter(|&l| l >= n_blocks) {
            return Err(DeltaError::BeyondEnd { block, n_blocks });
        }
        let mut probe = [0u8; 1];
        loop {
            match self.inner.read(&mut probe) {
                Ok(0) => break,
                Ok(_) => return Err(DeltaError::TrailingBytes),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.n_blocks = Some(n_blocks);
        Ok(())
    }
}

/// A little-endian u32 from exactly four bytes (callers slice fixed-size arrays).
fn le32(b: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[..4]);
    u32::from_le_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 8192;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; BS]
    }

    /// Pseudo-random bytes: a page that does not compress on its own.
    fn varied(seed: u8) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(seed);
        (0..BS)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// `varied(seed)` with a few bytes changed, as an update leaves a page.
    fn touched(seed: u8) -> Vec<u8> {
        let mut p = varied(seed);
        p[100..108].copy_from_slice(b"changed!");
        p[5000] ^= 0xFF;
        p
    }

    /// Three pages as they are and one based on `varied(9)`.
    fn sample() -> Vec<u8> {
        let mut w = DeltaWriter::new(Vec::new(), BS).unwrap();
        w.page(0, &page(1), None).unwrap();
        w.page(7, &page(2), None).unwrap();
        w.page(9, &page(3), None).unwrap();
        w.page(11, &touched(9), Some(&varied(9))).unwrap();
        assert_eq!((w.pages(), w.based_pages()), (4, 1));
        w.finish(12).unwrap()
    }

    /// Block numbers and pages.
    type Pages = Vec<(u32, Vec<u8>)>;

    /// Blocks and pages of a delta and its length; a based page of block b is decoded against
    /// `varied(b - 2)`.
    fn read_all(bytes: &[u8]) -> Result<(Pages, u32), DeltaError> {
        let mut r = DeltaReader::new(bytes, BS)?;
        let mut out = Vec::new();
        while let Some(b) = r.next_block()? {
            let mut buf = vec![0u8; BS];
            r.page(&varied((b as u8).wrapping_sub(2)), &mut buf)?;
            out.push((b, buf));
        }
        Ok((out, r.n_blocks().unwrap()))
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let (pages, n) = read_all(&bytes).unwrap();
        let expected = vec![(0, page(1)), (7, page(2)), (9, page(3)), (11, touched(9))];
        assert_eq!(pages, expected);
        assert_eq!(n, 12);
        // Three whole records, one based record far smaller than a page, header and trailer.
        let whole = 3 * (8 + BS);
        let based = bytes.len() - whole - (HEADER_LEN + TRAILER_LEN) as usize;
        assert!(
            based < 200,
            "a page with two small changes took {based} bytes"
        );
    }

    #[test]
    fn a_page_unlike_its_base_is_stored_whole() {
        let mut w = DeltaWriter::new(Vec::new(), BS).unwrap();
        w.page(3, &varied(1), Some(&page(0))).unwrap();
        assert_eq!(w.based_pages(), 0);
        let bytes = w.finish(4).unwrap();
        assert_eq!(bytes.len(), 16 + 8 + BS + 12);
    }

    #[test]
    fn a_based_page_decoded_against_other_bytes_is_an_error() {
        let bytes = sample();
        let mut r = DeltaReader::new(&bytes[..], BS).unwrap();
        while r.next_block().unwrap() != Some(11) {}
        assert!(r.is_based());
        let mut out = vec![0u8; BS];
        let err = r.page(&varied(10), &mut out).unwrap_err();
        assert!(
            matches!(
                err,
                DeltaError::Decode { block: 11 } | DeltaError::PageCrc { block: 11 }
            ),
            "{err}"
        );
    }

    #[test]
    fn version_1_deltas_are_still_read() {
        let mut v1 = Vec::new();
        v1.extend_from_slice(&MAGIC);
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&(BS as u32).to_le_bytes());
        v1.extend_from_slice(&4u32.to_le_bytes());
        v1.extend_from_slice(&page(6));
        v1.extend_from_slice(&END_MARK.to_le_bytes());
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&5u32.to_le_bytes());
        assert_eq!(read_all(&v1).unwrap(), (vec![(4, page(6))], 5));
    }

    #[test]
    fn empty_delta_records_the_length() {
        let bytes = DeltaWriter::new(Vec::new(), BS).unwrap().finish(0).unwrap();
        assert_eq!(bytes.len() as u64, HEADER_LEN + TRAILER_LEN);
        assert_eq!(read_all(&bytes).unwrap(), (vec![], 0));
    }

    #[test]
    fn writer_refuses_misuse() {
        let mut w = DeltaWriter::new(Vec::new(), BS).unwrap();
        w.page(5, &page(0), None).unwrap();
        assert!(w.page(5, &page(0), None).is_err());
        assert!(w.page(4, &page(0), None).is_err());
        assert!(w.page(6, &page(0)[..100], None).is_err());
        assert!(w.page(6, &page(0), Some(&page(0)[..100])).is_err());
        assert!(w.page(END_MARK, &page(0), None).is_err());
        assert!(w.finish(5).is_err());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            let err = read_all(&bytes[..cut]).unwrap_err();
            assert!(matches!(err, DeltaError::Truncated), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn damage_is_named() {
        let good = sample();
        let damaged = |offset: usize, bytes: &[u8]| {
            let mut b = good.clone();
            b[offset..offset + bytes.len()].copy_from_slice(bytes);
            read_all(&b).unwrap_err().to_string()
        };
        assert_eq!(damaged(0, b"X"), "not a pgkeep page delta (bad magic)");
        assert!(damaged(8, &[3]).contains("version 3 is not supported"));
        assert_eq!(
            damaged(12, &[0, 0x10]),
            "page delta holds 4096-byte pages, expected 8192"
        );
        let second = 16 + 8 + BS;
        assert_eq!(
            damaged(second, &0u32.to_le_bytes()),
            "page delta block 0 follows block 0: blocks must increase"
        );
        assert_eq!(
            damaged(second + 4, &(BS as u32 + 1).to_le_bytes()),
            "page delta block 7 has a body of 8193 bytes, more than a page"
        );
        let fourth = 16 + 3 * (8 + BS);
        assert_eq!(
            damaged(fourth + 8, &0u32.to_le_bytes()),
            "page delta block 11 decodes to a page with the wrong CRC-32C"
        );
        let trailer = good.len() - 12;
        assert_eq!(
            damaged(trailer + 4, &2u32.to_le_bytes()),
            "page delta trailer counts 2 pages, the delta holds 4"
        );
        assert_eq!(
            damaged(trailer + 8, &11u32.to_le_bytes()),
            "page delta holds block 11 of a file 11 blocks long"
        );
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(
            read_all(&longer).unwrap_err(),
            DeltaError::TrailingBytes
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // Flip every bit of the header, the first record header, the based record and the
        // trailer in turn; some flips are harmless (page contents), the rest must be errors,
        // none a panic.
        let good = sample();
        let fourth = 16 + 3 * (8 + BS);
        let mut offsets: Vec<usize> = (0..24).collect();
        offsets.extend(fourth..good.len());
        for i in offsets {
            for bit in 0..8 {
                let mut b = good.clone();
                b[i] ^= 1 << bit;
                let _ = read_all(&b);
            }
        }
        let _ = read_all(&[0xFF; 64]);
        let _ = read_all(&[]);
    }
}
