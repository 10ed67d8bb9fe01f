//! The WAL archive: `archive-push` (PostgreSQL's archive_command) and `archive-get`
//! (restore_command).
//!
//! A file acknowledged to PostgreSQL is gone from its side soon after, so `archive-push` exits 0
//! only once the compressed copy is committed (fsync, rename, fsync dir) and recorded in the
//! catalog. It never overwrites: the same name with the same content is a success (the archiver
//! retries after crashes), different content is refused and the stored copy kept.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use chrono::Utc;
use pgkeep_catalog::{Catalog, WalInsert, WalKind, WalRecord};
use pgkeep_pg::{parse_segment_header, Lsn, WalFileName, WalSegSize};
use pgkeep_repo::{fetch_decompressed, keys, CompressWriter, Storage, StorageError};
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

/// Archive one WAL, history, backup-history or partial file.
pub fn archive_push(cfg: &Config, wal_path: &Path) -> Result<PushOutcome> {
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
    let data = fs::read(wal_path).with_context(|| format!("reading {}", wal_path.display()))?;
    check_content(&repo, &name, seg, file_name, &data)?;

    if let Some(existing) = repo.catalog.wal(file_name)? {
        return compare_existing(&existing, file_name, &data);
    }

    let key = keys::wal(repo.identity.system_identifier, file_name);
    // SHA-256 runs on the second core while the first compresses: the archiver waits on us.
    let (stored, sha256) = std::thread::scope(|s| {
        let sha = s.spawn(|| -> [u8; 32] { Sha256::digest(&data).into() });
        let stored = write_new_object(&repo, &key, &data);
        (stored, sha.join())
    });
    let sha256 = sha256.map_err(|_| anyhow!("hashing {file_name} failed"))?;
    let record = |stored_size: u64| WalRecord {
        name: file_name.to_string(),
        kind: wal_kind(&name),
        timeline: name.timeline().0,
        segno: name.segno(),
        size: data.len() as u64,
        crc32c: crc32c::crc32c(&data),
        sha256,
        stored_size,
        archived_at: Utc::now(),
    };
    let stored_size = match stored {
        Ok(n) => n,
        Err(StorageError::AlreadyExists { .. }) => {
            // A previous push stored the object but died before the catalog row was written
            // (or another pusher won a race): adopt it if it holds the same bytes.
            let found = fetch_existing_digest(&repo, &key, file_name)?;
            if found.0 != data.len() as u64 || found.1 != sha256 {
                bail!(
                    "WAL file {file_name} is already archived with different content: the stored copy was kept; check that no other cluster archives into {}",
                    repo.root.display()
                );
            }
            let size = repo.storage.size(&key)?.unwrap_or(0);
            insert_record(&repo.catalog, &record(size), &data)?;
            return Ok(PushOutcome::AlreadyArchived);
        }
        Err(e) => return Err(e).with_context(|| format!("storing {file_name}")),
    };
    match insert_record(&repo.catalog, &record(stored_size), &data)? {
        true => Ok(PushOutcome::Stored {
            size: data.len() as u64,
            stored_size,
        }),
        false => Ok(PushOutcome::AlreadyArchived),
    }
}

/// Record the file; returns false when a concurrent push recorded the same content first.
fn insert_record(catalog: &Catalog, rec: &WalRecord, data: &[u8]) -> Result<bool> {
    match catalog.insert_wal(rec)? {
        WalInsert::Inserted => Ok(true),
        WalInsert::AlreadyPresent(existing) => {
            compare_existing(&existing, &rec.name, data)?;
            Ok(false)
        }
    }
}

fn write_new_object(repo: &Repo, key: &str, data: &[u8]) -> Result<u64, StorageError> {
    let io_err = |source| StorageError::Io {
        key: key.to_string(),
        source,
    };
    let object = repo.storage().create(key)?;
    let mut writer = CompressWriter::new(object, false);
    writer.write_all(data).map_err(io_err)?;
    let (_, stored_size, object) = writer.finish().map_err(io_err)?;
    object.commit_new()?;
    Ok(stored_size)
}

fn fetch_existing_digest(repo: &Repo, key: &str, name: &str) -> Result<(u64, [u8; 32])> {
    let digest = fetch_decompressed(repo.storage(), key, &mut std::io::sink(), None, true)
        .with_context(|| format!("reading the stored copy of {name}"))?;
    Ok((digest.size, digest.sha256.unwrap_or([0; 32])))
}

fn compare_existing(existing: &WalRecord, name: &str, data: &[u8]) -> Result<PushOutcome> {
    let sha: [u8; 32] = Sha256::digest(data).into();
    if existing.size == data.len() as u64 && existing.sha256 == sha {
        return Ok(PushOutcome::AlreadyArchived);
    }
    bail!(
        "WAL file {name} is already archived with different content (stored sha256 {}, new {}): the stored copy was kept; check that no other cluster archives into this repository",
        hex::encode(existing.sha256),
        hex::encode(sha)
    )
}

/// Refuse anything that is not a WAL file of this repository's cluster.
fn check_content(
    repo: &Repo,
    name: &WalFileName,
    seg: WalSegSize,
    file_name: &str,
    data: &[u8],
) -> Result<()> {
    let segno = match name {
        WalFileName::Segment { segno, .. } | WalFileName::Partial { segno, .. } => *segno,
        WalFileName::History { .. } | WalFileName::Backup { .. } => return Ok(()),
    };
    if data.len() as u64 != seg.bytes() {
        bail!(
            "{file_name} is {} bytes but WAL segments of this repository are {} bytes: refusing to archive it",
            data.len(),
            seg.bytes()
        );
    }
    let header = parse_segment_header(data).with_context(|| {
        format!("{file_name} is not a valid WAL segment: refusing to archive it")
    })?;
    let sysid = repo.identity.system_identifier;
    if header.system_identifier != sysid {
        bail!(
            "{file_name} belongs to system identifier {} but repository {} serves {sysid}: archive_command points at the wrong repository",
            header.system_identifier,
            repo.root.display()
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

/// The catalog's kind for a WAL file name.
pub(crate) fn wal_kind(name: &WalFileName) -> WalKind {
    match name {
        WalFileName::Segment { .. } => WalKind::Segment,
        WalFileName::Partial { .. } => WalKind::Partial,
        WalFileName::Backup { .. } => WalKind::Backup,
        WalFileName::History { .. } => WalKind::History,
    }
}

/// Restore one archived file to `dest` (written under a temporary name, verified, renamed).
pub fn archive_get(cfg: &Config, name: &str, dest: &Path) -> Result<()> {
    let repo = Repo::open(cfg)?;
    let seg = repo.wal_seg_size()?;
    if WalFileName::parse(name, seg).is_err() {
        return Err(Outcome::NotInArchive(name.to_string()).into());
    }
    let key = keys::wal(repo.identity.system_identifier, name);
    let expect = match repo.catalog.wal(name)? {
        Some(rec) => Some((rec.size, rec.crc32c)),
        None if repo.storage.size(&key)?.is_some() => None,
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

/// True when `name` is recorded in the archive.
pub fn is_archived(catalog: &Catalog, name: &str) -> Result<bool> {
    Ok(catalog.wal(name)?.is_some())
}

/// Wait until every name in `names` is archived, polling the catalog; `on_wait` is told of the
/// first missing name each time the wait goes on. Errors after `timeout` naming the segment.
pub fn wait_for_wal(
    catalog: &Catalog,
    names: &[String],
    timeout: Duration,
    mut on_wait: impl FnMut(&str),
) -> Result<()> {
    let start = Instant::now();
    let mut told: Option<String> = None;
    for name in names {
        loop {
            if is_archived(catalog, name)? {
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
