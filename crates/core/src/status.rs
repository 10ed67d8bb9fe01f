//! A backup's status in the repository, written without rewriting any object.
//!
//! `backup.ini` is written once, when the backup first gets a final status (DONE, or ERROR when
//! it failed). Every later change (DONE -> OK, CORRUPT, ERROR, DELETING) is a new small object
//! `backup/<label>/status/<seq>-<STATUS>` holding the error text, if any; the highest sequence
//! number wins. A bucket with versioning or Object Lock therefore keeps working (objects are
//! only ever created), and `catalog rebuild` reads the newest status object over `backup.ini`.

use anyhow::{Context, Result};
use pgkeep_catalog::{meta, parse_pin, pin_text, BackupRecord, BackupStatus, Pin};
use pgkeep_repo::{get_bytes, keys, put_bytes, Storage, StorageError};

use crate::backup::BACKUP_INI;

/// Record `b`'s status in the repository: its `backup.ini` if there is none yet, else a new
/// status object after the newest one.
pub fn store_status(storage: &dyn Storage, b: &BackupRecord) -> Result<()> {
    let ini = keys::backup_meta(&b.label, BACKUP_INI);
    let context = || format!("recording status {} of backup {}", b.status, b.label);
    if storage.size(&ini).with_context(context)?.is_none() {
        return put_bytes(storage, &ini, meta::backup_ini(b).as_bytes()).with_context(context);
    }
    let seq = newest(storage, &b.label)
        .with_context(context)?
        .map_or(1, |(seq, _)| seq + 1);
    let text = b.error.as_deref().unwrap_or("");
    put_next(storage, seq, text, |seq| {
        keys::backup_status(&b.label, seq, b.status.as_str())
    })
    .with_context(context)
}

/// Create the object `key(seq)` holding `text`, never replacing one: two writers may pick the
/// same number, and the loser takes the next.
fn put_next(
    storage: &dyn Storage,
    mut seq: u64,
    text: &str,
    key: impl Fn(u64) -> String,
) -> Result<(), StorageError> {
    loop {
        let key = key(seq);
        let mut object = storage.create(&key)?;
        std::io::Write::write_all(&mut object, text.as_bytes())
            .map_err(|e| StorageError::Io { key, source: e })?;
        match object.commit_new() {
            Ok(()) => return Ok(()),
            Err(StorageError::AlreadyExists { .. }) => seq += 1,
            Err(e) => return Err(e),
        }
    }
}

/// The newest status object of backup `label` among `listed` keys: its status and error text.
pub fn latest_status(
    storage: &dyn Storage,
    label: &str,
    listed: &[String],
) -> Result<Option<(BackupStatus, Option<String>)>> {
    let newest = listed
        .iter()
        .filter_map(|k| keys::backup_status_from_key(k).map(|(l, seq, s)| (l, seq, s, k)))
        .filter(|(l, ..)| *l == label)
        .max_by_key(|(_, seq, ..)| *seq);
    let Some((_, _, status, key)) = newest else {
        return Ok(None);
    };
    let status: BackupStatus = status
        .parse()
        .with_context(|| format!("status object {key}"))?;
    let text = String::from_utf8_lossy(&get_bytes(storage, key)?).into_owned();
    Ok(Some((status, (!text.is_empty()).then_some(text))))
}

/// Record a pin change of backup `b` (its `pinned` field; `None` = unpinned) as a new object
/// after the newest pin object, never rewriting one.
pub fn store_pin(storage: &dyn Storage, b: &BackupRecord) -> Result<()> {
    let context = || format!("recording the pin of backup {}", b.label);
    let listed = storage
        .list(&keys::backup_pin_prefix(&b.label))
        .with_context(context)?;
    let seq = listed
        .iter()
        .filter_map(|k| keys::backup_pin_from_key(k).map(|(_, seq)| seq))
        .max()
        .map_or(1, |seq| seq + 1);
    let text = b
        .pinned
        .as_ref()
        .map_or_else(|| "none".to_string(), pin_text);
    put_next(storage, seq, &text, |seq| keys::backup_pin(&b.label, seq)).with_context(context)
}

/// The pin the newest pin object of backup `label` among `listed` keys records: `None` when
/// there is no pin object (the `backup.ini` says), `Some(None)` when it was unpinned.
pub fn latest_pin(
    storage: &dyn Storage,
    label: &str,
    listed: &[String],
) -> Result<Option<Option<Pin>>> {
    let newest = listed
        .iter()
        .filter_map(|k| keys::backup_pin_from_key(k).map(|(l, seq)| (l, seq, k)))
        .filter(|(l, ..)| *l == label)
        .max_by_key(|(_, seq, _)| *seq);
    let Some((_, _, key)) = newest else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&get_bytes(storage, key)?).into_owned();
    match text.trim() {
        "none" => Ok(Some(None)),
        t => parse_pin(t).map(|p| Some(Some(p))).ok_or_else(|| {
            anyhow::anyhow!("pin object {key} holds {t:?}, not forever, a time or none")
        }),
    }
}

/// The sequence number and key of the newest status object of backup `label`.
fn newest(storage: &dyn Storage, label: &str) -> Result<Option<(u64, String)>> {
    let listed = storage.list(&keys::backup_status_prefix(label))?;
    Ok(listed
        .into_iter()
        .filter_map(|k| keys::backup_status_from_key(&k).map(|(_, seq, _)| (seq, k.clone())))
        .max_by_key(|(seq, _)| *seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgkeep_repo::MemoryStorage;

    fn record(status: BackupStatus, error: Option<&str>) -> BackupRecord {
        let mut b = crate::walchain::tests::backup(1, 0x100_0000, 0x200_0000);
        b.status = status;
        b.error = error.map(str::to_string);
        b
    }

    #[test]
    fn changes_after_backup_ini_are_new_objects_and_the_newest_wins() {
        let storage = MemoryStorage::new();
        let done = record(BackupStatus::Done, None);
        store_status(&storage, &done).unwrap();
        let ini = keys::backup_meta(&done.label, BACKUP_INI);
        let first = get_bytes(&storage, &ini).unwrap();
        store_status(&storage, &record(BackupStatus::Ok, None)).unwrap();
        store_status(&storage, &record(BackupStatus::Corrupt, Some("bad crc"))).unwrap();
        // backup.ini is never rewritten.
        assert_eq!(get_bytes(&storage, &ini).unwrap(), first);
        let listed = storage.list("").unwrap();
        let latest = latest_status(&storage, &done.label, &listed).unwrap();
        assert_eq!(
            latest,
            Some((BackupStatus::Corrupt, Some("bad crc".to_string())))
        );
        assert_eq!(latest_status(&storage, "other", &listed).unwrap(), None);
    }
}
