//! `pgkeep restore`: rebuild a data directory from a backup and write the recovery settings for
//! point-in-time recovery.
//!
//! Nothing is written before every check passes (backup usable, its WAL archived, target
//! directory empty and no postmaster running). `global/pg_control` is written last and everything
//! is synced at the end, so an interrupted restore leaves a directory PostgreSQL refuses to start.
//!
//! A diff or incr backup is restored with its chain of parents: each file is written once, from
//! the newest backup of the chain that holds it whole, then the pages of every later backup's
//! page delta in order, and cut to the length the restored backup recorded. Only the files the
//! restored backup lists are written.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
use pgkeep_catalog::{BackupRecord, FileKind, FileRecord};
use pgkeep_pg::{Lsn, TimelineId};
use pgkeep_repo::{
    fetch_decompressed, fetch_decompressed_at, get_bytes, keys, DecompressReader, StorageError,
};
use sha2::{Digest as _, Sha256};

use crate::backup::{file_size, needed_segments, BACKUP_LABEL, TABLESPACE_MAP};
use crate::chain::{delta_error, Chain, Layer};
use crate::config::Config;
use crate::delta::DeltaReader;
use crate::parallel;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::timeline::{plan_restore, Choice, Histories};
use crate::user;

/// Where recovery stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// Replay every archived WAL file.
    EndOfArchive,
    /// Stop as soon as the backup is consistent.
    Immediate,
    Time(DateTime<Utc>),
    Lsn(Lsn),
    Xid(u64),
    Name(String),
}

/// What the server does on reaching the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetAction {
    Pause,
    Promote,
    Shutdown,
}

impl TargetAction {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetAction::Pause => "pause",
            TargetAction::Promote => "promote",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

/// Which timeline recovery follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetTimeline {
    Latest,
    Current,
    Id(TimelineId),
}

impl std::fmt::Display for TargetTimeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetTimeline::Latest => f.write_str("latest"),
            TargetTimeline::Current => f.write_str("current"),
            TargetTimeline::Id(t) => write!(f, "{}", t.0),
        }
    }
}

/// Validated restore options.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub pgdata: PathBuf,
    pub backup: Option<String>,
    pub target: RecoveryTarget,
    pub action: TargetAction,
    pub timeline: Option<TargetTimeline>,
    /// Reuse files of an existing directory whose size and SHA-256 match; remove the rest.
    pub delta: bool,
    pub jobs: Option<usize>,
    /// Tablespace OID -> new location.
    pub tablespace_map: BTreeMap<u32, PathBuf>,
}

/// What a restore did.
#[derive(Debug)]
pub struct RestoreSummary {
    pub backup: BackupRecord,
    /// Which backup was chosen, the timeline recovery will follow and why (see [`Choice`]).
    pub choice: String,
    pub files_written: u64,
    pub files_kept: u64,
    pub bytes_written: u64,
    pub elapsed: Duration,
}

/// Marks of the settings block pgkeep appends to postgresql.auto.conf.
const BLOCK_BEGIN: &str = "# pgkeep recovery settings begin";
const BLOCK_END: &str = "# pgkeep recovery settings end";

pub fn restore(
    cfg: &Config,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    let repo = Repo::open(cfg)?;
    if repo.identity.pg_major < 12 {
        bail!("restore of PostgreSQL {} is not supported: pgkeep writes recovery.signal (PostgreSQL 12+)", repo.identity.pg_major);
    }
    let choice = choose_backup(&repo, opts)?;
    let backup = choice.backup.clone();
    let chain = Chain::load(&repo.catalog, &backup)?;
    check_wal(&repo, &backup)?;
    check_target_dir(&opts.pgdata, opts.delta)?;

    let files = &chain.newest;
    let storage = repo.storage();
    let label_file = get_bytes(storage, &keys::backup_meta(&backup.label, BACKUP_LABEL))
        .with_context(|| format!("reading backup_label of backup {}", backup.label))?;
    let tablespace_map = match get_bytes(storage, &keys::backup_meta(&backup.label, TABLESPACE_MAP))
    {
        Ok(b) => Some(String::from_utf8_lossy(&b).into_owned()),
        Err(StorageError::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let root_owner = files
        .iter()
        .find(|f| f.path == "global/pg_control")
        .map(|f| (f.uid, f.gid))
        .ok_or_else(|| {
            anyhow!(
                "backup {} has no global/pg_control: it is incomplete",
                backup.label
            )
        })?;

    let pgdata = &opts.pgdata;
    create_dir(pgdata, 0o700, Some(root_owner))?;
    let in_backup: HashSet<&str> = files.iter().map(|f| f.path.as_str()).collect();
    if opts.delta {
        remove_extraneous(pgdata, &in_backup)?;
    }
    // Directories (parents sort before children) and tablespace links first.
    let mut tablespace_lines = Vec::new();
    for f in files {
        let dest = pgdata.join(&f.path);
        match f.kind {
            FileKind::Dir => create_dir(&dest, f.mode, Some((f.uid, f.gid)))?,
            FileKind::Symlink => {
                let target = link_target(f, &opts.tablespace_map)?;
                if let Some(oid) = f.path.strip_prefix("pg_tblspc/") {
                    tablespace_lines.push(format!("{oid} {}", target.display()));
                    create_dir(&target, 0o700, Some((f.uid, f.gid)))?;
                }
                if fs::symlink_metadata(&dest).is_ok() {
                    fs::remove_file(&dest)
                        .with_context(|| format!("replacing link {}", dest.display()))?;
                }
                std::os::unix::fs::symlink(&target, &dest)
                    .with_context(|| format!("creating link {}", dest.display()))?;
                chown(&dest, f.uid, f.gid, true)?;
            }
            FileKind::File => {}
        }
    }
    let (control, mut todo): (Vec<&FileRecord>, Vec<&FileRecord>) = files
        .iter()
        .filter(|f| f.kind == FileKind::File)
        .partition(|f| f.path == "global/pg_control");
    let block_size = backup.block_size;
    todo.sort_by_key(|f| std::cmp::Reverse(file_size(f, block_size)));
    let total: u64 = todo.iter().map(|f| file_size(f, block_size)).sum();
    progress.start("restoring", Some(total));
    let jobs = opts
        .jobs
        .unwrap_or_else(|| cfg.backup.effective_jobs())
        .max(1);
    let writer = FileWriter {
        repo: &repo,
        chain: &chain,
        pgdata,
        delta: opts.delta,
        jobs,
        progress,
    };
    let results = parallel::for_each(&todo, jobs, |f, buf| writer.write(f, buf))?;
    progress.finish();

    // backup_label and tablespace_map at the root; recovery settings; pg_control last.
    write_small(pgdata, "backup_label", &label_file, root_owner)?;
    if tablespace_map.is_some() {
        let text = tablespace_lines
            .iter()
            .map(|l| format!("{l}\n"))
            .collect::<String>();
        write_small(pgdata, "tablespace_map", text.as_bytes(), root_owner)?;
    }
    write_recovery_settings(cfg, opts, root_owner)?;
    let mut buf = vec![0u8; parallel::BUF_SIZE];
    let control_written = writer.write(control[0], &mut buf)?;
    sync_filesystem(pgdata)?;
    for target in opts.tablespace_map.values() {
        sync_filesystem(target)?;
    }
    let written = results.iter().chain(std::iter::once(&control_written));
    let (mut files_written, mut files_kept, mut bytes_written) = (0, 0, 0);
    for w in written {
        match w {
            Written::Kept => files_kept += 1,
            Written::Bytes(n) => {
                files_written += 1;
                bytes_written += n;
            }
        }
    }
    Ok(RestoreSummary {
        backup,
        choice: choice.to_string(),
        files_written,
        files_kept,
        bytes_written,
        elapsed: started.elapsed(),
    })
}

/// The backup to restore (the named one, or the newest restorable one that can reach the
/// target) and the timeline recovery will follow: see [`plan_restore`].
pub fn choose_backup(repo: &Repo, opts: &RestoreOptions) -> Result<Choice> {
    plan_restore(
        &repo.catalog.backups()?,
        &Histories::load(repo)?,
        &opts.target,
        opts.timeline,
        opts.backup.as_deref(),
    )
}

/// Every segment from the backup's start to its stop must be in the archive.
fn check_wal(repo: &Repo, b: &BackupRecord) -> Result<()> {
    let seg = repo.wal_seg_size()?;
    let stop = b
        .stop_lsn
        .ok_or_else(|| anyhow!("backup {} has no stop LSN: it did not finish", b.label))?;
    for name in needed_segments(TimelineId(b.timeline), b.start_lsn, stop, seg) {
        if repo.catalog.wal(&name)?.is_none() {
            bail!(
                "WAL segment {name}, needed to make backup {} consistent, is missing from the archive: run `pgkeep validate` and restore another backup",
                b.label
            );
        }
    }
    Ok(())
}

fn check_target_dir(pgdata: &Path, delta: bool) -> Result<()> {
    let pid_file = pgdata.join("postmaster.pid");
    if let Ok(text) = fs::read_to_string(&pid_file) {
        let pid: u32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0);
        if pid != 0 && user::process_alive(pid) {
            bail!(
                "a postmaster (pid {pid}) is running in {}: stop it before restoring",
                pgdata.display()
            );
        }
    }
    match fs::read_dir(pgdata) {
        Ok(mut d) => {
            if d.next().is_some() && !delta {
                bail!(
                    "directory {} is not empty: restore into an empty or new directory, or pass --delta to reuse its files",
                    pgdata.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", pgdata.display())),
    }
}

fn link_target(f: &FileRecord, remap: &BTreeMap<u32, PathBuf>) -> Result<PathBuf> {
    let oid: Option<u32> = f
        .path
        .strip_prefix("pg_tblspc/")
        .and_then(|o| o.parse().ok());
    if let Some(new) = oid.and_then(|o| remap.get(&o)) {
        return Ok(new.clone());
    }
    f.link_target
        .as_ref()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("link {} has no target recorded", f.path))
}

enum Written {
    Kept,
    Bytes(u64),
}

struct FileWriter<'a> {
    repo: &'a Repo,
    chain: &'a Chain,
    pgdata: &'a Path,
    delta: bool,
    /// Threads a big file's whole copy is decoded on, besides the pool's.
    jobs: usize,
    progress: &'a dyn Progress,
}

/// Whole copies at least this big are decoded on `jobs` threads of their own. One big table
/// would otherwise keep one pool thread busy long after the others ran out of files; below
/// this, starting threads is not worth it.
const PARALLEL_BASE: u64 = 8 << 20;

impl FileWriter<'_> {
    fn write(&self, f: &FileRecord, buf: &mut [u8]) -> Result<Written> {
        let dest = self.pgdata.join(&f.path);
        let len = file_size(f, self.chain.block_size);
        if self.delta && same_content(&dest, f, len, buf)? {
            set_attributes(&dest, f)?;
            self.progress.advance(len);
            return Ok(Written::Kept);
        }
        let label = self.chain.label();
        let context = || format!("restoring {} from backup {label}", f.path);
        let source = self.chain.source(f).with_context(context)?;
        // Readable too: a based page of a delta is decoded against the block already written.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&dest)
            .with_context(|| format!("creating {}", dest.display()))?;
        let short = self
            .write_base(&source.base, &mut file, len)
            .with_context(context)?;
        if !source.deltas.is_empty() {
            let bs = self.chain.block_size as usize;
            let (page, base) = buf
                .get_mut(..2 * bs)
                .ok_or_else(|| anyhow!("block size {bs} is too large for the copy buffer"))?
                .split_at_mut(bs);
            for layer in &source.deltas {
                apply_delta(self.repo, &file, layer, len, page, base).with_context(context)?;
            }
            file.set_len(len)
                .with_context(|| format!("setting the length of {}", dest.display()))?;
            self.progress.advance(short);
        }
        // The disk writes this file while later ones are decoded, instead of every file at the
        // final syncfs (restore of the bench cluster: 1.5 s -> 1.1 s; an fsync per file, as
        // pgBackRest does, came to 1.3 s).
        pgkeep_repo::start_writeback(&file);
        drop(file);
        set_attributes(&dest, f)?;
        Ok(Written::Bytes(len))
    }

    /// Writes the head of `file` from its whole copy, at most `len` bytes, and returns how many
    /// of the `len` bytes it left for the page deltas (the file grew later in the chain).
    fn write_base(&self, base: &Layer, file: &mut File, len: u64) -> Result<u64, StorageError> {
        let storage = self.repo.storage();
        let expect = (base.size, base.crc);
        if self.jobs > 1 && base.size >= PARALLEL_BASE {
            let on_bytes = |n| self.progress.advance(n);
            let digest =
                fetch_decompressed_at(storage, &base.key, file, len, expect, self.jobs, &on_bytes)?;
            return Ok(len.saturating_sub(digest.size));
        }
        let mut out = CappedWriter {
            inner: file,
            left: len,
            progress: self.progress,
        };
        fetch_decompressed(storage, &base.key, &mut out, Some(expect), false)?;
        Ok(out.left)
    }
}

/// Lay the pages of one page delta over `file`, skipping pages at or past `len` (the file
/// shrank later in the chain), and check the delta's length and CRC-32C. A based page is
/// decoded against the block as the older layers left it in `file`. `page` and `base` are
/// one block long.
fn apply_delta(
    repo: &Repo,
    file: &File,
    layer: &Layer,
    len: u64,
    page: &mut [u8],
    base: &mut [u8],
) -> Result<()> {
    let key = &layer.key;
    let reader = DecompressReader::new(repo.storage().open(key)?, false);
    let mut delta = DeltaReader::new(reader, page.len()).map_err(|e| delta_error(key, e))?;
    let bs = page.len() as u64;
    while let Some(block) = delta.next_block().map_err(|e| delta_error(key, e))? {
        let at = u64::from(block) * bs;
        if at >= len {
            continue;
        }
        if delta.is_based() {
            file.read_exact_at(base, at).with_context(|| {
                format!("reading block {block} back to apply {key}: the older copy is missing")
            })?;
        }
        delta.page(base, page).map_err(|e| delta_error(key, e))?;
        file.write_all_at(page, at)
            .with_context(|| format!("writing block {block} from {key}"))?;
    }
    let digest = delta.into_inner().digest();
    if (digest.size, digest.crc32c) != (layer.size, layer.crc) {
        return Err(StorageError::Corrupt {
            key: key.clone(),
            detail: format!(
                "expected {} bytes with crc32c {:08x}, found {} bytes with crc32c {:08x}",
                layer.size, layer.crc, digest.size, digest.crc32c
            ),
        }
        .into());
    }
    Ok(())
}

/// Writes at most `left` bytes to the file and drops the rest: a file that shrank later in the
/// chain keeps only its head from an older whole copy.
struct CappedWriter<'a> {
    inner: &'a mut File,
    left: u64,
    progress: &'a dyn Progress,
}

impl Write for CappedWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let take = b
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if take == 0 {
            return Ok(b.len());
        }
        let n = self.inner.write(&b[..take])?;
        self.left -= n as u64;
        self.progress.advance(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// True when `dest` already holds exactly the backed-up content (length `len`, then SHA-256).
fn same_content(dest: &Path, f: &FileRecord, len: u64, buf: &mut [u8]) -> Result<bool> {
    let Some(want) = f.sha256 else {
        return Ok(false);
    };
    let mut file = match File::open(dest) {
        Ok(file) => file,
        Err(_) => return Ok(false),
    };
    if file.metadata().map(|m| m.len()).unwrap_or(u64::MAX) != len {
        return Ok(false);
    }
    let mut hasher = Sha256::new();
    loop {
        let n = file
            .read(buf)
            .with_context(|| format!("reading {}", dest.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(<[u8; 32]>::from(hasher.finalize()) == want)
}

fn set_attributes(dest: &Path, f: &FileRecord) -> Result<()> {
    fs::set_permissions(dest, fs::Permissions::from_mode(f.mode & 0o7777))
        .with_context(|| format!("setting mode of {}", dest.display()))?;
    if let Ok(t) = u64::try_from(f.mtime) {
        let file = File::options().write(true).open(dest)?;
        let _ = file.set_modified(UNIX_EPOCH + Duration::from_secs(t));
    }
    chown(dest, f.uid, f.gid, false)
}

/// As root, give a path the owner recorded in the backup; otherwise leave it to the runner.
fn chown(path: &Path, uid: u32, gid: u32, link: bool) -> Result<()> {
    if !user::is_root() {
        return Ok(());
    }
    let r = if link {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
    } else {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
    };
    r.with_context(|| format!("setting owner of {}", path.display()))
}

fn create_dir(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> Result<()> {
    match fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
        Err(e) => return Err(e).with_context(|| format!("creating directory {}", path.display())),
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))
        .with_context(|| format!("setting mode of {}", path.display()))?;
    if let Some((uid, gid)) = owner {
        chown(path, uid, gid, false)?;
    }
    Ok(())
}

fn write_small(pgdata: &Path, name: &str, bytes: &[u8], owner: (u32, u32)) -> Result<()> {
    let path = pgdata.join(name);
    fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    chown(&path, owner.0, owner.1, false)
}

/// With --delta: remove what the backup does not have (walking without following links, so
/// tablespace contents are judged by their pg_tblspc paths).
fn remove_extraneous(pgdata: &Path, keep: &HashSet<&str>) -> Result<()> {
    let mut stack = vec![pgdata.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            let rel = path
                .strip_prefix(pgdata)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            let ft = entry.file_type()?;
            let kept = keep.contains(rel.as_str());
            if kept {
                if ft.is_dir() || (ft.is_symlink() && rel.starts_with("pg_tblspc/")) {
                    stack.push(path);
                }
            } else if ft.is_dir() {
                fs::remove_dir_all(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            } else {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// `recovery.signal` plus a marked block in postgresql.auto.conf; earlier pgkeep blocks are
/// commented out so the newest restore's settings are the only ones in force.
fn write_recovery_settings(cfg: &Config, opts: &RestoreOptions, owner: (u32, u32)) -> Result<()> {
    let pgdata = &opts.pgdata;
    write_small(pgdata, "recovery.signal", b"", owner)?;
    let auto = pgdata.join("postgresql.auto.conf");
    let old = fs::read_to_string(&auto).unwrap_or_default();
    let mut text = String::new();
    let mut inside = false;
    for line in old.lines() {
        if line.starts_with(BLOCK_BEGIN) {
            inside = true;
        }
        if inside && !line.starts_with('#') {
            text.push_str("# ");
        }
        text.push_str(line);
        text.push('\n');
        if line.starts_with(BLOCK_END) {
            inside = false;
        }
    }
    let exe = std::env::current_exe().context("locating the pgkeep binary for restore_command")?;
    text.push_str(&format!("{BLOCK_BEGIN}\n"));
    text.push_str(&format!(
        "restore_command = '{} --config {} archive-get %f \"%p\"'\n",
        quote(&exe.display().to_string()),
        quote(&cfg.config_path.display().to_string())
    ));
    let target = match &opts.target {
        RecoveryTarget::EndOfArchive => None,
        RecoveryTarget::Immediate => Some("recovery_target = 'immediate'".to_string()),
        RecoveryTarget::Time(t) => Some(format!(
            "recovery_target_time = '{}'",
            t.format("%Y-%m-%d %H:%M:%S%.6f+00:00")
        )),
        RecoveryTarget::Lsn(l) => Some(format!("recovery_target_lsn = '{l}'")),
        RecoveryTarget::Xid(x) => Some(format!("recovery_target_xid = '{x}'")),
        RecoveryTarget::Name(n) => Some(format!("recovery_target_name = '{}'", quote(n))),
    };
    if let Some(t) = target {
        text.push_str(&t);
        text.push('\n');
        text.push_str(&format!(
            "recovery_target_action = '{}'\n",
            opts.action.as_str()
        ));
    }
    if let Some(tl) = opts.timeline {
        text.push_str(&format!("recovery_target_timeline = '{tl}'\n"));
    }
    text.push_str(&format!("{BLOCK_END}\n"));
    fs::write(&auto, text).with_context(|| format!("writing {}", auto.display()))?;
    fs::set_permissions(&auto, fs::Permissions::from_mode(0o600))?;
    chown(&auto, owner.0, owner.1, false)
}

/// Quote for a single-quoted postgresql.conf value.
fn quote(s: &str) -> String {
    s.replace('\'', "''")
}

/// Make everything written under `path` durable: one syncfs of its filesystem.
fn sync_filesystem(path: &Path) -> Result<()> {
    let dir = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("syncing {}", path.display()));
    }
    Ok(())
}
