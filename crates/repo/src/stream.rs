//! lz4 frame streams that checksum the raw bytes on the way through: `CompressWriter` and `DecompressReader`.
//!
//! The frame container (header, block sizes, end mark) is written and parsed here around the
//! block codecs (the reference C library's `LZ4_compress_fast` to compress, `lz4_flex` to
//! decompress) rather than with a library's frame encoder and decoder, for two reasons:
//! `FrameDecoder` reports a stream cut at a block boundary as a clean end of data, which would let
//! a truncated object pass validation, and owning the loop lets full blocks be compressed straight
//! from the caller's buffer and decompressed output be handed out without another copy. The
//! frames are standard LZ4 frames (independent 1 MiB blocks, no xxHash checksums: our CRC-32C and
//! SHA-256 cover the content), so `lz4 -d` can read any object in a repository.

use std::fmt;
use std::io::{self, BufRead, ErrorKind, Read, Write};

use lz4::block::{compress_bound, compress_to_buffer, CompressionMode};
use lz4_flex::block::decompress_into;
use sha2::{Digest as _, Sha256};

/// Checksums of the original (uncompressed) bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Digest {
    pub size: u64,
    pub crc32c: u32,
    pub sha256: Option<[u8; 32]>,
}

impl Digest {
    /// The SHA-256 as lower-case hex, when it was computed.
    pub fn sha256_hex(&self) -> Option<String> {
        self.sha256.map(hex::encode)
    }
}

/// Streams raw bytes in, lz4-frame-compressed bytes out to `inner`, computing size, CRC-32C and
/// (if enabled) SHA-256 of the raw bytes and counting the compressed bytes written.
///
/// `flush` ends the current block early, so call it only when the bytes so far must reach `inner`;
/// `finish` is what completes the frame.
pub struct CompressWriter<W: Write> {
    inner: W,
    sums: Summer,
    /// Raw bytes waiting for a full block; empty whenever callers write whole blocks.
    pending: Vec<u8>,
    /// Block header followed by the compressed block, so a block is one write to `inner`.
    out: Vec<u8>,
    header_written: bool,
    stored: u64,
}

impl<W: Write> CompressWriter<W> {
    pub fn new(inner: W, sha256: bool) -> Self {
        Self::with_sums(inner, Summer::new(sha256))
    }

    /// A writer that only counts the raw bytes: for callers that checksum them on another
    /// thread. Its digest holds the size and a CRC-32C of 0.
    pub fn counting_only(inner: W) -> Self {
        Self::with_sums(inner, Summer::size_only())
    }

    fn with_sums(inner: W, sums: Summer) -> Self {
        CompressWriter {
            inner,
            sums,
            pending: Vec::new(),
            out: Vec::new(),
            header_written: false,
            stored: 0,
        }
    }

    /// Completes the frame and returns the digest of the raw bytes, the number of bytes written
    /// to the inner writer, and the inner writer itself (flushed).
    pub fn finish(mut self) -> io::Result<(Digest, u64, W)> {
        self.write_header()?;
        self.flush_pending()?;
        self.put(&END_MARK)?;
        self.inner.flush()?;
        Ok((self.sums.digest(), self.stored, self.inner))
    }

    /// Checksums of the raw bytes taken so far.
    pub fn digest(&self) -> Digest {
        self.sums.digest()
    }

    /// Bytes written to the inner writer so far.
    pub fn stored(&self) -> u64 {
        self.stored
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.inner.write_all(bytes)?;
        self.stored += bytes.len() as u64;
        Ok(())
    }

    fn write_header(&mut self) -> io::Result<()> {
        if !self.header_written {
            self.put(&FRAME_HEADER)?;
            self.header_written = true;
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let result = self.write_block(&pending);
        self.pending = pending;
        self.pending.clear();
        result
    }

    /// Writes one block of at most `BLOCK_SIZE` raw bytes, compressed unless that would not
    /// make it smaller (the frame format then stores it as is).
    fn write_block(&mut self, raw: &[u8]) -> io::Result<()> {
        let mut out = std::mem::take(&mut self.out);
        let result = encode_block(raw, &mut out, FILE_ACCELERATION)
            .and_then(|packed| self.put_block(raw, &out, packed));
        self.out = out;
        result
    }

    /// Appends one block that [`encode_block`] turned into `out` (returning `packed`), and
    /// counts `raw` as taken: for callers that compress blocks on other threads and hand them
    /// over in order. Only whole blocks may come before it.
    pub(crate) fn put_encoded(
        &mut self,
        raw: &[u8],
        out: &[u8],
        packed: Option<usize>,
    ) -> io::Result<()> {
        debug_assert!(self.pending.is_empty());
        self.write_header()?;
        self.sums.update(raw);
        self.put_block(raw, out, packed)
    }

    fn put_block(&mut self, raw: &[u8], out: &[u8], packed: Option<usize>) -> io::Result<()> {
        match packed {
            Some(len) => self.put(&out[..len]),
            None => {
                // Both lengths fit 31 bits: blocks are at most BLOCK_SIZE bytes.
                self.put(&(raw.len() as u32 | UNCOMPRESSED_BIT).to_le_bytes())?;
                self.put(raw)
            }
        }
    }
}

/// lz4 acceleration (`LZ4_compress_fast`'s parameter; 1 is what `lz4 -1` and pgBackRest use)
/// of data files in backups, where the stored size is kept for the whole retention period.
pub(crate) const FILE_ACCELERATION: i32 = 1;

/// lz4 acceleration of archived WAL (`store_compressed`). A segment must be archived before the
/// server fills the next, so speed counts for more there: on WAL written by a bulk load,
/// acceleration 2 compresses about a quarter faster than 1 for 1.3% more bytes.
pub(crate) const WAL_ACCELERATION: i32 = 2;

/// Compresses one block of at most `BLOCK_SIZE` raw bytes into `out` as a frame holds it (the
/// 4-byte block size, then the lz4 block) and returns how many bytes of `out` that is; `None`
/// when compressing would not make the block smaller, and the frame must hold it as is.
pub(crate) fn encode_block(
    raw: &[u8],
    out: &mut Vec<u8>,
    acceleration: i32,
) -> io::Result<Option<usize>> {
    debug_assert!(!raw.is_empty() && raw.len() <= BLOCK_SIZE);
    grow(out, 4 + compress_bound(raw.len())?);
    let mode = Some(CompressionMode::FAST(acceleration));
    let packed = compress_to_buffer(raw, mode, false, &mut out[4..])?;
    if packed >= raw.len() {
        return Ok(None);
    }
    out[..4].copy_from_slice(&(packed as u32).to_le_bytes());
    Ok(Some(4 + packed))
}

impl<W: Write> Write for CompressWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.write_header()?;
        let mut rest = buf;
        while !rest.is_empty() {
            if self.pending.is_empty() && rest.len() >= BLOCK_SIZE {
                // The common case when copying with big buffers: no staging copy at all.
                let (block, tail) = rest.split_at(BLOCK_SIZE);
                self.sums.update(block);
                self.write_block(block)?;
                rest = tail;
            } else {
                let take = rest.len().min(BLOCK_SIZE - self.pending.len());
                let (chunk, tail) = rest.split_at(take);
                self.pending.extend_from_slice(chunk);
                self.sums.update(chunk);
                rest = tail;
                if self.pending.len() == BLOCK_SIZE {
                    self.flush_pending()?;
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.flush_pending()?;
        }
        self.inner.flush()
    }
}

impl<W: Write> fmt::Debug for CompressWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompressWriter")
            .field("raw", &self.sums.size)
            .field("stored", &self.stored)
            .finish_non_exhaustive()
    }
}

/// Decompresses an lz4 frame stream, computing size and CRC-32C (and SHA-256 if asked) of the
/// decompressed bytes.
///
/// A stream that is cut short, garbled, or followed by stray bytes fails with an `io::Error`
/// whose inner error is a [`FrameError`]; see [`FrameError::from_io`].
pub struct DecompressReader<R: Read> {
    frame: FrameBlocks<R>,
    sums: Summer,
    /// Compressed bytes of the current block.
    packed: Vec<u8>,
    /// Decompressed bytes of the current block; `pos..end` not yet handed out.
    raw: Vec<u8>,
    pos: usize,
    end: usize,
}

impl<R: Read> DecompressReader<R> {
    pub fn new(inner: R, sha256: bool) -> Self {
        DecompressReader {
            frame: FrameBlocks::new(inner),
            sums: Summer::new(sha256),
            packed: Vec::new(),
            raw: Vec::new(),
            pos: 0,
            end: 0,
        }
    }

    /// Checksums of the bytes handed out so far.
    pub fn digest(&self) -> Digest {
        self.sums.digest()
    }

    /// True once the end mark was read and nothing followed it.
    pub fn is_done(&self) -> bool {
        self.frame.is_done() && self.pos == self.end
    }

    pub fn into_inner(self) -> R {
        self.frame.inner
    }

    /// Reads blocks until there are decompressed bytes to hand out or the frame ended cleanly.
    fn refill(&mut self) -> io::Result<()> {
        while self.pos == self.end {
            let max_block = self.frame.max_block()?;
            let Some(block) = self.frame.next_block()? else {
                return Ok(());
            };
            // A stored block goes straight to the output buffer: no copy.
            let buf = if block.compressed {
                &mut self.packed
            } else {
                &mut self.raw
            };
            grow(buf, block.len);
            self.frame.read_body(&mut buf[..block.len])?;
            self.end = if block.compressed {
                decode_block(&self.packed[..block.len], &mut self.raw, max_block)?
            } else {
                block.len
            };
            self.pos = 0;
        }
        Ok(())
    }
}

/// The container of an lz4 frame, read one block at a time with the blocks left as stored: for
/// readers that decompress elsewhere, such as `fetch_decompressed_at`'s worker threads. Errors
/// are those of [`DecompressReader`], which is built on it.
pub(crate) struct FrameBlocks<R: Read> {
    inner: R,
    state: State,
    /// From the header; meaningless while `state` is `Header`.
    max_block: usize,
}

/// One block of a frame as stored: `len` bytes follow, lz4-compressed or not.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawBlock {
    pub len: usize,
    pub compressed: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Header,
    Blocks,
    Done,
}

impl<R: Read> FrameBlocks<R> {
    pub fn new(inner: R) -> Self {
        FrameBlocks {
            inner,
            state: State::Header,
            max_block: 0,
        }
    }

    /// True once the end mark was read and nothing followed it.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The most raw bytes a block of this frame holds, from the header (read now if it was not).
    pub fn max_block(&mut self) -> io::Result<usize> {
        if self.state == State::Header {
            self.read_header()?;
        }
        Ok(self.max_block)
    }

    /// The next block's length and kind; the caller reads its bytes with [`Self::read_body`]
    /// before asking for another. `None` after the end mark, once it is clear nothing follows.
    pub fn next_block(&mut self) -> io::Result<Option<RawBlock>> {
        let max_block = self.max_block()?;
        if self.state == State::Done {
            return Ok(None);
        }
        let mut word = [0u8; 4];
        read_exact_or(&mut self.inner, &mut word, FrameError::Truncated)?;
        let word = u32::from_le_bytes(word);
        if word == 0 {
            self.read_trailer()?;
            return Ok(None);
        }
        let len = (word & !UNCOMPRESSED_BIT) as usize;
        if len > max_block {
            return Err(FrameError::BlockTooBig(len).into());
        }
        Ok(Some(RawBlock {
            len,
            compressed: word & UNCOMPRESSED_BIT == 0,
        }))
    }

    /// Reads the body of the block `next_block` announced into `buf`, which is exactly its length.
    pub fn read_body(&mut self, buf: &mut [u8]) -> io::Result<()> {
        read_exact_or(&mut self.inner, buf, FrameError::Truncated)
    }

    fn read_header(&mut self) -> io::Result<()> {
        let mut header = [0u8; FRAME_HEADER.len()];
        read_exact_or(&mut self.inner, &mut header, FrameError::Truncated)?;
        if header[..4] != FRAME_HEADER[..4] {
            return Err(FrameError::BadMagic.into());
        }
        let max_block = ACCEPTED_DESCRIPTORS
            .iter()
            .find(|(descriptor, _)| header[4..] == descriptor[..])
            .map(|&(_, size)| size)
            .ok_or(FrameError::UnsupportedHeader(
                header[4], header[5], header[6],
            ))?;
        self.max_block = max_block;
        self.state = State::Blocks;
        Ok(())
    }

    /// After the end mark: the object must end here, or it is not what we wrote.
    fn read_trailer(&mut self) -> io::Result<()> {
        let mut probe = [0u8; 1];
        loop {
            match self.inner.read(&mut probe) {
                Ok(0) => break,
                Ok(_) => return Err(FrameError::TrailingBytes.into()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.state = State::Done;
        Ok(())
    }
}

/// Decompresses one compressed block into `out`, which must be long enough for its raw bytes,
/// and returns how many it holds.
pub(crate) fn decode_block_into(packed: &[u8], out: &mut [u8]) -> Result<usize, FrameError> {
    decompress_into(packed, out).map_err(|e| FrameError::BadBlock(e.to_string()))
}

/// Decompresses one compressed block of a frame whose blocks hold at most `max_block` raw bytes
/// into the front of `raw` (grown as needed) and returns how many bytes it holds.
pub(crate) fn decode_block(
    packed: &[u8],
    raw: &mut Vec<u8>,
    max_block: usize,
) -> Result<usize, FrameError> {
    // Size the output to what this block can expand to (a sequence cannot expand by more than
    // 255 to 1) so that small objects do not zero a whole block's worth of memory; if the guess
    // is short, retry once with the full block size before calling it corrupt.
    let guess = max_block.min(packed.len().saturating_mul(255).max(64 * 1024));
    grow(raw, guess);
    match decode_block_into(packed, &mut raw[..guess]) {
        Err(_) if guess < max_block => {
            grow(raw, max_block);
            decode_block_into(packed, &mut raw[..max_block])
        }
        decoded => decoded,
    }
}

impl<R: Read> Read for DecompressReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.refill()?;
        let n = buf.len().min(self.end - self.pos);
        let chunk = &self.raw[self.pos..self.pos + n];
        buf[..n].copy_from_slice(chunk);
        self.sums.update(chunk);
        self.pos += n;
        Ok(n)
    }
}

/// Lets callers such as `fetch_decompressed` write decompressed blocks out without copying them
/// into a buffer of their own first.
impl<R: Read> BufRead for DecompressReader<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.refill()?;
        Ok(&self.raw[self.pos..self.end])
    }

    fn consume(&mut self, amt: usize) {
        let amt = amt.min(self.end - self.pos);
        self.sums.update(&self.raw[self.pos..self.pos + amt]);
        self.pos += amt;
    }
}

impl<R: Read> fmt::Debug for DecompressReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecompressReader")
            .field("raw", &self.sums.size)
            .field("state", &self.frame.state)
            .finish_non_exhaustive()
    }
}

/// What is wrong with a stream `DecompressReader` was given; it travels inside an `io::Error`
/// (kind `InvalidData`) because `Read` can only return those.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("truncated lz4 frame")]
    Truncated,
    #[error("not an lz4 frame (bad magic number)")]
    BadMagic,
    #[error("unsupported lz4 frame descriptor {0:#04x} {1:#04x} {2:#04x}")]
    UnsupportedHeader(u8, u8, u8),
    #[error("lz4 block of {0} bytes exceeds the frame's block size")]
    BlockTooBig(usize),
    #[error("garbled lz4 block: {0}")]
    BadBlock(String),
    #[error("bytes after the end of the lz4 frame")]
    TrailingBytes,
}

impl FrameError {
    /// The frame error inside `err`, if it is one rather than an I/O failure of the inner reader.
    pub fn from_io(err: &io::Error) -> Option<&FrameError> {
        err.get_ref().and_then(|inner| inner.downcast_ref())
    }
}

impl From<FrameError> for io::Error {
    fn from(err: FrameError) -> Self {
        io::Error::new(ErrorKind::InvalidData, err)
    }
}

/// Raw bytes per block. 1 MiB keeps a block and its compressed form inside L2 while the three
/// passes over it (CRC, SHA, lz4) run, and the 4-byte block header is noise at that size.
pub const BLOCK_SIZE: usize = 1 << 20;

/// Magic number 0x184D2204, then FLG 0x60 (version 1, independent blocks, no block checksums,
/// no content size, no content checksum, no dictionary), BD 0x60 (1 MiB blocks) and the header
/// checksum byte (second byte of xxh32 of FLG and BD). A test checks these bytes against what
/// lz4_flex's own `FrameEncoder` writes for the same settings.
pub(crate) const FRAME_HEADER: [u8; 7] = [0x04, 0x22, 0x4D, 0x18, 0x60, 0x60, 0x51];

/// Descriptors (FLG, BD, HC) the reader accepts, with their block size: our own settings for
/// every block size the format allows, so a later change of `BLOCK_SIZE` keeps old objects readable.
const ACCEPTED_DESCRIPTORS: [([u8; 3], usize); 4] = [
    ([0x60, 0x40, 0x82], 64 << 10),
    ([0x60, 0x50, 0xFB], 256 << 10),
    ([0x60, 0x60, 0x51], 1 << 20),
    ([0x60, 0x70, 0x73], 4 << 20),
];

const END_MARK: [u8; 4] = [0; 4];
const UNCOMPRESSED_BIT: u32 = 1 << 31;

/// Size, CRC-32C (unless only counting) and optional SHA-256 of a byte stream, updated slice
/// by slice.
#[derive(Clone)]
struct Summer {
    size: u64,
    crc: Option<u32>,
    sha: Option<Sha256>,
}

impl Summer {
    fn new(sha256: bool) -> Self {
        Summer {
            size: 0,
            crc: Some(0),
            sha: sha256.then(Sha256::new),
        }
    }

    fn size_only() -> Self {
        Summer {
            size: 0,
            crc: None,
            sha: None,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        if let Some(crc) = &mut self.crc {
            *crc = crc32c::crc32c_append(*crc, bytes);
        }
        if let Some(sha) = &mut self.sha {
            sha.update(bytes);
        }
    }

    fn digest(&self) -> Digest {
        Digest {
            size: self.size,
            crc32c: self.crc.unwrap_or(0),
            sha256: self.sha.as_ref().map(|sha| sha.clone().finalize().into()),
        }
    }
}

/// Grows `buf` to at least `len` initialised bytes; buffers only grow to what a stream needs,
/// so reading an 8 KiB object never touches a megabyte of memory.
fn grow(buf: &mut Vec<u8>, len: usize) {
    if buf.is_empty() {
        // A fresh zeroed allocation: for a block-sized buffer the allocator maps zero pages
        // and only the bytes written are ever touched, where `resize` would write all of them.
        *buf = vec![0; len];
    } else if buf.len() < len {
        buf.resize(len, 0);
    }
}

/// `read_exact`, with running out of input reported as `eof` instead of a bare `UnexpectedEof`.
fn read_exact_or(r: &mut impl Read, buf: &mut [u8], eof: FrameError) -> io::Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == ErrorKind::UnexpectedEof {
            eof.into()
        } else {
            e
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lz4_flex::frame::{BlockMode, BlockSize, FrameEncoder, FrameInfo};

    /// Our hand-written descriptors must be exactly what lz4_flex writes for the same settings,
    /// header checksum included.
    #[test]
    fn headers_match_lz4_flex() {
        for (size, (descriptor, bytes)) in [
            BlockSize::Max64KB,
            BlockSize::Max256KB,
            BlockSize::Max1MB,
            BlockSize::Max4MB,
        ]
        .into_iter()
        .zip(ACCEPTED_DESCRIPTORS)
        {
            let info = FrameInfo::new()
                .block_size(size)
                .block_mode(BlockMode::Independent)
                .content_checksum(false)
                .block_checksums(false);
            let mut enc = FrameEncoder::with_frame_info(info, Vec::new());
            let _ = enc.write(b"x");
            let frame = enc.finish().expect("in-memory frame");
            assert_eq!(frame[..4], FRAME_HEADER[..4]);
            assert_eq!(frame[4..7], descriptor, "{size:?}");
            assert_eq!(bytes, 1 << (16 + 2 * (descriptor[1] >> 4 & 7) - 8));
        }
        assert_eq!(FRAME_HEADER[4..], ACCEPTED_DESCRIPTORS[2].0);
        assert_eq!(ACCEPTED_DESCRIPTORS[2].1, BLOCK_SIZE);
    }
}
