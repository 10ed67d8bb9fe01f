//! Retention: `expire`, `delete`, `pin` and `unpin`. Pure functions plan which backups and which
//! archived WAL go; a second step removes them in an order a crash cannot hurt.
//!
//! Planning ([`plan_expire`], [`plan_delete`]) reads nothing: it is handed the backups, the
//! archived WAL, the archive's timelines and the time, so `--dry-run` prints exactly what acting
//! would do and the rules are tested without a cluster. Acting holds the repository's backup lock
//! (one backup, expire or delete at a time) and goes in this order:
//!
//! 1. every doomed backup becomes DELETING, in the catalog and then in its `backup.ini`, before
//!    any of its files goes; restore uses DONE and OK backups only;
//! 2. backups newest first, so children go before their parents: data files and the other
//!    metadata, then `backup.ini`, then the catalog row;
//! 3. WAL files: the catalog row, then the object.
//!
//! A crash at any point leaves DELETING backups, which the next `expire` finishes first, or WAL
//! objects without a catalog row, which `archive-get` still serves and the next `expire` removes
//! (the other order could leave a row without its object, which makes `archive-get` fail hard and
//! `validate` report damage). Only files the plan names are removed, so a segment that
//! `archive-push` stores while `expire` runs is never touched.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use pgkeep_catalog::{BackupRecord, BackupStatus, BackupType, CatalogError, Pin};
use pgkeep_pg::{Lsn, TimelineId, WalFileName};
use pgkeep_repo::keys;

use crate::backup::{mark_interrupted, BACKUP_INI};
use crate::config::{Config, Policy};
use crate::lock::BackupLock;
use crate::repo::Repo;
use crate::walchain::{Span, WalChain};

/// Set by tests only: milliseconds to sleep after each file or row removed, so a test can kill
/// `expire` at spread instants of its work.
pub const TEST_PAUSE_ENV: &str = "PGKEEP_TEST_EXPIRE_PAUSE_MS";

/// A file of the WAL archive, from the catalog or the repository listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchivedWal {
    pub name: String,
    /// Bytes the object takes in the repository (0 when only the catalog row is left).
    pub stored_bytes: u64,
}

/// Why a backup goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    /// It was DELETING: an earlier expire or delete was interrupted.
    Unfinished,
    /// It failed (ERROR) and can never be restored.
    Failed,
    /// No part of `[retention]` keeps it.
    Policy,
    /// `pgkeep delete` named it.
    Asked,
    /// It depends on a backup that goes.
    DependsOn(String),
}

/// A backup the plan removes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Doomed {
    pub label: String,
    pub backup_type: BackupType,
    pub status: BackupStatus,
    pub stored_bytes: u64,
    pub why: Why,
}

/// What goes, in the order it goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Newest first: every backup goes before the backups it depends on.
    pub backups: Vec<Doomed>,
    /// WAL file names, oldest first.
    pub wal: Vec<String>,
    /// Repository bytes of those WAL files.
    pub wal_bytes: u64,
    /// The first segment number every timeline keeps whole (older segments stay only inside
    /// a pinned backup's start..stop); None when no WAL goes.
    pub wal_floor: Option<u64>,
}

/// What `expire` or `delete` did (or, with `dry_run`, would do).
#[derive(Debug)]
pub struct RetentionReport {
    pub plan: Plan,
    pub dry_run: bool,
    /// The restorable span the kept backups and WAL give; None when nothing is restorable.
    pub remaining: Option<Span>,
    pub elapsed: Duration,
}

/// Plan `expire`: finish DELETING backups; with a policy set, also remove ERROR backups, the
/// backups no part of `policy` keeps (pinned ones and their parents always stay), and the WAL
/// no kept backup needs. `backups` are oldest first, as the catalog lists them.
pub fn plan_expire(
    backups: &[BackupRecord],
    wal: &[ArchivedWal],
    chain: &WalChain,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Plan {
    let mut doomed: BTreeMap<&str, Why> = backups
        .iter()
        .filter(|b| b.status == BackupStatus::Deleting)
        .map(|b| (b.label.as_str(), Why::Unfinished))
        .collect();
    if !policy.is_set() {
        return finish_plan(backups, doomed, Vec::new(), 0, None);
    }
    let family = Family::new(backups);
    let candidates: Vec<&BackupRecord> = backups
        .iter()
        .filter(|b| !matches!(b.status, BackupStatus::Deleting | BackupStatus::Running))
        .collect();
    for b in &candidates {
        if b.status == BackupStatus::Error {
            doomed.insert(&b.label, Why::Failed);
        }
    }
    let live: Vec<&BackupRecord> = candidates
        .into_iter()
        .filter(|b| b.status != BackupStatus::Error)
        .collect();

    // Whole chains are kept from the oldest full a part of the policy needs; None keeps all.
    let keep_from = chains_kept_from(&live, &family, policy, now);
    let mut by_policy: BTreeSet<&str> = live
        .iter()
        .filter(|b| keep_from.is_none_or(|t| family.root(b).start_time >= t))
        .map(|b| b.label.as_str())
        .collect();
    if let Some(n) = policy.diff {
        // The newest `n` diffs stay; older ones go with their incrs.
        let diffs: Vec<&BackupRecord> = live
            .iter()
            .rev()
            .filter(|b| b.backup_type == BackupType::Diff && by_policy.contains(b.label.as_str()))
            .copied()
            .collect();
        for old in diffs.iter().skip(n as usize) {
            by_policy.retain(|l| !family.descends_from(l, &old.label));
        }
    }
    // A pinned backup stays, and so do the backups it is restored from.
    let mut kept = by_policy.clone();
    for b in live.iter().filter(|b| b.pinned_at(now)) {
        kept.extend(family.lineage(&b.label));
    }
    for b in &live {
        if !kept.contains(b.label.as_str()) {
            doomed.insert(&b.label, Why::Policy);
        }
    }

    // WAL: everything before the start of the oldest backup the policy keeps goes, but for the
    // start..stop of pinned backups the policy would not keep (their parents need none of their
    // own WAL to restore them). A running backup's WAL always stays.
    let seg = chain.seg_size();
    let floor = backups
        .iter()
        .filter(|b| b.status == BackupStatus::Running || by_policy.contains(b.label.as_str()))
        .map(|b| b.start_lsn.segment_number(seg))
        .min();
    let pinned_ranges: Vec<(TimelineId, u64, u64)> = live
        .iter()
        .filter(|b| b.pinned_at(now) && !by_policy.contains(b.label.as_str()))
        .map(|b| {
            let first = b.start_lsn.segment_number(seg);
            let last = b.stop_lsn.map_or(u64::MAX, |stop| {
                Lsn(stop.0.saturating_sub(1)).segment_number(seg).max(first)
            });
            (TimelineId(b.timeline), first, last)
        })
        .collect();
    let in_use: Vec<(TimelineId, Lsn)> = backups
        .iter()
        .filter(|b| kept.contains(b.label.as_str()) || b.status == BackupStatus::Running)
        .map(|b| (TimelineId(b.timeline), b.stop_lsn.unwrap_or(b.start_lsn)))
        .collect();
    let mut gone = Vec::new();
    let mut wal_bytes = 0;
    if let Some(floor) = floor {
        let segment_goes = |tli: TimelineId, segno: u64| {
            segno < floor
                && !pinned_ranges
                    .iter()
                    .any(|&(t, first, last)| t == tli && (first..=last).contains(&segno))
        };
        let parsed: Vec<(&ArchivedWal, Option<WalFileName>)> = wal
            .iter()
            .map(|w| (w, WalFileName::parse(&w.name, seg).ok()))
            .collect();
        // Timelines that keep WAL, and the newest one, which the cluster may be writing: their
        // histories stay, with those of the timelines they descend from.
        let mut live: BTreeSet<TimelineId> =
            parsed
                .iter()
                .filter_map(|(_, p)| match p {
                    Some(
                        WalFileName::Segment { tli, segno } | WalFileName::Partial { tli, segno },
                    ) if !segment_goes(*tli, *segno) => Some(*tli),
                    _ => None,
                })
                .collect();
        live.extend(
            parsed
                .iter()
                .filter_map(|(_, p)| Some(p.as_ref()?.timeline()))
                .max(),
        );
        for (w, name) in parsed {
            let goes = match name {
                Some(
                    WalFileName::Segment { tli, segno }
                    | WalFileName::Partial { tli, segno }
                    | WalFileName::Backup { tli, segno, .. },
                ) => segment_goes(tli, segno),
                // A timeline's history stays while recovery from a kept backup can follow it,
                // a kept backup's timeline descends from it, or WAL that stays is on it.
                Some(WalFileName::History { tli }) => {
                    !in_use.iter().any(|&(k, stop)| {
                        chain.can_follow(tli, k, stop) || chain.lineage(k).contains(&tli)
                    }) && !live.iter().any(|&l| chain.lineage(l).contains(&tli))
                }
                // Not a name pgkeep archives: not ours to judge.
                None => false,
            };
            if goes {
                wal_bytes += w.stored_bytes;
                gone.push(w.name.clone());
            }
        }
    }
    gone.sort();
    finish_plan(backups, doomed, gone, wal_bytes, floor)
}

/// Plan `delete LABEL`: the backup and every backup depending on it, newest first. Without
/// `force`, refused for a pinned backup and when no remaining backup would reach the newest
/// point the archive restores to.
pub fn plan_delete(
    backups: &[BackupRecord],
    label: &str,
    chain: &WalChain,
    force: bool,
    now: DateTime<Utc>,
) -> Result<Plan> {
    if !backups.iter().any(|b| b.label == label) {
        bail!("backup {label} not found: `pgkeep show` lists the backups");
    }
    let family = Family::new(backups);
    let mut doomed: BTreeMap<&str, Why> = BTreeMap::new();
    for b in backups
        .iter()
        .filter(|b| family.descends_from(&b.label, label))
    {
        if b.status == BackupStatus::Running {
            bail!(
                "backup {} depends on backup {label} and is still running: wait for it to finish",
                b.label
            );
        }
        let why = if b.label == label {
            Why::Asked
        } else {
            Why::DependsOn(label.to_string())
        };
        doomed.insert(&b.label, why);
    }
    if !force {
        if let Some(b) = backups
            .iter()
            .find(|b| doomed.contains_key(b.label.as_str()) && b.pinned_at(now))
        {
            bail!(
                "backup {} is pinned{}: `pgkeep unpin {}` first, or pass --force",
                b.label,
                pin_text(b.pinned),
                b.label
            );
        }
        let before = chain.span(backups.iter());
        let after = chain.span(
            backups
                .iter()
                .filter(|b| !doomed.contains_key(b.label.as_str())),
        );
        if let Some(before) = before {
            let lost = after
                .as_ref()
                .is_none_or(|a| (a.timeline, a.until) < (before.timeline, before.until));
            if lost {
                bail!(
                    "backup {label} is the last backup that restores to the newest archived point ({} on timeline {}): deleting it leaves {}; take a new backup first, or pass --force",
                    before.until,
                    before.timeline,
                    after.map_or("nothing restorable".to_string(), |a| format!(
                        "only up to {} on timeline {}",
                        a.until, a.timeline
                    ))
                );
            }
        }
    }
    Ok(finish_plan(backups, doomed, Vec::new(), 0, None))
}

/// `pgkeep expire`: apply `[retention]`, or with `dry_run` only say what it would remove.
pub fn expire(cfg: &Config, dry_run: bool) -> Result<RetentionReport> {
    let repo = Repo::open(cfg)?;
    // A dry run changes nothing, so it needs no lock and leaves even dead RUNNING rows alone.
    let _lock = if dry_run {
        None
    } else {
        Some(lock(cfg, "expire")?)
    };
    expire_locked(cfg, &repo, dry_run)
}

/// `expire` for a caller that holds the backup lock already (a backup that just finished) or,
/// with `dry_run`, needs none.
pub(crate) fn expire_locked(cfg: &Config, repo: &Repo, dry_run: bool) -> Result<RetentionReport> {
    let started = Instant::now();
    if !dry_run {
        // Holding the lock, no backup is running: any RUNNING row is a dead one.
        mark_interrupted(&repo.catalog, true)?;
    }
    let backups = repo.catalog.backups()?;
    let chain = WalChain::from_repo(repo)?;
    let wal = archived_wal(repo)?;
    let plan = plan_expire(&backups, &wal, &chain, &cfg.retention.policy, Utc::now());
    finish(repo, plan, &backups, chain, dry_run, started)
}

/// `pgkeep delete LABEL [--force]`.
pub fn delete(cfg: &Config, label: &str, force: bool) -> Result<RetentionReport> {
    let started = Instant::now();
    let repo = Repo::open(cfg)?;
    let _lock = lock(cfg, "delete")?;
    mark_interrupted(&repo.catalog, true)?;
    let backups = repo.catalog.backups()?;
    let chain = WalChain::from_repo(&repo)?;
    let plan = plan_delete(&backups, label, &chain, force, Utc::now())?;
    finish(&repo, plan, &backups, chain, false, started)
}

/// `pgkeep pin LABEL [--until DATE]` (`pin` Some) and `pgkeep unpin LABEL` (None): the catalog
/// row, then a new pin object in the repository, so `catalog rebuild` keeps the pin.
pub fn pin(cfg: &Config, label: &str, pin: Option<Pin>) -> Result<BackupRecord> {
    let repo = Repo::open(cfg)?;
    let _lock = lock(cfg, if pin.is_some() { "pin" } else { "unpin" })?;
    let Some(b) = repo.catalog.backup(label)? else {
        bail!("backup {label} not found: `pgkeep show` lists the backups");
    };
    if let Some(p) = pin {
        if !b.status.is_restorable() {
            bail!(
                "backup {label} has status {} and cannot be pinned: only DONE or OK backups can",
                b.status
            );
        }
        if !p.holds_at(Utc::now()) {
            bail!(
                "pin of backup {label}{} has already ended: give a later --until",
                pin_text(pin)
            );
        }
    }
    let b = repo.catalog.set_pin(label, pin)?;
    crate::status::store_pin(repo.storage(), &b)?;
    Ok(b)
}

/// The `expire --json` / `delete --json` document.
pub fn report_json(r: &RetentionReport) -> serde_json::Value {
    let backups: Vec<serde_json::Value> = r
        .plan
        .backups
        .iter()
        .map(|d| {
            let (reason, depends_on) = match &d.why {
                Why::Unfinished => ("unfinished", None),
                Why::Failed => ("failed", None),
                Why::Policy => ("policy", None),
                Why::Asked => ("asked", None),
                Why::DependsOn(l) => ("depends", Some(l)),
            };
            serde_json::json!({
                "label": d.label,
                "type": d.backup_type.as_str(),
                "status": d.status.as_str(),
                "stored_bytes": d.stored_bytes,
                "reason": reason,
                "depends_on": depends_on,
            })
        })
        .collect();
    serde_json::json!({
        "dry_run": r.dry_run,
        "backups": backups,
        "wal": r.plan.wal,
        "wal_bytes": r.plan.wal_bytes,
        "restorable": crate::show::span_json(r.remaining.as_ref()),
        "elapsed_ms": r.elapsed.as_millis() as u64,
    })
}

/// ` until <time>` for a pin that ends, nothing for one that does not.
pub fn pin_text(pin: Option<Pin>) -> String {
    match pin {
        Some(Pin::Until(t)) => format!(
            " until {}",
            t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
        _ => String::new(),
    }
}

/// Carry the plan out unless `dry_run`, and report the span the kept backups and WAL restore.
fn finish(
    repo: &Repo,
    plan: Plan,
    backups: &[BackupRecord],
    mut chain: WalChain,
    dry_run: bool,
    started: Instant,
) -> Result<RetentionReport> {
    if !dry_run {
        carry_out(repo, &plan)?;
    }
    let seg = chain.seg_size();
    for name in &plan.wal {
        if let Ok(WalFileName::Segment { tli, segno }) = WalFileName::parse(name, seg) {
            chain.remove_segment(tli, segno);
        }
    }
    let gone: BTreeSet<&str> = plan.backups.iter().map(|d| d.label.as_str()).collect();
    let remaining = chain.span(backups.iter().filter(|b| !gone.contains(b.label.as_str())));
    Ok(RetentionReport {
        plan,
        dry_run,
        remaining,
        elapsed: started.elapsed(),
    })
}

fn lock(cfg: &Config, what: &str) -> Result<BackupLock> {
    let holder = format!(
        "{what}, pid {} on {}",
        crate::user::pid(),
        crate::user::hostname()
    );
    BackupLock::acquire(&cfg.repo, &holder)
}

/// The WAL archive as the repository holds it and the catalog records it: an object a crashed
/// expire left without its row is still removed, a row without an object still forgotten.
fn archived_wal(repo: &Repo) -> Result<Vec<ArchivedWal>> {
    let sysid = repo.identity.system_identifier;
    let prefix = keys::wal_prefix(sysid);
    let mut found: BTreeMap<String, u64> = BTreeMap::new();
    for key in repo
        .storage()
        .list(&prefix)
        .with_context(|| format!("listing the WAL archive {prefix}"))?
    {
        if let Some(name) = keys::wal_name_from_key(&key) {
            found.insert(name.to_string(), 0);
        }
    }
    for w in repo.catalog.wal_list()? {
        found.insert(w.name, w.stored_size);
    }
    Ok(found
        .into_iter()
        .map(|(name, stored_bytes)| ArchivedWal { name, stored_bytes })
        .collect())
}

/// Remove what the plan names, in the crash-safe order of the module doc.
fn carry_out(repo: &Repo, plan: &Plan) -> Result<()> {
    let pause = test_pause();
    for d in &plan.backups {
        let Some(b) = repo.catalog.backup(&d.label)? else {
            continue;
        };
        let b = if b.status == BackupStatus::Deleting {
            b
        } else {
            repo.catalog
                .set_status(&d.label, BackupStatus::Deleting, b.error.as_deref())?
        };
        // An interrupted deletion may have removed backup.ini already; never write it anew.
        let ini = keys::backup_meta(&d.label, BACKUP_INI);
        if repo.storage().size(&ini)?.is_some() {
            crate::status::store_status(repo.storage(), &b)?;
        }
    }
    for d in &plan.backups {
        remove_backup(repo, &d.label, &pause)
            .with_context(|| format!("removing backup {}", d.label))?;
    }
    // All rows in one transaction (one fsync, not one per file), then the objects.
    repo.catalog
        .delete_wal_files(&plan.wal)
        .context("removing the archived WAL files from the catalog")?;
    pause();
    let sysid = repo.identity.system_identifier;
    for name in &plan.wal {
        repo.storage()
            .delete(&keys::wal(sysid, name))
            .with_context(|| format!("removing WAL file {name}"))?;
        pause();
    }
    Ok(())
}

/// One backup's files, `backup.ini` last (so a catalog rebuilt meanwhile still sees it
/// DELETING), its directory, then its catalog row.
fn remove_backup(repo: &Repo, label: &str, pause: &(dyn Fn() + Sync)) -> Result<()> {
    let storage = repo.storage();
    let prefix = keys::backup_prefix(label);
    let ini = keys::backup_meta(label, BACKUP_INI);
    // backup.ini and the status objects (DELETING) go last: until then `catalog rebuild` still
    // sees a backup being deleted, never one that looks DONE with files missing.
    let status = keys::backup_status_prefix(label);
    let last = |k: &String| *k == ini || k.starts_with(&status);
    let files: Vec<String> = storage
        .list(&prefix)?
        .into_iter()
        .filter(|k| !last(k))
        .collect();
    // The data files go in any order (the backup is DELETING already); two at a time, since
    // most of a delete is waiting on the filesystem.
    crate::parallel::for_each(&files, 2, |key, _| {
        storage.delete(key)?;
        pause();
        Ok(())
    })?;
    storage.delete(&ini)?;
    storage.delete_prefix(&prefix)?;
    match repo.catalog.delete_backup(label) {
        Ok(()) | Err(CatalogError::BackupNotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    pause();
    Ok(())
}

fn test_pause() -> impl Fn() {
    let ms = std::env::var(TEST_PAUSE_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    move || {
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }
}

/// The start time of the oldest full whose chain the policy keeps whole; None keeps every
/// chain (no `full` or `window` part, too few fulls, or nothing older than the window).
fn chains_kept_from(
    live: &[&BackupRecord],
    family: &Family<'_>,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let mut parts = Vec::new();
    if let Some(n) = policy.full {
        let fulls: Vec<&&BackupRecord> = live
            .iter()
            .filter(|b| b.backup_type == BackupType::Full && b.status.is_restorable())
            .collect();
        parts.push(
            fulls
                .len()
                .checked_sub(n as usize)
                .map(|i| fulls[i].start_time),
        );
    }
    if let Some(window) = policy.window {
        // The newest backup consistent by the window's start reaches it: its chain stays, and
        // every chain after it.
        let start = now - window;
        let anchor = live
            .iter()
            .filter(|b| b.status.is_restorable() && b.recovery_time.is_some_and(|r| r <= start))
            .max_by_key(|b| (b.recovery_time, b.start_time));
        parts.push(anchor.map(|a| family.root(a).start_time));
    }
    if parts.is_empty() || parts.iter().any(Option::is_none) {
        return None;
    }
    parts.into_iter().flatten().min()
}

/// Orders the doomed backups newest first and totals the plan.
fn finish_plan(
    backups: &[BackupRecord],
    doomed: BTreeMap<&str, Why>,
    wal: Vec<String>,
    wal_bytes: u64,
    floor: Option<u64>,
) -> Plan {
    let mut gone: Vec<Doomed> = backups
        .iter()
        .filter_map(|b| {
            doomed.get(b.label.as_str()).map(|why| Doomed {
                label: b.label.clone(),
                backup_type: b.backup_type,
                status: b.status,
                stored_bytes: b.stored_bytes,
                why: why.clone(),
            })
        })
        .collect();
    // `backups` is oldest first and a child always starts after its parent.
    gone.reverse();
    Plan {
        backups: gone,
        wal_floor: (!wal.is_empty()).then_some(floor).flatten(),
        wal,
        wal_bytes,
    }
}

/// Parent links of the catalog's backups.
struct Family<'a> {
    by_label: HashMap<&'a str, &'a BackupRecord>,
}

impl<'a> Family<'a> {
    fn new(backups: &'a [BackupRecord]) -> Self {
        Family {
            by_label: backups.iter().map(|b| (b.label.as_str(), b)).collect(),
        }
    }

    /// The backup and its ancestors, the backup first; stops at a parent that is not recorded
    /// (or at a loop, which a damaged catalog could hold).
    fn lineage(&self, label: &'a str) -> Vec<&'a str> {
        let mut out = vec![label];
        let mut at = self.by_label.get(label);
        while let Some(parent) = at.and_then(|b| b.parent.as_deref()) {
            match self.by_label.get_key_value(parent) {
                Some((&p, b)) if !out.contains(&p) => {
                    out.push(p);
                    at = Some(b);
                }
                _ => break,
            }
        }
        out
    }

    /// The oldest recorded ancestor: the full backup of `b`'s chain.
    fn root(&self, b: &'a BackupRecord) -> &'a BackupRecord {
        let lineage = self.lineage(&b.label);
        lineage
            .last()
            .and_then(|l| self.by_label.get(l))
            .copied()
            .unwrap_or(b)
    }

    /// Whether `label` is `ancestor` or depends on it.
    fn descends_from(&self, label: &str, ancestor: &str) -> bool {
        match self.by_label.get_key_value(label) {
            Some((&l, _)) => self.lineage(l).contains(&ancestor),
            None => label == ancestor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use pgkeep_pg::WalSegSize;

    const SEG: u64 = 16 << 20;

    fn at(hours: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap() + TimeDelta::try_hours(hours).unwrap()
    }

    /// A DONE backup started at hour `h`, covering segments `start..=start` (stop a little later).
    fn b(label: &str, t: BackupType, parent: Option<&str>, h: i64, start: u64) -> BackupRecord {
        BackupRecord {
            label: label.into(),
            backup_type: t,
            parent: parent.map(str::to_string),
            start_lsn: Lsn(start * SEG + 40),
            stop_lsn: Some(Lsn(start * SEG + 4000)),
            start_time: at(h),
            recovery_time: Some(at(h) + TimeDelta::try_minutes(1).unwrap()),
            ..crate::walchain::tests::backup(1, 0, 0)
        }
    }

    /// Three chains: full + incr each, on hours 0, 10, 20, segments 2.., 12.., 22...
    fn three_chains() -> Vec<BackupRecord> {
        use BackupType::*;
        vec![
            b("F1", Full, None, 0, 2),
            b("I1", Incr, Some("F1"), 5, 7),
            b("F2", Full, None, 10, 12),
            b("I2", Incr, Some("F2"), 15, 17),
            b("F3", Full, None, 20, 22),
            b("I3", Incr, Some("F3"), 25, 27),
        ]
    }

    /// Segments 1..=30 of timeline 1, each 100 bytes stored.
    fn archive() -> (Vec<ArchivedWal>, WalChain) {
        let mut chain = WalChain::new(WalSegSize::new(SEG).unwrap());
        let mut wal = Vec::new();
        for s in 1..=30 {
            chain.add_segment(TimelineId(1), s);
            wal.push(ArchivedWal {
                name: chain.name(TimelineId(1), s),
                stored_bytes: 100,
            });
        }
        (wal, chain)
    }

    fn labels(p: &Plan) -> Vec<&str> {
        p.backups.iter().map(|d| d.label.as_str()).collect()
    }

    fn policy(full: Option<u32>, window_hours: Option<i64>, diff: Option<u32>) -> Policy {
        Policy {
            full,
            window: window_hours.and_then(TimeDelta::try_hours),
            diff,
        }
    }

    /// The plan for [`three_chains`] over [`archive`] at hour 30.
    fn plan_three(full: Option<u32>, window_hours: Option<i64>) -> Plan {
        let (wal, chain) = archive();
        let policy = policy(full, window_hours, None);
        plan_expire(&three_chains(), &wal, &chain, &policy, at(30))
    }

    #[test]
    fn full_2_removes_the_oldest_chain_newest_first_and_only_the_wal_before_the_kept_ones() {
        let p = plan_three(Some(2), None);
        assert_eq!(labels(&p), ["I1", "F1"]);
        assert!(p.backups.iter().all(|d| d.why == Why::Policy));
        // Segments 1..=11 go: F2 starts in 12.
        assert_eq!(p.wal.len(), 11);
        assert_eq!(p.wal.last().unwrap(), "00000001000000000000000B");
        assert_eq!(p.wal_bytes, 1100);
        assert_eq!(p.wal_floor, Some(12));
        // Keeping all three (or with fewer fulls than asked for), only the WAL before the
        // oldest goes.
        for n in [3, 4] {
            let p = plan_three(Some(n), None);
            assert!(p.backups.is_empty());
            assert_eq!(p.wal, ["000000010000000000000001"]);
        }
    }

    #[test]
    fn no_policy_only_finishes_interrupted_deletions() {
        let (wal, chain) = archive();
        let mut backups = three_chains();
        backups[1].status = BackupStatus::Deleting;
        backups[3].status = BackupStatus::Error;
        let p = plan_expire(&backups, &wal, &chain, &Policy::default(), at(30));
        assert_eq!(labels(&p), ["I1"]);
        assert_eq!(p.backups[0].why, Why::Unfinished);
        assert!(p.wal.is_empty());
        // With a policy, failed backups go too.
        let p = plan_expire(&backups, &wal, &chain, &policy(Some(3), None, None), at(30));
        assert_eq!(labels(&p), ["I2", "I1"]);
        assert_eq!(p.backups[0].why, Why::Failed);
    }

    #[test]
    fn a_window_keeps_the_older_full_that_reaches_its_start() {
        // At hour 30 a 12-hour window starts at hour 18: I2 (hour 15) is the newest backup
        // consistent by then, so F2's chain stays although F2 is older than the window.
        let p = plan_three(None, Some(12));
        assert_eq!(labels(&p), ["I1", "F1"]);
        assert_eq!(p.wal_floor, Some(12));
        // A window starting before every backup keeps every backup.
        let p = plan_three(None, Some(40));
        assert!(p.backups.is_empty());
        // full = 1 alone would drop F2; the window keeps it: the parts add up.
        let p = plan_three(Some(1), Some(12));
        assert_eq!(labels(&p), ["I1", "F1"]);
    }

    #[test]
    fn diff_keeps_the_newest_diffs_with_their_incrs() {
        use BackupType::*;
        let (wal, chain) = archive();
        let backups = vec![
            b("F1", Full, None, 0, 2),
            b("D1", Diff, Some("F1"), 2, 4),
            b("I1", Incr, Some("D1"), 3, 5),
            b("D2", Diff, Some("F1"), 4, 6),
            b("D3", Diff, Some("F1"), 6, 8),
            b("I3", Incr, Some("D3"), 7, 9),
        ];
        let p = plan_expire(&backups, &wal, &chain, &policy(None, None, Some(2)), at(30));
        assert_eq!(labels(&p), ["I1", "D1"]);
        // The full's start is still needed: no WAL after segment 1 goes.
        assert_eq!(p.wal, ["000000010000000000000001"]);
    }

    #[test]
    fn a_pinned_backup_stays_with_its_parents_and_only_its_own_wal() {
        let (wal, chain) = archive();
        let mut backups = three_chains();
        backups[1].pinned = Some(Pin::Forever); // I1
        let p = plan_expire(&backups, &wal, &chain, &policy(Some(2), None, None), at(30));
        assert!(labels(&p).is_empty(), "{p:?}");
        // I1's segment 7 stays (F1, kept for it, needs none of its own); 1..=6 and 8..=11 go.
        assert_eq!(p.wal.len(), 10);
        assert!(!p.wal.contains(&"000000010000000000000007".to_string()));
        assert!(p.wal.contains(&"000000010000000000000002".to_string()));
        // A pin that has ended holds nothing.
        backups[1].pinned = Some(Pin::Until(at(29)));
        let p = plan_expire(&backups, &wal, &chain, &policy(Some(2), None, None), at(30));
        assert_eq!(labels(&p), ["I1", "F1"]);
    }

    #[test]
    fn backup_history_files_follow_their_segment_and_history_files_their_timeline() {
        let (mut wal, mut chain) = archive();
        for name in [
            "000000010000000000000002.00000028.backup",
            "00000001000000000000000C.00000028.backup",
            "00000002.history",
        ] {
            wal.push(ArchivedWal {
                name: name.into(),
                stored_bytes: 1,
            });
        }
        // Timeline 2 branched off 1 in segment 8, before every kept backup: nobody follows it.
        // Timeline 3, the newest, branched off 1 in segment 25 and stays.
        for (tli, at) in [(2, 8), (3, 25)] {
            chain.add_history(
                TimelineId(tli),
                &[pgkeep_pg::HistoryEntry {
                    parent: TimelineId(1),
                    switchpoint: Lsn(at * SEG),
                }],
            );
        }
        wal.push(ArchivedWal {
            name: "00000003.history".into(),
            stored_bytes: 1,
        });
        let full_2 = policy(Some(2), None, None);
        let p = plan_expire(&three_chains(), &wal, &chain, &full_2, at(30));
        assert!(p
            .wal
            .contains(&"000000010000000000000002.00000028.backup".to_string()));
        assert!(!p
            .wal
            .contains(&"00000001000000000000000C.00000028.backup".to_string()));
        assert!(p.wal.contains(&"00000002.history".to_string()));
        assert!(!p.wal.contains(&"00000003.history".to_string()));
        // A kept backup on timeline 2 keeps its history, as does one that can follow it.
        let mut backups = three_chains();
        backups[5].timeline = 2;
        let p = plan_expire(&backups, &wal, &chain, &policy(Some(2), None, None), at(30));
        assert!(!p.wal.contains(&"00000002.history".to_string()));
        let mut backups = three_chains();
        backups[1].pinned = Some(Pin::Forever); // I1 stopped in segment 7, before the switch
        let p = plan_expire(&backups, &wal, &chain, &policy(Some(2), None, None), at(30));
        assert!(!p.wal.contains(&"00000002.history".to_string()));
    }

    #[test]
    fn a_running_backup_keeps_its_wal_and_is_never_removed() {
        let (wal, chain) = archive();
        let mut backups = three_chains();
        backups[0].status = BackupStatus::Running;
        let p = plan_expire(&backups, &wal, &chain, &policy(Some(1), None, None), at(30));
        assert_eq!(labels(&p), ["I2", "F2", "I1"]);
        assert_eq!(p.wal_floor, Some(2));
    }

    #[test]
    fn delete_takes_dependents_and_refuses_the_last_backup_reaching_the_newest_point() {
        let (_, chain) = archive();
        let backups = three_chains();
        let p = plan_delete(&backups, "F2", &chain, false, at(30)).unwrap();
        assert_eq!(labels(&p), ["I2", "F2"]);
        assert_eq!(p.backups[0].why, Why::DependsOn("F2".into()));
        // The archive is unbroken, so older backups still reach the end: I3 may go.
        plan_delete(&backups, "I3", &chain, false, at(30)).unwrap();
        // Only F3's chain reaches past a hole at segment 20.
        let mut holed = chain.clone();
        holed.remove_segment(TimelineId(1), 20);
        let e = plan_delete(&backups, "F3", &holed, false, at(30))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("backup F3 is the last backup that restores to the newest archived point"),
            "{e}"
        );
        assert!(e.contains("pass --force"), "{e}");
        assert_eq!(
            labels(&plan_delete(&backups, "F3", &holed, true, at(30)).unwrap()),
            ["I3", "F3"]
        );
        let mut pinned = backups.clone();
        pinned[3].pinned = Some(Pin::Forever);
        let e = plan_delete(&pinned, "F2", &chain, false, at(30))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "backup I2 is pinned: `pgkeep unpin I2` first, or pass --force"
        );
        assert!(plan_delete(&backups, "nope", &chain, false, at(30)).is_err());
    }
}
