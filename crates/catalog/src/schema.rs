//! The catalog's SQL schema and its migrations.
//!
//! The schema version lives in `PRAGMA user_version`; `PRAGMA application_id` marks the file as a
//! pgkeep catalog. `MIGRATIONS[i]` takes a catalog from version `i` to `i + 1`. To add a version,
//! append its SQL to `MIGRATIONS`; never edit an entry that has been released.
//!
//! Unsigned 64-bit values (system identifier, LSNs, byte counts) are stored in INTEGER columns as
//! the same 64 bits read as a signed integer (`u64 as i64`, back with `i64 as u64`). The round trip
//! is exact and the columns stay compact and indexable; the price is that the `sqlite3` shell shows
//! values of 2^63 and above, in practice only some system identifiers, as negative numbers, and SQL
//! comparisons on such values are not meaningful. Times are RFC 3339 UTC text with microseconds
//! (`2026-11-21T10:15:00.123456Z`), which sorts like the time. SHA-256 digests are 32-byte blobs.

/// Schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// `PRAGMA application_id` of a pgkeep catalog: "PGKP" in ASCII.
pub(crate) const APPLICATION_ID: i32 = 0x5047_4B50;

/// SQL that takes the schema from version `i` to `i + 1`.
pub(crate) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5];

const V1: &str = "
CREATE TABLE repo_identity (
    id                  INTEGER PRIMARY KEY CHECK (id = 1),
    system_identifier   INTEGER NOT NULL,
    pg_major            INTEGER NOT NULL,
    block_size          INTEGER NOT NULL,
    wal_segment_size    INTEGER NOT NULL,
    blocks_per_segment  INTEGER NOT NULL,
    created_at          TEXT NOT NULL
);

CREATE TABLE backup (
    label                   TEXT PRIMARY KEY NOT NULL,
    backup_type             TEXT NOT NULL CHECK (backup_type IN ('full', 'diff', 'incr')),
    status                  TEXT NOT NULL
        CHECK (status IN ('RUNNING', 'DONE', 'OK', 'ERROR', 'CORRUPT', 'DELETING')),
    parent                  TEXT,
    timeline                INTEGER NOT NULL,
    start_lsn               INTEGER NOT NULL,
    stop_lsn                INTEGER,
    start_wal               TEXT NOT NULL,
    stop_wal                TEXT,
    start_time              TEXT NOT NULL,
    end_time                TEXT,
    recovery_time           TEXT,
    data_bytes              INTEGER NOT NULL,
    stored_bytes            INTEGER NOT NULL,
    files                   INTEGER NOT NULL,
    pg_version_num          INTEGER NOT NULL,
    system_identifier       INTEGER NOT NULL,
    block_size              INTEGER NOT NULL,
    data_checksums          INTEGER NOT NULL CHECK (data_checksums IN (0, 1)),
    pid                     INTEGER NOT NULL,
    hostname                TEXT NOT NULL,
    page_checksum_failures  INTEGER NOT NULL,
    error                   TEXT
);
CREATE INDEX backup_parent ON backup (parent);

CREATE TABLE backup_file (
    backup_label  TEXT NOT NULL REFERENCES backup (label) ON DELETE CASCADE,
    path          TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('file', 'dir', 'symlink')),
    size          INTEGER NOT NULL,
    mode          INTEGER NOT NULL,
    uid           INTEGER NOT NULL,
    gid           INTEGER NOT NULL,
    mtime         INTEGER NOT NULL,
    link_target   TEXT,
    crc32c        INTEGER,
    sha256        BLOB CHECK (sha256 IS NULL OR length(sha256) = 32),
    stored_size   INTEGER NOT NULL,
    stored_in     TEXT,
    n_blocks      INTEGER,
    page_delta    INTEGER NOT NULL CHECK (page_delta IN (0, 1)),
    PRIMARY KEY (backup_label, path)
) WITHOUT ROWID;

CREATE TABLE wal (
    name         TEXT PRIMARY KEY NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('segment', 'partial', 'backup', 'history')),
    timeline     INTEGER NOT NULL,
    segno        INTEGER,
    size         INTEGER NOT NULL,
    crc32c       INTEGER NOT NULL,
    sha256       BLOB NOT NULL CHECK (length(sha256) = 32),
    stored_size  INTEGER NOT NULL,
    archived_at  TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX wal_timeline_segno ON wal (timeline, segno);
";

/// Whether a backup was taken from a standby. Backups made before this column existed were all
/// taken from a primary, hence the default.
const V2: &str = "
ALTER TABLE backup ADD COLUMN from_standby INTEGER NOT NULL DEFAULT 0
    CHECK (from_standby IN (0, 1));
";

/// Pinned backups (`pgkeep pin`): NULL when not pinned, `forever`, or the RFC 3339 UTC time the
/// pin ends.
const V3: &str = "
ALTER TABLE backup ADD COLUMN pinned TEXT
    CHECK (pinned IS NULL OR pinned = 'forever' OR pinned GLOB '[0-9][0-9][0-9][0-9]-*');
";

/// Restore drills (`pgkeep drill`): one row per drill, kept when its backup is deleted so the
/// history of drills stays readable. No foreign key, for that reason.
const V4: &str = "
CREATE TABLE drill (
    id                INTEGER PRIMARY KEY,
    backup_label      TEXT NOT NULL,
    started_at        TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('passed', 'failed')),
    restore_seconds   REAL,
    recovery_seconds  REAL,
    recovered_lsn     INTEGER,
    recovered_time    TEXT,
    rpo_seconds       REAL,
    message           TEXT
);
CREATE INDEX drill_backup ON drill (backup_label, started_at);
";

/// Files stored inside a bundle object (`backup/<label>/bundle/<id>`) rather than an object of
/// their own: the bundle's number and the byte range of the file's lz4 frame in it. All three
/// are NULL for a file with an object of its own.
const V5: &str = "
ALTER TABLE backup_file ADD COLUMN bundle_id INTEGER;
ALTER TABLE backup_file ADD COLUMN bundle_offset INTEGER;
ALTER TABLE backup_file ADD COLUMN bundle_length INTEGER;
";
