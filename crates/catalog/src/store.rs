//! The catalog file: creating, opening and migrating it, and reading and writing its rows.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use chrono::Utc;
use rusqlite::types::{Type, Value};
use rusqlite::{
    ffi, params, params_from_iter, Connection, ErrorCode, OpenFlags, OptionalExtension, Row,
    Transaction, TransactionBehavior,
};

use crate::schema::{APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION};
use crate::text::{parse_pin, parse_time, pin_text, time_text};
use crate::{
    BackupRecord, BackupStatus, Bundled, CatalogError, DrillRecord, FileRecord, Lsn, Pin,
    RepoIdentity, Result, WalInsert, WalRecord,
};

/// An open catalog: one SQLite connection to the repository's catalog file.
///
/// Several processes may hold the catalog open at once (the archiver's `archive-push` and a
/// backup, say): every write runs in its own `BEGIN IMMEDIATE` transaction, so writers queue
/// behind each other for up to a minute instead of failing with "database is locked". Within a
/// process a `Catalog` may be shared between threads (it is `Sync`); calls on it take turns.
pub struct Catalog {
    conn: Mutex<Connection>,
    path: PathBuf,
}

/// The connection of a [`Catalog`] while one call holds it, with the path to name in errors.
/// Everything that touches SQL is written against this, so it also serves while a catalog is
/// being created or opened, before there is a `Catalog`.
struct Db<'a> {
    conn: &'a Connection,
    path: &'a Path,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("path", &self.path).finish()
    }
}

/// How long a writer waits for another one to finish before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

const BACKUP_COLUMNS: &str = "label, backup_type, status, parent, timeline, start_lsn, stop_lsn, \
     start_wal, stop_wal, start_time, end_time, recovery_time, data_bytes, stored_bytes, files, \
     pg_version_num, system_identifier, block_size, data_checksums, pid, hostname, \
     page_checksum_failures, error, from_standby, pinned";

const FILE_COLUMNS: &str = "path, kind, size, mode, uid, gid, mtime, link_target, crc32c, sha256, \
     stored_size, stored_in, n_blocks, page_delta, bundle_id, bundle_offset, bundle_length";

const DRILL_COLUMNS: &str = "backup_label, started_at, status, restore_seconds, \
     recovery_seconds, recovered_lsn, recovered_time, rpo_seconds, message";

const WAL_COLUMNS: &str =
    "name, kind, timeline, segno, size, crc32c, sha256, stored_size, archived_at";

impl Catalog {
    /// Creates a new catalog file holding `identity`; an error if the file exists.
    ///
    /// The catalog is built under a temporary name beside `path` and linked into place only once
    /// complete, so a crash never leaves a half-made catalog under the final name.
    pub fn create(path: &Path, identity: &RepoIdentity) -> Result<Self> {
        if path.symlink_metadata().is_ok() {
            return Err(CatalogError::AlreadyExists {
                path: path.to_owned(),
            });
        }
        let tmp = temp_path(path);
        remove_db_files(&tmp);
        let built = build(&tmp, path, identity).and_then(|()| publish(&tmp, path));
        remove_db_files(&tmp);
        built?;
        Self::open(path)
    }

    /// Opens an existing catalog and migrates it to the current schema version.
    ///
    /// The connection uses write-ahead logging, `synchronous = FULL`, foreign keys and a 60 s busy
    /// timeout.
    pub fn open(path: &Path) -> Result<Self> {
        match fs::metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CatalogError::Missing {
                    path: path.to_owned(),
                })
            }
            Err(source) => {
                return Err(CatalogError::Io {
                    action: "reading catalog",
                    path: path.to_owned(),
                    source,
                })
            }
            Ok(m) if !m.is_file() => return Err(not_a_catalog(path, "not a regular file")),
            Ok(m) if m.len() == 0 => return Err(not_a_catalog(path, "empty file")),
            Ok(_) => {}
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = connect(path, path, flags)?;
        let db = Db { conn: &conn, path };
        db.check_application_id()?;
        db.configure()?;
        db.migrate()?;
        Ok(Catalog {
            conn: Mutex::new(conn),
            path: path.to_owned(),
        })
    }

    /// The catalog file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cluster this repository serves.
    pub fn identity(&self) -> Result<RepoIdentity> {
        self.with_db(|db| db.identity())
    }

    /// Records a new backup; an error if its label is taken.
    pub fn insert_backup(&self, b: &BackupRecord) -> Result<()> {
        self.with_db(|db| db.insert_backup(b))
    }

    /// Rewrites every field of a recorded backup but its status and pin (which only
    /// [`Catalog::set_status`] and [`Catalog::set_pin`] change); an error if the backup is not
    /// recorded.
    pub fn update_backup(&self, b: &BackupRecord) -> Result<()> {
        self.with_db(|db| db.update_backup(b))
    }

    /// Moves a backup to status `next` if [`BackupStatus::can_become`] allows it, and sets its
    /// error message to `error` (None clears it). Check and change are one transaction, so two
    /// processes cannot both move the same backup. Returns the updated record.
    pub fn set_status(
        &self,
        label: &str,
        next: BackupStatus,
        error: Option<&str>,
    ) -> Result<BackupRecord> {
        self.with_db(|db| db.set_status(label, next, error))
    }

    /// Pins a backup (`Some`) or unpins it (`None`); an error if it is not recorded. Returns the
    /// updated record.
    pub fn set_pin(&self, label: &str, pin: Option<Pin>) -> Result<BackupRecord> {
        self.with_db(|db| db.set_pin(label, pin))
    }

    /// The backup with this label, if recorded.
    pub fn backup(&self, label: &str) -> Result<Option<BackupRecord>> {
        self.with_db(|db| db.backup(label))
    }

    /// Every recorded backup, oldest first (by start time, then label).
    pub fn backups(&self) -> Result<Vec<BackupRecord>> {
        self.with_db(|db| db.backups())
    }

    /// Forgets a backup and its files. Refused while another backup names it as parent, since
    /// that backup could then no longer be restored: delete the newest of a chain first.
    pub fn delete_backup(&self, label: &str) -> Result<()> {
        self.with_db(|db| db.delete_backup(label))
    }

    /// Records files of a backup, all in one transaction. May be called more than once per
    /// backup; a path recorded twice is an error and records nothing of this call.
    pub fn insert_files(&self, label: &str, files: &[FileRecord]) -> Result<()> {
        self.with_db(|db| db.insert_files(label, files))
    }

    /// The files of a backup, sorted by path; an error if the backup is not recorded.
    pub fn files(&self, label: &str) -> Result<Vec<FileRecord>> {
        self.with_db(|db| db.files(label))
    }

    /// Records an archived WAL file. Never replaces a row: if the name is already recorded, the
    /// recorded row is returned and nothing changes.
    pub fn insert_wal(&self, w: &WalRecord) -> Result<WalInsert> {
        self.with_db(|db| db.insert_wal(w))
    }

    /// The archived WAL file with this name, if recorded.
    pub fn wal(&self, name: &str) -> Result<Option<WalRecord>> {
        self.with_db(|db| db.wal(name))
    }

    /// Every archived WAL file, sorted by name.
    pub fn wal_list(&self) -> Result<Vec<WalRecord>> {
        self.with_db(|db| db.wal_list())
    }

    /// Forgets an archived WAL file; an error if it is not recorded.
    pub fn delete_wal(&self, name: &str) -> Result<()> {
        self.with_db(|db| db.delete_wal(name))
    }

    /// Forgets the archived WAL files named, in one transaction; names not recorded are
    /// skipped. Returns how many rows went.
    pub fn delete_wal_files(&self, names: &[String]) -> Result<usize> {
        self.with_db(|db| db.delete_wal_files(names))
    }

    /// Records a finished restore drill.
    pub fn insert_drill(&self, d: &DrillRecord) -> Result<()> {
        self.with_db(|db| db.insert_drill(d))
    }

    /// The newest drill of each backup that has one, by backup label.
    pub fn last_drills(&self) -> Result<Vec<DrillRecord>> {
        self.with_db(|db| db.last_drills())
    }

    /// Replaces every backup, file and WAL row, in one transaction; the identity stays. Used by
    /// `catalog rebuild`. Parents need not be present, so a damaged repository can still be
    /// indexed as it is.
    pub fn replace_all(
        &self,
        backups: &[(BackupRecord, Vec<FileRecord>)],
        wal: &[WalRecord],
    ) -> Result<()> {
        self.with_db(|db| db.replace_all(backups, wal))
    }

    /// Runs `f` with the connection to itself. A panic elsewhere while the lock was held cannot
    /// leave SQLite inconsistent (its transaction rolls back as it unwinds), so a poisoned lock
    /// is taken over.
    fn with_db<T>(&self, f: impl FnOnce(&Db<'_>) -> Result<T>) -> Result<T> {
        let conn = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&Db {
            conn: &conn,
            path: &self.path,
        })
    }
}

// Connection set-up.
impl Db<'_> {
    fn check_application_id(&self) -> Result<()> {
        let id: i32 = self
            .conn
            .pragma_query_value(None, "application_id", |row| row.get(0))
            .map_err(|e| match e.sqlite_error_code() {
                Some(ErrorCode::NotADatabase) => not_a_catalog(self.path, "not an SQLite database"),
                _ => self.fail(e, "reading the application id".into()),
            })?;
        if id != APPLICATION_ID {
            return Err(not_a_catalog(
                self.path,
                "an SQLite database that pgkeep did not create",
            ));
        }
        Ok(())
    }

    fn configure(&self) -> Result<()> {
        let mode: String = self
            .conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(|e| self.fail(e, "switching to write-ahead logging".into()))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(CatalogError::JournalMode {
                path: self.path.to_owned(),
                mode,
            });
        }
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(|e| self.fail(e, "setting synchronous = FULL".into()))?;
        self.conn
            .pragma_update(None, "foreign_keys", true)
            .map_err(|e| self.fail(e, "enabling foreign keys".into()))?;
        // 32 MiB of page cache instead of the default 2 MiB, so that recording a backup's file
        // list (about 15 MiB for 100k files) does not spill pages to disk mid-transaction. The
        // cache only grows as pages are used, so short-lived connections do not pay for it.
        self.conn
            .pragma_update(None, "cache_size", -32768)
            .map_err(|e| self.fail(e, "setting the cache size".into()))?;
        Ok(())
    }

    fn user_version(&self) -> Result<i64> {
        self.conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(|e| self.fail(e, "reading the schema version".into()))
    }

    /// Brings the schema up to [`SCHEMA_VERSION`]. The version is read again under the write
    /// lock, so two processes opening an old catalog at once migrate it once.
    fn migrate(&self) -> Result<()> {
        if self.user_version()? == i64::from(SCHEMA_VERSION) {
            return Ok(());
        }
        let tx = self.write_tx()?;
        let found = self.user_version()?;
        if found > i64::from(SCHEMA_VERSION) || found < 0 {
            return Err(CatalogError::SchemaTooNew {
                path: self.path.to_owned(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        self.apply_migrations(found as usize)?;
        self.commit(tx)
    }

    /// Runs the migrations after `from` inside the caller's transaction.
    fn apply_migrations(&self, from: usize) -> Result<()> {
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(from) {
            self.conn
                .execute_batch(sql)
                .map_err(|e| self.fail(e, format!("migrating to schema version {}", i + 1)))?;
        }
        self.conn
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(|e| self.fail(e, "setting the schema version".into()))
    }
}

// The operations behind the public methods, one call at a time.
impl Db<'_> {
    fn identity(&self) -> Result<RepoIdentity> {
        self.conn
            .query_row(
                "SELECT system_identifier, pg_major, block_size, wal_segment_size, \
                 blocks_per_segment FROM repo_identity WHERE id = 1",
                [],
                |row| {
                    Ok(RepoIdentity {
                        system_identifier: u64_col(row, 0)?,
                        pg_major: row.get(1)?,
                        block_size: row.get(2)?,
                        wal_segment_size: row.get(3)?,
                        blocks_per_segment: row.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.fail(e, "reading the repository identity".into()))?
            .ok_or_else(|| self.damaged("no repository identity".into()))
    }

    fn insert_backup(&self, b: &BackupRecord) -> Result<()> {
        let tx = self.write_tx()?;
        self.insert_backup_row(b)?;
        self.commit(tx)
    }

    fn update_backup(&self, b: &BackupRecord) -> Result<()> {
        let values = backup_values(b);
        let changed = self
            .conn
            .execute(
                "UPDATE backup SET backup_type = ?2, parent = ?4, timeline = ?5, \
                 start_lsn = ?6, stop_lsn = ?7, start_wal = ?8, stop_wal = ?9, start_time = ?10, \
                 end_time = ?11, recovery_time = ?12, data_bytes = ?13, stored_bytes = ?14, \
                 files = ?15, pg_version_num = ?16, system_identifier = ?17, block_size = ?18, \
                 data_checksums = ?19, pid = ?20, hostname = ?21, page_checksum_failures = ?22, \
                 error = ?23, from_standby = ?24 WHERE label = ?1",
                // Every column but `pinned`, the last.
                params_from_iter(values.into_iter().take(24)),
            )
            .map_err(|e| self.fail(e, format!("updating backup {}", b.label)))?;
        if changed == 0 {
            return Err(not_found(&b.label));
        }
        Ok(())
    }

    fn set_status(
        &self,
        label: &str,
        next: BackupStatus,
        error: Option<&str>,
    ) -> Result<BackupRecord> {
        let tx = self.write_tx()?;
        let mut b = self.load_backup(label)?.ok_or_else(|| not_found(label))?;
        if !b.status.can_become(next) {
            return Err(CatalogError::BadTransition {
                label: label.to_string(),
                from: b.status,
                to: next,
            });
        }
        self.conn
            .execute(
                "UPDATE backup SET status = ?2, error = ?3 WHERE label = ?1",
                params![label, next.as_str(), error],
            )
            .map_err(|e| self.fail(e, format!("setting the status of backup {label}")))?;
        self.commit(tx)?;
        b.status = next;
        b.error = error.map(str::to_string);
        Ok(b)
    }

    fn set_pin(&self, label: &str, pin: Option<Pin>) -> Result<BackupRecord> {
        let tx = self.write_tx()?;
        let mut b = self.load_backup(label)?.ok_or_else(|| not_found(label))?;
        self.conn
            .execute(
                "UPDATE backup SET pinned = ?2 WHERE label = ?1",
                params![label, pin.as_ref().map(pin_text)],
            )
            .map_err(|e| self.fail(e, format!("pinning backup {label}")))?;
        self.commit(tx)?;
        b.pinned = pin;
        Ok(b)
    }

    fn backup(&self, label: &str) -> Result<Option<BackupRecord>> {
        self.load_backup(label)
    }

    fn backups(&self) -> Result<Vec<BackupRecord>> {
        let mut backups = self.all_rows(
            &format!("SELECT {BACKUP_COLUMNS} FROM backup"),
            [],
            backup_from_row,
            || "listing backups".into(),
        )?;
        // Sorted here rather than in SQL so the order does not rest on the text form of times.
        backups.sort_by(|a, b| (a.start_time, &a.label).cmp(&(b.start_time, &b.label)));
        Ok(backups)
    }

    fn delete_backup(&self, label: &str) -> Result<()> {
        let tx = self.write_tx()?;
        let fail = |e| self.fail(e, format!("deleting backup {label}"));
        if self.load_backup(label)?.is_none() {
            return Err(not_found(label));
        }
        let child: Option<String> = self
            .conn
            .query_row(
                "SELECT label FROM backup WHERE parent = ?1 ORDER BY label LIMIT 1",
                [label],
                |row| row.get(0),
            )
            .optional()
            .map_err(fail)?;
        if let Some(child) = child {
            return Err(CatalogError::HasChildren {
                label: label.to_string(),
                child,
            });
        }
        self.conn
            .execute("DELETE FROM backup_file WHERE backup_label = ?1", [label])
            .map_err(fail)?;
        self.conn
            .execute("DELETE FROM backup WHERE label = ?1", [label])
            .map_err(fail)?;
        self.commit(tx)
    }

    fn insert_files(&self, label: &str, files: &[FileRecord]) -> Result<()> {
        let tx = self.write_tx()?;
        if self.load_backup(label)?.is_none() {
            return Err(not_found(label));
        }
        self.insert_file_rows(label, files)?;
        self.commit(tx)
    }

    fn files(&self, label: &str) -> Result<Vec<FileRecord>> {
        let action = || format!("reading the files of backup {label}");
        // One read transaction, so the existence check and the rows come from the same snapshot.
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(|e| self.fail(e, action()))?;
        if self.load_backup(label)?.is_none() {
            return Err(not_found(label));
        }
        let files = self.all_rows(
            &format!(
                "SELECT {FILE_COLUMNS} FROM backup_file WHERE backup_label = ?1 ORDER BY path"
            ),
            [label],
            file_from_row,
            action,
        )?;
        tx.finish().map_err(|e| self.fail(e, action()))?;
        Ok(files)
    }

    fn insert_wal(&self, w: &WalRecord) -> Result<WalInsert> {
        let tx = self.write_tx()?;
        if let Some(existing) = self.load_wal(&w.name)? {
            return Ok(WalInsert::AlreadyPresent(existing));
        }
        self.insert_wal_row(w)?;
        self.commit(tx)?;
        Ok(WalInsert::Inserted)
    }

    fn wal(&self, name: &str) -> Result<Option<WalRecord>> {
        self.load_wal(name)
    }

    fn wal_list(&self) -> Result<Vec<WalRecord>> {
        self.all_rows(
            &format!("SELECT {WAL_COLUMNS} FROM wal ORDER BY name"),
            [],
            wal_from_row,
            || "listing wal files".into(),
        )
    }

    fn delete_wal(&self, name: &str) -> Result<()> {
        let changed = self
            .conn
            .execute("DELETE FROM wal WHERE name = ?1", [name])
            .map_err(|e| self.fail(e, format!("deleting wal file {name}")))?;
        if changed == 0 {
            return Err(CatalogError::WalNotFound {
                name: name.to_string(),
            });
        }
        Ok(())
    }

    fn delete_wal_files(&self, names: &[String]) -> Result<usize> {
        let tx = self.write_tx()?;
        let fail = |e| self.fail(e, "deleting wal files".into());
        let mut stmt = self
            .conn
            .prepare_cached("DELETE FROM wal WHERE name = ?1")
            .map_err(fail)?;
        let mut n = 0;
        for name in names {
            n += stmt.execute([name]).map_err(fail)?;
        }
        drop(stmt);
        self.commit(tx)?;
        Ok(n)
    }

    fn insert_drill(&self, d: &DrillRecord) -> Result<()> {
        self.conn
            .execute(
                &format!(
                    "INSERT INTO drill ({DRILL_COLUMNS}) VALUES ({})",
                    placeholders(9)
                ),
                params![
                    d.backup_label,
                    time_text(&d.started_at),
                    d.status_str(),
                    d.restore_seconds,
                    d.recovery_seconds,
                    d.recovered_lsn.map(|l| l.0 as i64),
                    d.recovered_time.as_ref().map(time_text),
                    d.rpo_seconds,
                    d.message,
                ],
            )
            .map_err(|e| {
                self.fail(
                    e,
                    format!("recording the drill of backup {}", d.backup_label),
                )
            })?;
        Ok(())
    }

    fn last_drills(&self) -> Result<Vec<DrillRecord>> {
        // The newest row of each backup: the highest id, since rows are only ever appended.
        self.all_rows(
            &format!(
                "SELECT {DRILL_COLUMNS} FROM drill WHERE id IN \
                 (SELECT max(id) FROM drill GROUP BY backup_label) ORDER BY backup_label"
            ),
            [],
            drill_from_row,
            || "listing drills".into(),
        )
    }

    fn replace_all(
        &self,
        backups: &[(BackupRecord, Vec<FileRecord>)],
        wal: &[WalRecord],
    ) -> Result<()> {
        let tx = self.write_tx()?;
        self.conn
            .execute_batch("DELETE FROM backup_file; DELETE FROM backup; DELETE FROM wal;")
            .map_err(|e| self.fail(e, "emptying the catalog".into()))?;
        for (b, files) in backups {
            self.insert_backup_row(b)?;
            self.insert_file_rows(&b.label, files)?;
        }
        for w in wal {
            self.insert_wal_row(w)?;
        }
        self.commit(tx)
    }
}

// Row helpers; none starts a transaction, so they compose inside the callers' transactions.
impl Db<'_> {
    fn write_tx(&self) -> Result<Transaction<'_>> {
        Transaction::new_unchecked(self.conn, TransactionBehavior::Immediate)
            .map_err(|e| self.fail(e, "starting a write transaction".into()))
    }

    fn commit(&self, tx: Transaction<'_>) -> Result<()> {
        tx.commit()
            .map_err(|e| self.fail(e, "committing a transaction".into()))
    }

    fn fail(&self, source: rusqlite::Error, action: String) -> CatalogError {
        match source {
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::InvalidColumnType(..) => self.damaged(format!("{action}: {source}")),
            source => CatalogError::Sqlite {
                path: self.path.to_owned(),
                action,
                source,
            },
        }
    }

    fn damaged(&self, what: String) -> CatalogError {
        CatalogError::Damaged {
            path: self.path.to_owned(),
            what,
        }
    }

    /// Every row `sql` returns, mapped by `map`; `action` names the work in errors.
    fn all_rows<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        map: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
        action: impl Fn() -> String,
    ) -> Result<Vec<T>> {
        let fail = |e| self.fail(e, action());
        self.conn
            .prepare_cached(sql)
            .map_err(fail)?
            .query_map(params, map)
            .map_err(fail)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(fail)
    }

    fn load_backup(&self, label: &str) -> Result<Option<BackupRecord>> {
        let fail = |e| self.fail(e, format!("reading backup {label}"));
        self.conn
            .prepare_cached(&format!(
                "SELECT {BACKUP_COLUMNS} FROM backup WHERE label = ?1"
            ))
            .map_err(fail)?
            .query_row([label], backup_from_row)
            .optional()
            .map_err(fail)
    }

    fn insert_backup_row(&self, b: &BackupRecord) -> Result<()> {
        if self.load_backup(&b.label)?.is_some() {
            return Err(CatalogError::BackupExists {
                label: b.label.clone(),
            });
        }
        self.conn
            .execute(
                &format!(
                    "INSERT INTO backup ({BACKUP_COLUMNS}) VALUES ({})",
                    placeholders(25)
                ),
                params_from_iter(backup_values(b)),
            )
            .map_err(|e| self.fail(e, format!("recording backup {}", b.label)))?;
        Ok(())
    }

    fn insert_file_rows(&self, label: &str, files: &[FileRecord]) -> Result<()> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "INSERT INTO backup_file (backup_label, {FILE_COLUMNS}) VALUES ({})",
                placeholders(18)
            ))
            .map_err(|e| self.fail(e, format!("recording the files of backup {label}")))?;
        for f in files {
            stmt.execute(params![
                label,
                f.path,
                f.kind.as_str(),
                f.size as i64,
                f.mode,
                f.uid,
                f.gid,
                f.mtime,
                f.link_target,
                f.crc32c,
                f.sha256.as_ref().map(|h| h.as_slice()),
                f.stored_size as i64,
                f.stored_in,
                f.n_blocks.map(|n| n as i64),
                f.page_delta,
                f.bundle.map(|b| b.id),
                f.bundle.map(|b| b.offset as i64),
                f.bundle.map(|b| b.length as i64),
            ])
            .map_err(|e| {
                if is_unique_violation(&e) {
                    CatalogError::DuplicateFile {
                        label: label.to_string(),
                        path: f.path.clone(),
                    }
                } else {
                    self.fail(e, format!("recording file {} of backup {label}", f.path))
                }
            })?;
        }
        Ok(())
    }

    fn load_wal(&self, name: &str) -> Result<Option<WalRecord>> {
        let fail = |e| self.fail(e, format!("reading wal file {name}"));
        self.conn
            .prepare_cached(&format!("SELECT {WAL_COLUMNS} FROM wal WHERE name = ?1"))
            .map_err(fail)?
            .query_row([name], wal_from_row)
            .optional()
            .map_err(fail)
    }

    fn insert_wal_row(&self, w: &WalRecord) -> Result<()> {
        self.conn
            .prepare_cached(&format!(
                "INSERT INTO wal ({WAL_COLUMNS}) VALUES ({})",
                placeholders(9)
            ))
            .and_then(|mut stmt| {
                stmt.execute(params![
                    w.name,
                    w.kind.as_str(),
                    w.timeline,
                    w.segno.map(|n| n as i64),
                    w.size as i64,
                    w.crc32c,
                    w.sha256.as_slice(),
                    w.stored_size as i64,
                    time_text(&w.archived_at),
                ])
            })
            .map_err(|e| {
                if is_unique_violation(&e) {
                    self.damaged(format!("wal file {} is recorded twice", w.name))
                } else {
                    self.fail(e, format!("recording wal file {}", w.name))
                }
            })?;
        Ok(())
    }
}

/// Opens `file`, naming `path` in errors (they differ while a catalog is being created).
fn connect(file: &Path, path: &Path, flags: OpenFlags) -> Result<Connection> {
    let sqlite_err = |action: &str, source| CatalogError::Sqlite {
        path: path.to_owned(),
        action: action.to_string(),
        source,
    };
    let conn = Connection::open_with_flags(file, flags).map_err(|e| sqlite_err("opening", e))?;
    // First, so that everything after waits for other processes instead of failing.
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| sqlite_err("setting the busy timeout", e))?;
    Ok(conn)
}

/// Builds a complete catalog in `file`, naming `path` (its final name) in errors.
fn build(file: &Path, path: &Path, identity: &RepoIdentity) -> Result<()> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = connect(file, path, flags)?;
    let db = Db { conn: &conn, path };
    db.configure()?;
    let tx = db.write_tx()?;
    db.conn
        .pragma_update(None, "application_id", APPLICATION_ID)
        .map_err(|e| db.fail(e, "setting the application id".into()))?;
    db.apply_migrations(0)?;
    db.conn
        .execute(
            "INSERT INTO repo_identity (id, system_identifier, pg_major, block_size, \
             wal_segment_size, blocks_per_segment, created_at) VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                identity.system_identifier as i64,
                identity.pg_major,
                identity.block_size,
                identity.wal_segment_size,
                identity.blocks_per_segment,
                time_text(&Utc::now()),
            ],
        )
        .map_err(|e| db.fail(e, "recording the repository identity".into()))?;
    db.commit(tx)?;
    // Closing the last connection checkpoints the write-ahead log into the file and removes it,
    // so the file alone is the whole db.
    conn.close().map_err(|(_, e)| CatalogError::Sqlite {
        path: path.to_owned(),
        action: "closing the new catalog".into(),
        source: e,
    })?;
    File::open(file)
        .and_then(|f| f.sync_all())
        .map_err(|source| CatalogError::Io {
            action: "syncing new catalog",
            path: path.to_owned(),
            source,
        })
}

/// Puts the finished catalog `tmp` in place at `path` without ever replacing a file there.
fn publish(tmp: &Path, path: &Path) -> Result<()> {
    let io_err = |source| CatalogError::Io {
        action: "creating catalog",
        path: path.to_owned(),
        source,
    };
    match fs::hard_link(tmp, path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(CatalogError::AlreadyExists {
                path: path.to_owned(),
            })
        }
        // Some file systems have no hard links; a rename after a fresh check is nearly as good.
        Err(_) => {
            if path.symlink_metadata().is_ok() {
                return Err(CatalogError::AlreadyExists {
                    path: path.to_owned(),
                });
            }
            fs::rename(tmp, path).map_err(io_err)?;
        }
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)
}

/// `.<name>.creating-<pid>` beside `path`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.creating-{}", std::process::id()))
}

/// Removes an SQLite file and its companions, ignoring files that are not there.
fn remove_db_files(file: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = file.as_os_str().to_owned();
        name.push(suffix);
        let _ = fs::remove_file(PathBuf::from(name));
    }
}

fn not_a_catalog(path: &Path, reason: &str) -> CatalogError {
    CatalogError::NotACatalog {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn not_found(label: &str) -> CatalogError {
    CatalogError::BackupNotFound {
        label: label.to_string(),
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                || f.extended_code == ffi::SQLITE_CONSTRAINT_UNIQUE
    )
}

fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parameters ?1..?24 in [`BACKUP_COLUMNS`] order.
fn backup_values(b: &BackupRecord) -> [Value; 25] {
    [
        b.label.clone().into(),
        b.backup_type.as_str().to_string().into(),
        b.status.as_str().to_string().into(),
        b.parent.clone().into(),
        b.timeline.into(),
        (b.start_lsn.0 as i64).into(),
        b.stop_lsn.map(|l| l.0 as i64).into(),
        b.start_wal.clone().into(),
        b.stop_wal.clone().into(),
        time_text(&b.start_time).into(),
        b.end_time.as_ref().map(time_text).into(),
        b.recovery_time.as_ref().map(time_text).into(),
        (b.data_bytes as i64).into(),
        (b.stored_bytes as i64).into(),
        (b.files as i64).into(),
        b.pg_version_num.into(),
        (b.system_identifier as i64).into(),
        b.block_size.into(),
        b.data_checksums.into(),
        b.pid.into(),
        b.hostname.clone().into(),
        (b.page_checksum_failures as i64).into(),
        b.error.clone().into(),
        b.from_standby.into(),
        b.pinned.as_ref().map(pin_text).into(),
    ]
}

fn backup_from_row(row: &Row<'_>) -> rusqlite::Result<BackupRecord> {
    Ok(BackupRecord {
        label: row.get(0)?,
        backup_type: parsed_col(row, 1, |s| s.parse().ok())?,
        status: parsed_col(row, 2, |s| s.parse().ok())?,
        parent: row.get(3)?,
        timeline: row.get(4)?,
        start_lsn: Lsn(u64_col(row, 5)?),
        stop_lsn: row.get::<_, Option<i64>>(6)?.map(|v| Lsn(v as u64)),
        start_wal: row.get(7)?,
        stop_wal: row.get(8)?,
        start_time: parsed_col(row, 9, parse_time)?,
        end_time: opt_parsed_col(row, 10, parse_time)?,
        recovery_time: opt_parsed_col(row, 11, parse_time)?,
        data_bytes: u64_col(row, 12)?,
        stored_bytes: u64_col(row, 13)?,
        files: u64_col(row, 14)?,
        pg_version_num: row.get(15)?,
        system_identifier: u64_col(row, 16)?,
        block_size: row.get(17)?,
        data_checksums: row.get(18)?,
        pid: row.get(19)?,
        hostname: row.get(20)?,
        page_checksum_failures: u64_col(row, 21)?,
        error: row.get(22)?,
        from_standby: row.get(23)?,
        pinned: opt_parsed_col(row, 24, parse_pin)?,
    })
}

fn drill_from_row(row: &Row<'_>) -> rusqlite::Result<DrillRecord> {
    Ok(DrillRecord {
        backup_label: row.get(0)?,
        started_at: parsed_col(row, 1, parse_time)?,
        passed: parsed_col(row, 2, |s| match s {
            "passed" => Some(true),
            "failed" => Some(false),
            _ => None,
        })?,
        restore_seconds: row.get(3)?,
        recovery_seconds: row.get(4)?,
        recovered_lsn: row.get::<_, Option<i64>>(5)?.map(|v| Lsn(v as u64)),
        recovered_time: opt_parsed_col(row, 6, parse_time)?,
        rpo_seconds: row.get(7)?,
        message: row.get(8)?,
    })
}

fn file_from_row(row: &Row<'_>) -> rusqlite::Result<FileRecord> {
    Ok(FileRecord {
        path: row.get(0)?,
        kind: parsed_col(row, 1, |s| s.parse().ok())?,
        size: u64_col(row, 2)?,
        mode: row.get(3)?,
        uid: row.get(4)?,
        gid: row.get(5)?,
        mtime: row.get(6)?,
        link_target: row.get(7)?,
        crc32c: row.get(8)?,
        sha256: row
            .get::<_, Option<Vec<u8>>>(9)?
            .map(|v| sha256_from(9, v))
            .transpose()?,
        stored_size: u64_col(row, 10)?,
        stored_in: row.get(11)?,
        n_blocks: row.get::<_, Option<i64>>(12)?.map(|v| v as u64),
        page_delta: row.get(13)?,
        bundle: match (
            row.get::<_, Option<u32>>(14)?,
            row.get::<_, Option<i64>>(15)?,
            row.get::<_, Option<i64>>(16)?,
        ) {
            (Some(id), Some(offset), Some(length)) => Some(Bundled {
                id,
                offset: offset as u64,
                length: length as u64,
            }),
            _ => None,
        },
    })
}

fn wal_from_row(row: &Row<'_>) -> rusqlite::Result<WalRecord> {
    Ok(WalRecord {
        name: row.get(0)?,
        kind: parsed_col(row, 1, |s| s.parse().ok())?,
        timeline: row.get(2)?,
        segno: row.get::<_, Option<i64>>(3)?.map(|v| v as u64),
        size: u64_col(row, 4)?,
        crc32c: row.get(5)?,
        sha256: sha256_from(6, row.get(6)?)?,
        stored_size: u64_col(row, 7)?,
        archived_at: parsed_col(row, 8, parse_time)?,
    })
}

/// A u64 stored bit-cast as i64 (see the schema's notes).
fn u64_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    Ok(row.get::<_, i64>(idx)? as u64)
}

/// A text column parsed by `parse`; a value it refuses is a conversion error naming the value.
fn parsed_col<T>(
    row: &Row<'_>,
    idx: usize,
    parse: impl FnOnce(&str) -> Option<T>,
) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    parse(&text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            Type::Text,
            format!("unexpected value {text:?}").into(),
        )
    })
}

fn opt_parsed_col<T>(
    row: &Row<'_>,
    idx: usize,
    parse: impl FnOnce(&str) -> Option<T>,
) -> rusqlite::Result<Option<T>> {
    match row.get_ref(idx)? {
        rusqlite::types::ValueRef::Null => Ok(None),
        _ => parsed_col(row, idx, parse).map(Some),
    }
}

fn sha256_from(idx: usize, bytes: Vec<u8>) -> rusqlite::Result<[u8; 32]> {
    let len = bytes.len();
    bytes.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            Type::Blob,
            format!("sha256 of {len} bytes").into(),
        )
    })
}
