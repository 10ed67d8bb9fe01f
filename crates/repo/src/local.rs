//! `LocalStorage`: repository objects as files in a directory tree, written atomically.
//!
//! Every object is written to a temporary file next to its final name, fsynced, then renamed
//! (or hard-linked, when an existing object must not be replaced) into place and the directory
//! fsynced. A writer killed at any point therefore leaves at worst a temporary file, which `list`
//! never shows and `remove_stale_temps` cleans up, and never a partial file under a final name.
//! Objects committed unsynced are made durable by [`Storage::sync`]: one syncfs through a
//! descriptor of the root held from before the first write, or, where the kernel's syncfs cannot
//! report errors, an fsync of each of them and their directories.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::durable::{syncfs_reports_errors, FsSync};
use crate::key;
use crate::{PendingObject, Result, Storage, StorageError};

/// Repository objects as files under `root`; keys map to relative paths.
#[derive(Debug)]
pub struct LocalStorage {
    root: PathBuf,
    /// The root, opened before the first object is written, so that [`Storage::sync`]'s syncfs
    /// reports the writeback errors of every object (see [`FsSync`]). Used with
    /// [`SyncMethod::Syncfs`] only.
    root_sync: OnceLock<FsSync>,
    /// With [`SyncMethod::FsyncEach`]: the keys committed unsynced since the last sync.
    unsynced: Option<Arc<Mutex<Vec<String>>>>,
}

/// How [`Storage::sync`] makes objects committed unsynced durable.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SyncMethod {
    /// One syncfs(2) of the repository's filesystem: where the kernel reports writeback errors
    /// through it (Linux 5.8 and later).
    Syncfs,
    /// An fsync of each such object and of each directory holding one: where syncfs would
    /// return 0 whatever was lost.
    FsyncEach,
}

impl SyncMethod {
    /// The method that reports errors on the running kernel.
    pub fn for_this_kernel() -> SyncMethod {
        if syncfs_reports_errors() {
            SyncMethod::Syncfs
        } else {
            SyncMethod::FsyncEach
        }
    }
}

impl LocalStorage {
    /// Storage rooted at `root`, which is created (0700) on the first write if missing; synced
    /// the way the running kernel can report errors of.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStorage::with_sync_method(root, SyncMethod::for_this_kernel())
    }

    /// Same, with the sync method chosen by the caller (tests of either method on any kernel).
    pub fn with_sync_method(root: impl Into<PathBuf>, method: SyncMethod) -> Self {
        LocalStorage {
            root: root.into(),
            root_sync: OnceLock::new(),
            unsynced: (method == SyncMethod::FsyncEach).then(Arc::default),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Removes the temporary files of interrupted writes under `prefix` ("" = everywhere) and
    /// returns how many it removed. Files of writers that are still running on this host (their
    /// pid is alive, or is ours) are left alone; a writer on another host sharing the repository
    /// would see its commit fail cleanly, never a damaged object.
    pub fn remove_stale_temps(&self, prefix: &str) -> Result<usize> {
        let prefix = key::check_prefix(prefix)?;
        let mut removed = 0;
        let mut result = Ok(());
        self.walk(prefix, |_, name, path| {
            let Some(pid) = key::temp_pid(name) else {
                return;
            };
            if pid == std::process::id() || process_alive(pid) {
                return;
            }
            match fs::remove_file(path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) if result.is_ok() => result = Err(StorageError::io(prefix, e)),
                Err(_) => {}
            }
        })?;
        result.map(|()| removed)
    }

    /// An error about the repository as a whole, named by its root directory.
    fn root_error(&self, source: io::Error) -> StorageError {
        StorageError::io(&self.root.to_string_lossy(), source)
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Opens the root for the later syncfs, once, before the first object is written; the root
    /// exists by then. Racing writers may both open it: whichever descriptor is kept was opened
    /// before either of them writes.
    fn hold_root(&self) -> Result<()> {
        if self.unsynced.is_none() && self.root_sync.get().is_none() {
            let sync = FsSync::open(&self.root).map_err(|e| self.root_error(e))?;
            let _ = self.root_sync.set(sync);
        }
        Ok(())
    }

    /// fsync of every object committed unsynced since the last sync, then of their directories.
    fn fsync_each(&self, unsynced: &Mutex<Vec<String>>) -> Result<()> {
        let keys = std::mem::take(&mut *lock(unsynced));
        let mut dirs = std::collections::BTreeMap::new();
        for key in &keys {
            let path = self.path(key);
            match File::open(&path).and_then(|f| f.sync_all()) {
                Ok(()) => {}
                // Deleted since it was committed: nothing left to make durable.
                Err(e) if is_absent(&e) => continue,
                Err(e) => return Err(StorageError::io(key, e)),
            }
            if let Some(dir) = path.parent() {
                dirs.entry(dir.to_owned()).or_insert_with(|| key.clone());
            }
        }
        for (dir, key) in dirs {
            match fsync_dir(&dir) {
                Ok(()) => {}
                Err(e) if is_absent(&e) => {}
                Err(e) => return Err(StorageError::io(&key, e)),
            }
        }
        Ok(())
    }

    /// Calls `each(dir_key, name, path)` for every regular file under `prefix`, temporary files
    /// included. Symbolic links inside the repository are not followed.
    fn walk(&self, prefix: &str, mut each: impl FnMut(&str, &str, &Path)) -> Result<()> {
        let mut dirs = vec![(prefix.to_owned(), self.path(prefix))];
        while let Some((dir_key, dir)) = dirs.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                // An absent prefix, or one that names a file, has nothing under it.
                Err(e) if is_absent(&e) => continue,
                Err(e) => return Err(StorageError::io(&dir_key, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| StorageError::io(&dir_key, e))?;
                let kind = entry
                    .file_type()
                    .map_err(|e| StorageError::io(&dir_key, e))?;
                // Names that are not UTF-8 cannot be keys, so they are not ours to list.
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                if kind.is_dir() {
                    let child = join_key(&dir_key, &name);
                    dirs.push((child, entry.path()));
                } else if kind.is_file() {
                    each(&dir_key, &name, &entry.path());
                }
            }
        }
        Ok(())
    }

    /// Creates `dir` and any missing parents (0700), fsyncing each new directory's parent so the
    /// directory survives a crash along with the files later committed into it.
    fn ensure_dir(&self, key: &str, dir: &Path) -> Result<()> {
        match fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => return Ok(()),
            Ok(_) => {
                let e = io::Error::new(ErrorKind::AlreadyExists, "not a directory");
                return Err(StorageError::io(key, e));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io(key, e)),
        }
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent {
            self.ensure_dir(key, parent)?;
        }
        match DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            // Another writer created it first; its metadata check above will pass next time.
            Err(e) if e.kind() == ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
            Err(e) => return Err(StorageError::io(key, e)),
        }
        // Explicitly, because the mode given to mkdir is filtered through the umask.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| StorageError::io(key, e))?;
        if let Some(parent) = parent {
            fsync_dir(parent).map_err(|e| StorageError::io(key, e))?;
        }
        Ok(())
    }
}

impl Storage for LocalStorage {
    fn create(&self, key: &str) -> Result<Box<dyn PendingObject>> {
        key::check(key)?;
        let path = self.path(key);
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(StorageError::InvalidKey {
                key: key.to_owned(),
            });
        };
        let name = name.to_string_lossy();
        self.ensure_dir(key, dir)?;
        self.hold_root()?;
        let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(key::temp_name(&name, std::process::id(), n));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| StorageError::io(key, e))?;
        let pending = LocalPending {
            key: key.to_owned(),
            file: BufWriter::with_capacity(WRITE_BUFFER, file),
            temp,
            dir: dir.to_owned(),
            path,
            committed: false,
            unflushed: 0,
            unsynced: self.unsynced.clone(),
        };
        // From here on, dropping `pending` removes the temporary file.
        pending
            .file
            .get_ref()
            .set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| StorageError::io(key, e))?;
        Ok(Box::new(pending))
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>> {
        key::check(key)?;
        let file = match File::open(self.path(key)) {
            Ok(file) => file,
            Err(e) if is_absent(&e) => return Err(not_found(key)),
            Err(e) => return Err(StorageError::io(key, e)),
        };
        let meta = file.metadata().map_err(|e| StorageError::io(key, e))?;
        if !meta.is_file() {
            return Err(not_found(key));
        }
        // Objects are read front to back; a bigger readahead window helps validate and restore.
        // SAFETY: plain syscall on a descriptor we own; advice failing is harmless.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
        // Buffered so the small header reads of a frame do not each cost a syscall; block-sized
        // reads bypass the buffer.
        Ok(Box::new(BufReader::with_capacity(READ_BUFFER, file)))
    }

    fn open_range(&self, key: &str, offset: u64, len: u64) -> Result<Box<dyn Read + Send>> {
        key::check(key)?;
        let mut file = match File::open(self.path(key)) {
            Ok(file) => file,
            Err(e) if is_absent(&e) => return Err(not_found(key)),
            Err(e) => return Err(StorageError::io(key, e)),
        };
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| StorageError::io(key, e))?;
        let capacity = usize::try_from(len).unwrap_or(READ_BUFFER).min(READ_BUFFER);
        Ok(Box::new(BufReader::with_capacity(capacity, file).take(len)))
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        key::check(key)?;
        match fs::metadata(self.path(key)) {
            Ok(meta) if meta.is_file() => Ok(Some(meta.len())),
            Ok(_) => Ok(None),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(StorageError::io(key, e)),
        }
    }

    fn modified(&self, key: &str) -> Result<Option<std::time::SystemTime>> {
        key::check(key)?;
        match fs::metadata(self.path(key)) {
            Ok(meta) if meta.is_file() => Ok(meta.modified().ok()),
            Ok(_) => Ok(None),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(StorageError::io(key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let prefix = key::check_prefix(prefix)?;
        let mut keys = Vec::new();
        self.walk(prefix, |dir_key, name, _| {
            if !key::is_temp_name(name) {
                keys.push(join_key(dir_key, name));
            }
        })?;
        keys.sort_unstable();
        Ok(keys)
    }

    fn delete(&self, key: &str) -> Result<()> {
        key::check(key)?;
        match fs::remove_file(self.path(key)) {
            Ok(()) => Ok(()),
            Err(e) if is_absent(&e) => Ok(()),
            Err(e) => Err(StorageError::io(key, e)),
        }
    }

    fn sync(&self) -> Result<()> {
        if let Some(unsynced) = &self.unsynced {
            return self.fsync_each(unsynced);
        }
        match self.root_sync.get() {
            Some(root) => root.syncfs().map_err(|e| self.root_error(e)),
            // Nothing was written through this storage, so there is no error of ours to miss.
            None => FsSync::open(&self.root)
                .and_then(|root| root.syncfs())
                .map_err(|e| self.root_error(e)),
        }
    }

    fn sync_object(&self, key: &str) -> Result<()> {
        key::check(key)?;
        let path = self.path(key);
        match File::open(&path).and_then(|f| f.sync_all()) {
            Ok(()) => {}
            Err(e) if is_absent(&e) => return Err(not_found(key)),
            Err(e) => return Err(StorageError::io(key, e)),
        }
        match path.parent() {
            Some(dir) => fsync_dir(dir).map_err(|e| StorageError::io(key, e)),
            None => Ok(()),
        }
    }

    fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let prefix = key::check_prefix(prefix)?;
        if prefix.is_empty() {
            return Err(StorageError::InvalidKey { key: String::new() });
        }
        let path = self.path(prefix);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            // A file is not a directory: nothing lies under it.
            Ok(_) => return Ok(()),
            Err(e) if is_absent(&e) => return Ok(()),
            Err(e) => return Err(StorageError::io(prefix, e)),
        }
        match fs::remove_dir_all(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StorageError::io(prefix, e)),
        }
        match path.parent() {
            Some(parent) => fsync_dir(parent).map_err(|e| StorageError::io(prefix, e)),
            None => Ok(()),
        }
    }
}

/// An object being written to its temporary file.
struct LocalPending {
    key: String,
    file: BufWriter<File>,
    temp: PathBuf,
    dir: PathBuf,
    path: PathBuf,
    /// Set once the temporary file is gone (renamed or unlinked), so drop leaves it alone.
    committed: bool,
    /// Bytes handed to the kernel since writeback was last started.
    unflushed: usize,
    /// Where a commit without fsync is recorded for the storage's later fsync of each object.
    unsynced: Option<Arc<Mutex<Vec<String>>>>,
}

impl LocalPending {
    fn sync(&mut self) -> Result<()> {
        self.file
            .flush()
            .and_then(|()| self.file.get_ref().sync_data())
            .map_err(|e| StorageError::io(&self.key, e))
    }

    fn sync_dir(&self) -> Result<()> {
        fsync_dir(&self.dir).map_err(|e| StorageError::io(&self.key, e))
    }
}

impl LocalPending {
    /// Ask the kernel to start writing what it holds of this file every `WRITEBACK_EVERY`
    /// bytes, so the disk works while the rest is still being compressed and the final fsync
    /// (or the backup's syncfs) has little left to wait for. Only a hint: errors surface at
    /// the fsync.
    fn note_written(&mut self, n: usize) {
        self.unflushed += n;
        if self.unflushed >= WRITEBACK_EVERY {
            self.unflushed = 0;
            start_writeback(self.file.get_ref());
        }
    }
}

impl Write for LocalPending {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.note_written(n);
        Ok(n)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf)?;
        self.note_written(buf.len());
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl PendingObject for LocalPending {
    fn commit(mut self: Box<Self>) -> Result<()> {
        self.sync()?;
        fs::rename(&self.temp, &self.path).map_err(|e| StorageError::io(&self.key, e))?;
        self.committed = true;
        self.sync_dir()
    }

    fn commit_unsynced(mut self: Box<Self>) -> Result<()> {
        self.file
            .flush()
            .map_err(|e| StorageError::io(&self.key, e))?;
        fs::rename(&self.temp, &self.path).map_err(|e| StorageError::io(&self.key, e))?;
        self.committed = true;
        if let Some(unsynced) = &self.unsynced {
            lock(unsynced).push(self.key.clone());
        }
        Ok(())
    }

    fn commit_new(mut self: Box<Self>) -> Result<()> {
        self.sync()?;
        // link(2) fails with EEXIST instead of replacing, atomically, which rename cannot do.
        match fs::hard_link(&self.temp, &self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                return Err(StorageError::AlreadyExists {
                    key: self.key.clone(),
                })
            }
            Err(e) => return Err(StorageError::io(&self.key, e)),
        }
        // The object is committed now; a leftover temporary name is only clutter (never listed,
        // removed by remove_stale_temps), so failing to unlink it is not the caller's problem.
        if fs::remove_file(&self.temp).is_ok() {
            self.committed = true;
        }
        self.sync_dir()
    }
}

impl Drop for LocalPending {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Small writes (metadata, block headers) are gathered; block-sized writes go straight through.
const WRITE_BUFFER: usize = 64 * 1024;
/// See [`LocalPending::note_written`].
const WRITEBACK_EVERY: usize = 2 << 20;
const READ_BUFFER: usize = 64 * 1024;

/// Distinguishes temporary files of concurrent writers in one process.
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

fn join_key(dir_key: &str, name: &str) -> String {
    if dir_key.is_empty() {
        name.to_owned()
    } else {
        format!("{dir_key}/{name}")
    }
}

fn not_found(key: &str) -> StorageError {
    StorageError::NotFound {
        key: key.to_owned(),
    }
}

/// Missing, or a path component is a file: either way nothing is at the key.
fn is_absent(e: &io::Error) -> bool {
    e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

/// Asks the kernel to start writing `file`'s dirty pages to disk now rather than when memory
/// runs short, so the disk works while more is being produced and a later fsync or syncfs has
/// little left to wait for. Only a hint: errors surface at that fsync.
#[cfg(target_os = "linux")]
pub fn start_writeback(file: &File) {
    // SAFETY: a plain system call on a descriptor `file` keeps open; it reads no memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
pub fn start_writeback(_file: &File) {}

/// A second descriptor of the file at `path`, already created, whose writes bypass the page
/// cache (`O_DIRECT`); `None` where the filesystem refuses such writes. A restore writes data
/// nothing reads back soon: through the page cache each byte is copied once more, fills memory
/// the kernel must then write back and reclaim, and evicts what the host was caching.
#[cfg(target_os = "linux")]
pub fn open_direct(path: &Path) -> Option<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
pub fn open_direct(_path: &Path) -> Option<File> {
    None
}

/// A panic elsewhere while holding the lock leaves at worst a key recorded twice, so a poisoned
/// lock is still safe to use.
fn lock(keys: &Mutex<Vec<String>>) -> MutexGuard<'_, Vec<String>> {
    keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and delivers nothing.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}
