//! Asynchronous `archive-push` (`[archive] async = true`): a background worker pushes the
//! segments PostgreSQL marked `.ready` ahead of the archiver, several at a time, so each later
//! `archive-push` finds its segment already stored and returns at once.
//!
//! The spool (`[archive] spool-path`, a local directory) holds:
//! - `ok/<name>`: the acknowledgement of a segment, written only after `archive::archive_push`
//!   returned for it (stored, fsynced, recorded), and naming the file it pushed by device, inode,
//!   size, modification and change time; an `archive-push` whose file does not match it in every
//!   field pushes the file itself instead (the stored-copy comparison then decides);
//! - `error/<name>`: the one-line error of the worker's last attempt at a segment;
//! - `worker.lock`: a POSIX write lock held by the one running worker, with its pid;
//! - `worker.error`: why the last worker stopped before trying anything;
//! - `worker.stderr`: what the last worker started by a waiting `archive-push` printed, read
//!   when it exits with a failure (it could not even read the config, say).
//!
//! Nothing in the spool is needed for safety: losing an acknowledgement only costs a second
//! push, which finds the stored copy. Acknowledgements and errors of names that are no longer
//! `.ready` are removed by every worker pass, so the spool holds at most one small file per
//! segment PostgreSQL still waits on.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};

use crate::archive::{self, PushOutcome};
use crate::config::Config;

/// What an asynchronous `archive-push` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AsyncPush {
    /// A worker had already stored the segment: nothing was pushed by this call.
    AlreadyAcknowledged,
    /// This call waited for a worker to store the segment.
    StoredByWorker,
    /// Pushed by this call itself: no `.ready` file (a manual push), or the acknowledgement did
    /// not match the file.
    PushedHere(PushOutcome),
}

/// `archive-push` with `[archive] async = true`. `start_worker` starts a detached
/// [`run_worker`] process for the given `pg_wal` directory, its stderr going to the given file;
/// it is called only while no worker holds the spool's lock.
pub fn push(
    cfg: &Config,
    wal_path: &Path,
    start_worker: &dyn Fn(&Path, File) -> Result<Child>,
) -> Result<AsyncPush> {
    let name = wal_path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.starts_with('.'))
        .ok_or_else(|| anyhow!("{} is not a WAL file path", wal_path.display()))?;
    let meta = fs::metadata(wal_path).with_context(|| format!("reading {}", wal_path.display()))?;
    let spool = Spool::open(&cfg.archive.spool_path)?;
    match spool.ack(name) {
        Some(ack) if ack == FileId::of(&meta) => return Ok(AsyncPush::AlreadyAcknowledged),
        Some(_) => {
            // Not the file the worker pushed (a segment name used again, or a file changed):
            // the synchronous push compares with the stored copy and refuses different content.
            spool.remove(ACK_DIR, name);
            return archive::archive_push(cfg, wal_path).map(AsyncPush::PushedHere);
        }
        None => {}
    }
    let dir = wal_path.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let pg_wal = dir
        .canonicalize()
        .with_context(|| format!("reading {}", dir.display()))?;
    if !ready_file(&pg_wal, name).exists() {
        // Not something PostgreSQL's archiver is waiting on, so no worker would pick it up.
        return archive::archive_push(cfg, wal_path).map(AsyncPush::PushedHere);
    }
    // An error file left by an earlier attempt asks for a retry once removed.
    spool.remove(ERROR_DIR, name);
    let timeout = cfg.archive.push_timeout;
    let start = Instant::now();
    let mut started: Option<(Instant, SystemTime, Child)> = None;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(ack) = spool.ack(name) {
            if ack == FileId::of(&meta) {
                return Ok(AsyncPush::StoredByWorker);
            }
            spool.remove(ACK_DIR, name);
            return archive::archive_push(cfg, wal_path).map(AsyncPush::PushedHere);
        }
        if let Some(message) = spool.error(name) {
            spool.remove(ERROR_DIR, name);
            bail!("{message}");
        }
        if let Some((_, _, child)) = started.as_mut() {
            if let Some(status) = child.try_wait().ok().flatten() {
                if !status.success() {
                    let said =
                        fs::read_to_string(spool.dir.join(WORKER_STDERR)).unwrap_or_default();
                    bail!(
                        "the archive-push worker failed ({status}): {}",
                        one_line(&said).trim_start_matches("pgkeep: error: ")
                    );
                }
            }
        }
        if spool.worker_pid()?.is_none() {
            if let Some((at, wall, _)) = &started {
                if let Some(message) = spool.worker_error_since(*wall) {
                    bail!("the archive-push worker stopped: {message}");
                }
                // A worker started just now may not hold the lock yet; one that had finished
                // its last pass before our segment was ready has let go of it: start another.
                if at.elapsed() < RESTART_AFTER {
                    std::thread::sleep(pause);
                    continue;
                }
            }
            let stderr_path = spool.dir.join(WORKER_STDERR);
            let stderr = File::create(&stderr_path)
                .with_context(|| format!("creating {}", stderr_path.display()))?;
            let child =
                start_worker(&pg_wal, stderr).context("starting the archive-push worker")?;
            started = Some((Instant::now(), SystemTime::now(), child));
        }
        if start.elapsed() >= timeout {
            bail!(
                "WAL file {name} was not stored by the archive-push worker within {} s: see {} and the repository; PostgreSQL retries",
                timeout.as_secs(),
                spool.dir.display()
            );
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// The background worker: under the spool's lock (or not at all, when another worker holds it),
/// push every `.ready` segment of `pg_wal` that has no acknowledgement, `[archive] process-max`
/// at a time, oldest first, writing an acknowledgement after each is stored or an error file
/// when it failed. Each segment is tried once per run unless its error file is removed (an
/// `archive-push` waiting on it asks for a retry so); the worker exits when nothing is left.
pub fn run_worker(cfg: &Config, pg_wal: &Path) -> Result<()> {
    let spool = Spool::open(&cfg.archive.spool_path)?;
    let Some(_lock) = spool.try_lock()? else {
        return Ok(());
    };
    let _ = fs::remove_file(spool.dir.join(WORKER_ERROR));
    let result = work(cfg, &spool, pg_wal);
    if let Err(e) = &result {
        let _ = write_atomic(
            &spool.dir,
            WORKER_ERROR,
            format!("{}\n", one_line(&format!("{e:#}"))).as_bytes(),
        );
    }
    result
}

/// How long a started worker is given to take the lock before another is started.
const RESTART_AFTER: Duration = Duration::from_millis(500);
/// Segments handed out per pass, so newly `.ready` ones (the archiver's next) are not queued
/// behind a long backlog for long.
const PASS_PER_PROCESS: usize = 8;

/// Attempts at one segment per worker run: enough for the retries PostgreSQL asks for while
/// a run lasts, few enough that a spool refusing writes cannot keep a worker pushing forever.
const MAX_TRIES: u32 = 10;

const ACK_DIR: &str = "ok";
const ERROR_DIR: &str = "error";
const LOCK_FILE: &str = "worker.lock";
const WORKER_ERROR: &str = "worker.error";
/// What the last worker this host's `archive-push` started wrote to stderr.
const WORKER_STDERR: &str = "worker.stderr";

fn work(cfg: &Config, spool: &Spool, pg_wal: &Path) -> Result<()> {
    spool.remove_temp_files();
    let jobs = cfg.archive.process_max.max(1);
    let mut tries: HashMap<String, u32> = HashMap::new();
    loop {
        spool.clean(pg_wal)?;
        let todo: Vec<String> = ready_names(pg_wal)?
            .into_iter()
            .filter(|n| {
                let acked = spool.ack(n).is_some_and(|ack| {
                    fs::metadata(pg_wal.join(n)).is_ok_and(|m| ack == FileId::of(&m))
                });
                // Once tried, a segment is tried again only when its error file is gone (a
                // waiting push asks so), and at most a few times per run, so a file whose
                // acknowledgement never matches or a spool refusing writes ends the run.
                let done_here = tries.get(n).is_some_and(|&t| {
                    t >= MAX_TRIES || spool.error(n).is_some() || spool.ack(n).is_some()
                });
                !(acked || done_here)
            })
            .take(jobs * PASS_PER_PROCESS)
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let next = AtomicUsize::new(0);
        let done = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..jobs.min(todo.len()) {
                s.spawn(|| {
                    while let Some(name) = todo.get(next.fetch_add(1, Ordering::Relaxed)) {
                        push_one(cfg, spool, pg_wal, name);
                        done.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(name.clone());
                    }
                });
            }
        });
        for name in done.into_inner().unwrap_or_else(|p| p.into_inner()) {
            *tries.entry(name).or_default() += 1;
        }
    }
}

/// Push one segment; acknowledge it only once `archive_push` returned and the file is still
/// the one read, else record the error.
fn push_one(cfg: &Config, spool: &Spool, pg_wal: &Path, name: &str) {
    let path = pg_wal.join(name);
    let outcome = (|| -> Result<FileId> {
        let before = fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        archive::archive_push(cfg, &path)?;
        let after = fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        let (before, after) = (FileId::of(&before), FileId::of(&after));
        if before != after {
            bail!(
                "{} changed while being archived: not acknowledged",
                path.display()
            );
        }
        Ok(after)
    })();
    let written = match outcome {
        Ok(id) => {
            spool.remove(ERROR_DIR, name);
            spool.write(ACK_DIR, name, &id.to_line())
        }
        Err(e) => spool.write(ERROR_DIR, name, &one_line(&format!("{e:#}"))),
    };
    if let Err(e) = written {
        // Without its acknowledgement the segment is pushed again later and found stored.
        let _ = spool.write(ERROR_DIR, name, &one_line(&format!("{e:#}")));
    }
}

/// Which file a push read: a segment name used again, or a file rewritten or renamed, differs
/// in one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    size: u64,
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileId {
    fn of(m: &fs::Metadata) -> FileId {
        FileId {
            size: m.size(),
            dev: m.dev(),
            ino: m.ino(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }

    fn to_line(self) -> String {
        format!(
            "size={} dev={} ino={} mtime={} ctime={}",
            self.size, self.dev, self.ino, self.mtime_ns, self.ctime_ns
        )
    }

    /// None for anything but a whole line as `to_line` writes it (a torn write after a crash).
    fn parse(text: &str) -> Option<FileId> {
        let line = text.strip_suffix('\n')?;
        let mut fields = line.split(' ');
        let mut next = |key: &str| fields.next()?.strip_prefix(key)?.strip_prefix('=');
        let id = FileId {
            size: next("size")?.parse().ok()?,
            dev: next("dev")?.parse().ok()?,
            ino: next("ino")?.parse().ok()?,
            mtime_ns: next("mtime")?.parse().ok()?,
            ctime_ns: next("ctime")?.parse().ok()?,
        };
        fields.next().is_none().then_some(id)
    }
}

struct Spool {
    dir: PathBuf,
}

/// The worker's lock: a POSIX record lock, which the kernel drops when the process dies and
/// which another process can test (`F_GETLK`) without taking it.
struct WorkerLock {
    _file: File,
}

impl Spool {
    fn open(dir: &Path) -> Result<Spool> {
        for sub in [ACK_DIR, ERROR_DIR] {
            let path = dir.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .with_context(|| {
                    format!(
                        "creating spool directory {}: create it for the user running PostgreSQL or set [archive] spool-path",
                        path.display()
                    )
                })?;
        }
        Ok(Spool {
            dir: dir.to_path_buf(),
        })
    }

    fn ack(&self, name: &str) -> Option<FileId> {
        FileId::parse(&fs::read_to_string(self.dir.join(ACK_DIR).join(name)).ok()?)
    }

    fn error(&self, name: &str) -> Option<String> {
        let text = fs::read_to_string(self.dir.join(ERROR_DIR).join(name)).ok()?;
        Some(text.trim().to_string())
    }

    fn remove(&self, sub: &str, name: &str) {
        let _ = fs::remove_file(self.dir.join(sub).join(name));
    }

    /// Write `ok/<name>` or `error/<name>` under a temporary name, then rename: a reader sees
    /// the whole line or nothing. No fsync: a lost acknowledgement costs one more push.
    fn write(&self, sub: &str, name: &str, line: &str) -> Result<()> {
        write_atomic(&self.dir.join(sub), name, format!("{line}\n").as_bytes())
    }

    /// The pid of the running worker, if one holds the lock.
    fn worker_pid(&self) -> Result<Option<u32>> {
        let path = self.dir.join(LOCK_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let mut lock = whole_file_lock(libc::F_WRLCK);
        // SAFETY: F_GETLK on a descriptor we own, with a valid flock struct.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut lock) };
        if rc != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("testing the lock on {}", path.display()));
        }
        Ok((i32::from(lock.l_type) != libc::F_UNLCK).then_some(lock.l_pid as u32))
    }

    fn try_lock(&self) -> Result<Option<WorkerLock>> {
        let path = self.dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let lock = whole_file_lock(libc::F_WRLCK);
        // SAFETY: F_SETLK on a descriptor we own, with a valid flock struct.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) };
        if rc != 0 {
            return Ok(None);
        }
        file.set_len(0)?;
        write!(file, "{}", std::process::id())?;
        Ok(Some(WorkerLock { _file: file }))
    }

    /// The last worker's fatal error, if it was written at or after `since`.
    fn worker_error_since(&self, since: SystemTime) -> Option<String> {
        let path = self.dir.join(WORKER_ERROR);
        let modified = fs::metadata(&path).ok()?.modified().ok()?;
        if modified < since {
            return None;
        }
        let mut text = String::new();
        File::open(&path).ok()?.read_to_string(&mut text).ok()?;
        Some(text.trim().to_string())
    }

    /// Remove acknowledgements and errors of names PostgreSQL no longer waits on. The names are
    /// listed before the `.ready` files, so one written meanwhile is never taken for stale.
    fn clean(&self, pg_wal: &Path) -> Result<()> {
        for sub in [ACK_DIR, ERROR_DIR] {
            let dir = self.dir.join(sub);
            let names = list_names(&dir)?;
            if names.is_empty() {
                continue;
            }
            let ready: HashSet<String> = ready_names(pg_wal)?.into_iter().collect();
            for name in names.iter().filter(|n| !ready.contains(*n)) {
                let _ = fs::remove_file(dir.join(name));
            }
        }
        Ok(())
    }

    /// Temporary files a killed worker left (only the lock holder writes them).
    fn remove_temp_files(&self) {
        for sub in [ACK_DIR, ERROR_DIR, "."] {
            let dir = self.dir.join(sub);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

const TEMP_PREFIX: &str = ".tmp-";

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{TEMP_PREFIX}{name}"));
    let target = dir.join(name);
    let result = fs::write(&tmp, bytes).and_then(|()| fs::rename(&tmp, &target));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", target.display()))
}

fn whole_file_lock(kind: i32) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value (start 0, length 0 = whole file).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock
}

fn ready_file(pg_wal: &Path, name: &str) -> PathBuf {
    pg_wal.join("archive_status").join(format!("{name}.ready"))
}

/// The names PostgreSQL waits to have archived, in the order its archiver takes them:
/// timeline history files first, then oldest first.
fn ready_names(pg_wal: &Path) -> Result<Vec<String>> {
    let dir = pg_wal.join("archive_status");
    let mut names: Vec<String> = list_names(&dir)?
        .into_iter()
        .filter_map(|n| n.strip_suffix(".ready").map(str::to_string))
        .filter(|n| !n.contains('/') && !n.starts_with('.'))
        .collect();
    names.sort_by_key(|n| (!n.ends_with(".history"), n.clone()));
    Ok(names)
}

fn list_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        if let Ok(name) = e.file_name().into_string() {
            if !name.starts_with('.') {
                names.push(name);
            }
        }
    }
    Ok(names)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgement_lines_round_trip_and_torn_ones_are_refused() {
        let id = FileId {
            size: 16 << 20,
            dev: 2049,
            ino: 77,
            mtime_ns: 1_700_000_000_123_456_789,
            ctime_ns: 1_700_000_001_000_000_000,
        };
        let line = format!("{}\n", id.to_line());
        assert_eq!(FileId::parse(&line), Some(id));
        for cut in 0..line.len() {
            assert_eq!(FileId::parse(&line[..cut]), None, "{:?}", &line[..cut]);
        }
        assert_eq!(FileId::parse(&format!("{} x=1\n", id.to_line())), None);
    }

    #[test]
    fn history_files_come_first_then_oldest() {
        let dir = std::env::temp_dir().join(format!("pgkeep-spool-test-{}", std::process::id()));
        let status = dir.join("archive_status");
        fs::create_dir_all(&status).unwrap();
        for n in [
            "000000020000000000000005.ready",
            "000000010000000000000004.ready",
            "00000002.history.ready",
            "000000010000000000000003.done",
        ] {
            fs::write(status.join(n), "").unwrap();
        }
        let names = ready_names(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            names,
            [
                "00000002.history",
                "000000010000000000000004",
                "000000020000000000000005"
            ]
        );
    }
}
