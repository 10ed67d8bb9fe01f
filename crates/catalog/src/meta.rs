//! Text formats of the per-backup metadata files kept in the repository beside the data, so the
//! catalog can be rebuilt from the repository alone.
//!
//! `backup.ini` describes one backup ([`BackupRecord`]) in pg_rman-like `KEY=VALUE` lines;
//! `manifest` lists its files ([`FileRecord`]), one tab-separated line each. Both are UTF-8 text
//! whose free-text values are escaped so that any string round-trips: `\` is written `\\`, tab
//! `\t`, newline `\n`, carriage return `\r` and other ASCII control characters `\xHH`. Readers
//! accept `\r\n` line ends. Errors name the file and the line.

use std::collections::HashMap;

use crate::text::{escape, parse_pin, parse_time, pin_text, time_text, unescape, NULL};
use crate::{BackupRecord, Bundled, CatalogError, FileRecord, Result};

/// Name of the backup description file in a backup's repository directory.
pub const BACKUP_INI_FILE: &str = "backup.ini";
/// Name of the file list in a backup's repository directory.
pub const MANIFEST_FILE: &str = "manifest";

/// First line of `backup.ini`.
const INI_HEADER: &str = "# pgkeep backup metadata, format 1";

/// Keys of `backup.ini` in the order they are written.
const INI_KEYS: [&str; 25] = [
    "LABEL",
    "BACKUP_TYPE",
    "STATUS",
    "PARENT",
    "TIMELINE",
    "START_LSN",
    "STOP_LSN",
    "START_WAL",
    "STOP_WAL",
    "START_TIME",
    "END_TIME",
    "RECOVERY_TIME",
    "DATA_BYTES",
    "STORED_BYTES",
    "FILES",
    "PG_VERSION_NUM",
    "SYSTEM_IDENTIFIER",
    "BLOCK_SIZE",
    "DATA_CHECKSUMS",
    "PID",
    "HOSTNAME",
    "PAGE_CHECKSUM_FAILURES",
    "ERROR",
    "FROM_STANDBY",
    "PINNED",
];

/// `backup.ini`: a comment line, then one `KEY=VALUE` line per [`BackupRecord`] field in a fixed
/// order, e.g. `BACKUP_TYPE=full`, `STATUS=DONE`, `START_LSN=0/2000028`,
/// `START_TIME=2026-11-21T10:15:00.123456Z`. Keys are the field names in UPPER_SNAKE case
/// (`backup_type` is `BACKUP_TYPE`). Absent optional values are written empty (`PARENT=`), so an
/// optional text field that is `Some("")` reads back as None. Numbers are decimal, LSNs `X/X`,
/// times RFC 3339 UTC with microseconds, `DATA_CHECKSUMS` and `FROM_STANDBY` are `true` or
/// `false` (a missing `FROM_STANDBY` reads as `false`). `PINNED` (`forever` or the time the pin
/// ends) is written only for a pinned backup, so the `backup.ini` of every other backup stays
/// readable by a pgkeep that predates pins.
pub fn backup_ini(b: &BackupRecord) -> String {
    let opt = |v: &Option<String>| v.as_deref().map(escape).unwrap_or_default();
    let values: [String; 25] = [
        escape(&b.label),
        b.backup_type.to_string(),
        b.status.to_string(),
        opt(&b.parent),
        b.timeline.to_string(),
        b.start_lsn.to_string(),
        b.stop_lsn.map(|l| l.to_string()).unwrap_or_default(),
        escape(&b.start_wal),
        opt(&b.stop_wal),
        time_text(&b.start_time),
        b.end_time.as_ref().map(time_text).unwrap_or_default(),
        b.recovery_time.as_ref().map(time_text).unwrap_or_default(),
        b.data_bytes.to_string(),
        b.stored_bytes.to_string(),
        b.files.to_string(),
        b.pg_version_num.to_string(),
        b.system_identifier.to_string(),
        b.block_size.to_string(),
        b.data_checksums.to_string(),
        b.pid.to_string(),
        escape(&b.hostname),
        b.page_checksum_failures.to_string(),
        opt(&b.error),
        b.from_standby.to_string(),
        b.pinned.as_ref().map(pin_text).unwrap_or_default(),
    ];
    let mut out = String::with_capacity(1024);
    out.push_str(INI_HEADER);
    out.push('\n');
    for (key, value) in INI_KEYS.iter().zip(values) {
        if *key == "PINNED" && value.is_empty() {
            continue;
        }
        out.push_str(key);
        out.push('=');
        out.push_str(&value);
        out.push('\n');
    }
    out
}

/// Reads a `backup.ini`. Blank lines and lines starting with `#` are skipped; every key must be
/// known and appear at most once; optional keys may be omitted or empty. Free-text values (label,
/// parent, WAL names, hostname, error) are taken verbatim after the `=`; other values may carry
/// surrounding blanks.
pub fn parse_backup_ini(text: &str) -> Result<BackupRecord> {
    let ini = Ini::parse(text)?;
    let label = ini.text("LABEL")?;
    if label.is_empty() {
        return Err(ini.invalid("LABEL", "a backup label"));
    }
    Ok(BackupRecord {
        label,
        backup_type: ini.parsed("BACKUP_TYPE", "full, diff or incr", |s| s.parse().ok())?,
        status: ini.parsed("STATUS", "a backup status", |s| s.parse().ok())?,
        parent: ini.opt_text("PARENT"),
        timeline: ini.parsed("TIMELINE", "a timeline number", |s| s.parse().ok())?,
        start_lsn: ini.parsed("START_LSN", "an LSN like 0/2000028", |s| s.parse().ok())?,
        stop_lsn: ini.opt_parsed("STOP_LSN", "an LSN like 0/2000028", |s| s.parse().ok())?,
        start_wal: ini.text("START_WAL")?,
        stop_wal: ini.opt_text("STOP_WAL"),
        start_time: ini.parsed("START_TIME", "an RFC 3339 time", parse_time)?,
        end_time: ini.opt_parsed("END_TIME", "an RFC 3339 time", parse_time)?,
        recovery_time: ini.opt_parsed("RECOVERY_TIME", "an RFC 3339 time", parse_time)?,
        data_bytes: ini.parsed("DATA_BYTES", "a byte count", |s| s.parse().ok())?,
        stored_bytes: ini.parsed("STORED_BYTES", "a byte count", |s| s.parse().ok())?,
        files: ini.parsed("FILES", "a file count", |s| s.parse().ok())?,
        pg_version_num: ini.parsed("PG_VERSION_NUM", "a version number", |s| s.parse().ok())?,
        system_identifier: ini.parsed("SYSTEM_IDENTIFIER", "a system identifier", |s| {
            s.parse().ok()
        })?,
        block_size: ini.parsed("BLOCK_SIZE", "a size in bytes", |s| s.parse().ok())?,
        data_checksums: ini.parsed("DATA_CHECKSUMS", "true or false", |s| s.parse().ok())?,
        pid: ini.parsed("PID", "a process id", |s| s.parse().ok())?,
        hostname: ini.text("HOSTNAME")?,
        page_checksum_failures: ini
            .parsed("PAGE_CHECKSUM_FAILURES", "a page count", |s| s.parse().ok())?,
        error: ini.opt_text("ERROR"),
        // Absent from the backup.ini of backups made before standbys could be backed up.
        from_standby: ini
            .opt_parsed("FROM_STANDBY", "true or false", |s| s.parse().ok())?
            .unwrap_or(false),
        pinned: ini.opt_parsed("PINNED", "forever or an RFC 3339 time", parse_pin)?,
    })
}

/// First line of `manifest`: names the format and its version. Format 1 (written before files
/// could be bundled) lacks the last column and is still read.
const MANIFEST_HEADER: &str = "pgkeep manifest 2";
const MANIFEST_HEADER_V1: &str = "pgkeep manifest 1";

/// Second line of `manifest`: the columns, in order.
const MANIFEST_COLUMNS: &str = "# path\tkind\tsize\tmode\tuid\tgid\tmtime\tlink_target\tcrc32c\
     \tsha256\tstored_size\tstored_in\tn_blocks\tpage_delta\tbundle";
const MANIFEST_COLUMNS_V1: &str = "# path\tkind\tsize\tmode\tuid\tgid\tmtime\tlink_target\tcrc32c\
     \tsha256\tstored_size\tstored_in\tn_blocks\tpage_delta";

/// Number of fields on a `manifest` line.
const MANIFEST_FIELDS: usize = 15;

/// `manifest`: the header line `pgkeep manifest 2`, a comment line naming the columns, then one
/// line per file in the order given, with these tab-separated fields:
///
/// | # | field         | form                                                           |
/// |---|---------------|----------------------------------------------------------------|
/// | 1 | `path`        | escaped text                                                   |
/// | 2 | `kind`        | `file`, `dir` or `symlink`                                     |
/// | 3 | `size`        | decimal                                                        |
/// | 4 | `mode`        | octal, e.g. `0600` or `100600`                                 |
/// | 5 | `uid`         | decimal                                                        |
/// | 6 | `gid`         | decimal                                                        |
/// | 7 | `mtime`       | decimal seconds since the epoch, may be negative               |
/// | 8 | `link_target` | escaped text or `\N`                                           |
/// | 9 | `crc32c`      | 8 lower-case hex digits or `\N`                                |
/// | 10| `sha256`      | 64 lower-case hex digits or `\N`                               |
/// | 11| `stored_size` | decimal                                                        |
/// | 12| `stored_in`   | escaped text or `\N`                                           |
/// | 13| `n_blocks`    | decimal or `\N`                                                |
/// | 14| `page_delta`  | `0` or `1`                                                     |
/// | 15| `bundle`      | `<id>:<offset>:<length>` (decimal) or `\N`                     |
///
/// `\N` (as in PostgreSQL's COPY) stands for an absent value; an escaped text never reads `\N`
/// since every backslash in it is doubled, so `Some("")` and None stay apart.
pub fn manifest(files: &[FileRecord]) -> String {
    let opt_text = |v: &Option<String>| v.as_deref().map_or_else(|| NULL.to_string(), escape);
    let mut out = String::with_capacity(64 + files.len() * 160);
    out.push_str(MANIFEST_HEADER);
    out.push('\n');
    out.push_str(MANIFEST_COLUMNS);
    out.push('\n');
    for f in files {
        let fields: [String; MANIFEST_FIELDS] = [
            escape(&f.path),
            f.kind.to_string(),
            f.size.to_string(),
            format!("{:04o}", f.mode),
            f.uid.to_string(),
            f.gid.to_string(),
            f.mtime.to_string(),
            opt_text(&f.link_target),
            f.crc32c
                .map_or_else(|| NULL.to_string(), |c| format!("{c:08x}")),
            f.sha256.map_or_else(|| NULL.to_string(), hex::encode),
            f.stored_size.to_string(),
            opt_text(&f.stored_in),
            f.n_blocks
                .map_or_else(|| NULL.to_string(), |n| n.to_string()),
            u8::from(f.page_delta).to_string(),
            f.bundle.map_or_else(
                || NULL.to_string(),
                |b| format!("{}:{}:{}", b.id, b.offset, b.length),
            ),
        ];
        out.push_str(&fields.join("\t"));
        out.push('\n');
    }
    out
}

/// Reads a `manifest`, returning the files in file order. Blank lines are skipped.
pub fn parse_manifest(text: &str) -> Result<Vec<FileRecord>> {
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let header = lines.next().unwrap_or_default();
    let (columns, v1) = match header {
        MANIFEST_HEADER => (MANIFEST_COLUMNS, false),
        MANIFEST_HEADER_V1 => (MANIFEST_COLUMNS_V1, true),
        _ => {
            let message = match header.strip_prefix("pgkeep manifest ") {
                Some(version) => format!(
                    "manifest format {version:?} is not supported, this pgkeep reads formats 1 and 2"
                ),
                None => format!("expected the header {MANIFEST_HEADER:?}, found {header:?}"),
            };
            return Err(manifest_error(1, message));
        }
    };
    if lines.next() != Some(columns) {
        return Err(manifest_error(2, "expected the column list".into()));
    }
    let mut files = Vec::new();
    for (i, line) in lines.enumerate() {
        if !line.is_empty() {
            // Format 1 lines end before the bundle column: the file has an object of its own.
            let line = match v1 {
                true => std::borrow::Cow::Owned(format!("{line}\t{NULL}")),
                false => std::borrow::Cow::Borrowed(line),
            };
            files.push(parse_manifest_line(&line).map_err(|m| manifest_error(i + 3, m))?);
        }
    }
    Ok(files)
}

fn parse_manifest_line(line: &str) -> std::result::Result<FileRecord, String> {
    let fields: Vec<&str> = line.split('\t').collect();
    let [path, kind, size, mode, uid, gid, mtime, link_target, crc32c, sha256, stored_size, stored_in, n_blocks, page_delta, bundle] =
        fields[..]
    else {
        return Err(format!(
            "expected {MANIFEST_FIELDS} tab-separated fields, found {}",
            fields.len()
        ));
    };
    Ok(FileRecord {
        path: unescape(path)?,
        kind: kind.parse().map_err(|e: CatalogError| e.to_string())?,
        size: field("size", size, |s| s.parse().ok())?,
        mode: field("mode", mode, |s| u32::from_str_radix(s, 8).ok())?,
        uid: field("uid", uid, |s| s.parse().ok())?,
        gid: field("gid", gid, |s| s.parse().ok())?,
        mtime: field("mtime", mtime, |s| s.parse().ok())?,
        link_target: opt_field(link_target, |s| unescape(s).ok())
            .ok_or_else(|| format!("bad escape in link_target {link_target:?}"))?,
        crc32c: opt_field(crc32c, |s| {
            hex_digits(s, 8).and_then(|_| u32::from_str_radix(s, 16).ok())
        })
        .ok_or_else(|| format!("invalid crc32c {crc32c:?}"))?,
        sha256: opt_field(sha256, |s| {
            let mut digest = [0u8; 32];
            hex::decode_to_slice(s, &mut digest).ok().map(|()| digest)
        })
        .ok_or_else(|| format!("invalid sha256 {sha256:?}"))?,
        stored_size: field("stored_size", stored_size, |s| s.parse().ok())?,
        stored_in: opt_field(stored_in, |s| unescape(s).ok())
            .ok_or_else(|| format!("bad escape in stored_in {stored_in:?}"))?,
        n_blocks: opt_field(n_blocks, |s| s.parse().ok())
            .ok_or_else(|| format!("invalid n_blocks {n_blocks:?}"))?,
        page_delta: match page_delta {
            "0" => false,
            "1" => true,
            other => return Err(format!("invalid page_delta {other:?}, expected 0 or 1")),
        },
        bundle: opt_field(bundle, parse_bundled)
            .ok_or_else(|| format!("invalid bundle {bundle:?}, expected <id>:<offset>:<length>"))?,
    })
}

fn parse_bundled(s: &str) -> Option<Bundled> {
    let mut parts = s.split(':');
    let b = Bundled {
        id: parts.next()?.parse().ok()?,
        offset: parts.next()?.parse().ok()?,
        length: parts.next()?.parse().ok()?,
    };
    parts.next().is_none().then_some(b)
}

/// A required manifest field; `parse` returns None for a bad value.
fn field<T>(
    name: &str,
    value: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> std::result::Result<T, String> {
    parse(value).ok_or_else(|| format!("invalid {name} {value:?}"))
}

/// An optional manifest field: Some(None) for `\N`, None for a bad value.
fn opt_field<T>(value: &str, parse: impl FnOnce(&str) -> Option<T>) -> Option<Option<T>> {
    if value == NULL {
        Some(None)
    } else {
        parse(value).map(Some)
    }
}

/// Some(()) when `s` is exactly `n` hex digits (`from_str_radix` alone would accept a sign).
fn hex_digits(s: &str, n: usize) -> Option<()> {
    (s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit())).then_some(())
}

fn manifest_error(line: usize, message: String) -> CatalogError {
    CatalogError::Meta {
        file: MANIFEST_FILE,
        line: Some(line),
        message,
    }
}

/// The values of a `backup.ini`, by key, with the line each came from.
struct Ini {
    values: HashMap<&'static str, (usize, String)>,
}

impl Ini {
    fn parse(text: &str) -> Result<Self> {
        let mut values = HashMap::new();
        for (i, line) in text.split('\n').enumerate() {
            let n = i + 1;
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(ini_error(
                    Some(n),
                    format!("expected KEY=VALUE, found {line:?}"),
                ));
            };
            let key = key.trim();
            let Some(&known) = INI_KEYS.iter().find(|k| **k == key) else {
                return Err(ini_error(Some(n), format!("unknown key {key:?}")));
            };
            let value = unescape(value).map_err(|m| ini_error(Some(n), format!("{key}: {m}")))?;
            if let Some((first, _)) = values.insert(known, (n, value)) {
                return Err(ini_error(
                    Some(n),
                    format!("{key} given again, first on line {first}"),
                ));
            }
        }
        Ok(Ini { values })
    }

    /// A required value, verbatim.
    fn text(&self, key: &'static str) -> Result<String> {
        match self.values.get(key) {
            Some((_, v)) => Ok(v.clone()),
            None => Err(ini_error(None, format!("missing key {key}"))),
        }
    }

    /// An optional value, verbatim; empty is None.
    fn opt_text(&self, key: &'static str) -> Option<String> {
        self.values
            .get(key)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    }

    /// A required value parsed by `parse`; `expected` says what it should look like.
    fn parsed<T>(
        &self,
        key: &'static str,
        expected: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<T> {
        match self.opt_parsed(key, expected, parse)? {
            Some(v) => Ok(v),
            None if self.values.contains_key(key) => Err(self.invalid(key, expected)),
            None => Err(ini_error(None, format!("missing key {key}"))),
        }
    }

    /// An optional value parsed by `parse`; missing or empty is None.
    fn opt_parsed<T>(
        &self,
        key: &'static str,
        expected: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>> {
        let Some((_, value)) = self.values.get(key) else {
            return Ok(None);
        };
        let value = value.trim();
        if value.is_empty() {
            return Ok(None);
        }
        parse(value)
            .map(Some)
            .ok_or_else(|| self.invalid(key, expected))
    }

    fn invalid(&self, key: &'static str, expected: &str) -> CatalogError {
        let (line, value) = self
            .values
            .get(key)
            .map(|(n, v)| (Some(*n), v.as_str()))
            .unwrap_or((None, ""));
        ini_error(
            line,
            format!("invalid {key} {value:?}, expected {expected}"),
        )
    }
}

fn ini_error(line: Option<usize>, message: String) -> CatalogError {
    CatalogError::Meta {
        file: BACKUP_INI_FILE,
        line,
        message,
    }
}
