//! The second stage of parsing: raw restore flags into validated `RestoreOptions`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::{DateTime, Local, NaiveDateTime, TimeZone, Utc};
use pgkeep_core::restore::{
    RecoveryTarget, RestoreOptions, StandbyOptions, TargetAction, TargetTimeline,
};
use pgkeep_pg::{Lsn, TimelineId};

use crate::args::{ActionArg, RestoreArgs};
use crate::config::ConfigError;

fn usage(msg: String) -> ConfigError {
    ConfigError(msg)
}

pub fn restore_options(raw: RestoreArgs) -> Result<RestoreOptions, ConfigError> {
    let target = if let Some(ts) = raw.target_time {
        RecoveryTarget::Time(parse_time(&ts, "--target-time")?)
    } else if let Some(lsn) = raw.target_lsn {
        RecoveryTarget::Lsn(lsn.parse::<Lsn>().map_err(|e| {
            usage(format!(
                "--target-lsn {lsn:?} is not an LSN like 0/3000028: {e}"
            ))
        })?)
    } else if let Some(xid) = raw.target_xid {
        RecoveryTarget::Xid(xid)
    } else if let Some(name) = raw.target_name {
        RecoveryTarget::Name(name)
    } else if raw.target.is_some() {
        RecoveryTarget::Immediate
    } else {
        RecoveryTarget::EndOfArchive
    };
    if raw.standby && target != RecoveryTarget::EndOfArchive {
        return Err(usage(
            "--standby takes no recovery target: a standby replays the archive, then streams from its primary; drop the --target* option or --standby".into(),
        ));
    }
    let timeline = raw
        .target_timeline
        .map(|t| match t.as_str() {
            "latest" => Ok(TargetTimeline::Latest),
            "current" => Ok(TargetTimeline::Current),
            n => n
                .parse::<u32>()
                .map(|n| TargetTimeline::Id(TimelineId(n)))
                .map_err(|_| {
                    usage(format!(
                        "--target-timeline {t:?} must be latest, current or a number"
                    ))
                }),
        })
        .transpose()?;
    let mut tablespace_map = BTreeMap::new();
    for m in raw.tablespace_map {
        let (oid, dir) = m
            .split_once('=')
            .ok_or_else(|| usage(format!("--tablespace-map {m:?} must look like OID=DIR")))?;
        let oid: u32 = oid.parse().map_err(|_| {
            usage(format!(
                "--tablespace-map {m:?}: {oid:?} is not a tablespace OID"
            ))
        })?;
        let dir = PathBuf::from(dir);
        if !dir.is_absolute() {
            return Err(usage(format!(
                "--tablespace-map {m:?}: the directory must be an absolute path"
            )));
        }
        tablespace_map.insert(oid, dir);
    }
    if let Some(dir) = raw.waldir.as_ref().filter(|d| !d.is_absolute()) {
        return Err(usage(format!(
            "--waldir {}: the directory must be an absolute path",
            dir.display()
        )));
    }
    let pgdata = if raw.pgdata.is_absolute() {
        raw.pgdata
    } else {
        std::env::current_dir()
            .map_err(|e| usage(format!("--pgdata {}: {e}", raw.pgdata.display())))?
            .join(raw.pgdata)
    };
    Ok(RestoreOptions {
        pgdata,
        backup: raw.backup,
        target,
        action: match raw.target_action {
            ActionArg::Pause => TargetAction::Pause,
            ActionArg::Promote => TargetAction::Promote,
            ActionArg::Shutdown => TargetAction::Shutdown,
        },
        timeline,
        delta: raw.delta,
        jobs: raw.jobs,
        tablespace_map,
        waldir: raw.waldir,
        standby: raw.standby.then_some(StandbyOptions {
            primary_conninfo: raw.primary_conninfo,
        }),
        repo: raw.repo,
    })
}

/// RFC 3339, or PostgreSQL's "YYYY-MM-DD HH:MM:SS[.f][+HH[:MM]]"; no offset means local time.
/// `flag` names the option in the error.
pub fn parse_time(s: &str, flag: &str) -> Result<DateTime<Utc>, ConfigError> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(t) = DateTime::parse_from_str(s, fmt) {
            return Ok(t.with_timezone(&Utc));
        }
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(s, fmt) {
            if let Some(t) = Local.from_local_datetime(&naive).earliest() {
                return Ok(t.with_timezone(&Utc));
            }
        }
    }
    Err(usage(format!(
        "{flag} {s:?} is not a timestamp: use e.g. \"2026-11-21 10:15:00+00\" or RFC 3339"
    )))
}

/// `pin --until`: a timestamp as [`parse_time`] reads it, or a bare date (its local midnight).
pub fn pin_until(s: &str) -> Result<DateTime<Utc>, ConfigError> {
    if let Ok(day) = chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d") {
        return parse_time(&format!("{day} 00:00:00"), "--until");
    }
    parse_time(s, "--until")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_with_offsets_are_converted_to_utc() {
        let t = parse_time("2026-11-21 10:15:00.5+02", "--target-time").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-21T08:15:00.500+00:00");
        let t = parse_time("2026-11-21T10:15:00Z", "--target-time").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-21T10:15:00+00:00");
        let t = parse_time("2026-11-21 10:15:00+05:30", "--target-time").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-21T04:45:00+00:00");
    }

    #[test]
    fn garbage_time_is_refused() {
        assert!(parse_time("yesterday", "--target-time").is_err());
        let e = pin_until("next week").unwrap_err().0;
        assert!(e.starts_with("--until \"next week\""), "{e}");
    }

    #[test]
    fn pin_until_takes_a_bare_date() {
        let day = pin_until("2030-01-02").unwrap();
        assert_eq!(day, parse_time("2030-01-02 00:00:00", "--until").unwrap());
        assert_eq!(
            pin_until("2030-01-02T03:04:05Z").unwrap().to_rfc3339(),
            "2030-01-02T03:04:05+00:00"
        );
    }
}
