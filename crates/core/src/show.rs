//! `pgkeep show`: the backups in the catalog with their restorable windows (as LSNs and as
//! times) and their last restore drill, as records or as the `show --json` document.

use std::collections::HashMap;

use anyhow::Result;
use chrono::{DateTime, Utc};
pub use pgkeep_catalog::{BackupRecord, DrillRecord};
use serde_json::{json, Value};

use crate::config::Config;
use crate::repo::Repo;
use crate::walchain::WalChain;
pub use crate::walchain::Window;

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

/// Backups oldest first, optionally only the one with `label` (an unknown label is an error).
pub fn show(cfg: &Config, label: Option<&str>) -> Result<Vec<Shown>> {
    let repo = Repo::open(cfg)?;
    crate::backup::mark_interrupted(&repo.catalog, false)?;
    let backups = repo.catalog.backups()?;
    let backups = match label {
        None => backups,
        Some(l) => {
            let found: Vec<_> = backups.into_iter().filter(|b| b.label == l).collect();
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
    backups
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
        .collect()
}

/// The windows of a backup restore may use; none for the others.
pub fn restorable_windows(chain: &WalChain, b: &BackupRecord) -> Vec<Window> {
    if b.status.is_restorable() {
        chain.windows(b)
    } else {
        Vec::new()
    }
}

/// The `show --json` document: `{"backups": [...]}`, field names fixed by the CLI contract.
pub fn backups_json(backups: &[Shown]) -> Value {
    json!({ "backups": backups.iter().map(backup_json).collect::<Vec<_>>() })
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
    v["restorable_from_time"] = json!(own.and(shown.record.recovery_time).map(time_text));
    v["restorable_until_time"] = json!(own.and(shown.restorable_until_time).map(time_text));
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

/// RFC 3339 in UTC with microseconds, as every time in `show --json` and `drill --json`.
pub fn time_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn record_json(b: &BackupRecord) -> Value {
    let time = |t: Option<DateTime<Utc>>| t.map(time_text);
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
    })
}
