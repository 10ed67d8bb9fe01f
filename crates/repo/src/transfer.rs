//! Whole-object moves between byte streams and a `Storage`: compressed stores and verified fetches.
//!
//! `store_compressed` is the hot path of archive-push. SHA-256 and CRC-32C together cost about
//! as much CPU as reading and lz4, so for sources longer than one block they run on a helper
//! thread, one block behind the thread that reads and compresses: a 16 MiB WAL segment is then
//! archived in roughly the time of the slower half instead of the sum of both.

use std::cell::RefCell;
use std::io::{self, BufRead, ErrorKind, Read, Write};
use std::sync::{mpsc, Arc};

use sha2::{Digest as _, Sha256};

use crate::{
    Commit, CompressWriter, DecompressReader, Digest, FrameError, PendingObject, Result, Storage,
    StorageError, StoredObject, BLOCK_SIZE,
};

/// Read `src` to its end, compress into a new object at `key`, commit it per `mode`. SHA-256 is
/// always computed here.
pub fn store_compressed(
    storage: &dyn Storage,
    key: &str,
    src: &mut dyn Read,
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
    let mut reader = DecompressReader::new(storage.open(key)?, sha256);
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
        dst.write_all(chunk)
            .map_err(|source| StorageError::Destination {
                key: key.to_owned(),
                source,
            })?;
        reader.consume(n);
        written += n as u64;
    }
    let digest = reader.digest();
    if let Some((size, crc)) = expect {
        if digest.size != size || digest.crc32c != crc {
            let detail = format!(
                "expected {size} bytes with crc32c {crc:08x}, found {} bytes with crc32c {:08x}",
                digest.size, digest.crc32c
            );
            return Err(corrupt(key, detail));
        }
    }
    Ok(digest)
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
    src: &mut dyn Read,
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
    std::thread::scope(|scope| {
        // Each block is shared read-only: the hasher checksums it while this thread compresses
        // it, then hands it back for reuse. Three buffers keep both threads busy.
        let (full_tx, full_rx) = mpsc::sync_channel::<(Arc<Vec<u8>>, usize)>(1);
        let (free_tx, free_rx) = mpsc::channel::<Arc<Vec<u8>>>();
        let hasher = scope.spawn(move || {
            let (mut sha, mut crc) = (Sha256::new(), 0);
            for (buf, n) in full_rx {
                sha.update(&buf[..n]);
                crc = crc32c::crc32c_append(crc, &buf[..n]);
                // The receiver outlives this thread unless the reader failed; either way a
                // lost buffer is only reallocated next time.
                let _ = free_tx.send(buf);
            }
            (<[u8; 32]>::from(sha.finalize()), crc)
        });
        let mut spare: Vec<Vec<u8>> = (0..2).map(|_| take_buffer(buffers)).collect();
        let mut block = (first, n);
        let pumped = loop {
            let (buf, n) = block;
            let shared = Arc::new(buf);
            if full_tx.send((Arc::clone(&shared), n)).is_err() {
                break Err(hasher_gone(key));
            }
            if let Err(e) = write(key, writer, &shared[..n]) {
                break Err(e);
            }
            if n < shared.len() {
                break Ok(());
            }
            drop(shared);
            let mut buf = match spare.pop().or_else(|| free_rx.recv().ok().map(unshare)) {
                Some(buf) => buf,
                None => break Err(hasher_gone(key)),
            };
            match fill(key, src, &mut buf) {
                Ok(n) => block = (buf, n),
                Err(e) => break Err(e),
            }
        };
        drop(full_tx);
        let sums = hasher.join().map_err(|_| hasher_gone(key));
        buffers.extend(spare);
        buffers.extend(free_rx.try_iter().map(unshare));
        pumped.and(sums)
    })
}

/// A block buffer back from the hasher. This thread drops its own handle before asking for a
/// buffer, so the hasher's is the only one left; a fresh buffer covers the impossible case.
fn unshare(buf: Arc<Vec<u8>>) -> Vec<u8> {
    Arc::try_unwrap(buf).unwrap_or_else(|_| vec![0; BLOCK_SIZE])
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

/// Only a panic in sha2 could get here; reported as an I/O error rather than propagated.
fn hasher_gone(key: &str) -> StorageError {
    StorageError::io(key, io::Error::other("the SHA-256 thread stopped"))
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

const POOL_SIZE: usize = 3;

fn take_buffer(buffers: &mut Vec<Vec<u8>>) -> Vec<u8> {
    buffers.pop().unwrap_or_else(|| vec![0; BLOCK_SIZE])
}
