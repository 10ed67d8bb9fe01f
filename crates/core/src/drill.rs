//! `pgkeep drill`: restore a backup into a private sandbox, start a server there, replay the
//! archive, check every page and table, and report how long it took (RTO) and how much a real
//! restore would lose (RPO).
//!
//! The sandbox is a value ([`Sandbox`]): its `Drop` stops the server (immediate shutdown) and
//! removes the directory, so no error path leaves a postmaster running or a restored copy
//! behind. The sandbox server is private: its own directory for data, tablespaces, socket and
//! log, no TCP listener, `archive_mode = off` and every command that could write elsewhere
//! cleared; only `restore_command` (pgkeep archive-get, which reads the repository) stays.
//!
//! What the backup or the archive makes fail (restore, recovery, a check) is a drill that
//! failed, recorded in the catalog; what stops a drill from being made at all (no backup, no
//! server programs of the backup's major, no room for a sandbox) is an error.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, NaiveDateTime, Utc};
pub use pgkeep_catalog::DrillRecord;
use pgkeep_catalog::{BackupRecord, FileKind};
use pgkeep_pg::{parse_relation_path, verify_page, Lsn, PageVerdict};
use serde_json::{json, Value};

use crate::backup::read_full;
use crate::config::Config;
use crate::entries::tablespace_oid;
use crate::parallel;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::restore::{
    choose_backup, conf_string, restore, RecoveryTarget, RestoreOptions, TargetAction,
};
use crate::show::rfc3339 as time_text;
use crate::user;
use crate::walk::walk;

/// Validated drill options.
#[derive(Clone, Debug, Default)]
pub struct DrillOptions {
    /// Backup to restore; None = the newest one restore would choose.
    pub backup: Option<String>,
    /// Recover to this time instead of the end of the archive.
    pub target_time: Option<DateTime<Utc>>,
    /// Parallel restore writers and page readers.
    pub jobs: Option<usize>,
    /// Leave the sandbox (stopped) in place and report its path.
    pub keep: bool,
}

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckResult {
    Passed,
    Failed,
    /// The check could not be made here (the detail says why); it does not fail the drill.
    Skipped,
}

impl CheckResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckResult::Passed => "passed",
            CheckResult::Failed => "failed",
            CheckResult::Skipped => "skipped",
        }
    }
}

/// One check made on the recovered sandbox.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub outcome: CheckResult,
    /// What was checked, or the first thing found wrong, on one line.
    pub detail: String,
}

/// The rows of one table of the recovered sandbox.
#[derive(Clone, Debug)]
pub struct TableRows {
    pub database: String,
    pub schema: String,
    pub table: String,
    pub rows: i64,
}

/// What a drill did and found.
#[derive(Debug)]
pub struct DrillReport {
    /// As recorded in the catalog: backup, times, point reached, result and message.
    pub record: DrillRecord,
    /// Which backup restore chose and why.
    pub choice: String,
    pub checks: Vec<Check>,
    pub tables: Vec<TableRows>,
    /// The sandbox left in place with `--keep`.
    pub kept: Option<PathBuf>,
}

/// Names of the checks, in the order their failures are reported: damage to pages first, as
/// the most specific finding, then what the server itself noticed.
const PAGE_CHECKSUMS: &str = "page checksums";
const AMCHECK: &str = "amcheck";
const DATABASES: &str = "databases";
const TABLES: &str = "tables";
const FAILURE_ORDER: [&str; 4] = [PAGE_CHECKSUMS, AMCHECK, DATABASES, TABLES];

/// Restore, start, recover, check, clean up; the drill is recorded in the catalog whatever its
/// result. `Err` only when no drill could be made.
pub fn drill(cfg: &Config, opts: &DrillOptions, progress: &dyn Progress) -> Result<DrillReport> {
    if user::is_root() {
        bail!("drill cannot run as root: PostgreSQL refuses to start as root; run it as the cluster's owner (e.g. `sudo -u postgres pgkeep drill`)");
    }
    let started_at = Utc::now();
    let repo = Repo::open(cfg)?;
    let mut restore_opts = RestoreOptions {
        pgdata: PathBuf::new(),
        backup: opts.backup.clone(),
        target: opts
            .target_time
            .map_or(RecoveryTarget::EndOfArchive, RecoveryTarget::Time),
        action: TargetAction::Promote,
        timeline: None,
        delta: false,
        jobs: opts.jobs,
        tablespace_map: BTreeMap::new(),
        waldir: None,
        standby: None,
        repo: Some(cfg.repo.number),
    };
    let choice = choose_backup(&repo, &restore_opts)?;
    let backup = choice.backup.clone();
    let bin = server_programs(cfg, backup.pg_version_num / 10000)?;
    let mut sandbox = Sandbox::create(cfg, bin, opts.keep)?;
    // Restore exactly the backup chosen here, with every tablespace inside the sandbox (the
    // recorded locations are most likely the live cluster's) and pg_wal a plain directory.
    restore_opts.backup = Some(backup.label.clone());
    restore_opts.pgdata = sandbox.data();
    for f in repo.catalog.files(&backup.label)? {
        if let Some(oid) = tablespace_oid(&f.path).filter(|_| f.kind == FileKind::Symlink) {
            restore_opts
                .tablespace_map
                .insert(oid, sandbox.tablespace(oid));
        }
    }
    progress.message(&format!(
        "drill: restoring backup {} into {}",
        backup.label,
        sandbox.path().display()
    ));
    let mut run = Run {
        cfg,
        backup: &backup,
        blocks_per_segment: repo.identity.blocks_per_segment,
        jobs: opts
            .jobs
            .unwrap_or_else(|| cfg.backup.effective_jobs())
            .max(1),
        progress,
        found: Found::default(),
    };
    if let Err(e) = run.steps(&mut sandbox, &restore_opts) {
        run.found.failure = Some(format!("{e:#}"));
    }
    let kept = opts.keep.then(|| sandbox.path().to_path_buf());
    // Stopped and removed (or kept) before the drill is recorded and reported.
    drop(sandbox);
    let found = run.found;
    let message = found.failure.clone().or_else(|| {
        FAILURE_ORDER.iter().find_map(|name| {
            found
                .checks
                .iter()
                .find(|c| c.name == *name && c.outcome == CheckResult::Failed)
                .map(|c| format!("{}: {}", c.name, c.detail))
        })
    });
    // Without a replayed commit the state reached is at least the backup's own end.
    let rpo_from = found.recovered_time.or(backup.recovery_time);
    let record = DrillRecord {
        backup_label: backup.label.clone(),
        started_at,
        passed: message.is_none(),
        restore_seconds: found.restore_seconds,
        recovery_seconds: found.recovery_seconds,
        recovered_lsn: found.recovered_lsn,
        recovered_time: found.recovered_time,
        rpo_seconds: found
            .promoted_at
            .zip(rpo_from)
            .map(|(end, from)| seconds(end - from)),
        message,
    };
    repo.catalog.insert_drill(&record)?;
    Ok(DrillReport {
        record,
        choice: choice.to_string(),
        checks: found.checks,
        tables: found.tables,
        kept,
    })
}

/// A drill's record as `show --json` and `drill --json` print it.
pub fn drill_json(d: &DrillRecord) -> Value {
    let time = |t: &DateTime<Utc>| time_text(*t);
    let recovered_to = (d.recovered_lsn.is_some() || d.recovered_time.is_some()).then(|| {
        json!({
            "lsn": d.recovered_lsn.map(|l| l.to_string()),
            "time": d.recovered_time.as_ref().map(time),
        })
    });
    json!({
        "backup": d.backup_label,
        "started_at": time(&d.started_at),
        "status": d.status_str(),
        "restore_seconds": d.restore_seconds,
        "recovery_seconds": d.recovery_seconds,
        "rto_seconds": d.rto_seconds(),
        "recovered_to": recovered_to,
        "rpo_seconds": d.rpo_seconds,
        "message": d.message,
    })
}

/// The `drill --json` document: the record, then the checks and row counts.
pub fn report_json(r: &DrillReport) -> Value {
    let mut v = drill_json(&r.record);
    v["choice"] = json!(r.choice);
    v["checks"] = r
        .checks
        .iter()
        .map(|c| json!({"name": c.name, "result": c.outcome.as_str(), "detail": c.detail}))
        .collect();
    v["rows"] = json!(r.tables.iter().map(|t| t.rows).sum::<i64>());
    v["tables"] = r
        .tables
        .iter()
        .map(|t| json!({"database": t.database, "schema": t.schema, "table": t.table, "rows": t.rows}))
        .collect();
    v["sandbox"] = json!(r.kept);
    v
}

/// What the steps found so far; whatever is known when a step fails is still reported.
#[derive(Default)]
struct Found {
    restore_seconds: Option<f64>,
    recovery_seconds: Option<f64>,
    promoted_at: Option<DateTime<Utc>>,
    recovered_lsn: Option<Lsn>,
    recovered_time: Option<DateTime<Utc>>,
    checks: Vec<Check>,
    tables: Vec<TableRows>,
    /// A step that stopped the drill (restore, start, recovery), on one line.
    failure: Option<String>,
}

/// One drill in progress.
struct Run<'a> {
    cfg: &'a Config,
    backup: &'a BackupRecord,
    blocks_per_segment: u32,
    jobs: usize,
    progress: &'a dyn Progress,
    found: Found,
}

impl Run<'_> {
    /// Each step in turn; an `Err` is a step that stopped the drill, its message the failure.
    fn steps(&mut self, sandbox: &mut Sandbox, restore_opts: &RestoreOptions) -> Result<()> {
        let label = &self.backup.label;
        let t = Instant::now();
        restore(self.cfg, restore_opts, self.progress)
            .with_context(|| format!("restore of backup {label} failed"))?;
        self.found.restore_seconds = Some(t.elapsed().as_secs_f64());
        sandbox.make_private(self.backup.pg_version_num / 10000)?;

        self.progress
            .message("drill: starting the sandbox server and replaying the archive");
        let t = Instant::now();
        sandbox.start()?;
        let mut client = sandbox.wait_promoted(&self.cfg.pg.database, &self.cfg.pg.user)?;
        self.found.recovery_seconds = Some(t.elapsed().as_secs_f64());
        self.found.promoted_at = Some(Utc::now());
        let log = sandbox.log_text();
        let (lsn, time) = recovery_end(&log);
        self.found.recovered_lsn = lsn;
        self.found.recovered_time = time;

        self.progress
            .message("drill: checking databases, tables and pages");
        let databases = query_strings(
            &mut client,
            "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname",
        )?;
        drop(client);
        self.check_databases(sandbox, &databases);
        self.check_amcheck(sandbox);
        // Pages are read from a cleanly stopped server: nothing writes them while they are
        // read, and the shutdown checkpoint has written every page the server held.
        sandbox.stop("fast")?;
        self.check_pages(sandbox)
    }

    /// Every database that allows connections accepts one; count the rows of each table.
    fn check_databases(&mut self, sandbox: &Sandbox, databases: &[String]) {
        let mut unreachable = Vec::new();
        let mut count_errors = Vec::new();
        for db in databases {
            let mut client = match sandbox.connect(db, &self.cfg.pg.user) {
                Ok(c) => c,
                Err(e) => {
                    unreachable.push(format!("{db}: {}", one_line(&format!("{e:#}"))));
                    continue;
                }
            };
            match count_rows(&mut client, db) {
                Ok((mut tables, errors)) => {
                    self.found.tables.append(&mut tables);
                    count_errors.extend(errors);
                }
                Err(e) => count_errors.push(format!("{db}: {}", one_line(&format!("{e:#}")))),
            }
        }
        self.found.checks.push(match unreachable.first() {
            None => passed(
                DATABASES,
                format!("{} database(s) accept connections", databases.len()),
            ),
            Some(first) => failed(DATABASES, format!("{first}{}", more(unreachable.len()))),
        });
        let rows: i64 = self.found.tables.iter().map(|t| t.rows).sum();
        self.found.checks.push(match count_errors.first() {
            None => passed(
                TABLES,
                format!("{} table(s), {rows} row(s)", self.found.tables.len()),
            ),
            Some(first) => failed(TABLES, format!("{first}{}", more(count_errors.len()))),
        });
    }

    /// `pg_amcheck --all` (heap and B-tree indexes of every database), where this major and
    /// this host have it.
    fn check_amcheck(&mut self, sandbox: &Sandbox) {
        let check = match self.amcheck(sandbox) {
            Ok(c) => c,
            Err(e) => failed(AMCHECK, one_line(&format!("{e:#}"))),
        };
        self.found.checks.push(check);
    }

    fn amcheck(&self, sandbox: &Sandbox) -> Result<Check> {
        let major = self.backup.pg_version_num / 10000;
        if major < 14 {
            return Ok(skipped(
                AMCHECK,
                format!("PostgreSQL {major} has no amcheck 1.3, which pg_amcheck needs (14+)"),
            ));
        }
        let Some(tool) = client_program(&sandbox.bin, "pg_amcheck", major) else {
            return Ok(skipped(
                AMCHECK,
                format!(
                    "no pg_amcheck of PostgreSQL {major} or newer beside {} or under /usr/lib/postgresql",
                    sandbox.bin.display()
                ),
            ));
        };
        let mut client = sandbox.connect(&self.cfg.pg.database, &self.cfg.pg.user)?;
        let available = query_strings(
            &mut client,
            "SELECT name FROM pg_available_extensions WHERE name = 'amcheck'",
        )?;
        if available.is_empty() {
            return Ok(skipped(
                AMCHECK,
                format!(
                    "the amcheck extension is not installed beside {}",
                    sandbox.bin.display()
                ),
            ));
        }
        let out = Command::new(&tool)
            .args([
                "--all",
                "--install-missing",
                "--heapallindexed",
                "--no-password",
            ])
            .arg("--host")
            .arg(sandbox.sock())
            .args(["--port", &sandbox.port.to_string()])
            .args(["--username", &self.cfg.pg.user])
            .args(["--maintenance-db", &self.cfg.pg.database])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", tool.display()))?;
        if out.status.success() {
            return Ok(passed(
                AMCHECK,
                "pg_amcheck --all found nothing wrong".into(),
            ));
        }
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // pg_amcheck names the relation on one line ending in ':' and the problem on the next.
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let first = match (lines.next(), lines.next()) {
            (Some(head), Some(next)) if head.ends_with(':') => format!("{head} {next}"),
            (Some(head), _) => head.to_string(),
            (None, _) => "pg_amcheck failed without a message".to_string(),
        };
        Ok(failed(AMCHECK, one_line(&first)))
    }

    /// Verify the checksum of every page of every relation file, as PostgreSQL does on read.
    fn check_pages(&mut self, sandbox: &Sandbox) -> Result<()> {
        if !self.backup.data_checksums {
            self.found.checks.push(skipped(
                PAGE_CHECKSUMS,
                "data checksums are off in this cluster".into(),
            ));
            return Ok(());
        }
        let files: Vec<_> = walk(&sandbox.data())
            .context("listing the sandbox's files")?
            .into_iter()
            .filter(|e| e.kind == FileKind::File)
            .filter_map(|e| parse_relation_path(&e.rel).map(|(_, rel)| (e, rel.segno)))
            .collect();
        let bs = self.backup.block_size as usize;
        let first_block = |segno: u32| segno * self.blocks_per_segment;
        let results = parallel::for_each(&files, self.jobs, |(entry, segno), buf| {
            verify_file(&entry.abs, &entry.rel, bs, first_block(*segno), buf)
        })?;
        let pages: u64 = results.iter().map(|(n, _)| n).sum();
        let mut bad: Vec<(String, u32)> = results.into_iter().flat_map(|(_, b)| b).collect();
        bad.sort();
        self.found.checks.push(match bad.first() {
            None => passed(
                PAGE_CHECKSUMS,
                format!("{pages} page(s) in {} relation file(s)", files.len()),
            ),
            Some((path, block)) => failed(
                PAGE_CHECKSUMS,
                format!(
                    "checksum failure in {path} block {block}{}",
                    more(bad.len())
                ),
            ),
        });
        Ok(())
    }
}

/// Pages verified in one relation file, and the blocks that failed. `first_block` is the
/// relation block number of the file's first page (segment files after the first go on).
fn verify_file(
    path: &Path,
    rel: &str,
    block_size: usize,
    first_block: u32,
    buf: &mut [u8],
) -> Result<(u64, Vec<(String, u32)>)> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (mut pages, mut bad, mut block) = (0u64, Vec::new(), first_block);
    loop {
        let n = read_full(&mut file, buf).with_context(|| format!("reading {}", path.display()))?;
        for page in buf[..n].chunks_exact(block_size) {
            if matches!(
                verify_page(page, block),
                PageVerdict::ChecksumMismatch { .. } | PageVerdict::BadHeader
            ) {
                bad.push((rel.to_string(), block));
            }
            pages += 1;
            block += 1;
        }
        if n < buf.len() {
            return Ok((pages, bad));
        }
    }
}

/// Row counts of every ordinary table of one database, and the tables that could not be read.
fn count_rows(client: &mut postgres::Client, db: &str) -> Result<(Vec<TableRows>, Vec<String>)> {
    client.batch_execute("SET statement_timeout = 0")?;
    let tables = client.query(
        "SELECT n.nspname::text, c.relname::text FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
         AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' \
         ORDER BY 1, 2",
        &[],
    )?;
    let (mut counted, mut errors) = (Vec::new(), Vec::new());
    for row in tables {
        let (schema, table): (String, String) = (row.get(0), row.get(1));
        let sql = format!(
            "SELECT count(*) FROM {}.{}",
            quote_ident(&schema),
            quote_ident(&table)
        );
        match client.query_one(&sql, &[]) {
            Ok(r) => counted.push(TableRows {
                database: db.to_string(),
                schema,
                table,
                rows: r.get(0),
            }),
            Err(e) => errors.push(format!("reading {db}.{schema}.{table}: {}", db_message(&e))),
        }
    }
    Ok((counted, errors))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A server error's own message (`ERROR: invalid page in block 0 of relation base/5/16384`),
/// else the client's.
fn db_message(e: &postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_string())
}

fn query_strings(client: &mut postgres::Client, sql: &str) -> Result<Vec<String>> {
    Ok(client
        .query(sql, &[])
        .with_context(|| format!("running {sql}"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

fn passed(name: &'static str, detail: String) -> Check {
    Check {
        name,
        outcome: CheckResult::Passed,
        detail,
    }
}

fn failed(name: &'static str, detail: String) -> Check {
    Check {
        name,
        outcome: CheckResult::Failed,
        detail,
    }
}

fn skipped(name: &'static str, detail: String) -> Check {
    Check {
        name,
        outcome: CheckResult::Skipped,
        detail,
    }
}

/// ` (and 3 more)` after the first of `n` problems.
fn more(n: usize) -> String {
    if n > 1 {
        format!(" (and {} more)", n - 1)
    } else {
        String::new()
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn seconds(d: chrono::Duration) -> f64 {
    d.num_microseconds().map_or(f64::MAX, |us| us as f64 / 1e6)
}

/// A private directory holding one restored cluster and its server: `data/`, `ts/<oid>/`,
/// `sock/`, `server.log`, `pg_hba.conf`. Dropping it stops the server and removes everything,
/// unless it is to be kept.
struct Sandbox {
    /// None once handed over to be kept.
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    /// The server programs (postgres, pg_ctl) of the backup's major.
    bin: PathBuf,
    port: u16,
    /// A postmaster may hold the data directory: set before every start attempt.
    running: bool,
    keep: bool,
}

/// How long pg_ctl waits for the server to accept connections (a hot standby does once
/// consistent, which can take the replay of a long backup's WAL).
const START_TIMEOUT_SECS: u32 = 3600;

impl Sandbox {
    /// A new directory, mode 0700, under `[drill] dir` (default: the system temp directory).
    fn create(cfg: &Config, bin: PathBuf, keep: bool) -> Result<Sandbox> {
        let parent = cfg.drill.dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("pgkeep-drill-")
            .tempdir_in(&parent)
            .with_context(|| {
                format!(
                    "creating a sandbox directory in {}: set [drill] dir to a writable directory",
                    parent.display()
                )
            })?;
        let path = dir.path().to_path_buf();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting mode of {}", path.display()))?;
        // The socket is addressed by path, so no other server can collide with it; a port no
        // one listens on keeps the shared memory key apart from the live cluster's too.
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .context("finding a free port for the sandbox server")?;
        let sandbox = Sandbox {
            dir: Some(dir),
            path,
            bin,
            port,
            running: false,
            keep,
        };
        // sun_path holds 107 bytes and a NUL.
        let socket = sandbox.sock().join(format!(".s.PGSQL.{port}"));
        if socket.as_os_str().len() > 107 {
            bail!(
                "the sandbox's socket path {} is too long for a Unix socket: set [drill] dir to a shorter path",
                socket.display()
            );
        }
        for sub in [sandbox.sock(), sandbox.path.join("ts")] {
            fs::create_dir(&sub).with_context(|| format!("creating {}", sub.display()))?;
            fs::set_permissions(&sub, fs::Permissions::from_mode(0o700))?;
        }
        Ok(sandbox)
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn data(&self) -> PathBuf {
        self.path.join("data")
    }

    fn sock(&self) -> PathBuf {
        self.path.join("sock")
    }

    fn log(&self) -> PathBuf {
        self.path.join("server.log")
    }

    fn tablespace(&self, oid: u32) -> PathBuf {
        self.path.join("ts").join(oid.to_string())
    }

    fn log_text(&self) -> String {
        fs::read(self.log())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Settings that keep the restored server to itself, appended to postgresql.auto.conf
    /// after restore's block (the last setting of a name wins): its own port, socket and log,
    /// no TCP, no archiving, no command that could write outside the sandbox, nothing to
    /// stream from; messages in English and times in UTC so the log can be read back.
    fn make_private(&self, major: u32) -> Result<()> {
        let data = self.data();
        self.neutralise_postgresql_conf()?;
        // The restored pg_hba.conf may ask for passwords pgkeep does not have; the socket's
        // directory is reachable only by the user running the drill, so trust is safe here.
        let hba = self.path.join("pg_hba.conf");
        write_private(&hba, "local all all trust\n")?;
        let ident = self.path.join("pg_ident.conf");
        write_private(&ident, "")?;
        let path_setting = |p: &Path| -> Result<String> {
            p.to_str()
                .map(conf_string)
                .ok_or_else(|| anyhow!("sandbox path {} is not UTF-8", p.display()))
        };
        let mut lines = vec![
            format!("port = {}", self.port),
            "listen_addresses = ''".to_string(),
            format!("unix_socket_directories = {}", path_setting(&self.sock())?),
            format!("hba_file = {}", path_setting(&hba)?),
            format!("ident_file = {}", path_setting(&ident)?),
            "external_pid_file = ''".to_string(),
            "ssl = off".to_string(),
            "archive_mode = off".to_string(),
            "archive_cleanup_command = ''".to_string(),
            "recovery_end_command = ''".to_string(),
            "primary_conninfo = ''".to_string(),
            "primary_slot_name = ''".to_string(),
            "recovery_min_apply_delay = 0".to_string(),
            // A commit would wait forever for standbys the sandbox does not have.
            "synchronous_standby_names = ''".to_string(),
            "hot_standby = on".to_string(),
            // max_connections and the other settings a standby must not lower stay as they are:
            // recovery refuses (or pauses) with less than the primary had.
            "shared_buffers = '32MB'".to_string(),
            "restart_after_crash = off".to_string(),
            "logging_collector = off".to_string(),
            "log_destination = 'stderr'".to_string(),
            // LOG lines ("redo done at", "last completed transaction") rank above WARNING.
            "log_min_messages = 'warning'".to_string(),
            "lc_messages = 'C'".to_string(),
            "log_timezone = 'UTC'".to_string(),
            "timezone = 'UTC'".to_string(),
        ];
        if major < 15 {
            // Before 15 statistics files may live in a shared directory such as Debian's
            // /var/run/postgresql/15-main.pg_stat_tmp; the setting is gone in 15.
            lines.push("stats_temp_directory = 'pg_stat_tmp'".to_string());
        }
        let auto = data.join("postgresql.auto.conf");
        let mut text = String::from("# pgkeep drill sandbox begin\n");
        for l in lines {
            text.push_str(&l);
            text.push('\n');
        }
        text.push_str("# pgkeep drill sandbox end\n");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&auto)
            .with_context(|| format!("opening {}", auto.display()))?;
        f.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", auto.display()))
    }

    /// A data directory's postgresql.conf may set `data_directory` (which would send the server
    /// to another directory, the live one if anything): comment it out. A cluster whose
    /// postgresql.conf lives elsewhere (Debian keeps it in /etc) gets an empty one, the sandbox's
    /// settings being in postgresql.auto.conf.
    fn neutralise_postgresql_conf(&self) -> Result<()> {
        let conf = self.data().join("postgresql.conf");
        let old = match fs::read_to_string(&conf) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", conf.display())),
        };
        let text: String = old
            .lines()
            .map(|l| {
                let setting = l.trim_start().split(['=', ' ', '\t']).next().unwrap_or("");
                if setting.eq_ignore_ascii_case("data_directory") {
                    format!("# {l}  # disabled by pgkeep drill\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        write_private(&conf, &text)
    }

    /// `pg_ctl start -w`: returns once the server accepts connections (as a hot standby while
    /// it replays), or fails with the log line that says why it did not start.
    fn start(&mut self) -> Result<()> {
        self.running = true;
        let out = Command::new(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log())
            .args(["-w", "-t", &START_TIMEOUT_SECS.to_string(), "start"])
            .current_dir(&self.path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.bin.join("pg_ctl").display()))?;
        if out.status.success() {
            return Ok(());
        }
        let why = failure_line(&self.log_text())
            .unwrap_or_else(|| one_line(&String::from_utf8_lossy(&out.stderr)));
        bail!("the sandbox server did not start: {why}")
    }

    /// Wait until recovery has ended and the server was promoted; fails with the log line that
    /// says why when the server stops or recovery pauses instead.
    fn wait_promoted(&self, database: &str, user: &str) -> Result<postgres::Client> {
        let mut client: Option<postgres::Client> = None;
        loop {
            if client.is_none() {
                client = self.connect(database, user).ok();
            }
            if let Some(c) = client.as_mut() {
                match c.query_one(
                    "SELECT pg_is_in_recovery(), pg_is_in_recovery() AND pg_is_wal_replay_paused()",
                    &[],
                ) {
                    Ok(row) if !row.get::<_, bool>(0) => return Ok(client.take().unwrap()),
                    Ok(row) if row.get::<_, bool>(1) => {
                        let why = failure_line(&self.log_text())
                            .unwrap_or_else(|| "no reason in the server log".into());
                        bail!("recovery paused instead of reaching its end: {why}")
                    }
                    Ok(_) => {}
                    Err(_) => client = None,
                }
            }
            if client.is_none() && !self.postmaster_alive() {
                let why = failure_line(&self.log_text())
                    .unwrap_or_else(|| "the server stopped without a message".into());
                bail!("recovery failed: {why}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn connect(&self, database: &str, user: &str) -> Result<postgres::Client> {
        let sock = self.sock();
        postgres::Config::new()
            .host_path(&sock)
            .port(self.port)
            .user(user)
            .dbname(database)
            .application_name("pgkeep drill")
            .connect_timeout(Duration::from_secs(10))
            .connect(postgres::NoTls)
            .with_context(|| format!("connecting to database {database} of the sandbox server"))
    }

    fn postmaster_alive(&self) -> bool {
        Command::new(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .arg("status")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn stop(&mut self, mode: &str) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        let out = Command::new(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "600", "-m", mode, "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.bin.join("pg_ctl").display()))?;
        if !out.status.success() && self.postmaster_alive() {
            bail!(
                "stopping the sandbox server failed: {}",
                one_line(&String::from_utf8_lossy(&out.stderr))
            );
        }
        self.running = false;
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Also on every error path: no postmaster outlives its drill.
        if self.running {
            let _ = self.stop("immediate");
        }
        if self.keep {
            if let Some(dir) = self.dir.take() {
                let _ = dir.keep();
            }
        }
        // Otherwise the TempDir removes the directory as it drops.
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode of {}", path.display()))
}

/// The directory of the server programs of PostgreSQL `major`: `[pg] bin` when set (it must be
/// that major), else the first of the running server's own directory, PATH and Debian's
/// `/usr/lib/postgresql/<major>/bin` that holds `postgres` and `pg_ctl` of that major.
fn server_programs(cfg: &Config, major: u32) -> Result<PathBuf> {
    if let Some(bin) = &cfg.pg.bin {
        return match programs_major(bin) {
            Some(m) if m == major => Ok(bin.clone()),
            Some(m) => bail!(
                "[pg] bin {} holds PostgreSQL {m} programs but the backup is of PostgreSQL {major}: set [pg] bin to a PostgreSQL {major} bin directory",
                bin.display()
            ),
            None => bail!(
                "[pg] bin {} has no runnable postgres and pg_ctl: set it to a PostgreSQL {major} bin directory",
                bin.display()
            ),
        };
    }
    let mut candidates: Vec<PathBuf> = running_server_dir(&cfg.pg.data).into_iter().collect();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates.push(PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
    let mut seen = Vec::new();
    for dir in candidates {
        match programs_major(&dir) {
            Some(m) if m == major => return Ok(dir),
            Some(m) => seen.push(format!("PostgreSQL {m} in {}", dir.display())),
            None => {}
        }
    }
    bail!(
        "no PostgreSQL {major} server programs found for the drill (found {}): set [pg] bin to a PostgreSQL {major} bin directory",
        if seen.is_empty() { "none".to_string() } else { seen.join(", ") }
    )
}

/// The directory of the running postmaster's executable, from the pid in `postmaster.pid`.
fn running_server_dir(data: &Path) -> Option<PathBuf> {
    let pid_file = fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let pid: u32 = pid_file.lines().next()?.trim().parse().ok()?;
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    exe.parent().map(Path::to_path_buf)
}

/// The major version of `dir/postgres` when `dir` also has `pg_ctl`.
fn programs_major(dir: &Path) -> Option<u32> {
    if !dir.join("pg_ctl").is_file() {
        return None;
    }
    let out = Command::new(dir.join("postgres"))
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    parse_major(&String::from_utf8_lossy(&out.stdout))
}

/// `postgres (PostgreSQL) 15.18 (Debian 15.18-1)` -> 15.
fn parse_major(version: &str) -> Option<u32> {
    let rest = version.split_once("(PostgreSQL)")?.1;
    let number = rest.split_whitespace().next()?;
    number.split(['.', 'b', 'r', 'd']).next()?.parse().ok()
}

/// A client program beside the server's, else the newest Debian one; either only when it is of
/// PostgreSQL `major` or newer (client programs know older servers, not newer ones).
fn client_program(bin: &Path, name: &str, major: u32) -> Option<PathBuf> {
    let own = bin.join(name);
    let debian = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((major, e.path().join("bin").join(name)))
        })
        .max_by_key(|(m, tool)| (tool.is_file(), *m))
        .map(|(_, tool)| tool);
    std::iter::once(own).chain(debian).find(|tool| {
        tool.is_file()
            && Command::new(tool)
                .arg("--version")
                .stdin(Stdio::null())
                .output()
                .ok()
                .and_then(|o| parse_major(&String::from_utf8_lossy(&o.stdout)))
                .is_some_and(|m| m >= major)
    })
}

/// Where recovery ended, from the server log: the LSN of "redo done at X/Y" and the time of
/// "last completed transaction was at log time ..." (both LOG lines at the end of recovery;
/// the second only when a commit was replayed).
fn recovery_end(log: &str) -> (Option<Lsn>, Option<DateTime<Utc>>) {
    let lsn = log.lines().rev().find_map(|l| {
        let rest = l.split_once("redo done at ")?.1;
        rest.split_whitespace().next()?.parse().ok()
    });
    let time = log.lines().rev().find_map(|l| {
        let rest = l
            .split_once("last completed transaction was at log time ")?
            .1
            .trim();
        parse_log_time(rest)
    });
    (lsn, time)
}

/// A time as PostgreSQL writes it with `timezone = 'UTC'`: `2026-11-21 10:15:00.123456+00`.
fn parse_log_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z") {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc())
}

/// The line of a server log that says why recovery or start-up failed: pgkeep's own
/// archive-get error (it names the WAL file) first, else the first FATAL or PANIC that is not
/// one of the refusals a client meets while the server starts or stops.
fn failure_line(log: &str) -> Option<String> {
    if let Some(l) = log
        .lines()
        .find(|l| l.contains("pgkeep: error: archive-get"))
    {
        let from = l.find("pgkeep: error:").unwrap_or(0);
        return Some(one_line(&l[from..]));
    }
    let benign = [
        "the database system is starting up",
        "the database system is not yet accepting connections",
        "the database system is shutting down",
        "terminating connection due to administrator command",
    ];
    let fatal = log.lines().find(|l| {
        (l.contains("FATAL:") || l.contains("PANIC:")) && !benign.iter().any(|b| l.contains(b))
    })?;
    let from = fatal
        .find("FATAL:")
        .or_else(|| fatal.find("PANIC:"))
        .unwrap_or(0);
    Some(one_line(&fatal[from..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
2026-11-21 10:15:00.100 UTC [41] LOG:  starting archive recovery
2026-11-21 10:15:00.200 UTC [41] LOG:  restored log file \"000000010000000000000003\" from archive
2026-11-21 10:15:00.210 UTC [44] FATAL:  the database system is starting up
2026-11-21 10:15:01.000 UTC [41] LOG:  redo done at 0/5000110 system usage: CPU: user: 0.00 s
2026-11-21 10:15:01.000 UTC [41] LOG:  last completed transaction was at log time 2026-11-21 10:14:58.123456+00
2026-11-21 10:15:01.100 UTC [41] LOG:  selected new timeline ID: 2
";

    #[test]
    fn the_end_of_recovery_is_read_from_the_log() {
        let (lsn, time) = recovery_end(LOG);
        assert_eq!(lsn, Some("0/5000110".parse().unwrap()));
        assert_eq!(
            time.unwrap().to_rfc3339(),
            "2026-11-21T10:14:58.123456+00:00"
        );
        // PostgreSQL 12 and 13 end the line after the LSN.
        let (lsn, time) = recovery_end("LOG:  redo done at 0/30000D8\n");
        assert_eq!(lsn, Some("0/30000D8".parse().unwrap()));
        assert_eq!(time, None);
    }

    #[test]
    fn the_failure_line_prefers_pgkeeps_archive_get_error_and_skips_startup_refusals() {
        assert_eq!(failure_line(LOG), None);
        let log = format!(
            "{LOG}pgkeep: error: archive-get 000000010000000000000004: backup object archive/x is corrupt\n\
             2026-11-21 10:15:02 UTC [41] FATAL:  could not restore file \"000000010000000000000004\" from archive\n"
        );
        assert_eq!(
            failure_line(&log).unwrap(),
            "pgkeep: error: archive-get 000000010000000000000004: backup object archive/x is corrupt"
        );
        let log = "2026-11-21 10:15:02 UTC [7] FATAL:  could not create shared memory segment: No space left on device\n";
        assert_eq!(
            failure_line(log).unwrap(),
            "FATAL: could not create shared memory segment: No space left on device"
        );
    }

    #[test]
    fn the_major_is_read_from_postgres_version() {
        assert_eq!(
            parse_major("postgres (PostgreSQL) 15.18 (Debian 15.18-1.pgdg120+1)\n"),
            Some(15)
        );
        assert_eq!(parse_major("postgres (PostgreSQL) 18beta1\n"), Some(18));
        assert_eq!(parse_major("postgres (PostgreSQL) 12.22\n"), Some(12));
        assert_eq!(parse_major("nothing"), None);
    }

    #[test]
    fn failed_pages_are_named_by_relation_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("16384.1");
        let mut page = vec![0u8; 8192];
        // A sane page header (pd_lower 24, pd_upper 8192, pd_special 8192, version 4)...
        page[12..14].copy_from_slice(&24u16.to_ne_bytes());
        page[14..16].copy_from_slice(&8192u16.to_ne_bytes());
        page[16..18].copy_from_slice(&8192u16.to_ne_bytes());
        page[18..20].copy_from_slice(&(8192u16 | 4).to_ne_bytes());
        let mut good = page.clone();
        let sum = pgkeep_pg::pg_checksum_page(&good, 131073);
        good[8..10].copy_from_slice(&sum.to_ne_bytes());
        // ...then a zero page, the good one as block 1 of the file, and the same bytes as block 2,
        // where the checksum (which covers the block number) does not match.
        let bytes = [vec![0u8; 8192], good.clone(), good].concat();
        fs::write(&path, bytes).unwrap();
        let mut buf = vec![0u8; 8192 * 2];
        let (pages, bad) = verify_file(&path, "base/5/16384.1", 8192, 131072, &mut buf).unwrap();
        assert_eq!(pages, 3);
        assert_eq!(bad, vec![("base/5/16384.1".to_string(), 131074)]);
    }
}
