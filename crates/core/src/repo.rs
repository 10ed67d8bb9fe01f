//! An opened repository: its storage, its catalog and the identity of the cluster it serves.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use pgkeep_catalog::{meta, BackupRecord, Catalog, RepoIdentity};
use pgkeep_pg::WalSegSize;
use pgkeep_repo::{keys, put_bytes, LocalStorage, Storage};

use crate::config::Config;

/// The repository of one cluster.
pub struct Repo {
    pub root: PathBuf,
    pub storage: LocalStorage,
    pub catalog: Catalog,
    pub identity: RepoIdentity,
}

impl Repo {
    /// Open the configured repository; a missing one is an error telling to run `pgkeep init`.
    pub fn open(cfg: &Config) -> Result<Repo> {
        let root = cfg.repo.path.clone();
        let catalog_path = catalog_path(&root);
        if !catalog_path.exists() && holds_data(&root) {
            bail!(
                "catalog {} is missing but the repository holds backups or WAL: run `pgkeep catalog rebuild`",
                catalog_path.display()
            );
        }
        if !catalog_path.exists() {
            bail!(
                "repository {} is not initialised: run `pgkeep init` (or fix [repo] path in {})",
                root.display(),
                cfg.config_path.display()
            );
        }
        let catalog = Catalog::open(&catalog_path)
            .with_context(|| format!("opening catalog {}", catalog_path.display()))?;
        let identity = catalog.identity()?;
        if crate::user::is_root() {
            give_sidecars_to_owner(&catalog_path)?;
        }
        Ok(Repo {
            storage: LocalStorage::new(&root),
            root,
            catalog,
            identity,
        })
    }

    /// The WAL segment size of the cluster this repository serves.
    pub fn wal_seg_size(&self) -> Result<WalSegSize> {
        WalSegSize::new(u64::from(self.identity.wal_segment_size)).with_context(|| {
            format!(
                "catalog of {} holds an invalid WAL segment size",
                self.root.display()
            )
        })
    }

    pub fn storage(&self) -> &dyn Storage {
        &self.storage
    }

    /// Rewrite a backup's `backup.ini` from its record, so the repository alone says what the
    /// catalog says.
    pub fn write_backup_ini(&self, b: &BackupRecord) -> Result<()> {
        put_bytes(
            self.storage(),
            &keys::backup_meta(&b.label, crate::backup::BACKUP_INI),
            meta::backup_ini(b).as_bytes(),
        )
        .with_context(|| format!("writing backup.ini of backup {}", b.label))
    }
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

/// True when the repository has a WAL archive or backup directory (the first component of
/// those keys), so losing its catalog loses no data: `catalog rebuild` recovers it.
fn holds_data(root: &Path) -> bool {
    [keys::wal_prefix(0), keys::backup_prefix("")]
        .iter()
        .filter_map(|key| key.split('/').next())
        .any(|dir| root.join(dir).is_dir())
}

/// Where the SQLite catalog lives inside a repository.
pub fn catalog_path(root: &Path) -> PathBuf {
    root.join(keys::CATALOG_FILE)
}

/// Create a directory (and parents) with mode 0700, as every repository directory is.
pub fn create_private_dir(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("creating directory {}", path.display()))
}
