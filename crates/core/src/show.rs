//! `pgkeep show`: the backups in the catalog with their restorable windows (as LSNs and as
//! times) and their last restore drill, as records or as the `show --json` document.

use std::collections::HashMap;

use anyhow::Result;
use chrono::{DateTime, Utc};
pub use pgkeep_catalog::{BackupRecord, DrillRecord, Pin};
use serde_json::{json, Value};

use crate::config::Config;
use crate::repo::Repo;
use crate::walchain::WalChain;
pub use crate::walchain::{Span, Window};

/// A backup as `show` lists it.
#[derive(Clone, Debug)]
pub struct Shown {
    pub record: BackupRecord,
    /// How far the backup can be rolled forward, per timeline (see [`WalChain::windows`]);
    /// empty unless it is DONE or OK and its WAL is all there.
    pub windows: Vec<Window>,
    /// About the last restorable moment on the backup's own timeline: when the last segment of
    /// its window was archived (the segment holds nothing later; it may hold less).
    pub restorable_until_time: Option<DateTime<Utc>>,
    /// The newest `pgkeep drill` of this backup.
    pub last_drill: Option<DrillRecord>,
}

/// What `show` prints: the backups and the span of points they restore to.
#[derive(Clone, Debug)]
pub struct Listing {
    pub backups: Vec<Shown>,
    /// The gap-free span every DONE or OK backup of the repository restores to (whatever
    /// `label` asked for).
    pub span: Option<Span>,
}

/// Backups oldest first, optionally only the one with `label` (an unknown label is an error).
pub fn show(cfg: &Config, label: Option<&str>) -> Result<Listing> {
    let repo = Repo::open(cfg)?;
    crate::backup::mark_interrupted(&repo.catalog, false)?;
    let all = repo.catalog.backups()?;
    let backups = match label {
        None => all.clone(),
        Some(l) => {
            let found: Vec<_> = all.iter().filter(|b| b.label == l).cloned().collect();
            if found.is_empty() {
                anyhow::bail!("backup {l} not found: `pgkeep show` lists the backups");
            }
            found
        }
    };
    let chain = WalChain::from_repo(&repo)?;
    let mut drills: HashMap<String, DrillRecord> = repo
        .catalog
        .last_drills()?
        .into_iter()
        .map(|d| (d.backup_label.clone(), d))
        .collect();
    let backups = backups
        .into_iter()
        .map(|record| {
            let windows = restorable_windows(&chain, &record);
            let own = windows.iter().find(|w| w.timeline.0 == record.timeline);
            let restorable_until_time = match own {
                Some(w) => repo.catalog.wal(&w.last_wal)?.map(|r| r.archived_at),
                None => None,
            };
            Ok(Shown {
                last_drill: drills.remove(&record.label),
                windows,
                restorable_until_time,
                record,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Listing {
        span: chain.span(all.iter()),
        backups,
    })
}

/// The windows of a backup restore may use; none for the others.
pub fn restorable_windows(chain: &WalChain, b: &BackupRecord) -> Vec<Window> {
    if b.status.is_restorable() {
        chain.windows(b)
    } else {
        Vec::new()
    }
}

/// The `show --json` document: `{"backups": [...], "restorable": {...}}`, field names fixed by
/// the CLI contract.
pub fn backups_json(listing: &Listing) -> Value {
    json!({
        "backups": listing.backups.iter().map(backup_json).collect::<Vec<_>>(),
        "restorable": span_json(listing.span.as_ref()),
    })
}

/// `{"from": time, "from_backup": label, "timeline": n, "until": "X/X"}` or null.
pub fn span_json(span: Option<&Span>) -> Value {
    match span {
        None => Value::Null,
        Some(s) => json!({
            "from": rfc3339(s.from),
            "from_backup": s.from_label,
            "timeline": s.timeline.0,
            "until": s.until.to_string(),
        }),
    }
}

/// RFC 3339 in UTC with microseconds, as every time in `show --json` and `drill --json`.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn backup_json(shown: &Shown) -> Value {
    let mut v = record_json(&shown.record);
    let own = shown
        .windows
        .iter()
        .find(|w| w.timeline.0 == shown.record.timeline);
    v["restorable_until"] = json!(own.map(|w| w.until.to_string()));
    // The window as times: from the backup's recovery_time to about when its last WAL was
    // archived.
    v["restorable_from_time"] = json!(own.and(shown.record.recovery_time).map(rfc3339));
    v["restorable_until_time"] = json!(own.and(shown.restorable_until_time).map(rfc3339));
    v["last_drill"] = shown
        .last_drill
        .as_ref()
        .map_or(Value::Null, crate::drill::drill_json);
    v["restorable_windows"] = shown
        .windows
        .iter()
        .map(|w| {
            json!({
                "timeline": w.timeline.0,
                "until": w.until.to_string(),
                "last_wal": w.last_wal,
            })
        })
        .collect();
    v
}

fn record_json(b: &BackupRecord) -> Value {
    let time = |t: Option<DateTime<Utc>>| t.map(rfc3339);
    let pinned_until = match b.pinned {
        Some(Pin::Until(t)) => json!(rfc3339(t)),
        Some(Pin::Forever) => json!("forever"),
        None => Value::Null,
    };
    json!({
        "label": b.label,
        "type": b.backup_type.as_str(),
        "status": b.status.as_str(),
        "parent": b.parent,
        "timeline": b.timeline,
        "start_lsn": b.start_lsn.to_string(),
        "stop_lsn": b.stop_lsn.map(|l| l.to_string()),
        "start_wal": b.start_wal,
        "stop_wal": b.stop_wal,
        "start_time": time(Some(b.start_time)),
        "end_time": time(b.end_time),
        "recovery_time": time(b.recovery_time),
        "data_bytes": b.data_bytes,
        "stored_bytes": b.stored_bytes,
        "files": b.files,
        "pg_version": b.pg_version_num,
        "pg_major": b.pg_version_num / 10000,
        "system_identifier": b.system_identifier.to_string(),
        "data_checksums": b.data_checksums,
        "page_checksum_failures": b.page_checksum_failures,
        "from_standby": b.from_standby,
        "error": b.error,
        "pinned": b.pinned_at(chrono::Utc::now()),
        "pinned_until": pinned_until,
    })
}
