//! `backup_label`: the text `pg_backup_stop` returns, which a restored
//! cluster reads to know where WAL replay must start.

use crate::bytes::upper_hex8;
use crate::error::FormatError;
use crate::lsn::Lsn;
use crate::wal::TimelineId;

/// The contents of a `backup_label` (written by `build_backup_content`,
/// src/backend/access/transam/xlogbackup.c in PG 15+, `do_pg_start_backup`
/// in xlog.c before):
///
/// ```text
/// START WAL LOCATION: 0/2000028 (file 000000010000000000000002)
/// CHECKPOINT LOCATION: 0/2000060
/// BACKUP METHOD: streamed
/// BACKUP FROM: primary
/// START TIME: 2026-11-21 10:15:00 UTC
/// LABEL: nightly
/// START TIMELINE: 1
/// ```
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct BackupLabel {
    /// Where replay must start: the redo point of the backup's checkpoint.
    pub start_lsn: Lsn,
    /// Name of the WAL segment holding `start_lsn`.
    pub start_wal_file: String,
    /// The backup's checkpoint record.
    pub checkpoint_lsn: Lsn,
    /// "streamed" for the non-exclusive API; empty when the line is absent.
    pub backup_method: String,
    /// "primary" or "standby"; empty when the line is absent.
    pub backup_from: String,
    /// Server time at backup start as PostgreSQL printed it; empty when absent.
    pub start_time: String,
    /// The label given to `pg_backup_start`; empty when absent.
    pub label: String,
    /// `START TIMELINE`, or the timeline of `start_wal_file` when a label
    /// lacks that line (PostgreSQL 11 added it, so 12+ always writes it).
    pub start_timeline: TimelineId,
}

const START_WAL_LOCATION: &str = "START WAL LOCATION";
const CHECKPOINT_LOCATION: &str = "CHECKPOINT LOCATION";

impl BackupLabel {
    /// Parses `backup_label` text. Also reads backup history files
    /// (`*.backup` in the archive), which add STOP lines to the same format.
    ///
    /// `START WAL LOCATION` and `CHECKPOINT LOCATION` are required, as in
    /// PostgreSQL's `read_backup_label`; lines with other keys (such as the
    /// `INCREMENTAL FROM` lines of PG 17) are ignored, but a known key may
    /// appear only once and must hold a well-formed value.
    pub fn parse(text: &str) -> Result<BackupLabel, FormatError> {
        let mut start: Option<(Lsn, String)> = None;
        let mut checkpoint = None;
        let mut method = None;
        let mut from = None;
        let mut time = None;
        let mut label = None;
        let mut timeline = None;

        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            let invalid = |reason: String| FormatError::InvalidBackupLabel {
                line: line_no,
                reason,
            };
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            // PostgreSQL writes "KEY: value"; an empty LABEL leaves "LABEL: ".
            let value = value.strip_prefix(' ').unwrap_or(value);
            let duplicate = || invalid(format!("second {key:?} line"));
            match key {
                START_WAL_LOCATION => {
                    let parsed = parse_start_location(value).map_err(invalid)?;
                    set_once(&mut start, parsed).map_err(|()| duplicate())?;
                }
                CHECKPOINT_LOCATION => {
                    let lsn = value.parse::<Lsn>().map_err(|e| invalid(e.to_string()))?;
                    set_once(&mut checkpoint, lsn).map_err(|()| duplicate())?;
                }
                "BACKUP METHOD" => {
                    set_once(&mut method, value.to_owned()).map_err(|()| duplicate())?
                }
                "BACKUP FROM" => set_once(&mut from, value.to_owned()).map_err(|()| duplicate())?,
                "START TIME" => set_once(&mut time, value.to_owned()).map_err(|()| duplicate())?,
                "LABEL" => set_once(&mut label, value.to_owned()).map_err(|()| duplicate())?,
                "START TIMELINE" => {
                    let tli = value
                        .parse::<TimelineId>()
                        .map_err(|e| invalid(e.to_string()))?;
                    set_once(&mut timeline, (tli, line_no)).map_err(|()| duplicate())?;
                }
                _ => {}
            }
        }

        let (start_lsn, start_wal_file) =
            start.ok_or(FormatError::MissingBackupLabelField(START_WAL_LOCATION))?;
        let checkpoint_lsn =
            checkpoint.ok_or(FormatError::MissingBackupLabelField(CHECKPOINT_LOCATION))?;
        let file_timeline = TimelineId(
            start_wal_file
                .as_bytes()
                .get(..8)
                .and_then(upper_hex8)
                .unwrap_or_default(),
        );
        let start_timeline = match timeline {
            // read_backup_label refuses a label whose two timelines disagree.
            Some((tli, line)) if tli != file_timeline => {
                return Err(FormatError::InvalidBackupLabel {
                    line,
                    reason: format!(
                        "START TIMELINE {tli} differs from timeline {file_timeline} of WAL file {start_wal_file}"
                    ),
                })
            }
            Some((tli, _)) => tli,
            None => file_timeline,
        };
        Ok(BackupLabel {
            start_lsn,
            start_wal_file,
            checkpoint_lsn,
            backup_method: method.unwrap_or_default(),
            backup_from: from.unwrap_or_default(),
            start_time: time.unwrap_or_default(),
            label: label.unwrap_or_default(),
            start_timeline,
        })
    }
}

/// Stores `value` unless the slot is already taken.
fn set_once<T>(slot: &mut Option<T>, value: T) -> Result<(), ()> {
    if slot.is_some() {
        return Err(());
    }
    *slot = Some(value);
    Ok(())
}

/// `0/2000028 (file 000000010000000000000002)` -> LSN and segment name.
fn parse_start_location(value: &str) -> Result<(Lsn, String), String> {
    let shape = || format!("expected \"X/X (file <24 hex digits>)\", found {value:?}");
    let (lsn, rest) = value.split_once(" (file ").ok_or_else(shape)?;
    let file = rest.strip_suffix(')').ok_or_else(shape)?;
    let lsn = lsn.parse::<Lsn>().map_err(|e| e.to_string())?;
    // The segment name's number depends on the segment size, which a label
    // does not state; its shape and timeline do not.
    let bytes = file.as_bytes();
    let well_formed = bytes.len() == 24 && bytes.chunks(8).all(|part| upper_hex8(part).is_some());
    if !well_formed {
        return Err(format!("{file:?} is not a WAL segment name"));
    }
    if bytes.get(..8).and_then(upper_hex8) == Some(0) {
        return Err(format!(
            "WAL file {file} is on timeline 0, which does not exist"
        ));
    }
    Ok((lsn, file.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG15: &str = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)
CHECKPOINT LOCATION: 0/2000060
BACKUP METHOD: streamed
BACKUP FROM: primary
START TIME: 2026-11-21 10:15:00 UTC
LABEL: x: y
START TIMELINE: 1
";

    #[test]
    fn parses_a_pg15_label() {
        let l = BackupLabel::parse(PG15).unwrap();
        assert_eq!(l.start_lsn, Lsn(0x0200_0028));
        assert_eq!(l.start_wal_file, "000000010000000000000002");
        assert_eq!(l.checkpoint_lsn, Lsn(0x0200_0060));
        assert_eq!(l.backup_method, "streamed");
        assert_eq!(l.backup_from, "primary");
        assert_eq!(l.start_time, "2026-11-21 10:15:00 UTC");
        assert_eq!(l.label, "x: y");
        assert_eq!(l.start_timeline, TimelineId(1));
    }

    #[test]
    fn timeline_falls_back_to_the_wal_file() {
        let text = "START WAL LOCATION: 0/5000028 (file 0000000A0000000000000005)\r\nCHECKPOINT LOCATION: 0/5000060\r\nLABEL: \r\n";
        let l = BackupLabel::parse(text).unwrap();
        assert_eq!(l.start_timeline, TimelineId(10));
        assert_eq!(l.label, "");
        assert_eq!(l.backup_method, "");
    }

    #[test]
    fn reads_backup_history_files_and_newer_lines() {
        let text = format!(
            "{PG15}INCREMENTAL FROM LSN: 0/1000028\nSTOP WAL LOCATION: 0/2000138 (file 000000010000000000000002)\nSTOP TIME: 2026-11-21 10:16:00 UTC\n"
        );
        assert_eq!(
            BackupLabel::parse(&text).unwrap().start_lsn,
            Lsn(0x0200_0028)
        );
    }

    #[test]
    fn errors_name_the_line() {
        let err = |text: &str| BackupLabel::parse(text).unwrap_err().to_string();
        assert_eq!(err(""), "backup_label has no \"START WAL LOCATION\" line");
        assert_eq!(
            err("START WAL LOCATION: 0/1 (file 000000010000000000000000)\n"),
            "backup_label has no \"CHECKPOINT LOCATION\" line"
        );
        assert!(err("START WAL LOCATION: 0/1\nCHECKPOINT LOCATION: 0/2\n")
            .starts_with("invalid backup_label line 1: expected \"X/X (file"));
        assert!(err(
            "START WAL LOCATION: 0/1 (file 000000010000000000000000)\nCHECKPOINT LOCATION: zz\n"
        )
        .starts_with("invalid backup_label line 2: invalid LSN \"zz\""));
        assert!(err(
            "START WAL LOCATION: 0/1 (file 00000001000000000000000g)\nCHECKPOINT LOCATION: 0/2\n"
        )
        .contains("is not a WAL segment name"));
        assert!(err(
            "START WAL LOCATION: 0/1 (file 000000000000000000000000)\nCHECKPOINT LOCATION: 0/2\n"
        )
        .contains("timeline 0"));
        assert_eq!(
            err(&format!("{PG15}LABEL: again\n")),
            "invalid backup_label line 8: second \"LABEL\" line"
        );
        assert_eq!(
            err(&PG15.replace("START TIMELINE: 1", "START TIMELINE: 2")),
            "invalid backup_label line 7: START TIMELINE 2 differs from timeline 1 of WAL file 000000010000000000000002"
        );
        assert!(
            err(&PG15.replace("START TIMELINE: 1", "START TIMELINE: one"))
                .starts_with("invalid backup_label line 7: invalid timeline ID \"one\"")
        );
    }
}
