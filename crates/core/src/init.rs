//! `pgkeep init`: create the repository and catalog for the configured cluster.

use anyhow::{bail, Context, Result};
use pgkeep_catalog::{Catalog, RepoIdentity};

use crate::config::{Config, RepoStorage};
use crate::pg;
use crate::repo::{create_private_dir, holds_data, open_storage};

/// What `init` did.
#[derive(Debug)]
pub struct InitReport {
    /// False when the repository already existed for this very cluster.
    pub created: bool,
    /// The repository's directory, or its bucket and endpoint.
    pub repo: String,
    pub identity: RepoIdentity,
}

/// Connect to the cluster, read its identity and create (or confirm) its repository.
pub fn init(cfg: &Config) -> Result<InitReport> {
    let mut conn = pg::connect(&cfg.pg)?;
    let server = conn.identity()?;
    if !pg::same_dir(&server.data_directory, &cfg.pg.data) {
        bail!(
            "the server at {}:{} runs data directory {} but [pg] data in {} is {}: fix the config",
            cfg.pg.host,
            cfg.pg.port,
            server.data_directory.display(),
            cfg.config_path.display(),
            cfg.pg.data.display()
        );
    }
    let identity = crate::check::repo_identity(&server);
    let name = cfg.repo.describe();
    let catalog_file = &cfg.repo.catalog;
    if catalog_file.exists() {
        let catalog = Catalog::open(catalog_file)
            .with_context(|| format!("opening catalog {}", catalog_file.display()))?;
        let existing = catalog.identity()?;
        check_same_cluster(&existing, &identity, &name)?;
        return Ok(InitReport {
            created: false,
            repo: name,
            identity: existing,
        });
    }
    match &cfg.repo.storage {
        RepoStorage::Local(root) => {
            if root.exists()
                && root
                    .read_dir()
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(true)
            {
                bail!(
                    "repository path {} is not empty and holds no pgkeep catalog: choose an empty or new directory",
                    root.display()
                );
            }
            create_private_dir(root)?;
        }
        RepoStorage::S3(_) => {
            let storage = open_storage(cfg)?;
            if holds_data(storage.as_ref())? {
                bail!(
                    "{name} is not empty and there is no catalog {}: run `pgkeep catalog rebuild` for a repository of this cluster, or choose an empty bucket prefix",
                    catalog_file.display()
                );
            }
            storage.prepare()?;
            if let Some(parent) = catalog_file.parent() {
                create_private_dir(parent)?;
            }
        }
    }
    Catalog::create(catalog_file, &identity)
        .with_context(|| format!("creating catalog {}", catalog_file.display()))?;
    Ok(InitReport {
        created: true,
        repo: name,
        identity,
    })
}

/// Refuse to mix clusters, block sizes, segment sizes or major versions in one repository.
pub fn check_same_cluster(repo: &RepoIdentity, server: &RepoIdentity, root: &str) -> Result<()> {
    // First: after pg_upgrade the system identifier differs too, and the major is what to say.
    if repo.pg_major != server.pg_major {
        bail!(
            "repository {} holds PostgreSQL {} backups but the cluster runs PostgreSQL {}: after a major upgrade, point [repo] at a new repository and run `pgkeep init`",
            root,
            repo.pg_major,
            server.pg_major
        );
    }
    if repo.system_identifier != server.system_identifier {
        bail!(
            "repository {} belongs to system identifier {} but the cluster has system identifier {}: use a separate repository path for each cluster",
            root,
            repo.system_identifier,
            server.system_identifier
        );
    }
    if repo.block_size != server.block_size || repo.wal_segment_size != server.wal_segment_size {
        bail!(
            "repository {} was created for block size {} and WAL segment size {} but the cluster has {} and {}: use a new repository",
            root,
            repo.block_size,
            repo.wal_segment_size,
            server.block_size,
            server.wal_segment_size
        );
    }
    Ok(())
}
