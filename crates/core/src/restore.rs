//! `pgkeep restore`: rebuild a data directory from a backup and write the recovery settings for
//! point-in-time recovery, or for a streaming replica (`--standby`).
//!
//! Nothing is written before every check passes (backup usable, its WAL archived, target
//! directory empty and no postmaster running). `global/pg_control` is written last and everything
//! is synced at the end, so an interrupted restore leaves a directory PostgreSQL refuses to start.
//!
//! A diff or incr backup is restored with its chain of parents: each file is written once, from
//! the newest backup of the chain that holds it whole, then the pages of every later backup's
//! page delta in order, and cut to the length the restored backup recorded. Only the files the
//! restored backup lists are written.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
use pgkeep_catalog::{BackupRecord, FileKind, FileRecord};
use pgkeep_pg::{ControlFile, Lsn, TimelineId};
use pgkeep_repo::{
    decompress_into, fetch_decompressed_at, get_bytes, keys, open_direct, syncfs_reports_errors,
    DecompressReader, FsSync, StorageError,
};
use sha2::{Digest as _, Sha256};

use crate::backup::{file_size, needed_segments, BACKUP_LABEL, TABLESPACE_MAP};
use crate::bundle::{by_bundle, BundleSpan};
use crate::chain::{delta_error, Chain, Layer, Source};
use crate::config::Config;
use crate::delta::DeltaReader;
use crate::entries::{check_entries, tablespace_oid};
use crate::parallel;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::timeline::{plan_restore, Choice, Histories};
use crate::user;
use crate::walchain::WalChain;

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
    /// Where pg_wal goes (linked from the data directory); None = a plain directory inside it.
    pub waldir: Option<PathBuf>,
    /// Build a streaming replica instead of recovering to a target (`target` is then
    /// [`RecoveryTarget::EndOfArchive`]).
    pub standby: Option<StandbyOptions>,
    /// Restore from repository N (1-based); None = the first repository, in file order, that
    /// holds a backup able to reach the target with the WAL it needs.
    pub repo: Option<usize>,
}

/// `restore --standby`: `standby.signal` instead of `recovery.signal`; the replica replays the
/// archive, then streams from its primary.
#[derive(Clone, Debug, Default)]
pub struct StandbyOptions {
    /// Written as `primary_conninfo`; None keeps whatever the restored configuration says.
    pub primary_conninfo: Option<String>,
}

/// What a restore did.
#[derive(Debug)]
pub struct RestoreSummary {
    pub backup: BackupRecord,
    /// The repository restored from (`repo2 (/var/lib/pgkeep2)`) and why it was chosen.
    pub repo: String,
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
    if opts.standby.is_some() && opts.target != RecoveryTarget::EndOfArchive {
        bail!(
            "a standby follows its primary without end: restore --standby takes no recovery target"
        );
    }
    let (repo, choice, repo_choice) = choose_repository(cfg, opts)?;
    let backup = choice.backup.clone();
    let chain = Chain::load(&repo.catalog, &backup)?;
    let files = &chain.newest;
    check_entries(&backup.label, files)?;
    check_wal(&repo, &backup)?;
    check_no_gap(&repo, &choice, &opts.target)?;
    let pgdata = &opts.pgdata;
    let layout = Layout::plan(files, opts)?;
    check_target_dir(pgdata, opts.delta, repo.identity.system_identifier)?;
    layout.check_locations(pgdata, opts.delta)?;

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
        .find(|f| f.path == CONTROL_FILE)
        .map(|f| (f.uid, f.gid))
        .ok_or_else(|| {
            anyhow!(
                "backup {} has no global/pg_control: it is incomplete",
                backup.label
            )
        })?;

    create_dir(pgdata, 0o700, Some(root_owner))?;
    // Opened before anything is written: syncfs reports the write errors of the filesystem
    // since its descriptor was opened, and writeback starts while files are still being written.
    let mut syncs = vec![open_sync(pgdata)?];
    if opts.delta {
        // The old copy's pg_control goes first, so a delta restore interrupted at any point
        // leaves a directory PostgreSQL refuses to start, as a fresh one does.
        remove_control_file(pgdata)?;
        remove_extraneous(pgdata, files, &layout)?;
    }
    // Directories (parents sort before children), pg_wal and links first.
    let mut tablespace_lines = Vec::new();
    for f in files {
        let dest = pgdata.join(&f.path);
        if f.path == "pg_wal" {
            layout.make_wal_dir(pgdata, f)?;
            continue;
        }
        match f.kind {
            FileKind::Dir => create_dir(&dest, f.mode, Some((f.uid, f.gid)))?,
            FileKind::Symlink => {
                let target = match tablespace_oid(&f.path) {
                    Some(oid) => {
                        let target = layout.tablespace(oid)?;
                        tablespace_lines.push(format!("{oid} {}", target.display()));
                        create_dir(target, 0o700, Some((f.uid, f.gid)))?;
                        syncs.push(open_sync(target)?);
                        target.clone()
                    }
                    None => f
                        .link_target
                        .as_ref()
                        .map(PathBuf::from)
                        .ok_or_else(|| anyhow!("link {} has no target recorded", f.path))?,
                };
                replace_link(&target, &dest, f)?;
            }
            FileKind::File => {}
        }
    }
    // pg_wal/archive_status is not in a backup whose pg_wal was a link.
    if let Some(waldir) = &layout.waldir {
        syncs.push(open_sync(waldir)?);
    }
    create_dir(
        &pgdata.join("pg_wal/archive_status"),
        0o700,
        Some(root_owner),
    )?;

    let (control, mut todo): (Vec<&FileRecord>, Vec<&FileRecord>) = files
        .iter()
        .filter(|f| f.kind == FileKind::File)
        .partition(|f| f.path == CONTROL_FILE);
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
        delta: opts.delta,
        fsync_each: !syncfs_reports_errors(),
        jobs,
        progress,
    };
    let work = group_bundled(&chain, todo)?;
    let results: Vec<Written> = parallel::for_each(&work, jobs, |w, buf| match w {
        Work::File(f, source) => Ok(vec![writer.write(f, source, &pgdata.join(&f.path), buf)?]),
        Work::Bundle(b) => writer.write_bundled(b, pgdata, buf),
    })?
    .into_iter()
    .flatten()
    .collect();
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
    // Everything else is durable before pg_control exists, and pg_control is durable when
    // restore returns: a crash at any instant leaves a complete copy or one that cannot start.
    if writer.fsync_each {
        sync_dirs(pgdata, files, &layout)?;
    }
    for s in &syncs {
        s.syncfs()
            .with_context(|| format!("syncing the filesystem of {}", s.path().display()))?;
    }
    let control_written = write_control_file(&writer, control[0], pgdata)?;
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
        repo: repo_choice,
        files_written,
        files_kept,
        bytes_written,
        elapsed: started.elapsed(),
    })
}

const CONTROL_FILE: &str = "global/pg_control";

fn open_sync(dir: &Path) -> Result<FsSync> {
    FsSync::open(dir).with_context(|| format!("opening {}", dir.display()))
}

/// Where a restore puts what lies outside the data directory: tablespaces and pg_wal.
struct Layout {
    /// Tablespace OID -> location: the --tablespace-map entry, else the recorded link target.
    tablespaces: BTreeMap<u32, PathBuf>,
    /// --waldir; None = pg_wal is a plain directory in the data directory.
    waldir: Option<PathBuf>,
}

impl Layout {
    fn plan(files: &[FileRecord], opts: &RestoreOptions) -> Result<Layout> {
        let mut tablespaces = BTreeMap::new();
        for f in files.iter().filter(|f| f.kind == FileKind::Symlink) {
            let Some(oid) = tablespace_oid(&f.path) else {
                continue;
            };
            let dir =
                match opts.tablespace_map.get(&oid) {
                    Some(dir) => dir.clone(),
                    None => f.link_target.as_ref().map(PathBuf::from).ok_or_else(|| {
                        anyhow!("tablespace link {} has no target recorded", f.path)
                    })?,
                };
            tablespaces.insert(oid, dir);
        }
        if let Some(oid) = opts
            .tablespace_map
            .keys()
            .find(|o| !tablespaces.contains_key(o))
        {
            bail!(
                "--tablespace-map {oid}=...: backup has no tablespace {oid} (it has {})",
                if tablespaces.is_empty() {
                    "none".to_string()
                } else {
                    tablespaces
                        .keys()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
        }
        let layout = Layout {
            tablespaces,
            waldir: opts.waldir.clone(),
        };
        let mut seen: Vec<(&Path, String)> = vec![(&opts.pgdata, "--pgdata".to_string())];
        for (what, dir) in layout.locations() {
            if let Some((_, other)) = seen
                .iter()
                .find(|(p, _)| p.starts_with(dir) || dir.starts_with(p))
            {
                bail!(
                    "{what} would go to {}, which overlaps {other}: give each its own directory (--tablespace-map OID=DIR, --waldir DIR)",
                    dir.display()
                );
            }
            seen.push((dir, what));
        }
        Ok(layout)
    }

    /// Each location outside the data directory, named for messages.
    fn locations(&self) -> Vec<(String, &Path)> {
        let mut out: Vec<(String, &Path)> = self
            .tablespaces
            .iter()
            .map(|(oid, dir)| (format!("tablespace {oid}"), dir.as_path()))
            .collect();
        if let Some(w) = &self.waldir {
            out.push(("the WAL directory".to_string(), w.as_path()));
        }
        out
    }

    fn tablespace(&self, oid: u32) -> Result<&PathBuf> {
        self.tablespaces
            .get(&oid)
            .ok_or_else(|| anyhow!("tablespace {oid} has no planned location"))
    }

    /// Like the data directory itself, a location must be empty or new: a tablespace's recorded
    /// location on this host is most likely the live cluster's. `--delta` reuses a non-empty one
    /// only when the data directory being restored over already links to it.
    fn check_locations(&self, pgdata: &Path, delta: bool) -> Result<()> {
        for (oid, dir) in &self.tablespaces {
            let link = pgdata.join(format!("pg_tblspc/{oid}"));
            let reusable = delta && links_to(&link, dir);
            if !reusable && !is_empty_or_absent(dir)? {
                bail!(
                    "tablespace {oid} would be restored into {}, which is not empty (it may belong to a running cluster): map it to an empty directory with --tablespace-map {oid}=DIR{}",
                    dir.display(),
                    if delta { "; --delta reuses only the directory --pgdata already links to" } else { "" }
                );
            }
        }
        if let Some(dir) = &self.waldir {
            let reusable = delta && links_to(&pgdata.join("pg_wal"), dir);
            if !reusable && !is_empty_or_absent(dir)? {
                bail!(
                    "WAL directory {} is not empty (it may belong to a running cluster): give --waldir an empty or new directory",
                    dir.display()
                );
            }
        }
        Ok(())
    }

    /// pg_wal as a plain directory, or a link to --waldir.
    fn make_wal_dir(&self, pgdata: &Path, f: &FileRecord) -> Result<()> {
        let dest = pgdata.join("pg_wal");
        match &self.waldir {
            None => {
                if fs::symlink_metadata(&dest).is_ok_and(|m| m.file_type().is_symlink()) {
                    fs::remove_file(&dest)
                        .with_context(|| format!("replacing link {}", dest.display()))?;
                }
                create_dir(&dest, 0o700, Some((f.uid, f.gid)))
            }
            Some(dir) => {
                create_dir(dir, 0o700, Some((f.uid, f.gid)))?;
                if fs::symlink_metadata(&dest).is_ok_and(|m| m.file_type().is_dir()) {
                    fs::remove_dir_all(&dest)
                        .with_context(|| format!("replacing directory {}", dest.display()))?;
                }
                replace_link(dir, &dest, f)
            }
        }
    }

    /// What restore puts at `rel` when it is pg_wal or a tablespace link.
    fn special(&self, rel: &str) -> Option<Option<&Path>> {
        if rel == "pg_wal" {
            return Some(self.waldir.as_deref());
        }
        let oid = tablespace_oid(rel)?;
        self.tablespaces.get(&oid).map(|d| Some(d.as_path()))
    }
}

/// True when `dir` does not exist or is an empty directory.
fn is_empty_or_absent(dir: &Path) -> Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut d) => Ok(d.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

/// True when `link` is a symbolic link to the directory `dir`.
fn links_to(link: &Path, dir: &Path) -> bool {
    let is_link = fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink());
    is_link && crate::pg::same_dir(link, dir)
}

fn replace_link(target: &Path, dest: &Path, f: &FileRecord) -> Result<()> {
    if fs::symlink_metadata(dest).is_ok() {
        fs::remove_file(dest).with_context(|| format!("replacing link {}", dest.display()))?;
    }
    std::os::unix::fs::symlink(target, dest)
        .with_context(|| format!("creating link {}", dest.display()))?;
    chown(dest, f.uid, f.gid, true)
}

/// Write pg_control under a temporary name, make it durable, rename it into place and make the
/// rename durable.
fn write_control_file(writer: &FileWriter, f: &FileRecord, pgdata: &Path) -> Result<Written> {
    let dest = pgdata.join(CONTROL_FILE);
    let temp = pgdata.join("global/pg_control.pgkeep-restore");
    let mut buf = vec![0u8; parallel::BUF_SIZE];
    let source = writer
        .chain
        .source(f)
        .with_context(|| restoring(f, writer.chain))?;
    let written = writer.write(f, &source, &temp, &mut buf)?;
    File::open(&temp)
        .and_then(|file| file.sync_all())
        .with_context(|| format!("syncing {}", temp.display()))?;
    fs::rename(&temp, &dest).with_context(|| format!("renaming to {}", dest.display()))?;
    fsync_dir(&pgdata.join("global"))?;
    Ok(written)
}

/// With --delta, before anything else changes: remove the old copy's pg_control, durably.
fn remove_control_file(pgdata: &Path) -> Result<()> {
    let path = pgdata.join(CONTROL_FILE);
    match fs::remove_file(&path) {
        Ok(()) => fsync_dir(&pgdata.join("global")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// Where syncfs cannot report write errors, files are fsynced one by one as they are written;
/// their directories are fsynced here.
fn sync_dirs(pgdata: &Path, files: &[FileRecord], layout: &Layout) -> Result<()> {
    fsync_dir(pgdata)?;
    for f in files.iter().filter(|f| f.kind == FileKind::Dir) {
        fsync_dir(&pgdata.join(&f.path))?;
    }
    for (_, dir) in layout.locations() {
        fsync_dir(dir)?;
    }
    fsync_dir(&pgdata.join("pg_wal/archive_status"))
}

/// The repository to restore from, the backup and timeline chosen there, and a sentence
/// saying which repository and why: `--repo N`'s, else the first repository in file order
/// whose backups reach the target and whose archive holds their WAL without a gap before it
/// (a repository that cannot be opened is passed over and named in the error when none can).
pub fn choose_repository(cfg: &Config, opts: &RestoreOptions) -> Result<(Repo, Choice, String)> {
    let candidates: Vec<Config> = match opts.repo {
        Some(n) => vec![cfg.with_repo(n).ok_or_else(|| {
            anyhow!(
                "--repo {n}: the config has {} repositories: pass 1 to {}",
                cfg.repos.len(),
                cfg.repos.len()
            )
        })?],
        None => (1..=cfg.repos.len())
            .filter_map(|n| cfg.with_repo(n))
            .collect(),
    };
    let single = candidates.len() == 1;
    let mut refusals = Vec::new();
    for c in &candidates {
        let planned = (|| -> Result<(Repo, Choice)> {
            let repo = Repo::open(c)?;
            if repo.identity.pg_major < 12 {
                bail!("restore of PostgreSQL {} is not supported: pgkeep writes recovery.signal (PostgreSQL 12+)", repo.identity.pg_major);
            }
            let choice = choose_backup(&repo, opts)?;
            check_wal(&repo, &choice.backup)?;
            check_no_gap(&repo, &choice, &opts.target)?;
            Ok((repo, choice))
        })();
        match planned {
            Ok((repo, choice)) => {
                let why = match (opts.repo, refusals.is_empty()) {
                    (Some(n), _) => format!("--repo {n}"),
                    (None, true) => "the first repository".to_string(),
                    (None, false) => format!(
                        "the first repository that can reach the target; passed over: {}",
                        refusals.join("; ")
                    ),
                };
                return Ok((repo, choice, format!("{} ({why})", c.repo.title())));
            }
            Err(e) if single => return Err(e),
            Err(e) => refusals.push(format!("{}: {e:#}", c.repo.title())),
        }
    }
    bail!(
        "no repository can restore to the target: {}",
        refusals.join("; ")
    )
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

/// Recovery asks for segments one by one and ends, promoting, at the first one the archive does
/// not have. Refuse a target that lies past a missing segment when later ones are archived, so a
/// restore never silently stops short; a time, xid or name target past it is left to PostgreSQL,
/// which refuses to end recovery before its target (13+).
fn check_no_gap(repo: &Repo, choice: &Choice, target: &RecoveryTarget) -> Result<()> {
    let path = Histories::load(repo)?.path(choice.timeline)?;
    let chain = WalChain::from_repo(repo)?;
    let Some((missing, at)) = chain.first_gap_on_path(&choice.backup, &path) else {
        return Ok(());
    };
    let past = match target {
        RecoveryTarget::EndOfArchive => true,
        RecoveryTarget::Lsn(lsn) => *lsn >= at,
        _ => false,
    };
    if past {
        bail!(
            "WAL segment {missing} is missing from the archive but later segments are there: recovery from backup {} would stop at {at} and promote without them; put the segment back, or restore to a point before it with --target-lsn or --target-time (`pgkeep validate` lists the gaps)",
            choice.backup.label
        );
    }
    Ok(())
}

/// Every segment from the backup's start to its stop must be in the archive.
fn check_wal(repo: &Repo, b: &BackupRecord) -> Result<()> {
    let seg = repo.wal_seg_size()?;
    let stop = b
        .stop_lsn
        .ok_or_else(|| anyhow!("backup {} has no stop LSN: it did not finish", b.label))?;
    for name in needed_segments(TimelineId(b.timeline), b.start_lsn, stop, seg) {
        if !crate::archive::is_archived(repo, &name)? {
            bail!(
                "WAL segment {name}, needed to make backup {} consistent, is missing from the archive: run `pgkeep validate` and restore another backup",
                b.label
            );
        }
    }
    Ok(())
}

/// The data directory must be empty or new; with --delta it may hold a stopped copy of this
/// cluster (or what an interrupted restore left, which has no pg_control yet).
fn check_target_dir(pgdata: &Path, delta: bool, system_identifier: u64) -> Result<()> {
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
    if is_empty_or_absent(pgdata)? {
        return Ok(());
    }
    if !delta {
        bail!(
            "directory {} is not empty: restore into an empty or new directory, or pass --delta to reuse its files",
            pgdata.display()
        );
    }
    let control = pgdata.join(CONTROL_FILE);
    match fs::read(&control) {
        Ok(bytes) => {
            let found = ControlFile::parse(&bytes).with_context(|| {
                format!(
                    "--delta reuses only a copy of this cluster, and {} cannot be read: restore into an empty directory",
                    control.display()
                )
            })?;
            if found.system_identifier != system_identifier {
                bail!(
                    "--delta reuses only a copy of this cluster: {} holds system identifier {}, the repository {system_identifier}; restore into an empty directory",
                    pgdata.display(),
                    found.system_identifier
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !pgdata.join("PG_VERSION").is_file() {
                bail!(
                    "--delta reuses only a copy of this cluster, and {} holds no PostgreSQL data directory: restore into an empty directory",
                    pgdata.display()
                );
            }
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", control.display())),
    }
    Ok(())
}

enum Written {
    Kept,
    Bytes(u64),
}

/// What one restore worker takes at a time: a file, or the files whose whole content lies in
/// one bundle (by offset, with where their frames are), read with one request from the first
/// one's frame to the last one's end.
enum Work<'f> {
    File(&'f FileRecord, Source),
    Bundle(Vec<(&'f FileRecord, Layer)>),
}

/// `todo` (biggest first) as work: files stored whole in a bundle grouped by bundle, after
/// every file of its own, so the big files start first.
fn group_bundled<'f>(chain: &Chain, todo: Vec<&'f FileRecord>) -> Result<Vec<Work<'f>>> {
    let sources = todo
        .into_iter()
        .map(|f| Ok((f, chain.source(f).with_context(|| restoring(f, chain))?)))
        .collect::<Result<Vec<_>>>()?;
    let (alone, bundles) = by_bundle(sources, |(_, s)| {
        (s.base.at.range.is_some() && s.deltas.is_empty()).then_some(&s.base.at)
    });
    let files = alone.into_iter().map(|(f, s)| Work::File(f, s));
    let bundles = bundles
        .into_iter()
        .map(|group| Work::Bundle(group.into_iter().map(|(f, s)| (f, s.base)).collect()));
    Ok(files.chain(bundles).collect())
}

/// Context of an error restoring `f`.
fn restoring(f: &FileRecord, chain: &Chain) -> String {
    format!("restoring {} from backup {}", f.path, chain.label())
}

struct FileWriter<'a> {
    repo: &'a Repo,
    chain: &'a Chain,
    delta: bool,
    /// fsync each file as it is written (where syncfs cannot report errors).
    fsync_each: bool,
    /// Threads a big file's whole copy is decoded on, besides the pool's.
    jobs: usize,
    progress: &'a dyn Progress,
}

/// Whole copies at least this big are decoded on `jobs` threads of their own. One big table
/// would otherwise keep one pool thread busy long after the others ran out of files; below
/// this, starting threads is not worth it.
const PARALLEL_BASE: u64 = 8 << 20;

impl FileWriter<'_> {
    /// Write the file `f` describes at `dest` (its place under the data directory, or a
    /// temporary name for pg_control).
    fn write(
        &self,
        f: &FileRecord,
        source: &Source,
        dest: &Path,
        buf: &mut [u8],
    ) -> Result<Written> {
        let len = file_size(f, self.chain.block_size);
        if self.delta && same_content(dest, f, len, buf)? {
            set_attributes(dest, f)?;
            self.progress.advance(len);
            return Ok(Written::Kept);
        }
        let context = || restoring(f, self.chain);
        let mut file = create_file(dest)?;
        let short = self
            .write_base(&source.base, &mut file, dest, len)
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
        self.finish_file(file, f, dest)?;
        Ok(Written::Bytes(len))
    }

    /// Start the written file's way to the disk, or sync it, and set its attributes.
    fn finish_file(&self, file: File, f: &FileRecord, dest: &Path) -> Result<()> {
        // The disk writes this file while later ones are decoded, instead of every file at the
        // final syncfs (restore of the bench cluster: 1.5 s -> 1.1 s; an fsync per file, as
        // pgBackRest does, came to 1.3 s).
        if self.fsync_each {
            file.sync_all()
                .with_context(|| format!("syncing {}", dest.display()))?;
        } else {
            pgkeep_repo::start_writeback(&file);
        }
        drop(file);
        set_attributes(dest, f)
    }

    /// Write the files of one bundle, reading the bundle once from the first one's frame to the
    /// end of the last one's; the bytes between frames (files this restore does not need, or
    /// keeps with --delta) are read past.
    fn write_bundled(
        &self,
        files: &[(&FileRecord, Layer)],
        pgdata: &Path,
        buf: &mut [u8],
    ) -> Result<Vec<Written>> {
        let range = |layer: &Layer| layer.at.range.unwrap_or_default();
        let (Some((_, first)), Some((_, last))) = (files.first(), files.last()) else {
            return Ok(Vec::new());
        };
        let storage = self.repo.storage();
        let mut span = BundleSpan::open(storage, &first.at.key, range(first), range(last))?;
        let mut written = Vec::with_capacity(files.len());
        for (f, layer) in files {
            let context = || restoring(f, self.chain);
            let dest = pgdata.join(&f.path);
            let len = file_size(f, self.chain.block_size);
            let kept = self.delta && same_content(&dest, f, len, buf)?;
            let outcome = span
                .with_frame(range(layer), |frame| match kept {
                    true => Ok(Written::Kept),
                    false => self.write_frame(f, &dest, layer, frame),
                })
                .with_context(|| format!("reading {}", layer.at.name()))
                .with_context(context)?
                .with_context(context)?;
            if kept {
                set_attributes(&dest, f)?;
                self.progress.advance(len);
            }
            written.push(outcome);
        }
        Ok(written)
    }

    /// Write `f` at `dest` from `frame`, the compressed frame of its whole content.
    fn write_frame(
        &self,
        f: &FileRecord,
        dest: &Path,
        layer: &Layer,
        frame: &mut dyn Read,
    ) -> Result<Written> {
        let len = file_size(f, self.chain.block_size);
        let mut file = create_file(dest)?;
        let mut out = CappedWriter {
            inner: &mut file,
            left: len,
            progress: self.progress,
        };
        decompress_into(
            frame,
            &layer.at.key,
            &mut out,
            Some((layer.size, layer.crc)),
            false,
        )?;
        self.finish_file(file, f, dest)?;
        Ok(Written::Bytes(len))
    }

    /// Writes the head of `file` from its whole copy, at most `len` bytes, and returns how many
    /// of the `len` bytes it left for the page deltas (the file grew later in the chain).
    fn write_base(
        &self,
        base: &Layer,
        file: &mut File,
        dest: &Path,
        len: u64,
    ) -> Result<u64, StorageError> {
        let storage = self.repo.storage();
        let expect = (base.size, base.crc);
        if self.jobs > 1 && base.size >= PARALLEL_BASE && base.at.range.is_none() {
            let on_bytes = |n| self.progress.advance(n);
            // Past the page cache: see `open_direct`.
            let direct = open_direct(dest);
            let digest = fetch_decompressed_at(
                storage,
                &base.at.key,
                file,
                direct.as_ref(),
                len,
                expect,
                self.jobs,
                &on_bytes,
            )?;
            return Ok(len.saturating_sub(digest.size));
        }
        let mut out = CappedWriter {
            inner: file,
            left: len,
            progress: self.progress,
        };
        decompress_into(
            base.at.open(storage)?,
            &base.at.key,
            &mut out,
            Some(expect),
            false,
        )?;
        Ok(out.left)
    }
}

/// A data file to write, emptied if it exists. Readable too: a based page of a delta is
/// decoded against the block already written.
fn create_file(dest: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        // Never through a link: a data file's path names a file of the data directory.
        .custom_flags(libc::O_NOFOLLOW)
        .open(dest)
        .with_context(|| format!("creating {}", dest.display()))
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
    let key = &layer.at.key;
    let reader = DecompressReader::new(layer.at.open(repo.storage())?, false);
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

/// With --delta: remove what the backup does not have, and whatever has another kind than the
/// backup's entry (a link where a directory or file belongs is removed, never followed). Links
/// are descended only into the locations `layout` planned (and `check_locations` accepted), so
/// contents elsewhere are never judged, let alone removed.
fn remove_extraneous(pgdata: &Path, files: &[FileRecord], layout: &Layout) -> Result<()> {
    let kinds: HashMap<&str, FileKind> = files.iter().map(|f| (f.path.as_str(), f.kind)).collect();
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
            let keep = match (layout.special(&rel), kinds.get(rel.as_str())) {
                // pg_wal as a plain directory, or a link to the planned WAL directory.
                (Some(None), Some(_)) => ft.is_dir(),
                (Some(Some(target)), Some(_)) => ft.is_symlink() && links_to(&path, target),
                (_, Some(FileKind::Dir)) => ft.is_dir(),
                (_, Some(FileKind::File)) => ft.is_file(),
                (_, Some(FileKind::Symlink)) => ft.is_symlink(),
                (_, None) => false,
            };
            if keep {
                if ft.is_dir() || ft.is_symlink() && layout.special(&rel).is_some() {
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

/// `recovery.signal` (`standby.signal` for a standby) plus a marked block in
/// postgresql.auto.conf; earlier pgkeep blocks are commented out so the newest restore's
/// settings are the only ones in force.
fn write_recovery_settings(cfg: &Config, opts: &RestoreOptions, owner: (u32, u32)) -> Result<()> {
    let pgdata = &opts.pgdata;
    let signal = if opts.standby.is_some() {
        "standby.signal"
    } else {
        "recovery.signal"
    };
    write_small(pgdata, signal, b"", owner)?;
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
    let config = std::path::absolute(&cfg.config_path)
        .with_context(|| format!("locating config {}", cfg.config_path.display()))?;
    text.push_str(&format!("{BLOCK_BEGIN}\n"));
    text.push_str(&format!(
        "restore_command = {}\n",
        conf_string(&restore_command(&exe, &config)?)
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
        RecoveryTarget::Name(n) => Some(format!("recovery_target_name = {}", conf_string(n))),
    };
    if let Some(t) = target {
        text.push_str(&t);
        text.push('\n');
        text.push_str(&format!(
            "recovery_target_action = '{}'\n",
            opts.action.as_str()
        ));
    }
    if let Some(conninfo) = opts
        .standby
        .as_ref()
        .and_then(|s| s.primary_conninfo.as_ref())
    {
        text.push_str(&format!("primary_conninfo = {}\n", conf_string(conninfo)));
    }
    // A standby follows its primary across promotions of the primary's own standbys.
    let timeline = match (opts.timeline, &opts.standby) {
        (None, Some(_)) => Some(TargetTimeline::Latest),
        (t, _) => t,
    };
    if let Some(tl) = timeline {
        text.push_str(&format!("recovery_target_timeline = '{tl}'\n"));
    }
    text.push_str(&format!("{BLOCK_END}\n"));
    fs::write(&auto, text).with_context(|| format!("writing {}", auto.display()))?;
    fs::set_permissions(&auto, fs::Permissions::from_mode(0o600))?;
    chown(&auto, owner.0, owner.1, false)
}

/// The restore_command that runs this pgkeep with this config: each path quoted for the shell
/// PostgreSQL runs it with, and its `%` doubled so PostgreSQL does not read them as `%f`/`%p`.
fn restore_command(exe: &Path, config: &Path) -> Result<String> {
    let word = |p: &Path| -> Result<String> {
        let s = p
            .to_str()
            .filter(|s| !s.contains(['\n', '\r', '\0']))
            .ok_or_else(|| {
                anyhow!(
                    "{} cannot be written into restore_command (not UTF-8, or holds a line break): move it",
                    p.display()
                )
            })?;
        Ok(shell_word(s).replace('%', "%%"))
    };
    Ok(format!(
        "{} --config {} archive-get %f \"%p\"",
        word(exe)?,
        word(config)?
    ))
}

/// `s` as one word for a POSIX shell: as is when it holds only harmless characters, else in
/// single quotes (a quote inside becomes `'\''`).
fn shell_word(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+,:@=%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `s` as a single-quoted postgresql.conf string: PostgreSQL's parser reads `''` as a quote
/// and processes backslash escapes, so both are escaped.
pub(crate) fn conf_string(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// What PostgreSQL does with the setting: read the conf string, expand %f, %p and %%, and
    /// run the result with `sh -c`.
    fn run_as_postgresql_would(setting: &str, wal: &str, dest: &str) -> String {
        let inner = setting
            .strip_prefix('\'')
            .and_then(|s| s.strip_suffix('\''))
            .unwrap();
        let (mut value, mut chars) = (String::new(), inner.chars().peekable());
        while let Some(c) = chars.next() {
            match c {
                '\'' => value.push(chars.next().unwrap()),
                '\\' => value.push(chars.next().unwrap()),
                c => value.push(c),
            }
        }
        let (mut cmd, mut chars) = (String::new(), value.chars().peekable());
        while let Some(c) = chars.next() {
            match (c, chars.peek()) {
                ('%', Some('f')) => cmd.push_str(wal),
                ('%', Some('p')) => cmd.push_str(dest),
                ('%', Some('%')) => cmd.push('%'),
                _ => {
                    cmd.push(c);
                    continue;
                }
            }
            chars.next();
        }
        let out = std::process::Command::new("sh")
            .args(["-c", &cmd])
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn restore_command_survives_spaces_quotes_backslashes_and_percents() {
        let dir = tempfile::tempdir().unwrap();
        let bin_dir = dir.path().join("my bin's \\ 50%f");
        fs::create_dir(&bin_dir).unwrap();
        let exe = bin_dir.join("pgkeep");
        fs::write(&exe, "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\n").unwrap();
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.path().join("conf \"dir\" $HOME/pgkeep.toml");
        let setting = conf_string(&restore_command(&exe, &config).unwrap());
        let args =
            run_as_postgresql_would(&setting, "000000010000000000000003", "pg_wal/RECOVERYXLOG");
        assert_eq!(
            args,
            format!(
                "--config\n{}\narchive-get\n000000010000000000000003\npg_wal/RECOVERYXLOG\n",
                config.display()
            )
        );
    }

    #[test]
    fn plain_paths_stay_readable() {
        let cmd = restore_command(
            Path::new("/usr/bin/pgkeep"),
            Path::new("/etc/pgkeep/pgkeep.toml"),
        )
        .unwrap();
        assert_eq!(
            cmd,
            "/usr/bin/pgkeep --config /etc/pgkeep/pgkeep.toml archive-get %f \"%p\""
        );
        assert!(restore_command(Path::new("/a\nb"), Path::new("/c")).is_err());
    }
}
