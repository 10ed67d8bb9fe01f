//! `pgkeep catalog rebuild`: rebuild the SQLite catalog from the repository alone, from each
//! backup's `backup.ini`, newest status object and `manifest`, and from the objects of the WAL
//! archive. For an S3 repository this is how a new host gets its local index.
//!
//! An existing catalog keeps its identity and has its rows replaced in one transaction. A missing
//! one is rebuilt from scratch: the cluster's identity comes from a backup (its `backup.ini` and
//! its stored `global/pg_control`), else from the configured data directory; the new catalog is
//! built under a temporary name and linked into place only once complete, so no half-built
//! catalog is ever seen under the final name. The backup lock is held throughout, so no backup
//! writes rows that the rebuild would then drop.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
use pgkeep_catalog::{
    meta, BackupRecord, BackupStatus, Catalog, FileKind, FileRecord, RepoIdentity, WalInsert,
    WalRecord,
};
use pgkeep_pg::{ControlFile, WalFileName, WalSegSize};
use pgkeep_repo::{decompress_into, fetch_decompressed, get_bytes, keys, Storage};

use crate::archive::wal_kind;
use crate::backup::{BACKUP_INI, MANIFEST};
use crate::bundle::stored_key;
use crate::config::Config;
use crate::config::RepoStorage;
use crate::entries::check_entries;
use crate::lock::BackupLock;
use crate::parallel;
use crate::progress::Progress;
use crate::repo::{create_private_dir, open_storage};
use crate::user;

/// What the rebuild found and did.
#[derive(Debug)]
pub struct RebuildReport {
    pub catalog: PathBuf,
    /// True when there was no catalog and a new one was created.
    pub created: bool,
    pub backups: usize,
    pub files: usize,
    pub wal: usize,
    /// What could not be indexed, and why.
    pub warnings: Vec<String>,
}

/// Rebuild the catalog of the configured repository; see the module doc.
pub fn rebuild(cfg: &Config, progress: &dyn Progress) -> Result<RebuildReport> {
    if let RepoStorage::Local(root) = &cfg.repo.storage {
        if !root.is_dir() {
            bail!(
                "repository {} does not exist: fix [repo] path in {} or run `pgkeep init`",
                root.display(),
                cfg.config_path.display()
            );
        }
    }
    let holder = format!(
        "catalog rebuild, pid {} on {}",
        user::pid(),
        user::hostname()
    );
    if let Some(dir) = cfg.repo.catalog.parent() {
        if !dir.exists() {
            create_private_dir(dir)?;
        }
    }
    let _lock = BackupLock::acquire(&cfg.repo, &holder)?;
    let storage = open_storage(cfg)?;
    let storage = storage.as_ref();
    let catalog_file = cfg.repo.catalog.clone();
    let existing = match catalog_file.symlink_metadata() {
        Ok(_) => Some(Catalog::open(&catalog_file).with_context(|| {
            format!(
                "opening catalog {}: if it is damaged, move it aside and run `pgkeep catalog rebuild` again",
                catalog_file.display()
            )
        })?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", catalog_file.display())),
    };
    let mut warnings = Vec::new();
    let mut backups = read_backups(storage, &mut warnings)?;
    let identity = match &existing {
        Some(c) => c.identity()?,
        None => identity_from_repo(storage, &backups, cfg)?,
    };
    backups.retain(|(b, _)| {
        let ours = b.system_identifier == identity.system_identifier;
        if !ours {
            warnings.push(format!(
                "backup {} belongs to system identifier {}, not {}: not indexed",
                b.label, b.system_identifier, identity.system_identifier
            ));
        }
        ours
    });
    let seg = WalSegSize::new(u64::from(identity.wal_segment_size))
        .context("the repository identity holds an invalid WAL segment size")?;
    let jobs = cfg.backup.effective_jobs();
    let wal_reader = WalReader {
        storage,
        sysid: identity.system_identifier,
        seg,
    };
    let listed = wal_reader.list()?;
    let (wal, mut wal_warnings) = wal_reader.read(&listed, jobs, progress)?;
    let created = match existing {
        Some(catalog) => {
            catalog.replace_all(&backups, &wal)?;
            // archive-push may have recorded a file between the listing and the replacement,
            // which the replacement dropped: index whatever is there now and still unknown.
            let known: HashSet<&str> = listed.iter().map(|(_, n)| n.as_str()).collect();
            let late: Vec<(String, String)> = wal_reader
                .list()?
                .into_iter()
                .filter(|(_, n)| !known.contains(n.as_str()))
                .collect();
            let (late_wal, late_warnings) = wal_reader.read(&late, jobs, progress)?;
            for w in &late_wal {
                // A row already there was recorded by archive-push itself.
                let _: WalInsert = catalog.insert_wal(w)?;
            }
            wal_warnings.extend(late_warnings);
            false
        }
        None => {
            build_new(&catalog_file, &identity, &backups, &wal)?;
            true
        }
    };
    warnings.extend(wal_warnings);
    Ok(RebuildReport {
        catalog: catalog_file,
        created,
        backups: backups.len(),
        files: backups.iter().map(|(_, f)| f.len()).sum(),
        wal: wal.len(),
        warnings,
    })
}

/// Every backup with a readable `backup.ini`, with the files its `manifest` lists.
fn read_backups(
    storage: &dyn Storage,
    warnings: &mut Vec<String>,
) -> Result<Vec<(BackupRecord, Vec<FileRecord>)>> {
    let mut dirs: BTreeMap<String, bool> = BTreeMap::new();
    let listed = storage
        .list(keys::BACKUP_PREFIX)
        .context("listing the backups in the repository")?;
    for key in &listed {
        let mut parts = key.splitn(3, '/');
        let (Some(_), Some(label), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        *dirs.entry(label.to_string()).or_default() |= rest == BACKUP_INI;
    }
    let mut backups = Vec::new();
    for (label, has_ini) in dirs {
        if !has_ini {
            warnings.push(format!(
                "backup {label} has no backup.ini (it was interrupted before it finished): not indexed; its directory can be deleted"
            ));
            continue;
        }
        let ini = read_text(storage, &keys::backup_meta(&label, BACKUP_INI))
            .and_then(|t| meta::parse_backup_ini(&t).map_err(|e| anyhow!(e)));
        let mut record = match ini {
            Ok(r) if r.label == label => r,
            Ok(r) => {
                warnings.push(format!(
                    "backup.ini of backup {label} describes backup {}: not indexed",
                    r.label
                ));
                continue;
            }
            Err(e) => {
                warnings.push(format!(
                    "backup.ini of backup {label} cannot be read ({e:#}): not indexed"
                ));
                continue;
            }
        };
        match crate::status::latest_status(storage, &label, &listed) {
            Ok(Some((status, error))) => {
                record.status = status;
                record.error = error;
            }
            Ok(None) => {}
            Err(e) => warnings.push(format!(
                "the status changes of backup {label} cannot be read ({e:#}): indexed with the status of its backup.ini"
            )),
        }
        match crate::status::latest_pin(storage, &label, &listed) {
            Ok(Some(pin)) => record.pinned = pin,
            Ok(None) => {}
            Err(e) => warnings.push(format!(
                "the pin changes of backup {label} cannot be read ({e:#}): indexed with the pin of its backup.ini"
            )),
        }
        if record.status == BackupStatus::Running {
            // The backup lock is held: nothing is running.
            record.status = BackupStatus::Error;
            record.error =
                Some("interrupted: the backup process ended before the backup finished".into());
        }
        let files = match read_text(storage, &keys::backup_meta(&label, MANIFEST))
            .and_then(|t| meta::parse_manifest(&t).map_err(|e| anyhow!(e)))
            .and_then(|files| check_entries(&label, &files).map(|()| files))
        {
            Ok(files) => files,
            Err(e) => {
                let message = format!("manifest of backup {label} cannot be read ({e:#})");
                // Restore must not pick a backup whose files are unknown.
                let demoted = record.status.is_restorable();
                if demoted {
                    record.status = BackupStatus::Corrupt;
                    record.error = Some(format!("catalog rebuild: {message}"));
                }
                let how = if demoted { ", as CORRUPT" } else { "" };
                // A failed backup often ends before its manifest is written: nothing is lost.
                if record.status != BackupStatus::Error {
                    warnings.push(format!("{message}: indexed without files{how}"));
                }
                Vec::new()
            }
        };
        backups.push((record, files));
    }
    Ok(backups)
}

fn read_text(storage: &dyn Storage, key: &str) -> Result<String> {
    let bytes = get_bytes(storage, key)?;
    String::from_utf8(bytes).map_err(|_| anyhow!("{key} is not UTF-8 text"))
}

/// The cluster's identity when there is no catalog to keep it: from the newest backup whose
/// stored `global/pg_control` reads back, else from the configured data directory.
fn identity_from_repo(
    storage: &dyn Storage,
    backups: &[(BackupRecord, Vec<FileRecord>)],
    cfg: &Config,
) -> Result<RepoIdentity> {
    let mut tried = Vec::new();
    for (b, files) in backups.iter().rev() {
        match identity_from_backup(storage, b, files) {
            Ok(identity) => return Ok(identity),
            Err(e) => tried.push(format!("backup {}: {e:#}", b.label)),
        }
    }
    identity_from_data_dir(&cfg.pg.data).with_context(|| {
        let why = match tried.first() {
            None => "the repository holds no backup".to_string(),
            Some(t) => format!("no backup gave it ({t})"),
        };
        format!(
            "finding the cluster identity for a new catalog: {why}, and [pg] data cannot give it either; run `pgkeep init` instead"
        )
    })
}

fn identity_from_backup(
    storage: &dyn Storage,
    b: &BackupRecord,
    files: &[FileRecord],
) -> Result<RepoIdentity> {
    let control = files
        .iter()
        .find(|f| f.path == "global/pg_control" && f.kind == FileKind::File)
        .ok_or_else(|| anyhow!("its manifest lists no global/pg_control"))?;
    let at = stored_key(
        control.stored_in.as_deref().unwrap_or(&b.label),
        &control.path,
        control.bundle,
    );
    let expect = control.crc32c.map(|crc| (control.size, crc));
    let mut bytes = Vec::new();
    decompress_into(at.open(storage)?, &at.key, &mut bytes, expect, false)?;
    let control = ControlFile::parse(&bytes).context("reading its global/pg_control")?;
    if control.system_identifier != b.system_identifier {
        bail!(
            "its global/pg_control has system identifier {} but its backup.ini {}",
            control.system_identifier,
            b.system_identifier
        );
    }
    Ok(RepoIdentity {
        system_identifier: b.system_identifier,
        pg_major: pg_major(b.pg_version_num),
        block_size: b.block_size,
        wal_segment_size: control.wal_segment_size,
        blocks_per_segment: control.blocks_per_segment,
    })
}

fn identity_from_data_dir(data: &Path) -> Result<RepoIdentity> {
    let control_path = data.join("global/pg_control");
    let bytes =
        fs::read(&control_path).with_context(|| format!("reading {}", control_path.display()))?;
    let control = ControlFile::parse(&bytes)
        .with_context(|| format!("reading {}", control_path.display()))?;
    let version_path = data.join("PG_VERSION");
    let version = fs::read_to_string(&version_path)
        .with_context(|| format!("reading {}", version_path.display()))?;
    let pg_major = version
        .trim()
        .parse()
        .with_context(|| format!("{} holds {version:?}", version_path.display()))?;
    Ok(RepoIdentity {
        system_identifier: control.system_identifier,
        pg_major,
        block_size: control.block_size,
        wal_segment_size: control.wal_segment_size,
        blocks_per_segment: control.blocks_per_segment,
    })
}

/// `server_version_num` to major version: 160004 is 16 (PostgreSQL 10 and later).
fn pg_major(version_num: u32) -> u32 {
    version_num / 10000
}

/// Reads the objects of the WAL archive into catalog rows.
struct WalReader<'a> {
    storage: &'a dyn Storage,
    sysid: u64,
    seg: WalSegSize,
}

impl WalReader<'_> {
    /// (key, file name) of every WAL object of the cluster.
    fn list(&self) -> Result<Vec<(String, String)>> {
        let prefix = keys::wal_prefix(self.sysid);
        Ok(self
            .storage
            .list(&prefix)
            .with_context(|| format!("listing the WAL archive {prefix}"))?
            .into_iter()
            .filter_map(|key| {
                let name = keys::wal_name_from_key(&key)?.to_string();
                Some((key, name))
            })
            .collect())
    }

    /// Decompress every listed object for its size and checksums; returns the rows, sorted by
    /// name, and a warning for each object that could not be indexed.
    fn read(
        &self,
        listed: &[(String, String)],
        jobs: usize,
        progress: &dyn Progress,
    ) -> Result<(Vec<WalRecord>, Vec<String>)> {
        progress.start("reading the WAL archive", None);
        let results = parallel::for_each(listed, jobs, |(key, name), _buf| {
            let row = self.record(key, name);
            if let Ok(r) = &row {
                progress.advance(r.size);
            }
            Ok(row.map_err(|e| format!("WAL file {name} cannot be indexed: {e:#}")))
        })?;
        progress.finish();
        let mut rows = Vec::with_capacity(results.len());
        let mut warnings = Vec::new();
        for r in results {
            match r {
                Ok(row) => rows.push(row),
                Err(w) => warnings.push(w),
            }
        }
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        warnings.sort();
        Ok((rows, warnings))
    }

    fn record(&self, key: &str, name: &str) -> Result<WalRecord> {
        let parsed = WalFileName::parse(name, self.seg)?;
        let stored_size = self
            .storage
            .size(key)?
            .ok_or_else(|| anyhow!("{key} vanished while the catalog was rebuilt"))?;
        let digest = fetch_decompressed(self.storage, key, &mut io::sink(), None, true)?;
        // The object's modification time is when it was archived; a backend that keeps none
        // gets the rebuild's time (`show` reports it as an approximate time only).
        let archived_at: DateTime<Utc> = self
            .storage
            .modified(key)?
            .map_or_else(Utc::now, DateTime::<Utc>::from);
        Ok(WalRecord {
            name: name.to_string(),
            kind: wal_kind(&parsed),
            timeline: parsed.timeline().0,
            segno: parsed.segno(),
            size: digest.size,
            crc32c: digest.crc32c,
            sha256: digest
                .sha256
                .ok_or_else(|| anyhow!("no SHA-256 computed for {key}"))?,
            stored_size,
            archived_at,
        })
    }
}

/// Build a complete catalog beside `path` and link it into place; never replaces a catalog
/// that appeared meanwhile.
fn build_new(
    path: &Path,
    identity: &RepoIdentity,
    backups: &[(BackupRecord, Vec<FileRecord>)],
    wal: &[WalRecord],
) -> Result<()> {
    let tmp = sibling(path, &format!(".rebuild-{}", user::pid()));
    remove_sqlite_files(&tmp);
    let built = (|| -> Result<()> {
        let catalog = Catalog::create(&tmp, identity)
            .with_context(|| format!("creating catalog {}", tmp.display()))?;
        catalog.replace_all(backups, wal)?;
        // Closing the only connection checkpoints SQLite's write-ahead log into the file.
        drop(catalog);
        if companion(&tmp, "-wal").exists() {
            bail!(
                "the new catalog {} kept its write-ahead log after closing: is another process using it?",
                tmp.display()
            );
        }
        // SQLite would apply a write-ahead log left by the deleted catalog to the new file.
        for suffix in ["-wal", "-shm", "-journal"] {
            let stale = companion(path, suffix);
            match fs::remove_file(&stale) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", stale.display())),
            }
        }
        match fs::hard_link(&tmp, path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => bail!(
                "catalog {} appeared while it was being rebuilt (a `pgkeep init`?): run `pgkeep catalog rebuild` again",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing directory {}", dir.display()))
    })();
    remove_sqlite_files(&tmp);
    built
}

/// `path` with `suffix` appended to its file name, e.g. `catalog.db-wal`.
fn companion(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// `.<name><suffix>` beside `path`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}{suffix}"))
}

/// Remove an SQLite file and its companions, ignoring files that are not there.
fn remove_sqlite_files(file: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = fs::remove_file(companion(file, suffix));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_versions() {
        assert_eq!(pg_major(120022), 12);
        assert_eq!(pg_major(160004), 16);
        assert_eq!(pg_major(180000), 18);
    }

    #[test]
    fn companion_names() {
        let p = Path::new("/r/catalog.db");
        assert_eq!(companion(p, "-wal"), Path::new("/r/catalog.db-wal"));
        assert_eq!(
            sibling(p, ".rebuild-7"),
            Path::new("/r/.catalog.db.rebuild-7")
        );
    }
}
