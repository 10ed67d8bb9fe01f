//! `S3Storage`: repository objects in a bucket of an S3-compatible server, through `object_store`.
//!
//! `object_store` is asynchronous; the rest of pgkeep is plain threads. Each storage owns a small
//! tokio runtime and blocks on it (`Runtime::block_on` may be called from many threads at once,
//! as backup and restore workers do). A PUT is durable when it returns; `commit_unsynced` (the
//! many files of a backup) leaves its PUT in flight in a background task and `sync` waits for
//! them all. A pending object is buffered in memory up to [`SINGLE_PUT_MAX`] and sent as one PUT,
//! or, once bigger, as a multipart upload of [`PART_SIZE`] parts sent in parallel ([`PARTS_IN_FLIGHT`]),
//! so memory per upload stays bounded whatever the object's size; big objects are read back in
//! parallel ranged GETs ([`S3Reader`]). Over https the payload is not hashed into the request's
//! signature (`UNSIGNED-PAYLOAD`): TLS already protects it in transit, and pgkeep checks every
//! object's CRC-32C and SHA-256 itself; over plain http it is.
//!
//! `commit_new` must never replace an object. Where `init` found that the server enforces
//! `If-None-Match: *` (the probe's answer is kept in the bucket at [`keys::STORAGE_INFO`]), a
//! single-PUT object is created conditionally and the server refuses a second writer. Elsewhere
//! (and for multipart objects, whose conditional completion `object_store` does not offer) the
//! key is checked with a HEAD before the PUT. That leaves a window in which two writers of the
//! same key could both see it absent; WAL keys carry the cluster's system identifier, so the only
//! two writers of one key are retries of one archiver with the same bytes.

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
    BackoffConfig, Certificate, ClientOptions, MultipartUpload, ObjectStore, PutMode, PutPayload,
    RetryConfig,
};
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::key;
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
    /// One permit per part upload in flight ([`PARTS_IN_FLIGHT`]).
    part_permits: Arc<Semaphore>,
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
/// compress, is one request (a multipart upload of it costs three requests and, on servers that
/// assemble parts on completion, every byte twice).
pub const SINGLE_PUT_MAX: usize = 17 << 20;

/// Bigger objects are uploaded in parts of this size.
pub const PART_SIZE: usize = 8 << 20;

/// Bytes of `commit_unsynced` PUTs a storage keeps in flight before the next one waits.
pub const UNSYNCED_BYTES: usize = 16 << 20;

/// `commit_unsynced` PUTs a storage keeps in flight before the next one waits.
pub const UNSYNCED_PUTS: usize = 16;

/// Parts of one storage (all its uploads together) being sent at once. With each writer's part
/// being filled, an upload's memory is at most `PARTS_IN_FLIGHT * PART_SIZE + writers *
/// SINGLE_PUT_MAX` (49 MiB for one writer), whatever the object's size.
pub const PARTS_IN_FLIGHT: usize = 4;

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
                part_permits: Arc::new(Semaphore::new(PARTS_IN_FLIGHT)),
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

    fn exists(&self, key: &str) -> Result<bool> {
        match self.block_on(self.store.head(&self.path(key))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error(key, e)),
        }
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
            upload: None,
            in_flight: VecDeque::new(),
        }))
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>> {
        key::check(key)?;
        let inner = &self.inner;
        let got = inner
            .block_on(inner.store.get(&inner.path(key)))
            .map_err(|e| inner.error(key, e))?;
        Ok(Box::new(S3Reader::new(Arc::clone(inner), key, got)))
    }

    /// One ranged GET (bundled files are small), retried like the ranges of a big object.
    fn open_range(&self, key: &str, offset: u64, len: u64) -> Result<Box<dyn Read + Send>> {
        key::check(key)?;
        let inner = &self.inner;
        if len == 0 {
            return Ok(Box::new(io::empty()));
        }
        let got = inner.block_on(get_range(
            inner.store.clone(),
            inner.path(key),
            offset..offset.saturating_add(len),
        ));
        match got {
            Ok(bytes) => Ok(Box::new(io::Cursor::new(bytes))),
            Err(e) => Err(inner.error(key, e)),
        }
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        key::check(key)?;
        let inner = &self.inner;
        match inner.block_on(inner.store.head(&inner.path(key))) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(inner.error(key, e)),
        }
    }

    fn modified(&self, key: &str) -> Result<Option<std::time::SystemTime>> {
        key::check(key)?;
        let inner = &self.inner;
        match inner.block_on(inner.store.head(&inner.path(key))) {
            Ok(meta) => Ok(Some(meta.last_modified.into())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(inner.error(key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let prefix = key::check_prefix(prefix)?;
        let inner = &self.inner;
        let root = match (inner.cfg.prefix.is_empty(), prefix.is_empty()) {
            (true, true) => None,
            (false, true) => Some(Path::from(inner.cfg.prefix.as_str())),
            _ => Some(inner.path(prefix)),
        };
        let listed: Vec<_> = inner
            .block_on(inner.store.list(root.as_ref()).try_collect())
            .map_err(|e| inner.error(prefix, e))?;
        let mut found: Vec<String> = listed
            .iter()
            .filter_map(|meta| inner.key_of(&meta.location))
            .filter(|k| key::check(k).is_ok())
            .map(str::to_owned)
            .collect();
        found.sort_unstable();
        Ok(found)
    }

    fn delete(&self, key: &str) -> Result<()> {
        key::check(key)?;
        let inner = &self.inner;
        match inner.block_on(inner.store.delete(&inner.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(inner.error(key, e)),
        }
    }

    fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let prefix = key::check_prefix(prefix)?;
        if prefix.is_empty() {
            return Err(StorageError::InvalidKey { key: String::new() });
        }
        for key in self.list(prefix)? {
            self.delete(&key)?;
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

/// An object being written: bytes buffered up to [`SINGLE_PUT_MAX`] for one PUT; past that, a
/// multipart upload whose parts of [`PART_SIZE`] are each handed to a task that uploads it while
/// the writer fills the following one.
struct S3Pending {
    inner: Arc<Inner>,
    path: Path,
    key: String,
    buf: Vec<u8>,
    upload: Option<Box<dyn MultipartUpload>>,
    /// Parts being uploaded, oldest first; each holds one of the storage's part permits.
    in_flight: VecDeque<JoinHandle<object_store::Result<()>>>,
}

impl S3Pending {
    fn error(&self, e: object_store::Error) -> StorageError {
        self.inner.error(&self.key, e)
    }

    /// Hand the buffered bytes to a task that uploads them as the next part, starting the
    /// multipart upload if needed. Waits first for a part permit (at most [`PARTS_IN_FLIGHT`]
    /// parts of this storage are in flight at once), so memory stays bounded.
    fn send_part(&mut self) -> Result<()> {
        let part = Bytes::from(std::mem::take(&mut self.buf));
        self.send(part)
    }

    /// The single PUT's buffer is full: the object becomes a multipart upload, the buffer's
    /// whole parts sent, the rest kept to fill the next part.
    fn start_parts(&mut self) -> Result<()> {
        let whole = Bytes::from(std::mem::take(&mut self.buf));
        let sent = whole.len() - whole.len() % PART_SIZE;
        for start in (0..sent).step_by(PART_SIZE) {
            self.send(whole.slice(start..start + PART_SIZE))?;
        }
        self.buf = Vec::with_capacity(PART_SIZE);
        self.buf.extend_from_slice(&whole[sent..]);
        Ok(())
    }

    fn send(&mut self, part: Bytes) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        if self.upload.is_none() {
            let started = inner.block_on(inner.store.put_multipart(&self.path));
            self.upload = Some(started.map_err(|e| self.error(e))?);
        }
        // A part that failed ends the upload now rather than at commit.
        while self.in_flight.front().is_some_and(JoinHandle::is_finished) {
            self.wait_oldest()?;
        }
        let permit = inner
            .block_on(Arc::clone(&inner.part_permits).acquire_owned())
            .expect("the part semaphore is never closed");
        let part = PutPayload::from(part);
        let upload = self.upload.as_mut().expect("started above");
        // The part's number is fixed here, at the call, whatever order the tasks finish in.
        let send = upload.put_part(part);
        self.in_flight.push_back(inner.runtime.spawn(async move {
            let sent = send.await;
            drop(permit);
            sent
        }));
        Ok(())
    }

    /// Wait for the oldest part in flight; its error, if any.
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
        if self.upload.is_none() {
            let payload = PutPayload::from(std::mem::take(&mut self.buf));
            let put = inner.store.put_opts(&self.path, payload, mode.into());
            return inner.block_on(put).map(|_| ()).map_err(|e| self.error(e));
        }
        let sent = (|| {
            if !self.buf.is_empty() {
                self.send_part()?;
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
        let mut upload = self.upload.take().expect("started");
        match inner.block_on(upload.complete()) {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = inner.block_on(upload.abort());
                Err(self.error(e))
            }
        }
    }

    /// Drop a started multipart upload, so the server frees its parts; parts still in flight
    /// are cancelled first.
    fn abort(&mut self) {
        for handle in self.in_flight.drain(..) {
            handle.abort();
            let _ = self.inner.block_on(handle);
        }
        if let Some(mut upload) = self.upload.take() {
            let _ = self.inner.block_on(upload.abort());
        }
    }
}

impl Write for S3Pending {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.upload.is_none() {
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
                self.start_parts().map_err(io::Error::other)?;
            }
            return Ok(n);
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(PART_SIZE);
        }
        let room = PART_SIZE - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PART_SIZE {
            self.send_part().map_err(io::Error::other)?;
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
    /// once. A multipart object is completed here, as by `commit`.
    fn commit_unsynced(mut self: Box<Self>) -> Result<()> {
        if self.upload.is_some() {
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
        let enforced = self.inner.create_enforced()?;
        if self.upload.is_none() && enforced {
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
/// rest of a body cut off mid-way, is retried with backoff.
struct S3Reader {
    inner: Arc<Inner>,
    key: String,
    path: Path,
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
            path,
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

    /// Start ranged GETs until [`RANGES_IN_FLIGHT`] are in flight or the object is covered.
    fn fetch_ahead(&mut self) {
        while self.ahead.len() < RANGES_IN_FLIGHT && self.next_range < self.size {
            let range = self.next_range..(self.next_range + RANGE_SIZE).min(self.size);
            self.next_range = range.end;
            let store = self.inner.store.clone();
            let path = self.path.clone();
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
                    let rest = get_range(store, self.path.clone(), self.pos..self.head_end);
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
    let want = range.end - range.start;
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        let got = match store.get_range(&path, range.clone()).await {
            Ok(bytes) if bytes.len() as u64 == want => return Ok(bytes),
            Ok(bytes) => object_store::Error::Generic {
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
        );
        if lasting || attempt >= RANGE_ATTEMPTS {
            return Err(got);
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
        attempt += 1;
    }
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
