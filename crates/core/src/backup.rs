//! `pgkeep backup`: copy a running cluster between non-exclusive `pg_backup_start` and
//! `pg_backup_stop` on one held connection, then wait until the archive holds every WAL segment
//! the backup needs. Only then is the backup DONE.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
pub use pgkeep_catalog::BackupType;
use pgkeep_catalog::{meta, BackupRecord, BackupStatus, Catalog, FileKind, FileRecord};
use pgkeep_pg::{
    parse_relation_path, segment_name, verify_page, BackupLabel, Lsn, PageHeader, PageVerdict,
    TimelineId, WalSegSize,
};
use pgkeep_repo::{keys, put_bytes, CompressWriter, Storage};

use crate::archive::wait_for_wal;
use crate::check::archive_command_ok;
use crate::config::Config;
use crate::init::check_same_cluster;
use crate::lock::BackupLock;
use crate::parallel;
use crate::pg::{self, PgConn, ServerIdentity};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::user;
use crate::walk::{walk, Entry};

/// What to take.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub backup_type: BackupType,
    /// Copy workers; None = the configured default.
    pub jobs: Option<usize>,
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
    if opts.backup_type != BackupType::Full {
        bail!(
            "--type {} is not available in this version of pgkeep: take --type full",
            opts.backup_type.as_str()
        );
    }
    let lock_holder = format!("pid {} on {}", user::pid(), user::hostname());
    let _lock = BackupLock::acquire(&repo.root, &lock_holder)?;
    // Holding the lock, no other backup can be running: any RUNNING row is a dead one.
    mark_interrupted(&repo.catalog, true)?;

    let mut conn = pg::connect(&cfg.pg)?;
    let server = preflight(&mut conn, cfg, &repo)?;
    let label = new_label(&repo.catalog, opts.backup_type)?;
    let mut record = BackupRecord {
        label: label.clone(),
        backup_type: opts.backup_type,
        status: BackupStatus::Running,
        parent: None,
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
    };
    repo.catalog.insert_backup(&record)?;
    let jobs = opts
        .jobs
        .unwrap_or_else(|| cfg.backup.effective_jobs())
        .max(1);
    match run(cfg, &repo, &mut conn, &server, &mut record, jobs, progress) {
        Ok(page_failures) => Ok(BackupSummary {
            record,
            elapsed: started.elapsed(),
            page_failures,
        }),
        Err(e) => {
            let message = format!("{e:#}");
            if let Ok(r) = repo
                .catalog
                .set_status(&label, BackupStatus::Error, Some(&message))
            {
                let _ = put_bytes(
                    repo.storage(),
                    &keys::backup_meta(&label, BACKUP_INI),
                    meta::backup_ini(&r).as_bytes(),
                );
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

fn preflight(conn: &mut PgConn, cfg: &Config, repo: &Repo) -> Result<ServerIdentity> {
    let server = conn.identity()?;
    if !pg::same_dir(&server.data_directory, &cfg.pg.data) {
        bail!(
            "the server runs data directory {} but [pg] data in {} is {}: fix the config",
            server.data_directory.display(),
            cfg.config_path.display(),
            cfg.pg.data.display()
        );
    }
    check_same_cluster(
        &repo.identity,
        &crate::check::repo_identity(&server),
        &repo.root,
    )?;
    if conn.query_text("SELECT pg_is_in_recovery()::text")? == "true" {
        bail!(
            "the server at {}:{} is a standby: back up the primary",
            cfg.pg.host,
            cfg.pg.port
        );
    }
    let mode = conn.setting("archive_mode")?;
    let command = conn.setting("archive_command")?;
    if mode == "off" || !archive_command_ok(&command, cfg) {
        bail!(
            "the server does not archive WAL to this repository (archive_mode = {mode}, archive_command = {command:?}): set archive_command = 'pgkeep --config {} archive-push %p'; `pgkeep check` tests it",
            cfg.config_path.display()
        );
    }
    Ok(server)
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

fn run(
    cfg: &Config,
    repo: &Repo,
    conn: &mut PgConn,
    server: &ServerIdentity,
    record: &mut BackupRecord,
    jobs: usize,
    progress: &dyn Progress,
) -> Result<Vec<PageFailure>> {
    let seg = repo.wal_seg_size()?;
    // A backup may run for hours: no server-side timeout may end its session.
    conn.execute("SET statement_timeout = 0")?;
    if conn.major() >= 14 {
        conn.execute("SET idle_session_timeout = 0")?;
    }
    let start_lsn = start_backup(conn, &record.label, cfg.backup.fast_checkpoint)?;
    let timeline: u32 = conn
        .query_text("SELECT timeline_id::text FROM pg_control_checkpoint()")?
        .parse()
        .context("reading the checkpoint timeline")?;
    record.start_lsn = start_lsn;
    record.timeline = timeline;
    record.start_wal = segment_name(TimelineId(timeline), start_lsn.segment_number(seg), seg);
    repo.catalog.update_backup(record)?;

    let entries = walk(&cfg.pg.data)?;
    let copier = Copier {
        storage: repo.storage(),
        label: &record.label,
        block_size: server.block_size as usize,
        blocks_per_segment: server.blocks_per_segment,
        verify_checksums: server.data_checksums,
        start_lsn,
        progress,
    };
    let copied = copier.copy_all(&entries, jobs)?;

    let stop = stop_backup(conn)?;
    let recovery_time: DateTime<Utc> = conn
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
    wait_for_wal(&repo.catalog, &needed, cfg.backup.archive_timeout, |name| {
        let why = if status_dir.join(format!("{name}.ready")).exists() {
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
        .map(|f| f.size)
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
        .with_context(|| format!("syncing repository {}", repo.root.display()))?;
    let mut done = record.clone();
    done.status = BackupStatus::Done;
    put_bytes(
        storage,
        &keys::backup_meta(&record.label, BACKUP_INI),
        meta::backup_ini(&done).as_bytes(),
    )?;
    *record = repo
        .catalog
        .set_status(&record.label, BackupStatus::Done, None)?;
    Ok(copied.page_failures)
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
    // with a timeout and an error naming the missing segment. The server switches WAL either way.
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
    progress: &'a dyn Progress,
}

struct Copied {
    files: Vec<FileRecord>,
    page_failures: Vec<PageFailure>,
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
        self.progress.finish();
        files.append(&mut copied);
        files.sort_by(|a, b| a.path.cmp(&b.path));
        page_failures.sort_by(|a, b| (&a.path, a.block).cmp(&(&b.path, b.block)));
        Ok(Copied {
            files,
            page_failures,
        })
    }

    /// Copy one file; None when it vanished (WAL replay recreates it if it matters).
    fn copy_file(
        &self,
        entry: &Entry,
        buf: &mut [u8],
    ) -> Result<Option<(FileRecord, Vec<PageFailure>)>> {
        let mut file = match File::open(&entry.abs) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening {}", entry.abs.display())),
        };
        let relation = parse_relation_path(&entry.rel).map(|(_, f)| f);
        let check_pages = self.verify_checksums && relation.is_some();
        let first_block = relation.map_or(0, |f| f.segno * self.blocks_per_segment);
        let key = keys::backup_file(self.label, &entry.rel);
        let object = self.storage.create(&key)?;
        let mut writer = CompressWriter::new(object, true);
        let mut offset: u64 = 0;
        let mut failures = Vec::new();
        loop {
            let n = read_full(&mut file, buf)
                .with_context(|| format!("reading {}", entry.abs.display()))?;
            if n == 0 {
                break;
            }
            if check_pages {
                self.check_pages(
                    &file,
                    &entry.rel,
                    &mut buf[..n],
                    offset,
                    first_block,
                    &mut failures,
                );
            }
            writer
                .write_all(&buf[..n])
                .with_context(|| format!("writing {key}"))?;
            offset += n as u64;
            self.progress.advance(n as u64);
            if n < buf.len() {
                break;
            }
        }
        let (digest, stored_size, object) =
            writer.finish().with_context(|| format!("writing {key}"))?;
        object.commit_unsynced()?;
        let mut rec = record_of(entry, Some(self.label));
        rec.size = digest.size;
        rec.crc32c = Some(digest.crc32c);
        rec.sha256 = digest.sha256;
        rec.stored_size = stored_size;
        rec.n_blocks = relation.map(|_| digest.size / self.block_size as u64);
        Ok(Some((rec, failures)))
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
    }
}

/// Fill `buf` as far as the file allows; a short count means end of file.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
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
