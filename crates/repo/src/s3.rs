//! `S3Storage`: repository objects in a bucket of an S3-compatible server, through `object_store`.
//!
//! `object_store` is asynchronous; the rest of pgkeep is plain threads. Each storage owns a small
//! tokio runtime and blocks on it (`Runtime::block_on` may be called from many threads at once,
//! as backup and restore workers do). A PUT is durable when it returns, so `sync` has nothing to
//! do. Objects are written once: a pending object is buffered in memory up to [`PART_SIZE`] and
//! sent as one PUT, or, once bigger, as a multipart upload of parts of that size, so memory per
//! upload stays bounded whatever the object's size.
//!
//! `commit_new` must never replace an object. Where `init` found that the server enforces
//! `If-None-Match: *` (the probe's answer is kept in the bucket at [`keys::STORAGE_INFO`]), a
//! single-PUT object is created conditionally and the server refuses a second writer. Elsewhere
//! (and for multipart objects, whose conditional completion `object_store` does not offer) the
//! key is checked with a HEAD before the PUT. That leaves a window in which two writers of the
//! same key could both see it absent; WAL keys carry the cluster's system identifier, so the only
//! two writers of one key are retries of one archiver with the same bytes.

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
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Storage")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Objects up to this size are one PUT; bigger ones are uploaded in parts of this size.
pub const PART_SIZE: usize = 32 << 20;

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
        let store = AmazonS3Builder::new()
            .with_endpoint(&cfg.endpoint)
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&cfg.access_key_id)
            .with_secret_access_key(&cfg.secret_access_key)
            .with_virtual_hosted_style_request(cfg.host_style)
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
        Ok(S3Storage {
            inner: Arc::new(Inner {
                store,
                runtime,
                cfg,
                create_enforced: OnceLock::new(),
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

impl Inner {
    fn path(&self, key: &str) -> Path {
        if self.cfg.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.cfg.prefix))
        }
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

    /// Whether the server refuses a conditional PUT onto an existing key, as `init` recorded it.
    fn create_enforced(&self) -> Result<bool> {
        if let Some(&known) = self.create_enforced.get() {
            return Ok(known);
        }
        let Some(bytes) = self.get(keys::STORAGE_INFO)? else {
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
        }))
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>> {
        key::check(key)?;
        let inner = &self.inner;
        let got = inner
            .block_on(inner.store.get(&inner.path(key)))
            .map_err(|e| inner.error(key, e))?;
        let cfg = inner.cfg.clone();
        let owned_key = key.to_owned();
        let stream = got
            .into_stream()
            .map_err(move |e| io::Error::other(classify(&cfg, &owned_key, e)))
            .boxed();
        Ok(Box::new(S3Reader {
            inner: Arc::clone(inner),
            stream,
            chunk: Bytes::new(),
        }))
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
}

/// An object being written: bytes buffered up to [`PART_SIZE`], then parts uploaded as they fill.
struct S3Pending {
    inner: Arc<Inner>,
    path: Path,
    key: String,
    buf: Vec<u8>,
    upload: Option<Box<dyn MultipartUpload>>,
}

impl S3Pending {
    fn error(&self, e: object_store::Error) -> StorageError {
        self.inner.error(&self.key, e)
    }

    /// Upload the buffered bytes as the next part, starting the multipart upload if needed.
    fn send_part(&mut self) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        if self.upload.is_none() {
            let started = inner.block_on(inner.store.put_multipart(&self.path));
            self.upload = Some(started.map_err(|e| self.error(e))?);
        }
        let part = PutPayload::from(std::mem::take(&mut self.buf));
        let upload = self.upload.as_mut().expect("started above");
        let sent = inner.block_on(upload.put_part(part));
        sent.map_err(|e| self.error(e))
    }

    fn finish(&mut self, mode: PutMode) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        let Some(mut upload) = self.upload.take() else {
            let payload = PutPayload::from(std::mem::take(&mut self.buf));
            let put = inner.store.put_opts(&self.path, payload, mode.into());
            return inner.block_on(put).map(|_| ()).map_err(|e| self.error(e));
        };
        let rest = PutPayload::from(std::mem::take(&mut self.buf));
        let done = inner.block_on(async {
            if rest.content_length() > 0 {
                upload.put_part(rest).await?;
            }
            upload.complete().await
        });
        match done {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = inner.block_on(upload.abort());
                Err(self.error(e))
            }
        }
    }

    /// Drop a started multipart upload, so the server frees its parts.
    fn abort(&mut self) {
        if let Some(mut upload) = self.upload.take() {
            let _ = self.inner.block_on(upload.abort());
        }
    }
}

impl Write for S3Pending {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
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

/// A GET's body as `Read`, one chunk at a time.
struct S3Reader {
    inner: Arc<Inner>,
    stream: BoxStream<'static, io::Result<Bytes>>,
    chunk: Bytes,
}

impl Read for S3Reader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.inner.block_on(self.stream.next()) {
                Some(chunk) => self.chunk = chunk?,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.chunk.len());
        out[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
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
