//! The page-delta object format: the pages of one relation file that changed since the parent
//! backup, plus the file's length in blocks, as stored by diff and incr backups.
//!
//! A delta is a raw byte stream, stored like every other repository object inside an lz4 frame
//! written by `CompressWriter` (so `FileRecord.size` and `FileRecord.crc32c` of a page-delta
//! record are the length and CRC-32C of this raw stream, and validation checks it like any
//! object). All integers are little-endian.
//!
//! ```text
//! header   16 bytes   magic "PGKDELTA", format version u32 (1), block size u32
//! records  n × (4 + block size)   block number u32 (within this file), then the page
//! trailer  12 bytes   end mark u32 0xFFFFFFFF, page count u32 (n), file length in blocks u32
//! ```
//!
//! Block numbers strictly increase and are below the file length; nothing follows the trailer.
//! The raw length is therefore `16 + n * (4 + block size) + 12` ([`raw_len`]). The reader checks
//! all of it and reports damage as a [`DeltaError`], never a panic.

use std::io::{self, ErrorKind, Read, Write};

/// First bytes of every page delta.
pub const MAGIC: [u8; 8] = *b"PGKDELTA";
/// Format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes before the first record.
pub const HEADER_LEN: u64 = 16;
/// Bytes of the trailer.
pub const TRAILER_LEN: u64 = 12;
/// Block number that marks the trailer; never a real block (relation files are shorter).
const END_MARK: u32 = u32::MAX;

/// Length of the raw stream of a delta holding `pages` pages of `block_size` bytes.
pub fn raw_len(block_size: usize, pages: u64) -> u64 {
    HEADER_LEN + pages * (4 + block_size as u64) + TRAILER_LEN
}

/// What is wrong with a page delta being read.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("not a pgkeep page delta (bad magic)")]
    BadMagic,
    #[error("page delta format version {0} is not supported: this pgkeep reads version {VERSION}")]
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
    last: Option<u32>,
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
            last: None,
        })
    }

    /// Add block `block`; `page` must be one block long and blocks must come in increasing order.
    pub fn page(&mut self, block: u32, page: &[u8]) -> io::Result<()> {
        if page.len() != self.block_size
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
        self.inner.write_all(&block.to_le_bytes())?;
        self.inner.write_all(page)?;
        self.pages += 1;
        self.last = Some(block);
        Ok(())
    }

    /// Pages written so far.
    pub fn pages(&self) -> u32 {
        self.pages
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

/// Reads a page delta, checking its structure as it goes.
pub struct DeltaReader<R: Read> {
    inner: R,
    block_size: usize,
    pages: u32,
    last: Option<u32>,
    n_blocks: Option<u32>,
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
        if version != VERSION {
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
            pages: 0,
            last: None,
            n_blocks: None,
        })
    }

    /// The next page into `page` (one block long) and its block number; None once the trailer
    /// has been read and checked and the stream has ended.
    pub fn next_page(&mut self, page: &mut [u8]) -> Result<Option<u32>, DeltaError> {
        if self.n_blocks.is_some() {
            return Ok(None);
        }
        if page.len() != self.block_size {
            return Err(DeltaError::Io(io::Error::new(
                ErrorKind::InvalidInput,
                "page delta: page buffer is not one block long",
            )));
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
        self.inner.read_exact(page)?;
        self.pages += 1;
        self.last = Some(block);
        Ok(Some(block))
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

    fn sample() -> Vec<u8> {
        let mut w = DeltaWriter::new(Vec::new(), BS).unwrap();
        w.page(0, &page(1)).unwrap();
        w.page(7, &page(2)).unwrap();
        w.page(9, &page(3)).unwrap();
        assert_eq!(w.pages(), 3);
        w.finish(12).unwrap()
    }

    fn read_all(bytes: &[u8]) -> Result<(Vec<(u32, u8)>, u32), DeltaError> {
        let mut r = DeltaReader::new(bytes, BS)?;
        let mut buf = vec![0u8; BS];
        let mut out = Vec::new();
        while let Some(b) = r.next_page(&mut buf)? {
            out.push((b, buf[100]));
        }
        Ok((out, r.n_blocks().unwrap()))
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        assert_eq!(bytes.len() as u64, raw_len(BS, 3));
        let (pages, n) = read_all(&bytes).unwrap();
        assert_eq!(pages, vec![(0, 1), (7, 2), (9, 3)]);
        assert_eq!(n, 12);
    }

    #[test]
    fn empty_delta_records_the_length() {
        let bytes = DeltaWriter::new(Vec::new(), BS).unwrap().finish(0).unwrap();
        assert_eq!(bytes.len() as u64, raw_len(BS, 0));
        assert_eq!(read_all(&bytes).unwrap(), (vec![], 0));
    }

    #[test]
    fn writer_refuses_misuse() {
        let mut w = DeltaWriter::new(Vec::new(), BS).unwrap();
        w.page(5, &page(0)).unwrap();
        assert!(w.page(5, &page(0)).is_err());
        assert!(w.page(4, &page(0)).is_err());
        assert!(w.page(6, &page(0)[..100]).is_err());
        assert!(w.page(END_MARK, &page(0)).is_err());
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
        assert!(damaged(8, &[2]).contains("version 2 is not supported"));
        assert_eq!(
            damaged(12, &[0, 0x10]),
            "page delta holds 4096-byte pages, expected 8192"
        );
        let second = 16 + 4 + BS;
        assert_eq!(
            damaged(second, &0u32.to_le_bytes()),
            "page delta block 0 follows block 0: blocks must increase"
        );
        let trailer = good.len() - 12;
        assert_eq!(
            damaged(trailer + 4, &2u32.to_le_bytes()),
            "page delta trailer counts 2 pages, the delta holds 3"
        );
        assert_eq!(
            damaged(trailer + 8, &9u32.to_le_bytes()),
            "page delta holds block 9 of a file 9 blocks long"
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
        // Flip every byte of the header, the first record header and the trailer in turn; some
        // flips are harmless (page contents), the rest must be errors, none a panic.
        let good = sample();
        let mut offsets: Vec<usize> = (0..24).collect();
        offsets.extend(good.len() - 12..good.len());
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
