//! `pgkeep show`: the backups in the catalog, as records or as the `show --json` document.

use anyhow::Result;
pub use pgkeep_catalog::BackupRecord;
use serde_json::{json, Value};

use crate::config::Config;
use crate::repo::Repo;

/// Backups oldest first, optionally only the one with `label` (an unknown label is an error).
pub fn show(cfg: &Config, label: Option<&str>) -> Result<Vec<BackupRecord>> {
    let repo = Repo::open(cfg)?;
    crate::backup::mark_interrupted(&repo.catalog, false)?;
    let backups = repo.catalog.backups()?;
    match label {
        None => Ok(backups),
        Some(l) => {
            let found: Vec<_> = backups.into_iter().filter(|b| b.label == l).collect();
            if found.is_empty() {
                anyhow::bail!("backup {l} not found: `pgkeep show` lists the backups");
            }
            Ok(found)
        }
    }
}

/// The `show --json` document: `{"backups": [...]}`, field names fixed by the CLI contract.
pub fn backups_json(backups: &[BackupRecord]) -> Value {
    json!({ "backups": backups.iter().map(backup_json).collect::<Vec<_>>() })
}

fn backup_json(b: &BackupRecord) -> Value {
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
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
        "system_identifier": b.system_identifier.to_string(),
        "data_checksums": b.data_checksums,
        "page_checksum_failures": b.page_checksum_failures,
        "error": b.error,
    })
}
