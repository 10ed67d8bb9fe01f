//! Repository storage for pgkeep: where backup and WAL bytes live and how they are packed.
//!
//! A [`Storage`] holds objects under '/'-separated keys and makes each write durable and visible
//! in one step ([`PendingObject::commit`], or [`PendingObject::commit_new`] when an existing
//! object must never be replaced); [`LocalStorage`] keeps them in a directory tree,
//! [`S3Storage`] in a bucket of an S3-compatible server and [`MemoryStorage`] in memory for tests. Object contents are LZ4 frames written by
//! [`CompressWriter`] and read by [`DecompressReader`], which compute the size, CRC-32C and
//! SHA-256 of the raw bytes while they stream, so nothing is read twice; [`store_compressed`] and
//! [`fetch_decompressed`] put the two together ([`fetch_decompressed_at`] decodes the blocks of a
//! big object on several threads), and [`keys`] is the one place that knows how the repository is
//! laid out.

use std::io::{self, Read, Write};

mod durable;
mod key;
pub mod keys;
mod local;
mod memory;
mod s3;
mod stream;
mod transfer;

pub use durable::{syncfs_reports_errors, FsSync};
pub use local::{open_direct, start_writeback, LocalStorage, SyncMethod};
pub use memory::MemoryStorage;
pub use s3::{S3Config, S3Storage};
pub use stream::{CompressWriter, DecompressReader, Digest, FrameError, BLOCK_SIZE};
pub use transfer::{
    decompress_into, fetch_decompressed, fetch_decompressed_at, get_bytes, put_bytes,
    store_compressed,
};

/// What can go wrong storing or fetching a repository object; every variant names the key.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("no object at {key} in the repository")]
    NotFound { key: String },
    #[error("an object already exists at {key} in the repository")]
    AlreadyExists { key: String },
    #[error("i/o error on {key} in the repository")]
    Io {
        key: String,
        #[source]
        source: io::Error,
    },
    #[error("object {key} in the repository is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    /// Keys are relative, '/'-separated, with no "." or ".." and no empty components.
    #[error("invalid repository key {key:?}")]
    InvalidKey { key: String },
    /// Reading the bytes to be stored at `key` failed (the source, not the repository).
    #[error("reading the data to store at {key}")]
    Source {
        key: String,
        #[source]
        source: io::Error,
    },
    /// The storage service refused or failed a request; `detail` is one line naming the
    /// service (endpoint and bucket) and what to do.
    #[error("{detail}")]
    Service { key: String, detail: String },
    /// Writing out the bytes fetched from `key` failed (the destination, not the repository).
    #[error("writing out the data fetched from {key}")]
    Destination {
        key: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

impl StorageError {
    /// The key the error is about.
    pub fn key(&self) -> &str {
        match self {
            StorageError::NotFound { key }
            | StorageError::AlreadyExists { key }
            | StorageError::Io { key, .. }
            | StorageError::Corrupt { key, .. }
            | StorageError::InvalidKey { key }
            | StorageError::Service { key, .. }
            | StorageError::Source { key, .. }
            | StorageError::Destination { key, .. } => key,
        }
    }

    pub(crate) fn io(key: &str, source: io::Error) -> Self {
        StorageError::Io {
            key: key.to_owned(),
            source,
        }
    }
}

/// Where repository bytes live (a local directory, or a bucket of an S3-compatible server). Keys are
/// '/'-separated relative paths.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Start writing a new object at `key`; nothing is visible under `key` until commit.
    fn create(&self, key: &str) -> Result<Box<dyn PendingObject>>;
    /// Read the object at `key`; `NotFound` when absent.
    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>>;
    /// Read `len` bytes of the object at `key` from byte `offset` (one file of a bundle);
    /// `NotFound` when absent. An object that ends early gives fewer bytes, which the frame
    /// decoder reports as a truncated object.
    fn open_range(&self, key: &str, offset: u64, len: u64) -> Result<Box<dyn Read + Send>> {
        let mut object = self.open(key)?;
        let skipped = io::copy(&mut (&mut object).take(offset), &mut io::sink())
            .map_err(|e| StorageError::io(key, e))?;
        if skipped < offset {
            return Ok(Box::new(io::empty()));
        }
        Ok(Box::new(object.take(len)))
    }
    /// Size in bytes of the stored object, `None` when absent.
    fn size(&self, key: &str) -> Result<Option<u64>>;
    /// When the object at `key` was stored, where the backend keeps it; `None` when absent or
    /// unknown. Only informative (`catalog rebuild` takes it as a WAL file's archive time).
    fn modified(&self, _key: &str) -> Result<Option<std::time::SystemTime>> {
        Ok(None)
    }
    /// Every key under `prefix` (a "directory"; "" = all), recursive, sorted; temp files of
    /// uncommitted writes are never listed.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Remove the object at `key`; absent is not an error.
    fn delete(&self, key: &str) -> Result<()>;
    /// Remove the whole "directory" `prefix`; absent is not an error. The empty prefix (the
    /// whole repository) is refused as an invalid key, so a bug cannot wipe the repository.
    fn delete_prefix(&self, prefix: &str) -> Result<()>;
    /// Make every object committed so far durable, including those committed with
    /// [`PendingObject::commit_unsynced`], and fail if any of their bytes could not be written
    /// (local fs: syncfs(2) of the repository's filesystem through a descriptor held since
    /// before the first write, or an fsync of each such object on kernels whose syncfs reports
    /// no errors). Backends whose commits are durable on their own need not override it.
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    /// Called by `init` before anything is stored: check that the repository can be reached
    /// and written, and probe and record what the backend may lack (object storage: whether
    /// the server enforces conditional creates).
    fn prepare(&self) -> Result<()> {
        Ok(())
    }
    /// Whether [`PendingObject::commit_new`] is enforced by the backend itself: `None` where it
    /// always is (a filesystem's link(2)), else what `prepare` found.
    fn conditional_create(&self) -> Result<Option<bool>> {
        Ok(None)
    }
    /// Make the committed object at `key` durable, whoever committed it: for an object left by
    /// another process that may have died before its own fsyncs (local fs: fsync of the file
    /// and of its directory). `NotFound` when absent.
    fn sync_object(&self, key: &str) -> Result<()> {
        match self.size(key)? {
            Some(_) => Ok(()),
            None => Err(StorageError::NotFound {
                key: key.to_owned(),
            }),
        }
    }
}

/// An object being written; `Write` into it, then commit. Dropping it without commit discards
/// the bytes (the local backend removes its temporary file).
pub trait PendingObject: Write + Send {
    /// Make the object durable and visible under its key, replacing what was there (local fs:
    /// fsync file, rename, fsync dir).
    fn commit(self: Box<Self>) -> Result<()>;
    /// Same, but never replace: `AlreadyExists` if an object is already at the key, even under a
    /// race with another process (local fs: link(2) temp -> final, then unlink temp, fsync dir).
    fn commit_new(self: Box<Self>) -> Result<()>;
    /// Make the object visible under its key, replacing, without waiting for the disk (local fs:
    /// rename only). A crash of the process still never shows a partial object, but after a
    /// crash of the machine before the next [`Storage::sync`] the object may be empty or short:
    /// for the many files of a backup, which counts as complete only after that sync.
    fn commit_unsynced(self: Box<Self>) -> Result<()> {
        self.commit()
    }
}

/// Outcome of storing one object.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct StoredObject {
    /// Checksums of the raw bytes (SHA-256 always present).
    pub digest: Digest,
    /// Bytes the object takes in the repository.
    pub stored_size: u64,
}

/// How [`store_compressed`] makes its object visible.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Commit {
    /// Replace whatever is at the key.
    Replace,
    /// Fail with `AlreadyExists` rather than replace (WAL archive: never overwrite).
    New,
}
