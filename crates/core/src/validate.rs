//! `pgkeep validate`: re-read every stored file of the backups and of the WAL archive, check
//! each against the size and CRC-32C recorded when it was stored, and say what is damaged, what
//! is missing and how far each backup can still be rolled forward.
//!
//! A DONE or CORRUPT backup that passes becomes OK; one with any problem (a damaged or missing
//! file, a missing metadata file, a missing or damaged WAL segment it needs to become
//! consistent, a parent that is missing or not restorable) becomes CORRUPT, which restore
//! refuses. The new status is also recorded in the repository (`status::store_status`), so a
//! catalog rebuilt from the repository keeps it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{self, Read};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use pgkeep_catalog::{meta, BackupRecord, BackupStatus, Catalog, FileKind, FileRecord, WalRecord};
use pgkeep_pg::{Lsn, TimelineId, WalFileName, WalSegSize};
use pgkeep_repo::{decompress_into, get_bytes, keys, StorageError};

use crate::backup::{needed_segments, BACKUP_INI, BACKUP_LABEL, MANIFEST};
use crate::bundle::{by_bundle, stored_key, BundleSpan, StoredAt};
use crate::config::Config;
use crate::parallel;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::status::store_status;
use crate::walchain::{continuous_from, read_history, Span, WalChain, Window};

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
    /// The gap-free span of points the backups found intact restore to.
    pub span: Option<Span>,
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
    let seg = repo.wal_seg_size()?;
    let interrupted = crate::backup::mark_interrupted(&repo.catalog, false)?;
    for label in &interrupted {
        if let Some(b) = repo.catalog.backup(label)? {
            store_status(repo.storage(), &b)?;
        }
    }
    let all = repo.catalog.backups()?;
    let chosen = choose(&all, opts.label.as_deref())?;
    let mut files = Vec::with_capacity(chosen.len());
    for b in &chosen {
        files.push(repo.catalog.files(&b.label)?);
    }
    let mut archive = list_archive(&repo, seg)?;
    if opts.label.is_some() {
        // One backup: only the segments it needs and the history files its windows follow.
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
        for w in &mut archive {
            w.read &= matches!(w.parsed, WalFileName::History { .. }) || needed.contains(&w.name);
        }
    }

    let mut checks = Checks::default();
    for (b, files) in chosen.iter().zip(&files) {
        for f in files.iter().filter(|f| f.kind == FileKind::File) {
            let stored_in = f.stored_in.as_deref().unwrap_or(&b.label);
            // A page-delta object holds less than the file's size: only its CRC is recorded.
            let size = (!f.page_delta).then_some(f.size);
            checks.add(
                stored_key(stored_in, &f.path, f.bundle),
                size,
                f.crc32c,
                f.size,
            );
        }
    }
    for w in archive.iter().filter(|w| w.read) {
        let size = w.row.as_ref().map(|r| r.size);
        let crc = w.row.as_ref().map(|r| r.crc32c);
        let weight = size.unwrap_or(match w.parsed {
            WalFileName::Segment { .. } | WalFileName::Partial { .. } => seg.bytes(),
            WalFileName::Backup { .. } | WalFileName::History { .. } => 0,
        });
        let at = StoredAt {
            key: w.key.clone(),
            range: None,
        };
        checks.add(at, size, crc, weight);
    }
    let jobs = opts
        .jobs
        .unwrap_or_else(|| cfg.backup.effective_jobs())
        .max(1);
    let verdicts = checks.run(&repo, jobs, progress)?;
    let (mut chain, mut wal_report, damaged) = assess_archive(&repo, seg, &archive, &verdicts);
    if let Some(floor) = continuous_from(&all, seg) {
        chain.set_floor(floor);
    }
    if opts.label.is_some() {
        wal_report.notes.clear();
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
        let mut problems = file_problems(b, files, &verdicts);
        problems.extend(meta_problems(&repo, b, files));
        problems.extend(wal_problems(b, &chain, &damaged));
        problems.extend(parent_problems(b, &known));
        let status = if problems.is_empty() {
            BackupStatus::Ok
        } else {
            BackupStatus::Corrupt
        };
        let record = record_status(&repo.catalog, b, status, &problems)?;
        // Each change is a new object in the repository: an unchanged status adds none.
        if (record.status, &record.error) != (b.status, &b.error) {
            store_status(repo.storage(), &record)?;
        }
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
    add_cuts(
        &mut wal_report,
        &reports,
        &chain,
        &damaged,
        opts.label.is_some(),
    );
    let now: Vec<BackupRecord> = all
        .iter()
        .map(|b| {
            let mut b = b.clone();
            if let Some(k) = known.get(&b.label) {
                b.status = k.status;
            }
            b
        })
        .collect();
    Ok(ValidateReport {
        backups: reports,
        wal: wal_report,
        interrupted,
        span: chain.span(now.iter()),
        bytes_read: checks.bytes_read(&verdicts),
        elapsed: started.elapsed(),
    })
}

/// The backups to validate: the one named (which must exist and be validatable), else every
/// DONE, OK or CORRUPT one.
fn choose(all: &[BackupRecord], label: Option<&str>) -> Result<Vec<BackupRecord>> {
    let Some(l) = label else {
        return Ok(all
            .iter()
            .filter(|b| validatable(b.status))
            .cloned()
            .collect());
    };
    let b = all
        .iter()
        .find(|b| b.label == l)
        .ok_or_else(|| anyhow!("backup {l} not found: `pgkeep show` lists the backups"))?;
    if !validatable(b.status) {
        bail!(
            "backup {l} has status {}: only DONE, OK or CORRUPT backups can be validated",
            b.status
        );
    }
    Ok(vec![b.clone()])
}

/// A file of the WAL archive as the catalog records it and the repository holds it.
struct WalFile {
    name: String,
    parsed: WalFileName,
    key: String,
    /// The catalog's row; None for an object archive-push stored but did not record (yet).
    row: Option<WalRecord>,
    /// Whether the repository holds the object.
    stored: bool,
    /// Whether to read it.
    read: bool,
}

/// Every WAL file the catalog records or the repository holds, by name.
fn list_archive(repo: &Repo, seg: WalSegSize) -> Result<Vec<WalFile>> {
    let sysid = repo.identity.system_identifier;
    // The catalog first: archive-push commits the object before it records the row, so a row
    // read before the listing always has its object in the listing.
    let rows = repo.catalog.wal_list()?;
    let prefix = keys::wal_prefix(sysid);
    let stored: BTreeSet<String> = repo
        .storage()
        .list(&prefix)
        .with_context(|| format!("listing the WAL archive {prefix}"))?
        .into_iter()
        .collect();
    let mut files: BTreeMap<String, WalFile> = BTreeMap::new();
    for row in rows {
        let Ok(parsed) = WalFileName::parse(&row.name, seg) else {
            continue;
        };
        let key = keys::wal(sysid, &row.name);
        let stored = stored.contains(&key);
        files.insert(
            row.name.clone(),
            WalFile {
                name: row.name.clone(),
                parsed,
                key,
                row: Some(row),
                stored,
                read: stored,
            },
        );
    }
    for key in stored {
        let Some(name) = keys::wal_name_from_key(&key) else {
            continue;
        };
        if files.contains_key(name) {
            continue;
        }
        let Ok(parsed) = WalFileName::parse(name, seg) else {
            continue;
        };
        files.insert(
            name.to_string(),
            WalFile {
                name: name.to_string(),
                parsed,
                key,
                row: None,
                stored: true,
                read: true,
            },
        );
    }
    Ok(files.into_values().collect())
}

/// Sort the archive into intact and damaged files and build the chain the intact segments
/// form. A segment the repository does not hold is left to the gaps; anything else missing or
/// damaged is listed as bad. Returns the chain, the report (without cuts yet) and the damaged
/// files with their reasons.
fn assess_archive(
    repo: &Repo,
    seg: WalSegSize,
    archive: &[WalFile],
    verdicts: &Verdicts,
) -> (WalChain, WalReport, BTreeMap<String, String>) {
    let mut chain = WalChain::new(seg);
    let mut report = WalReport {
        files_checked: archive.iter().filter(|w| w.read).count() as u64,
        ..WalReport::default()
    };
    let mut damaged = BTreeMap::new();
    for w in archive {
        let verdict = match (w.stored, w.read) {
            (false, _) => Some(MISSING.to_string()),
            (true, true) => verdicts.get(&w.key).cloned().flatten(),
            (true, false) => None,
        };
        // A damaged object is reported as such; only an intact one just needs indexing.
        if w.stored && w.row.is_none() && verdict.is_none() {
            report.notes.push(format!(
                "WAL file {} is in the repository but not in the catalog (an archive-push in progress, or run `pgkeep catalog rebuild`)",
                w.name
            ));
        }
        let verdict = match (verdict, w.parsed) {
            (Some(reason), _) => Some(reason),
            (None, WalFileName::Segment { tli, segno }) => {
                chain.add_segment(tli, segno);
                None
            }
            (None, WalFileName::History { tli }) => {
                let expect = w.row.as_ref().map(|r| (r.size, r.crc32c));
                match read_history(repo, &w.name, tli, expect) {
                    Ok(entries) => {
                        chain.add_history(tli, &entries);
                        None
                    }
                    Err(e) => Some(format!("{e:#}")),
                }
            }
            (None, _) => None,
        };
        match verdict {
            // A missing segment is part of a gap, reported as such.
            Some(reason)
                if reason == MISSING && matches!(w.parsed, WalFileName::Segment { .. }) => {}
            Some(reason) => {
                damaged.insert(w.name.clone(), reason);
            }
            None => {}
        }
    }
    (chain, report, damaged)
}

/// Report damaged files and gaps with the restorable windows each cuts short (a window that
/// ends right at it). Validating one backup, only the gaps that cut its windows are reported.
fn add_cuts(
    report: &mut WalReport,
    backups: &[BackupReport],
    chain: &WalChain,
    damaged: &BTreeMap<String, String>,
    one_backup: bool,
) {
    let seg = chain.seg_size();
    let cuts_at = |tli: TimelineId, segno: u64| -> Vec<Cut> {
        let at = Lsn::from_segment(segno, seg);
        backups
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
    let mut damaged_segments = BTreeSet::new();
    for (name, reason) in damaged {
        let cuts = match WalFileName::parse(name, seg) {
            Ok(WalFileName::Segment { tli, segno }) => {
                damaged_segments.insert((tli, segno));
                cuts_at(tli, segno)
            }
            _ => Vec::new(),
        };
        report.bad.push(WalProblem {
            name: name.clone(),
            reason: reason.clone(),
            cuts,
        });
    }
    for gap in chain.gaps() {
        // Damaged segments are absent from the chain too, but reported above.
        for (first, last) in missing_runs(gap.timeline, gap.first, gap.last, &damaged_segments) {
            let cuts = cuts_at(gap.timeline, first);
            if one_backup && cuts.is_empty() {
                continue;
            }
            report.gaps.push(GapReport {
                timeline: gap.timeline,
                first: chain.name(gap.timeline, first),
                last: chain.name(gap.timeline, last),
                segments: last - first + 1,
                cuts,
            });
        }
    }
}

/// The runs of `first..=last` on `tli` left once the damaged segments are taken out.
fn missing_runs(
    tli: TimelineId,
    first: u64,
    last: u64,
    damaged: &BTreeSet<(TimelineId, u64)>,
) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut next = first;
    for &(_, s) in damaged.range((tli, first)..=(tli, last)) {
        if s > next {
            runs.push((next, s - 1));
        }
        next = s + 1;
    }
    if next <= last {
        runs.push((next, last));
    }
    runs
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
    seen: HashSet<StoredAt>,
}

struct Check {
    /// Verdicts name it by `at.name()`: the object's key, with the byte range for a bundled file.
    at: StoredAt,
    /// Expected decompressed size, when recorded for the object itself.
    size: Option<u64>,
    /// Expected CRC-32C; None when nothing was recorded, so only the lz4 frames are checked.
    crc32c: Option<u32>,
    /// Bytes expected to be read, for progress and ordering.
    weight: u64,
}

/// Per key: None when intact, else why not.
type Verdicts = HashMap<String, Option<String>>;

impl Checks {
    fn add(&mut self, at: StoredAt, size: Option<u64>, crc32c: Option<u32>, weight: u64) {
        if !self.seen.insert(at.clone()) {
            return;
        }
        self.items.push(Check {
            at,
            size,
            crc32c,
            weight,
        });
    }

    fn run(&mut self, repo: &Repo, jobs: usize, progress: &dyn Progress) -> Result<Verdicts> {
        // Largest first, so no worker is left with a big file at the end; the files of one
        // bundle together, read with one request.
        self.items.sort_by_key(|c| std::cmp::Reverse(c.weight));
        let total = self.items.iter().map(|c| c.weight).sum();
        let (alone, bundles) = by_bundle(&self.items, |c| c.at.range.is_some().then_some(&c.at));
        let units: Vec<Vec<&Check>> = alone.into_iter().map(|c| vec![c]).chain(bundles).collect();
        progress.start("validating", Some(total));
        let storage = repo.storage();
        let verdicts = parallel::for_each(&units, jobs, |unit, _buf| {
            // A bundle's files from one ranged read; after anything goes wrong with the read
            // itself, each later file with a request of its own, so one damaged frame is that
            // file's problem alone.
            let mut span = match (unit.first(), unit.last()) {
                (Some(first), Some(last)) if unit.len() > 1 => first
                    .at
                    .range
                    .zip(last.at.range)
                    .and_then(|(a, b)| BundleSpan::open(storage, &first.at.key, a, b).ok()),
                _ => None,
            };
            Ok(unit
                .iter()
                .map(|c| {
                    let expect = c.size.zip(c.crc32c);
                    let check = |frame: &mut dyn Read| {
                        decompress_into(frame, &c.at.key, &mut io::sink(), expect, false)
                    };
                    let from_span = match (span.as_mut(), c.at.range) {
                        (Some(s), Some(range)) => s.with_frame(range, check).ok(),
                        _ => None,
                    };
                    if from_span.is_none() {
                        span = None;
                    }
                    let fetched = match from_span {
                        Some(fetched) => fetched,
                        None => c.at.open(storage).and_then(|mut o| check(&mut o)),
                    };
                    let verdict = match fetched {
                        Ok(d) if c.crc32c.is_some_and(|crc| crc != d.crc32c) => Some(format!(
                            "damaged: expected crc32c {:08x}, found {:08x}",
                            c.crc32c.unwrap_or_default(),
                            d.crc32c
                        )),
                        Ok(_) => None,
                        Err(e) => Some(storage_reason(&e)),
                    };
                    progress.advance(c.weight);
                    (c.at.name(), verdict)
                })
                .collect::<Vec<_>>())
        })?;
        progress.finish();
        Ok(verdicts.into_iter().flatten().collect())
    }

    /// Bytes read from intact objects (damaged ones stop early; their size is not counted).
    fn bytes_read(&self, verdicts: &Verdicts) -> u64 {
        self.items
            .iter()
            .filter(|c| matches!(verdicts.get(&c.at.name()), Some(None)))
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
        let key = stored_key(stored_in, &f.path, f.bundle).name();
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
    // The catalog's rows are what restore acts on: they must stay inside the data directory.
    if let Err(e) = crate::entries::check_entries(&b.label, files) {
        problem(MANIFEST, format!("{e:#}"));
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
    chain: &WalChain,
    damaged: &BTreeMap<String, String>,
) -> Vec<Problem> {
    let Some(stop) = b.stop_lsn else {
        return vec![Problem {
            object: b.label.clone(),
            reason: "no stop LSN recorded: the backup did not finish".into(),
        }];
    };
    let seg = chain.seg_size();
    let tli = TimelineId(b.timeline);
    let first = b.start_lsn.segment_number(seg);
    needed_segments(tli, b.start_lsn, stop, seg)
        .into_iter()
        .zip(first..)
        .filter(|(_, segno)| !chain.has(tli, *segno))
        .map(|(name, _)| {
            let why = damaged.get(&name).map_or(MISSING, String::as_str);
            Problem {
                reason: format!("WAL segment needed to make the backup consistent: {why}"),
                object: name,
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_segments_split_a_gap() {
        let tli = TimelineId(1);
        let damaged = BTreeSet::from([(tli, 5), (tli, 7), (tli, 9), (TimelineId(2), 6)]);
        assert_eq!(missing_runs(tli, 4, 9, &damaged), [(4, 4), (6, 6), (8, 8)]);
        assert_eq!(missing_runs(tli, 5, 5, &damaged), []);
        assert_eq!(missing_runs(tli, 10, 12, &damaged), [(10, 12)]);
    }

    #[test]
    fn parents_must_be_known_and_restorable() {
        let known = |status, parent: Option<&str>| Known {
            status,
            parent: parent.map(str::to_string),
        };
        let map = HashMap::from([
            ("F".to_string(), known(BackupStatus::Corrupt, None)),
            ("D".to_string(), known(BackupStatus::Ok, Some("F"))),
            ("I".to_string(), known(BackupStatus::Done, Some("D"))),
            ("J".to_string(), known(BackupStatus::Done, Some("gone"))),
        ]);
        let mut b = crate::walchain::tests::backup(1, 0, 1);
        b.label = "I".into();
        b.parent = Some("D".into());
        let problems = parent_problems(&b, &map);
        assert_eq!(
            problems,
            [Problem {
                object: "backup F".into(),
                reason: "parent of D is CORRUPT".into()
            }]
        );
        b.parent = Some("gone".into());
        assert_eq!(
            parent_problems(&b, &map)[0].reason,
            "parent of I is missing from the catalog"
        );
    }
}
