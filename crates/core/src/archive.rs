//! The WAL archive: `archive-push` (PostgreSQL's archive_command) and `archive-get`
//! (restore_command).
//!
//! A file acknowledged to PostgreSQL is gone from its side soon after, so `archive-push` exits 0
//! only once the compressed copy is committed (fsync, rename, fsync dir) and recorded in the
//! catalog. It never overwrites: the same name with the same content is a success (the archiver
//! retries after crashes), different content is refused and the stored copy kept.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use chrono::Utc;
use pgkeep_catalog::{Catalog, WalInsert, WalKind, WalRecord};
use pgkeep_pg::{parse_segment_header, Lsn, WalFileName, WalSegSize};
use pgkeep_repo::{
    fetch_decompressed, keys, store_compressed, Commit, Digest, StorageError, StoredObject,
};
use sha2::{Digest as _, Sha256};

use crate::config::Config;
use crate::repo::Repo;
use crate::Outcome;

/// What `archive-push` did with a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Newly stored; raw and compressed sizes.
    Stored { size: u64, stored_size: u64 },
    /// The archive already held this very content (a retry after a crash, or a re-push).
    AlreadyArchived,
}

/// Archive one WAL, history, backup-history or partial file into every configured repository.
///
/// Ok only when each repository holds the file durably (stored now, or already holding the same
/// bytes); the repositories are written at the same time, and a failure in one does not stop
/// the others, so a retry by PostgreSQL finds the file in them and only redoes the failed one.
/// The error names each repository that failed. `Stored` when any repository stored it now.
/// This is the one place a segment is acknowledged: whatever pushes segments calls it.
pub fn archive_push(cfg: &Config, wal_path: &Path) -> Result<PushOutcome> {
    if !cfg.several_repos() {
        return push_to_repo(cfg, wal_path);
    }
    let configs: Vec<Config> = (1..=cfg.repos.len())
        .filter_map(|n| cfg.with_repo(n))
        .collect();
    let results: Vec<Result<PushOutcome>> = std::thread::scope(|scope| {
        let pushes: Vec<_> = configs
            .iter()
            .map(|c| scope.spawn(move || push_to_repo(c, wal_path)))
            .collect();
        pushes
            .into_iter()
            .map(|p| {
                p.join()
                    .unwrap_or_else(|_| Err(anyhow!("the push into this repository panicked")))
            })
            .collect()
    });
    let mut failed = Vec::new();
    let mut held = Vec::new();
    let mut outcome = PushOutcome::AlreadyArchived;
    for (c, result) in configs.iter().zip(results) {
        match result {
            Ok(o) => {
                held.push(format!("repo{}", c.repo.number));
                if matches!(o, PushOutcome::Stored { .. }) {
                    outcome = o;
                }
            }
            Err(e) => failed.push(format!("{}: {e:#}", c.repo.title())),
        }
    }
    if failed.is_empty() {
        return Ok(outcome);
    }
    let name = wal_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| wal_path.display().to_string());
    let held = if held.is_empty() {
        "taken by no repository".to_string()
    } else {
        format!("taken by {}", held.join(", "))
    };
    bail!(
        "{name} not archived in every repository ({held}): {}: PostgreSQL retries the file; fix the repository named",
        failed.join("; ")
    )
}

/// Archive one file into the repository `cfg.repo`.
///
/// The file is streamed through `store_compressed`: two threads, one computing SHA-256 and
/// CRC-32C in order while both share the lz4 work, so a 16 MiB segment takes about half its
/// checksum-plus-compress time and never sits whole in memory.
fn push_to_repo(cfg: &Config, wal_path: &Path) -> Result<PushOutcome> {
    let repo = Repo::open(cfg)?;
    let seg = repo.wal_seg_size()?;
    let file_name = wal_path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{} is not a WAL file path", wal_path.display()))?;
    let name = WalFileName::parse(file_name, seg).with_context(|| {
        format!(
            "{} is not a WAL segment, .history, .backup or .partial file name",
            wal_path.display()
        )
    })?;
    let reading = || format!("reading {}", wal_path.display());
    let mut file = fs::File::open(wal_path).with_context(reading)?;
    let size = file.metadata().with_context(reading)?.len();
    check_content(&repo, &name, seg, file_name, size, &mut file).with_context(reading)?;

    if let Some(existing) = repo.catalog.wal(file_name)? {
        let found = hash_file(&mut file).with_context(reading)?;
        return compare_existing(
            &existing,
            file_name,
            found.size,
            found.sha256.unwrap_or([0; 32]),
        );
    }

    let key = keys::wal(repo.identity.system_identifier, file_name);
    let stored = store_compressed(repo.storage(), &key, &mut file, Commit::New);
    let (digest, stored_size) = match stored {
        Ok(StoredObject {
            digest,
            stored_size,
        }) => (digest, stored_size),
        Err(StorageError::AlreadyExists { .. }) => {
            // A previous push stored the object but died before the catalog row was written
            // (or another pusher won a race): adopt it if it holds the same bytes.
            let ours = hash_file(&mut file).with_context(reading)?;
            let theirs = fetch_decompressed(repo.storage(), &key, &mut io::sink(), None, true)
                .with_context(|| format!("reading the stored copy of {file_name}"))?;
            if (theirs.size, theirs.sha256) != (ours.size, ours.sha256) {
                bail!(
                    "WAL file {file_name} is already archived with different content: the stored copy was kept; check that no other cluster archives into {}",
                    repo.name
                );
            }
            // The push that stored it may have died before its fsyncs, or between the link and
            // the directory's fsync: answering 0 lets PostgreSQL recycle the segment, so make the
            // adopted copy as durable as one of ours first.
            repo.storage()
                .sync_object(&key)
                .with_context(|| format!("making the stored copy of {file_name} durable"))?;
            let stored_size = repo.storage().size(&key)?.unwrap_or(0);
            insert_record(&repo.catalog, &record(file_name, &name, ours, stored_size))?;
            return Ok(PushOutcome::AlreadyArchived);
        }
        Err(e) => return Err(e).with_context(|| format!("storing {file_name}")),
    };
    if digest.size != size {
        // PostgreSQL never changes a file it handed to archive_command; something else did.
        let _ = repo.storage().delete(&key);
        bail!(
            "{} changed size while being archived ({size} then {} bytes): not archived",
            wal_path.display(),
            digest.size
        );
    }
    match insert_record(
        &repo.catalog,
        &record(file_name, &name, digest, stored_size),
    )? {
        true => Ok(PushOutcome::Stored { size, stored_size }),
        false => Ok(PushOutcome::AlreadyArchived),
    }
}

fn record(file_name: &str, name: &WalFileName, digest: Digest, stored_size: u64) -> WalRecord {
    WalRecord {
        name: file_name.to_string(),
        kind: wal_kind(name),
        timeline: name.timeline().0,
        segno: name.segno(),
        size: digest.size,
        crc32c: digest.crc32c,
        sha256: digest.sha256.unwrap_or([0; 32]),
        stored_size,
        archived_at: Utc::now(),
    }
}

/// Record the file; returns false when a concurrent push recorded the same content first.
fn insert_record(catalog: &Catalog, rec: &WalRecord) -> Result<bool> {
    match catalog.insert_wal(rec)? {
        WalInsert::Inserted => Ok(true),
        WalInsert::AlreadyPresent(existing) => {
            compare_existing(&existing, &rec.name, rec.size, rec.sha256)?;
            Ok(false)
        }
    }
}

/// Size, CRC-32C and SHA-256 of the whole file, read from its start: a digest as complete as
/// the one `store_compressed` returns, since the adoption path records it.
fn hash_file(file: &mut fs::File) -> io::Result<Digest> {
    file.seek(SeekFrom::Start(0))?;
    let (mut sha, mut crc, mut size) = (Sha256::new(), 0, 0u64);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        sha.update(&buf[..n]);
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        size += n as u64;
    }
    Ok(Digest {
        size,
        crc32c: crc,
        sha256: Some(sha.finalize().into()),
    })
}

fn compare_existing(
    existing: &WalRecord,
    name: &str,
    size: u64,
    sha: [u8; 32],
) -> Result<PushOutcome> {
    if existing.size == size && existing.sha256 == sha {
        return Ok(PushOutcome::AlreadyArchived);
    }
    bail!(
        "WAL file {name} is already archived with different content (stored sha256 {}, new {}): the stored copy was kept; check that no other cluster archives into this repository",
        hex::encode(existing.sha256),
        hex::encode(sha)
    )
}

/// Refuse anything that is not a WAL file of this repository's cluster, before any of it is
/// stored: segment files by their size and long page header. Leaves `file` at its start.
fn check_content(
    repo: &Repo,
    name: &WalFileName,
    seg: WalSegSize,
    file_name: &str,
    size: u64,
    file: &mut fs::File,
) -> Result<()> {
    let segno = match name {
        WalFileName::Segment { segno, .. } | WalFileName::Partial { segno, .. } => *segno,
        WalFileName::History { .. } | WalFileName::Backup { .. } => return Ok(()),
    };
    if size != seg.bytes() {
        bail!(
            "{file_name} is {size} bytes but WAL segments of this repository are {} bytes: refusing to archive it",
            seg.bytes()
        );
    }
    let mut head = vec![0u8; HEADER_READ];
    file.read_exact(&mut head)?;
    file.seek(SeekFrom::Start(0))?;
    let header = parse_segment_header(&head).with_context(|| {
        format!("{file_name} is not a valid WAL segment: refusing to archive it")
    })?;
    let sysid = repo.identity.system_identifier;
    if header.system_identifier != sysid {
        bail!(
            "{file_name} belongs to system identifier {} but repository {} serves {sysid}: archive_command points at the wrong repository",
            header.system_identifier,
            repo.name
        );
    }
    let expected = Lsn::from_segment(segno, seg);
    if header.page_addr != expected {
        bail!(
            "{file_name} starts at {} but its name says {expected}: refusing a misnamed segment",
            header.page_addr
        );
    }
    Ok(())
}

/// Bytes read to check a segment's long page header: its first WAL page, which the smallest
/// segment size still holds.
const HEADER_READ: usize = 8192;

/// The catalog's kind for a WAL file name.
pub(crate) fn wal_kind(name: &WalFileName) -> WalKind {
    match name {
        WalFileName::Segment { .. } => WalKind::Segment,
        WalFileName::Partial { .. } => WalKind::Partial,
        WalFileName::Backup { .. } => WalKind::Backup,
        WalFileName::History { .. } => WalKind::History,
    }
}

/// What `archive-get` did: the repository that served the file and, when an earlier one
/// held a copy it could not serve, one warning per such repository.
#[derive(Debug, Default)]
pub struct GetReport {
    pub served_by: usize,
    pub warnings: Vec<String>,
}

/// Restore one archived file to `dest` (written under a temporary name, verified, renamed).
///
/// Repositories are tried in file order; the first that holds a valid copy serves it. A copy
/// that is missing or damaged in one repository while a later one serves it is a warning; the
/// file is "not in the archive" ([`Outcome::NotInArchive`]) only when every repository answered
/// that it does not hold the name, and any other failure is an error naming each repository.
pub fn archive_get(cfg: &Config, name: &str, dest: &Path) -> Result<GetReport> {
    if !cfg.several_repos() {
        get_from_repo(cfg, name, dest)?;
        return Ok(GetReport {
            served_by: cfg.repo.number,
            warnings: Vec::new(),
        });
    }
    let mut failures = Vec::new();
    for c in (1..=cfg.repos.len()).filter_map(|n| cfg.with_repo(n)) {
        match get_from_repo(&c, name, dest) {
            Ok(()) => {
                let warnings = failures
                    .iter()
                    .map(|f| format!("{f}; served from {} instead", c.repo.title()))
                    .collect();
                return Ok(GetReport {
                    served_by: c.repo.number,
                    warnings,
                });
            }
            Err(e) if matches!(e.downcast_ref(), Some(Outcome::NotInArchive(_))) => {}
            Err(e) => failures.push(format!("{}: {e:#}", c.repo.title())),
        }
    }
    if failures.is_empty() {
        return Err(Outcome::NotInArchive(name.to_string()).into());
    }
    bail!("no repository could serve it: {}", failures.join("; "))
}

/// Restore one archived file from the repository `cfg.repo`.
fn get_from_repo(cfg: &Config, name: &str, dest: &Path) -> Result<()> {
    let repo = Repo::open(cfg)?;
    let seg = repo.wal_seg_size()?;
    if WalFileName::parse(name, seg).is_err() {
        return Err(Outcome::NotInArchive(name.to_string()).into());
    }
    let key = keys::wal(repo.identity.system_identifier, name);
    let expect = match repo.catalog.wal(name)? {
        Some(rec) => Some((rec.size, rec.crc32c)),
        None if repo.storage().size(&key)?.is_some() => None,
        None => return Err(Outcome::NotInArchive(name.to_string()).into()),
    };
    let tmp = temp_sibling(dest);
    let result = (|| -> Result<()> {
        let mut file =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        fetch_decompressed(repo.storage(), &key, &mut file, expect, false)
            .with_context(|| format!("restoring {name} from the archive"))?;
        file.flush()?;
        fs::rename(&tmp, dest).with_context(|| format!("renaming to {}", dest.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn temp_sibling(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.pgkeep-{}", std::process::id()))
}

/// True when `name` is in the archive. The repository decides, not its local index: an object
/// the catalog has no row for (pushed from another host into a shared bucket, or by a push that
/// died before recording it) is made durable, read back for its checksums and recorded first.
pub fn is_archived(repo: &Repo, name: &str) -> Result<bool> {
    if repo.catalog.wal(name)?.is_some() {
        return Ok(true);
    }
    let Ok(parsed) = WalFileName::parse(name, repo.wal_seg_size()?) else {
        return Ok(false);
    };
    let key = keys::wal(repo.identity.system_identifier, name);
    let storage = repo.storage();
    let Some(stored_size) = storage.size(&key)? else {
        return Ok(false);
    };
    storage
        .sync_object(&key)
        .with_context(|| format!("making the stored copy of {name} durable"))?;
    let digest = fetch_decompressed(storage, &key, &mut io::sink(), None, true)
        .with_context(|| format!("reading the stored copy of {name}"))?;
    insert_record(&repo.catalog, &record(name, &parsed, digest, stored_size))?;
    Ok(true)
}

/// Wait until every name in `names` is archived (see [`is_archived`]); `on_wait` is told of the
/// first missing name each time the wait goes on. Errors after `timeout` naming the segment.
pub fn wait_for_wal(
    repo: &Repo,
    names: &[String],
    timeout: Duration,
    mut on_wait: impl FnMut(&str),
) -> Result<()> {
    let start = Instant::now();
    let mut told: Option<String> = None;
    for name in names {
        loop {
            if is_archived(repo, name)? {
                break;
            }
            if start.elapsed() >= timeout {
                bail!(
                    "WAL segment {name} not archived after {} s: is archive_command failing? see pg_stat_archiver and the server log",
                    timeout.as_secs()
                );
            }
            if told.as_deref() != Some(name) {
                on_wait(name);
                told = Some(name.clone());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}
