//! An opened repository: its storage, its catalog and the identity of the cluster it serves.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use pgkeep_catalog::{Catalog, RepoIdentity};
use pgkeep_pg::WalSegSize;
use pgkeep_repo::{keys, LocalStorage, S3Storage, Storage};

use crate::config::{Config, RepoStorage};

/// The repository of one cluster.
pub struct Repo {
    /// How messages name the repository (its directory, or its bucket and endpoint).
    pub name: String,
    storage: Box<dyn Storage>,
    pub catalog: Catalog,
    pub identity: RepoIdentity,
}

impl Repo {
    /// Open the configured repository; a missing one is an error telling to run `pgkeep init`.
    pub fn open(cfg: &Config) -> Result<Repo> {
        let catalog_path = &cfg.repo.catalog;
        let name = cfg.repo.describe();
        if !catalog_path.exists() {
            let storage = open_storage(cfg)?;
            if holds_data(storage.as_ref())? {
                bail!(
                    "catalog {} is missing but the repository {name} holds backups or WAL: run `pgkeep catalog rebuild`",
                    catalog_path.display()
                );
            }
            bail!(
                "repository {name} is not initialised: run `pgkeep init` (or fix [repo] in {})",
                cfg.config_path.display()
            );
        }
        let catalog = Catalog::open(catalog_path)
            .with_context(|| format!("opening catalog {}", catalog_path.display()))?;
        let identity = catalog.identity()?;
        if crate::user::is_root() {
            give_sidecars_to_owner(catalog_path)?;
        }
        Ok(Repo {
            storage: open_storage(cfg)?,
            name,
            catalog,
            identity,
        })
    }

    /// The WAL segment size of the cluster this repository serves.
    pub fn wal_seg_size(&self) -> Result<WalSegSize> {
        WalSegSize::new(u64::from(self.identity.wal_segment_size))
            .with_context(|| format!("catalog of {} holds an invalid WAL segment size", self.name))
    }

    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }
}

/// The configured backend; no request is sent yet.
pub fn open_storage(cfg: &Config) -> Result<Box<dyn Storage>> {
    Ok(match &cfg.repo.storage {
        RepoStorage::Local(path) => Box::new(LocalStorage::new(path)),
        RepoStorage::S3(s3) => Box::new(S3Storage::new(s3.clone())?),
    })
}

/// Run as root (restore may be), SQLite creates the catalog's `-wal` and `-shm` files as root; the
/// archiver, running as the cluster's owner, could then no longer open the catalog. Hand them to
/// the owner of `catalog.db`.
fn give_sidecars_to_owner(catalog_path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(catalog_path)
        .with_context(|| format!("reading owner of {}", catalog_path.display()))?;
    for suffix in ["-wal", "-shm"] {
        let mut name = catalog_path.as_os_str().to_owned();
        name.push(suffix);
        let sidecar = PathBuf::from(name);
        if sidecar.exists() {
            std::os::unix::fs::chown(&sidecar, Some(meta.uid()), Some(meta.gid()))
                .with_context(|| format!("setting owner of {}", sidecar.display()))?;
        }
    }
    Ok(())
}

/// True when the repository holds a WAL archive or a backup, so losing its catalog loses no
/// data: `catalog rebuild` recovers it.
pub(crate) fn holds_data(storage: &dyn Storage) -> Result<bool> {
    for prefix in [keys::ARCHIVE_PREFIX, keys::BACKUP_PREFIX] {
        if !storage.list(prefix)?.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Create a directory (and parents) with mode 0700, as every repository directory is.
pub fn create_private_dir(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("creating directory {}", path.display()))
}
