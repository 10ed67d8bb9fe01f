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
    /// The primary `[pg]` streams from; needed only when `[pg]` is a standby.
    pub primary: Option<PrimaryConfig>,
    pub backup: BackupConfig,
    pub archive: ArchiveConfig,
    pub drill: DrillConfig,
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
