//! Validated configuration handed to every command (the CLI builds it from TOML and flags).

use std::path::{Path, PathBuf};
use std::time::Duration;

use pgkeep_repo::keys;
pub use pgkeep_repo::S3Config;

/// Everything a command needs to know about the repository and the cluster.
#[derive(Clone, Debug)]
pub struct Config {
    /// Absolute path of the config file this came from; written into `restore_command` and
    /// compared with `archive_command` by `check`.
    pub config_path: PathBuf,
    /// The repository this command works on: the one `--repo N` names, else the first.
    pub repo: RepoConfig,
    /// Every configured repository in file order (repo1, repo2, ...); `repo` is one of them.
    pub repos: Vec<RepoConfig>,
    pub pg: PgConfig,
    /// The primary `[pg]` streams from; needed only when `[pg]` is a standby.
    pub primary: Option<PrimaryConfig>,
    pub backup: BackupConfig,
    pub archive: ArchiveConfig,
    pub retention: RetentionConfig,
    pub drill: DrillConfig,
}

/// `[retention]`: what `expire` keeps. No policy set keeps everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionConfig {
    pub policy: Policy,
    /// Expire after every successful backup when a policy is set.
    pub auto: bool,
}

/// What retention keeps; any combination, each keeping what it names (a backup goes only when
/// no part keeps it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keep the newest N restorable full backups and everything that depends on them (N >= 1).
    pub full: Option<u32>,
    /// Keep whatever restores to any point of the last `window`.
    pub window: Option<chrono::TimeDelta>,
    /// Keep only the newest N diff backups (with their incrs) inside the kept fulls.
    pub diff: Option<u32>,
}

impl Config {
    /// The same config working on repository `number` (1-based, as `--repo N` counts), or None
    /// when there is no such repository.
    pub fn with_repo(&self, number: usize) -> Option<Config> {
        let repo = self.repos.get(number.checked_sub(1)?)?.clone();
        Some(Config {
            repo,
            ..self.clone()
        })
    }

    /// True when more than one repository is configured: messages then say which one.
    pub fn several_repos(&self) -> bool {
        self.repos.len() > 1
    }
}

impl Policy {
    /// Whether any part of the policy is set.
    pub fn is_set(&self) -> bool {
        self.full.is_some() || self.window.is_some() || self.diff.is_some()
    }
}

/// Where the repository's objects live and where its local catalog is.
#[derive(Clone, Debug)]
pub struct RepoConfig {
    /// 1-based position in the config file (`repo1`, `repo2`, ... as pgBackRest counts).
    pub number: usize,
    pub storage: RepoStorage,
    /// The SQLite catalog: `catalog.db` inside a local repository, the `catalog` key for S3.
    pub catalog: PathBuf,
    /// Store a backup's small files together in bundle objects (`[repo] bundle`; on by default
    /// for S3, where each object costs a request, off for a local directory).
    pub bundle: bool,
}

#[derive(Clone, Debug)]
pub enum RepoStorage {
    /// A directory on this host.
    Local(PathBuf),
    /// A bucket (and key prefix) of an S3-compatible server.
    S3(S3Config),
}

impl RepoConfig {
    /// A repository in directory `path`, its catalog inside it.
    pub fn local(path: PathBuf) -> RepoConfig {
        RepoConfig {
            number: 1,
            catalog: path.join(keys::CATALOG_FILE),
            storage: RepoStorage::Local(path),
            bundle: false,
        }
    }

    /// How messages name the repository: its directory, or its bucket and endpoint.
    pub fn describe(&self) -> String {
        match &self.storage {
            RepoStorage::Local(path) => path.display().to_string(),
            RepoStorage::S3(s3) => s3.describe(),
        }
    }

    /// `repo2 (/var/lib/pgkeep2)`: the repository's number and what `describe` says.
    pub fn title(&self) -> String {
        format!("repo{} ({})", self.number, self.describe())
    }

    /// The default `[archive] spool-path`: beside the catalog, on this host, where the OS user
    /// that runs `archive-push` can already write.
    pub fn default_spool(&self) -> PathBuf {
        sibling(&self.catalog, ".spool")
    }

    /// The file whose lock allows one backup at a time: inside a local repository; beside the
    /// catalog for S3, so only backups started on this host are kept apart (one host writes a
    /// bucket prefix).
    pub fn lock_file(&self) -> PathBuf {
        match &self.storage {
            RepoStorage::Local(path) => path.join("backup.lock"),
            RepoStorage::S3(_) => sibling(&self.catalog, ".lock"),
        }
    }
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[derive(Clone, Debug)]
pub struct PgConfig {
    /// The cluster's data directory.
    pub data: PathBuf,
    /// Socket directory (absolute path) or host name.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub database: String,
    /// Directory of the server's programs (postgres, pg_ctl) for `drill`; None = the running
    /// server's, else PATH.
    pub bin: Option<PathBuf>,
}

/// How to reach the primary of a standby named by `[pg]`.
#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    /// Socket directory (absolute path) or host name.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub database: String,
}

#[derive(Clone, Debug)]
pub struct BackupConfig {
    /// Request an immediate checkpoint at backup start instead of waiting for a spread one.
    pub fast_checkpoint: bool,
    /// Parallel copy workers; 0 means one per core.
    pub jobs: usize,
    /// How long a backup waits for its WAL to reach the archive.
    pub archive_timeout: Duration,
    /// How far behind its primary a standby may be for a backup from it: it must replay what
    /// the primary had written when asked within this time.
    pub standby_max_lag: Duration,
}

#[derive(Clone, Debug)]
pub struct ArchiveConfig {
    /// How long `check` waits for the switched segment to reach the archive.
    pub check_timeout: Duration,
    /// `async = true`: `archive-push` hands segments to a background worker that pushes the
    /// next `.ready` ones ahead (see `spool`).
    pub push_async: bool,
    /// Where the acknowledgements and errors of the background worker live (local, absolute).
    pub spool_path: PathBuf,
    /// Segments the background worker pushes at once.
    pub process_max: usize,
    /// How long an async `archive-push` waits for its segment's acknowledgement.
    pub push_timeout: Duration,
}

/// Where `drill` builds its sandboxes.
#[derive(Clone, Debug, Default)]
pub struct DrillConfig {
    /// Parent of each drill's private sandbox directory; None = the system temp directory.
    pub dir: Option<PathBuf>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            fast_checkpoint: true,
            jobs: 0,
            archive_timeout: Duration::from_secs(60),
            standby_max_lag: Duration::from_secs(60),
        }
    }
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            check_timeout: Duration::from_secs(60),
            push_async: false,
            spool_path: PathBuf::new(),
            process_max: 2,
            push_timeout: Duration::from_secs(60),
        }
    }
}

impl BackupConfig {
    /// Worker count with 0 resolved to the number of cores.
    pub fn effective_jobs(&self) -> usize {
        if self.jobs > 0 {
            self.jobs
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }
}
