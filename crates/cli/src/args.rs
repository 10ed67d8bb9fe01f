//! Command-line flags (clap), the first of two stages: raw flags here, validated options in config.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

/// Physical backups and WAL archiving for PostgreSQL.
#[derive(Parser, Debug)]
#[command(name = "pgkeep", version, long_about = None)]
pub struct Cli {
    /// Config file [default: $PGKEEP_CONFIG, else /etc/pgkeep/pgkeep.toml]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Allow commands other than restore to run as root (files they create would be owned by root).
    #[arg(long, global = true)]
    pub allow_root: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the repository and catalog for the configured cluster (every configured
    /// repository, or only --repo N).
    Init {
        /// Only repository N (1..N, [[repo]] entries in file order) [default: every repository].
        #[arg(long, value_name = "N")]
        repo: Option<usize>,
    },
    /// Archive one WAL file: archive_command = 'pgkeep --config FILE archive-push %p'.
    ArchivePush {
        /// Path of the file, relative to the data directory as PostgreSQL passes it.
        wal_path: PathBuf,
    },
    /// The background worker of an asynchronous archive-push ([archive] async = true), started
    /// by archive-push itself: pushes the `.ready` files of this pg_wal directory ahead.
    #[command(hide = true)]
    ArchivePushWorker {
        /// Absolute path of the cluster's pg_wal directory.
        pg_wal: PathBuf,
    },
    /// Fetch one archived WAL file: restore_command = 'pgkeep --config FILE archive-get %f "%p"'.
    ArchiveGet {
        /// Name of the WAL file (segment, .history, .backup or .partial).
        wal_name: String,
        /// Where to write it.
        dest_path: PathBuf,
    },
    /// Check config, connection, WAL settings and that archiving reaches every repository.
    Check,
    /// Take a backup of the running cluster.
    Backup {
        /// full copies every file; diff stores pages changed since the last full; incr since the last backup.
        #[arg(long = "type", value_enum)]
        backup_type: TypeArg,
        /// Parallel copy workers [default: [backup] jobs, else one per core].
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// diff/incr: find changed pages by reading every page instead of from the archived WAL.
        #[arg(long)]
        scan: bool,
        /// Repository number (1..N, [[repo]] entries in file order) [default: 1].
        #[arg(long, value_name = "N")]
        repo: Option<usize>,
    },
    /// Rebuild a data directory from a backup and set up point-in-time recovery, or a replica.
    // Boxed: its many flags would make every other command's value as large.
    Restore(Box<RestoreArgs>),
    /// List backups (oldest first), or show one.
    Show {
        /// Only this backup.
        label: Option<String>,
        /// Only repository N (1..N, [[repo]] entries in file order) [default: every repository].
        #[arg(long, value_name = "N")]
        repo: Option<usize>,
        /// Print `{"backups": [...]}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-read stored backups and WAL by CRC: backups become OK or CORRUPT; gaps in the archive
    /// and the restorable windows they cut are reported. Exits 3 when anything is damaged.
    Validate {
        /// Only this backup and the WAL it needs [default: every backup and the whole archive].
        label: Option<String>,
        /// Parallel readers [default: [backup] jobs, else one per core].
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// Only repository N (1..N, [[repo]] entries in file order) [default: every repository].
        #[arg(long, value_name = "N")]
        repo: Option<usize>,
    },
    /// Apply [retention]: remove the backups and archived WAL it does not keep (also runs after
    /// every successful backup unless `auto = false`), and finish interrupted deletions.
    Expire {
        /// Only print what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only repository N (1..N, [[repo]] entries in file order) [default: every repository].
        #[arg(long, value_name = "N")]
        repo: Option<usize>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete one backup and every backup that depends on it, newest first.
    Delete {
        label: String,
        /// Also when the backup is pinned or the last one that restores to the newest point.
        #[arg(long)]
        force: bool,
        /// Repository number (1..N, [[repo]] entries in file order) [default: 1].
        #[arg(long, value_name = "N")]
        repo: Option<usize>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Keep a backup whatever [retention] says, with the WAL from its start to its stop.
    Pin {
        label: String,
        /// Until this time (RFC 3339, "YYYY-MM-DD HH:MM:SS[+HH]" or "YYYY-MM-DD"; without an
        /// offset, local time) [default: until `pgkeep unpin`].
        #[arg(long, value_name = "DATE")]
        until: Option<String>,
        /// Repository number (1..N, [[repo]] entries in file order) [default: 1].
        #[arg(long, value_name = "N")]
        repo: Option<usize>,
    },
    /// Let [retention] decide about a pinned backup again.
    Unpin {
        label: String,
        /// Repository number (1..N, [[repo]] entries in file order) [default: 1].
        #[arg(long, value_name = "N")]
        repo: Option<usize>,
    },
    /// Restore a backup into a private sandbox, start it, replay the archive, check pages and
    /// tables, report RTO and RPO, then remove the sandbox. Exits 3 when the drill fails.
    Drill {
        /// Backup to drill [default: the newest one restore would choose].
        #[arg(long, value_name = "LABEL")]
        backup: Option<String>,
        /// Recover up to this time instead of the end of the archive (as restore --target-time).
        #[arg(long, value_name = "TS")]
        target_time: Option<String>,
        /// Parallel restore writers and page readers [default: [backup] jobs, else one per core].
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Leave the sandbox (stopped) in place and print its path.
        #[arg(long)]
        keep: bool,
        /// Repository number (1..N, [[repo]] entries in file order) [default: 1].
        #[arg(long, value_name = "N")]
        repo: Option<usize>,
    },
    /// Catalog maintenance.
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum CatalogCommand {
    /// Rebuild the catalog from the repository alone (each backup's backup.ini and manifest,
    /// and the WAL archive), creating it if it is missing.
    Rebuild {
        /// Only repository N (1..N, [[repo]] entries in file order) [default: every repository].
        #[arg(long, value_name = "N")]
        repo: Option<usize>,
    },
}

/// Raw restore flags; `options::restore_options` validates them.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("recovery_target").args(["target_time", "target_lsn", "target_xid", "target_name", "target"])))]
pub struct RestoreArgs {
    /// Data directory to restore into (absent or empty, unless --delta).
    #[arg(long, value_name = "DIR")]
    pub pgdata: PathBuf,
    /// Backup to restore [default: the newest one that can reach the target].
    #[arg(long, value_name = "LABEL")]
    pub backup: Option<String>,
    /// Restore from repository N (1..N, [[repo]] entries in file order) [default: the first
    /// repository, in order, holding a backup that can reach the target].
    #[arg(long, value_name = "N")]
    pub repo: Option<usize>,
    /// Recover up to this time: RFC 3339 or "YYYY-MM-DD HH:MM:SS[.ffffff][+HH:MM]"; without an offset, local time.
    #[arg(long, value_name = "TS")]
    pub target_time: Option<String>,
    /// Recover up to this WAL position (X/X).
    #[arg(long, value_name = "LSN")]
    pub target_lsn: Option<String>,
    /// Recover up to this transaction id.
    #[arg(long, value_name = "XID")]
    pub target_xid: Option<u64>,
    /// Recover up to this restore point (pg_create_restore_point).
    #[arg(long, value_name = "NAME")]
    pub target_name: Option<String>,
    /// `immediate`: stop as soon as the backup is consistent.
    #[arg(long, value_enum)]
    pub target: Option<TargetArg>,
    /// What the server does at the target [PostgreSQL's default: pause].
    #[arg(long, value_enum, default_value = "pause")]
    pub target_action: ActionArg,
    /// Timeline to follow: latest, current or a number.
    #[arg(long, value_name = "TLI")]
    pub target_timeline: Option<String>,
    /// Reuse files of an existing directory whose size and SHA-256 match the backup; remove the rest.
    #[arg(long)]
    pub delta: bool,
    /// Parallel writers [default: one per core].
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Restore tablespace OID into DIR instead of its original location (repeatable).
    #[arg(long = "tablespace-map", value_name = "OID=DIR")]
    pub tablespace_map: Vec<String>,
    /// Put pg_wal in DIR (an empty or new directory) and link it from the data directory;
    /// without it pg_wal is a plain directory inside --pgdata, whatever the source had.
    #[arg(long, value_name = "DIR")]
    pub waldir: Option<PathBuf>,
    /// Build a streaming replica: standby.signal instead of recovery.signal, no recovery target;
    /// the replica replays the archive, then streams from its primary.
    #[arg(long)]
    pub standby: bool,
    /// The replica's primary_conninfo, e.g. "host=db1 port=5432 user=replicator" (with --standby).
    #[arg(long, value_name = "CONNINFO", requires = "standby")]
    pub primary_conninfo: Option<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum TypeArg {
    Full,
    Diff,
    Incr,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum TargetArg {
    Immediate,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum ActionArg {
    Pause,
    Promote,
    Shutdown,
}

impl Command {
    /// Only restore may run as root: it must give restored files their recorded owners.
    pub fn may_run_as_root(&self) -> bool {
        matches!(self, Command::Restore { .. })
    }
}
