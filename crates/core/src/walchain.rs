//! The shape of the WAL archive: which segments each timeline holds, where timelines branch off
//! (from their history files), where the archive has gaps, and how far each backup can be rolled
//! forward from there (its restorable windows).
//!
//! Recovery reads a segment from the newest timeline of its path that had begun by then
//! (`XLogFileReadAnyTLI`, src/backend/access/transam/xlogrecovery.c): on a timeline that branched
//! off at switch point `sp`, the segment holding `sp` and everything after come from the child,
//! everything before from the parent. `.partial` files are never asked for by recovery, so they
//! do not count.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use pgkeep_catalog::BackupRecord;
use pgkeep_pg::{
    parse_history, segment_name, timeline_path, HistoryEntry, Lsn, TimelineId, TimelineSpan,
    WalFileName, WalSegSize,
};
use pgkeep_repo::{fetch_decompressed, keys};

use crate::repo::Repo;

/// Segments present per timeline and where each timeline began.
#[derive(Clone, Debug)]
pub struct WalChain {
    seg: WalSegSize,
    segments: BTreeMap<TimelineId, BTreeSet<u64>>,
    /// Effective direct parent and switch point of each timeline with a known history file.
    branches: BTreeMap<TimelineId, HistoryEntry>,
    /// Segments before this one are not expected to be continuous (see [`WalChain::set_floor`]).
    floor: u64,
}

/// The points recovery can reach from the backups given, without a gap: from the earliest
/// `recovery_time` of a backup whose WAL runs unbroken to the newest restorable point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// Earliest time recovery can stop at.
    pub from: chrono::DateTime<chrono::Utc>,
    /// The backup that time comes from.
    pub from_label: String,
    /// The timeline of the newest point.
    pub timeline: TimelineId,
    /// First LSN past the restorable WAL.
    pub until: Lsn,
}

/// Missing segments `first..=last` of one timeline, between segments the archive holds or
/// should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    pub timeline: TimelineId,
    pub first: u64,
    pub last: u64,
}

/// How far a backup can be rolled forward on one timeline: recovery can reach any point from
/// the backup's `recovery_time` up to `until`, the end of the last segment of an unbroken run
/// of WAL from the backup's start segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub timeline: TimelineId,
    /// First LSN past the restorable WAL (the end of `last_wal`).
    pub until: Lsn,
    /// The last segment of the unbroken run.
    pub last_wal: String,
}

impl WalChain {
    pub fn new(seg: WalSegSize) -> WalChain {
        WalChain {
            seg,
            segments: BTreeMap::new(),
            branches: BTreeMap::new(),
            floor: 0,
        }
    }

    /// The chain the repository's WAL objects form, without reading any segment: what `show`
    /// reports. Objects count whether or not the catalog has recorded them yet, since
    /// `archive-get` serves them either way. History files are read (they are a few bytes); one
    /// that cannot be read is left out, so its timeline is not followed.
    pub fn from_repo(repo: &Repo) -> Result<WalChain> {
        let seg = repo.wal_seg_size()?;
        let prefix = keys::wal_prefix(repo.identity.system_identifier);
        let stored = repo
            .storage()
            .list(&prefix)
            .with_context(|| format!("listing the WAL archive {prefix}"))?;
        let mut chain = WalChain::new(seg);
        for key in &stored {
            let Some(name) = keys::wal_name_from_key(key) else {
                continue;
            };
            match WalFileName::parse(name, seg) {
                Ok(WalFileName::Segment { tli, segno }) => chain.add_segment(tli, segno),
                Ok(WalFileName::History { tli }) => {
                    let expect = repo.catalog.wal(name)?.map(|w| (w.size, w.crc32c));
                    if let Ok(entries) = read_history(repo, name, tli, expect) {
                        chain.add_history(tli, &entries);
                    }
                }
                _ => {}
            }
        }
        Ok(chain)
    }

    pub fn add_segment(&mut self, tli: TimelineId, segno: u64) {
        self.segments.entry(tli).or_default().insert(segno);
    }

    /// Record the history of timeline `tli` (its file's entries, oldest first). The parent
    /// recorded is the timeline recovery actually reads just before `tli` begins, which is not
    /// the file's last line when switch points go backwards (see [`timeline_path`]).
    pub fn add_history(&mut self, tli: TimelineId, entries: &[HistoryEntry]) {
        let path = timeline_path(tli, entries);
        if let [.., parent, own] = path.as_slice() {
            self.branches.insert(
                tli,
                HistoryEntry {
                    parent: parent.tli,
                    switchpoint: own.begin,
                },
            );
        }
    }

    pub fn remove_segment(&mut self, tli: TimelineId, segno: u64) {
        if let Some(s) = self.segments.get_mut(&tli) {
            s.remove(&segno);
        }
    }

    /// Segments before `segno` are not expected to be continuous: retention removed them but
    /// for a pinned backup's own, so holes there are not gaps.
    pub fn set_floor(&mut self, segno: u64) {
        self.floor = segno;
    }

    /// `tli` and the timelines it descends from, `tli` first, as far as history files say.
    pub fn lineage(&self, tli: TimelineId) -> Vec<TimelineId> {
        let mut out = vec![tli];
        while let Some(b) = self.branches.get(out.last().unwrap_or(&tli)) {
            if out.contains(&b.parent) {
                break;
            }
            out.push(b.parent);
        }
        out
    }

    /// Whether recovery from a backup on timeline `from` that stopped at `stop` can follow
    /// timeline `tli`: `from` is on `tli`'s lineage and `tli`'s history left it after `stop`.
    pub fn can_follow(&self, tli: TimelineId, from: TimelineId, stop: Lsn) -> bool {
        let lineage = self.lineage(tli);
        match lineage.iter().position(|&t| t == from) {
            None => false,
            Some(0) => true,
            // The timeline just after `from` on the lineage branched off it.
            Some(i) => self
                .branches
                .get(&lineage[i - 1])
                .is_some_and(|b| stop <= b.switchpoint),
        }
    }

    /// The gap-free span `backups` restore (only DONE and OK ones count); None when none
    /// reaches any point.
    pub fn span<'a>(&self, backups: impl Iterator<Item = &'a BackupRecord>) -> Option<Span> {
        let reach: Vec<(&BackupRecord, (TimelineId, Lsn))> = backups
            .filter(|b| b.status.is_restorable())
            .flat_map(|b| {
                self.windows(b)
                    .into_iter()
                    .map(move |w| (b, (w.timeline, w.until)))
            })
            .collect();
        let newest = reach.iter().map(|(_, r)| *r).max()?;
        let (b, from) = reach
            .iter()
            .filter(|(_, r)| *r == newest)
            .filter_map(|(b, _)| b.recovery_time.map(|t| (*b, t)))
            .min_by_key(|(b, t)| (*t, b.start_time))?;
        Some(Span {
            from,
            from_label: b.label.clone(),
            timeline: newest.0,
            until: newest.1,
        })
    }

    pub fn seg_size(&self) -> WalSegSize {
        self.seg
    }

    pub fn has(&self, tli: TimelineId, segno: u64) -> bool {
        self.segments.get(&tli).is_some_and(|s| s.contains(&segno))
    }

    /// Missing runs of segments, per timeline, oldest first. A timeline is expected to hold
    /// every segment from where it began (its switch point, else its first archived segment) to
    /// its last archived segment, and at least up to the segment before each child's switch
    /// point, since recovery along the child reads those from it.
    pub fn gaps(&self) -> Vec<Gap> {
        let empty = BTreeSet::new();
        let mut timelines: BTreeSet<TimelineId> = self.segments.keys().copied().collect();
        timelines.extend(self.branches.keys().copied());
        let mut gaps = Vec::new();
        for tli in timelines {
            let present = self.segments.get(&tli).unwrap_or(&empty);
            let begin = self
                .branches
                .get(&tli)
                .map(|b| b.switchpoint.segment_number(self.seg))
                .or_else(|| present.first().copied());
            let children_need = self
                .children(tli)
                .map(|(_, b)| b.switchpoint.segment_number(self.seg))
                .filter(|&s| s > 0)
                .map(|s| s - 1)
                .max();
            let end = present.last().copied().max(children_need);
            let (Some(begin), Some(end)) = (begin.map(|b| b.max(self.floor)), end) else {
                continue;
            };
            if begin > end {
                continue;
            }
            // Walk the holes between present segments rather than every number in the range.
            let mut next = begin;
            for &s in present.range(begin..=end) {
                if s > next {
                    gaps.push(Gap {
                        timeline: tli,
                        first: next,
                        last: s - 1,
                    });
                }
                next = s + 1;
            }
            if next <= end {
                gaps.push(Gap {
                    timeline: tli,
                    first: next,
                    last: end,
                });
            }
        }
        gaps
    }

    /// The restorable windows of a backup, its own timeline first, then every timeline that
    /// branched off after the backup's stop point and that unbroken WAL reaches. Empty when the
    /// backup did not finish or a segment it needs to become consistent is missing.
    pub fn windows(&self, b: &BackupRecord) -> Vec<Window> {
        let Some(stop) = b.stop_lsn else {
            return Vec::new();
        };
        let tli = TimelineId(b.timeline);
        let first = b.start_lsn.segment_number(self.seg);
        let stop_seg = Lsn(stop.0.saturating_sub(1))
            .segment_number(self.seg)
            .max(first);
        let end = self.run_end(tli, first);
        if end <= stop_seg {
            return Vec::new();
        }
        let mut out = Vec::new();
        self.follow(tli, end, stop, &mut out);
        out
    }

    /// The first segment that recovery from backup `b` along `path` (the spans of the timeline
    /// it follows, oldest first) would ask for and not find while the archive holds later
    /// segments on that path: recovery would end there, short of the end of the archive. The
    /// segment's name and the LSN it starts at.
    pub fn first_gap_on_path(
        &self,
        b: &BackupRecord,
        path: &[TimelineSpan],
    ) -> Option<(String, Lsn)> {
        // Recovery reads each segment from the newest timeline of the path that had begun by
        // then (XLogFileReadAnyTLI, xlogrecovery.c).
        let serving = |segno: u64| {
            path.iter()
                .rev()
                .find(|s| s.begin.segment_number(self.seg) <= segno)
                .map(|s| s.tli)
        };
        let start = b.start_lsn.segment_number(self.seg);
        let last = path
            .iter()
            .filter_map(|span| {
                let present = self.segments.get(&span.tli)?;
                present
                    .range(start..)
                    .rev()
                    .find(|&&s| serving(s) == Some(span.tli))
                    .copied()
            })
            .max()?;
        (start..=last).find_map(|segno| {
            let tli = serving(segno)?;
            (!self.has(tli, segno))
                .then(|| (self.name(tli, segno), Lsn::from_segment(segno, self.seg)))
        })
    }

    /// Segment names for messages.
    pub fn name(&self, tli: TimelineId, segno: u64) -> String {
        segment_name(tli, segno, self.seg)
    }

    /// Adds the window of `tli` (whose unbroken run ends before segment `end`) and those of the
    /// timelines branching off it at or after `after`.
    fn follow(&self, tli: TimelineId, end: u64, after: Lsn, out: &mut Vec<Window>) {
        out.push(Window {
            timeline: tli,
            until: Lsn::from_segment(end, self.seg),
            last_wal: self.name(tli, end - 1),
        });
        for (child, branch) in self.children(tli) {
            let switch_seg = branch.switchpoint.segment_number(self.seg);
            // The child is reachable when it began after the backup became consistent and the
            // parent's run covers everything before the segment holding the switch point.
            if branch.switchpoint < after || end < switch_seg {
                continue;
            }
            let child_end = self.run_end(child, switch_seg);
            if child_end > switch_seg {
                self.follow(child, child_end, branch.switchpoint, out);
            }
        }
    }

    /// The first segment at or after `from` that timeline `tli` lacks.
    fn run_end(&self, tli: TimelineId, from: u64) -> u64 {
        let Some(present) = self.segments.get(&tli) else {
            return from;
        };
        let mut next = from;
        for &s in present.range(from..) {
            if s != next {
                break;
            }
            next += 1;
        }
        next
    }

    /// Timelines whose direct parent is `tli`, lowest first.
    fn children(&self, tli: TimelineId) -> impl Iterator<Item = (TimelineId, &HistoryEntry)> {
        self.branches
            .iter()
            .filter(move |(_, b)| b.parent == tli)
            .map(|(c, b)| (*c, b))
    }
}

/// Where the archive is expected to be continuous from: the start segment of the oldest DONE or
/// OK backup kept for itself (neither pinned nor only the parent of a pinned one) or restored
/// for one that is; with none, the oldest one's. Holes before it are what retention left around
/// pinned backups.
pub fn continuous_from(backups: &[BackupRecord], seg: WalSegSize) -> Option<u64> {
    let now = chrono::Utc::now();
    let restorable: Vec<&BackupRecord> = backups
        .iter()
        .filter(|b| b.status.is_restorable())
        .collect();
    let for_pins: BTreeSet<&str> = restorable
        .iter()
        .filter(|b| b.pinned_at(now))
        .flat_map(|b| lineage_labels(backups, &b.label))
        .collect();
    let unpinned: BTreeSet<&str> = restorable
        .iter()
        .filter(|b| !for_pins.contains(b.label.as_str()))
        .flat_map(|b| lineage_labels(backups, &b.label))
        .collect();
    let start = |b: &&BackupRecord| b.start_lsn.segment_number(seg);
    restorable
        .iter()
        .filter(|b| unpinned.contains(b.label.as_str()))
        .map(start)
        .min()
        .or_else(|| restorable.iter().map(start).min())
}

/// The labels of a backup and its recorded ancestors.
fn lineage_labels<'a>(backups: &'a [BackupRecord], label: &'a str) -> Vec<&'a str> {
    let mut out = vec![label];
    while let Some(parent) = backups
        .iter()
        .find(|b| Some(b.label.as_str()) == out.last().copied())
        .and_then(|b| b.parent.as_deref())
    {
        if out.contains(&parent) {
            break;
        }
        out.push(parent);
    }
    out
}

/// Read and parse the archived history file `name` of timeline `tli`, checking its size and
/// CRC-32C when the catalog recorded them.
pub fn read_history(
    repo: &Repo,
    name: &str,
    tli: TimelineId,
    expect: Option<(u64, u32)>,
) -> Result<Vec<HistoryEntry>> {
    let key = keys::wal(repo.identity.system_identifier, name);
    let mut text = Vec::new();
    fetch_decompressed(repo.storage(), &key, &mut text, expect, false)
        .with_context(|| format!("reading {name}"))?;
    Ok(parse_history(tli, &String::from_utf8_lossy(&text))?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::Utc;
    use pgkeep_catalog::{BackupStatus, BackupType};

    const SEG: u64 = 16 << 20;

    fn chain(segments: &[(u32, u64)], branches: &[(u32, u32, u64)]) -> WalChain {
        let mut c = WalChain::new(WalSegSize::new(SEG).unwrap());
        for &(tli, segno) in segments {
            c.add_segment(TimelineId(tli), segno);
        }
        for &(tli, parent, switchpoint) in branches {
            c.add_history(
                TimelineId(tli),
                &[HistoryEntry {
                    parent: TimelineId(parent),
                    switchpoint: Lsn(switchpoint),
                }],
            );
        }
        c
    }

    pub(crate) fn backup(tli: u32, start: u64, stop: u64) -> BackupRecord {
        BackupRecord {
            label: "20260101-000000F".into(),
            backup_type: BackupType::Full,
            status: BackupStatus::Done,
            parent: None,
            timeline: tli,
            start_lsn: Lsn(start),
            stop_lsn: Some(Lsn(stop)),
            start_wal: String::new(),
            stop_wal: None,
            start_time: Utc::now(),
            end_time: None,
            recovery_time: None,
            data_bytes: 0,
            stored_bytes: 0,
            files: 0,
            pg_version_num: 160000,
            system_identifier: 1,
            block_size: 8192,
            data_checksums: true,
            pid: 1,
            hostname: String::new(),
            page_checksum_failures: 0,
            from_standby: false,
            error: None,
            pinned: None,
        }
    }

    #[test]
    fn a_missing_segment_before_later_ones_on_the_followed_path_is_found() {
        let one = [TimelineSpan {
            tli: TimelineId(1),
            begin: Lsn(0),
            end: None,
        }];
        let b = backup(1, 2 * SEG + 40, 3 * SEG + 100);
        // Segments 2..=6 of timeline 1 without 5: recovery would stop at 5 though 6 is there.
        let c = chain(&[(1, 2), (1, 3), (1, 4), (1, 6)], &[]);
        let (name, at) = c.first_gap_on_path(&b, &one).unwrap();
        assert_eq!(name, "000000010000000000000005");
        assert_eq!(at, Lsn(5 * SEG));
        // The end of the archive is no gap.
        let c = chain(&[(1, 2), (1, 3), (1, 4)], &[]);
        assert_eq!(c.first_gap_on_path(&b, &one), None);
        // Following timeline 2 (begun in segment 4): 4 and later come from timeline 2, so
        // timeline 1's missing 5 does not matter, timeline 2's missing 5 does.
        let two = [
            TimelineSpan {
                tli: TimelineId(1),
                begin: Lsn(0),
                end: Some(Lsn(4 * SEG + 8)),
            },
            TimelineSpan {
                tli: TimelineId(2),
                begin: Lsn(4 * SEG + 8),
                end: None,
            },
        ];
        let c = chain(&[(1, 2), (1, 3), (2, 4), (2, 5), (2, 6), (1, 6)], &[]);
        assert_eq!(c.first_gap_on_path(&b, &two), None);
        let c = chain(&[(1, 2), (1, 3), (2, 4), (1, 5), (2, 6)], &[]);
        let (name, _) = c.first_gap_on_path(&b, &two).unwrap();
        assert_eq!(name, "000000020000000000000005");
    }

    /// (timeline, first, last) of each gap.
    fn gaps(c: &WalChain) -> Vec<(u32, u64, u64)> {
        c.gaps()
            .iter()
            .map(|g| (g.timeline.0, g.first, g.last))
            .collect()
    }

    fn until(w: &[Window]) -> Vec<(u32, u64)> {
        w.iter().map(|w| (w.timeline.0, w.until.0 / SEG)).collect()
    }

    #[test]
    fn holes_in_one_timeline_are_gaps() {
        let c = chain(&[(1, 2), (1, 3), (1, 5), (1, 8), (1, 9)], &[]);
        assert_eq!(gaps(&c), [(1, 4, 4), (1, 6, 7)]);
        // A backup from segment 2 to 3 reaches the end of 3; one inside the hole reaches nothing.
        assert_eq!(
            until(&c.windows(&backup(1, 2 * SEG + 40, 3 * SEG + 8))),
            [(1, 4)]
        );
        assert!(c.windows(&backup(1, 3 * SEG, 4 * SEG + 8)).is_empty());
        // A stop exactly at a segment boundary does not need the next segment.
        assert_eq!(until(&c.windows(&backup(1, 8 * SEG, 9 * SEG))), [(1, 10)]);
    }

    #[test]
    fn windows_follow_timelines_that_branch_after_the_backup() {
        // Timeline 2 branched off 1 in segment 5; 1's copy of segment 5 is only a .partial.
        let sp = 5 * SEG + 0x100;
        let c = chain(&[(1, 2), (1, 3), (1, 4), (2, 5), (2, 6)], &[(2, 1, sp)]);
        assert_eq!(gaps(&c), []);
        assert_eq!(
            until(&c.windows(&backup(1, 2 * SEG, 3 * SEG + 8))),
            [(1, 5), (2, 7)]
        );
        // A backup on 2 itself.
        assert_eq!(
            until(&c.windows(&backup(2, 6 * SEG, 6 * SEG + 8))),
            [(2, 7)]
        );
        // A backup that stopped after the switch point cannot follow timeline 2.
        let c2 = chain(&[(1, 5), (1, 6), (2, 5)], &[(2, 1, sp)]);
        assert_eq!(
            until(&c2.windows(&backup(1, 5 * SEG + 0x200, 6 * SEG))),
            [(1, 7)]
        );
    }

    #[test]
    fn a_parent_missing_segments_before_the_switch_has_a_gap_and_does_not_reach_the_child() {
        let sp = 6 * SEG;
        let c = chain(&[(1, 2), (1, 3), (2, 6), (2, 7)], &[(2, 1, sp)]);
        assert_eq!(gaps(&c), [(1, 4, 5)]);
        assert_eq!(until(&c.windows(&backup(1, 2 * SEG, 3 * SEG))), [(1, 4)]);
        // A child whose first segment is missing is a gap of the child.
        let c = chain(&[(1, 2), (1, 3), (2, 5)], &[(2, 1, 4 * SEG)]);
        assert_eq!(gaps(&c), [(2, 4, 4)]);
        assert_eq!(until(&c.windows(&backup(1, 2 * SEG, 3 * SEG))), [(1, 4)]);
    }

    #[test]
    fn a_history_with_decreasing_switch_points_branches_off_the_timeline_it_really_left() {
        // Timeline 2 branched off 1 at segment 6; timeline 3 was recovered along 2's history but
        // stopped on 1 in segment 4, before 2 began: its file reads `1 6*SEG`, `2 4*SEG+0x100`.
        let sp2 = 6 * SEG;
        let sp3 = 4 * SEG + 0x100;
        let mut c = chain(
            &[
                (1, 2),
                (1, 3),
                (1, 4),
                (1, 5),
                (2, 6),
                (2, 7),
                (3, 4),
                (3, 5),
            ],
            &[(2, 1, sp2)],
        );
        c.add_history(
            TimelineId(3),
            &[
                HistoryEntry {
                    parent: TimelineId(1),
                    switchpoint: Lsn(sp2),
                },
                HistoryEntry {
                    parent: TimelineId(2),
                    switchpoint: Lsn(sp3),
                },
            ],
        );
        assert_eq!(gaps(&c), []);
        // A backup before both switch points reaches all three timelines.
        assert_eq!(
            until(&c.windows(&backup(1, 2 * SEG, 3 * SEG + 8))),
            [(1, 6), (2, 8), (3, 6)]
        );
        // One between them stopped after 3 began: 3 is out of its reach, 2 is not.
        assert_eq!(
            until(&c.windows(&backup(1, 5 * SEG, 5 * SEG + 8))),
            [(1, 6), (2, 8)]
        );
    }
}
