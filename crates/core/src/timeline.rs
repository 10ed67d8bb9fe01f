//! Restore's plan: which backup to start from and which timeline recovery will follow.
//!
//! PostgreSQL starts recovery on the timeline of the backup's checkpoint and follows the target
//! timeline's history; it refuses to start when the backup is not on that history ("requested
//! timeline N is not a child of this server's history", StartupXLOG / InitWalRecovery,
//! xlogrecovery.c). So a backup serves a target on timeline T only if its timeline is on T's
//! path (per [`timeline_path`]) and its stop LSN is at or before the point where that path leaves
//! its timeline. [`plan_restore`] decides this without I/O; [`Histories::load`] reads what it
//! needs from the archive.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{anyhow, bail, Result};
use chrono::{DateTime, Utc};
use pgkeep_catalog::{BackupRecord, BackupStatus, WalKind};
use pgkeep_pg::{timeline_path, HistoryEntry, Lsn, TimelineId, TimelineSpan};

use crate::repo::Repo;
use crate::restore::{RecoveryTarget, TargetTimeline};
use crate::walchain::read_history;

/// The archive's timeline history files: each one's entries, or why it could not be read.
/// An unreadable file is an error only when a plan needs it.
#[derive(Clone, Debug, Default)]
pub struct Histories {
    files: BTreeMap<TimelineId, std::result::Result<Vec<HistoryEntry>, String>>,
}

/// The backup restore starts from and the timeline recovery follows.
#[derive(Clone, Debug)]
pub struct Choice {
    pub backup: BackupRecord,
    /// The timeline recovery follows (`recovery_target_timeline` resolved).
    pub timeline: TimelineId,
    pub why: TimelineReason,
    /// Newer backups that could reach the target but are not on the timeline's history,
    /// newest first.
    pub skipped: Vec<Skipped>,
}

/// Why recovery follows the timeline it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimelineReason {
    /// The newest timeline descending from the backup's (PostgreSQL's default, `latest`).
    Latest,
    /// `--target-timeline current`: the backup's own.
    Current,
    /// `--target-timeline N`.
    Requested,
}

/// A backup passed over, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub label: String,
    pub off: OffPath,
}

/// How a backup misses the history of the timeline recovery follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffPath {
    /// The backup's timeline is not among the target's ancestors at all.
    NotInHistory {
        backup: TimelineId,
        target: TimelineId,
    },
    /// The target's history leaves the backup's timeline at `at`, before the backup stopped.
    LeftBefore {
        backup: TimelineId,
        target: TimelineId,
        at: Lsn,
        stop: Lsn,
    },
}

impl Histories {
    pub fn new() -> Histories {
        Histories::default()
    }

    /// Every history file the catalog records, read from the repository (a few bytes each).
    pub fn load(repo: &Repo) -> Result<Histories> {
        let mut h = Histories::new();
        for w in repo.catalog.wal_list()? {
            if w.kind != WalKind::History {
                continue;
            }
            let tli = TimelineId(w.timeline);
            match read_history(repo, &w.name, tli, Some((w.size, w.crc32c))) {
                Ok(entries) => h.insert(tli, entries),
                Err(e) => h.insert_unreadable(tli, format!("{e:#}")),
            }
        }
        Ok(h)
    }

    pub fn insert(&mut self, tli: TimelineId, entries: Vec<HistoryEntry>) {
        self.files.insert(tli, Ok(entries));
    }

    /// Records a history file that exists but cannot be read; `error` names it.
    pub fn insert_unreadable(&mut self, tli: TimelineId, error: String) {
        self.files.insert(tli, Err(error));
    }

    /// Whether timeline `tli` exists as far as recovery can tell: timeline 1 always does, any
    /// other only with a history file (port of existsTimeLineHistory, timeline.c).
    fn exists(&self, tli: TimelineId) -> bool {
        tli == TimelineId(1) || self.files.contains_key(&tli)
    }

    /// The newest timeline descending from `tli`: probe `tli + 1`, `tli + 2`, ... while a
    /// history file exists (port of findNewestTimeLine, timeline.c). Like PostgreSQL, this
    /// assumes a later timeline descends from an earlier one.
    fn newest_from(&self, tli: TimelineId) -> TimelineId {
        let mut newest = tli;
        while let Some(next) = newest.0.checked_add(1).map(TimelineId) {
            if !self.files.contains_key(&next) {
                break;
            }
            newest = next;
        }
        newest
    }

    /// The path of timeline `tli` through its ancestors. A timeline without a history file has
    /// no ancestors, as readTimeLineHistory assumes (timeline.c).
    pub fn path(&self, tli: TimelineId) -> Result<Vec<TimelineSpan>> {
        match self.files.get(&tli) {
            Some(Ok(entries)) => Ok(timeline_path(tli, entries)),
            Some(Err(e)) => bail!(
                "cannot follow timeline {tli}: {e}: run `pgkeep validate`, or restore with --target-timeline current"
            ),
            None => Ok(timeline_path(tli, &[])),
        }
    }
}

/// Choose the backup to restore and the timeline recovery follows.
///
/// `backups` come as the catalog lists them, oldest first. With `label`, that backup or an
/// error; otherwise the newest restorable backup that can reach `target` and lies on the history
/// of its target timeline (`timeline`, default `latest`, resolved per backup as PostgreSQL
/// would: from the backup's own timeline).
pub fn plan_restore(
    backups: &[BackupRecord],
    histories: &Histories,
    target: &RecoveryTarget,
    timeline: Option<TargetTimeline>,
    label: Option<&str>,
) -> Result<Choice> {
    let timeline = timeline.unwrap_or(TargetTimeline::Latest);
    if let TargetTimeline::Id(n) = timeline {
        // PostgreSQL stops at startup with "recovery target timeline N does not exist".
        if !histories.exists(n) {
            bail!(
                "recovery target timeline {n} does not exist: the archive has no {:08X}.history; `pgkeep show --json` lists the timelines of each backup's windows",
                n.0
            );
        }
    }
    if let Some(label) = label {
        let b = backups
            .iter()
            .find(|b| b.label == label)
            .ok_or_else(|| anyhow!("backup {label} not found: `pgkeep show` lists the backups"))?;
        usable(b)?;
        if let RecoveryTarget::Time(t) = target {
            if b.recovery_time.is_some_and(|r| r > *t) {
                bail!(
                    "backup {label} is consistent only from {}, after the target time {}: choose an older backup",
                    rfc3339(b.recovery_time.unwrap_or_default()),
                    rfc3339(*t)
                );
            }
        }
        let (tli, why) = target_timeline(b, timeline, histories);
        if let Some(off) = off_path(b, tli, &histories.path(tli)?) {
            bail!(
                "backup {label} is not on the history of timeline {tli}, which recovery would follow ({}): {off}; choose a backup of that history, or --target-timeline current",
                why.describe(tli)
            );
        }
        return Ok(Choice {
            backup: b.clone(),
            timeline: tli,
            why,
            skipped: Vec::new(),
        });
    }

    let restorable: Vec<&BackupRecord> = backups
        .iter()
        .filter(|b| b.status.is_restorable())
        .collect();
    if restorable.is_empty() {
        let corrupt = backups.iter().any(|b| b.status == BackupStatus::Corrupt);
        bail!(
            "no restorable backup in the repository{}: take one with `pgkeep backup --type full`",
            if corrupt {
                " (some are CORRUPT: see `pgkeep validate`)"
            } else {
                ""
            }
        );
    }
    // Newest first, those that can reach the target at all.
    let candidates: Vec<&BackupRecord> = restorable
        .iter()
        .rev()
        .copied()
        .filter(|b| reaches(b, target))
        .collect();
    if candidates.is_empty() {
        return Err(before_every_backup(target, &restorable));
    }
    let mut skipped: Vec<Skipped> = Vec::new();
    let mut first_target = None;
    for b in candidates {
        let (tli, why) = target_timeline(b, timeline, histories);
        first_target.get_or_insert((tli, why));
        match off_path(b, tli, &histories.path(tli)?) {
            None => {
                return Ok(Choice {
                    backup: b.clone(),
                    timeline: tli,
                    why,
                    skipped,
                })
            }
            Some(off) => skipped.push(Skipped {
                label: b.label.clone(),
                off,
            }),
        }
    }
    // Every candidate was skipped, so there was at least one.
    let (tli, why) = first_target.unwrap_or((TimelineId(1), TimelineReason::Latest));
    let newest = &skipped[0];
    bail!(
        "no backup that can reach the target is on the history of timeline {tli} ({}): the newest, {}, is not ({}); restore with --target-timeline current, or take a new backup",
        why.describe(tli),
        newest.label,
        newest.off
    )
}

impl TimelineReason {
    fn describe(self, tli: TimelineId) -> String {
        match self {
            TimelineReason::Latest => "latest in the archive".to_string(),
            TimelineReason::Current => {
                "the backup's own, as --target-timeline current asks".to_string()
            }
            TimelineReason::Requested => format!("as --target-timeline {tli} asks"),
        }
    }
}

/// `backup X on timeline 1; recovery follows timeline 2 (latest in the archive); newer backup Y
/// skipped: ...`
impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backup {} on timeline {}; recovery follows timeline {} ({})",
            self.backup.label,
            self.backup.timeline,
            self.timeline,
            self.why.describe(self.timeline)
        )?;
        for s in &self.skipped {
            write!(f, "; newer backup {} skipped: {}", s.label, s.off)?;
        }
        Ok(())
    }
}

impl fmt::Display for OffPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OffPath::NotInHistory { backup, target } => {
                write!(f, "timeline {backup} is not in the history of timeline {target}")
            }
            OffPath::LeftBefore {
                backup,
                target,
                at,
                stop,
            } => write!(
                f,
                "timeline {backup} left the history of timeline {target} at {at} before its stop LSN {stop}"
            ),
        }
    }
}

/// Whether recovery from `b` can stop at `target` at all: a time or LSN target must not come
/// before the backup is consistent.
fn reaches(b: &BackupRecord, target: &RecoveryTarget) -> bool {
    match target {
        RecoveryTarget::Time(t) => b.recovery_time.is_some_and(|r| r <= *t),
        RecoveryTarget::Lsn(lsn) => b.stop_lsn.is_some_and(|s| s <= *lsn),
        _ => true,
    }
}

/// The error when no restorable backup reaches `target`, naming the earliest point one does.
fn before_every_backup(target: &RecoveryTarget, restorable: &[&BackupRecord]) -> anyhow::Error {
    match target {
        RecoveryTarget::Time(t) => {
            let earliest = restorable.iter().filter_map(|b| b.recovery_time).min();
            anyhow!(
                "target time {} is before every backup: the earliest restorable time is {}",
                rfc3339(*t),
                rfc3339(earliest.unwrap_or_default())
            )
        }
        RecoveryTarget::Lsn(lsn) => {
            let earliest = restorable.iter().filter_map(|b| b.stop_lsn).min();
            anyhow!(
                "target LSN {lsn} is before every backup: the earliest restorable LSN is {}",
                earliest.unwrap_or_default()
            )
        }
        // Every restorable backup reaches the other targets.
        _ => anyhow!("no restorable backup"),
    }
}

/// The timeline recovery from `b` follows, and why.
fn target_timeline(
    b: &BackupRecord,
    timeline: TargetTimeline,
    histories: &Histories,
) -> (TimelineId, TimelineReason) {
    let own = TimelineId(b.timeline);
    match timeline {
        TargetTimeline::Latest => (histories.newest_from(own), TimelineReason::Latest),
        TargetTimeline::Current => (own, TimelineReason::Current),
        TargetTimeline::Id(n) => (n, TimelineReason::Requested),
    }
}

/// Why `b` is not on `path`, the history of timeline `target`; `None` when it is.
fn off_path(b: &BackupRecord, target: TimelineId, path: &[TimelineSpan]) -> Option<OffPath> {
    let backup = TimelineId(b.timeline);
    let Some(span) = path.iter().find(|s| s.tli == backup) else {
        return Some(OffPath::NotInHistory { backup, target });
    };
    // A backup that never stopped cannot be restored anyway (restore says so when it checks
    // the WAL); judge it by where it started.
    let stop = b.stop_lsn.unwrap_or(b.start_lsn);
    match span.end {
        Some(at) if stop > at => Some(OffPath::LeftBefore {
            backup,
            target,
            at,
            stop,
        }),
        _ => None,
    }
}

fn usable(b: &BackupRecord) -> Result<()> {
    match b.status {
        s if s.is_restorable() => Ok(()),
        BackupStatus::Corrupt => bail!(
            "backup {} is CORRUPT: `pgkeep validate {}` lists the damaged files; restore another backup with --backup",
            b.label,
            b.label
        ),
        s => bail!(
            "backup {} has status {} and cannot be restored: only DONE or OK backups can",
            b.label,
            s.as_str()
        ),
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// A DONE full backup on `tli` from `start` to `stop`, consistent from second `at`.
    fn backup(label: &str, tli: u32, start: u64, stop: u64, at: i64) -> BackupRecord {
        BackupRecord {
            label: label.into(),
            recovery_time: Some(time(at)),
            ..crate::walchain::tests::backup(tli, start, stop)
        }
    }

    fn time(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
    }

    fn entry(parent: u32, switchpoint: u64) -> HistoryEntry {
        HistoryEntry {
            parent: TimelineId(parent),
            switchpoint: Lsn(switchpoint),
        }
    }

    fn histories(files: &[(u32, &[HistoryEntry])]) -> Histories {
        let mut h = Histories::new();
        for (tli, entries) in files {
            h.insert(TimelineId(*tli), entries.to_vec());
        }
        h
    }

    /// B1 and B2 on timeline 1; timeline 2 branched off at 0x500, after B1 stopped (0x300) and
    /// before B2 did (0x600): the in-place point-in-time recovery from B1.
    fn branched() -> (Vec<BackupRecord>, Histories) {
        let backups = vec![
            backup("B1", 1, 0x100, 0x300, 10),
            backup("B2", 1, 0x580, 0x600, 30),
        ];
        (backups, histories(&[(2, &[entry(1, 0x500)])]))
    }

    fn plan(
        backups: &[BackupRecord],
        h: &Histories,
        target: &RecoveryTarget,
        timeline: Option<TargetTimeline>,
        label: Option<&str>,
    ) -> Result<Choice> {
        plan_restore(backups, h, target, timeline, label)
    }

    fn err(r: Result<Choice>) -> String {
        let e = format!("{:#}", r.unwrap_err());
        assert!(!e.contains('\n'), "{e}");
        e
    }

    #[test]
    fn latest_skips_a_newer_backup_its_timeline_left_before_it_stopped() {
        let (backups, h) = branched();
        let c = plan(&backups, &h, &RecoveryTarget::EndOfArchive, None, None).unwrap();
        assert_eq!(c.backup.label, "B1");
        assert_eq!(c.timeline, TimelineId(2));
        assert_eq!(c.why, TimelineReason::Latest);
        assert_eq!(
            c.skipped,
            [Skipped {
                label: "B2".into(),
                off: OffPath::LeftBefore {
                    backup: TimelineId(1),
                    target: TimelineId(2),
                    at: Lsn(0x500),
                    stop: Lsn(0x600)
                }
            }]
        );
        assert_eq!(
            c.to_string(),
            "backup B1 on timeline 1; recovery follows timeline 2 (latest in the archive); \
             newer backup B2 skipped: timeline 1 left the history of timeline 2 at 0/500 before its stop LSN 0/600"
        );
        // Explicit `latest` is the default, and every target kind chooses the same way.
        for target in [
            RecoveryTarget::Immediate,
            RecoveryTarget::Time(time(40)),
            RecoveryTarget::Lsn(Lsn(0x700)),
            RecoveryTarget::Xid(1000),
            RecoveryTarget::Name("x".into()),
        ] {
            let c = plan(&backups, &h, &target, Some(TargetTimeline::Latest), None).unwrap();
            assert_eq!(
                (c.backup.label.as_str(), c.timeline.0),
                ("B1", 2),
                "{target:?}"
            );
        }
    }

    #[test]
    fn current_and_a_numbered_timeline() {
        let (backups, h) = branched();
        let end = RecoveryTarget::EndOfArchive;
        let c = plan(&backups, &h, &end, Some(TargetTimeline::Current), None).unwrap();
        assert_eq!((c.backup.label.as_str(), c.timeline.0), ("B2", 1));
        assert!(c.skipped.is_empty());
        assert!(c
            .to_string()
            .contains("recovery follows timeline 1 (the backup's own"));
        let c = plan(
            &backups,
            &h,
            &end,
            Some(TargetTimeline::Id(TimelineId(1))),
            None,
        )
        .unwrap();
        assert_eq!((c.backup.label.as_str(), c.timeline.0), ("B2", 1));
        let c = plan(
            &backups,
            &h,
            &end,
            Some(TargetTimeline::Id(TimelineId(2))),
            None,
        )
        .unwrap();
        assert_eq!((c.backup.label.as_str(), c.timeline.0), ("B1", 2));
        assert!(
            c.to_string().contains("(as --target-timeline 2 asks)"),
            "{c}"
        );
        let e = err(plan(
            &backups,
            &h,
            &end,
            Some(TargetTimeline::Id(TimelineId(3))),
            None,
        ));
        assert!(
            e.contains("recovery target timeline 3 does not exist"),
            "{e}"
        );
        assert!(e.contains("00000003.history"), "{e}");
    }

    #[test]
    fn a_named_backup_off_the_history_is_refused_naming_the_timeline() {
        let (backups, h) = branched();
        let end = RecoveryTarget::EndOfArchive;
        let e = err(plan(&backups, &h, &end, None, Some("B2")));
        assert!(
            e.contains("backup B2 is not on the history of timeline 2"),
            "{e}"
        );
        assert!(e.contains("at 0/500 before its stop LSN 0/600"), "{e}");
        let c = plan(
            &backups,
            &h,
            &end,
            Some(TargetTimeline::Current),
            Some("B2"),
        )
        .unwrap();
        assert_eq!((c.backup.label.as_str(), c.timeline.0), ("B2", 1));
        let c = plan(&backups, &h, &end, None, Some("B1")).unwrap();
        assert_eq!((c.backup.label.as_str(), c.timeline.0), ("B1", 2));
    }

    #[test]
    fn no_backup_on_the_history_is_an_error_naming_the_timeline() {
        let (backups, h) = branched();
        let e = err(plan(
            &backups[1..],
            &h,
            &RecoveryTarget::EndOfArchive,
            None,
            None,
        ));
        assert!(
            e.contains("is on the history of timeline 2 (latest in the archive)"),
            "{e}"
        );
        assert!(e.contains("B2"), "{e}");
    }

    #[test]
    fn latest_is_probed_upward_from_each_backups_timeline() {
        // 1 -> 2 at 0x500 -> 3 at 0x900; a backup on 2 and an older one on 1.
        let backups = vec![
            backup("B1", 1, 0x100, 0x300, 10),
            backup("B2", 2, 0x700, 0x800, 20),
        ];
        let h = histories(&[
            (2, &[entry(1, 0x500)]),
            (3, &[entry(1, 0x500), entry(2, 0x900)]),
        ]);
        let c = plan(&backups, &h, &RecoveryTarget::EndOfArchive, None, None).unwrap();
        assert_eq!((c.backup.label.as_str(), c.timeline.0), ("B2", 3));
        // A gap in the numbering stops the probe, as in findNewestTimeLine.
        let h = histories(&[
            (2, &[entry(1, 0x500)]),
            (4, &[entry(1, 0x500), entry(2, 0x900)]),
        ]);
        let c = plan(&backups, &h, &RecoveryTarget::EndOfArchive, None, None).unwrap();
        assert_eq!((c.backup.label.as_str(), c.timeline.0), ("B2", 2));
    }

    #[test]
    fn a_timeline_that_owns_nothing_in_a_history_is_not_on_it() {
        // Timeline 3's file reads `1 0x900`, `2 0x400`: recovery followed 2 but stopped on 1 at
        // 0x400, before 2 began at 0x900. A backup of 2 is not on 3's history; one of 1 that
        // stopped before 0x400 is.
        let backups = vec![
            backup("B1", 1, 0x100, 0x300, 10),
            backup("B2", 2, 0x980, 0xa00, 20),
        ];
        let h = histories(&[
            (2, &[entry(1, 0x900)]),
            (3, &[entry(1, 0x900), entry(2, 0x400)]),
        ]);
        let c = plan(&backups, &h, &RecoveryTarget::EndOfArchive, None, None).unwrap();
        assert_eq!((c.backup.label.as_str(), c.timeline.0), ("B1", 3));
        assert_eq!(
            c.skipped[0].off.to_string(),
            "timeline 2 is not in the history of timeline 3"
        );
        // Followed from B1, timeline 1 is left at 0x400, so a backup of 1 stopping later is not.
        let late = [backup("B1", 1, 0x100, 0x500, 10)];
        let e = err(plan(&late, &h, &RecoveryTarget::EndOfArchive, None, None));
        assert!(e.contains("timeline 3"), "{e}");
        assert!(e.contains("at 0/400 before its stop LSN 0/500"), "{e}");
    }

    #[test]
    fn an_unreadable_history_is_an_error_only_when_needed() {
        let (backups, mut h) = branched();
        h.insert_unreadable(
            TimelineId(2),
            "reading 00000002.history: CRC-32C mismatch".into(),
        );
        let e = err(plan(
            &backups,
            &h,
            &RecoveryTarget::EndOfArchive,
            None,
            None,
        ));
        assert!(e.contains("00000002.history"), "{e}");
        assert!(e.contains("timeline 2"), "{e}");
        let c = plan(
            &backups,
            &h,
            &RecoveryTarget::EndOfArchive,
            Some(TargetTimeline::Current),
            None,
        )
        .unwrap();
        assert_eq!(c.backup.label, "B2");
    }

    #[test]
    fn statuses_and_targets_before_every_backup_are_refused_as_before() {
        let (mut backups, h) = branched();
        let end = RecoveryTarget::EndOfArchive;
        // A time target picks among the backups consistent by then, on the timeline.
        let c = plan(&backups, &h, &RecoveryTarget::Time(time(20)), None, None).unwrap();
        assert_eq!(c.backup.label, "B1");
        assert!(c.skipped.is_empty());
        let e = err(plan(
            &backups,
            &h,
            &RecoveryTarget::Time(time(5)),
            None,
            None,
        ));
        assert!(
            e.contains("the earliest restorable time is 2027-01-15T08:00:10"),
            "{e}"
        );
        let e = err(plan(
            &backups,
            &h,
            &RecoveryTarget::Lsn(Lsn(0x200)),
            None,
            None,
        ));
        assert!(e.contains("the earliest restorable LSN is 0/300"), "{e}");
        let e = err(plan(
            &backups,
            &h,
            &RecoveryTarget::Time(time(5)),
            None,
            Some("B1"),
        ));
        assert!(e.contains("consistent only from"), "{e}");
        let e = err(plan(&backups, &h, &end, None, Some("B9")));
        assert!(e.contains("backup B9 not found"), "{e}");
        backups[0].status = BackupStatus::Corrupt;
        let e = err(plan(&backups, &h, &end, None, Some("B1")));
        assert!(e.contains("backup B1 is CORRUPT"), "{e}");
        backups[1].status = BackupStatus::Error;
        let e = err(plan(&backups, &h, &end, None, Some("B2")));
        assert!(e.contains("has status ERROR"), "{e}");
        let e = err(plan(&backups, &h, &end, None, None));
        assert!(
            e.contains("no restorable backup") && e.contains("CORRUPT"),
            "{e}"
        );
    }
}
