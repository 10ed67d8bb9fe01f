//! Timeline history files (`NNNNNNNN.history`): which timelines a timeline descends from and
//! where each one branched off.
//!
//! Port of the reading half of `readTimeLineHistory` (src/backend/access/transam/timeline.c):
//! one line per ancestor, `parentTLI <tab> switchpoint <tab> reason`, oldest first; blank lines
//! and lines starting with `#` are skipped; timeline IDs must increase and stay below the
//! timeline the file belongs to. The last line names the direct parent and the LSN at which the
//! file's own timeline begins.

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

/// Parses the history file of timeline `tli`; entries come oldest first, so the last one is
/// the direct parent and its switch point is where `tli` begins. Errors name the line.
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
        if entries.last().is_some_and(|e| e.switchpoint > switchpoint) {
            return Err(bad("switch points must not go backwards".into()));
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
            (
                "1\t0/5\n2\t0/4\n",
                "line 2: switch points must not go backwards",
            ),
            ("3\t0/5\n", "ancestor timeline 3 is not below timeline 3"),
        ] {
            let err = parse_history(TimelineId(3), text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(err.contains("00000003.history"), "{err}");
        }
    }
}
