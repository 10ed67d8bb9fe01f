//! `pgkeep backup`: copy a running cluster between non-exclusive `pg_backup_start` and
//! `pg_backup_stop` on one held connection, then wait until the archive holds every WAL segment
//! the backup needs. Only then is the backup DONE.
//!
//! A diff or incr backup builds on a parent (the newest full, or the newest backup of any type).
//! Relation main forks the parent has are stored as page deltas ([`crate::delta`]). Which pages
//! changed comes from the changed-block map ([`crate::blockmap`]) when pgkeep's WAL archive
//! covers the interval from the parent's start to this backup's: only the listed blocks and the
//! blocks past the parent's length are read, and a file with neither is not read at all. Without
//! a map (`--scan`, or a map that cannot be trusted) every page is read, and stored when its
//! `pd_lsn` is at or after the parent's start LSN or it is new, zero or insane. Every other file
//! is stored whole when its content differs from the parent's (SHA-256), else its record refers
//! to the backup that holds the bytes.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
pub use pgkeep_catalog::BackupType;
use pgkeep_catalog::{meta, BackupRecord, BackupStatus, Catalog, FileKind, FileRecord};
use pgkeep_pg::{
    parse_relation_path, segment_name, verify_page, BackupLabel, ControlFile, Fork, Lsn,
    PageHeader, PageVerdict, RelFileLocator, TimelineId, WalSegSize,
};
use pgkeep_repo::{keys, put_bytes, CompressWriter, Storage};
use sha2::{Digest as _, Sha256};

use crate::archive::wait_for_wal;
use crate::blockmap::{self, BlockMap, Changes, MapSource, Origin};
use crate::bundle::{Bundler, Sink};
use crate::chain::{Chain, ChainPages};
use crate::check::{archive_command_ok, expected_archive_config};
use crate::config::Config;
use crate::delta::DeltaWriter;
use crate::init::check_same_cluster;
use crate::lock::BackupLock;
use crate::parallel;
use crate::pg::{self, PgConn, ServerIdentity};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::standby;
use crate::summaries;
use crate::user;
use crate::walk::{walk, Entry};

/// What to take.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub backup_type: BackupType,
    /// Copy workers; None = the configured default.
    pub jobs: Option<usize>,
    /// Find a diff or incr's changed pages by reading every page, not from the WAL archive.
    pub scan: bool,
}

/// Where a diff or incr learnt which pages changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockSource {
    /// The changed-block map, from the archived WAL between these LSNs.
    Wal {
        since: Lsn,
        until: Lsn,
        records: u64,
    },
    /// The changed-block map, from the server's WAL summaries (PostgreSQL 17+) of this interval.
    Summaries {
        since: Lsn,
        until: Lsn,
        /// Summary files read.
        files: u64,
    },
    /// Every page read and its LSN compared; `reason` says why.
    Scan { reason: String },
}

/// How a diff or incr found its changed pages, file by file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockReport {
    pub source: BlockSource,
    /// Relation main forks not read at all: no changed block, same length as in the parent.
    pub files_not_read: u64,
    /// Relation main forks of which only the changed blocks and the new tail were read.
    pub files_by_block: u64,
    /// Relation main forks read whole although a map was built (storage created or truncated,
    /// a new or changed database, a file shorter than the parent's without a truncation).
    pub files_fallen_back: u64,
    /// Why the server's WAL summaries were not used although it keeps them (17+ with
    /// `summarize_wal = on`): they did not cover the interval, the summarizer lagged, ...
    pub summaries_unused: Option<String>,
}

/// A page whose checksum stayed wrong on a second read: the disk under the cluster is damaged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageFailure {
    pub path: String,
    pub block: u32,
}

/// The finished backup.
#[derive(Debug)]
pub struct BackupSummary {
    pub record: BackupRecord,
    pub elapsed: Duration,
    pub page_failures: Vec<PageFailure>,
    /// What the automatic `expire` after the backup removed, or why it failed (the backup
    /// stays DONE either way); None when `[retention]` sets no policy or `auto = false`.
    pub expired: Option<std::result::Result<crate::retention::RetentionReport, String>>,
    /// How a diff or incr found its changed pages; None for a full backup.
    pub blocks: Option<BlockReport>,
    /// Bytes read from the data directory.
    pub bytes_read: u64,
}

/// Name of the per-backup metadata files in the repository.
pub const BACKUP_INI: &str = "backup.ini";
pub const MANIFEST: &str = "manifest";
pub const BACKUP_LABEL: &str = "backup_label";
pub const TABLESPACE_MAP: &str = "tablespace_map";

/// Take a backup. Any failure leaves the backup ERROR, never DONE.
pub fn backup(
    cfg: &Config,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupSummary> {
    let started = Instant::now();
    let repo = Repo::open(cfg)?;
    let lock_holder = format!("pid {} on {}", user::pid(), user::hostname());
    let _lock = BackupLock::acquire(&cfg.repo, &lock_holder)?;
    // Holding the lock, no other backup can be running: any RUNNING row is a dead one.
    mark_interrupted(&repo.catalog, true)?;

    let mut conn = pg::connect(&cfg.pg)?;
    let (server, mut primary) = preflight(&mut conn, cfg, &repo)?;
    let parent = match opts.backup_type {
        BackupType::Full => None,
        t => {
            let parent = choose_parent(&repo.catalog, t)?;
            let timeline = insert_timeline(&mut conn)?;
            check_parent(&parent, t, &server, timeline)?;
            Some(parent)
        }
    };
    let label = new_label(&repo.catalog, opts.backup_type)?;
    let mut record = BackupRecord {
        label: label.clone(),
        backup_type: opts.backup_type,
        status: BackupStatus::Running,
        parent: parent.as_ref().map(|p| p.label.clone()),
        timeline: 0,
        start_lsn: Lsn::INVALID,
        stop_lsn: None,
        start_wal: String::new(),
        stop_wal: None,
        start_time: Utc::now(),
        end_time: None,
        recovery_time: None,
        data_bytes: 0,
        stored_bytes: 0,
        files: 0,
        pg_version_num: server.version_num,
        system_identifier: server.system_identifier,
        block_size: server.block_size,
        data_checksums: server.data_checksums,
        pid: user::pid(),
        hostname: user::hostname(),
        page_checksum_failures: 0,
        error: None,
        from_standby: primary.is_some(),
        pinned: None,
    };
    repo.catalog.insert_backup(&record)?;
    let jobs = opts
        .jobs
        .unwrap_or_else(|| cfg.backup.effective_jobs())
        .max(1);
    match run(
        cfg,
        &repo,
        &mut conn,
        primary.as_mut(),
        &server,
        parent.as_ref(),
        &mut record,
        jobs,
        opts.scan,
        progress,
    ) {
        Ok(copied) => {
            let elapsed = started.elapsed();
            // Still under the backup lock, so nothing can start between the two.
            let expired = (cfg.retention.auto && cfg.retention.policy.is_set()).then(|| {
                crate::retention::expire_locked(cfg, &repo, false).map_err(|e| format!("{e:#}"))
            });
            Ok(BackupSummary {
                record,
                elapsed,
                page_failures: copied.page_failures,
                blocks: copied.blocks,
                bytes_read: copied.bytes_read,
                expired,
            })
        }
        Err(e) => {
            let message = format!("{e:#}");
            if let Ok(r) = repo
                .catalog
                .set_status(&label, BackupStatus::Error, Some(&message))
            {
                let _ = crate::status::store_status(repo.storage(), &r);
            }
            Err(e.context(format!("backup {label} failed")))
        }
    }
}

/// Turn RUNNING backups whose process is gone into ERROR (all of them when `all`, as when the
/// caller holds the backup lock).
pub fn mark_interrupted(catalog: &Catalog, all: bool) -> Result<Vec<String>> {
    let me = user::hostname();
    let mut marked = Vec::new();
    for b in catalog.backups()? {
        if b.status != BackupStatus::Running {
            continue;
        }
        let dead = all || (b.hostname == me && !user::process_alive(b.pid));
        if dead {
            catalog.set_status(
                &b.label,
                BackupStatus::Error,
                Some("interrupted: the backup process ended before the backup finished"),
            )?;
            marked.push(b.label);
        }
    }
    Ok(marked)
}

/// Check the server, its data directory and the archiving before anything is recorded. For a
/// standby, also connect to its primary and check that the standby follows it; that connection
/// is returned, for the WAL switch after the stop call.
fn preflight(
    conn: &mut PgConn,
    cfg: &Config,
    repo: &Repo,
) -> Result<(ServerIdentity, Option<PgConn>)> {
    let server = conn.identity()?;
    if !pg::same_dir(&server.data_directory, &cfg.pg.data) {
        bail!(
            "the server runs data directory {} but [pg] data in {} is {}: fix the config",
            server.data_directory.display(),
            cfg.config_path.display(),
            cfg.pg.data.display()
        );
    }
    let in_recovery = conn.in_recovery()?;
    check_data_directory(cfg, &server, in_recovery)?;
    check_same_cluster(
        &repo.identity,
        &crate::check::repo_identity(&server),
        &repo.name,
    )?;
    let mut primary = if in_recovery {
        let mut primary = standby::connect_primary(cfg)?;
        standby::check_follows(conn, server.system_identifier, &mut primary, cfg)?;
        Some(primary)
    } else {
        None
    };
    // WAL reaches the archive from the primary, whichever server is copied.
    let (archiver, which) = match primary.as_mut() {
        Some(p) => (p, format!("the primary at {}", standby::primary_name(cfg))),
        None => (&mut *conn, "the server".to_string()),
    };
    let mode = archiver.setting("archive_mode")?;
    let command = archiver.setting("archive_command")?;
    if mode == "off" || !archive_command_ok(&command, expected_archive_config(cfg, in_recovery)) {
        bail!(
            "{which} does not archive WAL to this repository (archive_mode = {mode}, archive_command = {command:?}): set archive_command = 'pgkeep --config {} archive-push %p'; `pgkeep check` tests it",
            cfg.config_path.display()
        );
    }
    Ok((server, primary))
}

/// Refuse a `[pg] data` that is not the connected server's data directory, whatever its path
/// says: the server may run on another host or in another mount namespace where the same path
/// holds another cluster (often that primary's own standby), or have been started through a
/// symlink since pointed elsewhere. Copying it under the server's `pg_backup_start` would make a
/// backup that restores to something else, or to nothing consistent.
///
/// The system identifier tells another cluster where the server reads its own `pg_control`;
/// through a symlink `pg_control_system()` reads the same file as we do, and there only the
/// state (a running primary's says "in production") and `standby.signal` tell; a running
/// standby's says "in archive recovery".
pub(crate) fn check_data_directory(
    cfg: &Config,
    server: &ServerIdentity,
    server_in_recovery: bool,
) -> Result<()> {
    let data = &cfg.pg.data;
    let control = read_control_file(data)?;
    let at = format!("the server at {}:{}", cfg.pg.host, cfg.pg.port);
    if control.system_identifier != server.system_identifier {
        bail!(
            "[pg] data {} holds system identifier {} but {at} has system identifier {}: set [pg] data in {} to the data directory of the server it connects to",
            data.display(),
            control.system_identifier,
            server.system_identifier,
            cfg.config_path.display()
        );
    }
    if server_in_recovery {
        // A stopped copy or a primary's directory says otherwise.
        if !control.in_archive_recovery() {
            bail!(
                "[pg] data {} is not a running standby's data directory (pg_control state \"{}\") but {at} is a standby: set [pg] data in {} to the standby's data directory",
                data.display(),
                control.state_name(),
                cfg.config_path.display()
            );
        }
        return Ok(());
    }
    let standby_signal = data.join("standby.signal").exists();
    // A running primary's pg_control says "in production" from the end of its startup on; a
    // standby's, or a stopped copy's, says otherwise even though the system identifier matches.
    if !control.in_production() || standby_signal {
        bail!(
            "[pg] data {} is a standby's or a copy's data directory (pg_control state \"{}\"{}) but {at} is a primary in production: set [pg] data in {} to the primary's data directory",
            data.display(),
            control.state_name(),
            if standby_signal { ", standby.signal present" } else { "" },
            cfg.config_path.display()
        );
    }
    Ok(())
}

/// `global/pg_control` of `data`. The server rewrites the file in place, so a read may catch a
/// write half done; PostgreSQL's own readers retry on a CRC mismatch, and so does this.
fn read_control_file(data: &std::path::Path) -> Result<ControlFile> {
    let path = data.join("global/pg_control");
    let context = || {
        format!(
            "reading {}: is [pg] data the server's data directory?",
            path.display()
        )
    };
    let mut tries = 0;
    loop {
        let bytes = std::fs::read(&path).with_context(context)?;
        match ControlFile::parse(&bytes) {
            Ok(control) => return Ok(control),
            Err(_) if tries < 3 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(context),
        }
    }
}

/// The backup a diff (newest full) or incr (newest of any type) builds on: the newest DONE or OK
/// one, whose ancestors must all be DONE or OK too.
fn choose_parent(catalog: &Catalog, t: BackupType) -> Result<BackupRecord> {
    let backups = catalog.backups()?;
    let parent = backups
        .iter()
        .rev()
        .filter(|b| b.status.is_restorable())
        .find(|b| t == BackupType::Incr || b.backup_type == BackupType::Full)
        .ok_or_else(|| {
            let what = if t == BackupType::Diff { "full backup" } else { "backup" };
            anyhow!(
                "no DONE or OK {what} to take a {t} backup from: take a full backup first with `pgkeep backup --type full`"
            )
        })?;
    let by_label: HashMap<&str, &BackupRecord> =
        backups.iter().map(|b| (b.label.as_str(), b)).collect();
    let mut b = parent;
    // Each step goes to an older backup, so a chain is at most as long as the list.
    for _ in 0..backups.len() {
        let Some(up) = &b.parent else {
            return Ok(parent.clone());
        };
        b = by_label.get(up.as_str()).copied().ok_or_else(|| {
            anyhow!(
                "backup {up}, which backup {} builds on, is not in the catalog: take a full backup with `pgkeep backup --type full`",
                b.label
            )
        })?;
        if !b.status.is_restorable() {
            bail!(
                "backup {}, which backup {} builds on, has status {}: take a full backup with `pgkeep backup --type full`",
                b.label,
                parent.label,
                b.status
            );
        }
    }
    bail!(
        "the parent chain of backup {} loops: take a full backup with `pgkeep backup --type full`",
        parent.label
    )
}

/// A diff or incr is only meaningful against a parent of the same cluster, history and page
/// layout; anything else needs a new full backup.
fn check_parent(
    parent: &BackupRecord,
    t: BackupType,
    server: &ServerIdentity,
    timeline: u32,
) -> Result<()> {
    let differs = |what: &str, server_value: String, parent_value: String| {
        anyhow!(
            "cannot take a {t} backup from backup {}: the server's {what} is {server_value} but the backup's is {parent_value}; take a full backup with `pgkeep backup --type full`",
            parent.label
        )
    };
    if parent.system_identifier != server.system_identifier {
        return Err(differs(
            "system identifier",
            server.system_identifier.to_string(),
            parent.system_identifier.to_string(),
        ));
    }
    if parent.timeline != timeline {
        return Err(differs(
            "timeline",
            timeline.to_string(),
            parent.timeline.to_string(),
        ));
    }
    if parent.block_size != server.block_size {
        return Err(differs(
            "block size",
            server.block_size.to_string(),
            parent.block_size.to_string(),
        ));
    }
    if parent.data_checksums != server.data_checksums {
        let on = |b: bool| if b { "on" } else { "off" }.to_string();
        return Err(differs(
            "data checksum setting",
            on(server.data_checksums),
            on(parent.data_checksums),
        ));
    }
    if parent.pg_version_num / 10000 != server.major() {
        return Err(differs(
            "PostgreSQL major version",
            server.major().to_string(),
            (parent.pg_version_num / 10000).to_string(),
        ));
    }
    Ok(())
}

/// The timeline WAL is being written on now (the checkpoint's timeline lags a promotion until
/// the first checkpoint after it). A standby writes no WAL: its latest restartpoint's timeline
/// is the one its backup_label will name, which [`Parent::load`] checks again after the start.
fn insert_timeline(conn: &mut PgConn) -> Result<u32> {
    if conn.in_recovery()? {
        return checkpoint_timeline(conn);
    }
    let name = conn.query_text("SELECT pg_walfile_name(pg_current_wal_lsn())")?;
    name.get(..8)
        .and_then(|t| u32::from_str_radix(t, 16).ok())
        .ok_or_else(|| anyhow!("unexpected WAL file name {name:?} from the server"))
}

/// The timeline of the latest checkpoint (on a standby, restartpoint).
fn checkpoint_timeline(conn: &mut PgConn) -> Result<u32> {
    conn.query_text("SELECT timeline_id::text FROM pg_control_checkpoint()")?
        .parse()
        .context("reading the checkpoint timeline")
}

/// A time-sortable label, `YYYYMMDD-HHMMSS` plus F, D or I; waits a second on a clash.
fn new_label(catalog: &Catalog, t: BackupType) -> Result<String> {
    for _ in 0..5 {
        let label = format!("{}{}", Utc::now().format("%Y%m%d-%H%M%S"), t.label_suffix());
        if catalog.backup(&label)?.is_none() {
            return Ok(label);
        }
        std::thread::sleep(Duration::from_millis(1000));
    }
    bail!("could not find a free backup label: is the system clock moving?")
}

#[allow(clippy::too_many_arguments)]
fn run(
    cfg: &Config,
    repo: &Repo,
    conn: &mut PgConn,
    mut primary: Option<&mut PgConn>,
    server: &ServerIdentity,
    parent: Option<&BackupRecord>,
    record: &mut BackupRecord,
    jobs: usize,
    scan: bool,
    progress: &dyn Progress,
) -> Result<Copied> {
    let seg = repo.wal_seg_size()?;
    // A backup may run for hours: no server-side timeout may end its session.
    conn.execute("SET statement_timeout = 0")?;
    if conn.major() >= 14 {
        conn.execute("SET idle_session_timeout = 0")?;
    }
    let start_lsn = start_backup(conn, &record.label, cfg.backup.fast_checkpoint)?;
    let timeline = checkpoint_timeline(conn)?;
    record.start_lsn = start_lsn;
    record.timeline = timeline;
    record.start_wal = segment_name(TimelineId(timeline), start_lsn.segment_number(seg), seg);
    repo.catalog.update_backup(record)?;
    let parent = match parent {
        Some(p) => Some(Parent::load(repo, p, conn, timeline, record.backup_type)?),
        None => None,
    };

    let map = match &parent {
        None => None,
        Some(_) if scan => Some(Err("--scan".to_string())),
        Some(p) => {
            let source = MapSource {
                repo,
                system_identifier: server.system_identifier,
                timeline: TimelineId(timeline),
                seg,
                block_size: server.block_size,
                since: p.record.start_lsn,
                until: start_lsn,
                status_dir: None,
                archive_timeout: cfg.backup.archive_timeout,
            };
            Some(changed_blocks(
                cfg,
                conn,
                primary.as_deref_mut(),
                source,
                progress,
            )?)
        }
    };
    let entries = walk(&cfg.pg.data)?;
    let copier = Copier {
        storage: repo.storage(),
        label: &record.label,
        block_size: server.block_size as usize,
        blocks_per_segment: server.blocks_per_segment,
        verify_checksums: server.data_checksums,
        start_lsn,
        parent: parent.as_ref(),
        map: map.as_ref().and_then(|m| m.as_ref().ok()),
        counts: Counts::default(),
        progress,
        bundler: Bundler::new(repo.storage(), &record.label, cfg.repo.bundle),
    };
    let mut copied = copier.copy_all(&entries, jobs)?;
    copied.blocks = map.as_ref().map(|m| copier.counts.report(m));

    let stop = stop_backup(conn)?;
    if let Some(primary) = primary.as_deref_mut() {
        // A standby cannot switch WAL: the primary closes the segment holding the stop LSN (the
        // standby replayed no further than the primary wrote), and its archiver pushes it.
        primary.execute("SELECT pg_switch_wal()").with_context(|| {
            format!(
                "asking the primary at {} to switch WAL",
                standby::primary_name(cfg)
            )
        })?;
    }
    // Recovery targets are compared with commit times the primary's clock wrote.
    let recovery_time: DateTime<Utc> = primary
        .unwrap_or(conn)
        .client()
        .query_one("SELECT clock_timestamp()", &[])?
        .get(0);
    let label_file = BackupLabel::parse(&stop.label_file).with_context(|| {
        format!(
            "parsing the backup_label returned by the server:\n{}",
            stop.label_file
        )
    })?;
    let storage = repo.storage();
    put_bytes(
        storage,
        &keys::backup_meta(&record.label, BACKUP_LABEL),
        stop.label_file.as_bytes(),
    )?;
    let mut meta_bytes = stop.label_file.len() as u64;
    if !stop.tablespace_map.trim().is_empty() {
        put_bytes(
            storage,
            &keys::backup_meta(&record.label, TABLESPACE_MAP),
            stop.tablespace_map.as_bytes(),
        )?;
        meta_bytes += stop.tablespace_map.len() as u64;
    }
    record.timeline = label_file.start_timeline.0;
    record.stop_lsn = Some(stop.lsn);
    let needed = needed_segments(label_file.start_timeline, start_lsn, stop.lsn, seg);
    record.start_wal = needed.first().cloned().unwrap_or_default();
    record.stop_wal = needed.last().cloned();
    record.recovery_time = Some(recovery_time);
    repo.catalog.update_backup(record)?;

    progress.start("waiting for WAL", None);
    let status_dir = cfg.pg.data.join("pg_wal/archive_status");
    wait_for_wal(repo, &needed, cfg.backup.archive_timeout, |name| {
        let why = if record.from_standby {
            "the primary's archiver has not pushed it yet"
        } else if status_dir.join(format!("{name}.ready")).exists() {
            "PostgreSQL's archiver has not pushed it yet"
        } else {
            "not yet handed to the archiver"
        };
        progress.message(&format!(
            "waiting for WAL segment {name} to be archived ({why})"
        ))
    })?;
    progress.finish();

    let files = copied.files;
    let manifest = meta::manifest(&files);
    put_bytes(
        storage,
        &keys::backup_meta(&record.label, MANIFEST),
        manifest.as_bytes(),
    )?;
    meta_bytes += manifest.len() as u64;
    record.data_bytes = files
        .iter()
        .filter(|f| f.kind == FileKind::File)
        .map(|f| file_size(f, server.block_size))
        .sum();
    record.stored_bytes = files.iter().map(|f| f.stored_size).sum::<u64>() + meta_bytes;
    record.files = files.iter().filter(|f| f.kind == FileKind::File).count() as u64;
    record.page_checksum_failures = copied.page_failures.len() as u64;
    record.end_time = Some(Utc::now());
    repo.catalog.insert_files(&record.label, &files)?;
    repo.catalog.update_backup(record)?;
    // Data files were committed without waiting on the disk one by one; make all of it durable
    // before the backup may be called DONE.
    storage
        .sync()
        .with_context(|| format!("syncing repository {}", repo.name))?;
    let mut done = record.clone();
    done.status = BackupStatus::Done;
    crate::status::store_status(storage, &done)?;
    *record = repo
        .catalog
        .set_status(&record.label, BackupStatus::Done, None)?;
    Ok(Copied {
        files: Vec::new(),
        ..copied
    })
}

/// The changed-block map from the parent's start to this backup's, or why there is none.
///
/// `pg_backup_start` does not switch WAL, so the segment holding the new start LSN is still
/// being written. Reading its head from `pg_wal` would trust bytes pgkeep did not archive and a
/// file PostgreSQL may recycle under it; instead the server (a standby's primary) switches WAL
/// now, as the stop call would anyway, and the map is built from the archive alone once that
/// segment arrives. Every failure to build the map falls back to the page scan.
///
/// A server that keeps WAL summaries (17+ with `summarize_wal = on`) is asked first: its
/// summaries need no archived WAL at all. When they do not cover the interval the archive is
/// read, and the map says why the summaries were not used.
fn changed_blocks(
    cfg: &Config,
    conn: &mut PgConn,
    primary: Option<&mut PgConn>,
    mut source: MapSource<'_>,
    progress: &dyn Progress,
) -> Result<Result<BlockMap, String>> {
    progress.start("reading WAL for the changed-block map", None);
    match primary {
        Some(p) => p.execute("SELECT pg_switch_wal()").with_context(|| {
            format!(
                "asking the primary at {} to switch WAL",
                standby::primary_name(cfg)
            )
        })?,
        None => {
            conn.execute("SELECT pg_switch_wal()")?;
            source.status_dir = Some(cfg.pg.data.join("pg_wal/archive_status"));
        }
    }
    let summaries = match summaries::enabled(conn) {
        Ok(false) => None,
        Ok(true) => Some(summaries::build(
            conn,
            source.timeline,
            source.since,
            source.until,
            source.archive_timeout,
        )),
        Err(e) => Some(Err(format!("{e:#}"))),
    };
    let map = match summaries {
        Some(Ok(map)) => Ok(Ok(map)),
        None => blockmap::build(&source),
        Some(Err(why)) => blockmap::build(&source).map(|built| match built {
            Ok(mut map) => {
                map.summaries_unused = Some(why);
                Ok(map)
            }
            Err(archive) => Err(format!("{archive}; WAL summaries not used: {why}")),
        }),
    };
    progress.finish();
    map
}

/// The length of the cluster file a record describes. For a page-delta record `size` is the
/// length of the stored delta stream (what validation checks) and the file is `n_blocks` pages.
pub fn file_size(rec: &FileRecord, block_size: u32) -> u64 {
    if rec.page_delta {
        rec.n_blocks.unwrap_or(0) * u64::from(block_size)
    } else {
        rec.size
    }
}

/// What [`pgkeep_repo::fetch_decompressed`] must find in the object a file record's backup
/// stored (the record's `stored_in` is that backup): raw length and CRC-32C. For a page-delta
/// record that is the delta stream, whose length is the record's `size` like any other object's.
/// None for directories and links, which have no object.
pub fn stored_expectation(rec: &FileRecord) -> Option<(u64, u32)> {
    rec.crc32c.map(|crc| (rec.size, crc))
}

/// The parent of a diff or incr backup: its record and its full logical file list.
struct Parent {
    record: BackupRecord,
    /// Regular files by path.
    files: HashMap<String, FileRecord>,
    /// Directories, to tell a database directory that is new since the parent.
    dirs: HashSet<String>,
    /// The parent and the backups it builds on: where its copy of each page is.
    chain: Chain,
}

impl Parent {
    /// Called after the start call, when the checkpoint has settled the timeline.
    fn load(
        repo: &Repo,
        record: &BackupRecord,
        conn: &mut PgConn,
        timeline: u32,
        t: BackupType,
    ) -> Result<Parent> {
        if record.timeline != timeline {
            bail!(
                "cannot take a {t} backup from backup {}: the server is on timeline {timeline} but the backup was taken on timeline {}; take a full backup with `pgkeep backup --type full`",
                record.label,
                record.timeline
            );
        }
        // Every page changed since the parent has an LSN at or after its start; a parent that
        // starts beyond the server's WAL position belongs to another history.
        let now = conn.current_wal_lsn()?;
        if record.start_lsn > now {
            bail!(
                "cannot take a {t} backup from backup {}: it starts at LSN {} but the server's WAL is only at {now}; take a full backup with `pgkeep backup --type full`",
                record.label,
                record.start_lsn
            );
        }
        // Loading the chain also proves every backup below the parent is still restorable.
        let chain = Chain::load(&repo.catalog, record)?;
        let mut files = HashMap::new();
        let mut dirs = HashSet::new();
        for f in &chain.newest {
            match f.kind {
                FileKind::File => {
                    files.insert(f.path.clone(), f.clone());
                }
                FileKind::Dir => {
                    dirs.insert(f.path.clone());
                }
                FileKind::Symlink => {}
            }
        }
        Ok(Parent {
            record: record.clone(),
            files,
            dirs,
            chain,
        })
    }
}

/// The parent chain's copy of one file's pages, for storing changed pages as their difference
/// from it. Opened on the first changed page: files with no change read nothing of the parent.
struct OlderPages<'a> {
    storage: &'a dyn Storage,
    parent: &'a Parent,
    pages: Option<ChainPages>,
    buf: Vec<u8>,
}

impl<'a> OlderPages<'a> {
    fn new(storage: &'a dyn Storage, parent: &'a Parent, block_size: usize) -> Self {
        OlderPages {
            storage,
            parent,
            pages: None,
            buf: vec![0; block_size],
        }
    }

    /// Block `block` of `p` (the parent's record of the file) as the parent chain holds it;
    /// blocks must be asked for in increasing order.
    fn page(&mut self, p: &FileRecord, block: u64) -> Result<&[u8]> {
        let label = &self.parent.record.label;
        let damaged = || {
            format!(
                "reading {} from parent backup {label}: run `pgkeep validate`, or take a full backup with `pgkeep backup --type full`",
                p.path
            )
        };
        let pages = match &mut self.pages {
            Some(pages) => pages,
            None => {
                let source = self.parent.chain.source(p).with_context(damaged)?;
                let opened = ChainPages::open(self.storage, &source, self.buf.len());
                self.pages.insert(opened.with_context(damaged)?)
            }
        };
        let block = u32::try_from(block)
            .map_err(|_| anyhow!("block {block} of {} is beyond any relation segment", p.path))?;
        pages.page(block, &mut self.buf).with_context(damaged)?;
        Ok(&self.buf)
    }
}

/// Every WAL segment from the one holding `start` to the one holding the byte before `stop`.
pub fn needed_segments(tli: TimelineId, start: Lsn, stop: Lsn, seg: WalSegSize) -> Vec<String> {
    let first = start.segment_number(seg);
    let last = Lsn(stop.0.saturating_sub(1)).segment_number(seg).max(first);
    (first..=last).map(|s| segment_name(tli, s, seg)).collect()
}

fn start_backup(conn: &mut PgConn, label: &str, fast: bool) -> Result<Lsn> {
    let sql = if conn.major() >= 15 {
        "SELECT pg_backup_start($1, $2)::text"
    } else {
        "SELECT pg_start_backup($1, $2, false)::text"
    };
    let row = conn
        .client()
        .query_one(sql, &[&label, &fast])
        .context("starting the backup on the server")?;
    let text: String = row.get(0);
    text.parse()
        .with_context(|| format!("unexpected backup start LSN {text:?}"))
}

struct Stop {
    lsn: Lsn,
    label_file: String,
    tablespace_map: String,
}

fn stop_backup(conn: &mut PgConn) -> Result<Stop> {
    // wait_for_archive = false: PostgreSQL would wait without a time limit; pgkeep waits itself,
    // with a timeout and an error naming the missing segment. A primary switches WAL either way;
    // a standby cannot, and its primary is asked to.
    let sql = if conn.major() >= 15 {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
    } else {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
    };
    let row = conn
        .client()
        .query_one(sql, &[])
        .context("stopping the backup on the server")?;
    let lsn: String = row.get(0);
    Ok(Stop {
        lsn: lsn
            .parse()
            .with_context(|| format!("unexpected backup stop LSN {lsn:?}"))?,
        label_file: row.get::<_, Option<String>>(1).unwrap_or_default(),
        tablespace_map: row.get::<_, Option<String>>(2).unwrap_or_default(),
    })
}

/// Copies files into the repository with N workers.
struct Copier<'a> {
    storage: &'a dyn Storage,
    label: &'a str,
    block_size: usize,
    blocks_per_segment: u32,
    verify_checksums: bool,
    start_lsn: Lsn,
    /// The backup a diff or incr builds on; None for a full backup.
    parent: Option<&'a Parent>,
    /// Changed blocks since the parent; None: find them by reading every page.
    map: Option<&'a BlockMap>,
    counts: Counts,
    progress: &'a dyn Progress,
    /// Where each stored file goes: an object of its own or a bundle.
    bundler: Bundler<'a>,
}

struct Copied {
    files: Vec<FileRecord>,
    page_failures: Vec<PageFailure>,
    blocks: Option<BlockReport>,
    bytes_read: u64,
}

/// What the workers did, counted as they go.
#[derive(Default)]
struct Counts {
    not_read: AtomicU64,
    by_block: AtomicU64,
    fallen_back: AtomicU64,
    bytes_read: AtomicU64,
}

impl Counts {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn report(&self, map: &Result<BlockMap, String>) -> BlockReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockReport {
            source: match map {
                Ok(m) if m.origin == Origin::Summaries => BlockSource::Summaries {
                    since: m.since,
                    until: m.until,
                    files: m.records,
                },
                Ok(m) => BlockSource::Wal {
                    since: m.since,
                    until: m.until,
                    records: m.records,
                },
                Err(reason) => BlockSource::Scan {
                    reason: reason.clone(),
                },
            },
            files_not_read: get(&self.not_read),
            files_by_block: get(&self.by_block),
            files_fallen_back: get(&self.fallen_back),
            summaries_unused: map.as_ref().ok().and_then(|m| m.summaries_unused.clone()),
        }
    }
}

/// How one file goes into a diff or incr backup.
enum Plan<'p> {
    /// Stored whole: new since the parent, or a full backup.
    Whole,
    /// Stored whole if its content differs from the parent's record, else referred to.
    IfChanged(&'p FileRecord),
    /// A relation main fork the parent has: the pages changed since the parent, found by
    /// reading every page.
    Pages(&'p FileRecord),
    /// A relation main fork the parent has, with the changed-block map's blocks of its relation
    /// (all segment files), its limit block (see [`Changes::Blocks`]) and the number of its
    /// segment file.
    Blocks(&'p FileRecord, &'p [u32], Option<u32>, u32),
}

/// A file copy's outcome: its record and the pages whose checksum failed; None if the file
/// vanished (WAL replay recreates it if it matters).
type CopyResult = Result<Option<(FileRecord, Vec<PageFailure>)>>;

/// How a relation file's pages ended: its length read, the parent's, its blocks, and the
/// SHA-256 of the whole file when it was read whole.
struct DeltaEnd {
    size: u64,
    parent_size: u64,
    n_blocks: u64,
    sha256: Option<[u8; 32]>,
}

type DeltaObject = DeltaWriter<CompressWriter<Sink>>;

/// Where a relation file's page delta is stored, and at most how many raw bytes it holds (which
/// decides whether it goes into a bundle).
struct Target {
    key: String,
    raw: u64,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key)
    }
}

impl Copier<'_> {
    fn copy_all(&self, entries: &[Entry], jobs: usize) -> Result<Copied> {
        let mut files: Vec<FileRecord> = entries
            .iter()
            .filter(|e| e.kind != FileKind::File)
            .map(|e| record_of(e, None))
            .collect();
        // pg_control goes last, once everything it describes has been copied.
        let (control, mut todo): (Vec<&Entry>, Vec<&Entry>) = entries
            .iter()
            .filter(|e| e.kind == FileKind::File)
            .partition(|e| e.rel == "global/pg_control");
        if control.is_empty() {
            bail!("global/pg_control not found in the data directory: is [pg] data right?");
        }
        // Largest first, so no worker is left with a big file at the end.
        todo.sort_by_key(|e| std::cmp::Reverse(e.size));
        let total: u64 = todo.iter().chain(&control).map(|e| e.size).sum();
        self.progress.start("copying", Some(total));
        let results = parallel::for_each(&todo, jobs, |entry, buf| self.copy_file(entry, buf))?;
        let mut copied = Vec::with_capacity(results.len());
        let mut page_failures = Vec::new();
        for (rec, mut bad) in results.into_iter().flatten() {
            copied.push(rec);
            page_failures.append(&mut bad);
        }
        let mut buf = vec![0u8; parallel::BUF_SIZE];
        let (rec, _) = self
            .copy_file(control[0], &mut buf)?
            .ok_or_else(|| anyhow!("global/pg_control vanished during the backup"))?;
        copied.push(rec);
        self.bundler.finish()?;
        self.progress.finish();
        files.append(&mut copied);
        files.sort_by(|a, b| a.path.cmp(&b.path));
        page_failures.sort_by(|a, b| (&a.path, a.block).cmp(&(&b.path, b.block)));
        Ok(Copied {
            files,
            page_failures,
            blocks: None,
            bytes_read: self.counts.bytes_read.load(Ordering::Relaxed),
        })
    }

    fn copy_file(&self, entry: &Entry, buf: &mut [u8]) -> CopyResult {
        match self.plan(entry) {
            Plan::Whole => self.copy_whole(entry, buf),
            Plan::IfChanged(p) => self.copy_if_changed(entry, p, buf),
            Plan::Pages(p) => self.copy_pages(entry, p, buf),
            Plan::Blocks(p, blocks, limit, segno) => {
                self.copy_blocks(entry, p, (blocks, limit), segno, buf)
            }
        }
    }

    fn plan(&self, entry: &Entry) -> Plan<'_> {
        let Some(parent) = self.parent else {
            return Plan::Whole;
        };
        let Some(p) = parent.files.get(&entry.rel) else {
            return Plan::Whole;
        };
        match parse_relation_path(&entry.rel) {
            // CREATE DATABASE ... STRATEGY file_copy copies pages that keep the template's old
            // LSNs: a database directory new since the parent is copied whole.
            Some((db, _)) if !parent.dirs.contains(&db) => Plan::Whole,
            // The visibility and free space maps change without LSN bumps; init forks are small.
            Some((db, f)) if f.fork == Fork::Main && p.n_blocks.is_some() => {
                let Some(map) = self.map else {
                    return Plan::Pages(p);
                };
                let changes = RelFileLocator::of_db_dir(&db, f.relfilenode)
                    .map_or(Changes::Scan, |rel| map.changes(rel));
                match changes {
                    Changes::Blocks { blocks, limit } => Plan::Blocks(p, blocks, limit, f.segno),
                    Changes::Scan => {
                        Counts::add(&self.counts.fallen_back, 1);
                        Plan::Pages(p)
                    }
                }
            }
            _ if p.sha256.is_some() => Plan::IfChanged(p),
            _ => Plan::Whole,
        }
    }

    /// Store the whole file.
    fn copy_whole(&self, entry: &Entry, buf: &mut [u8]) -> CopyResult {
        let Some(mut file) = open(entry)? else {
            return Ok(None);
        };
        let relation = parse_relation_path(&entry.rel).map(|(_, f)| f);
        let key = keys::backup_file(self.label, &entry.rel);
        let sink = self.bundler.sink(&key, entry.size)?;
        // The SHA-256 comes from scan, which hashes big files on a thread of their own.
        let mut writer = CompressWriter::new(sink, false);
        let mut failures = Vec::new();
        let (_, sha256) = self.scan(&mut file, entry, buf, true, &mut failures, |chunk, _| {
            writer
                .write_all(chunk)
                .with_context(|| format!("writing {key}"))
        })?;
        let mut rec = self.commit(entry, &key, writer, Some(sha256))?;
        rec.n_blocks = relation.map(|_| rec.size / self.block_size as u64);
        Ok(Some((rec, failures)))
    }

    /// Refer to the parent's copy when the file still has the same content, else store it whole.
    /// Most such files are small, so reading a changed one twice costs little.
    fn copy_if_changed(&self, entry: &Entry, p: &FileRecord, buf: &mut [u8]) -> CopyResult {
        let parent_size = file_size(p, self.block_size as u32);
        if entry.size == parent_size {
            let Some(mut file) = open(entry)? else {
                return Ok(None);
            };
            let mut failures = Vec::new();
            let (size, sha) =
                self.scan(&mut file, entry, buf, false, &mut failures, |_, _| Ok(()))?;
            if size == parent_size && p.sha256 == Some(sha) {
                self.progress.advance(size);
                return Ok(Some((reference(entry, p), failures)));
            }
        }
        self.copy_whole(entry, buf)
    }

    /// Store the pages of a relation main fork that may differ from the parent chain's copy,
    /// and the file's length; refer to the parent's record when there are none and the length
    /// is unchanged. The whole file is read anyway (its SHA-256 lets `restore --delta` compare).
    fn copy_pages(&self, entry: &Entry, p: &FileRecord, buf: &mut [u8]) -> CopyResult {
        let Some(mut file) = open(entry)? else {
            return Ok(None);
        };
        let bs = self.block_size;
        let parent_size = file_size(p, bs as u32);
        // Pages the parent chain has whole; every later one is new whatever its LSN says.
        let parent_blocks = parent_size / bs as u64;
        let parent = self
            .parent
            .ok_or_else(|| anyhow!("{} has no parent backup to compare with", entry.rel))?;
        let since = parent.record.start_lsn;
        let key = Target {
            key: keys::backup_file(self.label, &entry.rel),
            raw: entry.size,
        };
        let mut delta: Option<DeltaObject> = None;
        let mut failures = Vec::new();
        let mut tail: Vec<u8> = Vec::new();
        let mut older = OlderPages::new(self.storage, parent, bs);
        let scanned = self.scan(
            &mut file,
            entry,
            buf,
            true,
            &mut failures,
            |chunk, offset| {
                let first = offset / bs as u64;
                let mut pages = chunk.chunks_exact(bs);
                for (i, page) in (&mut pages).enumerate() {
                    let block = first + i as u64;
                    if block >= parent_blocks {
                        self.delta_page(&mut delta, &key, block, page, None)?;
                    } else if page_changed(page, since) {
                        let base = older.page(p, block)?;
                        self.delta_page(&mut delta, &key, block, page, Some(base))?;
                    }
                }
                let rest = pages.remainder();
                if !rest.is_empty() {
                    // Only a file being extended right now ends in part of a page; WAL replay
                    // rewrites that page, so padding it with zeros is safe.
                    tail.resize(bs, 0);
                    tail[..rest.len()].copy_from_slice(rest);
                    let block = first + (chunk.len() / bs) as u64;
                    self.delta_page(&mut delta, &key, block, &tail, None)?;
                }
                Ok(())
            },
        );
        let (size, sha256) = scanned?;
        let n_blocks = size.div_ceil(bs as u64);
        let end = DeltaEnd {
            size,
            parent_size,
            n_blocks,
            sha256: Some(sha256),
        };
        self.finish_delta(entry, p, &key, delta, end, failures)
    }

    /// Store the blocks of a relation main fork the changed-block map lists, and every block
    /// past the parent's length; refer to the parent's record when there are none and the
    /// length is unchanged, without reading the file at all.
    ///
    /// A file read only in part has no SHA-256 (`restore --delta` rewrites it); a file not read
    /// keeps the parent's, which is the hash of the bytes its chain restores. A file shorter
    /// than the parent's copy with no truncation in the WAL is not what the map describes: it
    /// is read whole, page by page.
    ///
    /// With a limit block (the fork was truncated to that length, or created, in the interval)
    /// nothing of the parent's copy from the limit on counts: those blocks are stored whole, as
    /// `GetFileBackupMethod` (src/backend/backup/basebackup_incremental.c) sends them, and a
    /// file shorter than the parent's but not shorter than the limit is what the map describes.
    fn copy_blocks(
        &self,
        entry: &Entry,
        p: &FileRecord,
        (blocks, limit): (&[u32], Option<u32>),
        segno: u32,
        buf: &mut [u8],
    ) -> CopyResult {
        let bs = self.block_size;
        let parent_size = file_size(p, bs as u32);
        let plan = SegmentPlan::new(
            (blocks, limit),
            segno,
            u64::from(self.blocks_per_segment),
            parent_size,
            bs as u64,
        );
        if plan.unchanged(entry.size) {
            Counts::add(&self.counts.not_read, 1);
            self.progress.advance(entry.size);
            return Ok(Some((reference(entry, p), Vec::new())));
        }
        let Some(file) = open(entry)? else {
            return Ok(None);
        };
        let size = file
            .metadata()
            .with_context(|| format!("reading {}", entry.abs.display()))?
            .len();
        if !plan.describes(size) {
            Counts::add(&self.counts.fallen_back, 1);
            return self.copy_pages(entry, p, buf);
        }
        Counts::add(&self.counts.by_block, 1);
        let parent = self
            .parent
            .ok_or_else(|| anyhow!("{} has no parent backup to compare with", entry.rel))?;
        let n_blocks = size.div_ceil(bs as u64);
        let mut failures = Vec::new();
        let mut older = OlderPages::new(self.storage, parent, bs);
        let max_run = (buf.len() / bs) as u64;
        if max_run == 0 {
            bail!("block size {bs} is too large for the copy buffer");
        }
        let wanted: Vec<u64> = plan.reads(n_blocks).collect();
        let key = Target {
            key: keys::backup_file(self.label, &entry.rel),
            raw: wanted.len() as u64 * bs as u64,
        };
        let mut delta: Option<DeltaObject> = None;
        let runs = block_runs(&wanted, max_run);
        let mut ahead = ReadAhead::new(&file, &runs, bs);
        for (i, &(start, len)) in runs.iter().enumerate() {
            ahead.advise(i);
            let run = &mut buf[..len as usize * bs];
            let got = self.read_blocks(&file, entry, start, run, &mut failures)?;
            for (k, page) in run[..got * bs].chunks_exact(bs).enumerate() {
                let block = start + k as u64;
                let base = match block < plan.kept {
                    true => Some(older.page(p, block)?),
                    false => None,
                };
                self.delta_page(&mut delta, &key, block, page, base)?;
            }
            if (got as u64) < len {
                break; // the file shrank under us: WAL replay truncates it again
            }
        }
        self.progress.advance(size);
        let end = DeltaEnd {
            size,
            parent_size,
            n_blocks,
            sha256: None,
        };
        self.finish_delta(entry, p, &key, delta, end, failures)
    }

    /// Close a relation file's page delta: a reference to the parent when no page was stored
    /// and the length is unchanged, else the committed delta object and its record.
    fn finish_delta(
        &self,
        entry: &Entry,
        p: &FileRecord,
        key: &Target,
        delta: Option<DeltaObject>,
        end: DeltaEnd,
        failures: Vec<PageFailure>,
    ) -> CopyResult {
        let DeltaEnd {
            size,
            parent_size,
            n_blocks,
            sha256,
        } = end;
        let delta = match delta {
            Some(d) => d,
            None if size == parent_size => return Ok(Some((reference(entry, p), failures))),
            None => self.new_delta(key)?,
        };
        let n_blocks_u32 = u32::try_from(n_blocks).map_err(|_| {
            anyhow!(
                "{} has {n_blocks} blocks, too many for one relation segment file",
                entry.rel
            )
        })?;
        let writer = delta
            .finish(n_blocks_u32)
            .with_context(|| format!("writing {key}"))?;
        let mut rec = self.commit(entry, &key.key, writer, sha256)?;
        rec.n_blocks = Some(n_blocks);
        rec.page_delta = true;
        Ok(Some((rec, failures)))
    }

    /// Read the consecutive blocks from `first` that fill `run` with one positioned read (a
    /// short count continues it), zero-pad a page the file ends inside (as a file being
    /// extended can) and verify their checksums. Returns the number of pages read: fewer than
    /// asked for when the file ends before the run does.
    fn read_blocks(
        &self,
        file: &File,
        entry: &Entry,
        first: u64,
        run: &mut [u8],
        failures: &mut Vec<PageFailure>,
    ) -> Result<usize> {
        let bs = self.block_size;
        let offset = first * bs as u64;
        let mut n = 0;
        while n < run.len() {
            match file.read_at(&mut run[n..], offset + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("reading {}", entry.abs.display()))
                }
            }
        }
        Counts::add(&self.counts.bytes_read, n as u64);
        let pages = n.div_ceil(bs);
        run[n..pages * bs].fill(0);
        if let Some(first_block) = self.page_check(entry) {
            self.check_pages(
                file,
                &entry.rel,
                &mut run[..pages * bs],
                offset,
                first_block,
                failures,
            );
        }
        Ok(pages)
    }

    /// Complete a stored object and describe it: `size` and `crc32c` are those of the raw
    /// stream written (the file, or its page delta), `sha256` the file's.
    fn commit(
        &self,
        entry: &Entry,
        key: &str,
        writer: CompressWriter<Sink>,
        sha256: Option<[u8; 32]>,
    ) -> Result<FileRecord> {
        let (digest, stored_size, sink) =
            writer.finish().with_context(|| format!("writing {key}"))?;
        let bundle = self.bundler.close(sink)?;
        let mut rec = record_of(entry, Some(self.label));
        rec.bundle = bundle;
        rec.size = digest.size;
        rec.crc32c = Some(digest.crc32c);
        rec.sha256 = sha256;
        rec.stored_size = stored_size;
        Ok(rec)
    }

    /// A page delta's writer, in a bundle or an object of its own.
    fn new_delta(&self, to: &Target) -> Result<DeltaObject> {
        let sink = self.bundler.sink(&to.key, to.raw)?;
        DeltaWriter::new(CompressWriter::new(sink, false), self.block_size)
            .with_context(|| format!("writing {to}"))
    }

    /// Add one page to the delta, creating its object on the first page; `base` is the parent
    /// chain's copy of the block, if it has one.
    fn delta_page(
        &self,
        delta: &mut Option<DeltaObject>,
        key: &Target,
        block: u64,
        page: &[u8],
        base: Option<&[u8]>,
    ) -> Result<()> {
        let d = match delta {
            Some(d) => d,
            None => delta.insert(self.new_delta(key)?),
        };
        let block = u32::try_from(block)
            .map_err(|_| anyhow!("block {block} of {key} is beyond any relation segment"))?;
        d.page(block, page, base)
            .with_context(|| format!("writing {key}"))
    }

    /// Read `file` to its end in `buf`-sized chunks (see [`Copier::read_chunk`]), handing each
    /// chunk and its offset to `f`. Returns the bytes read and their SHA-256.
    ///
    /// SHA-256 costs more than all else done per byte here, so for a file longer than `buf` it
    /// runs on a helper thread, a chunk behind the reader: a big relation file then takes about
    /// the time of its hash alone, while the other workers go on with the rest of the cluster.
    fn scan(
        &self,
        file: &mut File,
        entry: &Entry,
        buf: &mut [u8],
        count: bool,
        failures: &mut Vec<PageFailure>,
        mut f: impl FnMut(&[u8], u64) -> Result<()>,
    ) -> Result<(u64, [u8; 32])> {
        let pages = self.page_check(entry);
        let mut read = |b: &mut [u8], offset: u64| {
            self.read_chunk(file, entry, pages, b, offset, count, failures)
        };
        let mut sha = Sha256::new();
        let n = read(buf, 0)?;
        f(&buf[..n], 0)?;
        sha.update(&buf[..n]);
        let len = buf.len();
        if n < len {
            return Ok((n as u64, sha.finalize().into()));
        }
        let mut offset = n as u64;
        let hasher_gone = || anyhow!("hashing {}: the SHA-256 thread stopped", entry.rel);
        std::thread::scope(|s| {
            // Chunks travel to the hasher and back by value. Three buffers keep both threads
            // busy: one being read and scanned, one being hashed, one in a channel.
            let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(1);
            let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
            let hasher = s.spawn(move || {
                for (b, n) in full_rx {
                    sha.update(&b[..n]);
                    // Lost only if the reader failed; nothing to do about it then.
                    let _ = free_tx.send(b);
                }
                <[u8; 32]>::from(sha.finalize())
            });
            let mut spare: Vec<Vec<u8>> = (0..2).map(|_| vec![0u8; len]).collect();
            let pumped = loop {
                let Some(mut b) = spare.pop().or_else(|| free_rx.recv().ok()) else {
                    break Err(hasher_gone());
                };
                let n = match read(&mut b, offset) {
                    Ok(n) => n,
                    Err(e) => break Err(e),
                };
                if n == 0 {
                    break Ok(());
                }
                if let Err(e) = f(&b[..n], offset) {
                    break Err(e);
                }
                offset += n as u64;
                if full_tx.send((b, n)).is_err() {
                    break Err(hasher_gone());
                }
                if n < len {
                    break Ok(());
                }
            };
            drop(full_tx);
            let digest = hasher.join().map_err(|_| hasher_gone());
            pumped.and(digest).map(|d| (offset, d))
        })
    }

    /// How to verify the pages of a file: None unless it is a relation file of a cluster with
    /// data checksums, else the relation block number of its first page.
    fn page_check(&self, entry: &Entry) -> Option<u32> {
        let relation = parse_relation_path(&entry.rel).map(|(_, f)| f)?;
        self.verify_checksums
            .then(|| relation.segno * self.blocks_per_segment)
    }

    /// Fill `buf` from `file` (a short count means end of file), verify its pages when
    /// `first_block` says so, and advance the progress if `count`.
    #[allow(clippy::too_many_arguments)]
    fn read_chunk(
        &self,
        file: &mut File,
        entry: &Entry,
        first_block: Option<u32>,
        buf: &mut [u8],
        offset: u64,
        count: bool,
        failures: &mut Vec<PageFailure>,
    ) -> Result<usize> {
        let n = read_full(file, buf).with_context(|| format!("reading {}", entry.abs.display()))?;
        Counts::add(&self.counts.bytes_read, n as u64);
        if let Some(first_block) = first_block {
            self.check_pages(
                file,
                &entry.rel,
                &mut buf[..n],
                offset,
                first_block,
                failures,
            );
        }
        if count {
            self.progress.advance(n as u64);
        }
        Ok(n)
    }

    /// Verify the checksum of every whole page in `chunk`. A failing page is read again once: a
    /// read racing a write can see a torn page, which WAL replay repairs. Pages changed since the
    /// backup started are replayed too, so only older pages can show real damage.
    fn check_pages(
        &self,
        file: &File,
        rel: &str,
        chunk: &mut [u8],
        offset: u64,
        first_block: u32,
        failures: &mut Vec<PageFailure>,
    ) {
        let bs = self.block_size;
        for (i, page) in chunk.chunks_exact_mut(bs).enumerate() {
            let page_offset = offset + (i * bs) as u64;
            let blkno = first_block + (page_offset / bs as u64) as u32;
            if !matches!(
                verify_page(page, blkno),
                PageVerdict::ChecksumMismatch { .. } | PageVerdict::BadHeader
            ) {
                continue;
            }
            if file.read_exact_at(page, page_offset).is_err() {
                continue; // the file shrank under us: nothing left to verify
            }
            let verdict = verify_page(page, blkno);
            let recent = PageHeader::parse(page).is_ok_and(|h| h.lsn >= self.start_lsn);
            if matches!(
                verdict,
                PageVerdict::ChecksumMismatch { .. } | PageVerdict::BadHeader
            ) && !recent
            {
                failures.push(PageFailure {
                    path: rel.to_string(),
                    block: blkno,
                });
            }
        }
    }
}

/// Which blocks of one relation segment file a copy by the changed-block map reads.
#[derive(Debug, PartialEq, Eq)]
struct SegmentPlan {
    /// The map's blocks inside this segment file, relative to its start.
    listed: Vec<u64>,
    /// Blocks below this one that the map does not list are the parent chain's; from it on
    /// every block is read and stored whole (past the parent's length, or past a limit block).
    kept: u64,
    parent_size: u64,
    /// The map's limit block relative to this segment file (see [`Changes::Blocks`]).
    limit: Option<u64>,
    block_size: u64,
}

impl SegmentPlan {
    fn new(
        (blocks, limit): (&[u32], Option<u32>),
        segno: u32,
        per_file: u64,
        parent_size: u64,
        block_size: u64,
    ) -> SegmentPlan {
        let first = u64::from(segno) * per_file;
        let listed = blocks
            .iter()
            .map(|&b| u64::from(b))
            .filter(|b| (first..first + per_file).contains(b))
            .map(|b| b - first)
            .collect();
        let limit = limit.map(|l| u64::from(l).saturating_sub(first));
        SegmentPlan {
            listed,
            kept: (parent_size / block_size).min(limit.unwrap_or(u64::MAX)),
            parent_size,
            limit,
            block_size,
        }
    }

    /// Nothing to read: no listed block, no truncation, the parent's length.
    fn unchanged(&self, size: u64) -> bool {
        let truncated = self
            .limit
            .is_some_and(|l| l < self.parent_size.div_ceil(self.block_size));
        self.listed.is_empty() && size == self.parent_size && !truncated
    }

    /// Whether a file of `size` bytes is what the map describes: not shorter than the parent's
    /// copy unless a limit block says it was truncated, and not below that limit.
    fn describes(&self, size: u64) -> bool {
        size >= self.parent_size || self.limit.is_some_and(|l| size >= l * self.block_size)
    }

    /// The blocks to read from a file of `n_blocks` blocks: the listed ones the parent chain
    /// holds, then every block from `kept` on.
    fn reads(&self, n_blocks: u64) -> impl Iterator<Item = u64> + '_ {
        let changed = self
            .listed
            .iter()
            .copied()
            .filter(move |&b| b < self.kept.min(n_blocks));
        changed.chain(self.kept..n_blocks)
    }
}

/// How far ahead of the reader [`ReadAhead`] asks for blocks.
const READ_AHEAD_BYTES: u64 = 16 << 20;

/// Tells the kernel which runs of a file will be read next (`POSIX_FADV_WILLNEED`), up to
/// [`READ_AHEAD_BYTES`] ahead of the reader: the scattered changed blocks of a file that is not
/// in the page cache then come from the disk many at a time rather than one read after the
/// other, while the reader codes the pages it has.
struct ReadAhead<'r> {
    fd: std::os::fd::RawFd,
    runs: &'r [(u64, u64)],
    block_size: u64,
    /// Runs advised so far, and their bytes.
    advised: usize,
    advised_bytes: u64,
    /// Bytes of the runs before the one being read.
    read_bytes: u64,
}

impl<'r> ReadAhead<'r> {
    fn new(file: &File, runs: &'r [(u64, u64)], block_size: usize) -> Self {
        use std::os::fd::AsRawFd;
        ReadAhead {
            fd: file.as_raw_fd(),
            runs,
            block_size: block_size as u64,
            advised: 0,
            advised_bytes: 0,
            read_bytes: 0,
        }
    }

    /// Called before run `i` is read: advise the runs from the last advised up to the window.
    fn advise(&mut self, i: usize) {
        if i > 0 {
            self.read_bytes += self.runs[i - 1].1 * self.block_size;
        }
        while self.advised < self.runs.len()
            && self.advised_bytes < self.read_bytes + READ_AHEAD_BYTES
        {
            let (start, len) = self.runs[self.advised];
            let (offset, bytes) = (start * self.block_size, len * self.block_size);
            // SAFETY: a plain syscall on a descriptor the caller keeps open; advice that fails
            // only leaves the reads as they were.
            unsafe {
                libc::posix_fadvise(
                    self.fd,
                    offset as libc::off_t,
                    bytes as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
            self.advised += 1;
            self.advised_bytes += bytes;
        }
    }
}

/// Runs of consecutive blocks in `blocks` (increasing; a repeat is skipped) as (first block,
/// length), none longer than `max`: one read each.
fn block_runs(blocks: &[u64], max: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match runs.last_mut() {
            Some((start, len)) if b < *start + *len => {}
            Some((start, len)) if b == *start + *len && *len < max => *len += 1,
            _ => runs.push((b, 1)),
        }
    }
    runs
}

/// Whether a page may differ from the parent chain's copy: its LSN is at or after the parent's
/// start (which takes in every LSN beyond the current WAL position too), it is invalid (0), or
/// the page is new, zero or has an insane header. Only pages untouched since before the parent
/// started keep an older LSN, and the parent read them as they are now.
fn page_changed(page: &[u8], since: Lsn) -> bool {
    match PageHeader::parse(page) {
        Ok(h) => h.lsn >= since || h.lsn == Lsn::INVALID || h.is_new() || !h.is_sane(page.len()),
        Err(_) => true,
    }
}

/// Open a file to copy; None when it vanished.
fn open(entry: &Entry) -> Result<Option<File>> {
    match File::open(&entry.abs) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("opening {}", entry.abs.display())),
    }
}

/// A record for a file whose content is the parent's: same object, this backup stores nothing.
fn reference(e: &Entry, p: &FileRecord) -> FileRecord {
    FileRecord {
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime: e.mtime,
        stored_size: 0,
        ..p.clone()
    }
}

fn record_of(e: &Entry, stored_in: Option<&str>) -> FileRecord {
    FileRecord {
        path: e.rel.clone(),
        kind: e.kind,
        size: e.size,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime: e.mtime,
        link_target: e.link_target.clone(),
        crc32c: None,
        sha256: None,
        stored_size: 0,
        stored_in: stored_in.map(str::to_string),
        n_blocks: None,
        page_delta: false,
        bundle: None,
    }
}

/// Fill `buf` as far as the file allows; a short count means end of file.
pub(crate) fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An initialized, empty 8 kB page with LSN `lsn`.
    fn page(lsn: u64) -> Vec<u8> {
        let mut page = vec![0u8; 8192];
        page[0..4].copy_from_slice(&((lsn >> 32) as u32).to_ne_bytes());
        page[4..8].copy_from_slice(&(lsn as u32).to_ne_bytes());
        page[12..14].copy_from_slice(&24u16.to_ne_bytes());
        page[14..16].copy_from_slice(&8192u16.to_ne_bytes());
        page[16..18].copy_from_slice(&8192u16.to_ne_bytes());
        page[18..20].copy_from_slice(&(8192u16 | 4).to_ne_bytes());
        page
    }

    #[test]
    fn a_limit_block_reads_every_block_from_the_limit_on() {
        const BS: u64 = 8192;
        // Segment file 1 of a relation with 100 blocks per file; the parent had 50 blocks there.
        let plan = |blocks: &[u32], limit| SegmentPlan::new((blocks, limit), 1, 100, 50 * BS, BS);
        let reads = |p: &SegmentPlan, n| p.reads(n).collect::<Vec<u64>>();
        // Blocks of other segment files are not this one's; no limit: the parent's length holds.
        let p = plan(&[3, 105, 120, 260], None);
        assert_eq!(p.listed, vec![5, 20]);
        assert_eq!(reads(&p, 52), vec![5, 20, 50, 51]);
        assert!(!p.unchanged(50 * BS));
        assert!(p.describes(50 * BS) && !p.describes(49 * BS));
        assert!(plan(&[3], None).unchanged(50 * BS));
        // Truncated to absolute block 130 (30 here) and grown back to 45 blocks: 30..45 are
        // read whole even though no block there is listed, and the shorter file fits the map.
        let p = plan(&[105], Some(130));
        assert_eq!(p.kept, 30);
        assert_eq!(reads(&p, 45), [vec![5], (30..45).collect()].concat());
        assert!(!p.unchanged(50 * BS));
        assert!(p.describes(45 * BS) && p.describes(30 * BS) && !p.describes(29 * BS));
        // A limit in an earlier segment file: all of this one is new; one past the parent's
        // length changes nothing.
        assert_eq!(reads(&plan(&[], Some(0)), 3), vec![0, 1, 2]);
        assert!(plan(&[], Some(160)).unchanged(50 * BS));
    }

    #[test]
    fn consecutive_blocks_are_read_as_one_run() {
        assert_eq!(
            block_runs(&[1, 2, 3, 7, 8, 8, 10, 11, 12, 13, 14], 3),
            vec![(1, 3), (7, 2), (10, 3), (13, 2)]
        );
        assert_eq!(block_runs(&[], 4), vec![]);
    }

    #[test]
    fn pages_older_than_the_parent_are_the_only_ones_left_out() {
        let since = Lsn(0x1_0000_0000);
        assert!(!page_changed(&page(0x0_FFFF_FFFF), since));
        assert!(!page_changed(&page(1), since));
        assert!(page_changed(&page(since.0), since));
        assert!(page_changed(&page(u64::MAX), since));
        // Invalid LSN, new (zero) page, insane header, too short to hold a header.
        assert!(page_changed(&page(0), since));
        assert!(page_changed(&[0u8; 8192], since));
        let mut insane = page(1);
        insane[10] = 0x80;
        assert!(page_changed(&insane, since));
        assert!(page_changed(&[1u8; 10], since));
    }

    #[test]
    fn page_delta_records_describe_the_file_by_blocks() {
        let mut rec = record_of(
            &Entry {
                rel: "base/5/16384".into(),
                abs: "/nonexistent".into(),
                kind: FileKind::File,
                size: 3 * 8192,
                mode: 0o600,
                uid: 0,
                gid: 0,
                mtime: 0,
                link_target: None,
            },
            Some("L"),
        );
        rec.crc32c = Some(9);
        assert_eq!(file_size(&rec, 8192), 3 * 8192);
        assert_eq!(stored_expectation(&rec), Some((3 * 8192, 9)));
        rec.page_delta = true;
        rec.n_blocks = Some(5);
        rec.size = 16 + 8 + 8192 + 12;
        assert_eq!(file_size(&rec, 8192), 5 * 8192);
        assert_eq!(stored_expectation(&rec), Some((rec.size, 9)));
    }
}
