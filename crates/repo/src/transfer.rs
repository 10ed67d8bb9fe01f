//! Whole-object moves between byte streams and a `Storage`: compressed stores and verified fetches.
//!
//! `store_compressed` is the hot path of archive-push. SHA-256 and CRC-32C together cost nearly
//! as much as lz4, and SHA-256 cannot be split, so a source longer than one block goes
//! through a `Line` worked by two threads: one hashes in order, and both compress whichever
//! block is next, so a 16 MiB WAL segment takes roughly half its total CPU time.
//!
//! `fetch_decompressed_at` is the hot path of restore for big files. lz4 decoding and the copy
//! into the page cache cost about the same, and one thread doing both for a table of hundreds of
//! megabytes leaves the other cores idle; because the blocks of a frame are independent and all
//! but the last hold exactly the frame's block size, each can be decoded and written at its own
//! offset by whichever thread is free.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, BufRead, ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};

use sha2::{Digest as _, Sha256};

use crate::stream::{decode_block_into, encode_block, FrameBlocks, WAL_ACCELERATION};
use crate::{
    Commit, CompressWriter, DecompressReader, Digest, FrameError, PendingObject, Result, Storage,
    StorageError, StoredObject, BLOCK_SIZE,
};

/// Read `src` to its end, compress into a new object at `key`, commit it per `mode`. SHA-256 is
/// always computed here.
pub fn store_compressed(
    storage: &dyn Storage,
    key: &str,
    src: &mut (dyn Read + Send),
    mode: Commit,
) -> Result<StoredObject> {
    let pending = storage.create(key)?;
    // The checksums are computed beside the writer (see the module doc), not inside it.
    let mut writer = CompressWriter::counting_only(pending);
    let (sha256, crc32c) = with_buffers(|buffers| pump(key, src, &mut writer, buffers))?;
    let (counted, stored_size, pending) = writer.finish().map_err(|e| StorageError::io(key, e))?;
    match mode {
        Commit::Replace => pending.commit()?,
        Commit::New => pending.commit_new()?,
    }
    Ok(StoredObject {
        digest: Digest {
            size: counted.size,
            crc32c,
            sha256: Some(sha256),
        },
        stored_size,
    })
}

/// Decompress the object at `key` into `dst`, verifying its size and CRC-32C against `expect`
/// when given. A mismatch, or a truncated or garbled lz4 frame, is `Corrupt` naming the key
/// (what was written to `dst` by then must be discarded). Returns the digest of the decompressed
/// bytes (with SHA-256 only if `sha256`).
pub fn fetch_decompressed(
    storage: &dyn Storage,
    key: &str,
    dst: &mut dyn Write,
    expect: Option<(u64, u32)>,
    sha256: bool,
) -> Result<Digest> {
    decompress_into(storage.open(key)?, key, dst, expect, sha256)
}

/// [`fetch_decompressed`] from an object already opened (or a range of one: a bundled file),
/// `key` naming it in errors.
pub fn decompress_into<R: Read>(
    object: R,
    key: &str,
    dst: &mut dyn Write,
    expect: Option<(u64, u32)>,
    sha256: bool,
) -> Result<Digest> {
    let mut reader = DecompressReader::new(object, sha256);
    let mut written = 0u64;
    loop {
        let chunk = reader.fill_buf().map_err(|e| read_error(key, e))?;
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len();
        if let Some((size, _)) = expect {
            // Stop before writing out more than the object should hold: a garbled frame could
            // otherwise fill the destination's disk.
            if written + n as u64 > size {
                return Err(corrupt(key, format!("expected {size} bytes, found more")));
            }
        }
        dst.write_all(chunk).map_err(|e| destination(key, e))?;
        reader.consume(n);
        written += n as u64;
    }
    let digest = reader.digest();
    if let Some(expect) = expect {
        check_expected(key, expect, &digest)?;
    }
    Ok(digest)
}

/// Decompress the object at `key` into `dst` from offset 0 like `fetch_decompressed`, with the
/// same checks against `expect` and the same errors, but decoding and writing its blocks on
/// `threads` threads at once. Only the first `cap` bytes are written (the rest is still read and
/// checked): a file that shrank keeps only the head of an older copy. `on_bytes` hears of every
/// run of bytes written, from any of those threads. `dst` should be empty.
///
/// Whole aligned blocks go through `direct` instead when given: a descriptor of the same file
/// opened with `O_DIRECT` (see [`crate::open_direct`]); should the filesystem refuse such a
/// write, that block and the rest go through `dst`.
///
/// A frame whose blocks do not all hold the frame's block size but the last (not one we wrote)
/// is fetched again one block after another, over an emptied `dst`; the result is the same.
#[allow(clippy::too_many_arguments)]
pub fn fetch_decompressed_at(
    storage: &dyn Storage,
    key: &str,
    dst: &File,
    direct: Option<&File>,
    cap: u64,
    expect: (u64, u32),
    threads: usize,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<Digest> {
    let reported = AtomicU64::new(0);
    let out = Placer {
        key,
        dst,
        direct,
        direct_ok: AtomicBool::new(true),
        cap,
        on_bytes,
        reported: &reported,
        writing: Mutex::new(()),
    };
    if let Some(digest) = fetch_blocks_at(storage, &out, expect, threads)? {
        return Ok(digest);
    }
    dst.set_len(0).map_err(|e| destination(key, e))?;
    let mut seq = SequentialAt {
        file: dst,
        pos: 0,
        cap,
        reported: reported.into_inner(),
        on_bytes,
    };
    fetch_decompressed(storage, key, &mut seq, Some(expect), false)
}

/// Store small uncompressed bytes (metadata files) atomically, replacing.
pub fn put_bytes(storage: &dyn Storage, key: &str, bytes: &[u8]) -> Result<()> {
    let mut pending = storage.create(key)?;
    pending
        .write_all(bytes)
        .map_err(|e| StorageError::io(key, e))?;
    pending.commit()
}

/// Read a whole object as stored (no decompression).
pub fn get_bytes(storage: &dyn Storage, key: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    storage
        .open(key)?
        .read_to_end(&mut bytes)
        .map_err(|e| StorageError::io(key, e))?;
    Ok(bytes)
}

type Writer = CompressWriter<Box<dyn PendingObject>>;

/// Moves `src` into `writer` block by block and returns the SHA-256 and CRC-32C of what passed.
fn pump(
    key: &str,
    src: &mut (dyn Read + Send),
    writer: &mut Writer,
    buffers: &mut Vec<Vec<u8>>,
) -> Result<([u8; 32], u32)> {
    let mut first = take_buffer(buffers);
    let n = fill(key, src, &mut first)?;
    if n < first.len() {
        // History and backup-history files fit one block: not worth a thread.
        write(key, writer, &first[..n])?;
        let sums = (
            Sha256::digest(&first[..n]).into(),
            crc32c::crc32c(&first[..n]),
        );
        buffers.push(first);
        return Ok(sums);
    }
    let line = Line::new(key, src, writer, first, buffers);
    std::thread::scope(|scope| {
        let helper = scope.spawn(|| line.work());
        line.work();
        if helper.join().is_err() {
            line.fail(helper_gone(key));
        }
    });
    line.finish(buffers)
}

/// Raw blocks in flight in `pump`: how far reading may run ahead of the slower of hashing and
/// writing, so that a thread that comes free finds a block to compress.
const SLOTS: usize = 4;

/// One `pump`'s blocks on their way from the source to the frame, worked on by two threads.
///
/// Each block is read, hashed (SHA-256 and CRC-32C), compressed and written. Reading, hashing
/// and writing must each go in block order, one block at a time; compressing a block depends
/// only on that block. So the work is not split by kind: a thread that comes free takes the
/// most urgent step any block is ready for (writing, then hashing, then reading, then
/// compressing), and the other thread does the same. SHA-256, which cannot be split and costs
/// nearly as much as lz4 at WAL's acceleration, so runs almost without pause while both threads
/// share the compressing; a fixed split (one thread reading and compressing, the other
/// hashing) left the hasher idle a third of the time.
struct Line<'a> {
    key: &'a str,
    shared: Mutex<Shared<'a>>,
    /// Notified on every change of `Shared`.
    turn: Condvar,
}

struct Shared<'a> {
    /// Block `i` lives in `slots[i % SLOTS]`.
    slots: Vec<Slot>,
    /// Blocks read, hashed, taken for compression, and written; each count only grows, and
    /// none passes `read`.
    read: usize,
    hashed: usize,
    claimed: usize,
    written: usize,
    /// `read` is final: the source has ended.
    end: bool,
    /// The first error; both threads stop at it.
    failed: Option<StorageError>,
    /// Away (`None`) while a thread reads, hashes or writes: that is what keeps each of those
    /// steps to one block at a time.
    src: Option<&'a mut (dyn Read + Send)>,
    sums: Option<(Sha256, u32)>,
    writer: Option<&'a mut Writer>,
}

#[derive(Default)]
struct Slot {
    /// The raw block, shared read-only with threads hashing, compressing or writing it. A
    /// thread drops its handle before it reports its step done, so the reader finds this one
    /// unshared when the slot comes round again.
    raw: Arc<Vec<u8>>,
    len: usize,
    /// Where the block is compressed to; away while a thread compresses into it or writes it.
    out: Option<Vec<u8>>,
    /// What `encode_block` returned, from compression until the block is written.
    encoded: Option<io::Result<Option<usize>>>,
}

/// A step of `Line`'s work, taken under the lock and done without it.
enum Step<'a> {
    Write(Block, &'a mut Writer, Vec<u8>, io::Result<Option<usize>>),
    Hash(Block, (Sha256, u32)),
    Read(usize, &'a mut (dyn Read + Send), Arc<Vec<u8>>),
    Compress(Block, Vec<u8>),
}

/// Block `index` of a `Line`: its raw bytes are `raw[..len]`.
struct Block {
    index: usize,
    raw: Arc<Vec<u8>>,
    len: usize,
}

impl Block {
    fn bytes(&self) -> &[u8] {
        &self.raw[..self.len]
    }
}

impl<'a> Line<'a> {
    fn new(
        key: &'a str,
        src: &'a mut (dyn Read + Send),
        writer: &'a mut Writer,
        first: Vec<u8>,
        buffers: &mut Vec<Vec<u8>>,
    ) -> Self {
        let mut slots: Vec<Slot> = (0..SLOTS).map(|_| Slot::default()).collect();
        slots[0].raw = Arc::new(first);
        slots[0].len = BLOCK_SIZE;
        for slot in &mut slots[1..] {
            slot.raw = Arc::new(take_buffer(buffers));
        }
        for slot in &mut slots {
            slot.out = Some(buffers.pop().unwrap_or_default());
        }
        Line {
            key,
            shared: Mutex::new(Shared {
                slots,
                read: 1,
                hashed: 0,
                claimed: 0,
                written: 0,
                end: false,
                failed: None,
                src: Some(src),
                sums: Some((Sha256::new(), 0)),
                writer: Some(writer),
            }),
            turn: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared<'a>> {
        // Nothing panics while holding the lock; should it, the counts are still consistent.
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One thread's share: steps until every block is written and hashed, or something failed.
    fn work(&self) {
        let _quit = Quit(self);
        let mut s = self.lock();
        loop {
            if s.failed.is_some() || s.end && s.written == s.read && s.hashed == s.read {
                return;
            }
            match s.next_step() {
                Some(step) => {
                    drop(s);
                    s = self.run(step);
                    self.turn.notify_all();
                }
                None => s = self.turn.wait(s).unwrap_or_else(PoisonError::into_inner),
            }
        }
    }

    /// Does `step` without the lock, then records its outcome under it.
    fn run(&self, step: Step<'a>) -> MutexGuard<'_, Shared<'a>> {
        match step {
            Step::Write(block, writer, out, encoded) => {
                let put =
                    encoded.and_then(|packed| writer.put_encoded(block.bytes(), &out, packed));
                let index = block.index;
                drop(block);
                let mut s = self.lock();
                s.writer = Some(writer);
                s.slots[index % SLOTS].out = Some(out);
                match put {
                    Ok(()) => s.written += 1,
                    Err(e) => s.fail(StorageError::io(self.key, e)),
                }
                s
            }
            Step::Hash(block, (mut sha, crc)) => {
                sha.update(block.bytes());
                let crc = crc32c::crc32c_append(crc, block.bytes());
                drop(block);
                let mut s = self.lock();
                s.sums = Some((sha, crc));
                s.hashed += 1;
                s
            }
            Step::Read(i, src, mut raw) => {
                // Unshared by now (see `Slot::raw`), so this copies nothing.
                let buf = Arc::make_mut(&mut raw);
                buf.resize(BLOCK_SIZE, 0);
                let filled = fill(self.key, src, buf);
                let mut s = self.lock();
                s.src = Some(src);
                let slot = &mut s.slots[i % SLOTS];
                slot.raw = raw;
                match filled {
                    Ok(n) => {
                        slot.len = n;
                        if n > 0 {
                            s.read += 1;
                        }
                        if n < BLOCK_SIZE {
                            s.end = true;
                        }
                    }
                    Err(e) => s.fail(e),
                }
                s
            }
            Step::Compress(block, mut out) => {
                let encoded = encode_block(block.bytes(), &mut out, WAL_ACCELERATION);
                let index = block.index;
                drop(block);
                let mut s = self.lock();
                let slot = &mut s.slots[index % SLOTS];
                slot.out = Some(out);
                slot.encoded = Some(encoded);
                s
            }
        }
    }

    fn fail(&self, err: StorageError) {
        self.lock().fail(err);
        self.turn.notify_all();
    }

    /// The checksums once both threads are done, or the first error. The block buffers go
    /// back to `buffers` either way.
    fn finish(self, buffers: &mut Vec<Vec<u8>>) -> Result<([u8; 32], u32)> {
        let s = self
            .shared
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        for slot in s.slots {
            buffers.extend(Arc::try_unwrap(slot.raw).ok().filter(|raw| !raw.is_empty()));
            buffers.extend(slot.out);
        }
        if let Some(err) = s.failed {
            return Err(err);
        }
        match s.sums {
            Some((sha, crc)) if s.end && s.hashed == s.read => Ok((sha.finalize().into(), crc)),
            _ => Err(helper_gone(self.key)),
        }
    }
}

impl<'a> Shared<'a> {
    /// The most urgent step some block is ready for, taken out of the shared state.
    fn next_step(&mut self) -> Option<Step<'a>> {
        let w = self.written;
        if w < self.claimed && self.writer.is_some() && self.slots[w % SLOTS].encoded.is_some() {
            let block = self.block(w);
            let slot = &mut self.slots[w % SLOTS];
            let (encoded, out) = (slot.encoded.take()?, slot.out.take()?);
            return Some(Step::Write(block, self.writer.take()?, out, encoded));
        }
        let h = self.hashed;
        if h < self.read && self.sums.is_some() {
            return Some(Step::Hash(self.block(h), self.sums.take()?));
        }
        let r = self.read;
        if !self.end && r < self.written.min(self.hashed) + SLOTS && self.src.is_some() {
            // The block that last used this slot is written and hashed: refill it.
            let raw = std::mem::take(&mut self.slots[r % SLOTS].raw);
            return Some(Step::Read(r, self.src.take()?, raw));
        }
        let c = self.claimed;
        if c < self.read {
            self.claimed += 1;
            let block = self.block(c);
            return Some(Step::Compress(block, self.slots[c % SLOTS].out.take()?));
        }
        None
    }

    fn block(&self, index: usize) -> Block {
        let slot = &self.slots[index % SLOTS];
        Block {
            index,
            raw: Arc::clone(&slot.raw),
            len: slot.len,
        }
    }

    fn fail(&mut self, err: StorageError) {
        self.failed.get_or_insert(err);
    }
}

/// Makes sure a thread leaving `Line::work` early, by a panic, stops the other one too.
struct Quit<'l, 'a>(&'l Line<'a>);

impl Drop for Quit<'_, '_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail(helper_gone(self.0.key));
        }
    }
}

fn write(key: &str, writer: &mut Writer, bytes: &[u8]) -> Result<()> {
    writer
        .write_all(bytes)
        .map_err(|e| StorageError::io(key, e))
}

/// Reads until `buf` is full or the source ends, so that every block but the last is a full
/// one even when the source hands out short reads (pipes, sockets).
fn fill(key: &str, src: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(StorageError::Source {
                    key: key.to_owned(),
                    source,
                })
            }
        }
    }
    Ok(n)
}

/// Where the decoded blocks of one object go, shared by the threads of `fetch_blocks_at`.
struct Placer<'a> {
    key: &'a str,
    dst: &'a File,
    /// The same file opened with `O_DIRECT`, for blocks aligned to `DIRECT_ALIGN`.
    direct: Option<&'a File>,
    /// Cleared when the filesystem refused a direct write: the rest go through `dst`.
    direct_ok: AtomicBool,
    cap: u64,
    on_bytes: &'a (dyn Fn(u64) + Sync),
    /// Bytes `on_bytes` was told of, so that a fallback does not tell of them twice.
    reported: &'a AtomicU64,
    /// Held while writing through the page cache. ext4, like most filesystems, takes the
    /// inode's lock for every buffered write, and the kernel keeps a waiter spinning while the
    /// holder copies; taking turns here instead lets the waiting thread sleep and leave the CPU
    /// to decoding.
    writing: Mutex<()>,
}

/// How many bytes `Placer` writes between starting the writeback of its file.
const WRITEBACK_EVERY: u64 = 16 << 20;

/// Alignment of the memory, offset and length of a write that bypasses the page cache: the
/// largest logical block size of common disks.
const DIRECT_ALIGN: usize = 4096;

/// The first `len` bytes of `buf` that start at a multiple of `DIRECT_ALIGN` in memory, `buf`
/// grown so they fit.
fn aligned(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len + DIRECT_ALIGN {
        buf.resize(len + DIRECT_ALIGN, 0);
    }
    let skip = buf.as_ptr().align_offset(DIRECT_ALIGN);
    &mut buf[skip..skip + len]
}

/// One block as stored, on its way to a decoding thread: `buf[..len]`, block number `index`.
struct Packed {
    index: usize,
    buf: Vec<u8>,
    len: usize,
    compressed: bool,
}

/// What a decoding thread found in one block; `buf` travels back to be filled again.
struct Decoded {
    index: usize,
    len: usize,
    crc: u32,
    buf: Vec<u8>,
}

/// How the reading of a frame in `fetch_blocks_at` stopped.
enum Stop {
    /// The end mark, and nothing after it.
    End,
    /// A block after a short one, or one starting past the expected size: either the blocks are
    /// not laid out as the offsets assume or the object holds too much, and `fetch_decompressed`
    /// tells which.
    Irregular,
    /// The storage failed, the frame is damaged, or a decoding thread reported an error (`None`:
    /// the decoding threads are gone).
    Failed(Option<StorageError>),
}

/// Reads the frame at `out.key` on the calling thread and decodes its blocks on `threads`
/// others. `None` when the frame turned out not to be laid out in full-size blocks; what was
/// written is then garbage.
fn fetch_blocks_at(
    storage: &dyn Storage,
    out: &Placer<'_>,
    expect: (u64, u32),
    threads: usize,
) -> Result<Option<Digest>> {
    let key = out.key;
    let mut frame = FrameBlocks::new(storage.open(key)?);
    let max_block = frame.max_block().map_err(|e| read_error(key, e))?;
    let threads = threads.max(1);
    // Bounded so memory stays at a few blocks per thread however far reading could run ahead.
    let in_flight_max = 2 * threads;
    let failed = AtomicBool::new(false);
    let (job_tx, job_rx) = mpsc::sync_channel::<Packed>(in_flight_max);
    // Held by the decoding threads only, so that if they all die the receiver goes with them
    // and a send fails instead of waiting forever.
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (done_tx, done_rx) = mpsc::channel::<Result<Decoded>>();
    let mut seen = Seen::default();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (jobs, done, failed) = (Arc::clone(&job_rx), done_tx.clone(), &failed);
            scope.spawn(move || decode_blocks(out, max_block, &jobs, &done, failed));
        }
        drop((job_rx, done_tx));
        let mut index = 0;
        let stop = loop {
            // Take results and buffers back as they come; wait only when enough is in flight.
            seen.extend(done_rx.try_iter(), max_block);
            while seen.free.is_empty() && seen.in_flight >= in_flight_max {
                match done_rx.recv() {
                    Ok(done) => seen.add(done, max_block),
                    Err(_) => break,
                }
            }
            if let Some(e) = seen.error.take() {
                break Stop::Failed(Some(e));
            }
            if seen.short_at.is_some_and(|at| at < index) {
                break Stop::Irregular;
            }
            let block = match frame.next_block() {
                Ok(Some(block)) => block,
                Ok(None) => break Stop::End,
                Err(e) => break Stop::Failed(Some(read_error(key, e))),
            };
            // Stop before decoding more than the object should hold: a garbled frame could
            // otherwise keep every thread busy for as long as it goes on.
            if (index as u64) * (max_block as u64) >= expect.0 {
                break Stop::Irregular;
            }
            let mut buf = seen.free.pop().unwrap_or_default();
            if buf.len() < block.len {
                buf.resize(block.len, 0);
            }
            if let Err(e) = frame.read_body(&mut buf[..block.len]) {
                break Stop::Failed(Some(read_error(key, e)));
            }
            let job = Packed {
                index,
                buf,
                len: block.len,
                compressed: block.compressed,
            };
            if job_tx.send(job).is_err() {
                break Stop::Failed(None);
            }
            seen.in_flight += 1;
            index += 1;
        };
        if !matches!(stop, Stop::End) {
            failed.store(true, Ordering::Relaxed);
        }
        drop(job_tx);
        seen.extend(done_rx.iter(), max_block);
        match (stop, seen.error.take()) {
            (Stop::Failed(Some(e)), _) | (_, Some(e)) => Err(e),
            (Stop::Failed(None), None) => Err(StorageError::io(
                key,
                io::Error::other("the lz4 decoding threads stopped"),
            )),
            (Stop::Irregular, None) => Ok(None),
            (Stop::End, None) => seen.digest(key, index, max_block, expect),
        }
    })
}

/// A decoding thread: takes blocks until the reader is done, decodes each, writes what lies
/// below the cap at the block's offset and reports its length and CRC-32C. After any failure
/// it only drains the queue.
fn decode_blocks(
    out: &Placer<'_>,
    max_block: usize,
    jobs: &Mutex<mpsc::Receiver<Packed>>,
    done: &mpsc::Sender<Result<Decoded>>,
    failed: &AtomicBool,
) {
    let mut raw = Vec::new();
    loop {
        let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(job) = job else { break };
        if failed.load(Ordering::Relaxed) {
            continue;
        }
        let result = out.place(job, max_block, &mut raw);
        if result.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        // The reader holds its end until every decoding thread has finished.
        let _ = done.send(result);
    }
}

impl Placer<'_> {
    fn place(&self, job: Packed, max_block: usize, raw: &mut Vec<u8>) -> Result<Decoded> {
        let packed = &job.buf[..job.len];
        let out = aligned(raw, max_block);
        let bytes: &[u8] = if job.compressed {
            let n = decode_block_into(packed, out).map_err(|e| corrupt(self.key, e.to_string()))?;
            &out[..n]
        } else if self.direct.is_some() && packed.len() <= out.len() {
            // Copied to aligned memory, which a direct write needs.
            out[..packed.len()].copy_from_slice(packed);
            &out[..packed.len()]
        } else {
            packed
        };
        let at = job.index as u64 * max_block as u64;
        let below_cap = self.cap.saturating_sub(at);
        let take = bytes
            .len()
            .min(usize::try_from(below_cap).unwrap_or(usize::MAX));
        if take > 0 {
            self.put(&bytes[..take], at)
                .map_err(|e| destination(self.key, e))?;
            let before = self.reported.fetch_add(take as u64, Ordering::Relaxed);
            if before / WRITEBACK_EVERY != (before + take as u64) / WRITEBACK_EVERY {
                // A big file would otherwise reach the disk only at the restore's final sync.
                crate::start_writeback(self.dst);
            }
            (self.on_bytes)(take as u64);
        }
        Ok(Decoded {
            index: job.index,
            len: bytes.len(),
            crc: crc32c::crc32c(bytes),
            buf: job.buf,
        })
    }

    /// Write `bytes` at `at`, past the page cache when they are aligned for it. Only buffered
    /// writes take turns (see `writing`): a direct one sleeps while the device works.
    fn put(&self, bytes: &[u8], at: u64) -> io::Result<()> {
        let aligned = at % DIRECT_ALIGN as u64 == 0
            && bytes.len() % DIRECT_ALIGN == 0
            && (bytes.as_ptr() as usize) % DIRECT_ALIGN == 0;
        if let Some(direct) = self.direct.filter(|_| aligned) {
            if self.direct_ok.load(Ordering::Relaxed) {
                match direct.write_all_at(bytes, at) {
                    Ok(()) => return Ok(()),
                    // The filesystem takes O_DIRECT opens but not these writes.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.direct_ok.store(false, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let _turn = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        self.dst.write_all_at(bytes, at)
    }
}

/// What the reader of `fetch_blocks_at` has heard back from the decoding threads.
#[derive(Default)]
struct Seen {
    /// Raw length and CRC-32C of each block, by block number.
    blocks: Vec<Option<(usize, u32)>>,
    /// Lowest number of a block shorter than the frame's block size.
    short_at: Option<usize>,
    free: Vec<Vec<u8>>,
    in_flight: usize,
    error: Option<StorageError>,
}

impl Seen {
    fn extend(&mut self, done: impl Iterator<Item = Result<Decoded>>, max_block: usize) {
        for d in done {
            self.add(d, max_block);
        }
    }

    fn add(&mut self, done: Result<Decoded>, max_block: usize) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let d = match done {
            Ok(d) => d,
            Err(e) => {
                self.error.get_or_insert(e);
                return;
            }
        };
        if self.blocks.len() <= d.index {
            self.blocks.resize(d.index + 1, None);
        }
        self.blocks[d.index] = Some((d.len, d.crc));
        if d.len < max_block {
            self.short_at = Some(self.short_at.map_or(d.index, |at| at.min(d.index)));
        }
        self.free.push(d.buf);
    }

    /// Size and CRC-32C of the whole object from those of its `n` blocks, checked against
    /// `expect`; `None` if a block other than the last is short, which put the later blocks at
    /// the wrong offsets.
    fn digest(
        &self,
        key: &str,
        n: usize,
        max_block: usize,
        expect: (u64, u32),
    ) -> Result<Option<Digest>> {
        if self.short_at.is_some_and(|at| at + 1 < n) {
            return Ok(None);
        }
        let past_block = ZerosAppended::new(max_block);
        let (mut size, mut crc) = (0u64, 0u32);
        for i in 0..n {
            let Some(&Some((len, block_crc))) = self.blocks.get(i) else {
                let e = io::Error::other(format!("lz4 block {i} was never decoded"));
                return Err(StorageError::io(key, e));
            };
            crc = if len == max_block {
                past_block.apply(crc) ^ block_crc
            } else {
                crc32c::crc32c_combine(crc, block_crc, len)
            };
            size += len as u64;
        }
        let digest = Digest {
            size,
            crc32c: crc,
            sha256: None,
        };
        check_expected(key, expect, &digest)?;
        Ok(Some(digest))
    }
}

/// What appending `len` zero bytes does to a CRC-32C: the CRC of `a` followed by `b` is this
/// applied to the CRC of `a`, xor the CRC of `b`, when `b` is `len` bytes long.
///
/// `crc32c_combine` builds this map anew on every call, which for a 1 MiB block costs more than
/// the block's CRC itself; the blocks of a frame all have the same length but the last, so it is
/// built once and applied with at most 32 xors per block.
struct ZerosAppended {
    /// The image of each bit of the CRC register: the map is linear over GF(2).
    columns: [u32; 32],
}

impl ZerosAppended {
    fn new(len: usize) -> Self {
        // One zero bit shifts the (bit-reflected) register right by one and folds the
        // polynomial in for a bit shifted out. That shift commutes with appending `len` zero
        // bytes, and turns bit i into bit i - 1, so each column follows from the one above.
        let mut columns = [0u32; 32];
        columns[31] = crc32c::crc32c_combine(1 << 31, 0, len);
        for i in (0..31).rev() {
            let above = columns[i + 1];
            columns[i] = (above >> 1) ^ if above & 1 == 1 { CASTAGNOLI } else { 0 };
        }
        ZerosAppended { columns }
    }

    fn apply(&self, crc: u32) -> u32 {
        (0..32)
            .filter(|bit| crc >> bit & 1 == 1)
            .fold(0, |acc, bit| acc ^ self.columns[bit])
    }
}

/// The CRC-32C polynomial, bit-reflected.
const CASTAGNOLI: u32 = 0x82F6_3B78;

/// Writes a stream into a file from offset 0, dropping what lies past `cap`, and tells
/// `on_bytes` only of bytes past `reported`: the fallback of `fetch_decompressed_at`, whose
/// abandoned attempt already told of those.
struct SequentialAt<'a> {
    file: &'a File,
    pos: u64,
    cap: u64,
    reported: u64,
    on_bytes: &'a (dyn Fn(u64) + Sync),
}

impl Write for SequentialAt<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let below_cap = self.cap.saturating_sub(self.pos);
        let take = buf
            .len()
            .min(usize::try_from(below_cap).unwrap_or(usize::MAX));
        if take == 0 {
            return Ok(buf.len());
        }
        self.file.write_all_at(&buf[..take], self.pos)?;
        let end = self.pos + take as u64;
        let fresh = end.saturating_sub(self.pos.max(self.reported));
        if fresh > 0 {
            (self.on_bytes)(fresh);
        }
        self.pos = end;
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The size and CRC-32C the catalog recorded must be what came out.
fn check_expected(key: &str, (size, crc): (u64, u32), digest: &Digest) -> Result<()> {
    if digest.size != size || digest.crc32c != crc {
        let detail = format!(
            "expected {size} bytes with crc32c {crc:08x}, found {} bytes with crc32c {:08x}",
            digest.size, digest.crc32c
        );
        return Err(corrupt(key, detail));
    }
    Ok(())
}

fn destination(key: &str, source: io::Error) -> StorageError {
    StorageError::Destination {
        key: key.to_owned(),
        source,
    }
}

/// Only a panic in sha2 could get here; reported as an I/O error rather than propagated.
fn helper_gone(key: &str) -> StorageError {
    StorageError::io(key, io::Error::other("a compressing thread stopped"))
}

fn corrupt(key: &str, detail: String) -> StorageError {
    StorageError::Corrupt {
        key: key.to_owned(),
        detail,
    }
}

/// A frame problem is corruption of the object; anything else is the storage failing.
fn read_error(key: &str, err: io::Error) -> StorageError {
    match FrameError::from_io(&err) {
        Some(frame) => corrupt(key, frame.to_string()),
        None => StorageError::io(key, err),
    }
}

thread_local! {
    /// Block buffers kept per thread across objects: a backup stores thousands of small files,
    /// and zeroing a fresh megabyte for each would cost more than reading them.
    static BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn with_buffers<T>(f: impl FnOnce(&mut Vec<Vec<u8>>) -> T) -> T {
    BUFFERS.with(|cell| {
        // Taken out rather than borrowed, so a nested call (a source that itself stores
        // objects) starts with an empty pool instead of a borrow conflict.
        let mut buffers = cell.take();
        let result = f(&mut buffers);
        buffers.truncate(POOL_SIZE);
        cell.replace(buffers);
        result
    })
}

const POOL_SIZE: usize = 2 * SLOTS;

/// A buffer of exactly `BLOCK_SIZE` bytes, from the pool when it holds one big enough.
fn take_buffer(buffers: &mut Vec<Vec<u8>>) -> Vec<u8> {
    match buffers.pop() {
        Some(mut buf) if buf.capacity() >= BLOCK_SIZE => {
            buf.resize(BLOCK_SIZE, 0);
            buf
        }
        _ => vec![0; BLOCK_SIZE],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_appended_is_crc32c_combine() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for len in [1, 7, 64 << 10, 1 << 20, (1 << 20) + 1, 4 << 20] {
            let shift = ZerosAppended::new(len);
            for _ in 0..200 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let (a, b) = (x as u32, (x >> 32) as u32);
                assert_eq!(
                    shift.apply(a) ^ b,
                    crc32c::crc32c_combine(a, b, len),
                    "{a:08x} {b:08x} {len}"
                );
            }
        }
    }
}
