//! Timeline history files (`NNNNNNNN.history`): which timelines a timeline descends from and
//! where each one branched off.
//!
//! Port of the reading half of `readTimeLineHistory` (src/backend/access/transam/timeline.c):
//! one line per ancestor, `parentTLI <tab> switchpoint <tab> reason`, oldest first; blank lines
//! and lines starting with `#` are skipped; timeline IDs must increase and stay below the
//! timeline the file belongs to. Switch points need not increase: after a recovery that
//! followed timeline 2 but stopped on timeline 1 before 2 began, the new timeline's file reads
//! `1 X` then `2 Y` with Y < X. [`timeline_path`] says which timeline each LSN belongs to.

use crate::error::FormatError;
use crate::lsn::Lsn;
use crate::wal::TimelineId;

/// One line of a history file: timeline `parent` ended at `switchpoint`, where its child began.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct HistoryEntry {
    /// The ancestor timeline.
    pub parent: TimelineId,
    /// First LSN that belongs to the next timeline of the file rather than to `parent`.
    pub switchpoint: Lsn,
}

/// The stretch of WAL one timeline contributes to another timeline's history: LSNs from `begin`
/// up to, not including, `end` (`None`: no end, the timeline itself).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct TimelineSpan {
    pub tli: TimelineId,
    pub begin: Lsn,
    pub end: Option<Lsn>,
}

impl TimelineSpan {
    pub fn contains(&self, lsn: Lsn) -> bool {
        self.begin <= lsn && self.end.is_none_or(|e| lsn < e)
    }
}

/// Parses the history file of timeline `tli`; entries come oldest first, and the last one's
/// switch point is where `tli` begins. Errors name the line.
pub fn parse_history(tli: TimelineId, text: &str) -> Result<Vec<HistoryEntry>, FormatError> {
    let mut entries: Vec<HistoryEntry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |reason: String| FormatError::InvalidHistory {
            tli: tli.0,
            line: i + 1,
            reason,
        };
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let parent: TimelineId = fields
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|_| bad("expected a timeline ID as the first field".into()))?;
        let switchpoint: Lsn = fields
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|_| bad("expected a switch point LSN as the second field".into()))?;
        if entries.last().is_some_and(|e| e.parent >= parent) {
            return Err(bad("timeline IDs must be in increasing order".into()));
        }
        if parent >= tli {
            return Err(bad(format!(
                "ancestor timeline {parent} is not below timeline {tli}"
            )));
        }
        entries.push(HistoryEntry {
            parent,
            switchpoint,
        });
    }
    Ok(entries)
}

/// The path of timeline `tli` through its ancestors, oldest first: which timeline each LSN
/// belongs to, given the entries of `tli`'s history file. The spans are contiguous from LSN 0
/// and the last one is `tli` itself, open-ended; an ancestor that owns no LSN is left out.
///
/// PostgreSQL looks an LSN up in the history newest entry first and takes the first entry whose
/// nominal range `[previous switch point, own switch point)` holds it (port of
/// tliOfPointInHistory, timeline.c; XLogFileReadAnyTLI, xlogrecovery.c, reads segments in the
/// same order). So an entry owns only what no newer entry claims: since the newer ranges and
/// `tli`'s own `[last switch point, ∞)` chain together, they cover everything from their lowest
/// start on, and entry i effectively owns `[sp(i-1), min(sp(i), ..., sp(n)))`, nothing when
/// that is empty. With `1 X` then `2 Y` and Y < X, timeline 2 owns nothing and `tli` follows
/// timeline 1 directly from Y.
pub fn timeline_path(tli: TimelineId, entries: &[HistoryEntry]) -> Vec<TimelineSpan> {
    let mut spans = Vec::with_capacity(entries.len() + 1);
    let begin_of_tli = entries.last().map_or(Lsn(0), |e| e.switchpoint);
    spans.push(TimelineSpan {
        tli,
        begin: begin_of_tli,
        end: None,
    });
    // Walk newest first, carrying the lowest switch point seen: where the newer entries' claim
    // begins.
    let mut claimed_from = begin_of_tli;
    for (i, e) in entries.iter().enumerate().rev() {
        claimed_from = claimed_from.min(e.switchpoint);
        let begin = if i == 0 {
            Lsn(0)
        } else {
            entries[i - 1].switchpoint
        };
        if begin < claimed_from {
            spans.push(TimelineSpan {
                tli: e.parent,
                begin,
                end: Some(claimed_from),
            });
        }
    }
    spans.reverse();
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_postgresql_writes() {
        // As written by writeTimeLineHistory after two promotions.
        let text = "1\t0/3000158\tno recovery target specified\n\n\
                    # a comment\n2\t0/50000A0\tat restore point \"x\"\n";
        let entries = parse_history(TimelineId(3), text).unwrap();
        assert_eq!(
            entries,
            [
                HistoryEntry {
                    parent: TimelineId(1),
                    switchpoint: Lsn(0x300_0158)
                },
                HistoryEntry {
                    parent: TimelineId(2),
                    switchpoint: Lsn(0x500_00A0)
                },
            ]
        );
        assert_eq!(parse_history(TimelineId(2), "").unwrap(), []);
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, needle) in [
            ("x\t0/1\n", "line 1: expected a timeline ID"),
            ("1\n", "line 1: expected a switch point"),
            (
                "1\t0/5\n1\t0/6\n",
                "line 2: timeline IDs must be in increasing order",
            ),
            ("3\t0/5\n", "ancestor timeline 3 is not below timeline 3"),
        ] {
            let err = parse_history(TimelineId(3), text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(err.contains("00000003.history"), "{err}");
        }
    }

    fn entry(parent: u32, switchpoint: u64) -> HistoryEntry {
        HistoryEntry {
            parent: TimelineId(parent),
            switchpoint: Lsn(switchpoint),
        }
    }

    /// (timeline, begin, end) of each span.
    fn path(tli: u32, entries: &[HistoryEntry]) -> Vec<(u32, u64, Option<u64>)> {
        let spans = timeline_path(TimelineId(tli), entries);
        // Contiguous from 0, each non-empty, the last one open-ended and `tli`'s.
        assert_eq!(spans[0].begin, Lsn(0));
        for w in spans.windows(2) {
            assert_eq!(w[0].end, Some(w[1].begin), "{spans:?}");
        }
        for s in &spans {
            assert!(s.end.is_none_or(|e| s.begin < e), "{spans:?}");
        }
        assert_eq!(spans.last().unwrap().tli, TimelineId(tli));
        assert_eq!(spans.last().unwrap().end, None);
        spans
            .iter()
            .map(|s| (s.tli.0, s.begin.0, s.end.map(|e| e.0)))
            .collect()
    }

    #[test]
    fn decreasing_switch_points_are_read_and_skip_the_parent_that_owns_nothing() {
        // As PostgreSQL 15 wrote it after restoring the latest state (timeline 2 at 0/4000000),
        // then restoring to a time before that: recovery followed timeline 2 but stopped on 1.
        let text = "1\t0/4000000\tno recovery target specified\n\n\
                    2\t0/3002788\tbefore 2026-11-30 01:19:27.42039+00\n\n";
        let entries = parse_history(TimelineId(3), text).unwrap();
        assert_eq!(entries, [entry(1, 0x400_0000), entry(2, 0x300_2788)]);
        assert_eq!(
            path(3, &entries),
            [(1, 0, Some(0x300_2788)), (3, 0x300_2788, None)]
        );
    }

    #[test]
    fn increasing_switch_points_give_every_ancestor_its_nominal_range() {
        assert_eq!(path(1, &[]), [(1, 0, None)]);
        assert_eq!(
            path(2, &[entry(1, 0x500)]),
            [(1, 0, Some(0x500)), (2, 0x500, None)]
        );
        assert_eq!(
            path(4, &[entry(1, 0x500), entry(2, 0x900), entry(3, 0x900)]),
            // Timeline 3 began and ended at 0x900: it owns nothing.
            [
                (1, 0, Some(0x500)),
                (2, 0x500, Some(0x900)),
                (4, 0x900, None)
            ]
        );
    }

    #[test]
    fn a_later_low_switch_point_cuts_every_older_entry_it_undercuts() {
        // Nominally 1 owns [0, 0x500), 2 [0x500, 0x900), 3 and 4 nothing ([0x900, 0x700) and
        // [0x700, 0x600)), 5 [0x600, ∞): 5's claim cuts 2 short at 0x600.
        let entries = [
            entry(1, 0x500),
            entry(2, 0x900),
            entry(3, 0x700),
            entry(4, 0x600),
        ];
        assert_eq!(
            path(5, &entries),
            [
                (1, 0, Some(0x500)),
                (2, 0x500, Some(0x600)),
                (5, 0x600, None)
            ]
        );
        // Each span answers the lookup tliOfPointInHistory would make.
        let spans = timeline_path(TimelineId(5), &entries);
        let owner = |lsn: u64| spans.iter().find(|s| s.contains(Lsn(lsn))).unwrap().tli.0;
        assert_eq!(
            [0, 0x4ff, 0x500, 0x5ff, 0x600, 0x800, 0x900, 0x10000].map(owner),
            [1, 1, 2, 2, 5, 5, 5, 5]
        );
    }
}
