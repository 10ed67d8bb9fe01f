//! `S3Storage`: repository objects in a bucket of an S3-compatible server, through `object_store`.
//!
//! `object_store` is asynchronous; the rest of pgkeep is plain threads. Each storage owns a small
//! tokio runtime and blocks on it (`Runtime::block_on` may be called from many threads at once,
//! as backup and restore workers do). A PUT is durable when it returns; `commit_unsynced` (the
//! many files of a backup) leaves its PUT in flight in a background task and `sync` waits for
//! them all. A pending object is buffered in memory up to [`SINGLE_PUT_MAX`] and sent as one PUT.
//!
//! A bigger object is stored in pieces: objects of [`PIECE_SIZE`] at
//! `<key>.pgkeep-pieces/<writer>/<n>`, each one PUT sent while the writer fills the next
//! ([`PIECES_IN_FLIGHT`] per storage), so memory stays bounded whatever the object's size. Once
//! every piece is stored, a small head object at `<key>` names them ([`Pieces`]); until then
//! nothing is at the key, as with a multipart upload before completion. Pieces rather than a
//! multipart upload because the head is a plain PUT: it can be conditional like any other
//! (`object_store` offers no conditional multipart completion), an interrupted upload leaves
//! plain objects that deleting the backup removes (not an upload only a lifecycle rule ends),
//! and servers that assemble a multipart object on completion by copying its parts (s3s-fs,
//! some gateways) handle every byte once instead of twice. `list` never shows pieces (no key may
//! have a component ending in `.pgkeep-pieces`); `open`, `open_range` and `size` follow a head
//! to its pieces, `delete` and `delete_prefix` remove them. Big objects are read back in parallel
//! ranged GETs ([`S3Reader`]). Over https the payload is not hashed into the request's
//! signature (`UNSIGNED-PAYLOAD`): TLS already protects it in transit, and pgkeep checks every
//! object's CRC-32C and SHA-256 itself; over plain http it is.
//!
//! `commit_new` must never replace an object. Where `init` found that the server enforces
//! `If-None-Match: *` (the probe's answer is kept in the bucket at [`keys::STORAGE_INFO`]), the
//! object (or the head of a pieced one) is created conditionally and the server refuses a second
//! writer, whose pieces are then deleted. Elsewhere the key is checked with a HEAD before the
//! PUT. That leaves a window in which two writers of the same key could both see it absent; WAL
//! keys carry the cluster's system identifier, so the only two writers of one key are retries of
//! one archiver with the same bytes. Each writer's pieces lie under a name of its own, so two
//! writers never overwrite each other's, and no writer deletes another's: pieces of a replaced
//! object stay until it is deleted. A writer deletes its own only once the head at the key is
//! known not to be its own (a head PUT that failed may have landed all the same).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    BackoffConfig, Certificate, ClientOptions, GetOptions, ObjectMeta, ObjectStore, PutMode,
    PutPayload, RetryConfig,
};
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::key::{self, piece_key, pieces_dir};
use crate::keys;
use crate::{PendingObject, Result, Storage, StorageError};

/// Where a bucket is and how to reach it (the `[repo]` keys of `type = "s3"`).
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// `http://host:port` or `https://...`.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    /// Key prefix inside the bucket ("" = the whole bucket).
    pub prefix: String,
    /// `true`: `https://bucket.host/key`; `false`: `https://host/bucket/key`.
    pub host_style: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// A private CA (PEM) to trust for https.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for S3Config {
    /// Leaves the secret out, so no log or error can print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("host_style", &self.host_style)
            .field("access_key_id", &self.access_key_id)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl S3Config {
    /// "bucket B at E", how every error names the repository.
    pub fn describe(&self) -> String {
        let mut text = format!("bucket {} at {}", self.bucket, self.endpoint);
        if !self.prefix.is_empty() {
            text = format!("prefix {} of {text}", self.prefix);
        }
        text
    }
}

/// Objects in a bucket; see the module doc.
#[derive(Debug)]
pub struct S3Storage {
    inner: Arc<Inner>,
}

/// What the storage and its pending objects share.
struct Inner {
    store: AmazonS3,
    runtime: Runtime,
    cfg: S3Config,
    /// The probe's answer read from the bucket, once per process, when first needed.
    create_enforced: OnceLock<bool>,
    /// One permit per piece upload in flight ([`PIECES_IN_FLIGHT`]).
    piece_permits: Arc<Semaphore>,
    /// The GET of [`keys::STORAGE_INFO`] started with the client, so that DNS, the connection
    /// and the TLS handshake overlap whatever the command does before its first request.
    warm: std::sync::Mutex<Option<JoinHandle<object_store::Result<Bytes>>>>,
    /// PUTs of `commit_unsynced` not yet waited for by `sync`.
    background: std::sync::Mutex<Vec<JoinHandle<Result<()>>>>,
    /// Bytes ([`UNSYNCED_BYTES`]) and requests ([`UNSYNCED_PUTS`]) of those PUTs in flight.
    unsynced_bytes: Arc<Semaphore>,
    unsynced_puts: Arc<Semaphore>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Storage")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Objects up to this size are one PUT: a WAL segment of 16 MiB, even one that does not
/// compress, is one request.
pub const SINGLE_PUT_MAX: usize = 17 << 20;

/// Bigger objects are stored in pieces of this size (the last one shorter).
pub const PIECE_SIZE: usize = 8 << 20;

/// Bytes of `commit_unsynced` PUTs a storage keeps in flight before the next one waits.
pub const UNSYNCED_BYTES: usize = 16 << 20;

/// `commit_unsynced` PUTs a storage keeps in flight before the next one waits.
pub const UNSYNCED_PUTS: usize = 16;

/// Pieces of one storage (all its uploads together) being sent at once. With each writer's
/// piece being filled, an upload's memory is at most `PIECES_IN_FLIGHT * PIECE_SIZE + writers *
/// SINGLE_PUT_MAX` (49 MiB for one writer), whatever the object's size.
pub const PIECES_IN_FLIGHT: usize = 4;

/// A head object ([`Pieces`]) is far shorter than this; only objects this short are read to see
/// whether they are one.
const HEAD_MAX: u64 = 1024;

/// The first line of a head object.
const HEAD_MAGIC: &str = "pgkeep-pieces 1";

/// Bounds a head must keep (S3's largest PUT; 80 GiB of 8 MiB pieces), so that a damaged one
/// cannot make a reader allocate or compute past them.
const MAX_PIECE_SIZE: u64 = 5 << 30;
const MAX_PIECES: u64 = 10_000;

/// What the head object of a pieced object says: the pieces are
/// `<key>.pgkeep-pieces/<writer>/<n>` for n in 0..count, each `piece_size` bytes but the last,
/// `size` bytes in all.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pieces {
    writer: String,
    piece_size: u64,
    count: u64,
    size: u64,
}

impl Pieces {
    fn text(&self) -> String {
        format!(
            "{HEAD_MAGIC}\nwriter {}\npiece-size {}\npieces {}\nsize {}\n",
            self.writer, self.piece_size, self.count, self.size
        )
    }

    /// `None` for bytes that are not a head; a head that does not add up is corrupt.
    fn parse(key: &str, bytes: &[u8]) -> Result<Option<Pieces>> {
        let Some(rest) = bytes
            .strip_prefix(HEAD_MAGIC.as_bytes())
            .and_then(|r| r.strip_prefix(b"\n"))
        else {
            return Ok(None);
        };
        let corrupt = || StorageError::Corrupt {
            key: key.to_owned(),
            detail: "the head object of a pieced object is damaged".to_owned(),
        };
        let text = std::str::from_utf8(rest).map_err(|_| corrupt())?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .ok_or_else(corrupt)
        };
        let number = |name: &str| field(name)?.parse::<u64>().map_err(|_| corrupt());
        let pieces = Pieces {
            writer: field("writer")?.to_owned(),
            piece_size: number("piece-size")?,
            count: number("pieces")?,
            size: number("size")?,
        };
        let adds_up = (1..=MAX_PIECE_SIZE).contains(&pieces.piece_size)
            && pieces.count <= MAX_PIECES
            && pieces.count == pieces.size.div_ceil(pieces.piece_size)
            && key::check(&pieces.writer).is_ok()
            && !pieces.writer.contains('/');
        if !adds_up {
            return Err(corrupt());
        }
        Ok(Some(pieces))
    }

    fn key(&self, key: &str, n: u64) -> String {
        piece_key(key, &self.writer, n)
    }
}

/// A name no other writer of this bucket uses: process, time and a count.
fn new_writer() -> String {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{nanos:x}-{n}", std::process::id())
}

impl S3Storage {
    /// A client for the configured bucket; nothing is sent until the first request.
    pub fn new(cfg: S3Config) -> Result<S3Storage> {
        let config_error = |detail: String| StorageError::Service {
            key: String::new(),
            detail,
        };
        let mut options = ClientOptions::new()
            .with_allow_http(true)
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(Duration::from_secs(120));
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| config_error(format!("cannot read ca-file {}: {e}", ca.display())))?;
            let cert = Certificate::from_pem(&pem).map_err(|_| {
                config_error(format!("ca-file {} holds no PEM certificate", ca.display()))
            })?;
            options = options.with_root_certificate(cert);
        }
        // A 5xx or a timeout is retried with backoff; a bad endpoint still fails within seconds.
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: 5,
            retry_timeout: Duration::from_secs(60),
        };
        // object_store takes a host-style endpoint as already naming the bucket.
        let endpoint = if cfg.host_style {
            host_style_endpoint(&cfg.endpoint, &cfg.bucket)
        } else {
            cfg.endpoint.clone()
        };
        let store = AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&cfg.access_key_id)
            .with_secret_access_key(&cfg.secret_access_key)
            .with_virtual_hosted_style_request(cfg.host_style)
            .with_unsigned_payload(cfg.endpoint.starts_with("https://"))
            .with_client_options(options)
            .with_retry(retry)
            .build()
            .map_err(|e| config_error(format!("{}: {}", cfg.describe(), one_line(&e))))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pgkeep-s3")
            .enable_all()
            .build()
            .map_err(|e| StorageError::io("", e))?;
        let warm = {
            let store = store.clone();
            let path = object_path(&cfg.prefix, keys::STORAGE_INFO);
            runtime.spawn(async move { store.get(&path).await?.bytes().await })
        };
        Ok(S3Storage {
            inner: Arc::new(Inner {
                warm: std::sync::Mutex::new(Some(warm)),
                store,
                runtime,
                cfg,
                create_enforced: OnceLock::new(),
                piece_permits: Arc::new(Semaphore::new(PIECES_IN_FLIGHT)),
                background: std::sync::Mutex::new(Vec::new()),
                unsynced_bytes: Arc::new(Semaphore::new(UNSYNCED_BYTES)),
                unsynced_puts: Arc::new(Semaphore::new(UNSYNCED_PUTS)),
            }),
        })
    }

    /// The bucket and endpoint, for messages.
    pub fn describe(&self) -> String {
        self.inner.cfg.describe()
    }

    /// Does the server refuse a second `If-None-Match: *` PUT of one key? Leaves nothing behind.
    fn probe_conditional_create(&self) -> Result<bool> {
        let key = keys::storage_probe(std::process::id());
        let inner = &self.inner;
        inner.put(&key, b"first".to_vec(), PutMode::Overwrite)?;
        let second = inner.put(&key, b"second".to_vec(), PutMode::Create);
        self.delete(&key)?;
        match second {
            Ok(()) => Ok(false),
            Err(StorageError::AlreadyExists { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }
}

/// Where `key` is in the bucket, under `prefix`.
fn object_path(prefix: &str, key: &str) -> Path {
    if prefix.is_empty() {
        Path::from(key)
    } else {
        Path::from(format!("{prefix}/{key}"))
    }
}

impl Inner {
    fn path(&self, key: &str) -> Path {
        object_path(&self.cfg.prefix, key)
    }

    /// The key of an object listed at `location`, `None` for objects outside the prefix.
    fn key_of<'a>(&self, location: &'a Path) -> Option<&'a str> {
        let full = location.as_ref();
        if self.cfg.prefix.is_empty() {
            return Some(full);
        }
        full.strip_prefix(self.cfg.prefix.as_str())?
            .strip_prefix('/')
    }

    fn error(&self, key: &str, e: object_store::Error) -> StorageError {
        classify(&self.cfg, key, e)
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// One PUT of `bytes` at `key` in `mode`.
    fn put(&self, key: &str, bytes: Vec<u8>, mode: PutMode) -> Result<()> {
        let path = self.path(key);
        let put = self.store.put_opts(&path, bytes.into(), mode.into());
        self.block_on(put)
            .map(|_| ())
            .map_err(|e| self.error(key, e))
    }

    /// The whole object at `key`, `None` when absent.
    fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let got = self.block_on(async {
            let got = self.store.get(&self.path(key)).await?;
            got.bytes().await
        });
        match got {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) => match self.error(key, e) {
                StorageError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    /// What a HEAD of `key` says, `None` when nothing is there.
    fn meta(&self, key: &str) -> Result<Option<ObjectMeta>> {
        match self.block_on(self.store.head(&self.path(key))) {
            Ok(meta) => Ok(Some(meta)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(key, e)),
        }
    }

    /// What the head object at `key` says, `None` when nothing or no head is there.
    fn pieces(&self, key: &str) -> Result<Option<Pieces>> {
        match self.meta(key)? {
            Some(meta) => self.pieces_in(key, meta.size),
            None => Ok(None),
        }
    }

    /// [`Inner::pieces`] of an object known to be `size` bytes long: read only if it is short
    /// enough to be a head.
    fn pieces_in(&self, key: &str, size: u64) -> Result<Option<Pieces>> {
        if size > HEAD_MAX {
            return Ok(None);
        }
        match self.get(key)? {
            Some(bytes) if bytes.len() as u64 <= HEAD_MAX => Pieces::parse(key, &bytes),
            _ => Ok(None),
        }
    }

    /// Every key under `prefix` ("" for all), pieces included.
    fn list_raw(&self, prefix: &str) -> Result<Vec<String>> {
        let root = match (self.cfg.prefix.is_empty(), prefix.is_empty()) {
            (true, true) => None,
            (false, true) => Some(Path::from(self.cfg.prefix.as_str())),
            _ => Some(self.path(prefix)),
        };
        let listed: Vec<_> = self
            .block_on(self.store.list(root.as_ref()).try_collect())
            .map_err(|e| self.error(prefix, e))?;
        let mut found: Vec<String> = listed
            .iter()
            .filter_map(|meta| self.key_of(&meta.location))
            .map(str::to_owned)
            .collect();
        found.sort_unstable();
        Ok(found)
    }

    /// Deletes the object at `key` (a piece too); absent is fine.
    fn delete_raw(&self, key: &str) -> Result<()> {
        match self.block_on(self.store.delete(&self.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(key, e)),
        }
    }

    /// Deletes every piece under the object at `key`: its own, those of an object it replaced
    /// and those of writers that did not finish.
    fn remove_pieces(&self, key: &str) -> Result<()> {
        for piece in self.list_raw(&pieces_dir(key))? {
            self.delete_raw(&piece)?;
        }
        Ok(())
    }

    /// Bytes `range` of the pieced object `pieces`, fetched piece range after piece range.
    fn read_pieces(
        &self,
        key: &str,
        pieces: &Pieces,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes> {
        if range.end > pieces.size {
            return Err(StorageError::io(
                key,
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{key} holds {} bytes, not {}", pieces.size, range.end),
                ),
            ));
        }
        let mut out = Vec::with_capacity(to_usize(range.end - range.start));
        let mut at = range.start;
        while at < range.end {
            let n = at / pieces.piece_size;
            let within = at % pieces.piece_size;
            let end = range.end.min((n + 1) * pieces.piece_size);
            let piece = pieces.key(key, n);
            let path = self.path(&piece);
            let got = self.block_on(get_range(
                self.store.clone(),
                path,
                within..within + (end - at),
            ));
            out.extend_from_slice(&got.map_err(|e| self.error(&piece, e))?);
            at = end;
        }
        Ok(Bytes::from(out))
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.meta(key)?.is_some())
    }

    /// The error of a finished background PUT, if one failed; finished ones are let go.
    fn background_error(&self) -> Result<()> {
        let mut list = self.background.lock().expect("background list");
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut *list)
            .into_iter()
            .partition(JoinHandle::is_finished);
        *list = running;
        drop(list);
        for task in done {
            self.join_background(task)?;
        }
        Ok(())
    }

    fn join_background(&self, task: JoinHandle<Result<()>>) -> Result<()> {
        match self.block_on(task) {
            Ok(put) => put,
            Err(join) => Err(StorageError::io("", io::Error::other(join))),
        }
    }

    /// Whether the server refuses a conditional PUT onto an existing key, as `init` recorded it.
    fn create_enforced(&self) -> Result<bool> {
        if let Some(&known) = self.create_enforced.get() {
            return Ok(known);
        }
        let warmed = self.warm.lock().expect("warm-up GET").take();
        let warmed = match warmed.map(|task| self.block_on(task)) {
            Some(Ok(Ok(bytes))) => Some(bytes),
            // Absent or failed: asked again, for an answer (or an error) of its own.
            _ => self.get(keys::STORAGE_INFO)?,
        };
        let Some(bytes) = warmed else {
            return Err(StorageError::Service {
                key: keys::STORAGE_INFO.to_owned(),
                detail: format!(
                    "{} holds no {}: run `pgkeep init` first",
                    self.cfg.describe(),
                    keys::STORAGE_INFO
                ),
            });
        };
        let enforced = parse_storage_info(&String::from_utf8_lossy(&bytes));
        let _ = self.create_enforced.set(enforced);
        Ok(enforced)
    }
}

impl Storage for S3Storage {
    fn create(&self, key: &str) -> Result<Box<dyn PendingObject>> {
        key::check(key)?;
        Ok(Box::new(S3Pending {
            inner: Arc::clone(&self.inner),
            path: self.inner.path(key),
            key: key.to_owned(),
            buf: Vec::new(),
            writer: None,
            pieces: 0,
            pieced_bytes: 0,
            in_flight: VecDeque::new(),
        }))
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>> {
        key::check(key)?;
        let inner = &self.inner;
        let got = inner
            .block_on(inner.store.get(&inner.path(key)))
            .map_err(|e| inner.error(key, e))?;
        if got.meta.size > HEAD_MAX {
            return Ok(Box::new(S3Reader::new(Arc::clone(inner), key, got)));
        }
        // Short enough to be the head of a pieced object.
        let bytes = inner
            .block_on(got.bytes())
            .map_err(|e| inner.error(key, e))?;
        match Pieces::parse(key, &bytes)? {
            Some(pieces) => Ok(Box::new(S3Reader::pieced(Arc::clone(inner), key, pieces))),
            None => Ok(Box::new(io::Cursor::new(bytes))),
        }
    }

    /// One ranged GET (bundled files are small), retried like the ranges of a big object.
    fn open_range(&self, key: &str, offset: u64, len: u64) -> Result<Box<dyn Read + Send>> {
        key::check(key)?;
        let inner = &self.inner;
        if len == 0 {
            return Ok(Box::new(io::empty()));
        }
        let range = offset..offset.saturating_add(len);
        let got = inner.block_on(get_range_of(
            inner.store.clone(),
            inner.path(key),
            range.clone(),
        ));
        // A short object, or one without these bytes: the head of a pieced object, maybe.
        let pieces = match &got {
            Ok((bytes, total)) if *total > HEAD_MAX => {
                return Ok(Box::new(io::Cursor::new(bytes.clone())))
            }
            Ok((_, total)) => inner.pieces_in(key, *total)?,
            Err(_) => inner.pieces(key)?,
        };
        if let Some(pieces) = pieces {
            let bytes = inner.read_pieces(key, &pieces, range)?;
            return Ok(Box::new(io::Cursor::new(bytes)));
        }
        match got {
            Ok((bytes, _)) => Ok(Box::new(io::Cursor::new(bytes))),
            Err(e) => Err(inner.error(key, e)),
        }
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        key::check(key)?;
        let inner = &self.inner;
        let Some(meta) = inner.meta(key)? else {
            return Ok(None);
        };
        Ok(Some(
            inner
                .pieces_in(key, meta.size)?
                .map_or(meta.size, |p| p.size),
        ))
    }

    fn modified(&self, key: &str) -> Result<Option<std::time::SystemTime>> {
        key::check(key)?;
        Ok(self.inner.meta(key)?.map(|m| m.last_modified.into()))
    }

    /// Keys of objects; pieces are not (see the module doc).
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let prefix = key::check_prefix(prefix)?;
        let mut found = self.inner.list_raw(prefix)?;
        found.retain(|k| key::check(k).is_ok());
        Ok(found)
    }

    /// The head first, so the object is gone at once, then its pieces (one LIST to find them).
    fn delete(&self, key: &str) -> Result<()> {
        key::check(key)?;
        self.inner.delete_raw(key)?;
        self.inner.remove_pieces(key)
    }

    fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let prefix = key::check_prefix(prefix)?;
        if prefix.is_empty() {
            return Err(StorageError::InvalidKey { key: String::new() });
        }
        // Pieces last, so no head is ever left naming a piece that is gone.
        let (pieces, objects): (Vec<String>, Vec<String>) = self
            .inner
            .list_raw(prefix)?
            .into_iter()
            .partition(|k| key::check(k).is_err());
        for key in objects.iter().chain(&pieces) {
            self.inner.delete_raw(key)?;
        }
        Ok(())
    }

    fn prepare(&self) -> Result<()> {
        let inner = &self.inner;
        if let Some(bytes) = inner.get(keys::STORAGE_INFO)? {
            let enforced = parse_storage_info(&String::from_utf8_lossy(&bytes));
            let _ = inner.create_enforced.set(enforced);
            return Ok(());
        }
        let enforced = self.probe_conditional_create()?;
        let text = format!(
            "# written by pgkeep init: does this server refuse a PUT with If-None-Match: * onto an existing key?\nconditional-create = {}\n",
            if enforced { "enforced" } else { "ignored" }
        );
        // Written once: a second init finds it above and keeps it.
        match inner.put(keys::STORAGE_INFO, text.into_bytes(), PutMode::Create) {
            Ok(()) | Err(StorageError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
        let _ = inner.create_enforced.set(enforced);
        Ok(())
    }

    fn conditional_create(&self) -> Result<Option<bool>> {
        self.inner.create_enforced().map(Some)
    }

    /// Waits for every PUT that `commit_unsynced` left in flight; the first failure, if any.
    fn sync(&self) -> Result<()> {
        let tasks = std::mem::take(&mut *self.inner.background.lock().expect("background list"));
        let mut first = Ok(());
        for task in tasks {
            let joined = self.inner.join_background(task);
            if first.is_ok() {
                first = joined;
            }
        }
        first
    }
}

/// An object being written: bytes buffered up to [`SINGLE_PUT_MAX`] for one PUT; past that,
/// pieces of [`PIECE_SIZE`] each handed to a task that uploads it while the writer fills the
/// following one, and a head object at the key once they are all stored.
struct S3Pending {
    inner: Arc<Inner>,
    path: Path,
    key: String,
    buf: Vec<u8>,
    /// This writer's name among the pieces, once the object outgrew a single PUT.
    writer: Option<String>,
    /// Pieces handed to tasks so far, and their bytes.
    pieces: u64,
    pieced_bytes: u64,
    /// Pieces being uploaded, oldest first; each holds one of the storage's piece permits.
    in_flight: VecDeque<JoinHandle<object_store::Result<()>>>,
}

impl S3Pending {
    fn error(&self, e: object_store::Error) -> StorageError {
        self.inner.error(&self.key, e)
    }

    /// Hand the buffered bytes to a task that uploads them as the next piece.
    fn send_piece(&mut self) -> Result<()> {
        let piece = Bytes::from(std::mem::take(&mut self.buf));
        self.send(piece)
    }

    /// The single PUT's buffer is full: the object goes in pieces, the buffer's whole pieces
    /// sent, the rest kept to fill the next one.
    fn start_pieces(&mut self) -> Result<()> {
        let whole = Bytes::from(std::mem::take(&mut self.buf));
        let sent = whole.len() - whole.len() % PIECE_SIZE;
        for start in (0..sent).step_by(PIECE_SIZE) {
            self.send(whole.slice(start..start + PIECE_SIZE))?;
        }
        self.buf = Vec::with_capacity(PIECE_SIZE);
        self.buf.extend_from_slice(&whole[sent..]);
        Ok(())
    }

    /// Waits first for a piece permit (at most [`PIECES_IN_FLIGHT`] pieces of this storage are
    /// in flight at once), so memory stays bounded.
    fn send(&mut self, piece: Bytes) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        let writer = self.writer.get_or_insert_with(new_writer).clone();
        // A piece that failed ends the upload now rather than at commit.
        while self.in_flight.front().is_some_and(JoinHandle::is_finished) {
            self.wait_oldest()?;
        }
        let permit = inner
            .block_on(Arc::clone(&inner.piece_permits).acquire_owned())
            .expect("the piece semaphore is never closed");
        let path = inner.path(&piece_key(&self.key, &writer, self.pieces));
        self.pieces += 1;
        self.pieced_bytes += piece.len() as u64;
        let store = inner.store.clone();
        self.in_flight.push_back(inner.runtime.spawn(async move {
            let sent = store.put(&path, PutPayload::from(piece)).await;
            drop(permit);
            sent.map(|_| ())
        }));
        Ok(())
    }

    /// Wait for the oldest piece in flight; its error, if any.
    fn wait_oldest(&mut self) -> Result<()> {
        let Some(handle) = self.in_flight.pop_front() else {
            return Ok(());
        };
        match self.inner.block_on(handle) {
            Ok(sent) => sent.map_err(|e| self.error(e)),
            Err(join) => Err(StorageError::io(&self.key, io::Error::other(join))),
        }
    }

    fn finish(&mut self, mode: PutMode) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        let Some(writer) = self.writer.clone() else {
            let payload = PutPayload::from(std::mem::take(&mut self.buf));
            let put = inner.store.put_opts(&self.path, payload, mode.into());
            return inner.block_on(put).map(|_| ()).map_err(|e| self.error(e));
        };
        let sent = (|| {
            if !self.buf.is_empty() {
                self.send_piece()?;
            }
            while !self.in_flight.is_empty() {
                self.wait_oldest()?;
            }
            Ok(())
        })();
        if let Err(e) = sent {
            self.abort();
            return Err(e);
        }
        let head = Pieces {
            writer: writer.clone(),
            piece_size: PIECE_SIZE as u64,
            count: self.pieces,
            size: self.pieced_bytes,
        };
        let put = inner
            .store
            .put_opts(&self.path, head.text().into_bytes().into(), mode.into());
        let Err(e) = inner.block_on(put) else {
            // The pieces are the object's now. Those of an object this one replaced are left:
            // deleting another writer's pieces could race that writer's head (see `delete`).
            self.writer = None;
            return Ok(());
        };
        // A PUT that failed may still have landed (an attempt that timed out, a retry refused
        // because the first one had created the key): the pieces go only once the head at the
        // key is known not to be this one.
        let e = self.error(e);
        match inner.pieces(&self.key) {
            Ok(Some(there)) if there == head => {
                self.writer = None;
                Ok(())
            }
            Ok(_) => {
                self.abort();
                Err(e)
            }
            Err(_) => {
                // Unknown: keep the pieces (garbage at worst) rather than risk a head without them.
                self.stop_in_flight();
                self.writer = None;
                Err(e)
            }
        }
    }

    fn stop_in_flight(&mut self) {
        for handle in self.in_flight.drain(..) {
            handle.abort();
            let _ = self.inner.block_on(handle);
        }
    }

    /// Stop the pieces still in flight and delete those stored, so nothing of this writer stays.
    fn abort(&mut self) {
        self.stop_in_flight();
        if let Some(writer) = self.writer.take() {
            for n in 0..self.pieces {
                let _ = self.inner.delete_raw(&piece_key(&self.key, &writer, n));
            }
        }
    }
}

impl Write for S3Pending {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.writer.is_none() {
            let room = SINGLE_PUT_MAX - self.buf.len();
            let n = data.len().min(room);
            if self.buf.capacity() - self.buf.len() < n {
                // Grow by doubling but never past the single PUT's size.
                let want = (self.buf.len() + n)
                    .max(self.buf.capacity() * 2)
                    .min(SINGLE_PUT_MAX);
                self.buf.reserve_exact(want - self.buf.len());
            }
            self.buf.extend_from_slice(&data[..n]);
            if self.buf.len() == SINGLE_PUT_MAX {
                self.start_pieces().map_err(io::Error::other)?;
            }
            return Ok(n);
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(PIECE_SIZE);
        }
        let room = PIECE_SIZE - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PIECE_SIZE {
            self.send_piece().map_err(io::Error::other)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl PendingObject for S3Pending {
    fn commit(mut self: Box<Self>) -> Result<()> {
        self.finish(PutMode::Overwrite)
    }

    /// A single-PUT object is handed to a background task and this returns at once, so the many
    /// small files of a backup are in flight together; [`Storage::sync`] waits for them all and
    /// fails if any PUT failed. At most [`UNSYNCED_BYTES`] in [`UNSYNCED_PUTS`] PUTs wait at
    /// once. A pieced object is finished here, as by `commit`.
    fn commit_unsynced(mut self: Box<Self>) -> Result<()> {
        if self.writer.is_some() {
            return self.finish(PutMode::Overwrite);
        }
        let inner = Arc::clone(&self.inner);
        inner.background_error()?;
        let bytes = std::mem::take(&mut self.buf);
        let weight = u32::try_from(bytes.len().clamp(1, UNSYNCED_BYTES)).unwrap_or(u32::MAX);
        let permits = inner.block_on(async {
            let bytes = Arc::clone(&inner.unsynced_bytes)
                .acquire_many_owned(weight)
                .await;
            let puts = Arc::clone(&inner.unsynced_puts).acquire_owned().await;
            (bytes, puts)
        });
        let store = inner.store.clone();
        let cfg = inner.cfg.clone();
        let (path, key) = (self.path.clone(), std::mem::take(&mut self.key));
        let task = inner.runtime.spawn(async move {
            let put = store.put(&path, PutPayload::from(bytes)).await;
            drop(permits);
            put.map(|_| ()).map_err(|e| classify(&cfg, &key, e))
        });
        inner.background.lock().expect("background list").push(task);
        Ok(())
    }

    fn commit_new(mut self: Box<Self>) -> Result<()> {
        if self.inner.create_enforced()? {
            return self.finish(PutMode::Create);
        }
        // HEAD, then PUT: the window is described in the module doc.
        if self.inner.exists(&self.key)? {
            self.abort();
            return Err(StorageError::AlreadyExists {
                key: self.key.clone(),
            });
        }
        self.finish(PutMode::Overwrite)
    }
}

impl Drop for S3Pending {
    fn drop(&mut self) {
        self.abort();
    }
}

/// An object's bytes as `Read`. The first GET's body is read as it streams, up to
/// [`RANGE_SIZE`] bytes for a big object; the rest of a big object comes in ranged GETs of
/// [`RANGE_SIZE`], [`RANGES_IN_FLIGHT`] of them fetched ahead in parallel (started when the
/// object is opened), so one slow round trip does not stall the reader. A ranged GET, or the
/// rest of a body cut off mid-way, is retried with backoff. A pieced object is read the same
/// way, its ranges taken from its pieces in order.
struct S3Reader {
    inner: Arc<Inner>,
    key: String,
    /// Where the bytes are: one object, or the pieces of a pieced one, each `piece_size` bytes
    /// but the last.
    paths: Vec<Path>,
    piece_size: u64,
    size: u64,
    /// The first GET's body, until `head_end`.
    stream: Option<BoxStream<'static, object_store::Result<Bytes>>>,
    head_end: u64,
    /// Bytes handed out so far, plus those in `chunk`.
    pos: u64,
    chunk: Bytes,
    /// Ranged GETs started, in order.
    ahead: VecDeque<JoinHandle<object_store::Result<Bytes>>>,
    /// Where the next ranged GET to start begins.
    next_range: u64,
}

/// Big objects are read in ranged GETs of this size.
pub const RANGE_SIZE: u64 = 4 << 20;

/// Ranged GETs one reader keeps in flight: its memory is at most `(RANGES_IN_FLIGHT + 1) *
/// RANGE_SIZE` (20 MiB).
pub const RANGES_IN_FLIGHT: usize = 4;

/// Attempts at a ranged GET whose request or body failed with a transient error.
const RANGE_ATTEMPTS: u32 = 4;

impl S3Reader {
    fn new(inner: Arc<Inner>, key: &str, got: object_store::GetResult) -> S3Reader {
        let size = got.meta.size;
        let head_end = if size > 2 * RANGE_SIZE {
            RANGE_SIZE
        } else {
            size
        };
        let path = got.meta.location.clone();
        let mut reader = S3Reader {
            inner,
            key: key.to_owned(),
            paths: vec![path],
            piece_size: size.max(1),
            size,
            stream: Some(got.into_stream()),
            head_end,
            pos: 0,
            chunk: Bytes::new(),
            ahead: VecDeque::new(),
            next_range: head_end,
        };
        reader.fetch_ahead();
        reader
    }

    fn pieced(inner: Arc<Inner>, key: &str, pieces: Pieces) -> S3Reader {
        let paths = (0..pieces.count)
            .map(|n| inner.path(&pieces.key(key, n)))
            .collect();
        let mut reader = S3Reader {
            inner,
            key: key.to_owned(),
            paths,
            piece_size: pieces.piece_size,
            size: pieces.size,
            stream: None,
            head_end: 0,
            pos: 0,
            chunk: Bytes::new(),
            ahead: VecDeque::new(),
            next_range: 0,
        };
        reader.fetch_ahead();
        reader
    }

    /// Start ranged GETs until [`RANGES_IN_FLIGHT`] are in flight or the object is covered. No
    /// range spans two pieces.
    fn fetch_ahead(&mut self) {
        while self.ahead.len() < RANGES_IN_FLIGHT && self.next_range < self.size {
            let n = self.next_range / self.piece_size;
            let piece_end = self.size.min((n + 1) * self.piece_size);
            let end = piece_end.min(self.next_range + RANGE_SIZE);
            let start = self.next_range - n * self.piece_size;
            let range = start..start + (end - self.next_range);
            self.next_range = end;
            let store = self.inner.store.clone();
            let path = self.paths[to_usize(n)].clone();
            self.ahead
                .push_back(self.inner.runtime.spawn(get_range(store, path, range)));
        }
    }

    fn error(&self, e: object_store::Error) -> io::Error {
        io::Error::other(self.inner.error(&self.key, e))
    }

    /// The next bytes of the object, empty at its end.
    fn next_chunk(&mut self) -> io::Result<Bytes> {
        if self.pos < self.head_end {
            let next = match self.stream.as_mut() {
                Some(stream) => self.inner.block_on(stream.next()),
                None => None,
            };
            return match next {
                Some(Ok(bytes)) => {
                    Ok(bytes.slice(..bytes.len().min(to_usize(self.head_end - self.pos))))
                }
                // A body cut short or broken off: the rest of the head in ranged GETs.
                None | Some(Err(_)) => {
                    self.stream = None;
                    let store = self.inner.store.clone();
                    let rest = get_range(store, self.paths[0].clone(), self.pos..self.head_end);
                    self.inner.block_on(rest).map_err(|e| self.error(e))
                }
            };
        }
        // The head is done: no need to hold its connection.
        self.stream = None;
        let Some(handle) = self.ahead.pop_front() else {
            return Ok(Bytes::new());
        };
        let got = self.inner.block_on(handle);
        self.fetch_ahead();
        match got {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(e)) => Err(self.error(e)),
            Err(join) => Err(io::Error::other(join)),
        }
    }
}

impl Read for S3Reader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            if self.pos >= self.size {
                return Ok(0);
            }
            let chunk = self.next_chunk()?;
            if chunk.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} ended at byte {} of {}", self.key, self.pos, self.size),
                ));
            }
            self.pos += chunk.len() as u64;
            self.chunk = chunk;
        }
        let n = out.len().min(self.chunk.len());
        out[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

impl Drop for S3Reader {
    fn drop(&mut self) {
        for handle in self.ahead.drain(..) {
            handle.abort();
        }
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Bytes `range` of the object at `path`, retried with backoff while the failure may pass (a
/// 5xx, a timeout, a connection or body cut off); a short answer counts as such a failure.
async fn get_range(
    store: AmazonS3,
    path: Path,
    range: std::ops::Range<u64>,
) -> object_store::Result<Bytes> {
    get_range_of(store, path, range)
        .await
        .map(|(bytes, _)| bytes)
}

/// [`get_range`], and the size of the whole object.
async fn get_range_of(
    store: AmazonS3,
    path: Path,
    range: std::ops::Range<u64>,
) -> object_store::Result<(Bytes, u64)> {
    let want = range.end - range.start;
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        let options = GetOptions {
            range: Some(range.clone().into()),
            ..GetOptions::default()
        };
        let got = match store.get_opts(&path, options).await {
            Ok(got) => {
                let total = got.meta.size;
                got.bytes().await.map(|bytes| (bytes, total))
            }
            Err(e) => Err(e),
        };
        let got = match got {
            Ok((bytes, total)) if bytes.len() as u64 == want => return Ok((bytes, total)),
            // The object is shorter than the range: asking again will not lengthen it.
            Ok((_, total)) if total < range.end => {
                return Err(object_store::Error::Generic {
                    store: "S3",
                    source: format!("{path} holds {total} bytes, not {}", range.end).into(),
                })
            }
            Ok((bytes, _)) => object_store::Error::Generic {
                store: "S3",
                source: format!(
                    "bytes {}..{} of {path} came back {} bytes long",
                    range.start,
                    range.end,
                    bytes.len()
                )
                .into(),
            },
            Err(e) => e,
        };
        let lasting = matches!(
            got,
            object_store::Error::NotFound { .. }
                | object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
                | object_store::Error::Precondition { .. }
        ) || beyond_the_end(&got);
        if lasting || attempt >= RANGE_ATTEMPTS {
            return Err(got);
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
        attempt += 1;
    }
}

/// A range that starts past the object's end (416): it will not be there on a retry either.
fn beyond_the_end(e: &object_store::Error) -> bool {
    let text = chain(e);
    text.contains("416") || text.contains("InvalidRange") || text.contains("Range Not Satisfiable")
}

/// `scheme://bucket.host[:port][/path]` for `scheme://host[:port][/path]`: where `uri-style =
/// "host"` sends requests.
fn host_style_endpoint(endpoint: &str, bucket: &str) -> String {
    match endpoint.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{bucket}.{rest}"),
        None => format!("{bucket}.{endpoint}"),
    }
}

fn parse_storage_info(text: &str) -> bool {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .any(|(k, v)| k.trim() == "conditional-create" && v.trim() == "enforced")
}

/// Turns a client error into one line that names the endpoint and bucket and says what to do;
/// never the secret, which no `object_store` error carries.
fn classify(cfg: &S3Config, key: &str, e: object_store::Error) -> StorageError {
    let text = chain(&e);
    let service = |detail: String| StorageError::Service {
        key: key.to_owned(),
        detail,
    };
    match e {
        _ if text.contains("NoSuchBucket") => service(format!(
            "bucket {} does not exist at {}: create the bucket or fix [repo] bucket",
            cfg.bucket, cfg.endpoint
        )),
        object_store::Error::NotFound { .. } => StorageError::NotFound {
            key: key.to_owned(),
        },
        object_store::Error::AlreadyExists { .. }
        | object_store::Error::Precondition { .. }
        | object_store::Error::NotModified { .. } => StorageError::AlreadyExists {
            key: key.to_owned(),
        },
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            service(format!(
                "access denied to {} (writing or reading {key}): check access-key-id and secret-access-key (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
                cfg.describe()
            ))
        }
        _ if text.contains("InvalidAccessKeyId") || text.contains("SignatureDoesNotMatch") => {
            service(format!(
                "access denied to {}: check access-key-id and secret-access-key (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
                cfg.describe()
            ))
        }
        _ if text.contains("UnknownIssuer")
            || text.contains("unable to get local issuer")
            || text.contains("self-signed")
            || text.contains("self signed") =>
        {
            service(format!(
                "the TLS certificate of {} is not trusted (bucket {}): set [repo] ca-file to the CA that signed it, or fix the endpoint ({})",
                cfg.endpoint,
                cfg.bucket,
                last_cause(&text)
            ))
        }
        _ if text.to_lowercase().contains("certificate") || text.contains("tls") => {
            service(format!(
                "TLS failure talking to {} for bucket {}: check the endpoint and ca-file ({})",
                cfg.endpoint,
                cfg.bucket,
                last_cause(&text)
            ))
        }
        _ if text.contains("error sending request") || text.contains("Connect") => {
            service(format!(
                "cannot reach {} for bucket {}: is the endpoint right and the server up? ({})",
                cfg.endpoint,
                cfg.bucket,
                last_cause(&text)
            ))
        }
        _ => service(format!(
            "request for {key} to {} failed: {}",
            cfg.describe(),
            last_cause(&text)
        )),
    }
}

/// The error and its sources as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = one_line(e);
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&one_line(s));
        source = s.source();
    }
    text
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    let mut line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.len() > 300 {
        let mut cut = 300;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
    }
    line
}

/// The innermost cause of a joined chain: usually the one that says what happened.
fn last_cause(text: &str) -> &str {
    text.rsplit(": ").next().unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_names_its_pieces_and_damage_is_corruption() {
        let head = Pieces {
            writer: new_writer(),
            piece_size: 8 << 20,
            count: 3,
            size: (16 << 20) + 5,
        };
        let text = head.text();
        assert!(text.len() < HEAD_MAX as usize / 4, "{text}");
        assert_eq!(
            Pieces::parse("k", text.as_bytes()).unwrap(),
            Some(head.clone())
        );
        assert_eq!(
            head.key("a/b.lz4", 2),
            format!("a/b.lz4.pgkeep-pieces/{}/00002", head.writer)
        );
        assert!(key::check(&head.key("a/b.lz4", 2)).is_err());
        assert_ne!(new_writer(), new_writer());
        // Anything else is an object of its own.
        for other in [
            &b"\x04\x22\x4d\x18"[..],
            b"[backup]\n",
            b"",
            b"pgkeep-pieces 1",
        ] {
            assert_eq!(Pieces::parse("k", other).unwrap(), None);
        }
        let damaged = [
            text.replace("pieces 3", "pieces 2"),
            text.replace("size 16777221", "size x"),
            text.replace(&format!("writer {}", head.writer), "writer a/b"),
            text.replace("piece-size 8388608", "piece-size 0"),
            text.replace("piece-size 8388608", "piece-size 1")
                .replace("size 16777221", "size 1099511627776")
                .replace("pieces 3", "pieces 1099511627776"),
            format!("{HEAD_MAGIC}\n"),
        ];
        for bad in damaged {
            assert!(
                matches!(
                    Pieces::parse("k", bad.as_bytes()),
                    Err(StorageError::Corrupt { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn storage_info_is_read_back() {
        assert!(parse_storage_info("# x\nconditional-create = enforced\n"));
        assert!(!parse_storage_info("conditional-create = ignored\n"));
        assert!(!parse_storage_info(""));
    }

    #[test]
    fn host_style_puts_the_bucket_in_the_host_name() {
        assert_eq!(
            host_style_endpoint("https://localhost:9000", "pgkeep"),
            "https://pgkeep.localhost:9000"
        );
        assert_eq!(
            host_style_endpoint("http://s3.example.com/", "b"),
            "http://b.s3.example.com/"
        );
    }

    #[test]
    fn a_host_style_store_sends_requests_to_the_bucket_host() {
        let storage = S3Storage::new(S3Config {
            endpoint: "https://s3.example.com:8443".into(),
            bucket: "pgkeep".into(),
            region: "us-east-1".into(),
            prefix: "p".into(),
            host_style: true,
            access_key_id: "AKID".into(),
            secret_access_key: "very-secret".into(),
            ca_file: None,
        })
        .unwrap();
        let debug = format!("{:?}", storage.inner.store);
        assert!(
            debug.contains("bucket_endpoint: \"https://pgkeep.s3.example.com:8443\""),
            "{debug}"
        );
    }

    #[test]
    fn debug_output_leaves_the_secret_out() {
        let cfg = S3Config {
            endpoint: "http://127.0.0.1:9".into(),
            bucket: "b".into(),
            region: "us-east-1".into(),
            prefix: "p".into(),
            host_style: false,
            access_key_id: "AKID".into(),
            secret_access_key: "very-secret".into(),
            ca_file: None,
        };
        assert!(!format!("{cfg:?}").contains("very-secret"));
        assert_eq!(cfg.describe(), "prefix p of bucket b at http://127.0.0.1:9");
    }
}
