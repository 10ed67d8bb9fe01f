//! Validated configuration handed to every command (the CLI builds it from TOML and flags).

use std::path::PathBuf;
use std::time::Duration;

/// Everything a command needs to know about the repository and the cluster.
#[derive(Clone, Debug)]
pub struct Config {
    /// Absolute path of the config file this came from; written into `restore_command` and
    /// compared with `archive_command` by `check`.
    pub config_path: PathBuf,
    pub repo: RepoConfig,
    pub pg: PgConfig,
    pub backup: BackupConfig,
    pub archive: ArchiveConfig,
    pub retention: RetentionConfig,
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

impl Policy {
    /// Whether any part of the policy is set.
    pub fn is_set(&self) -> bool {
        self.full.is_some() || self.window.is_some() || self.diff.is_some()
    }
}

#[derive(Clone, Debug)]
pub struct RepoConfig {
    pub path: PathBuf,
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
}

#[derive(Clone, Debug)]
pub struct BackupConfig {
    /// Request an immediate checkpoint at backup start instead of waiting for a spread one.
    pub fast_checkpoint: bool,
    /// Parallel copy workers; 0 means one per core.
    pub jobs: usize,
    /// How long a backup waits for its WAL to reach the archive.
    pub archive_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct ArchiveConfig {
    /// How long `check` waits for the switched segment to reach the archive.
    pub check_timeout: Duration,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            fast_checkpoint: true,
            jobs: 0,
            archive_timeout: Duration::from_secs(60),
        }
    }
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            check_timeout: Duration::from_secs(60),
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
