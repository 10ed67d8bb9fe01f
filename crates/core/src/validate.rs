//! `pgkeep validate`: re-read every stored file of the backups and of the WAL archive, check
//! each against the size and CRC-32C recorded when it was stored, and say what is damaged, what
//! is missing and how far each backup can still be rolled forward.
//!
//! A DONE or CORRUPT backup that passes becomes OK; one with any problem (a damaged or missing
//! file, a missing metadata file, a missing or damaged WAL segment it needs to become
//! consistent, a parent that is missing or not restorable) becomes CORRUPT, which restore
//! refuses. The new status is also written to the backup's `backup.ini`, so a catalog rebuilt
//! from the repository keeps it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use pgkeep_catalog::{
    meta, BackupRecord, BackupStatus, Catalog, FileKind, FileRecord, WalKind, WalRecord,
};
use pgkeep_pg::{Lsn, TimelineId};
use pgkeep_repo::{fetch_decompressed, get_bytes, keys, put_bytes, StorageError};

use crate::backup::{needed_segments, BACKUP_INI, BACKUP_LABEL, MANIFEST};
use crate::config::Config;
use crate::parallel;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::walchain::{read_history, WalChain, Window};

/// What to validate.
#[derive(Clone, Debug, Default)]
pub struct ValidateOptions {
    /// Only this backup (and the WAL it needs); None = every DONE, OK or CORRUPT backup and the
    /// whole WAL archive.
    pub label: Option<String>,
    /// Reader threads; None = the configured backup jobs.
    pub jobs: Option<usize>,
}

/// Everything `validate` found.
#[derive(Debug)]
pub struct ValidateReport {
    pub backups: Vec<BackupReport>,
    pub wal: WalReport,
    /// RUNNING backups whose process was gone, now ERROR.
    pub interrupted: Vec<String>,
    /// Original (decompressed) bytes read.
    pub bytes_read: u64,
    pub elapsed: Duration,
}

/// One validated backup.
#[derive(Debug)]
pub struct BackupReport {
    pub label: String,
    /// Status before and after validation.
    pub was: BackupStatus,
    pub status: BackupStatus,
    /// Stored files checked (an object shared with another backup counts for each).
    pub files_checked: u64,
    pub problems: Vec<Problem>,
    /// Restorable windows after validation; empty when it is CORRUPT.
    pub windows: Vec<Window>,
}

/// Something damaged or missing, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The file, segment or backup it is about.
    pub object: String,
    pub reason: String,
}

/// What `validate` found in the WAL archive.
#[derive(Debug, Default)]
pub struct WalReport {
    /// Archived files checked by CRC.
    pub files_checked: u64,
    /// Damaged or missing files, with the windows each cuts.
    pub bad: Vec<WalProblem>,
    /// Runs of missing segments, with the windows each cuts.
    pub gaps: Vec<GapReport>,
    /// Findings that are not damage (objects the catalog does not know yet).
    pub notes: Vec<String>,
}

/// A damaged or missing WAL file.
#[derive(Debug)]
pub struct WalProblem {
    pub name: String,
    pub reason: String,
    /// Backups whose restorable window ends at this file, and where.
    pub cuts: Vec<Cut>,
}

/// Missing segments `first..=last` of one timeline.
#[derive(Debug)]
pub struct GapReport {
    pub timeline: TimelineId,
    pub first: String,
    pub last: String,
    pub segments: u64,
    pub cuts: Vec<Cut>,
}

/// A backup whose restorable window on `timeline` a problem ends at `at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    pub label: String,
    pub timeline: TimelineId,
    pub at: Lsn,
}

impl ValidateReport {
    /// Number of problems found: damaged backups count once per problem, as do bad WAL files
    /// and gaps.
    pub fn problems(&self) -> usize {
        self.backups.iter().map(|b| b.problems.len()).sum::<usize>()
            + self.wal.bad.len()
            + self.wal.gaps.len()
    }
}

/// Validate backups and WAL; see the module doc.
pub fn validate(
    cfg: &Config,
    opts: &ValidateOptions,
    progress: &dyn Progress,
) -> Result<ValidateReport> {
    let started = Instant::now();
    let repo = Repo::open(cfg)?;
    let interrupted = crate::backup::mark_interrupted(&repo.catalog, false)?;
    for label in &interrupted {
        if let Some(b) = repo.catalog.backup(label)? {
            write_backup_ini(&repo, &b)?;
        }
    }
    let all = repo.catalog.backups()?;
    let chosen: Vec<BackupRecord> = match &opts.label {
        Some(l) => {
            let b = all
                .iter()
                .find(|b| &b.label == l)
                .ok_or_else(|| anyhow!("backup {l} not found: `pgkeep show` lists the backups"))?;
            if !validatable(b.status) {
                bail!(
                    "backup {l} has status {}: only DONE, OK or CORRUPT backups can be validated",
                    b.status
                );
            }
            vec![b.clone()]
        }
        None => all
            .iter()
            .filter(|b| validatable(b.status))
            .cloned()
            .collect(),
    };
    let mut files = Vec::with_capacity(chosen.len());
    for b in &chosen {
        files.push(repo.catalog.files(&b.label)?);
    }
    let wal = repo.catalog.wal_list()?;
    let seg = repo.wal_seg_size()?;
    let wal_checked: Vec<&WalRecord> = match &opts.label {
        None => wal.iter().collect(),
        // One backup: the segments it needs and the history files its windows follow.
        Some(_) => {
            let needed: HashSet<String> = chosen
                .iter()
                .filter_map(|b| {
                    let stop = b.stop_lsn?;
                    Some(needed_segments(
                        TimelineId(b.timeline),
                        b.start_lsn,
                        stop,
                        seg,
                    ))
                })
                .flatten()
                .collect();
            wal.iter()
                .filter(|w| w.kind == WalKind::History || needed.contains(&w.name))
                .collect()
        }
    };

    let sysid = repo.identity.system_identifier;
    let mut checks = Checks::default();
    for (b, files) in chosen.iter().zip(&files) {
        for f in files.iter().filter(|f| f.kind == FileKind::File) {
            let stored_in = f.stored_in.as_deref().unwrap_or(&b.label);
            let Some(crc) = f.crc32c else { continue };
            // A page-delta object holds less than the file's size: only its CRC is recorded.
            let size = (!f.page_delta).then_some(f.size);
            checks.add(keys::backup_file(stored_in, &f.path), size, crc, f.size);
        }
    }
    for w in &wal_checked {
        checks.add(keys::wal(sysid, &w.name), Some(w.size), w.crc32c, w.size);
    }
    let jobs = opts
        .jobs
        .unwrap_or_else(|| cfg.backup.effective_jobs())
        .max(1);
    let results = checks.run(&repo, jobs, progress)?;
    let bytes_read = checks.bytes_read(&results);

    // WAL: what is intact, what is not, and the chain the intact part forms.
    let mut report_wal = WalReport {
        files_checked: wal_checked.len() as u64,
        ..WalReport::default()
    };
    let stored: BTreeSet<String> = repo
        .storage()
        .list(&keys::wal_prefix(sysid))
        .context("listing the WAL archive")?
        .into_iter()
        .collect();
    let checked_names: HashSet<&str> = wal_checked.iter().map(|w| w.name.as_str()).collect();
    let mut chain = WalChain::new(seg);
    let mut bad_wal: HashMap<String, String> = HashMap::new();
    for w in &wal {
        let key = keys::wal(sysid, &w.name);
        let verdict = if checked_names.contains(w.name.as_str()) {
            results.get(&key).cloned().flatten()
        } else if stored.contains(&key) {
            None
        } else {
            Some(MISSING.to_string())
        };
        if let Some(reason) = verdict {
            if checked_names.contains(w.name.as_str()) {
                bad_wal.insert(w.name.clone(), reason);
            }
            continue;
        }
        match w.kind {
            WalKind::Segment => chain.add_record(w),
            WalKind::History => match read_history(&repo, w) {
                Ok(entries) => chain.add_history(TimelineId(w.timeline), &entries),
                Err(e) => {
                    bad_wal.insert(w.name.clone(), format!("{e:#}"));
                }
            },
            WalKind::Partial | WalKind::Backup => {}
        }
    }
    if opts.label.is_none() {
        let known: HashSet<String> = wal.iter().map(|w| keys::wal(sysid, &w.name)).collect();
        for key in stored.iter().filter(|k| !known.contains(*k)) {
            if let Some(name) = keys::wal_name_from_key(key) {
                report_wal.notes.push(format!(
                    "WAL file {name} is in the repository but not in the catalog (an archive-push in progress, or run `pgkeep catalog rebuild`)"
                ));
            }
        }
    }

    // Backups, oldest first, so a parent's new status is known before its children's.
    let mut known: HashMap<String, Known> = all
        .iter()
        .map(|b| {
            let k = Known {
                status: b.status,
                parent: b.parent.clone(),
            };
            (b.label.clone(), k)
        })
        .collect();
    let mut reports = Vec::with_capacity(chosen.len());
    for (b, files) in chosen.iter().zip(&files) {
        let mut problems = file_problems(b, files, &results);
        problems.extend(meta_problems(&repo, b, files));
        problems.extend(wal_problems(b, seg, &chain, &bad_wal));
        problems.extend(parent_problems(b, &known));
        let status = if problems.is_empty() {
            BackupStatus::Ok
        } else {
            BackupStatus::Corrupt
        };
        let record = record_status(&repo.catalog, b, status, &problems)?;
        write_backup_ini(&repo, &record)?;
        if let Some(k) = known.get_mut(&b.label) {
            k.status = status;
        }
        reports.push(BackupReport {
            label: b.label.clone(),
            was: b.status,
            status,
            files_checked: files.iter().filter(|f| f.kind == FileKind::File).count() as u64,
            windows: if status.is_restorable() {
                chain.windows(&record)
            } else {
                Vec::new()
            },
            problems,
        });
    }

    // Which windows each WAL problem cuts short: a window that ends right at it.
    let cuts_at = |tli: TimelineId, segno: u64| -> Vec<Cut> {
        let at = Lsn::from_segment(segno, seg);
        reports
            .iter()
            .flat_map(|r| {
                r.windows
                    .iter()
                    .filter(move |w| w.timeline == tli && w.until == at)
                    .map(move |w| Cut {
                        label: r.label.clone(),
                        timeline: w.timeline,
                        at: w.until,
                    })
            })
            .collect()
    };
    let mut bad: Vec<_> = bad_wal.into_iter().collect();
    bad.sort();
    for (name, reason) in bad {
        let cuts = wal
            .iter()
            .find(|w| w.name == name && w.kind == WalKind::Segment)
            .and_then(|w| Some(cuts_at(TimelineId(w.timeline), w.segno?)))
            .unwrap_or_default();
        report_wal.bad.push(WalProblem { name, reason, cuts });
    }
    for gap in chain.gaps() {
        let cuts = cuts_at(gap.timeline, gap.first);
        // Validating one backup, only the gaps that shorten its windows concern it.
        if opts.label.is_some() && cuts.is_empty() {
            continue;
        }
        report_wal.gaps.push(GapReport {
            timeline: gap.timeline,
            first: chain.name(gap.timeline, gap.first),
            last: chain.name(gap.timeline, gap.last),
            segments: gap.last - gap.first + 1,
            cuts,
        });
    }

    Ok(ValidateReport {
        backups: reports,
        wal: report_wal,
        interrupted,
        bytes_read,
        elapsed: started.elapsed(),
    })
}

/// Reason given for a file the repository does not hold.
const MISSING: &str = "missing from the repository";

fn validatable(s: BackupStatus) -> bool {
    matches!(
        s,
        BackupStatus::Done | BackupStatus::Ok | BackupStatus::Corrupt
    )
}

/// The stored objects to read, each once however many backups share it.
#[derive(Default)]
struct Checks {
    items: Vec<Check>,
    by_key: HashMap<String, usize>,
}

struct Check {
    key: String,
    /// Expected decompressed size, when recorded for the object itself.
    size: Option<u64>,
    crc32c: u32,
    /// Bytes expected to be read, for progress and ordering.
    weight: u64,
}

/// Per key: None when intact, else why not.
type Verdicts = HashMap<String, Option<String>>;

impl Checks {
    fn add(&mut self, key: String, size: Option<u64>, crc32c: u32, weight: u64) {
        if self.by_key.contains_key(&key) {
            return;
        }
        self.by_key.insert(key.clone(), self.items.len());
        self.items.push(Check {
            key,
            size,
            crc32c,
            weight,
        });
    }

    fn run(&mut self, repo: &Repo, jobs: usize, progress: &dyn Progress) -> Result<Verdicts> {
        // Largest first, so no worker is left with a big file at the end.
        self.items.sort_by_key(|c| std::cmp::Reverse(c.weight));
        let total = self.items.iter().map(|c| c.weight).sum();
        progress.start("validating", Some(total));
        let storage = repo.storage();
        let verdicts = parallel::for_each(&self.items, jobs, |c, _buf| {
            let expect = c.size.map(|size| (size, c.crc32c));
            let verdict = match fetch_decompressed(storage, &c.key, &mut io::sink(), expect, false)
            {
                Ok(d) if d.crc32c != c.crc32c => Some(format!(
                    "expected crc32c {:08x}, found {:08x}",
                    c.crc32c, d.crc32c
                )),
                Ok(_) => None,
                Err(e) => Some(storage_reason(&e)),
            };
            progress.advance(c.weight);
            Ok((c.key.clone(), verdict))
        })?;
        progress.finish();
        Ok(verdicts.into_iter().collect())
    }

    /// Bytes read from intact objects (damaged ones stop early; their size is not counted).
    fn bytes_read(&self, verdicts: &Verdicts) -> u64 {
        self.items
            .iter()
            .filter(|c| matches!(verdicts.get(&c.key), Some(None)))
            .map(|c| c.weight)
            .sum()
    }
}

/// Why an object failed, without the key (the report names the file).
fn storage_reason(e: &StorageError) -> String {
    match e {
        StorageError::NotFound { .. } => MISSING.to_string(),
        StorageError::Corrupt { detail, .. } => format!("damaged: {detail}"),
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    }
}

fn file_problems(b: &BackupRecord, files: &[FileRecord], verdicts: &Verdicts) -> Vec<Problem> {
    let mut problems = Vec::new();
    for f in files.iter().filter(|f| f.kind == FileKind::File) {
        let stored_in = f.stored_in.as_deref().unwrap_or(&b.label);
        let key = keys::backup_file(stored_in, &f.path);
        let reason = match (f.crc32c, verdicts.get(&key)) {
            (None, _) => Some("no CRC-32C recorded for it".to_string()),
            (Some(_), Some(Some(reason))) => Some(format!("{reason} ({key})")),
            _ => None,
        };
        if let Some(reason) = reason {
            problems.push(Problem {
                object: f.path.clone(),
                reason,
            });
        }
    }
    problems
}

/// `backup.ini` and `manifest` must read back as this backup (a catalog rebuild needs them),
/// and `backup_label` must be there (restore writes it into the data directory).
fn meta_problems(repo: &Repo, b: &BackupRecord, files: &[FileRecord]) -> Vec<Problem> {
    let storage = repo.storage();
    let read = |name: &str| -> Result<String, String> {
        let key = keys::backup_meta(&b.label, name);
        match get_bytes(storage, &key) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|_| format!("{key} is not UTF-8 text")),
            Err(e) => Err(format!("{} ({key})", storage_reason(&e))),
        }
    };
    let mut problems = Vec::new();
    let mut problem = |object: &str, reason: String| {
        problems.push(Problem {
            object: object.to_string(),
            reason,
        })
    };
    match read(BACKUP_INI).and_then(|t| meta::parse_backup_ini(&t).map_err(|e| e.to_string())) {
        Ok(ini) if ini.label != b.label => problem(
            BACKUP_INI,
            format!("describes backup {}, not {}", ini.label, b.label),
        ),
        Ok(_) => {}
        Err(reason) => problem(BACKUP_INI, reason),
    }
    match read(MANIFEST).and_then(|t| meta::parse_manifest(&t).map_err(|e| e.to_string())) {
        Ok(listed) => {
            let listed: BTreeSet<&str> = listed.iter().map(|f| f.path.as_str()).collect();
            let recorded: BTreeSet<&str> = files.iter().map(|f| f.path.as_str()).collect();
            if listed != recorded {
                let first = listed.symmetric_difference(&recorded).next();
                problem(
                    MANIFEST,
                    format!(
                        "lists other files than the catalog (first difference: {})",
                        first.unwrap_or(&"?")
                    ),
                );
            }
        }
        Err(reason) => problem(MANIFEST, reason),
    }
    match storage.size(&keys::backup_meta(&b.label, BACKUP_LABEL)) {
        Ok(Some(_)) => {}
        Ok(None) => problem(BACKUP_LABEL, MISSING.to_string()),
        Err(e) => problem(BACKUP_LABEL, storage_reason(&e)),
    }
    problems
}

/// Every segment from the backup's start to its stop must be archived and intact.
fn wal_problems(
    b: &BackupRecord,
    seg: pgkeep_pg::WalSegSize,
    chain: &WalChain,
    bad_wal: &HashMap<String, String>,
) -> Vec<Problem> {
    let Some(stop) = b.stop_lsn else {
        return vec![Problem {
            object: b.label.clone(),
            reason: "no stop LSN recorded: the backup did not finish".into(),
        }];
    };
    let tli = TimelineId(b.timeline);
    needed_segments(tli, b.start_lsn, stop, seg)
        .into_iter()
        .enumerate()
        .filter_map(|(i, name)| {
            let segno = b.start_lsn.segment_number(seg) + i as u64;
            if chain.has(tli, segno) {
                return None;
            }
            let why = bad_wal.get(&name).map_or("not archived", String::as_str);
            Some(Problem {
                reason: format!("WAL segment needed to make the backup consistent is {why}"),
                object: name,
            })
        })
        .collect()
}

/// A diff or incr backup is only as good as every backup it builds on: each ancestor must be
/// in the catalog and restorable. `known` maps every backup to its status and parent.
fn parent_problems(b: &BackupRecord, known: &HashMap<String, Known>) -> Vec<Problem> {
    let mut seen = HashSet::from([b.label.as_str()]);
    let mut problems = Vec::new();
    let mut child = b.label.as_str();
    let mut next = b.parent.as_deref();
    while let Some(parent) = next {
        if !seen.insert(parent) {
            problems.push(Problem {
                object: format!("backup {parent}"),
                reason: "backup parents form a loop".into(),
            });
            break;
        }
        let Some(k) = known.get(parent) else {
            problems.push(Problem {
                object: format!("backup {parent}"),
                reason: format!("parent of {child} is missing from the catalog"),
            });
            break;
        };
        if !k.status.is_restorable() {
            problems.push(Problem {
                object: format!("backup {parent}"),
                reason: format!("parent of {child} is {}", k.status),
            });
        }
        child = parent;
        next = k.parent.as_deref();
    }
    problems
}

/// What the parent check needs of every backup.
struct Known {
    status: BackupStatus,
    parent: Option<String>,
}

/// Move the backup to `status` and record why, returning the stored record.
fn record_status(
    catalog: &Catalog,
    b: &BackupRecord,
    status: BackupStatus,
    problems: &[Problem],
) -> Result<BackupRecord> {
    let error = problems.first().map(|p| {
        let more = match problems.len() {
            1 => String::new(),
            n => format!(" (and {} more problems)", n - 1),
        };
        format!("validate: {}: {}{more}", p.object, p.reason)
    });
    if b.status == status {
        // CORRUPT to CORRUPT is not a transition; only the reason may have changed.
        if b.error != error {
            let mut updated = b.clone();
            updated.error = error;
            catalog.update_backup(&updated)?;
            return Ok(updated);
        }
        return Ok(b.clone());
    }
    Ok(catalog.set_status(&b.label, status, error.as_deref())?)
}

/// Rewrite the backup's `backup.ini` from its record, so the repository alone says what the
/// catalog says.
fn write_backup_ini(repo: &Repo, b: &BackupRecord) -> Result<()> {
    put_bytes(
        repo.storage(),
        &keys::backup_meta(&b.label, BACKUP_INI),
        meta::backup_ini(b).as_bytes(),
    )
    .with_context(|| format!("writing backup.ini of backup {}", b.label))
}
